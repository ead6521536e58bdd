//! Test certificates for NBD over TLS, made at test time with rcgen.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Writes a fresh CA and certificates into `dir` (created if missing): `ca-cert.pem` (what
/// libnbd's `tls-certificates` directory holds), a server certificate for localhost and
/// 127.0.0.1 (`server-cert.pem`, `server-key.pem`), and in `dir/client` the CA and a client
/// certificate it signed (`client-cert.pem`, `client-key.pem`, the names libnbd looks for).
/// `who` names the CA and the client in their common names.
pub fn make_pki(dir: &Path, who: &str) {
    std::fs::create_dir_all(dir.join("client")).expect("pki dir");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{who} test CA"));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    let client_key = KeyPair::generate().expect("client key");
    let mut client = CertificateParams::new(Vec::<String>::new()).expect("client params");
    client
        .distinguished_name
        .push(DnType::CommonName, format!("{who} test client"));
    let client_cert = client
        .signed_by(&client_key, &issuer)
        .expect("client certificate");
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("write {name}: {e}"))
    };
    write("ca-cert.pem", ca_cert.pem());
    write("server-cert.pem", cert.pem());
    write("server-key.pem", key.serialize_pem());
    write("client/ca-cert.pem", ca_cert.pem());
    write("client/client-cert.pem", client_cert.pem());
    write("client/client-key.pem", client_key.serialize_pem());
}
