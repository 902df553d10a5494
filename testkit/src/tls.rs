//! Certificates for TLS tests, made with rcgen: a CA, a server certificate for
//! `127.0.0.1`/`localhost`, client certificates, written to a temp dir; and
//! the rustls client config of the testkit's `wss://`/`https://` clients.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    },
};

use crate::process::TempDir;

/// A certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority of its own for one test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A fresh self-signed CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        TestCa { issuer }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server_cert(&self) -> CertKey {
        self.issue(
            "entity-sync test node",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate for mutual TLS, with common name `name`.
    pub fn client_cert(&self, name: &str) -> CertKey {
        self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> CertKey {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("subject alt names");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &*self.issuer).expect("certificate");
        CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A CA, a server certificate and a client certificate it signed, written as
/// PEM files to a temp dir (removed on drop) for the node's `--*-tls-*` flags.
pub struct TlsFiles {
    pub ca: TestCa,
    pub server: CertKey,
    pub client: CertKey,
    /// The CA certificate.
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    dir: TempDir,
}

impl TlsFiles {
    pub fn new() -> TlsFiles {
        let ca = TestCa::new("entity-sync test CA");
        let server = ca.server_cert();
        let client = ca.client_cert("entity-sync test backend");
        let dir = TempDir::new("tls");
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write PEM");
            path
        };
        TlsFiles {
            ca_cert: write("ca.pem", &ca.cert_pem()),
            server_cert: write("server.pem", &server.cert_pem),
            server_key: write("server.key", &server.key_pem),
            client_cert: write("client.pem", &client.cert_pem),
            client_key: write("client.key", &client.key_pem),
            ca,
            server,
            client,
            dir,
        }
    }

    /// The temp dir the files are in (to write more, say a broken one).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// The SDK's TLS settings that trust this CA (no client certificate).
    pub fn sdk(&self) -> entity_sync_backend::Tls {
        entity_sync_backend::Tls::new().ca_certificate(self.ca_pem())
    }

    /// The SDK's TLS settings that trust this CA and present the client certificate.
    pub fn sdk_with_client_cert(&self) -> entity_sync_backend::Tls {
        self.sdk()
            .identity(&self.client.cert_pem, &self.client.key_pem)
    }
}

impl Default for TlsFiles {
    fn default() -> Self {
        TlsFiles::new()
    }
}

/// A rustls client config (ring) that trusts the CA certificates in `ca_pem`
/// only, and presents `identity` when given.
pub fn client_config(ca_pem: &str, identity: Option<&CertKey>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| format!("CA PEM: {e}"))?)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(identity) => {
            let certs = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate PEM: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
                .map_err(|e| format!("client key PEM: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())
        }
    }
}

/// A TLS client connection over `tcp` to `host` (a DNS name or an IP), with
/// ALPN `alpn` (e.g. `http/1.1`), trusting `ca_pem` only.
pub async fn connect(
    tcp: TcpStream,
    host: &str,
    ca_pem: &str,
    alpn: &[u8],
) -> Result<TlsStream<TcpStream>, String> {
    let mut config = client_config(ca_pem, None)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?}: {e}"))?;
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host}: {e}"))
}
