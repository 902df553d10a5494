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
    process::{ChildGuard, TempDir, free_ports},
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

/// The `entity-sync` binary as a child process, on loopback ports of its own.
pub struct NodeProcess {
    guard: ChildGuard,
    bin: PathBuf,
    args: Vec<String>,
    rust_log: String,
    log: PathBuf,
    pub ws: SocketAddr,
    pub grpc: SocketAddr,
    ws_path: String,
    _dir: Option<TempDir>,
}

impl NodeProcess {
    /// Spawns `bin` on two fresh loopback ports with `args` appended and
    /// `RUST_LOG=rust_log`; its log goes to `log` (or a temp dir when `None`).
    /// Returns at once: see [`wait_ready`](Self::wait_ready).
    pub fn spawn(
        bin: &Path,
        args: &[String],
        log: Option<&Path>,
        rust_log: &str,
    ) -> std::io::Result<NodeProcess> {
        let ports = free_ports(2);
        let ws = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let grpc = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        Self::spawn_on(bin, ws, grpc, args, log, rust_log)
    }

    /// Spawns `bin` on the given addresses.
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
        let guard = Self::launch(bin, &args, &log, rust_log)?;
        Ok(NodeProcess {
            guard,
            bin: bin.to_owned(),
            rust_log: rust_log.to_owned(),
            args,
            log,
            ws,
            grpc,
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
        let mut cmd = Command::new(bin);
        cmd.args(args).env("RUST_LOG", rust_log);
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

    /// Starts the binary again with the same ports and flags (after [`kill`](Self::kill)).
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
