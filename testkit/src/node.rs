//! Nodes under test: in-process on port 0 ([`TestNode`]), or the real binary
//! as a child process ([`NodeProcess`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use entity_sync::{
    config::Config,
    node::{Listeners, Node},
};
use tokio::{net::TcpListener, time::Instant};

use crate::{
    DEADLINE, WsClient,
    http::{http_get, metric_value},
    process::{ChildGuard, TempDir, log_tail},
    resolver::{ResolverData, ResolverOptions, TestResolver},
};

/// A real node with both listeners bound on 127.0.0.1:0.
pub struct TestNode {
    node: Option<Node>,
    ws_url: String,
    grpc: String,
}

impl TestNode {
    /// The configuration tests start from: the defaults, with short deadlines.
    pub fn test_config() -> Config {
        let mut config = Config::default();
        config.resolve.timeout = Duration::from_secs(2);
        config.shutdown_grace = Duration::from_secs(3);
        // Most tests notify without changing rows and expect a push for each
        // change; the node's default (no push of unchanged rows) is tested
        // by tests/node/unchanged_rows.rs, which turns this back off.
        config.ws.push_unchanged_rows = true;
        config
    }

    /// Starts a node with [`test_config`](Self::test_config), then `modify` applied on top.
    pub async fn start(modify: impl FnOnce(&mut Config)) -> TestNode {
        let mut config = Self::test_config();
        modify(&mut config);
        Self::try_start(config).await.expect("node starts")
    }

    /// Starts a node with exactly `config` (its addresses are ignored: the
    /// listeners are bound on 127.0.0.1:0).
    pub async fn try_start(config: Config) -> Result<TestNode, entity_sync::node::NodeError> {
        let ws = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        Self::start_on(Listeners { ws, grpc }, config).await
    }

    /// Starts a node on given listeners (to restart one on the same ports).
    pub async fn start_on(
        listeners: Listeners,
        config: Config,
    ) -> Result<TestNode, entity_sync::node::NodeError> {
        let ws_path = config.ws.path.clone();
        let ws_scheme = match config.ws.tls_identity() {
            Some(_) => "wss",
            None => "ws",
        };
        let grpc_scheme = match config.grpc.tls_identity() {
            Some(_) => "https",
            None => "http",
        };
        let node = Node::start(listeners, config).await?;
        let ws_url = format!("{ws_scheme}://{}{}", node.ws_addr(), ws_path);
        let grpc = format!("{grpc_scheme}://{}", node.grpc_addr());
        Ok(TestNode {
            node: Some(node),
            ws_url,
            grpc,
        })
    }

    /// Starts a node with the test defaults only.
    pub async fn start_default() -> TestNode {
        TestNode::start(|_| {}).await
    }

    /// Starts a node with the test defaults and one resolver, "backend",
    /// serving `entity` in `mode` from the returned (empty) data.
    pub async fn with_resolver(
        entity: &str,
        mode: entity_sync_backend::FetchMode,
    ) -> (TestNode, TestResolver, ResolverData) {
        TestNode::start_with_resolver(|_| {}, ResolverOptions::new("backend").entity(entity, mode))
            .await
    }

    /// Starts a node (test defaults, then `modify`) and connects one resolver
    /// with `options`, serving from the returned (empty) data.
    pub async fn start_with_resolver(
        modify: impl FnOnce(&mut Config),
        options: ResolverOptions,
    ) -> (TestNode, TestResolver, ResolverData) {
        let node = TestNode::start(modify).await;
        let data = ResolverData::new();
        let resolver = TestResolver::connect(node.grpc(), options, &data).await;
        (node, resolver, data)
    }

    /// The websocket URL, `ws://127.0.0.1:PORT/path` (`wss://` with `--ws-tls-cert`).
    pub fn ws_url(&self) -> &str {
        &self.ws_url
    }

    /// The gRPC endpoint, `http://127.0.0.1:PORT` (`https://` with `--grpc-tls-cert`).
    pub fn grpc(&self) -> &str {
        &self.grpc
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.node().ws_addr()
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.node().grpc_addr()
    }

    /// Where `/metrics` is served when `--metrics-addr` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.node().metrics_addr()
    }

    /// Whether the node verifies gRPC client certificates.
    pub fn grpc_client_auth(&self) -> bool {
        self.node().grpc_client_auth()
    }

    fn node(&self) -> &Node {
        self.node.as_ref().expect("node already shut down")
    }

    /// The registry counts right now.
    pub fn stats(&self) -> StatsView {
        let s = self.node().stats();
        StatsView {
            connections: s.connections,
            subscriptions: s.subscriptions,
            keys: s.keys,
            resolvers: s.resolvers,
        }
    }

    /// Polls `stats()` until `cond` holds; panics with the last counts after
    /// [`DEADLINE`].
    pub async fn wait_stats(&self, what: &str, cond: impl Fn(&StatsView) -> bool) -> StatsView {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let s = self.stats();
            if cond(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for stats: {what}; last stats: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Opens a websocket client to this node.
    pub async fn client(&self) -> WsClient {
        WsClient::connect(&self.ws_url).await
    }

    /// `GET path` on the websocket port; (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.ws_addr(), path)
            .await
            .unwrap_or_else(|err| panic!("GET {path}: {err}"))
    }

    /// An unlabelled (or fully labelled) sample of `/metrics`; panics if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.http_get("/metrics").await;
        assert_eq!(status, 200, "/metrics answered {status}");
        metric_value(&body, name).unwrap_or_else(|| panic!("no sample {name} in /metrics:\n{body}"))
    }

    /// Re-reads the node's tokens file (what SIGHUP does).
    pub fn reload_credentials(&self) -> Result<usize, entity_sync::node::NodeError> {
        Ok(self.node().reload_credentials()?)
    }

    /// Reads `--subscribe-token-jwks` again, as SIGHUP does; how many keys
    /// are in force. Panics without the flag.
    pub fn reload_subscribe_token_keys(
        &self,
    ) -> Result<usize, entity_sync::websocket::tokens::JwksError> {
        self.node()
            .reload_subscribe_token_keys()
            .expect("the node has --subscribe-token-jwks")
    }

    /// Graceful shutdown of the node.
    pub async fn shutdown(&mut self) {
        let node = self.node.take().expect("node already shut down");
        node.shutdown().await;
    }
}

/// A copy of the node's registry counts (Debug, comparable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsView {
    pub connections: usize,
    pub subscriptions: usize,
    pub keys: usize,
    pub resolvers: usize,
}

/// The target of the node's `listening` line: its own, so that whatever
/// `RUST_LOG` a test gives, one more directive lets the line through.
const LISTENING_TARGET: &str = "entity_sync::node::listening";

/// How long a spawned node may take to bind its ports and log them.
const LISTEN_DEADLINE: Duration = Duration::from_secs(30);

/// The `entity-sync` binary as a child process, on loopback ports it binds
/// itself (port 0) and reports in its log: the `listening` line, logged at
/// info level once both ports are bound, before the node connects to
/// anything:
///
/// ```text
/// 2026-01-01T00:00:00.000000Z  INFO entity_sync::node::listening: listening ws_addr=127.0.0.1:40123 grpc_addr=127.0.0.1:40124
/// ```
///
/// (`metrics_addr=…` too with `--metrics-addr`; with `--log-format json` the
/// same fields under `"fields"`.)
pub struct NodeProcess {
    guard: ChildGuard,
    bin: PathBuf,
    args: Vec<String>,
    rust_log: String,
    log: PathBuf,
    pub ws: SocketAddr,
    pub grpc: SocketAddr,
    /// Where `/metrics` is served, when `args` set `--metrics-addr`.
    pub metrics: Option<SocketAddr>,
    ws_path: String,
    _dir: Option<TempDir>,
}

/// The addresses of a node's `listening` log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    pub ws: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

impl Listening {
    /// Parses a `listening` line of the node's log, text or JSON; `None` for
    /// any other line.
    pub fn parse(line: &str) -> Option<Listening> {
        if !line.contains(LISTENING_TARGET) {
            return None;
        }
        Some(Listening {
            ws: log_field(line, "ws_addr")?,
            grpc: log_field(line, "grpc_addr")?,
            metrics: log_field(line, "metrics_addr"),
        })
    }
}

/// The address in field `key` of a log line: `key=ADDR` (text) or
/// `"key":"ADDR"` (JSON).
fn log_field(line: &str, key: &str) -> Option<SocketAddr> {
    let json = format!("\"{key}\":\"");
    if let Some(at) = line.find(&json) {
        let rest = &line[at + json.len()..];
        return rest[..rest.find('"')?].parse().ok();
    }
    let text = format!("{key}=");
    line.match_indices(&text)
        .filter(|(at, _)| line[..*at].ends_with(char::is_whitespace))
        .find_map(|(at, _)| {
            let rest = &line[at + text.len()..];
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
}

/// Replaces the value of `--flag=VALUE` or `--flag VALUE` in `args`.
fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let mut i = 0;
    while i < args.len() {
        if args[i] == flag && i + 1 < args.len() {
            args[i + 1] = value.to_owned();
            i += 1;
        } else if args[i]
            .strip_prefix(flag)
            .is_some_and(|rest| rest.starts_with('='))
        {
            args[i] = format!("{flag}={value}");
        }
        i += 1;
    }
}

impl NodeProcess {
    /// Spawns `bin` on loopback port 0 (both listeners) with `args` appended
    /// and `RUST_LOG=rust_log`; its log goes to `log` (or a temp dir when
    /// `None`). Returns once the node logged the ports it bound (see
    /// [`spawn_on`](Self::spawn_on)); then see [`wait_ready`](Self::wait_ready).
    pub fn spawn(
        bin: &Path,
        args: &[String],
        log: Option<&Path>,
        rust_log: &str,
    ) -> std::io::Result<NodeProcess> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::spawn_on(bin, any, any, args, log, rust_log)
    }

    /// Spawns `bin` on the given addresses (port 0: one the node picks; a
    /// port reported before: a restart on the same one), and reads the
    /// addresses it bound from its `listening` log line. Blocks the calling
    /// thread until then (milliseconds: the node binds before it connects to
    /// anything, so it waits for nothing of the caller's), at most 30 s; an
    /// error with the log's tail if the node exits first.
    pub fn spawn_on(
        bin: &Path,
        ws: SocketAddr,
        grpc: SocketAddr,
        args: &[String],
        log: Option<&Path>,
        rust_log: &str,
    ) -> std::io::Result<NodeProcess> {
        let (dir, log) = match log {
            Some(log) => (None, log.to_owned()),
            None => {
                let dir = TempDir::new("node");
                let log = dir.path().join("node.log");
                (Some(dir), log)
            }
        };
        let ws_path = args
            .iter()
            .find_map(|a| a.strip_prefix("--ws-path="))
            .unwrap_or("/ws/entity-sync/")
            .to_owned();
        let mut args = args.to_vec();
        args.splice(
            0..0,
            [format!("--ws-addr={ws}"), format!("--grpc-addr={grpc}")],
        );
        // Only what this start logs: the file may hold an earlier run's lines.
        let from = std::fs::metadata(&log).map_or(0, |m| m.len());
        let mut guard = Self::launch(bin, &args, &log, rust_log)?;
        let listening = wait_listening(&mut guard, &log, from)?;
        // A restart binds the same addresses again.
        set_flag(&mut args, "--ws-addr", &listening.ws.to_string());
        set_flag(&mut args, "--grpc-addr", &listening.grpc.to_string());
        if let Some(metrics) = listening.metrics {
            set_flag(&mut args, "--metrics-addr", &metrics.to_string());
        }
        Ok(NodeProcess {
            guard,
            bin: bin.to_owned(),
            rust_log: rust_log.to_owned(),
            args,
            log,
            ws: listening.ws,
            grpc: listening.grpc,
            metrics: listening.metrics,
            ws_path,
            _dir: dir,
        })
    }

    fn launch(
        bin: &Path,
        args: &[String],
        log: &Path,
        rust_log: &str,
    ) -> std::io::Result<ChildGuard> {
        // The `listening` line passes whatever else the filter holds back.
        let filter = match rust_log.trim() {
            "" => "info".to_owned(),
            rust_log => format!("{rust_log},{LISTENING_TARGET}=info"),
        };
        let mut cmd = Command::new(bin);
        cmd.args(args).env("RUST_LOG", filter);
        ChildGuard::spawn_tied("entity-sync node", cmd, log)
    }

    /// Polls `/readyz` until it answers 200 (or the process exits, or
    /// `wait` passes).
    pub async fn wait_ready(&mut self, wait: Duration) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        loop {
            self.guard.check_alive()?;
            if let Ok((200, _)) = http_get(self.ws, "/readyz").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("node at {} not ready within {wait:?}", self.ws));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: the node has no chance to close anything.
    pub fn kill(&mut self) {
        self.guard.kill();
    }

    /// Starts the binary again with the same ports (those it reported) and
    /// flags (after [`kill`](Self::kill)).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.guard.kill();
        self.guard = Self::launch(&self.bin, &self.args, &self.log, &self.rust_log)?;
        Ok(())
    }

    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// SIGTERM, then waits (on a blocking thread) up to `wait` for the node
    /// to exit; its exit status, or `None` if it is still running.
    pub async fn terminate(mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        self.guard.signal(libc::SIGTERM);
        tokio::task::spawn_blocking(move || self.guard.wait_exit(wait))
            .await
            .expect("the waiting thread")
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// `http://127.0.0.1:PORT` of the gRPC port.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `ws://127.0.0.1:PORT/path` of the websocket endpoint.
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.ws, self.ws_path)
    }

    /// A sample of `/metrics` (`name` with labels, e.g. `x{reason="change"}`).
    pub async fn metric(&self, name: &str) -> Result<f64, String> {
        let (status, body) = http_get(self.ws, "/metrics").await?;
        if status != 200 {
            return Err(format!("/metrics answered {status}"));
        }
        metric_value(&body, name).ok_or_else(|| format!("no metric {name} in /metrics"))
    }
}

/// Polls `log` (from byte `from` on) until the node's `listening` line
/// appears; an error if the process exits first or [`LISTEN_DEADLINE`] passes.
fn wait_listening(guard: &mut ChildGuard, log: &Path, from: u64) -> std::io::Result<Listening> {
    use std::io::{Read, Seek, SeekFrom};
    let deadline = std::time::Instant::now() + LISTEN_DEADLINE;
    let mut text = String::new();
    loop {
        // Read before checking the process: a node that logged the line and
        // then exited still reported its ports.
        if let Ok(mut file) = std::fs::File::open(log) {
            text.clear();
            file.seek(SeekFrom::Start(from))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            text.push_str(&String::from_utf8_lossy(&bytes));
            // Complete lines only: the last one may be half written.
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            if let Some(listening) = complete.lines().find_map(Listening::parse) {
                return Ok(listening);
            }
        }
        guard.check_alive().map_err(std::io::Error::other)?;
        if std::time::Instant::now() >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the node logged no `listening` line within {LISTEN_DEADLINE:?}; last log lines:\n{}",
                    log_tail(log, 20, &[])
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::{Listening, set_flag};

    /// The node's `listening` line as it logs it (`--log-format text`, then
    /// `json`): the addresses it bound, as fields.
    #[test]
    fn the_listening_line_is_read_in_both_log_formats() {
        let text = "2026-12-07T11:30:00.123456Z  INFO entity_sync::node::listening: listening \
                    ws_addr=127.0.0.1:40123 grpc_addr=127.0.0.1:40124";
        let expected = Listening {
            ws: "127.0.0.1:40123".parse().unwrap(),
            grpc: "127.0.0.1:40124".parse().unwrap(),
            metrics: None,
        };
        assert_eq!(Listening::parse(text), Some(expected));
        let json = r#"{"timestamp":"2026-12-07T11:30:00.123456Z","level":"INFO","fields":{"message":"listening","ws_addr":"127.0.0.1:40123","grpc_addr":"127.0.0.1:40124","metrics_addr":"127.0.0.1:40125"},"target":"entity_sync::node::listening"}"#;
        let with_metrics = Listening {
            metrics: Some("127.0.0.1:40125".parse().unwrap()),
            ..expected
        };
        assert_eq!(Listening::parse(json), Some(with_metrics));
        let text = format!("{} metrics_addr=127.0.0.1:40125", text);
        assert_eq!(Listening::parse(&text), Some(with_metrics));
        // Other lines, and addresses of other fields, are not it.
        assert_eq!(
            Listening::parse(
                "INFO entity_sync::node: node started ws_addr=127.0.0.1:1 grpc_addr=127.0.0.1:2"
            ),
            None
        );
    }

    #[test]
    fn flags_are_set_in_either_spelling() {
        let mut args: Vec<String> = [
            "--ws-addr=127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--ws-addrx=1",
        ]
        .map(String::from)
        .to_vec();
        set_flag(&mut args, "--ws-addr", "127.0.0.1:1");
        set_flag(&mut args, "--metrics-addr", "127.0.0.1:2");
        assert_eq!(
            args,
            [
                "--ws-addr=127.0.0.1:1",
                "--metrics-addr",
                "127.0.0.1:2",
                "--ws-addrx=1"
            ]
        );
    }
}
