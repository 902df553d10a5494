//! TLS to the node: the CA to verify it with, a client certificate for mutual TLS, the name to check.

use std::fmt;

use rustls_pki_types::{
    CertificateDer, PrivateKeyDer,
    pem::{self, PemObject},
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::{Error, ErrorKind};

/// How [`Backend`](crate::Backend) and [`Notifier`](crate::Notifier) speak
/// TLS to a node whose gRPC port has `--grpc-tls-cert`; give it to their
/// builders' `tls` and use an `https://` URL.
///
/// ```
/// # fn pem() -> String { String::new() }
/// use entity_sync_backend::{Notifier, Tls};
/// let (ca, cert, key) = (pem(), pem(), pem()); // read from files
/// let notifier = Notifier::builder("https://entity-sync.internal:50051")
///     .tls(Tls::new().ca_certificate(ca).identity(cert, key));
/// ```
///
/// PEM is checked when the client is built: a bad one is an
/// [`ErrorKind::Config`] error naming what is wrong (never the contents).
///
/// A client certificate the node refuses (mutual TLS with
/// `--grpc-tls-client-ca`) fails the call as [`ErrorKind::Stream`], and
/// [`Backend::serve`](crate::Backend::serve) keeps retrying with backoff: in
/// TLS 1.3 the node checks the certificate after the client's side of the
/// handshake is done, so the client sees the node's alert
/// (`received fatal alert: CertificateRequired`, `UnknownCA`, ...) only when it
/// reads before it writes, and otherwise just a closed connection. A retry
/// also succeeds once the node trusts the certificate's CA (a rotation in
/// progress). Watch [`Backend::state`](crate::Backend::state) for the error.
#[derive(Clone, Default)]
pub struct Tls {
    ca_certificates: Vec<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain_name: Option<String>,
    #[cfg(feature = "tls-native-roots")]
    native_roots: bool,
}

impl fmt::Debug for Tls {
    // Never the key; the rest only as what is set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca_certificates", &self.ca_certificates.len())
            .field("identity", &self.identity.is_some())
            .field("domain_name", &self.domain_name)
            .finish()
    }
}

impl Tls {
    /// TLS with nothing trusted yet: add the CA that signed the node's
    /// certificate with [`ca_certificate`](Self::ca_certificate).
    pub fn new() -> Tls {
        Tls::default()
    }

    /// Trusts the CA certificate(s) in `pem` to sign the node's certificate.
    /// May be called more than once.
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.ca_certificates.push(pem.as_ref().to_vec());
        self
    }

    /// Presents this client certificate (chain) and key, both PEM, to a node
    /// that verifies clients (`--grpc-tls-client-ca`: mutual TLS).
    pub fn identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        self.identity = Some((cert_pem.as_ref().to_vec(), key_pem.as_ref().to_vec()));
        self
    }

    /// The name the node's certificate must carry, when it is not the URL's
    /// host (say, connecting by IP to a certificate made out to a DNS name).
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    /// Trusts the operating system's root certificates too (feature
    /// `tls-native-roots`), for a node whose certificate a public CA signed.
    #[cfg(feature = "tls-native-roots")]
    pub fn native_roots(mut self) -> Self {
        self.native_roots = true;
        self
    }

    /// tonic's client config, after checking every PEM.
    pub(crate) fn client_config(&self) -> Result<ClientTlsConfig, Error> {
        let config = |message: String| Error::new(ErrorKind::Config, message);
        #[cfg(feature = "tls-native-roots")]
        let native_roots = self.native_roots;
        #[cfg(not(feature = "tls-native-roots"))]
        let native_roots = false;
        if self.ca_certificates.is_empty() && !native_roots {
            return Err(config(
                "TLS needs a CA certificate to verify the node with (Tls::ca_certificate)".into(),
            ));
        }
        let mut tls = ClientTlsConfig::new();
        for (i, pem) in self.ca_certificates.iter().enumerate() {
            certificates(pem)
                .map_err(|why| config(format!("Tls::ca_certificate (#{}): {why}", i + 1)))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = &self.identity {
            certificates(cert)
                .map_err(|why| config(format!("Tls::identity certificate: {why}")))?;
            PrivateKeyDer::from_pem_slice(key).map_err(|err| {
                config(format!(
                    "Tls::identity key: {}",
                    match err {
                        pem::Error::NoItemsFound => "no PEM private key in it".to_owned(),
                        err => pem_problem(&err),
                    }
                ))
            })?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.domain_name {
            tls = tls.domain_name(name.clone());
        }
        #[cfg(feature = "tls-native-roots")]
        if native_roots {
            tls = tls.with_native_roots();
        }
        Ok(tls)
    }
}

/// At least one `CERTIFICATE` section.
fn certificates(pem: &[u8]) -> Result<(), String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_problem(&err))?;
    if certs.is_empty() {
        return Err("no PEM certificate (BEGIN CERTIFICATE) in it".into());
    }
    Ok(())
}

/// The PEM problem in our own words: the parser's may quote a line of the key.
fn pem_problem(err: &pem::Error) -> String {
    match err {
        pem::Error::MissingSectionEnd { .. } => "not valid PEM: a section has no END line",
        pem::Error::IllegalSectionStart { .. } => "not valid PEM: a malformed BEGIN line",
        pem::Error::Base64Decode(_) => "not valid PEM: a section is not valid base64",
        _ => "not valid PEM",
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_PEM: &str = "hunter2 is not a certificate";

    fn message(tls: Tls) -> String {
        let err = tls.client_config().expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::Config);
        err.message().to_owned()
    }

    #[test]
    fn bad_pem_is_a_config_error_that_does_not_quote_it() {
        assert_eq!(
            message(Tls::new()),
            "TLS needs a CA certificate to verify the node with (Tls::ca_certificate)"
        );
        let m = message(Tls::new().ca_certificate(NOT_PEM));
        assert_eq!(
            m,
            "Tls::ca_certificate (#1): no PEM certificate (BEGIN CERTIFICATE) in it"
        );
        let broken = "-----BEGIN CERTIFICATE-----\nhunter2\n";
        let m = message(Tls::new().ca_certificate(broken));
        assert_eq!(
            m,
            "Tls::ca_certificate (#1): not valid PEM: a section has no END line"
        );
        assert!(!m.contains("hunter2"));
        // The key is checked even when the certificate is fine.
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let m = message(Tls::new().ca_certificate(cert).identity(cert, NOT_PEM));
        assert_eq!(m, "Tls::identity key: no PEM private key in it");
        assert!(!format!("{:?}", Tls::new().identity(cert, NOT_PEM)).contains("hunter2"));
    }
}
