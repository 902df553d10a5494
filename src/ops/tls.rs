//! TLS of both ports: PEM files read and checked at start (errors name the flag and the path, never the contents), the gRPC port's acceptor, and the websocket port's TLS listener.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::serve::Listener;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinSet,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore, ServerConfig,
        crypto::ring,
        pki_types::{
            CertificateDer, PrivateKeyDer,
            pem::{self, PemObject},
        },
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};

use crate::config::{GrpcConfig, WsConfig};

/// A TLS file or setting the node cannot use.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{flag} {}: {reason}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The files parse, but TLS refuses them together (say, a key that is
    /// not the certificate's).
    #[error("{flags}: {reason}")]
    Refused { flags: &'static str, reason: String },
}

/// A certificate chain and its key, parsed (and checked).
struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| file_error(flag, path, format!("cannot read: {err}")))
}

fn file_error(flag: &'static str, path: &Path, reason: String) -> TlsError {
    TlsError::File {
        flag,
        path: path.to_owned(),
        reason,
    }
}

/// Every `CERTIFICATE` section of `pem`; at least one.
fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| file_error(flag, path, pem_problem(&err)))?;
    if certs.is_empty() {
        return Err(file_error(
            flag,
            path,
            "no PEM certificate (BEGIN CERTIFICATE) in the file".into(),
        ));
    }
    Ok(certs)
}

/// What is wrong with a PEM file, in words of our own: some of the
/// parser's messages quote the offending line, which may be key material.
fn pem_problem(err: &pem::Error) -> String {
    match err {
        pem::Error::MissingSectionEnd { .. } => "not valid PEM: a section has no END line",
        pem::Error::IllegalSectionStart { .. } => "not valid PEM: a malformed BEGIN line",
        pem::Error::Base64Decode(_) => "not valid PEM: a section is not valid base64",
        pem::Error::SectionTooLarge => "not valid PEM: a section is larger than 256 MB",
        _ => "not valid PEM",
    }
    .to_owned()
}

fn load_identity(
    (cert_flag, cert_path): (&'static str, &Path),
    (key_flag, key_path): (&'static str, &Path),
) -> Result<Identity, TlsError> {
    let cert_pem = read(cert_flag, cert_path)?;
    let certs = certificates(cert_flag, cert_path, &cert_pem)?;
    let key_pem = read(key_flag, key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| {
        let reason = match err {
            pem::Error::NoItemsFound => "no PEM private key (BEGIN PRIVATE KEY, \
                 RSA PRIVATE KEY or EC PRIVATE KEY) in the file"
                .to_owned(),
            err => pem_problem(&err),
        };
        file_error(key_flag, key_path, reason)
    })?;
    Ok(Identity { certs, key })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A server config for `identity`, verifying client certificates against
/// `client_roots` when given; refuses a key that is not the certificate's.
fn server_config(
    identity: &Identity,
    client_roots: Option<RootCertStore>,
    flags: &'static str,
) -> Result<ServerConfig, TlsError> {
    let refused = |reason: String| TlsError::Refused { flags, reason };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| refused(err.to_string()))?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .map_err(|err| refused(err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())
        .map_err(|err| refused(err.to_string()))
}

/// The gRPC port's TLS acceptor (HTTP/2 only, verifying client
/// certificates against --grpc-tls-client-ca when given), or `None` when the
/// port is plaintext. Reads and checks every file now, so that a bad one
/// stops the node at start. Handshakes run in the gRPC port's own accept
/// loop (`grpc::listener`), which caps them and gives each a deadline.
pub(crate) fn grpc_acceptor(config: &GrpcConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    let Some((cert, key)) = config.tls_identity() else {
        return Ok(None);
    };
    let identity = load_identity(("--grpc-tls-cert", cert), ("--grpc-tls-key", key))?;
    let client_roots = match &config.tls_client_ca {
        None => None,
        Some(path) => {
            let flag = "--grpc-tls-client-ca";
            let pem = read(flag, path)?;
            let mut roots = RootCertStore::empty();
            for cert in certificates(flag, path, &pem)? {
                roots.add(cert).map_err(|err| {
                    file_error(flag, path, format!("not a usable CA certificate: {err}"))
                })?;
            }
            Some(roots)
        }
    };
    let flags = match client_roots {
        None => "--grpc-tls-cert/--grpc-tls-key",
        Some(_) => "--grpc-tls-cert/--grpc-tls-key/--grpc-tls-client-ca",
    };
    let mut server = server_config(&identity, client_roots, flags)?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// The websocket port's TLS acceptor (HTTP/1.1 only, like the port), or
/// `None` when it is plaintext.
pub(crate) fn ws_acceptor(config: &WsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    let Some((cert, key)) = config.tls_identity() else {
        return Ok(None);
    };
    let identity = load_identity(("--ws-tls-cert", cert), ("--ws-tls-key", key))?;
    let mut server = server_config(&identity, None, "--ws-tls-cert/--ws-tls-key")?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// An axum listener that accepts TCP from `inner` and hands out connections
/// once their TLS handshake is done. Handshakes run as tasks of their own
/// (a `JoinSet`, aborted when the listener is dropped), each capped by
/// `--handshake-timeout`, so a client that never finishes one holds only its
/// socket, never the accept loop.
pub(crate) struct TlsListener<L: Listener> {
    inner: L,
    acceptor: TlsAcceptor,
    timeout: Duration,
    handshakes: JoinSet<Option<(TlsStream<L::Io>, SocketAddr)>>,
}

/// Handshakes under way at once; a connection beyond it is closed at once
/// (each holds a socket and a task until it finishes or times out).
pub(crate) const MAX_PENDING_HANDSHAKES: usize = 4096;

impl<L: Listener> TlsListener<L> {
    /// `timeout`: `--handshake-timeout`.
    pub(crate) fn new(inner: L, acceptor: TlsAcceptor, timeout: Duration) -> Self {
        Self {
            inner,
            acceptor,
            timeout,
            handshakes: JoinSet::new(),
        }
    }
}

impl<L> Listener for TlsListener<L>
where
    L: Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = TlsStream<L::Io>;
    type Addr = SocketAddr;

    // Cancel-safe, as axum needs (it drops this future on shutdown): the TCP
    // accept and `join_next` both are, and handshakes live in `self`.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                (stream, peer) = self.inner.accept() => {
                    if self.handshakes.len() >= MAX_PENDING_HANDSHAKES {
                        tracing::debug!(%peer, "too many TLS handshakes under way; connection closed");
                        continue;
                    }
                    let (acceptor, timeout) = (self.acceptor.clone(), self.timeout);
                    self.handshakes.spawn(async move {
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => Some((tls, peer)),
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, %err, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(%peer, ?timeout, "TLS handshake timed out");
                                None
                            }
                        }
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc(cert: &str, key: &str, ca: Option<&str>) -> GrpcConfig {
        GrpcConfig {
            tls_cert: Some(cert.into()),
            tls_key: Some(key.into()),
            tls_client_ca: ca.map(PathBuf::from),
            ..GrpcConfig::default()
        }
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named_with_their_flag() {
        let dir = std::env::temp_dir().join(format!("es-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate, secret-ish text").unwrap();
        let junk = junk.to_str().unwrap();

        let err = grpc_acceptor(&grpc("/nonexistent/c.pem", junk, None))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("--grpc-tls-cert /nonexistent/c.pem: cannot read: "),
            "{err}"
        );

        let err = grpc_acceptor(&grpc(junk, junk, None))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            format!("--grpc-tls-cert {junk}: no PEM certificate (BEGIN CERTIFICATE) in the file")
        );
        assert!(!err.contains("secret-ish"));

        let ws = WsConfig {
            tls_cert: Some("/nonexistent/w.pem".into()),
            tls_key: Some(junk.into()),
            ..WsConfig::default()
        };
        let err = ws_acceptor(&ws).err().unwrap().to_string();
        assert!(
            err.starts_with("--ws-tls-cert /nonexistent/w.pem: cannot read: "),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plaintext_needs_no_files() {
        assert!(grpc_acceptor(&GrpcConfig::default()).unwrap().is_none());
        assert!(ws_acceptor(&WsConfig::default()).unwrap().is_none());
    }
}
