//! TLS 1.3 for agent connections, with pinned identities instead of a certificate authority.
//!
//! * **The agent** has an Ed25519 key pair of its own ([`AgentIdentity`]), made on its first
//!   start and kept in its directory as `identity.key` (PKCS#8, mode 0600). At each start it
//!   makes a self-signed certificate for that key (the certificate's other fields mean nothing;
//!   only the key counts) and serves TLS 1.3 only ([`AgentIdentity::server_config`]).
//! * **The client** ([`client_config`]) accepts any certificate *as a carrier of a key*: it
//!   checks the TLS 1.3 handshake signature against the certificate's Ed25519 key, so the peer
//!   proves it holds that key, and records the key ([`peer_key`]). Whether that key is the right
//!   one is decided afterwards against the pins kept in the catalog (`crate::pins`): trust on
//!   first contact, then refuse any change unless the user accepts it on purpose.
//! * **The owner** is authenticated inside the TLS session by the Ed25519 challenge of
//!   [`crate::wire`], whose signed message includes a TLS exporter value ([`channel_binding`]):
//!   a signature made for one TLS session is worthless in any other, so a machine in the middle
//!   that terminates our TLS cannot relay our proof to the real agent.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as provider, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::{Error, Result};
use crate::keys::hex;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// Label of the exporter value bound into the owner's signature (RFC 8446 section 7.5).
const EXPORTER_LABEL: &[u8] = b"EXPORTER-sa-agent-owner-auth";
/// Server name the client asks for; agents are known by key, not by name.
const SERVER_NAME: &str = "sa-agent";
/// File in an agent's directory that holds its identity key.
pub const IDENTITY_FILE: &str = "identity.key";

/// An agent's public identity: its Ed25519 key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentKey(pub [u8; 32]);

impl AgentKey {
    /// Short form for messages and tables: the first 16 hex digits.
    pub fn fingerprint(&self) -> String {
        hex(&self.0)[..16].to_string()
    }
}

impl std::fmt::Display for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentKey({})", self.fingerprint())
    }
}

/// An agent's key pair, loaded from (or made in) its directory.
pub struct AgentIdentity {
    pkcs8: Vec<u8>,
    public: AgentKey,
}

impl AgentIdentity {
    /// Loads `DIR/identity.key`, or makes it when the file does not exist. A key file that
    /// group or others may read is refused, as with the owner's key.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let path = dir.join(IDENTITY_FILE);
        match std::fs::read(&path) {
            Ok(pkcs8) => {
                crate::keyfile::check_key_file_mode(&path)?;
                Self::from_pkcs8(pkcs8).map_err(|e| {
                    Error::Invalid(format!(
                        "{} is not an agent identity key ({e}); move it away and the agent makes a new \
                         one (clients then refuse it until `sa-image agents accept` is run)",
                        path.display()
                    ))
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pkcs8 = new_pkcs8()?;
                crate::durable::write(
                    &path,
                    &pkcs8,
                    crate::durable::Access::Private,
                    crate::durable::Replace::No,
                )?;
                tracing::info!(path = %path.display(), "made a new agent identity key");
                Self::from_pkcs8(pkcs8)
            }
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }

    /// A fresh identity held in memory only (tests).
    pub fn generate() -> Result<Self> {
        Self::from_pkcs8(new_pkcs8()?)
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self> {
        use ring::signature::KeyPair;
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|e| Error::Invalid(format!("bad Ed25519 key: {e}")))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(kp.public_key().as_ref());
        Ok(AgentIdentity {
            pkcs8,
            public: AgentKey(public),
        })
    }

    /// The public key clients pin.
    pub fn public(&self) -> AgentKey {
        self.public
    }

    /// A TLS 1.3 server configuration presenting a fresh self-signed certificate for this key.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let tls_err = |e: &dyn std::fmt::Display| Error::Invalid(format!("TLS setup: {e}"));
        let der = PrivatePkcs8KeyDer::from(self.pkcs8.clone());
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
            .map_err(|e| tls_err(&e))?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| tls_err(&e))?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("sa-agent {}", self.public.fingerprint()),
        );
        let cert = params.self_signed(&kp).map_err(|e| tls_err(&e))?;
        let config = rustls::ServerConfig::builder_with_provider(crypto())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(&e))?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone())),
            )
            .map_err(|e| tls_err(&e))?;
        Ok(Arc::new(config))
    }
}

/// A new Ed25519 key pair, PKCS#8.
fn new_pkcs8() -> Result<Vec<u8>> {
    let rng = ring::rand::SystemRandom::new();
    ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map(|doc| doc.as_ref().to_vec())
        .map_err(|_| Error::Invalid("cannot make an Ed25519 key".into()))
}

/// The ring provider, TLS 1.3 suites with AES-128-GCM first: what travels is already
/// AES-256-GCM ciphertext (shards) or sealed records, so the transport protects the session,
/// not the data, and AES-128 runs 10 rounds per block to AES-256's 14.
fn crypto() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        use provider::cipher_suite as cs;
        Arc::new(CryptoProvider {
            cipher_suites: vec![
                cs::TLS13_AES_128_GCM_SHA256,
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            ..provider::default_provider()
        })
    })
    .clone()
}

/// The client side: TLS 1.3 only, any Ed25519 certificate accepted as a carrier of the key that
/// is then checked against the pins (see the module docs).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    static C: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    C.get_or_init(|| {
        let config = rustls::ClientConfig::builder_with_provider(crypto())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(KeyCarrier))
            .with_no_client_auth();
        Arc::new(config)
    })
    .clone()
}

/// The name the client sends (agents are known by key, not by name).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// Accepts any certificate whose key is Ed25519; the TLS 1.3 signature is checked against it.
#[derive(Debug)]
struct KeyCarrier;

impl ServerCertVerifier for KeyCarrier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        cert_key(end_entity)
            .map(|_| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("agents speak TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::General(format!(
                "agent signed with {:?}; agents sign with Ed25519",
                dss.scheme
            )));
        }
        verify_tls13_signature(
            message,
            cert,
            dss,
            &crypto().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The Ed25519 key a certificate carries.
pub fn cert_key(cert: &CertificateDer<'_>) -> Result<AgentKey> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| Error::Protocol(format!("agent certificate does not parse: {e:?}")))?;
    let spki = parsed.subject_public_key_info();
    let spki = spki.as_ref();
    match spki.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
        Some(key) if key.len() == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(key);
            Ok(AgentKey(k))
        }
        _ => Err(Error::Protocol(
            "agent certificate does not carry an Ed25519 key".into(),
        )),
    }
}

/// The key the agent proved it holds in the TLS handshake of `conn`.
pub fn peer_key(conn: &rustls::ClientConnection) -> Result<AgentKey> {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| Error::Protocol("agent sent no certificate".into()))?;
    cert_key(cert)
}

/// The TLS exporter value of the client side of a session, bound into the owner's signature.
pub fn client_binding(conn: &rustls::ClientConnection) -> Result<[u8; 32]> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| Error::Protocol(format!("TLS exporter: {e}")))
}

/// The TLS exporter value of the agent side of a session (equal to the client's).
pub fn server_binding(conn: &rustls::ServerConnection) -> Result<[u8; 32]> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| Error::Protocol(format!("TLS exporter: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_and_is_private() {
        let d = tempfile::tempdir().unwrap();
        let a = AgentIdentity::load_or_create(d.path()).unwrap();
        let b = AgentIdentity::load_or_create(d.path()).unwrap();
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let p = d.path().join(IDENTITY_FILE);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(AgentIdentity::load_or_create(d.path()).is_err());
        }
    }

    #[tokio::test]
    async fn handshake_proves_the_key_and_binds_the_session() {
        let id = AgentIdentity::generate().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(id.server_config().unwrap());
        let connector = tokio_rustls::TlsConnector::from(client_config());
        let (a, b) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(async move {
            let s = acceptor.accept(b).await.unwrap();
            server_binding(s.get_ref().1).unwrap()
        });
        let c = connector.connect(server_name(), a).await.unwrap();
        assert_eq!(peer_key(c.get_ref().1).unwrap(), id.public());
        assert_eq!(
            c.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            "our ends agree on the cheaper suite"
        );
        let mine = client_binding(c.get_ref().1).unwrap();
        assert_eq!(server.await.unwrap(), mine);
        // Another session has another binding.
        let (a2, b2) = tokio::io::duplex(64 << 10);
        let acceptor = tokio_rustls::TlsAcceptor::from(id.server_config().unwrap());
        let server = tokio::spawn(async move { acceptor.accept(b2).await.map(|_| ()) });
        let c2 = connector.connect(server_name(), a2).await.unwrap();
        assert_ne!(client_binding(c2.get_ref().1).unwrap(), mine);
        server.await.unwrap().unwrap();
    }

    #[test]
    fn a_non_ed25519_certificate_is_refused() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        assert!(cert_key(cert.der()).is_err());
        assert!(cert_key(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }
}
