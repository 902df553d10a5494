//! The node endpoint both clients connect to: URL and connection settings.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::{Error, ErrorKind};

/// Default time a TCP + HTTP/2 connection to the node may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach a node. Credentials (bearer token, TLS) belong here, so
/// that the backend and the notifier share them.
#[derive(Debug, Clone)]
pub(crate) struct NodeEndpoint {
    pub(crate) url: String,
    pub(crate) connect_timeout: Duration,
}

impl NodeEndpoint {
    pub(crate) fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: CONNECT_TIMEOUT,
        }
    }

    /// The tonic endpoint; fails on a URL that is not `http(s)://host:port`.
    pub(crate) fn endpoint(&self) -> Result<Endpoint, Error> {
        let endpoint = Endpoint::from_shared(self.url.clone()).map_err(|err| {
            Error::new(
                ErrorKind::Config,
                format!("invalid node URL {:?}: {err}", self.url),
            )
        })?;
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
        })
    }

    /// A channel that connects on first use and again after a failure.
    pub(crate) fn connect_lazy(&self) -> Result<Channel, Error> {
        Ok(self.endpoint()?.connect_lazy())
    }
}

/// `err: its source: ...`: tonic's transport error says only "transport error".
fn source_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}
