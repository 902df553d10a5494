//! What every scenario shares: a three-server JetStream cluster and real
//! node processes on it, resolvers on every node, the backend's rows and
//! their final state, a steady notify load through the SDK's `Notifier`,
//! node RSS sampling, and the line each scenario prints.

use std::{
    collections::HashMap,
    io::Write,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use entity_sync_backend::{FetchMode, Notifier};
use entity_sync_testkit::{
    NodeProcess, ResolverData, ResolverOptions, TestResolver,
    fleet::{Fleet, FleetStats, Key, LatencyClock},
    nats::NatsCluster,
    procstat,
};
use serde_json::{Value, json};
use tokio::{
    sync::watch,
    task::JoinSet,
    time::{Instant, MissedTickBehavior, sleep},
};

/// The node binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_entity-sync");

/// The entity every scenario's clients hold.
pub const ITEMS: &str = "items";

/// A generous bound on any one wait of a scenario (convergence after a
/// fault, a restart): the suite fails instead of hanging.
pub const SCENARIO_WAIT: Duration = Duration::from_secs(45);

/// Scenarios run one at a time (each loads both cores); test functions take
/// this first. A tokio mutex: held across awaits, and not poisoned when a
/// scenario fails.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the suite's turn; logs go to the test writer.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    procstat::raise_nofile();
    SERIAL.lock().await
}

/// Where a node's log goes when `$ENTITY_SYNC_FAULTS_LOGS` names a folder:
/// `{folder}/{pid}-{bed}-{name}.log` (bed counts the beds this test process
/// started, restarts append), kept after the run; `None` (a temp dir that
/// goes with the node) otherwise.
fn kept_log(name: &str) -> Option<std::path::PathBuf> {
    static BEDS: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::var_os("ENTITY_SYNC_FAULTS_LOGS")?;
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create the logs folder");
    if name == "node0" {
        BEDS.fetch_add(1, Relaxed);
    }
    let bed = BEDS.load(Relaxed);
    Some(dir.join(format!("{}-{bed}-{name}.log", std::process::id())))
}

/// `count` keys of [`ITEMS`]: `items/0` ... .
pub fn item_keys(count: usize) -> Vec<Key> {
    (0..count)
        .map(|i| (ITEMS.to_owned(), i.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------
// The backend's rows
// ---------------------------------------------------------------------------

/// The backend's data: every key has a counter, bumped by each write, and
/// its one row says so. What the resolvers serve is always the latest write.
#[derive(Clone, Default)]
pub struct Rows {
    pub data: ResolverData,
    // std Mutex: a write updates the counter and the served row together,
    // so the served row never goes back; never held across `.await`.
    counts: Arc<Mutex<HashMap<Key, u64>>>,
}

impl Rows {
    fn row(key: &Key, n: u64) -> Value {
        json!({"id": key.1, "n": n})
    }

    /// A new version of `key`'s row; its counter.
    pub fn write(&self, key: &Key) -> u64 {
        let mut counts = self.counts.lock().unwrap();
        let n = counts.entry(key.clone()).or_insert(0);
        *n += 1;
        let row = Self::row(key, *n).to_string();
        self.data.set_rows(&key.0, &key.1, &[&row]);
        *n
    }

    /// Writes every key once (so that subscribes find rows).
    pub fn seed(&self, keys: &[Key]) {
        for key in keys {
            self.write(key);
        }
    }

    /// The rows every subscriber of each key must end with.
    pub fn expected(&self) -> HashMap<Key, Value> {
        self.counts
            .lock()
            .unwrap()
            .iter()
            .map(|(key, &n)| (key.clone(), json!([Self::row(key, n)])))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Nodes on a cluster
// ---------------------------------------------------------------------------

/// How a [`Bed`] is set up.
pub struct BedOptions {
    pub nodes: usize,
    /// Extra flags of every node.
    pub node_args: Vec<String>,
    /// `no_advertise: true` in the NATS cluster block.
    pub no_advertise: bool,
    /// Per node: its `--nats-url`, instead of every member starting with its own.
    pub nats_urls: Option<Vec<String>>,
    /// Entities the resolvers serve (SHARED).
    pub entities: Vec<&'static str>,
}

impl Default for BedOptions {
    fn default() -> Self {
        BedOptions {
            nodes: 3,
            node_args: Vec::new(),
            no_advertise: false,
            nats_urls: None,
            entities: vec![ITEMS],
        }
    }
}

/// A three-server JetStream cluster (replicas 3, `sync_interval: always`),
/// node processes on it, and one resolver per node.
pub struct Bed {
    pub nats: NatsCluster,
    pub nodes: Vec<NodeProcess>,
    pub resolvers: Vec<Option<TestResolver>>,
    pub rows: Rows,
    entities: Vec<&'static str>,
}

impl Bed {
    /// Starts the cluster, then the nodes (together, as a deploy would), then
    /// a resolver on each node.
    pub async fn start(options: BedOptions) -> Bed {
        let nats = NatsCluster::start_with(3, options.no_advertise).await;
        Self::start_on(nats, options).await
    }

    /// Starts the nodes and resolvers on a running cluster.
    pub async fn start_on(nats: NatsCluster, options: BedOptions) -> Bed {
        let mut nodes = Vec::new();
        for i in 0..options.nodes {
            let url = match &options.nats_urls {
                Some(urls) => urls[i].clone(),
                None => nats.urls_from(i % nats.len()),
            };
            let mut args = vec![
                format!("--nats-url={url}"),
                "--nats-replicas=3".to_owned(),
                "--nats-prefix=faults".to_owned(),
                format!("--node-id=node{i}"),
                "--shutdown-grace=5s".to_owned(),
            ];
            args.extend(options.node_args.iter().cloned());
            let log = kept_log(&format!("node{i}"));
            // A kept log also has the bus's and the NATS client's details.
            let filter = match log {
                Some(_) => "entity_sync=info,entity_sync::bus=debug,async_nats=debug",
                None => "entity_sync=info",
            };
            let node = NodeProcess::spawn(Path::new(BIN), &args, log.as_deref(), filter)
                .expect("spawn node");
            nodes.push(node);
        }
        for node in &mut nodes {
            node.wait_ready(Duration::from_secs(40))
                .await
                .expect("node ready");
        }
        let rows = Rows::default();
        let mut bed = Bed {
            nats,
            nodes,
            resolvers: Vec::new(),
            rows,
            entities: options.entities,
        };
        for i in 0..bed.nodes.len() {
            let resolver = bed.resolver(i, "backend", Duration::ZERO).await;
            bed.resolvers.push(Some(resolver));
        }
        bed
    }

    /// A new resolver on node `i` serving the bed's entities from its rows,
    /// answering each request after `delay`.
    pub async fn resolver(&self, i: usize, name: &str, delay: Duration) -> TestResolver {
        let mut options = ResolverOptions::new(&format!("{name}-{i}")).delay(delay);
        for entity in &self.entities {
            options = options.entity(entity, FetchMode::Shared);
        }
        TestResolver::connect(&self.nodes[i].grpc_url(), options, &self.rows.data).await
    }

    /// The websocket URLs of the nodes.
    pub fn ws_urls(&self) -> Vec<String> {
        self.nodes.iter().map(NodeProcess::ws_url).collect()
    }

    /// A notifier of node `i` (retrying for 30 s, 2 s per attempt).
    pub fn notifier(&self, i: usize) -> Notifier {
        Notifier::builder(self.nodes[i].grpc_url())
            .retry_for(Duration::from_secs(30))
            .call_timeout(Duration::from_secs(2))
            .connect_lazy()
            .expect("notifier")
    }

    /// The pids of the nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(NodeProcess::pid).collect()
    }

    /// A counter of node `i`'s `/metrics` (0 when the sample is absent).
    pub async fn metric(&self, i: usize, name: &str) -> f64 {
        self.nodes[i].metric(name).await.unwrap_or(0.0)
    }

    /// Polls until node `i`'s counter `name` is above `than`; the time it
    /// took. Panics with `what` after [`SCENARIO_WAIT`].
    pub async fn metric_past(&self, i: usize, name: &str, than: f64, what: &str) -> Duration {
        let started = Instant::now();
        while self.metric(i, name).await <= than {
            assert!(started.elapsed() < SCENARIO_WAIT, "node {i} {what}");
            sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }

    /// Polls until node `i` has exited (after a signal); panics after `wait`.
    pub async fn wait_exited(&mut self, i: usize, wait: Duration) {
        let end = Instant::now() + wait;
        while self.nodes[i].guard().check_alive().is_ok() {
            assert!(
                Instant::now() < end,
                "node {i} still running after {wait:?}"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Restarts node `i` (same ports and flags) and waits until it is ready.
    pub async fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart().expect("restart node");
        self.nodes[i]
            .wait_ready(Duration::from_secs(40))
            .await
            .expect("restarted node ready");
    }
}

// ---------------------------------------------------------------------------
// Steady notify load
// ---------------------------------------------------------------------------

/// What the load generator did.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoadReport {
    /// Notifies answered OK.
    pub accepted: u64,
    /// `notify` calls that returned an error (retries exhausted, node gone):
    /// each was tried again until accepted.
    pub failed: u64,
    /// Attempts the notifier retried inside accepted calls.
    pub retried: u64,
    /// Accepted calls the node answered as duplicates of an earlier attempt.
    pub duplicates: u64,
    /// Writes whose notify was never accepted (must be 0).
    pub unfinished: u64,
}

/// Writes a random key's row and notifies it, at a steady rate, from a few
/// workers; a failed notify is repeated until accepted, so that every write
/// ends notified.
pub struct Load {
    stop: watch::Sender<bool>,
    tasks: JoinSet<LoadReport>,
    accepted: Arc<AtomicU64>,
}

/// Workers of a load: each has its share of the rate.
const WORKERS: usize = 8;

/// How long one write may take to be notified before the load gives up on it.
const NOTIFY_GIVE_UP: Duration = Duration::from_secs(90);

impl Load {
    /// `rate` notifies per second of random `keys`, through `notifiers`
    /// (round-robin; an error moves on to the next one).
    pub fn start(
        rows: &Rows,
        notifiers: Vec<Notifier>,
        keys: &[Key],
        rate: f64,
        clock: Option<LatencyClock>,
    ) -> Load {
        let (stop, stopped) = watch::channel(false);
        let accepted = Arc::new(AtomicU64::new(0));
        let notifiers = Arc::new(notifiers);
        let mut tasks = JoinSet::new();
        let period = Duration::from_secs_f64(WORKERS as f64 / rate);
        for w in 0..WORKERS {
            let (rows, keys, clock) = (rows.clone(), keys.to_vec(), clock.clone());
            let (mut stopped, accepted, notifiers) =
                (stopped.clone(), accepted.clone(), notifiers.clone());
            tasks.spawn(async move {
                let mut report = LoadReport::default();
                let mut ticks = tokio::time::interval_at(
                    Instant::now() + period.mul_f64(w as f64 / WORKERS as f64),
                    period,
                );
                ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
                let mut next = w;
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        _ = stopped.changed() => return report,
                    }
                    if *stopped.borrow() {
                        return report;
                    }
                    let key = &keys[fastrand::usize(..keys.len())];
                    rows.write(key);
                    let give_up = Instant::now() + NOTIFY_GIVE_UP;
                    loop {
                        next += 1;
                        let notifier = notifiers[next % notifiers.len()].clone();
                        let started = Instant::now();
                        match notifier.notify([(key.0.as_str(), key.1.as_str())]).await {
                            Ok(receipt) => {
                                report.accepted += 1;
                                accepted.fetch_add(1, Relaxed);
                                report.retried += u64::from(receipt.attempts.saturating_sub(1));
                                if receipt.duplicate {
                                    report.duplicates += 1;
                                }
                                if let (Some(clock), Some(&seq)) =
                                    (&clock, receipt.sequences.first())
                                {
                                    clock.record(seq, started);
                                }
                                break;
                            }
                            Err(_) if Instant::now() < give_up => {
                                report.failed += 1;
                                sleep(Duration::from_millis(100)).await;
                            }
                            Err(_) => {
                                report.unfinished += 1;
                                break;
                            }
                        }
                    }
                }
            });
        }
        Load {
            stop,
            tasks,
            accepted,
        }
    }

    /// Notifies accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    /// Polls until `n` more notifies were accepted; panics after `wait`.
    pub async fn wait_accepted(&self, n: u64, wait: Duration) {
        let target = self.accepted() + n;
        let end = Instant::now() + wait;
        while self.accepted() < target {
            assert!(
                Instant::now() < end,
                "load stuck: {} of {target} notifies accepted after {wait:?}",
                self.accepted()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the workers once their current write is notified; the sums.
    pub async fn stop(mut self) -> LoadReport {
        let _ = self.stop.send(true);
        let mut total = LoadReport::default();
        while let Some(report) = self.tasks.join_next().await {
            let r = report.expect("load worker");
            total.accepted += r.accepted;
            total.failed += r.failed;
            total.retried += r.retried;
            total.duplicates += r.duplicates;
            total.unfinished += r.unfinished;
        }
        total
    }
}

// ---------------------------------------------------------------------------
// RSS sampling
// ---------------------------------------------------------------------------

/// Samples the VmRSS of some pids every 50 ms and keeps the maximum.
pub struct RssSampler {
    pids: Arc<Mutex<Vec<u32>>>,
    max_kib: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> RssSampler {
        let pids = Arc::new(Mutex::new(pids));
        let max_kib = Arc::new(AtomicU64::new(0));
        let task = {
            let (pids, max_kib) = (pids.clone(), max_kib.clone());
            tokio::spawn(async move {
                loop {
                    let now: Vec<u32> = pids.lock().unwrap().clone();
                    for pid in now {
                        if let Some(kib) = procstat::rss_kib(pid) {
                            max_kib.fetch_max(kib, Relaxed);
                        }
                    }
                    sleep(Duration::from_millis(50)).await;
                }
            })
        };
        RssSampler {
            pids,
            max_kib,
            task,
        }
    }

    /// Samples these pids from now on (a restarted node has a new one).
    pub fn set_pids(&self, pids: Vec<u32>) {
        *self.pids.lock().unwrap() = pids;
    }

    /// The largest RSS of any node so far, in MiB.
    pub fn max_mib(&self) -> f64 {
        self.max_kib.load(Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// The figures of a scenario
// ---------------------------------------------------------------------------

/// What every scenario prints.
pub struct Figures {
    pub scenario: &'static str,
    pub load: LoadReport,
    pub clients: usize,
    pub mismatches: usize,
    pub fleet: FleetStats,
    pub max_rss_mib: f64,
    /// From the fault (or its end, when it has one) until every client was
    /// connected again with a snapshot of each of its keys.
    pub recovered: Duration,
    /// From the last accepted notify until every client held the final state.
    pub converged: Duration,
    /// Figures particular to the scenario.
    pub extra: Vec<(&'static str, String)>,
}

impl Figures {
    /// Prints the line (on stderr, uncaptured, so `cargo test` shows it)
    /// and appends it to `$ENTITY_SYNC_FAULTS_REPORT` when set; then asserts
    /// what must hold of every scenario.
    pub fn report(&self) {
        let mut line = format!(
            "faults: {:<22} notifies_accepted={} notify_retries={} notify_failures={} clients={} \
             mismatches={} duplicates={} stale={} connects={} max_node_rss_mib={:.1} \
             recovered_ms={} converge_ms={}",
            self.scenario,
            self.load.accepted,
            self.load.retried,
            self.load.failed,
            self.clients,
            self.mismatches,
            self.fleet.duplicates,
            self.fleet.stale,
            self.fleet.connects,
            self.max_rss_mib,
            self.recovered.as_millis(),
            self.converged.as_millis(),
        );
        for (name, value) in &self.extra {
            line.push_str(&format!(" {name}={value}"));
        }
        let _ = writeln!(std::io::stderr(), "{line}");
        if let Some(path) = std::env::var_os("ENTITY_SYNC_FAULTS_REPORT")
            && let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = writeln!(file, "{line}");
        }
        assert_eq!(
            self.mismatches, 0,
            "{}: final-state mismatches",
            self.scenario
        );
        assert_eq!(
            self.fleet.stale, 0,
            "{}: stale pushes after a newer one",
            self.scenario
        );
        assert_eq!(
            self.load.unfinished, 0,
            "{}: writes never notified",
            self.scenario
        );
    }
}

/// Stops the load, waits until every client of `fleet` holds the final
/// state, and returns the load's report, the time that took, and the
/// mismatches left (0 unless it timed out).
pub async fn settle(load: Load, rows: &Rows, fleet: &Fleet) -> (LoadReport, Duration, usize) {
    let report = load.stop().await;
    let expected = rows.expected();
    match fleet.wait_converged(&expected, SCENARIO_WAIT).await {
        Ok(took) => (report, took, 0),
        Err(left) => (report, SCENARIO_WAIT, left),
    }
}

/// Waits until no client of `fleet` is connected to node `i` any more (they
/// noticed it went away): a client that has not yet read its socket's end
/// still counts as ready, so [`recovered`] alone could return before any
/// client moved.
pub async fn left(fleet: &Fleet, i: usize) {
    let started = Instant::now();
    while fleet.connected_to(i) > 0 {
        assert!(
            started.elapsed() < SCENARIO_WAIT,
            "{} clients still connected to node {i}",
            fleet.connected_to(i)
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every client of `fleet` is ready again; the time it took.
pub async fn recovered(fleet: &Fleet, what: &str) -> Duration {
    fleet
        .wait_ready(SCENARIO_WAIT)
        .await
        .unwrap_or_else(|left| panic!("{what}: {left} clients never got back"))
}
