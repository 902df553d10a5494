//! The node endpoint both clients connect to: URL and connection settings.

use std::time::Duration;

use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::{Error, ErrorKind, Secret, proto::v1::entity_sync_client::EntitySyncClient};

/// The gRPC client both the backend and the notifier use: every call
/// carries the endpoint's credentials.
pub(crate) type NodeClient = EntitySyncClient<InterceptedService<Channel, Credentials>>;

/// Default time a TCP + HTTP/2 connection to the node may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach a node. Credentials (bearer token, TLS) belong here, so
/// that the backend and the notifier share them.
#[derive(Debug, Clone)]
pub(crate) struct NodeEndpoint {
    pub(crate) url: String,
    pub(crate) connect_timeout: Duration,
    /// Sent as `authorization: Bearer TOKEN` (redacted in `Debug`).
    pub(crate) token: Option<Secret>,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<crate::Tls>,
}

impl NodeEndpoint {
    pub(crate) fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: CONNECT_TIMEOUT,
            token: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// The interceptor that adds the credentials to every call; fails on a
    /// token that cannot be a header value.
    pub(crate) fn credentials(&self) -> Result<Credentials, Error> {
        let authorization = match &self.token {
            None => None,
            Some(token) => {
                let mut value: AsciiMetadataValue =
                    MetadataValue::try_from(format!("Bearer {}", token.expose())).map_err(
                        |_| {
                            Error::new(
                                ErrorKind::Config,
                                "the bearer token must be printable ASCII without spaces",
                            )
                        },
                    )?;
                // Never indexed by HPACK, and printed as "Sensitive" by the
                // HTTP stack's debug output.
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Credentials { authorization })
    }

    /// A client of `channel` carrying these credentials.
    pub(crate) fn client(&self, channel: Channel) -> Result<NodeClient, Error> {
        Ok(EntitySyncClient::with_interceptor(
            channel,
            self.credentials()?,
        ))
    }

    /// The tonic endpoint; fails on a URL that is not `http(s)://host:port`,
    /// on `https://` without TLS settings (or the reverse), and on bad PEM.
    pub(crate) fn endpoint(&self) -> Result<Endpoint, Error> {
        let config = |message: String| Error::new(ErrorKind::Config, message);
        let endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|err| config(format!("invalid node URL {:?}: {err}", self.url)))?;
        let https = endpoint.uri().scheme_str() == Some("https");
        #[cfg(feature = "tls")]
        let endpoint = match (&self.tls, https) {
            (Some(tls), true) => endpoint
                .tls_config(tls.client_config()?)
                .map_err(|err| config(format!("TLS settings: {}", source_chain(&err))))?,
            (Some(_), false) => {
                return Err(config(format!(
                    "node URL {:?}: with TLS settings, use https://",
                    self.url
                )));
            }
            (None, true) => {
                return Err(config(format!(
                    "node URL {:?}: https:// needs TLS settings (.tls(Tls::new().ca_certificate(..)))",
                    self.url
                )));
            }
            (None, false) => endpoint,
        };
        #[cfg(not(feature = "tls"))]
        if https {
            return Err(config(format!(
                "node URL {:?}: https:// needs the crate's `tls` feature",
                self.url
            )));
        }
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            // A dead node behind a live load balancer is noticed, not waited on.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10)))
    }

    /// Connects now.
    pub(crate) async fn connect(&self) -> Result<Channel, Error> {
        self.endpoint()?.connect().await.map_err(|err| {
            Error::new(
                ErrorKind::Connect,
                format!("{}: {}", self.url, source_chain(&err)),
            )
            .with_source(err)
        })
    }

    /// A channel that connects on first use and again after a failure.
    pub(crate) fn connect_lazy(&self) -> Result<Channel, Error> {
        Ok(self.endpoint()?.connect_lazy())
    }
}

/// `err: its source: ...`: tonic's transport error says only "transport error".
fn source_chain(err: &(dyn std::error::Error + 'static)) -> String {
    crate::error::with_causes(err.to_string(), err.source())
}

/// Adds `authorization` to every call.
#[derive(Clone)]
pub(crate) struct Credentials {
    authorization: Option<AsciiMetadataValue>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_sent_as_a_sensitive_bearer_header_and_never_printed() {
        let mut endpoint = NodeEndpoint::new("http://127.0.0.1:1");
        endpoint.token = Some(Secret::new("tok-0123456789abcdef".into()));
        assert!(!format!("{endpoint:?}").contains("tok-0123"));
        let mut credentials = endpoint.credentials().unwrap();
        let request = credentials.call(Request::new(())).unwrap();
        let value = request.metadata().get("authorization").unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer tok-0123456789abcdef");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("tok-0123"));

        endpoint.token = Some(Secret::new("bad token\n".into()));
        assert_eq!(
            endpoint.credentials().err().unwrap().kind(),
            ErrorKind::Config
        );
    }

    fn refused(endpoint: NodeEndpoint) -> String {
        let err = endpoint.endpoint().expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::Config);
        err.message().to_owned()
    }

    #[test]
    fn https_and_tls_settings_go_together() {
        #[cfg(feature = "tls")]
        {
            assert_eq!(
                refused(NodeEndpoint::new("https://127.0.0.1:1")),
                "node URL \"https://127.0.0.1:1\": https:// needs TLS settings \
                 (.tls(Tls::new().ca_certificate(..)))"
            );
            let mut endpoint = NodeEndpoint::new("http://127.0.0.1:1");
            endpoint.tls = Some(crate::Tls::new().ca_certificate(CA));
            assert_eq!(
                refused(endpoint.clone()),
                "node URL \"http://127.0.0.1:1\": with TLS settings, use https://"
            );
            endpoint.url = "https://127.0.0.1:1".into();
            assert!(endpoint.endpoint().is_ok());
        }
        assert!(NodeEndpoint::new("http://127.0.0.1:1").endpoint().is_ok());
    }

    /// Any base64 parses as PEM; tonic only stores it until it connects.
    #[cfg(feature = "tls")]
    const CA: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
}
