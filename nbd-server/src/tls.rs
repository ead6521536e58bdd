//! TLS for NBD (`NBD_OPT_STARTTLS`): the server's certificate, and the stream
//! a connection runs over before and after the upgrade.
//!
//! A server given a TLS configuration ([`ServerConfig::tls`](crate::ServerConfig::tls))
//! runs in the spec's FORCEDTLS mode: "The server insists upon TLS, and forces
//! the client to upgrade by erroring any NBD options other than
//! `NBD_OPT_STARTTLS` or `NBD_OPT_ABORT` with `NBD_REP_ERR_TLS_REQD`". Without
//! one it runs in NOTLS mode and answers `NBD_OPT_STARTTLS` with
//! `NBD_REP_ERR_UNSUP`. There is no SELECTIVETLS: an export is either all
//! TLS or all plain, so a man in the middle cannot downgrade a session.
//!
//! The TLS library is rustls with the *ring* provider, TLS 1.3 and 1.2 ("NBD
//! implementations supporting TLS MUST support TLS version 1.2, SHOULD support
//! any later versions"); older versions are not offered. TLS protects the
//! data in flight and proves the server to the client. It restricts who may
//! read the export only when client certificates are required: given a
//! client CA, the server accepts only clients whose certificate that CA
//! signed (libnbd sends `client-cert.pem`/`client-key.pem` from its
//! `tls-certificates` directory); without one, anyone who can connect and
//! speaks TLS gets the export. [`load_pem`] reads it all from PEM files.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// PEM files larger than this are refused unread (a certificate chain is a few KiB).
const MAX_PEM_FILE: u64 = 1 << 20;

/// Why a TLS configuration could not be built. The messages leave the cause to
/// [`std::error::Error::source`], so that a chain printer shows it once.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A PEM file is larger than any certificate chain or key would be.
    #[error("{} is larger than {MAX_PEM_FILE} bytes: not a PEM certificate or key", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds no usable item of the expected kind.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong, for people.
        what: String,
    },
    /// rustls refused the certificate and key (e.g. they do not belong together).
    #[error("the certificate and key cannot be used for TLS")]
    Config(#[source] rustls::Error),
    /// The client CA cannot verify client certificates.
    #[error("cannot verify client certificates with {}", path.display())]
    ClientCa {
        /// The client CA file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > MAX_PEM_FILE {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
        });
    }
    std::fs::read(path).map_err(read)
}

/// Loads a certificate chain (server certificate first, then any
/// intermediates) and its private key (PKCS#8, PKCS#1 or SEC1) from PEM files
/// and builds the rustls configuration for [`ServerConfig::tls`](crate::ServerConfig::tls).
/// With `client_ca` (PEM, one or more CA certificates), clients must present a
/// certificate signed by one of them. Every error names the file it is about.
pub fn load_pem(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = read_certs(cert)?;
    let text = read_pem(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        pem_error(
            key,
            format!("holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let clients = match client_ca {
        None => None,
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in read_certs(path)? {
                roots.add(ca).map_err(|e| {
                    pem_error(path, format!("holds a certificate that is not a CA: {e}"))
                })?;
            }
            Some((path, roots))
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some((path, roots)) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|source| TlsError::ClientCa {
                path: path.to_owned(),
                source,
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key_der)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

fn pem_error(path: &Path, what: String) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        what,
    }
}

/// All certificates of a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

/// A client connection: plain TCP until `NBD_OPT_STARTTLS`, TLS after.
#[derive(Debug)]
pub(crate) enum Transport {
    /// Before (or without) TLS.
    Plain(TcpStream),
    /// After a successful `NBD_OPT_STARTTLS`.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_pem_names_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let missing = load_pem(&cert, &key, None).unwrap_err();
        assert!(matches!(missing, TlsError::Read { ref path, .. } if path == &cert));
        std::fs::write(&cert, "not pem at all\n").unwrap();
        let e = load_pem(&cert, &key, None).unwrap_err();
        assert!(e.to_string().contains("cert.pem"), "{e}");
        assert!(matches!(e, TlsError::Pem { .. }), "{e:?}");

        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        let e = load_pem(&cert, &key, None).unwrap_err();
        assert!(
            matches!(e, TlsError::Read { ref path, .. } if path == &key),
            "{e:?}"
        );
        // A certificate where the key should be.
        std::fs::write(&key, ck.cert.pem()).unwrap();
        let e = load_pem(&cert, &key, None).unwrap_err();
        assert!(e.to_string().contains("key.pem"), "{e}");
        // Another certificate's key.
        let other = rcgen::generate_simple_self_signed(vec!["other".to_owned()]).unwrap();
        std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
        assert!(matches!(
            load_pem(&cert, &key, None).unwrap_err(),
            TlsError::Config(_)
        ));
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        load_pem(&cert, &key, None).expect("a matching certificate and key");
    }
}
