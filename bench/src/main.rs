//! `entity-sync-bench`: starts real nodes (and a nats-server for the cluster scenario) as child
//! processes on loopback, drives them with real gRPC and websocket clients, and prints one JSON
//! line per measurement plus a readable table.
//!
//! ```text
//! cargo build --release -p entity-sync -p entity-sync-bench
//! target/release/entity-sync-bench fanout                 # 1,000 clients on one key, 200 updates, max rate
//! target/release/entity-sync-bench fanout --rate 500      # paced: 500 updates/s = 500k deliveries/s
//! target/release/entity-sync-bench manykeys [--rate N]    # 2,000 clients x 5 of 1,000 keys, 5,000 updates
//! target/release/entity-sync-bench idle --conns 10000,50000,100000
//! target/release/entity-sync-bench notify
//! target/release/entity-sync-bench notify --nats-servers 3 --replicas 3 --batch 100,1000
//! target/release/entity-sync-bench cluster                # fanout over 2 nodes on NATS JetStream
//! target/release/entity-sync-bench cluster --nodes 3 --rate 50   # + resolves per change, unheld keys
//! target/release/entity-sync-bench restart                # rolling restart of 3 nodes, with and without resume
//! target/release/entity-sync-bench restart --tokens       # ... and each mode again with subscribe tokens
//! target/release/entity-sync-bench tokens                 # token verifications per CPU second (HS256, ES256, EdDSA)
//! target/release/entity-sync-bench fanout --smoke         # seconds; exit code 1 if any client lost
//! target/release/entity-sync-bench ceiling                # the bare server: the machine's paced ceiling
//! target/release/entity-sync-bench fanout --rate 100 --ceiling --runs 5   # fraction of the ceiling, medians
//! ```
//!
//! # Layout
//! - `main.rs`: command line, the scenarios, the reports.
//! - `load.rs`: the resolver (on `entity-sync-backend`, in a process of its own), the notifier
//!   and the websocket clients.
//! - `restart.rs`: the rolling restart (clients that reconnect and resubscribe), with
//!   subscribe tokens or without.
//! - `tokens.rs`: the node's cost of verifying subscribe tokens.
//! - `slots.rs`: the `u64` atomics the bench shares with its resolver process (a mapped file).
//! - `stats.rs`: distinct seeded draws, the push-frame scanner, percentiles (on the
//!   testkit's `percentile`), medians.
//!
//! Node and nats-server processes, readiness, `/metrics`, `/proc` (CPU and
//! RSS) and RLIMIT_NOFILE come from `entity-sync-testkit`.
//! - `ceiling.rs`: the bare websocket server that measures the machine's ceiling.
//!
//! Every run is bounded: a global `--timeout` caps each wait (a convergence
//! wait that ends at the deadline reports the clients still behind as `lost`),
//! and a watchdog thread exits the process shortly after it in any case.
//! The exit code is 1 when a run lost clients or failed.

mod ceiling;
mod load;
mod restart;
mod slots;
mod stats;
mod tokens;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use entity_sync_backend::{FetchMode, Notifier};
use entity_sync_testkit::{
    NodeProcess,
    nats::{NatsCluster, NatsServer},
    procstat::{cpu_seconds, cpu_split, raise_nofile, rss_kib, threads_cpu_seconds},
};
use serde::Serialize;
use tokio::{
    sync::Semaphore,
    task::JoinSet,
    time::{Instant, timeout_at},
};
use tokio_util::sync::CancellationToken;

use crate::{
    load::{ClientOutcome, ClientSpec, Shared},
    stats::{Percentiles, distinct, median, percentiles},
};

const RESOLVES_CHANGE: &str = "entity_sync_resolve_requests_total{reason=\"change\"}";
const CHANGES_CONSUMED: &str = "entity_sync_changes_consumed_total";
/// Clients per source address: well inside the 28k ephemeral ports of each.
const CLIENTS_PER_SOURCE: usize = 20_000;
/// How long one client may take to connect and subscribe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "entity-sync-bench",
    about = "Benchmarks entity-sync nodes over real sockets on loopback."
)]
struct Cli {
    /// What to measure (default with --smoke: fanout).
    #[arg(value_enum)]
    scenario: Option<Scenario>,

    /// A tiny run (seconds) for CI: e.g. 20 clients x 20 updates; exit code 1 if lost > 0.
    #[arg(long)]
    smoke: bool,
    /// Repeat the measurement this many times and print the medians (fanout, manykeys, cluster, ceiling).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Before each run, measure the machine's ceiling with the same clients and keys (a bare
    /// websocket server in the bench) and report the run's deliveries/s as a fraction of it.
    #[arg(long)]
    ceiling: bool,
    /// Deliveries per second the ceiling run offers (paced; one write per frame).
    #[arg(long, default_value_t = 1_000_000.0)]
    ceiling_offered: f64,
    /// Seconds of updates the ceiling run sends.
    #[arg(long, default_value_t = 1.0)]
    ceiling_secs: f64,

    /// Websocket clients (fanout 1,000; manykeys 2,000; cluster 1,000).
    #[arg(long)]
    clients: Option<usize>,
    /// Distinct keys (fanout and cluster 1; manykeys and notify 1,000; idle 1,000).
    #[arg(long)]
    keys: Option<u32>,
    /// Keys each client subscribes to (manykeys 5, else 1; idle: distinct keys per connection).
    #[arg(long)]
    keys_per_client: Option<usize>,
    /// Updates (notifies) sent (fanout and cluster 200; manykeys 5,000).
    #[arg(long)]
    updates: Option<usize>,
    /// Pace updates at this many per second (default: max rate). Latency is reported for paced runs.
    #[arg(long)]
    rate: Option<f64>,
    /// Fetch mode the resolver registers.
    #[arg(long, value_enum, default_value_t = FetchModeArg::Shared)]
    fetch_mode: FetchModeArg,
    /// Distinct client secrets with --fetch-mode per-subscriber (default: one per client).
    #[arg(long)]
    secrets: Option<usize>,
    /// Concurrent Notify callers at max rate (fewer callers measure the notifier, not the node).
    #[arg(long, default_value_t = 16)]
    notify_concurrency: usize,
    /// Keys per Notify call at max rate (paced runs send one key per call).
    #[arg(long, default_value_t = 1)]
    notify_batch: usize,

    /// idle: connection counts to reach, cumulatively.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
    conns: Vec<usize>,

    /// notify: concurrent callers of single-key calls, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// notify: single-key calls per measurement.
    #[arg(long, default_value_t = 20_000)]
    calls: u64,
    /// notify: batch sizes, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    batch: Vec<usize>,
    /// notify: concurrent callers of batch calls.
    #[arg(long, default_value_t = 4)]
    batch_concurrency: usize,
    /// notify: keys sent per batch measurement.
    #[arg(long, default_value_t = 200_000)]
    batch_keys: u64,
    /// notify: websocket clients subscribed (client i to key i % keys) while the calls run,
    /// so every notify makes the node push; 0 measures an idle node.
    #[arg(long, default_value_t = 1_000)]
    subscribers: usize,

    /// Nodes to run (cluster 2, restart 3, else 1). More than one needs NATS.
    #[arg(long)]
    nodes: Option<usize>,
    /// Run the node(s) on a spawned nats-server (implied by cluster).
    #[arg(long)]
    nats: bool,
    /// Start nats-server with `sync_interval: always` (fsync every write).
    #[arg(long)]
    nats_sync_always: bool,
    /// nats-servers to start (implies --nats): more than one form a JetStream cluster on
    /// loopback, which always runs with `sync_interval: always`.
    #[arg(long, default_value_t = 1)]
    nats_servers: usize,
    /// Replicas of the nodes' stream (`--nats-replicas`), at most --nats-servers.
    #[arg(long, default_value_t = 1)]
    replicas: usize,

    /// cluster: changes notified, after the run, for keys no node holds (0: none).
    #[arg(long)]
    unheld_changes: Option<usize>,

    /// restart: only the mode whose resubscribes carry no `"version"`.
    #[arg(long, conflicts_with = "resume_only")]
    no_resume: bool,
    /// restart: only the mode whose resubscribes carry `"version": <held>`.
    #[arg(long)]
    resume_only: bool,
    /// restart: also run each mode with subscribe tokens (an HS256 JWKS with a random
    /// secret given to every node with --subscribe-token-jwks; every subscribe carries a
    /// token for the client's keys), next to the secret modes: resolves per reconnecting
    /// subscription for warm and cold keys, token verifications.
    #[arg(long)]
    tokens: bool,

    /// tokens: connections per phase, each sending --token-subs subscribes at once.
    #[arg(long)]
    token_conns: Option<usize>,
    /// tokens: subscribes per connection, each with a token of its own (distinct keys; at
    /// most 512, the node's burst of verifications per connection).
    #[arg(long)]
    token_subs: Option<usize>,
    /// tokens: signing algorithms to measure, one node serving all.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "hs256,es256,eddsa"
    )]
    token_algs: Vec<tokens::Alg>,

    /// Source addresses 127.0.0.1..N for the websocket clients (default: one per 20,000 clients).
    #[arg(long)]
    src_addrs: Option<u8>,
    /// Clients connecting and subscribing at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Bound of every wait of the run (e.g. 60s, 3m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Generator runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// The node binary (default: `entity-sync` next to this executable).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// A flag passed to every node, e.g. --node-arg=--resolve-batch-size=128 (repeatable).
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// RUST_LOG of the nodes.
    #[arg(long, default_value = "warn")]
    node_log: String,
    /// Keep the nodes' logs (in a temp dir) even after a clean run.
    #[arg(long)]
    keep_logs: bool,
    /// Seed of the key choices.
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,

    /// resolver-process (started by the bench itself): the node's gRPC URL.
    #[arg(long, hide = true)]
    resolver_grpc: Option<String>,
    /// resolver-process: the file of slots shared with the bench.
    #[arg(long, hide = true)]
    resolver_slots: Option<PathBuf>,
    /// resolver-process: bytes of padding in each row.
    #[arg(long, hide = true, default_value_t = 0)]
    resolver_pad: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Fanout,
    Manykeys,
    Idle,
    Notify,
    Cluster,
    /// A rolling restart of 3 nodes while clients hold keys (with and without resume).
    Restart,
    /// Subscribe token verifications per CPU second of a node (per core).
    Tokens,
    Ceiling,
    /// The bench's resolver, in a process of its own (the bench starts it).
    #[value(hide = true)]
    ResolverProcess,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FetchModeArg {
    Shared,
    PerSubscriber,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(scenario) = cli.scenario.or(cli.smoke.then_some(Scenario::Fanout)) else {
        eprintln!(
            "error: name a scenario (fanout, manykeys, idle, notify, cluster, restart, tokens, ceiling) or pass --smoke"
        );
        return ExitCode::from(2);
    };
    if scenario == Scenario::ResolverProcess {
        return resolver_process(&cli);
    }
    // Before any child exists, so the nodes inherit it.
    let nofile = raise_nofile();
    // The last line of defence of "stops by itself": children die with us (PDEATHSIG).
    // Each run (and its ceiling run) has its own --timeout.
    let runs = if scenario == Scenario::Restart {
        restart::modes(&cli).len() as u32
    } else {
        cli.runs.max(1) as u32 * if cli.ceiling { 2 } else { 1 }
    };
    let hard_stop = cli.timeout * runs + Duration::from_secs(30);
    std::thread::spawn(move || {
        std::thread::sleep(hard_stop);
        eprintln!("error: watchdog: the run passed --timeout by 30 s; exiting");
        std::process::exit(3);
    });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = cli.threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // block_on runs on the main thread: children are spawned from it (see ChildGuard::spawn).
    let result = runtime.block_on(run(cli, scenario, nofile));
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The bench's resolver process: one thread, as the resolver had inside the
/// bench before; it ends on SIGTERM (after draining) or with its parent.
fn resolver_process(cli: &Cli) -> ExitCode {
    let (Some(grpc_url), Some(slots), Some(keys)) = (
        cli.resolver_grpc.clone(),
        cli.resolver_slots.clone(),
        cli.keys,
    ) else {
        eprintln!("error: resolver-process needs --resolver-grpc, --resolver-slots and --keys");
        return ExitCode::from(2);
    };
    let args = load::ResolverArgs {
        grpc_url,
        slots,
        keys: keys as usize,
        pad: cli.resolver_pad,
        fetch_mode: match cli.fetch_mode {
            FetchModeArg::Shared => FetchMode::Shared,
            FetchModeArg::PerSubscriber => FetchMode::PerSubscriber,
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(load::resolver_process(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenario; `Ok(false)` when it completed but lost clients or had errors.
async fn run(cli: Cli, scenario: Scenario, nofile: u64) -> anyhow::Result<bool> {
    let log_dir = std::env::temp_dir().join(format!(
        "entity-sync-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&log_dir)?;
    let deadline = Instant::now() + cli.timeout;
    let result = match scenario {
        Scenario::Fanout | Scenario::Manykeys | Scenario::Cluster | Scenario::Ceiling => {
            push_runs(&cli, scenario, nofile, &log_dir).await
        }
        Scenario::Idle => idle_scenario(&cli, nofile, &log_dir, deadline).await,
        Scenario::Notify => notify_scenario(&cli, &log_dir, deadline).await,
        Scenario::Restart => restart::restart_scenario(&cli, &log_dir).await,
        Scenario::Tokens => tokens::tokens_scenario(&cli, &log_dir).await,
        Scenario::ResolverProcess => unreachable!("handled in main"),
    };
    // Children are gone by now (their guards dropped inside the scenario).
    if matches!(result, Ok(true)) && !cli.keep_logs {
        let _ = std::fs::remove_dir_all(&log_dir);
    } else {
        eprintln!("node logs kept in {}", log_dir.display());
    }
    result
}

// ---------------------------------------------------------------------------
// Environment: nats-server and nodes
// ---------------------------------------------------------------------------

/// The processes of a run. Fields drop in order: nodes before their nats-server.
struct Env {
    nodes: Vec<NodeProcess>,
    _nats: Option<NatsServer>,
    _nats_cluster: Option<NatsCluster>,
}

/// One node (with `cli`'s flags; on JetStream when `nats`) and the bench's
/// resolver on it, serving `keys` SHARED keys that no update bumps: what the
/// idle, tokens and notify scenarios hold. The token cancels the resolver.
async fn one_node_with_resolver(
    cli: &Cli,
    nats: bool,
    keys: u32,
    log_dir: &Path,
    deadline: Instant,
) -> anyhow::Result<(
    Env,
    Arc<Shared>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
)> {
    let env = Env::start(cli, 1, nats, log_dir, deadline).await?;
    let shared = Arc::new(Shared::new(keys as usize, &[], false)?);
    let cancel = CancellationToken::new();
    let resolver = load::start_resolver(
        &env.nodes[0].grpc_url(),
        shared.clone(),
        FetchMode::Shared,
        cancel.clone(),
    )
    .await?;
    Ok((env, shared, cancel, resolver))
}

impl Env {
    async fn start(
        cli: &Cli,
        nodes: usize,
        nats: bool,
        log_dir: &Path,
        deadline: Instant,
    ) -> anyhow::Result<Env> {
        let bin = match &cli.node_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("executable has no directory")?
                .join("entity-sync"),
        };
        if !bin.exists() {
            bail!(
                "node binary {} not found: build it (cargo build --release -p entity-sync) or pass --node-bin",
                bin.display()
            );
        }
        if nodes > 1 && !nats {
            bail!("{nodes} nodes need a bus: pass --nats");
        }
        if cli.replicas > cli.nats_servers.max(1) {
            bail!(
                "--replicas {} needs as many nats-servers: pass --nats-servers",
                cli.replicas
            );
        }
        let nats = nats || cli.nats_servers > 1;
        let nats_cluster = if nats && cli.nats_servers > 1 {
            Some(NatsCluster::start(cli.nats_servers).await)
        } else {
            None
        };
        let nats_server = if !nats || nats_cluster.is_some() {
            None
        } else if cli.nats_sync_always {
            Some(NatsServer::start().await)
        } else {
            Some(NatsServer::start_default_sync().await)
        };
        let mut started = Vec::with_capacity(nodes);
        // One at a time: the first creates the JetStream stream.
        for i in 1..=nodes {
            // The bench measures the node, not its connection limits (an
            // idle run holds 10,000+ sockets): --node-arg may set them.
            let mut args = vec![format!("--node-id=bench-{i}"), "--max-connections=0".into()];
            if let Some(nats) = &nats_server {
                args.push(format!("--nats-url={}", nats.url()));
            }
            if let Some(cluster) = &nats_cluster {
                args.push(format!("--nats-url={}", cluster.urls()));
            }
            if nats {
                args.push(format!("--nats-replicas={}", cli.replicas));
            }
            args.extend(cli.node_args.iter().cloned());
            let log = log_dir.join(format!("node-{i}.log"));
            let mut node = NodeProcess::spawn(&bin, &args, Some(&log), &cli.node_log)?;
            let wait = deadline.saturating_duration_since(Instant::now());
            node.wait_ready(wait).await.map_err(anyhow::Error::msg)?;
            started.push(node);
        }
        Ok(Env {
            nodes: started,
            _nats: nats_server,
            _nats_cluster: nats_cluster,
        })
    }

    /// A notifier of node `i`, on a connection of its own.
    async fn notifier(&self, i: usize) -> anyhow::Result<Notifier> {
        load::notifier(&self.nodes[i].grpc_url()).await
    }

    fn cpu(&self) -> Vec<f64> {
        self.nodes
            .iter()
            .map(|n| cpu_seconds(Some(n.pid())))
            .collect()
    }

    fn cpu_sys(&self) -> Vec<f64> {
        self.nodes
            .iter()
            .map(|n| cpu_split(Some(n.pid())).1)
            .collect()
    }

    fn rss(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| rss_kib(n.pid()).unwrap_or(0))
            .collect()
    }

    async fn metric(&self, name: &str) -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            out.push(node.metric(name).await.map_err(anyhow::Error::msg)? as u64);
        }
        Ok(out)
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        self.nodes
            .iter_mut()
            .try_for_each(|n| n.guard().check_alive())
            .map_err(anyhow::Error::msg)
    }
}

/// Source address of client `i` among `n` (127.0.0.1..=127.0.0.n).
fn source_addr(i: usize, n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 1 + (i % n.max(1) as usize) as u8)
}

fn source_count(cli: &Cli, clients: usize) -> u8 {
    cli.src_addrs
        .unwrap_or_else(|| clients.div_ceil(CLIENTS_PER_SOURCE).clamp(1, 250) as u8)
}

/// Waits until `want` clients are ready or failed, the deadline passes, or a node dies.
async fn wait_clients(
    env: &mut Env,
    shared: &Shared,
    want: usize,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        let done = shared.ready.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire);
        if done >= want || Instant::now() >= deadline {
            return Ok(());
        }
        env.check_alive()?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn sub(after: &[f64], before: &[f64]) -> f64 {
    after.iter().zip(before).map(|(a, b)| a - b).sum()
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

// ---------------------------------------------------------------------------
// fanout, manykeys, cluster
// ---------------------------------------------------------------------------

/// One push run: what the issue asks each run to report.
#[derive(Serialize)]
struct PushReport {
    scenario: &'static str,
    mode: &'static str,
    fetch_mode: &'static str,
    nodes: usize,
    bus: &'static str,
    clients: usize,
    keys: u32,
    keys_per_client: usize,
    updates: u64,
    rate: Option<f64>,
    deliveries: u64,
    /// Deliveries if no change was coalesced: sum over clients and keys of the key's updates.
    deliveries_without_coalescing: u64,
    deliveries_per_s: f64,
    /// States a client never saw: deliveries_without_coalescing − deliveries (0 when none skipped).
    skipped: u64,
    /// deliveries_per_s / the ceiling run's, with --ceiling.
    ceiling_fraction: Option<f64>,
    /// Node CPU (every node's, from the first notify to the last delivery)
    /// per delivery, in µs.
    node_cpu_us_per_delivery: Option<f64>,
    /// The bare server's CPU per delivery in the ceiling run before this
    /// one, in µs (with --ceiling).
    ceiling_cpu_us_per_delivery: Option<f64>,
    /// First notify → every client holds the final version of each of its keys.
    convergence_ms: Option<f64>,
    /// Time to send every notify.
    notify_ms: f64,
    latency_us: Option<Percentiles>,
    /// Change resolves, from the nodes' /metrics (sum over nodes).
    resolves: u64,
    resolves_per_change: f64,
    resolves_by_node: Vec<u64>,
    /// Change resolve requests and ids the bench resolver itself answered. In a
    /// cluster the node holding the resolver also counts, in its /metrics, the
    /// requests it forwards for the other nodes, so `resolves` counts those twice.
    resolver_change_requests: u64,
    resolver_change_ids: u64,
    /// resolver_change_requests per update: the backend's view (expect 1 per node per change).
    backend_resolves_per_change: f64,
    node_cpu_s: f64,
    /// The system (kernel) part of node_cpu_s: mostly socket writes.
    node_cpu_sys_s: f64,
    generator_cpu_s: f64,
    generator_cpu_sys_s: f64,
    node_rss_kb: u64,
    lost: usize,
    failed_setup: usize,
    client_errors: usize,
    notify_errors: u64,
    first_error: Option<String>,
    nofile_limit: u64,
    /// cluster: the phase of changes to keys no node holds (its own JSON line).
    #[serde(skip)]
    unheld: Option<UnheldReport>,
}

/// cluster: changes notified for keys no node holds, after the run.
#[derive(Serialize)]
struct UnheldReport {
    scenario: &'static str,
    nodes: usize,
    /// Changes notified (one key per call), and calls that failed.
    changes: u64,
    notify_errors: u64,
    /// Whether every node counted them consumed from the bus (`entity_sync_changes_consumed_total`)
    /// before the resolves were read.
    consumed_by_every_node: bool,
    consumed_by_node: Vec<Option<u64>>,
    /// Change resolve requests and ids the bench resolver itself answered in the phase.
    resolver_change_requests: u64,
    resolver_change_ids: u64,
    /// resolver_change_requests per change: expected 0.
    backend_resolves_per_change: f64,
    /// Change resolves in the nodes' /metrics (sum over nodes).
    node_resolves: u64,
}

/// The shape of a push run: name, clients, keys, keys per client, updates.
fn push_shape(cli: &Cli, scenario: Scenario) -> (&'static str, usize, u32, usize, usize) {
    let (name, def_clients, def_keys, def_kpc, def_updates) = match (scenario, cli.smoke) {
        (Scenario::Manykeys, false) => ("manykeys", 2_000, 1_000, 5, 5_000),
        (Scenario::Manykeys, true) => ("manykeys", 20, 50, 5, 100),
        (Scenario::Cluster, false) => ("cluster", 1_000, 1, 1, 200),
        (Scenario::Cluster, true) => ("cluster", 20, 1, 1, 20),
        (_, false) => ("fanout", 1_000, 1, 1, 200),
        (_, true) => ("fanout", 20, 1, 1, 20),
    };
    let clients = cli.clients.unwrap_or(def_clients);
    let keys = cli.keys.unwrap_or(def_keys).max(1);
    let kpc = cli
        .keys_per_client
        .unwrap_or(def_kpc)
        .clamp(1, keys as usize);
    let updates = cli.updates.unwrap_or(def_updates);
    (name, clients, keys, kpc, updates)
}

/// Every client's keys, from the seed: the same for a run and its ceiling run.
fn plan_client_keys(
    rng: &mut fastrand::Rng,
    clients: usize,
    kpc: usize,
    keys: u32,
) -> Vec<Vec<u32>> {
    (0..clients).map(|_| distinct(rng, kpc, keys)).collect()
}

/// `--runs` runs (each after its ceiling run with `--ceiling`), then the medians.
async fn push_runs(
    cli: &Cli,
    scenario: Scenario,
    nofile: u64,
    log_dir: &Path,
) -> anyhow::Result<bool> {
    let mut ok = true;
    let mut ceilings = Vec::new();
    let mut reports = Vec::new();
    for run in 1..=cli.runs.max(1) {
        let ceiling = if cli.ceiling || scenario == Scenario::Ceiling {
            let deadline = Instant::now() + cli.timeout;
            let c = ceiling_run(cli, scenario, deadline).await?;
            ok &= c.lost == 0;
            let cpu_per_delivery =
                (c.deliveries > 0).then(|| round(c.server_cpu_s * 1e6 / c.deliveries as f64, 2));
            Some((c.deliveries_per_s, cpu_per_delivery))
        } else {
            None
        };
        if scenario != Scenario::Ceiling {
            let deadline = Instant::now() + cli.timeout;
            let mut r = push_scenario(cli, scenario, nofile, log_dir, deadline).await?;
            ok &= r.lost == 0 && r.notify_errors == 0 && r.failed_setup == 0;
            r.ceiling_fraction = ceiling
                .map(|(c, _)| c)
                .filter(|&c| c > 0.0)
                .map(|c| round(r.deliveries_per_s / c, 3));
            r.ceiling_cpu_us_per_delivery = ceiling.and_then(|(_, cpu)| cpu);
            println!("{}", serde_json::to_string(&r)?);
            print_push_table(&r);
            if let Some(u) = &r.unheld {
                ok &= u.notify_errors == 0;
                println!("{}", serde_json::to_string(u)?);
                print_kv(&[(
                    "unheld keys",
                    format!(
                        "{} changes to keys no node holds: backend saw {} change requests ({} per change), nodes {}; consumed by every node: {}",
                        u.changes,
                        u.resolver_change_requests,
                        u.backend_resolves_per_change,
                        u.node_resolves,
                        u.consumed_by_every_node
                    ),
                )]);
            }
            if let Some((c, _)) = ceiling {
                println!(
                    "  run {run}: {:.0} deliveries/s = {} of the ceiling's {c:.0}/s; CPU per delivery: node {} us, bare server {} us",
                    r.deliveries_per_s,
                    r.ceiling_fraction
                        .map_or("-".into(), |f| format!("{:.1}%", f * 100.0)),
                    r.node_cpu_us_per_delivery
                        .map_or("-".into(), |v| v.to_string()),
                    r.ceiling_cpu_us_per_delivery
                        .map_or("-".into(), |v| v.to_string()),
                );
            }
            reports.push(r);
        }
        ceilings.extend(ceiling.map(|(c, _)| c));
    }
    if cli.runs > 1 {
        print_medians(scenario, &ceilings, &reports)?;
    }
    Ok(ok)
}

/// Medians over the runs, one JSON line and a table.
fn print_medians(
    scenario: Scenario,
    ceilings: &[f64],
    reports: &[PushReport],
) -> anyhow::Result<()> {
    let of = |f: &dyn Fn(&PushReport) -> Option<f64>| -> Option<f64> {
        median(reports.iter().filter_map(f).collect()).map(|m| round(m, 3))
    };
    let summary = serde_json::json!({
        "scenario": "medians",
        "of": format!("{scenario:?}").to_lowercase(),
        "runs": ceilings.len().max(reports.len()),
        "ceiling_deliveries_per_s": median(ceilings.to_vec()),
        "deliveries_per_s": of(&|r| Some(r.deliveries_per_s)),
        "ceiling_fraction": of(&|r| r.ceiling_fraction),
        "skipped": of(&|r| Some(r.skipped as f64)),
        "convergence_ms": of(&|r| r.convergence_ms),
        "latency_p50_us": of(&|r| r.latency_us.map(|p| p.p50 as f64)),
        "latency_p99_us": of(&|r| r.latency_us.map(|p| p.p99 as f64)),
        "lost": of(&|r| Some(r.lost as f64)),
        "node_cpu_s": of(&|r| Some(r.node_cpu_s)),
        "node_cpu_us_per_delivery": of(&|r| r.node_cpu_us_per_delivery),
        "ceiling_cpu_us_per_delivery": of(&|r| r.ceiling_cpu_us_per_delivery),
    });
    println!("{summary}");
    println!("  medians of {} runs:", ceilings.len().max(reports.len()));
    if let Some(obj) = summary.as_object() {
        let rows: Vec<(&str, String)> = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "scenario" | "of" | "runs"))
            .map(|(k, v)| (k.as_str(), v.to_string()))
            .collect();
        print_kv(&rows);
    }
    Ok(())
}

async fn push_scenario(
    cli: &Cli,
    scenario: Scenario,
    nofile: u64,
    log_dir: &Path,
    deadline: Instant,
) -> anyhow::Result<PushReport> {
    let (name, clients, keys, kpc, updates) = push_shape(cli, scenario);
    let cluster = scenario == Scenario::Cluster;
    let nodes = cli.nodes.unwrap_or(if cluster { 2 } else { 1 }).max(1);
    let nats = cli.nats || cluster || nodes > 1;

    let mut env = Env::start(cli, nodes, nats, log_dir, deadline).await?;

    // The plan: every client's keys and the update sequence, from one seed.
    let mut rng = fastrand::Rng::with_seed(cli.seed);
    let client_keys = plan_client_keys(&mut rng, clients, kpc, keys);
    let seq: Vec<u32> = (0..updates).map(|_| rng.u32(..keys)).collect();
    let shared = Arc::new(Shared::new(keys as usize, &seq, cli.rate.is_some())?);
    let cancel = CancellationToken::new();
    let fetch_mode = match cli.fetch_mode {
        FetchModeArg::Shared => FetchMode::Shared,
        FetchModeArg::PerSubscriber => FetchMode::PerSubscriber,
    };
    let resolver = load::start_resolver(
        &env.nodes[0].grpc_url(),
        shared.clone(),
        fetch_mode,
        cancel.clone(),
    )
    .await?;

    for node in &env.nodes[1..] {
        let attempts = load::probe_subscribe(Arc::from(node.ws_url()), deadline).await?;
        if attempts > 1 {
            eprintln!(
                "{name}: a subscribe on {} succeeded after {attempts} attempts (no_resolver before)",
                node.ws
            );
        }
    }

    // Clients, spread over the nodes and over source addresses.
    let setup = Arc::new(Semaphore::new(cli.connect_concurrency.max(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let sources = source_count(cli, clients);
    let urls: Vec<Arc<str>> = env.nodes.iter().map(|n| Arc::from(n.ws_url())).collect();
    let mut tasks: JoinSet<ClientOutcome> = JoinSet::new();
    let setup_started = Instant::now();
    for (i, keys_of_client) in client_keys.iter().enumerate() {
        let node = i % env.nodes.len();
        let secret = (fetch_mode == FetchMode::PerSubscriber)
            .then(|| format!("s{}", i % cli.secrets.unwrap_or(clients).max(1)));
        let spec = ClientSpec {
            url: urls[node].clone(),
            src: source_addr(i, sources),
            keys: keys_of_client.clone(),
            secret,
            idle: false,
        };
        tasks.spawn(load::run_client(
            spec,
            shared.clone(),
            setup.clone(),
            stop.clone(),
            SETUP_TIMEOUT,
            cancel.clone(),
        ));
    }
    wait_clients(&mut env, &shared, clients, deadline).await?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    let failed_setup = clients - shared.ready.load(Ordering::Acquire);
    eprintln!(
        "{name}: {} of {clients} clients subscribed in {setup_s:.2} s; sending {updates} updates",
        clients - failed_setup
    );

    let resolves_before = env.metric(RESOLVES_CHANGE).await?;
    let node_cpu_before = env.cpu();
    let node_sys_before = env.cpu_sys();
    let gen_before = cpu_split(None);

    // Notifies go to the last node (node 2 in the cluster: the resolver is on node 1).
    let notifier = env.notifier(env.nodes.len() - 1).await?;
    let notifiers: Vec<_> = (0..cli.notify_concurrency.max(1))
        .map(|_| notifier.clone())
        .collect();
    let drive = load::drive_updates(
        shared.clone(),
        notifiers,
        Arc::new(seq),
        cli.rate,
        cli.notify_concurrency,
        cli.notify_batch.max(1),
        deadline,
    )
    .await;
    if shared.pending() > 0 {
        let _ = timeout_at(deadline, shared.converged.notified()).await;
    }

    let node_cpu = sub(&env.cpu(), &node_cpu_before);
    let node_sys = sub(&env.cpu_sys(), &node_sys_before);
    let gen_after = cpu_split(None);
    let gen_cpu = gen_after.0 + gen_after.1 - gen_before.0 - gen_before.1;
    let gen_sys = gen_after.1 - gen_before.1;
    let rss: u64 = env.rss().iter().sum();
    let resolves_after = env.metric(RESOLVES_CHANGE).await?;
    // Read before the unheld phase adds its own (expected none).
    let resolver_change_requests = shared.resolver_change_requests();
    let resolver_change_ids = shared.resolver_change_ids();
    let unheld = if cluster {
        let changes = cli
            .unheld_changes
            .unwrap_or(if cli.smoke { 10 } else { 200 });
        Some(unheld_phase(cli, &env, &shared, &notifier, changes, deadline).await?)
    } else {
        None
    };
    cancel.cancel();
    let mut outcomes = Vec::with_capacity(clients);
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done?);
    }
    let _ = resolver.await;
    env.check_alive()?;

    let resolves_by_node: Vec<u64> = resolves_after
        .iter()
        .zip(&resolves_before)
        .map(|(a, b)| a - b)
        .collect();
    let resolves: u64 = resolves_by_node.iter().sum();
    let (deliveries, span_s, mut latencies) = load::delivery_totals(&mut outcomes, drive.first_ns);
    let lost = outcomes
        .iter()
        .filter(|o| !o.subscribed || !o.reached_all)
        .count();
    let client_errors = outcomes.iter().filter(|o| o.error.is_some()).count();
    let first_error = drive
        .first_error
        .clone()
        .or_else(|| shared.first_error.lock().expect("lock").clone())
        .or_else(|| outcomes.iter().find_map(|o| o.error.clone()));
    let deliveries_without_coalescing: u64 = client_keys
        .iter()
        .flatten()
        .map(|&k| shared.final_of(k as usize))
        .sum();

    let report = PushReport {
        scenario: name,
        mode: if cli.rate.is_some() { "paced" } else { "max" },
        fetch_mode: match fetch_mode {
            FetchMode::PerSubscriber => "per-subscriber",
            _ => "shared",
        },
        nodes: env.nodes.len(),
        bus: if nats { "jetstream" } else { "in-process" },
        clients,
        keys,
        keys_per_client: kpc,
        updates: drive.sent,
        rate: cli.rate,
        deliveries,
        deliveries_without_coalescing,
        deliveries_per_s: if span_s > 0.0 {
            (deliveries as f64 / span_s).round()
        } else {
            0.0
        },
        skipped: deliveries_without_coalescing.saturating_sub(deliveries),
        ceiling_fraction: None,
        node_cpu_us_per_delivery: (deliveries > 0)
            .then(|| round(node_cpu * 1e6 / deliveries as f64, 2)),
        ceiling_cpu_us_per_delivery: None,
        convergence_ms: shared
            .converged_ns()
            .map(|ns| round(ns.saturating_sub(drive.first_ns) as f64 / 1e6, 2)),
        notify_ms: round(drive.last_ns.saturating_sub(drive.first_ns) as f64 / 1e6, 2),
        latency_us: if cli.rate.is_some() {
            percentiles(&mut latencies)
        } else {
            None
        },
        resolves,
        resolves_per_change: if drive.sent > 0 {
            round(resolves as f64 / drive.sent as f64, 4)
        } else {
            0.0
        },
        resolves_by_node,
        resolver_change_requests,
        resolver_change_ids,
        backend_resolves_per_change: if drive.sent > 0 {
            round(resolver_change_requests as f64 / drive.sent as f64, 4)
        } else {
            0.0
        },
        node_cpu_s: round(node_cpu, 2),
        node_cpu_sys_s: round(node_sys, 2),
        generator_cpu_s: round(gen_cpu, 2),
        generator_cpu_sys_s: round(gen_sys, 2),
        node_rss_kb: rss,
        lost,
        failed_setup,
        client_errors,
        notify_errors: drive.errors,
        first_error,
        nofile_limit: nofile,
        unheld,
    };
    drop(env);
    Ok(report)
}

/// Notifies `changes` keys no client holds (ids `keys..`), one per call (paced
/// at `--rate` when set), waits until every node consumed them from the bus
/// (bounded), and counts the resolves they caused: the backend's own count.
async fn unheld_phase(
    cli: &Cli,
    env: &Env,
    shared: &Shared,
    notifier: &Notifier,
    changes: usize,
    deadline: Instant,
) -> anyhow::Result<UnheldReport> {
    let consumed = async || -> Vec<Option<u64>> {
        let mut out = Vec::new();
        for node in &env.nodes {
            out.push(node.metric(CHANGES_CONSUMED).await.ok().map(|v| v as u64));
        }
        out
    };
    let consumed_before = consumed().await;
    let node_before = env.metric(RESOLVES_CHANGE).await?;
    let (req_before, ids_before) = (
        shared.resolver_change_requests(),
        shared.resolver_change_ids(),
    );
    let first_unheld = shared.keys() as u32;
    let t0 = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    for i in 0..changes {
        if let Some(rate) = cli.rate {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
        }
        if Instant::now() >= deadline {
            break;
        }
        let key = load::key_of(first_unheld + i as u32);
        match load::notify_one(notifier, vec![key]).await {
            Ok(()) => sent += 1,
            Err(_) => errors += 1,
        }
    }
    // Every node must have consumed them before the resolves are read; then a
    // moment for a resolve they caused to reach the backend.
    let wait_end = deadline.min(Instant::now() + Duration::from_secs(10));
    let mut after = consumed().await;
    let all_consumed = |after: &[Option<u64>]| {
        after
            .iter()
            .zip(&consumed_before)
            .all(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => a - b >= sent,
                _ => false,
            })
    };
    while !all_consumed(&after) && Instant::now() < wait_end {
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = consumed().await;
    }
    tokio::time::sleep(
        Duration::from_millis(300).min(deadline.saturating_duration_since(Instant::now())),
    )
    .await;
    let requests = shared.resolver_change_requests() - req_before;
    let node_after = env.metric(RESOLVES_CHANGE).await?;
    Ok(UnheldReport {
        scenario: "cluster-unheld",
        nodes: env.nodes.len(),
        changes: sent,
        notify_errors: errors,
        consumed_by_every_node: all_consumed(&after),
        consumed_by_node: after
            .iter()
            .zip(&consumed_before)
            .map(|(a, b)| Some(a.as_ref()? - b.as_ref()?))
            .collect(),
        resolver_change_requests: requests,
        resolver_change_ids: shared.resolver_change_ids() - ids_before,
        backend_resolves_per_change: if sent > 0 {
            round(requests as f64 / sent as f64, 4)
        } else {
            0.0
        },
        node_resolves: sub_u64(&node_after, &node_before),
    })
}

fn sub_u64(after: &[u64], before: &[u64]) -> u64 {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum()
}

/// What the ceiling run measured.
#[derive(Serialize)]
struct CeilingReport {
    scenario: &'static str,
    clients: usize,
    keys: u32,
    keys_per_client: usize,
    updates: u64,
    rate: f64,
    deliveries: u64,
    deliveries_without_coalescing: u64,
    deliveries_per_s: f64,
    latency_us: Option<Percentiles>,
    generator_cpu_s: f64,
    /// CPU of the bare server's threads from the first update to the last
    /// delivery.
    server_cpu_s: f64,
    lost: usize,
    first_error: Option<String>,
}

/// Name of the bare server's threads.
const CEILING_THREADS: &str = "ceiling-server";

/// The bare server's paced fan-out with the scenario's clients and keys:
/// `--ceiling-offered` deliveries/s for `--ceiling-secs`.
async fn ceiling_run(
    cli: &Cli,
    scenario: Scenario,
    deadline: Instant,
) -> anyhow::Result<CeilingReport> {
    let (_, clients, keys, kpc, _) = push_shape(cli, scenario);
    let mut rng = fastrand::Rng::with_seed(cli.seed);
    let client_keys = plan_client_keys(&mut rng, clients, kpc, keys);
    let per_update = (clients * kpc) as f64 / f64::from(keys);
    let offered = if cli.smoke {
        20_000.0
    } else {
        cli.ceiling_offered
    };
    let rate = (offered / per_update.max(1e-9)).max(1.0);
    let secs = if cli.smoke { 0.2 } else { cli.ceiling_secs };
    let updates = ((rate * secs) as usize).max(1);
    let seq: Vec<u32> = (0..updates).map(|_| rng.u32(..keys)).collect();
    let shared = Arc::new(Shared::new(keys as usize, &seq, true)?);
    let cancel = CancellationToken::new();
    // The bare server (its connections and its paced fan-out) runs on
    // threads of its own, as many as a node's, so its CPU is told apart
    // from the clients'.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .thread_name(CEILING_THREADS)
        .enable_all()
        .build()?;
    let server = Arc::new(
        server_rt
            .spawn(ceiling::CeilingServer::start(
                keys as usize,
                shared.clone(),
                cancel.clone(),
            ))
            .await??,
    );
    let url: Arc<str> = Arc::from(server.url.as_str());
    let setup = Arc::new(Semaphore::new(cli.connect_concurrency.max(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let sources = source_count(cli, clients);
    let mut tasks: JoinSet<ClientOutcome> = JoinSet::new();
    for (i, keys_of_client) in client_keys.iter().enumerate() {
        let spec = ClientSpec {
            url: url.clone(),
            src: source_addr(i, sources),
            keys: keys_of_client.clone(),
            secret: None,
            idle: false,
        };
        tasks.spawn(load::run_client(
            spec,
            shared.clone(),
            setup.clone(),
            stop.clone(),
            SETUP_TIMEOUT,
            cancel.clone(),
        ));
    }
    while shared.ready.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire) < clients
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server_before = threads_cpu_seconds(CEILING_THREADS);
    let gen_before = cpu_seconds(None) - server_before;
    let drive = server_rt
        .spawn({
            let (server, shared) = (server.clone(), shared.clone());
            async move { server.drive(&shared, &seq, rate).await }
        })
        .await?;
    if shared.pending() > 0 {
        let _ = timeout_at(deadline, shared.converged.notified()).await;
    }
    let server_cpu = threads_cpu_seconds(CEILING_THREADS) - server_before;
    let gen_cpu = cpu_seconds(None) - server_cpu - server_before - gen_before;
    cancel.cancel();
    let mut outcomes = Vec::with_capacity(clients);
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done?);
    }
    if let Ok(server) = Arc::try_unwrap(server) {
        server.stop().await;
    }
    server_rt.shutdown_background();
    let (deliveries, span_s, mut latencies) = load::delivery_totals(&mut outcomes, drive.first_ns);
    let report = CeilingReport {
        scenario: "ceiling",
        clients,
        keys,
        keys_per_client: kpc,
        updates: drive.sent,
        rate: round(rate, 1),
        deliveries,
        deliveries_without_coalescing: client_keys
            .iter()
            .flatten()
            .map(|&k| shared.final_of(k as usize))
            .sum(),
        deliveries_per_s: if span_s > 0.0 {
            (deliveries as f64 / span_s).round()
        } else {
            0.0
        },
        latency_us: percentiles(&mut latencies),
        generator_cpu_s: round(gen_cpu, 2),
        server_cpu_s: round(server_cpu, 2),
        lost: outcomes
            .iter()
            .filter(|o| !o.subscribed || !o.reached_all)
            .count(),
        first_error: shared
            .first_error
            .lock()
            .expect("lock")
            .clone()
            .or_else(|| outcomes.iter().find_map(|o| o.error.clone())),
    };
    println!("{}", serde_json::to_string(&report)?);
    print_kv(&[
        (
            "ceiling",
            format!(
                "bare server, {} clients x {} of {} keys, {} updates at {}/s (one write per frame)",
                clients, kpc, keys, report.updates, report.rate
            ),
        ),
        (
            "deliveries",
            format!(
                "{} of {} in {:.3} s: {:.0}/s",
                deliveries, report.deliveries_without_coalescing, span_s, report.deliveries_per_s
            ),
        ),
        (
            "latency p50/p99",
            report
                .latency_us
                .map_or("-".into(), |p| format!("{} / {} us", p.p50, p.p99)),
        ),
        (
            "cpu",
            format!(
                "bare server {:.2} s ({} us per delivery), clients {:.2} s",
                report.server_cpu_s,
                if deliveries > 0 {
                    format!("{:.2}", report.server_cpu_s * 1e6 / deliveries as f64)
                } else {
                    "-".into()
                },
                report.generator_cpu_s
            ),
        ),
        ("lost", report.lost.to_string()),
    ]);
    Ok(report)
}

fn print_push_table(r: &PushReport) {
    let rows: Vec<(&str, String)> = vec![
        (
            "scenario",
            format!(
                "{} ({}, {} fetch, {} node(s), {} bus)",
                r.scenario, r.mode, r.fetch_mode, r.nodes, r.bus
            ),
        ),
        (
            "clients x keys/client",
            format!("{} x {} (of {} keys)", r.clients, r.keys_per_client, r.keys),
        ),
        (
            "updates",
            match r.rate {
                Some(rate) => format!("{} at {rate}/s", r.updates),
                None => format!("{} at max rate", r.updates),
            },
        ),
        (
            "deliveries",
            format!(
                "{} (max without coalescing {})",
                r.deliveries, r.deliveries_without_coalescing
            ),
        ),
        ("deliveries/s", format!("{:.0}", r.deliveries_per_s)),
        (
            "convergence",
            r.convergence_ms
                .map_or("not reached".into(), |ms| format!("{ms} ms")),
        ),
        ("notifies sent in", format!("{} ms", r.notify_ms)),
        (
            "latency p50/p99/p999/max",
            r.latency_us.map_or("- (max-rate run)".into(), |p| {
                format!(
                    "{} / {} / {} / {} us ({} samples)",
                    p.p50, p.p99, p.p999, p.max, p.samples
                )
            }),
        ),
        (
            "change resolves",
            format!(
                "{} ({} per change; by node {:?}); resolver saw {} requests ({} per change), {} ids",
                r.resolves,
                r.resolves_per_change,
                r.resolves_by_node,
                r.resolver_change_requests,
                r.backend_resolves_per_change,
                r.resolver_change_ids
            ),
        ),
        (
            "cpu node / generator",
            format!(
                "{} s ({} sys) / {} s ({} sys)",
                r.node_cpu_s, r.node_cpu_sys_s, r.generator_cpu_s, r.generator_cpu_sys_s
            ),
        ),
        ("node rss", format!("{} kB", r.node_rss_kb)),
        (
            "lost",
            format!(
                "{} (setup failed {}, client errors {}, notify errors {})",
                r.lost, r.failed_setup, r.client_errors, r.notify_errors
            ),
        ),
    ];
    print_kv(&rows);
    if let Some(err) = &r.first_error {
        println!("  first error: {err}");
    }
}

fn print_kv(rows: &[(&str, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
}

// ---------------------------------------------------------------------------
// idle
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct IdleReport {
    scenario: &'static str,
    conns: usize,
    /// Keys each connection holds (`--keys-per-client`, default 1).
    keys_per_conn: usize,
    /// Connections subscribed and open when measured.
    held: usize,
    /// The node's own gauge `entity_sync_connections` (null if /metrics did not answer,
    /// e.g. when the node or the bench is out of file descriptors).
    node_connections: Option<u64>,
    node_rss_kb: u64,
    node_rss_base_kb: u64,
    /// (RSS now − RSS with 0 connections) / held, in kB.
    rss_per_conn_kb: f64,
    /// The same per held subscription: rss_per_conn_kb / keys_per_conn.
    rss_per_subscription_kb: f64,
    connect_s: f64,
    node_cpu_s: f64,
    generator_cpu_s: f64,
    failed: usize,
    first_error: Option<String>,
    nofile_limit: u64,
}

async fn idle_scenario(
    cli: &Cli,
    nofile: u64,
    log_dir: &Path,
    deadline: Instant,
) -> anyhow::Result<bool> {
    let mut targets = if cli.smoke {
        vec![100, 200]
    } else {
        cli.conns.clone()
    };
    targets.sort_unstable();
    targets.dedup();
    let max = targets.last().copied().unwrap_or(0);
    let keys = cli.keys.unwrap_or(1_000).max(1);
    // Each connection holds `per_conn` distinct keys (of `keys`).
    let per_conn = cli.keys_per_client.unwrap_or(1).clamp(1, keys as usize);
    let (mut env, shared, cancel, resolver) =
        one_node_with_resolver(cli, cli.nats, keys, log_dir, deadline).await?;
    let base = rss_kib(env.nodes[0].pid()).unwrap_or(0);
    let setup = Arc::new(Semaphore::new(cli.connect_concurrency.max(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let sources = source_count(cli, max);
    let url: Arc<str> = Arc::from(env.nodes[0].ws_url());
    let mut tasks: JoinSet<ClientOutcome> = JoinSet::new();
    let mut reports = Vec::new();
    let mut spawned = 0;
    for &target in &targets {
        let started = Instant::now();
        let node_cpu_before = env.cpu();
        let gen_cpu_before = cpu_seconds(None);
        while spawned < target {
            let spec = ClientSpec {
                url: url.clone(),
                src: source_addr(spawned, sources),
                keys: (0..per_conn)
                    .map(|j| ((spawned * per_conn + j) % keys as usize) as u32)
                    .collect(),
                secret: None,
                idle: true,
            };
            tasks.spawn(load::run_client(
                spec,
                shared.clone(),
                setup.clone(),
                stop.clone(),
                SETUP_TIMEOUT,
                cancel.clone(),
            ));
            spawned += 1;
        }
        wait_clients(&mut env, &shared, spawned, deadline).await?;
        let connect_s = started.elapsed().as_secs_f64();
        let held = shared.ready.load(Ordering::Acquire);
        let failed = shared.failed.load(Ordering::Acquire);
        let rss = rss_kib(env.nodes[0].pid()).unwrap_or(0);
        let per_held = if held > 0 {
            rss.saturating_sub(base) as f64 / held as f64
        } else {
            0.0
        };
        let report = IdleReport {
            scenario: "idle",
            conns: target,
            keys_per_conn: per_conn,
            held,
            node_connections: env.nodes[0]
                .metric("entity_sync_connections")
                .await
                .ok()
                .map(|v| v as u64),
            node_rss_kb: rss,
            node_rss_base_kb: base,
            rss_per_conn_kb: round(per_held, 2),
            rss_per_subscription_kb: round(per_held / per_conn as f64, 3),
            connect_s: round(connect_s, 2),
            node_cpu_s: round(sub(&env.cpu(), &node_cpu_before), 2),
            generator_cpu_s: round(cpu_seconds(None) - gen_cpu_before, 2),
            failed,
            first_error: shared.first_error.lock().expect("lock").clone(),
            nofile_limit: nofile,
        };
        println!("{}", serde_json::to_string(&report)?);
        let stop_here = held < target;
        reports.push(report);
        if stop_here {
            eprintln!("idle: holding {held} of {target}: stopping the ramp");
            break;
        }
    }
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = resolver.await;
    env.check_alive()?;
    println!(
        "  {:>8} {:>5} {:>8} {:>10} {:>12} {:>11} {:>11} {:>10} {:>9} {:>8}",
        "conns",
        "keys",
        "held",
        "rss kB",
        "kB per conn",
        "kB per sub",
        "connect s",
        "node cpu",
        "gen cpu",
        "failed"
    );
    for r in &reports {
        println!(
            "  {:>8} {:>5} {:>8} {:>10} {:>12} {:>11} {:>11} {:>10} {:>9} {:>8}",
            r.conns,
            r.keys_per_conn,
            r.held,
            r.node_rss_kb,
            r.rss_per_conn_kb,
            r.rss_per_subscription_kb,
            r.connect_s,
            r.node_cpu_s,
            r.generator_cpu_s,
            r.failed
        );
    }
    let largest = reports.iter().map(|r| r.held).max().unwrap_or(0);
    println!(
        "  largest count held: {largest} (node RSS with 0 connections: {base} kB; open-file limit {nofile})"
    );
    if let Some(err) = reports.iter().find_map(|r| r.first_error.as_ref()) {
        println!("  first error: {err}");
    }
    // Holding fewer than asked is a finding, not a failure of the tool.
    Ok(true)
}

// ---------------------------------------------------------------------------
// notify
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct NotifyReport {
    scenario: &'static str,
    bus: &'static str,
    /// nats-servers and stream replicas (JetStream bus).
    nats_servers: usize,
    replicas: usize,
    batch: usize,
    concurrency: usize,
    calls: u64,
    keys: u64,
    keys_per_s: f64,
    calls_per_s: f64,
    call_latency_us: Option<Percentiles>,
    errors: u64,
    first_error: Option<String>,
    /// Websocket clients subscribed while the calls ran.
    subscribers: usize,
    /// Pushes those clients received while the calls ran, per second.
    pushes_per_s: f64,
    node_cpu_s: f64,
    generator_cpu_s: f64,
    node_rss_kb: u64,
}

async fn notify_scenario(cli: &Cli, log_dir: &Path, deadline: Instant) -> anyhow::Result<bool> {
    let nats = cli.nats || cli.nats_servers > 1;
    let keys = cli.keys.unwrap_or(1_000).max(1);
    let (mut env, shared, cancel, resolver) =
        one_node_with_resolver(cli, nats, keys, log_dir, deadline).await?;
    // Subscribers, so the node pushes while the calls run.
    let subscribers = if cli.smoke {
        cli.subscribers.min(20)
    } else {
        cli.subscribers
    };
    let setup = Arc::new(Semaphore::new(cli.connect_concurrency.max(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let url: Arc<str> = Arc::from(env.nodes[0].ws_url());
    let mut tasks: JoinSet<ClientOutcome> = JoinSet::new();
    for i in 0..subscribers {
        let spec = ClientSpec {
            url: url.clone(),
            src: source_addr(i, source_count(cli, subscribers)),
            keys: vec![(i % keys as usize) as u32],
            secret: None,
            idle: false,
        };
        tasks.spawn(load::run_client(
            spec,
            shared.clone(),
            setup.clone(),
            stop.clone(),
            SETUP_TIMEOUT,
            cancel.clone(),
        ));
    }
    wait_clients(&mut env, &shared, subscribers, deadline).await?;
    if shared.failed.load(Ordering::Acquire) > 0 {
        eprintln!(
            "notify: {} of {subscribers} subscribers failed to subscribe",
            shared.failed.load(Ordering::Acquire)
        );
    }
    let (calls, batch_keys) = if cli.smoke {
        (200, 2_000)
    } else {
        (cli.calls, cli.batch_keys)
    };
    // A few HTTP/2 connections, so many callers are not all behind one.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(env.notifier(0).await?);
    }
    let mut plan: Vec<(usize, usize, u64)> =
        cli.concurrency.iter().map(|&c| (1, c, calls)).collect();
    plan.extend(cli.batch.iter().map(|&b| {
        (
            b,
            cli.batch_concurrency,
            (batch_keys / b.max(1) as u64).max(10),
        )
    }));
    let mut reports = Vec::new();
    for (i, (batch, concurrency, calls)) in plan.into_iter().enumerate() {
        let node_cpu_before = env.cpu();
        let gen_cpu_before = cpu_seconds(None);
        let phase_deadline = deadline.min(Instant::now() + Duration::from_secs(20));
        let delivered_before = shared.delivered.load(Ordering::Relaxed);
        let mut out = load::notify_throughput(
            &shared,
            &clients,
            keys,
            batch,
            concurrency,
            calls,
            cli.seed.wrapping_add(i as u64),
            phase_deadline,
        )
        .await;
        let secs = out.elapsed.as_secs_f64().max(1e-9);
        let report = NotifyReport {
            scenario: "notify",
            bus: if nats { "jetstream" } else { "in-process" },
            nats_servers: if nats { cli.nats_servers } else { 0 },
            replicas: if nats { cli.replicas } else { 0 },
            batch,
            concurrency,
            calls: out.calls,
            keys: out.keys,
            keys_per_s: (out.keys as f64 / secs).round(),
            calls_per_s: (out.calls as f64 / secs).round(),
            call_latency_us: percentiles(&mut out.call_latencies_us),
            errors: out.errors,
            first_error: out.first_error,
            subscribers,
            pushes_per_s: ((shared.delivered.load(Ordering::Relaxed) - delivered_before) as f64
                / secs)
                .round(),
            node_cpu_s: round(sub(&env.cpu(), &node_cpu_before), 2),
            generator_cpu_s: round(cpu_seconds(None) - gen_cpu_before, 2),
            node_rss_kb: env.rss().iter().sum(),
        };
        println!("{}", serde_json::to_string(&report)?);
        reports.push(report);
    }
    println!(
        "  {:>6} {:>6} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8} {:>7}",
        "batch",
        "conc",
        "calls",
        "keys/s",
        "calls/s",
        "pushes/s",
        "p50 us",
        "p99 us",
        "node cpu",
        "gen cpu",
        "errors"
    );
    for r in &reports {
        let (p50, p99) = r.call_latency_us.map_or((0, 0), |p| (p.p50, p.p99));
        println!(
            "  {:>6} {:>6} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8} {:>7}",
            r.batch,
            r.concurrency,
            r.calls,
            r.keys_per_s,
            r.calls_per_s,
            r.pushes_per_s,
            p50,
            p99,
            r.node_cpu_s,
            r.generator_cpu_s,
            r.errors
        );
    }
    println!(
        "  while {subscribers} websocket clients were subscribed (client i to key i % {keys})"
    );
    if let Some(err) = reports.iter().find_map(|r| r.first_error.as_ref()) {
        println!("  first error: {err}");
    }
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = resolver.await;
    Ok(reports.iter().all(|r| r.errors == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parses() {
        let cli = Cli::try_parse_from([
            "entity-sync-bench",
            "idle",
            "--conns",
            "10,20",
            "--node-arg=--resolve-batch-size=128",
            "--node-arg",
            "--max-subscriptions=8",
            "--timeout",
            "3m",
        ])
        .expect("parses");
        assert_eq!(cli.scenario, Some(Scenario::Idle));
        assert_eq!(cli.conns, [10, 20]);
        assert_eq!(
            cli.node_args,
            ["--resolve-batch-size=128", "--max-subscriptions=8"]
        );
        assert_eq!(cli.timeout, Duration::from_secs(180));
        let smoke = Cli::try_parse_from(["entity-sync-bench", "--smoke"]).expect("parses");
        assert!(smoke.smoke && smoke.scenario.is_none());
        let restart = Cli::try_parse_from([
            "entity-sync-bench",
            "restart",
            "--no-resume",
            "--node-arg=--cluster-relay=false",
        ])
        .expect("parses");
        assert_eq!(restart.scenario, Some(Scenario::Restart));
        let no_resume = restart::Mode {
            resume: false,
            tokens: false,
        };
        assert_eq!(restart::modes(&restart), [no_resume]);
        assert!(!restart.tokens);
        let tokens = Cli::try_parse_from([
            "entity-sync-bench",
            "tokens",
            "--token-conns",
            "20",
            "--token-subs=64",
            "--token-algs",
            "hs256,eddsa",
        ])
        .expect("parses");
        assert_eq!(tokens.scenario, Some(Scenario::Tokens));
        assert_eq!(
            (tokens.token_conns, tokens.token_subs),
            (Some(20), Some(64))
        );
        assert_eq!(tokens.token_algs, [tokens::Alg::Hs256, tokens::Alg::Eddsa]);
        let default_algs = Cli::try_parse_from(["entity-sync-bench", "tokens"]).expect("parses");
        assert_eq!(default_algs.token_algs.len(), 3);
        assert!(
            Cli::try_parse_from(["entity-sync-bench", "tokens", "--token-algs=rs256"]).is_err()
        );
        assert_eq!(restart.node_args, ["--cluster-relay=false"]);
        let both = Cli::try_parse_from(["entity-sync-bench", "restart"]).expect("parses");
        assert_eq!(
            restart::modes(&both),
            [
                no_resume,
                restart::Mode {
                    resume: true,
                    tokens: false
                }
            ]
        );
        assert!(
            Cli::try_parse_from([
                "entity-sync-bench",
                "restart",
                "--no-resume",
                "--resume-only"
            ])
            .is_err()
        );
    }

    #[test]
    fn sources_spread_over_loopback() {
        assert_eq!(source_addr(0, 3), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_addr(4, 3), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_addr(5, 1), Ipv4Addr::new(127, 0, 0, 1));
    }

    #[test]
    fn plan_finals_and_rows() {
        let shared = Shared::new(3, &[0, 2, 2, 2], false).unwrap();
        assert_eq!(
            (0..3).map(|k| shared.final_of(k)).collect::<Vec<_>>(),
            [1, 0, 3]
        );
    }
}
