//! `restart`: a rolling restart of the nodes of one JetStream cluster while
//! clients hold keys and a notifier keeps changing them.
//!
//! Every client remembers, per key, the row version (`"v"`, the bench's own
//! count of the key's changes) and the bus version (the push's `"version"`)
//! it last received. The nodes are restarted one at a time: SIGTERM, the node
//! closes its websockets with 1001, its clients reconnect to another live
//! node and subscribe again (with `"version": <held>` in resume mode), the
//! node is started again on the same ports and the next waits until it is
//! ready and its resolver registered again. Measured: what the resubscribes
//! received (snapshots of keys that did not change while the client was
//! away, `current: true` answers), the resolves the backends answered during
//! the storm, the time until every client is current again, and the clients
//! that ended stale or lost.
//!
//! With `--tokens` each mode also runs with subscribe tokens, side by side
//! with the secret (no-token) modes: the bench writes a JWKS file with an
//! HS256 key (a random secret per run, from the SDK's `SubscribeTokenSigner`),
//! starts every node with `--subscribe-token-jwks`, and every subscribe of a
//! client (the first and after each reconnect, with `"version"` in resume
//! mode) carries a token for the client's keys. Reported for every mode:
//! backend subscribe resolves per reconnecting subscription, split into warm
//! keys (the node the client reconnected to already held the key: goal
//! ≤ 0.01 with tokens) and cold keys (it did not: goal ≤ 1 per distinct cold
//! key and node), and the nodes' token verifications by result.
//!
//! Warm and cold are classified by the bench: each (node, key) counts the
//! sessions that subscribed it there; a resubscribe that finds none is the
//! key's first on that node (a cold key; a restarted node comes back
//! empty), any other a warm one. The storm is cut into one phase per
//! restarted node (its SIGTERM to the next SIGTERM, the last until every
//! client is current); a key's resolves in a phase (the resolver counts them
//! by key) are charged to its cold keys in that phase if it had any, else to
//! its warm resubscribes, else reported as unattributed.

use std::{
    io::Read,
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::*},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use entity_sync_backend::{FetchMode, Notifier, SubscribeTokenSigner};
use entity_sync_testkit::{
    NodeProcess,
    procstat::{cpu_seconds, loadavg},
    ws::{ConnectOptions, connect},
};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::{
    sync::Semaphore,
    task::JoinSet,
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};
use tokio_util::sync::CancellationToken;

use crate::{
    Cli, Env,
    load::{self, ENTITY, Shared},
    round, source_count,
    stats::{distinct, push_version, scan_push, scan_subscribed},
};

/// The node's cache metrics (absent on nodes without a cache: reported as null).
const CACHE_HITS: &str = "entity_sync_cache_hits_total";
const CACHE_MISSES: &str = "entity_sync_cache_misses_total";
const CACHE_BYTES: &str = "entity_sync_cache_bytes";
const CACHE_KEYS: &str = "entity_sync_cache_keys";
/// How long one connect (TCP and websocket handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one Notify attempt may take before the notifier tries another node.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// Subscribes of one key a session sends again after an error frame.
const MAX_RESUBSCRIBES: u32 = 20;
/// The nodes' token verifications, by result.
pub const TOKENS_VALID: &str = "entity_sync_subscribe_tokens_total{result=\"valid\"}";
pub const TOKENS_INVALID: &str = "entity_sync_subscribe_tokens_total{result=\"invalid\"}";
pub const TOKENS_EXPIRED: &str = "entity_sync_subscribe_tokens_total{result=\"expired\"}";
/// The counters summed over the storm: cache hits and misses, token verifications.
const COUNTED: [&str; 5] = [
    CACHE_HITS,
    CACHE_MISSES,
    TOKENS_VALID,
    TOKENS_INVALID,
    TOKENS_EXPIRED,
];
/// Lifetime of the clients' tokens: well beyond any run.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Goals of the token modes: backend resolves per warm resubscribe, per cold key.
pub const GOAL_WARM: f64 = 0.01;
pub const GOAL_COLD: f64 = 1.0;

/// One run of the rolling restart: resubscribes with `"version"` or not,
/// with subscribe tokens or not (the secret mode: the resolver authorizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    pub resume: bool,
    pub tokens: bool,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match (self.resume, self.tokens) {
            (false, false) => "no-resume",
            (true, false) => "resume",
            (false, true) => "no-resume+token",
            (true, true) => "resume+token",
        }
    }
}

/// Backend subscribe resolves of the storm charged to warm and cold keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WarmCold {
    /// Resubscribes to a node that already held the key, and the resolved ids charged to them.
    pub warm_resubscribes: u64,
    pub warm_resolves: u64,
    /// Distinct (node, key) pairs whose first subscribe on the node was a
    /// resubscribe of the storm, and the resolved ids charged to them.
    pub cold_keys: u64,
    pub cold_resolves: u64,
    /// Resolved ids of keys with no resubscribe in their phase.
    pub unattributed: u64,
}

impl WarmCold {
    /// `resolves[p][k]`: subscribe-resolved ids of key `k` in phase `p`;
    /// `warm` and `cold`: the resubscribes of each (phase, key) the bench
    /// classified. A key with a cold key in a phase takes all its resolves of
    /// the phase; else its warm resubscribes do.
    pub fn split(resolves: &[Vec<u64>], warm: &[Vec<u64>], cold: &[Vec<u64>]) -> WarmCold {
        let mut out = WarmCold::default();
        for (p, by_key) in resolves.iter().enumerate() {
            for (k, &r) in by_key.iter().enumerate() {
                let (w, c) = (warm[p][k], cold[p][k]);
                out.warm_resubscribes += w;
                out.cold_keys += c;
                if c > 0 {
                    out.cold_resolves += r;
                } else if w > 0 {
                    out.warm_resolves += r;
                } else {
                    out.unattributed += r;
                }
            }
        }
        out
    }

    pub fn per_warm(&self) -> Option<f64> {
        ratio(self.warm_resolves, self.warm_resubscribes)
    }

    pub fn per_cold(&self) -> Option<f64> {
        ratio(self.cold_resolves, self.cold_keys)
    }
}

/// Per-phase differences of cumulative per-key counts taken at the phases'
/// boundaries (`snapshots.len() - 1` phases).
pub fn phase_deltas(snapshots: &[Vec<u64>]) -> Vec<Vec<u64>> {
    snapshots
        .windows(2)
        .map(|w| {
            w[1].iter()
                .zip(&w[0])
                .map(|(b, a)| b.saturating_sub(*a))
                .collect()
        })
        .collect()
}

/// `a / b` to 4 digits, `None` when `b` is 0.
pub fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| round(a as f64 / b as f64, 4))
}

/// "met" / "NOT met" / "-" of a figure against a goal (at most).
pub fn goal_mark(value: Option<f64>, goal: f64) -> &'static str {
    match value {
        Some(v) if v <= goal => "met",
        Some(_) => "NOT met",
        None => "-",
    }
}

/// What one mode of the rolling restart measured.
#[derive(Serialize)]
pub struct RestartReport {
    scenario: &'static str,
    /// `resume` (subscribes carry `"version": <held>`) or `no-resume`; `+token`
    /// when every subscribe carries a subscribe token.
    mode: &'static str,
    tokens: bool,
    nodes: usize,
    bus: &'static str,
    clients: usize,
    keys: u32,
    keys_per_client: usize,
    /// Changes per second the notifier sends throughout.
    change_rate: f64,
    /// 1-minute load average when the mode started (the machine is shared).
    loadavg_1m: Option<f64>,
    setup_s: f64,
    /// SIGTERM of each node → it is ready again and its resolver registered, in ms.
    restart_ms: Vec<f64>,
    /// First SIGTERM → the last node ready again.
    rolling_restart_ms: f64,
    /// Starts of a restarted node tried again (its port was taken: `Address already in use`).
    restart_retries: u32,
    /// (iii) First SIGTERM → every client current (connected, each key answered, and
    /// holding at least the version each key had at the last SIGTERM).
    current_after_ms: Option<f64>,
    /// The same from the last SIGTERM.
    current_after_last_sigterm_ms: Option<f64>,
    /// Closes with 1001 (going away) the clients received.
    closes_going_away: u64,
    /// Sessions opened after a client's first (reconnects).
    reconnects: u64,
    /// Connect attempts that failed (e.g. to a node being restarted).
    connect_failures: u64,
    /// (i) Keys subscribed again after a reconnect, while holding a version.
    resubscribes: u64,
    /// Snapshots those resubscribes received.
    resubscribe_snapshots: u64,
    /// ... of which the key had not changed while the client was away (the
    /// snapshot's rows are the rows the client held). Goal 0 with resume.
    snapshots_unchanged: u64,
    /// ... of which the push's version equals the version the client held.
    snapshots_same_version: u64,
    /// `subscribed` answers with `"current":true` (no snapshot follows).
    current_answers: u64,
    /// (ii) Resolve requests (and ids) the backends themselves answered during the
    /// storm (first SIGTERM → every client current), by reason.
    storm_resolves_subscribe: u64,
    storm_resolve_ids_subscribe: u64,
    storm_resolves_change: u64,
    storm_resolve_ids_change: u64,
    /// Subscribe resolve requests of the storm per resubscribe.
    resolves_per_resubscribe: Option<f64>,
    /// Those resolves (ids) split into warm and cold keys (see the module doc).
    storm_split: WarmCold,
    /// Resolved ids per warm resubscribe (goal with tokens ≤ 0.01) and per cold key (≤ 1).
    resolves_per_warm_resubscribe: Option<f64>,
    resolves_per_cold_key: Option<f64>,
    /// The nodes' token checks during the storm, by result (null without the
    /// metric): one per subscribe carrying a token (a connection's token
    /// verified last is not verified again, yet counted).
    tokens_valid: Option<u64>,
    tokens_invalid: Option<u64>,
    tokens_expired: Option<u64>,
    /// Changes notified during the storm, and change resolve requests per change.
    storm_changes: u64,
    storm_change_resolves_per_change: Option<f64>,
    /// Node cache during the storm (null when the node has no such metrics).
    cache_hits: Option<u64>,
    cache_misses: Option<u64>,
    cache_hit_ratio: Option<f64>,
    /// At the end: cache bytes and keys over the nodes, and bytes per cached key.
    cache_bytes: Option<u64>,
    cache_keys: Option<u64>,
    cache_bytes_per_key: Option<f64>,
    /// Pushes the clients received in all (snapshots and changes).
    pushes: u64,
    /// Changes the notifier sent in all; Notify calls retried on another node;
    /// changes no node accepted.
    changes: u64,
    notify_retries: u64,
    notify_errors: u64,
    /// Error frames the clients received (each key subscribed again).
    error_frames: u64,
    /// (iv) After the notifier stopped: clients connected but not at the final
    /// version of every key, and clients not connected and subscribed. Must be 0.
    stale: usize,
    lost: usize,
    failed_setup: usize,
    generator_cpu_s: f64,
    first_error: Option<String>,
}

impl RestartReport {
    pub fn ok(&self) -> bool {
        self.stale == 0 && self.lost == 0 && self.failed_setup == 0 && self.notify_errors == 0
    }
}

/// Which modes to run: both by default, side by side; with `--tokens` each
/// also with subscribe tokens.
pub fn modes(cli: &Cli) -> Vec<Mode> {
    let resumes = match (cli.no_resume, cli.resume_only) {
        (true, false) => vec![false],
        (false, true) => vec![true],
        _ => vec![false, true],
    };
    let tokens: &[bool] = if cli.tokens { &[false, true] } else { &[false] };
    tokens
        .iter()
        .flat_map(|&tokens| resumes.iter().map(move |&resume| Mode { resume, tokens }))
        .collect()
}

/// Runs each mode on fresh processes, prints a JSON line per mode and the
/// table of both; `Ok(false)` if a mode ended with stale or lost clients.
pub async fn restart_scenario(cli: &Cli, log_dir: &Path) -> anyhow::Result<bool> {
    let mut reports = Vec::new();
    for mode in modes(cli) {
        let deadline = Instant::now() + cli.timeout;
        let report = restart_run(cli, mode, log_dir, deadline).await?;
        println!("{}", serde_json::to_string(&report)?);
        reports.push(report);
    }
    print_table(&reports);
    Ok(reports.iter().all(RestartReport::ok))
}

/// The clients' shared state: what each holds, read by the run's checks.
struct Fleet {
    kpc: usize,
    /// Distinct keys of the run.
    nkeys: usize,
    /// Client `i`'s keys: `keys[i * kpc..][..kpc]`.
    keys: Vec<u32>,
    /// The row version (`"v"`) each client holds of each of its keys, plus one
    /// (0: none yet; a key never changed has version 0).
    held: Vec<AtomicU64>,
    /// Connected, and every key answered (a snapshot or `current: true`).
    settled: Vec<AtomicBool>,
    /// Clients that have settled at least once.
    ever_settled: AtomicUsize,
    urls: Vec<Arc<str>>,
    /// Nodes being restarted: clients and the notifier avoid them.
    down: Vec<AtomicBool>,
    resume: bool,
    /// Client `i`'s subscribe token (token modes).
    tokens: Option<Vec<String>>,
    /// Sessions subscribed to each (node, key), at `node * nkeys + key`.
    holders: Vec<AtomicU32>,
    /// 0 outside the storm, else 1 + the node being restarted (its phase).
    phase: AtomicUsize,
    /// Resubscribes of each (phase, key), at `phase * nkeys + key`, to a node
    /// that held the key (warm) and that did not (cold).
    warm: Vec<AtomicU64>,
    cold: Vec<AtomicU64>,
    setup: Semaphore,
    c: Counters,
    first_error: Mutex<Option<String>>,
}

#[derive(Default)]
struct Counters {
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    going_away: AtomicU64,
    resubscribes: AtomicU64,
    resub_snapshots: AtomicU64,
    unchanged: AtomicU64,
    same_version: AtomicU64,
    current: AtomicU64,
    error_frames: AtomicU64,
    pushes: AtomicU64,
}

impl Fleet {
    fn note_error(&self, err: String) {
        self.first_error.lock().expect("lock").get_or_insert(err);
    }

    /// A session on `node` subscribes `key`; a resubscribe of the storm is
    /// counted warm or cold in the current phase.
    fn hold(&self, node: usize, key: u32, resubscribe: bool) {
        let before = self.holders[node * self.nkeys + key as usize].fetch_add(1, AcqRel);
        let phase = self.phase.load(Acquire);
        if resubscribe && phase > 0 {
            let at = (phase - 1) * self.nkeys + key as usize;
            let class = if before == 0 { &self.cold } else { &self.warm };
            class[at].fetch_add(1, AcqRel);
        }
    }

    /// A session on `node` that held `keys` ended.
    fn release(&self, node: usize, keys: &[u32]) {
        for &key in keys {
            let _ =
                self.holders[node * self.nkeys + key as usize]
                    .fetch_update(AcqRel, Acquire, |n| n.checked_sub(1));
        }
    }

    /// The storm's warm and cold resubscribes, by phase and key.
    fn classified(&self, phases: usize) -> (Vec<Vec<u64>>, Vec<Vec<u64>>) {
        let read = |v: &[AtomicU64]| -> Vec<Vec<u64>> {
            (0..phases)
                .map(|p| {
                    v[p * self.nkeys..(p + 1) * self.nkeys]
                        .iter()
                        .map(|a| a.load(Acquire))
                        .collect()
                })
                .collect()
        };
        (read(&self.warm), read(&self.cold))
    }

    /// A live node other than `from`, spread by client index.
    fn pick(&self, client: usize, from: usize, attempt: usize) -> usize {
        let n = self.urls.len();
        let live: Vec<usize> = (0..n)
            .filter(|&k| k != from && !self.down[k].load(Acquire))
            .collect();
        let others: Vec<usize> = if live.is_empty() {
            (0..n).filter(|&k| k != from || n == 1).collect()
        } else {
            live
        };
        others[(client + attempt) % others.len()]
    }

    /// Clients not settled, and (client, key) pairs below `targets` (per key).
    fn behind(&self, targets: &[u64]) -> (usize, usize) {
        let clients = self.settled.len();
        let (mut unsettled, mut pairs) = (0, 0);
        for i in 0..clients {
            if !self.settled[i].load(Acquire) {
                unsettled += 1;
            }
            for j in 0..self.kpc {
                let at = i * self.kpc + j;
                if self.held[at].load(Acquire) <= targets[self.keys[at] as usize] {
                    pairs += 1;
                }
            }
        }
        (unsettled, pairs)
    }

    /// Clients not settled, and settled clients below `targets` on some key.
    fn stale_and_lost(&self, targets: &[u64]) -> (usize, usize) {
        let (mut stale, mut lost) = (0, 0);
        for i in 0..self.settled.len() {
            if !self.settled[i].load(Acquire) {
                lost += 1;
            } else if (0..self.kpc).any(|j| {
                let at = i * self.kpc + j;
                self.held[at].load(Acquire) <= targets[self.keys[at] as usize]
            }) {
                stale += 1;
            }
        }
        (stale, lost)
    }
}

/// Source address of client `i` among `n`: 127.0.0.2..=127.0.0.(n+1), never
/// 127.0.0.1, where the nodes listen. A client's ephemeral port on 127.0.0.1
/// can be the very port a restarted node must bind again (`Address already in
/// use`): with 3,000 clients that happened in most runs.
fn client_source(i: usize, n: u8) -> Ipv4Addr {
    let n = n.clamp(1, 250) as usize;
    Ipv4Addr::new(127, 0, 0, 2 + (i % n) as u8)
}

fn ms(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1e3, 1)
}

/// Waits until `done()` or the deadline; whether it became true.
async fn wait_for(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// 32 random bytes for the run's HS256 secret.
fn random_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut secret));
    if read.is_err() {
        let mut rng = fastrand::Rng::new();
        secret.iter_mut().for_each(|b| *b = rng.u8(..));
    }
    secret
}

/// An HS256 signer with a random secret, its JWKS written to `dir`, and the
/// node flag that loads it.
pub fn token_setup(dir: &Path, kid: &str) -> anyhow::Result<(SubscribeTokenSigner, String)> {
    let signer = SubscribeTokenSigner::hs256(kid, &random_secret())?;
    let path = dir.join("subscribe-token-jwks.json");
    std::fs::write(&path, entity_sync_backend::jwks(&[&signer]))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((signer, format!("--subscribe-token-jwks={}", path.display())))
}

async fn restart_run(
    cli: &Cli,
    run_mode: Mode,
    log_dir: &Path,
    deadline: Instant,
) -> anyhow::Result<RestartReport> {
    let resume = run_mode.resume;
    let mode = run_mode.name();
    let (def_clients, def_keys, def_kpc) = if cli.smoke {
        (30, 50, 5)
    } else {
        (3_000, 1_000, 5)
    };
    let clients = cli.clients.unwrap_or(def_clients);
    let keys = cli.keys.unwrap_or(def_keys).max(1);
    let kpc = cli
        .keys_per_client
        .unwrap_or(def_kpc)
        .clamp(1, keys as usize);
    let rate = cli.rate.unwrap_or(10.0).max(0.1);
    let nodes = cli.nodes.unwrap_or(3).max(2);
    let loadavg_1m = loadavg();
    let gen_before = cpu_seconds(None);

    let dir = log_dir.join(mode);
    std::fs::create_dir_all(&dir)?;
    let mut node_cli = cli.clone();
    let signer = if run_mode.tokens {
        let (signer, flag) = token_setup(&dir, "bench-restart")?;
        node_cli.node_args.push(flag);
        Some(signer)
    } else {
        None
    };
    let mut env = Env::start(&node_cli, nodes, true, &dir, deadline).await?;
    let shared = Arc::new(Shared::new(keys as usize, &[], false)?);
    let cancel = CancellationToken::new();
    // One resolver per node (a backend connected to each node): each keeps
    // serving its node across the restarts (it registers again on its own).
    let mut resolvers = Vec::new();
    for node in &env.nodes {
        resolvers.push(
            load::start_resolver(
                &node.grpc_url(),
                shared.clone(),
                FetchMode::Shared,
                cancel.clone(),
            )
            .await?,
        );
    }

    let mut rng = fastrand::Rng::with_seed(cli.seed);
    let plan: Vec<u32> = (0..clients)
        .flat_map(|_| distinct(&mut rng, kpc, keys))
        .collect();
    let tokens = match &signer {
        Some(signer) => Some(
            plan.chunks(kpc)
                .map(|ids| {
                    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                    signer.sign(ENTITY, &ids, TOKEN_TTL)
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    let nkeys = keys as usize;
    let fleet = Arc::new(Fleet {
        kpc,
        nkeys,
        held: (0..plan.len()).map(|_| AtomicU64::new(0)).collect(),
        keys: plan,
        settled: (0..clients).map(|_| AtomicBool::new(false)).collect(),
        ever_settled: AtomicUsize::new(0),
        urls: env.nodes.iter().map(|n| Arc::from(n.ws_url())).collect(),
        down: (0..nodes).map(|_| AtomicBool::new(false)).collect(),
        resume,
        tokens,
        holders: (0..nodes * nkeys).map(|_| AtomicU32::new(0)).collect(),
        phase: AtomicUsize::new(0),
        warm: (0..nodes * nkeys).map(|_| AtomicU64::new(0)).collect(),
        cold: (0..nodes * nkeys).map(|_| AtomicU64::new(0)).collect(),
        setup: Semaphore::new(cli.connect_concurrency.max(1)),
        c: Counters::default(),
        first_error: Mutex::new(None),
    });
    let sources = source_count(cli, clients);
    let mut tasks = JoinSet::new();
    let setup_started = Instant::now();
    for i in 0..clients {
        tasks.spawn(client(
            i,
            fleet.clone(),
            client_source(i, sources),
            cancel.clone(),
        ));
    }
    wait_for(deadline, || fleet.ever_settled.load(Acquire) >= clients).await;
    let setup_s = round(setup_started.elapsed().as_secs_f64(), 2);
    let failed_setup = clients - fleet.ever_settled.load(Acquire);
    eprintln!(
        "restart ({mode}): {} of {clients} clients x {kpc} keys subscribed over {nodes} nodes in {setup_s} s",
        clients - failed_setup
    );

    // The notifier, throughout, at `rate` changes/s over random keys.
    let mut notifiers = Vec::new();
    for node in &env.nodes {
        notifiers.push(load::notifier(&node.grpc_url()).await?);
    }
    let stop_notify = CancellationToken::new();
    let notify = tokio::spawn(notify_loop(
        shared.clone(),
        fleet.clone(),
        notifiers,
        rate,
        cli.seed ^ 0xC4A9,
        stop_notify.clone(),
        deadline,
    ));
    // Let it run a moment before the first restart.
    sleep(Duration::from_millis(if cli.smoke { 300 } else { 1_000 })).await;

    let versions = |shared: &Shared| -> Vec<u64> { (0..keys).map(|k| shared.version(k)).collect() };
    let (sub_before, chg_before) = (
        shared.resolver_subscribe(),
        (
            shared.resolver_change_requests(),
            shared.resolver_change_ids(),
        ),
    );
    let changes_before: u64 = versions(&shared).iter().sum();
    let cache_start = cache_counters(&env.nodes).await;
    let mut cache_at_stop = Vec::new();
    // The resolver's subscribe resolves by key at each phase's start, and at the end.
    let mut by_key = Vec::new();
    let first_term = Instant::now();
    let mut last_term = first_term;
    let mut targets = Vec::new();
    let mut restart_ms = Vec::new();
    let mut restart_retries = 0;
    for i in 0..nodes {
        cache_at_stop.push(cache_counters(&env.nodes[i..=i]).await);
        by_key.push(shared.resolver_subscribe_by_key());
        fleet.phase.store(i + 1, Release);
        fleet.down[i].store(true, Release);
        let term = Instant::now();
        if i == nodes - 1 {
            last_term = term;
            targets = versions(&shared);
        }
        restart_retries += restart_node(&mut env.nodes[i], deadline).await?;
        fleet.down[i].store(false, Release);
        restart_ms.push(ms(term.elapsed()));
        eprintln!(
            "restart ({mode}): node {} back in {:.0} ms",
            i + 1,
            restart_ms[i]
        );
    }
    let rolling = first_term.elapsed();
    let current = wait_for(deadline, || fleet.behind(&targets) == (0, 0)).await;
    let current_at = Instant::now();
    by_key.push(shared.resolver_subscribe_by_key());
    fleet.phase.store(0, Release);
    let sub_after = shared.resolver_subscribe();
    let chg_after = (
        shared.resolver_change_requests(),
        shared.resolver_change_ids(),
    );
    let storm_changes = versions(&shared).iter().sum::<u64>() - changes_before;
    let cache_end = cache_counters(&env.nodes).await;
    let cache_gauges = (
        sum_metric(&env.nodes, CACHE_BYTES).await,
        sum_metric(&env.nodes, CACHE_KEYS).await,
    );

    // Then the end: the notifier stops, every client must reach the final
    // version of each of its keys.
    stop_notify.cancel();
    let sent = notify.await?;
    let finals = versions(&shared);
    wait_for(deadline, || fleet.behind(&finals) == (0, 0)).await;
    let (stale, lost) = fleet.stale_and_lost(&finals);
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    for resolver in resolvers {
        let _ = resolver.await;
    }
    env.check_alive()?;

    // Counters of a restarted node start again from 0: the storm's count is
    // what each old process counted until its SIGTERM plus what the new one
    // counted until the end.
    let storm = |k: usize| -> Option<u64> {
        let mut total = 0.0;
        for i in 0..nodes {
            let before = cache_start.get(i)?[k]?;
            let stop = cache_at_stop.get(i)?.first()?[k]?;
            let end = cache_end.get(i)?[k]?;
            total += (stop - before).max(0.0) + end;
        }
        Some(total as u64)
    };
    let (hits, misses) = (storm(0), storm(1));
    let (warm, cold) = fleet.classified(nodes);
    let split = WarmCold::split(&phase_deltas(&by_key), &warm, &cold);
    let resubscribes = fleet.c.resubscribes.load(Acquire);
    let c = &fleet.c;
    let report = RestartReport {
        scenario: "restart",
        mode,
        tokens: run_mode.tokens,
        nodes,
        bus: "jetstream",
        clients,
        keys,
        keys_per_client: kpc,
        change_rate: rate,
        loadavg_1m,
        setup_s,
        restart_ms,
        rolling_restart_ms: ms(rolling),
        restart_retries,
        current_after_ms: current.then(|| ms(current_at - first_term)),
        current_after_last_sigterm_ms: current.then(|| ms(current_at - last_term)),
        closes_going_away: c.going_away.load(Acquire),
        reconnects: c.reconnects.load(Acquire),
        connect_failures: c.connect_failures.load(Acquire),
        resubscribes: c.resubscribes.load(Acquire),
        resubscribe_snapshots: c.resub_snapshots.load(Acquire),
        snapshots_unchanged: c.unchanged.load(Acquire),
        snapshots_same_version: c.same_version.load(Acquire),
        current_answers: c.current.load(Acquire),
        storm_resolves_subscribe: sub_after.0 - sub_before.0,
        storm_resolve_ids_subscribe: sub_after.1 - sub_before.1,
        storm_resolves_change: chg_after.0 - chg_before.0,
        storm_resolve_ids_change: chg_after.1 - chg_before.1,
        resolves_per_resubscribe: ratio(sub_after.0 - sub_before.0, resubscribes),
        storm_split: split,
        resolves_per_warm_resubscribe: split.per_warm(),
        resolves_per_cold_key: split.per_cold(),
        tokens_valid: storm(2),
        tokens_invalid: storm(3),
        tokens_expired: storm(4),
        storm_changes,
        storm_change_resolves_per_change: (storm_changes > 0).then(|| {
            round(
                (chg_after.0 - chg_before.0) as f64 / storm_changes as f64,
                3,
            )
        }),
        cache_hits: hits,
        cache_misses: misses,
        cache_hit_ratio: match (hits, misses) {
            (Some(h), Some(m)) if h + m > 0 => Some(round(h as f64 / (h + m) as f64, 4)),
            _ => None,
        },
        cache_bytes: cache_gauges.0,
        cache_keys: cache_gauges.1,
        cache_bytes_per_key: match cache_gauges {
            (Some(b), Some(k)) if k > 0 => Some(round(b as f64 / k as f64, 1)),
            _ => None,
        },
        pushes: c.pushes.load(Acquire),
        changes: sent.sent,
        notify_retries: sent.retries,
        notify_errors: sent.errors,
        error_frames: c.error_frames.load(Acquire),
        stale,
        lost,
        failed_setup,
        generator_cpu_s: round(cpu_seconds(None) - gen_before, 2),
        first_error: sent
            .first_error
            .or_else(|| fleet.first_error.lock().expect("lock").clone()),
    };
    drop(env);
    Ok(report)
}

/// Starts of a restarted node that may fail before one comes up (its port
/// taken meanwhile by a loopback socket: `Address already in use`).
const RESTART_ATTEMPTS: u32 = 5;

/// SIGTERM, waits for the node to exit, starts it again on the same ports and
/// flags, and waits until it is ready and a resolver registered on it. A start
/// that exits at once (a port still taken) is tried again, up to
/// [`RESTART_ATTEMPTS`] in all; the attempts made after the first are returned.
async fn restart_node(node: &mut NodeProcess, deadline: Instant) -> anyhow::Result<u32> {
    node.guard().signal(libc::SIGTERM);
    if !wait_for(deadline, || node.guard().check_alive().is_err()).await {
        bail!("node at {} did not exit after SIGTERM", node.ws);
    }
    let mut retries = 0;
    loop {
        node.restart()?;
        let ready = node
            .wait_ready(deadline.saturating_duration_since(Instant::now()))
            .await;
        match ready {
            Ok(()) => break,
            Err(err)
                if retries + 1 < RESTART_ATTEMPTS
                    && err.contains("already in use")
                    && Instant::now() < deadline =>
            {
                retries += 1;
                eprintln!(
                    "restart: node at {} did not start ({retries}): port taken; again",
                    node.ws
                );
                sleep(Duration::from_millis(250)).await;
            }
            Err(err) => bail!(err),
        }
    }
    loop {
        if node
            .metric("entity_sync_resolvers")
            .await
            .is_ok_and(|n| n >= 1.0)
        {
            return Ok(retries);
        }
        if Instant::now() >= deadline {
            bail!("no resolver registered again on the node at {}", node.ws);
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Each node's counters of [`COUNTED`] (cache hits and misses, token
/// verifications), `None` where the node has no such metric.
async fn cache_counters(nodes: &[NodeProcess]) -> Vec<[Option<f64>; 5]> {
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        let mut values = [None; 5];
        for (value, name) in values.iter_mut().zip(COUNTED) {
            *value = node.metric(name).await.ok();
        }
        out.push(values);
    }
    out
}

/// A gauge summed over the nodes; `None` if a node lacks it.
async fn sum_metric(nodes: &[NodeProcess], name: &str) -> Option<u64> {
    let mut total = 0.0;
    for node in nodes {
        total += node.metric(name).await.ok()?;
    }
    Some(total as u64)
}

/// What the notifier did.
#[derive(Default)]
struct NotifySent {
    sent: u64,
    retries: u64,
    errors: u64,
    first_error: Option<String>,
}

/// `rate` changes per second (absolute schedule) of random keys until `stop`:
/// each bumps the key's version, then notifies it through a live node,
/// trying the others if that fails, so no change is lost to a restart.
async fn notify_loop(
    shared: Arc<Shared>,
    fleet: Arc<Fleet>,
    notifiers: Vec<Notifier>,
    rate: f64,
    seed: u64,
    stop: CancellationToken,
    deadline: Instant,
) -> NotifySent {
    let mut out = NotifySent::default();
    let mut rng = fastrand::Rng::with_seed(seed);
    let keys = shared.keys() as u32;
    let n = notifiers.len();
    let t0 = Instant::now();
    for i in 0u64.. {
        let at = t0 + Duration::from_secs_f64(i as f64 / rate);
        if at >= deadline {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sleep_until(at) => {}
        }
        let key = rng.u32(..keys);
        shared.touch(key);
        out.sent += 1;
        let mut done = false;
        for attempt in 0..n * 5 {
            let node = (i as usize + attempt) % n;
            if fleet.down[node].load(Acquire) && attempt < n {
                continue;
            }
            let call = timeout(
                NOTIFY_TIMEOUT,
                load::notify_one(&notifiers[node], vec![load::key_of(key)]),
            )
            .await;
            match call {
                Ok(Ok(())) => {
                    done = true;
                    break;
                }
                Ok(Err(err)) => {
                    out.retries += 1;
                    out.first_error.get_or_insert(err);
                }
                Err(_) => out.retries += 1,
            }
            if Instant::now() >= deadline {
                break;
            }
            sleep(Duration::from_millis(20)).await;
        }
        if !done {
            out.errors += 1;
        }
    }
    if out.errors == 0 {
        // Retried calls that then went through are counted, not reported as errors.
        out.first_error = None;
    }
    out
}

/// How a session ended.
enum SessionEnd {
    GoingAway,
    ConnectFailed(String),
    Other(String),
}

/// One client: connects to its node, subscribes to its keys, follows pushes,
/// and on a close reconnects to another live node and subscribes again, until
/// `cancel`.
async fn client(i: usize, fleet: Arc<Fleet>, src: Ipv4Addr, cancel: CancellationToken) {
    let n = fleet.urls.len();
    let mut node = i % n;
    let mut versions: Vec<Option<u64>> = vec![None; fleet.kpc];
    let mut backoff = Duration::from_millis(20);
    let mut sessions = 0u64;
    let mut ever = false;
    let mut attempt = 0;
    loop {
        if fleet.down[node].load(Acquire) {
            node = fleet.pick(i, node, attempt);
        }
        let end = tokio::select! {
            _ = cancel.cancelled() => return,
            end = session(i, node, &fleet, &mut versions, src, &mut sessions, &mut ever) => end,
        };
        fleet.settled[i].store(false, Release);
        attempt += 1;
        let going_away = matches!(end, SessionEnd::GoingAway);
        match end {
            SessionEnd::GoingAway => {
                fleet.c.going_away.fetch_add(1, AcqRel);
                backoff = Duration::from_millis(20);
            }
            SessionEnd::ConnectFailed(err) => {
                fleet.c.connect_failures.fetch_add(1, AcqRel);
                fleet.note_error(err);
            }
            SessionEnd::Other(err) => fleet.note_error(err),
        }
        node = fleet.pick(i, node, attempt);
        if !going_away {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

/// Where a key stands in a session.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyState {
    AwaitingAnswer,
    AwaitingSnapshot,
    Done,
}

fn subscribe_frame(key: u32, version: Option<u64>, token: Option<&str>) -> Message {
    let version = version.map_or(String::new(), |v| format!(r#","version":{v}"#));
    let token = token.map_or(String::new(), |t| format!(r#","token":"{t}""#));
    Message::text(format!(
        r#"{{"action":"subscribe","body":{{"entity":"{ENTITY}","id":"{key}"{version}{token}}}}}"#
    ))
}

/// The keys a session subscribed on its node, released when it ends.
struct Holding<'a> {
    fleet: &'a Fleet,
    node: usize,
    keys: Vec<u32>,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.fleet.release(self.node, &self.keys);
    }
}

async fn session(
    i: usize,
    node: usize,
    fleet: &Fleet,
    versions: &mut [Option<u64>],
    src: Ipv4Addr,
    sessions: &mut u64,
    ever: &mut bool,
) -> SessionEnd {
    let mut permit = match fleet.setup.acquire().await {
        Ok(p) => Some(p),
        Err(_) => return SessionEnd::Other("setup closed".into()),
    };
    let options = ConnectOptions {
        source: Some(src),
        recv_buffer: None,
        read_buffer: Some(4096),
    };
    let url = &fleet.urls[node];
    let mut ws = match timeout(CONNECT_TIMEOUT, connect(url, &options)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(err)) => return SessionEnd::ConnectFailed(format!("connect {url}: {err}")),
        Err(_) => return SessionEnd::ConnectFailed(format!("connect {url}: timed out")),
    };
    *sessions += 1;
    if *sessions > 1 {
        fleet.c.reconnects.fetch_add(1, AcqRel);
    }
    let base = i * fleet.kpc;
    let keys = &fleet.keys[base..base + fleet.kpc];
    // The row version the client held when it (re)subscribed, if any.
    let held_before: Vec<Option<u64>> = (0..fleet.kpc)
        .map(|j| fleet.held[base + j].load(Acquire).checked_sub(1))
        .collect();
    let resume = fleet.resume;
    let version_of = |versions: &[Option<u64>], j: usize| versions[j].filter(|_| resume);
    let token = fleet.tokens.as_ref().map(|t| t[i].as_str());
    let mut holding = Holding {
        fleet,
        node,
        keys: Vec::with_capacity(keys.len()),
    };
    for (j, &key) in keys.iter().enumerate() {
        if held_before[j].is_some() {
            fleet.c.resubscribes.fetch_add(1, AcqRel);
        }
        fleet.hold(node, key, held_before[j].is_some());
        holding.keys.push(key);
        if let Err(err) = ws
            .feed(subscribe_frame(key, version_of(versions, j), token))
            .await
        {
            return SessionEnd::Other(format!("subscribe: {err}"));
        }
    }
    if let Err(err) = ws.flush().await {
        return SessionEnd::Other(format!("subscribe: {err}"));
    }
    let mut state = vec![KeyState::AwaitingAnswer; fleet.kpc];
    let mut retries = 0u32;
    let slot_of = |id: &str| -> Option<usize> {
        let key: u32 = id.parse().ok()?;
        keys.iter().position(|&k| k == key)
    };
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                return match frame {
                    Some(f) if f.code == CloseCode::Away => SessionEnd::GoingAway,
                    other => SessionEnd::Other(format!("closed by the node: {other:?}")),
                };
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => return SessionEnd::Other(format!("websocket: {err}")),
            None => return SessionEnd::Other("connection ended".into()),
        };
        let text = text.as_str();
        if let Some(push) = scan_push(text) {
            fleet.c.pushes.fetch_add(1, Relaxed);
            let Some(j) = slot_of(push.id) else { continue };
            let v = push.v.unwrap_or(0);
            let version = push_version(text);
            if state[j] == KeyState::AwaitingSnapshot {
                state[j] = KeyState::Done;
                if held_before[j].is_some() {
                    fleet.c.resub_snapshots.fetch_add(1, AcqRel);
                    if held_before[j] == Some(v) {
                        fleet.c.unchanged.fetch_add(1, AcqRel);
                    }
                    if version.is_some() && version == versions[j] {
                        fleet.c.same_version.fetch_add(1, AcqRel);
                    }
                }
            }
            if v + 1 > fleet.held[base + j].load(Acquire) {
                fleet.held[base + j].store(v + 1, Release);
            }
            versions[j] = versions[j].max(version);
        } else if let Some((id, current)) = scan_subscribed(text) {
            let Some(j) = slot_of(id) else { continue };
            if state[j] == KeyState::AwaitingAnswer {
                state[j] = if current {
                    fleet.c.current.fetch_add(1, AcqRel);
                    KeyState::Done
                } else {
                    KeyState::AwaitingSnapshot
                };
            }
        } else if text.starts_with(r#"{"action":"error""#) {
            fleet.c.error_frames.fetch_add(1, AcqRel);
            fleet.note_error(format!("error frame: {text}"));
            let id = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v["body"]["id"].as_str().map(str::to_owned));
            let Some(j) = id.as_deref().and_then(slot_of) else {
                continue;
            };
            if state[j] == KeyState::Done {
                continue;
            }
            retries += 1;
            if retries > MAX_RESUBSCRIBES {
                return SessionEnd::Other(format!("gave up after {retries} error frames"));
            }
            sleep(Duration::from_millis(50)).await;
            state[j] = KeyState::AwaitingAnswer;
            if let Err(err) = ws
                .send(subscribe_frame(keys[j], version_of(versions, j), token))
                .await
            {
                return SessionEnd::Other(format!("subscribe: {err}"));
            }
        }
        if permit.is_some() && state.iter().all(|s| *s == KeyState::Done) {
            permit = None;
            fleet.settled[i].store(true, Release);
            if !*ever {
                *ever = true;
                fleet.ever_settled.fetch_add(1, AcqRel);
            }
        }
    }
}

/// `0.0012 (3/2500) met`: a split figure, its parts, and the goal's mark.
fn split_cell(value: Option<f64>, resolves: u64, of: u64, goal: Option<f64>) -> String {
    let v = value.map_or("-".into(), |v| v.to_string());
    match goal {
        Some(goal) => format!("{v} ({resolves}/{of}) {}", goal_mark(value, goal)),
        None => format!("{v} ({resolves}/{of})"),
    }
}

fn print_table(reports: &[RestartReport]) {
    if reports.is_empty() {
        return;
    }
    let head = &reports[0];
    println!(
        "  rolling restart of {} nodes ({} bus), {} clients x {} of {} keys, {} changes/s throughout",
        head.nodes, head.bus, head.clients, head.keys_per_client, head.keys, head.change_rate
    );
    type Row = (&'static str, fn(&RestartReport) -> String);
    let rows: Vec<Row> = vec![
        ("load average (1 min) at start", |r| {
            r.loadavg_1m.map_or("-".into(), |v| v.to_string())
        }),
        ("setup s", |r| r.setup_s.to_string()),
        ("restart ms per node", |r| format!("{:?}", r.restart_ms)),
        ("rolling restart ms (start retries)", |r| {
            format!("{} ({})", r.rolling_restart_ms, r.restart_retries)
        }),
        ("all current after ms (first SIGTERM)", |r| {
            r.current_after_ms
                .map_or("not reached".into(), |v| v.to_string())
        }),
        ("  ... after the last SIGTERM", |r| {
            r.current_after_last_sigterm_ms
                .map_or("not reached".into(), |v| v.to_string())
        }),
        ("closes 1001 / reconnects", |r| {
            format!("{} / {}", r.closes_going_away, r.reconnects)
        }),
        ("resubscribed keys", |r| r.resubscribes.to_string()),
        ("  snapshots", |r| r.resubscribe_snapshots.to_string()),
        ("  of unchanged keys (goal 0)", |r| {
            r.snapshots_unchanged.to_string()
        }),
        ("  with the held version", |r| {
            r.snapshots_same_version.to_string()
        }),
        ("  current: true answers", |r| r.current_answers.to_string()),
        ("storm resolves subscribe (ids)", |r| {
            format!(
                "{} ({})",
                r.storm_resolves_subscribe, r.storm_resolve_ids_subscribe
            )
        }),
        ("subscribe resolves per resubscribe", |r| {
            r.resolves_per_resubscribe
                .map_or("-".into(), |v| v.to_string())
        }),
        ("  warm keys: per resubscribe (tokens: goal <= 0.01)", |r| {
            split_cell(
                r.resolves_per_warm_resubscribe,
                r.storm_split.warm_resolves,
                r.storm_split.warm_resubscribes,
                r.tokens.then_some(GOAL_WARM),
            )
        }),
        ("  cold keys: per cold key (tokens: goal <= 1)", |r| {
            split_cell(
                r.resolves_per_cold_key,
                r.storm_split.cold_resolves,
                r.storm_split.cold_keys,
                r.tokens.then_some(GOAL_COLD),
            )
        }),
        ("  unattributed resolved ids", |r| {
            r.storm_split.unattributed.to_string()
        }),
        ("token checks valid/invalid/expired", |r| {
            let n = |v: Option<u64>| v.map_or("null".into(), |v| v.to_string());
            format!(
                "{}/{}/{}",
                n(r.tokens_valid),
                n(r.tokens_invalid),
                n(r.tokens_expired)
            )
        }),
        ("storm resolves change (ids)", |r| {
            format!(
                "{} ({})",
                r.storm_resolves_change, r.storm_resolve_ids_change
            )
        }),
        ("storm changes, change resolves each", |r| {
            format!(
                "{}, {}",
                r.storm_changes,
                r.storm_change_resolves_per_change
                    .map_or("-".into(), |v| v.to_string())
            )
        }),
        ("cache hit ratio (hits/misses)", |r| {
            format!(
                "{} ({}/{})",
                r.cache_hit_ratio.map_or("null".into(), |v| v.to_string()),
                r.cache_hits.map_or("null".into(), |v| v.to_string()),
                r.cache_misses.map_or("null".into(), |v| v.to_string())
            )
        }),
        ("cache bytes per key (bytes/keys)", |r| {
            format!(
                "{} ({}/{})",
                r.cache_bytes_per_key
                    .map_or("null".into(), |v| v.to_string()),
                r.cache_bytes.map_or("null".into(), |v| v.to_string()),
                r.cache_keys.map_or("null".into(), |v| v.to_string())
            )
        }),
        ("changes (retried, failed)", |r| {
            format!("{} ({}, {})", r.changes, r.notify_retries, r.notify_errors)
        }),
        ("error frames", |r| r.error_frames.to_string()),
        ("stale / lost / failed setup", |r| {
            format!("{} / {} / {}", r.stale, r.lost, r.failed_setup)
        }),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    print!("  {:<width$}", "mode");
    for r in reports {
        print!("  {:>26}", r.mode);
    }
    println!();
    for (name, cell) in &rows {
        print!("  {name:<width$}");
        for r in reports {
            print!("  {:>26}", cell(r));
        }
        println!();
    }
    println!(
        "  (storm: first SIGTERM -> every client current; token verifications over the storm; \
         resolves are the backends' own counts of ids; token checks count every token subscribe; the machine is shared, figures are noisy)"
    );
    if let Some(err) = reports.iter().find_map(|r| r.first_error.as_ref()) {
        println!("  first error: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_frames_carry_the_held_version_only_when_asked() {
        let with = subscribe_frame(17, Some(42), None);
        assert_eq!(
            with.to_text().unwrap(),
            r#"{"action":"subscribe","body":{"entity":"bench","id":"17","version":42}}"#
        );
        let without = subscribe_frame(17, None, None);
        let value: serde_json::Value = serde_json::from_str(without.to_text().unwrap()).unwrap();
        assert!(value["body"].get("version").is_none());
        assert!(value["body"].get("token").is_none());
        let token = subscribe_frame(17, Some(3), Some("h.c.s"));
        let value: serde_json::Value = serde_json::from_str(token.to_text().unwrap()).unwrap();
        assert_eq!(value["body"]["version"], 3);
        assert_eq!(value["body"]["token"], "h.c.s");
    }

    #[test]
    fn resolves_split_into_warm_and_cold_keys() {
        // Cumulative resolves by key at 3 boundaries: 2 phases of 3 keys.
        let snapshots = vec![vec![5, 0, 0], vec![5, 1, 2], vec![6, 3, 2]];
        let resolves = phase_deltas(&snapshots);
        assert_eq!(resolves, [vec![0, 1, 2], vec![1, 2, 0]]);
        let warm = vec![vec![10, 4, 0], vec![0, 6, 0]];
        let cold = vec![vec![0, 0, 0], vec![1, 2, 0]];
        let split = WarmCold::split(&resolves, &warm, &cold);
        assert_eq!(
            split,
            WarmCold {
                warm_resubscribes: 20,
                // Phase 0: key 1 (warm only) resolved once; key 2 had no resubscribe.
                warm_resolves: 1,
                cold_keys: 3,
                // Phase 1: keys 0 and 1 had cold keys and take their 1 + 2 resolves.
                cold_resolves: 3,
                unattributed: 2,
            }
        );
        assert_eq!(split.per_warm(), Some(0.05));
        assert_eq!(split.per_cold(), Some(1.0));
        assert_eq!(WarmCold::default().per_cold(), None);
        assert_eq!(goal_mark(Some(0.01), GOAL_WARM), "met");
        assert_eq!(goal_mark(Some(0.0101), GOAL_WARM), "NOT met");
        assert_eq!(goal_mark(None, GOAL_COLD), "-");
        assert_eq!(
            split_cell(Some(0.05), 1, 20, Some(GOAL_WARM)),
            "0.05 (1/20) NOT met"
        );
        assert_eq!(split_cell(None, 0, 0, None), "- (0/0)");
    }

    #[test]
    fn clients_never_take_ports_of_the_nodes_address() {
        assert_eq!(client_source(0, 1), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(client_source(5, 3), Ipv4Addr::new(127, 0, 0, 4));
        assert!((0..1000).all(|i| client_source(i, 255).octets()[3] >= 2));
    }

    #[test]
    fn modes_and_names() {
        let names = |m: Vec<Mode>| m.into_iter().map(Mode::name).collect::<Vec<_>>();
        let cli = |args: &[&str]| {
            let mut all = vec!["entity-sync-bench", "restart"];
            all.extend_from_slice(args);
            <Cli as clap::Parser>::try_parse_from(all).expect("parses")
        };
        assert_eq!(names(modes(&cli(&[]))), ["no-resume", "resume"]);
        assert_eq!(
            names(modes(&cli(&["--tokens"]))),
            ["no-resume", "resume", "no-resume+token", "resume+token"]
        );
        assert_eq!(
            names(modes(&cli(&["--tokens", "--resume-only"]))),
            ["resume", "resume+token"]
        );
    }

    #[test]
    fn holders_classify_resubscribes_by_phase() {
        let fleet = test_fleet();
        // Setup (no phase): not counted.
        fleet.hold(0, 0, false);
        fleet.phase.store(1, Release);
        fleet.hold(1, 0, true); // first on node 1: cold
        fleet.hold(1, 0, true); // warm
        fleet.hold(0, 0, true); // node 0 holds it: warm
        fleet.release(1, &[0, 0]);
        fleet.phase.store(2, Release);
        fleet.hold(1, 0, true); // node 1 empty again: cold
        fleet.release(2, &[0]); // nothing held there: no underflow
        let (warm, cold) = fleet.classified(2);
        assert_eq!(warm, [vec![2], vec![0]]);
        assert_eq!(cold, [vec![1], vec![1]]);
    }

    fn test_fleet() -> Fleet {
        Fleet {
            kpc: 1,
            nkeys: 1,
            keys: vec![0],
            held: vec![AtomicU64::new(0)],
            settled: vec![AtomicBool::new(false)],
            ever_settled: AtomicUsize::new(0),
            urls: (0..3).map(|i| Arc::from(format!("ws://n{i}"))).collect(),
            down: (0..3).map(|_| AtomicBool::new(false)).collect(),
            resume: true,
            tokens: None,
            holders: (0..3).map(|_| AtomicU32::new(0)).collect(),
            phase: AtomicUsize::new(0),
            warm: (0..3).map(|_| AtomicU64::new(0)).collect(),
            cold: (0..3).map(|_| AtomicU64::new(0)).collect(),
            setup: Semaphore::new(1),
            c: Counters::default(),
            first_error: Mutex::new(None),
        }
    }

    #[test]
    fn reconnects_pick_a_live_node_other_than_the_one_left() {
        let fleet = test_fleet();
        fleet.down[1].store(true, Release);
        for attempt in 0..6 {
            assert_eq!(fleet.pick(0, 0, attempt), 2);
        }
        fleet.down[1].store(false, Release);
        let picks: Vec<usize> = (0..4).map(|a| fleet.pick(0, 0, a)).collect();
        assert_eq!(picks, [1, 2, 1, 2]);
        // Stale and lost: a settled client below the target is stale, an unsettled one lost.
        assert_eq!(fleet.stale_and_lost(&[0]), (0, 1));
        fleet.settled[0].store(true, Release);
        assert_eq!(fleet.stale_and_lost(&[0]), (1, 0), "holds nothing yet");
        fleet.held[0].store(1, Release);
        assert_eq!(fleet.stale_and_lost(&[0]), (0, 0), "holds version 0");
        assert_eq!(fleet.stale_and_lost(&[1]), (1, 0));
        fleet.held[0].store(2, Release);
        assert_eq!(fleet.stale_and_lost(&[1]), (0, 0));
        assert_eq!(fleet.behind(&[2]), (0, 1));
    }
}
