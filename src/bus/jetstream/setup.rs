//! Setting the JetStream bus up: the connection to NATS (options,
//! credentials, retries while starting), the server version check, and the
//! stream (created, or checked when it exists).

use std::time::Duration;

use async_nats::{
    Client, ConnectOptions,
    jetstream::{self, stream},
};
use bytes::Bytes;
use entity_sync_backend::Backoff;
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{
        error::{BusError, ConnectError, StreamError},
        memory::DEDUP_WINDOW,
    },
    config::{NatsConfig, scrub_urls},
};

/// Oldest nats-server accepted (major, minor).
const MIN_SERVER_VERSION: (u64, u64) = (2, 10);
/// Oldest nats-server with atomic batch publish: older ones get each key
/// as its own message.
const ATOMIC_SERVER_VERSION: (u64, u64) = (2, 12);
/// Deadline of each JetStream API request made to set up and consume the
/// stream (stream info and create, consumer create, and the ordered
/// consumer's own recreations). A request can be lost with a cluster member
/// (sent through a server that died, or while the stream elects a leader);
/// without this it waits out the connection's 10 s request timeout before
/// the next attempt. Publish acks keep their own wait.
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection attempt to NATS may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause between startup attempts (steps of a jittered
/// [`Backoff`]).
const STARTUP_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// How often the client pings its server. async-nats' default (a minute)
/// leaves a half-open link (a peer that vanished without a FIN) unnoticed
/// for minutes; two unanswered pings make the client reconnect.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Connects to `urls` (comma-separated) with the credentials and TLS
/// settings of `config`, retrying within `--nats-startup-timeout`.
pub(super) async fn connect(
    config: &NatsConfig,
    urls: &str,
    node_id: &str,
    cancel: &CancellationToken,
) -> Result<Client, BusError> {
    // URLs may carry credentials (`nats://user:password@host`): errors
    // and logs name them without.
    let connect_error = |source: ConnectError| BusError::Connect {
        url: scrub_urls(urls),
        source,
    };
    let mut options = ConnectOptions::new()
        .name(format!("entity-sync {node_id}"))
        .connection_timeout(CONNECT_TIMEOUT)
        .ping_interval(PING_INTERVAL)
        .max_reconnects(None)
        .retain_servers_order()
        .event_callback(|event| async move {
            tracing::info!(%event, "NATS connection event");
        });
    if let Some(path) = &config.creds {
        options = options.credentials_file(path).await.map_err(|source| {
            connect_error(ConnectError::Credentials {
                path: path.clone(),
                source,
            })
        })?;
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => return Err(connect_error(ConnectError::HalfKeyPair)),
    }
    if config.require_tls {
        options = options.require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse().map_err(|source| {
                connect_error(ConnectError::BadUrl {
                    url: scrub_urls(u),
                    source,
                })
            })
        })
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err(connect_error(ConnectError::NoUrl));
    }
    // `nats://user:password@host`: async-nats does not send URL
    // credentials by itself.
    if let Some(addr) = addrs.iter().find(|a| a.has_user_pass()) {
        let user = percent_decode(addr.username().unwrap_or_default());
        let password = percent_decode(addr.password().unwrap_or_default());
        options = options.user_and_password(user, password);
    }
    // ...and it logs a server's address, URL and all, at debug level on
    // every connection attempt: it gets the addresses without them.
    let addrs: Vec<async_nats::ServerAddr> = addrs.into_iter().map(without_credentials).collect();
    at_startup(
        "connecting to NATS",
        config.startup_timeout,
        cancel,
        connect_retryable,
        || options.clone().connect(addrs.clone()),
    )
    .await?
    .map_err(|err| connect_error(ConnectError::Nats(err)))
}

/// The version of the server `client` is connected to, if it is recent
/// enough.
pub(super) fn server_version(client: &Client) -> Result<String, BusError> {
    let version = client.server_info().version;
    match parse_version(&version) {
        Some(v) if v >= MIN_SERVER_VERSION => Ok(version),
        _ => Err(BusError::ServerTooOld { version }),
    }
}

/// The stream of `config`, created if missing and checked if it exists,
/// with its state; its handle asks with [`API_TIMEOUT`]. Retried within
/// `--nats-startup-timeout`.
pub(super) async fn open_stream(
    client: &Client,
    config: &NatsConfig,
    atomic: bool,
    cancel: &CancellationToken,
) -> Result<(stream::Stream, stream::Info), BusError> {
    // The stream handle (and the consumers made from it) ask with the
    // shorter deadline; the bus's own context publishes.
    let api = jetstream::ContextBuilder::new()
        .timeout(API_TIMEOUT)
        .build(client.clone());
    let wanted = stream_config(config, atomic);
    let stream_error = |source: StreamError| BusError::Stream {
        stream: wanted.name.clone(),
        source,
    };
    // A fresh cluster answers "JetStream not ready" or times out while
    // it elects its leaders; nodes started with it wait for it.
    let (stream, info) = at_startup(
        "setting up the JetStream stream",
        config.startup_timeout,
        cancel,
        |_: &StreamError| true,
        || async {
            let mut stream = api
                .get_or_create_stream(wanted.clone())
                .await
                .map_err(StreamError::Create)?;
            let info = stream.info().await.map_err(StreamError::Info)?.clone();
            Ok((stream, info))
        },
    )
    .await?
    .map_err(stream_error)?;
    check_stream(&wanted, &info.config).map_err(stream_error)?;
    Ok((stream, info))
}

/// Whether the server has atomic batch publish (2.12+); says in the log
/// what an older one means for `Notify`.
pub(super) fn atomic_server(version: &str) -> bool {
    let atomic = parse_version(version).is_some_and(|v| v >= ATOMIC_SERVER_VERSION);
    if !atomic {
        tracing::warn!(
            server.version = %version,
            "nats-server is older than 2.12 (no atomic batch publish): a Notify stores each key as its own message, and one that fails part-way may have stored some of its keys"
        );
    }
    atomic
}

/// Whether `publish` can store a call's keys as atomic batches on the
/// stream `info` describes (on a 2.12+ server): a stream created by a node
/// allows them from the start; one made before without `allow_atomic` gets
/// it added. The stream's JSON is read and written back as JetStream sends
/// it, so that settings this client does not know are kept. When that
/// fails (e.g. the NATS user may not update streams), says so in the log
/// and the bus publishes each key on its own.
pub(super) async fn atomic_batches(
    client: &Client,
    config: &NatsConfig,
    info: &stream::Info,
) -> bool {
    if info.config.allow_atomic_publish {
        return true;
    }
    let name = stream_name(&config.prefix);
    match allow_atomic(client, &name).await {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(
                stream = %name,
                error = %err,
                "the stream does not allow atomic batches and could not be updated to: a Notify stores each key as its own message, and one that fails part-way may have stored some of its keys"
            );
            false
        }
    }
}

/// Why `allow_atomic` could not be set on the stream.
#[derive(Debug, thiserror::Error)]
enum AtomicSetupError {
    #[error("{0}")]
    Request(#[from] async_nats::RequestError),
    #[error("JetStream did not answer in time")]
    Timeout,
    #[error("unreadable JetStream answer: {0}")]
    Json(#[from] serde_json::Error),
    #[error("JetStream refused: {0}")]
    Refused(String),
    #[error(
        "the stream was updated without allow_atomic (is every server of the cluster 2.12 or newer?)"
    )]
    NotKept,
}

/// Sets `allow_atomic` on the existing stream `name` (one request for its
/// config, one to update it).
async fn allow_atomic(client: &Client, name: &str) -> Result<(), AtomicSetupError> {
    let info = api_request(client, format!("$JS.API.STREAM.INFO.{name}"), Bytes::new()).await?;
    let mut config = info.get("config").cloned().unwrap_or_default();
    if config.get("allow_atomic") == Some(&serde_json::Value::Bool(true)) {
        return Ok(());
    }
    let Some(fields) = config.as_object_mut() else {
        return Err(AtomicSetupError::Refused(
            "stream info without config".into(),
        ));
    };
    fields.insert("allow_atomic".into(), serde_json::Value::Bool(true));
    let body = serde_json::to_vec(&config)?;
    let updated = api_request(client, format!("$JS.API.STREAM.UPDATE.{name}"), body.into()).await?;
    if updated.pointer("/config/allow_atomic") != Some(&serde_json::Value::Bool(true)) {
        return Err(AtomicSetupError::NotKept);
    }
    tracing::info!(stream = %name, "allowed atomic batches on the existing stream");
    Ok(())
}

/// A JetStream API request answered with JSON (an error answer is
/// [`AtomicSetupError::Refused`]), within [`API_TIMEOUT`].
async fn api_request(
    client: &Client,
    subject: String,
    body: Bytes,
) -> Result<serde_json::Value, AtomicSetupError> {
    let answer = tokio::time::timeout(API_TIMEOUT, client.request(subject, body))
        .await
        .map_err(|_| AtomicSetupError::Timeout)??;
    let value: serde_json::Value = serde_json::from_slice(&answer.payload)?;
    if let Some(error) = value.get("error") {
        let description = error
            .get("description")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("no description");
        return Err(AtomicSetupError::Refused(description.to_owned()));
    }
    Ok(value)
}

/// Retries `attempt` with backoff while it fails with an error `retryable`
/// accepts and `window` lasts (`--nats-startup-timeout`: servers started
/// together with the nodes, a cluster still electing its leaders); stops
/// early on shutdown.
async fn at_startup<T, E: std::error::Error, F: Future<Output = Result<T, E>>>(
    what: &str,
    window: Duration,
    cancel: &CancellationToken,
    retryable: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> F,
) -> Result<Result<T, E>, BusError> {
    let deadline = tokio::time::Instant::now() + window;
    let mut backoff = Backoff::new(STARTUP_BACKOFF.0, STARTUP_BACKOFF.1);
    loop {
        let err = match attempt().await {
            Ok(value) => return Ok(Ok(value)),
            Err(err) => err,
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !retryable(&err) || left.is_zero() {
            return Ok(Err(err));
        }
        // The last pause ends with the window and one more attempt is made
        // then: the jittered pauses would otherwise give up to half of it away.
        let pause = backoff.next_delay().min(left);
        tracing::warn!(error = %err, retry_in = ?pause, "{what} failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => return Err(BusError::Closed),
        }
    }
}

/// Connection failures worth another attempt while starting: the server is
/// not up yet or dropped the connection. Refused credentials, a bad address
/// or a TLS mismatch stay as they are.
fn connect_retryable(err: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind as Kind;
    matches!(err.kind(), Kind::Io | Kind::TimedOut | Kind::Dns)
}

/// `addr` without the user and password of its URL (sent in the handshake
/// instead, see `connect`).
fn without_credentials(addr: async_nats::ServerAddr) -> async_nats::ServerAddr {
    let mut url = addr.into_inner();
    // Both fail only for URLs that cannot carry credentials, which then
    // carry none.
    let _ = url.set_password(None);
    let _ = url.set_username("");
    async_nats::ServerAddr::from_url(url).expect("the scheme was accepted before")
}

/// Name of the stream (`{prefix}_changes`).
pub(super) fn stream_name(prefix: &str) -> String {
    format!("{prefix}_changes")
}

/// The stream's subjects, which the consumer also filters on.
pub(super) fn changes_subjects(prefix: &str) -> String {
    format!("{prefix}.changes.>")
}

/// The stream a node creates; `atomic`: allowing atomic batches (a 2.12+
/// server).
fn stream_config(config: &NatsConfig, atomic: bool) -> stream::Config {
    stream::Config {
        name: stream_name(&config.prefix),
        description: Some("entity-sync change keys".into()),
        subjects: vec![changes_subjects(&config.prefix)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        num_replicas: config.replicas,
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        // JetStream refuses a duplicate window longer than max_age.
        duplicate_window: DEDUP_WINDOW.min(config.max_age),
        allow_atomic_publish: atomic,
        ..Default::default()
    }
}

/// `%XX` escapes of a URL's user or password decoded (invalid ones kept).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses "2.10.3", "v2.11.0-RC.1" into (major, minor).
fn parse_version(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim().trim_start_matches('v').split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Refuses an existing stream whose settings would break the bus (never
/// changes it silently); differences that only tune it are logged.
fn check_stream(wanted: &stream::Config, actual: &stream::Config) -> Result<(), StreamError> {
    if actual.subjects != wanted.subjects {
        return Err(StreamError::Subjects {
            actual: actual.subjects.clone(),
            expected: wanted.subjects.clone(),
        });
    }
    if actual.retention != wanted.retention {
        return Err(StreamError::Retention(actual.retention));
    }
    if actual.max_messages_per_subject > 0 {
        return Err(StreamError::MaxMessagesPerSubject);
    }
    if actual.num_replicas != wanted.num_replicas
        || actual.max_age != wanted.max_age
        || actual.max_bytes != wanted.max_bytes
    {
        tracing::warn!(
            replicas = actual.num_replicas,
            max_age = ?actual.max_age,
            max_bytes = actual.max_bytes,
            "the stream exists with other limits than configured; keeping the existing ones"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_scrubbed_from_urls() {
        assert_eq!(
            scrub_urls("nats://alice:s3cret@n1:4222, tls://tok3n@n2:4222/x,n3:4222"),
            "nats://***@n1:4222,tls://***@n2:4222/x,n3:4222"
        );
        assert_eq!(scrub_urls("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(scrub_urls("user:pw@host:4222"), "***@host:4222");
        assert_eq!(percent_decode("p%40ss%3Aw%2"), "p@ss:w%2");
    }

    #[test]
    fn addresses_lose_their_credentials() {
        let addr: async_nats::ServerAddr = "nats://user:pa%40ss@127.0.0.1:4333".parse().unwrap();
        let bare = without_credentials(addr);
        assert_eq!(bare.as_url_str(), "nats://127.0.0.1:4333");
        assert!(!bare.has_user_pass());
        assert!(!format!("{bare:?}").contains("pa%40ss"));
        let tls: async_nats::ServerAddr = "tls://[::1]:4222".parse().unwrap();
        assert_eq!(without_credentials(tls).as_url_str(), "tls://[::1]:4222");
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("2.10.3"), Some((2, 10)));
        assert_eq!(parse_version("v2.11.0-RC.1"), Some((2, 11)));
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert!(parse_version("2.9.10") < Some(MIN_SERVER_VERSION));
        assert!(parse_version("3.0.0") >= Some(MIN_SERVER_VERSION));
        assert!(!atomic_server("2.11.9"));
        assert!(atomic_server("2.12.0"));
        assert!(atomic_server("v2.15.1"));
        assert!(!atomic_server("garbage"));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn incompatible_streams_are_refused() {
        let config = NatsConfig {
            prefix: "es".into(),
            max_age: Duration::from_secs(3600),
            max_bytes: -1,
            ..NatsConfig::default()
        };
        let wanted = stream_config(&config, true);
        assert!(wanted.allow_atomic_publish);
        assert_eq!(wanted.name, "es_changes");
        assert!(check_stream(&wanted, &wanted).is_ok());
        let mut other = wanted.clone();
        other.subjects = vec!["other.>".into()];
        assert!(check_stream(&wanted, &other).is_err());
        let mut other = wanted.clone();
        other.retention = stream::RetentionPolicy::WorkQueue;
        assert!(check_stream(&wanted, &other).is_err());
        let mut other = wanted.clone();
        other.max_age = Duration::from_secs(1);
        assert!(
            check_stream(&wanted, &other).is_ok(),
            "tuning differences only warn"
        );
    }
}
