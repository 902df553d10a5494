//! The bench's real clients: a gRPC resolver serving each key's latest version, a gRPC
//! notifier, and websocket subscribers that count pushes, latency and convergence.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*},
    },
    time::Duration,
};

use anyhow::{anyhow, bail};
use entity_sync_backend::{
    Answer, Answers, Backend, BackendState, FetchMode, Key, Notifier, Reason, ResolveRequest,
};
use entity_sync_testkit::ws::{ConnectOptions, Ws, connect};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    sync::{Notify, Semaphore},
    task::JoinSet,
    time::{Instant, sleep_until, timeout},
};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::{slots::Slots, stats::scan_push};
use entity_sync_testkit::process::{ChildGuard, log_tail};

/// The entity every bench key belongs to; ids are `0..keys` in decimal.
pub const ENTITY: &str = "bench";
/// Approximate size of one resolved row, in bytes.
const ROW_BYTES: usize = 200;
/// Most resolve requests the node may keep outstanding on the bench resolver.
const MAX_IN_FLIGHT: u32 = 64;
/// Most paced notify calls in flight before the scheduler waits for one.
const PACED_IN_FLIGHT: usize = 512;

/// Slots after the keys' versions in [`Shared::slots`], written by the resolver.
const SLOT_CHANGE_REQUESTS: usize = 0;
const SLOT_CHANGE_IDS: usize = 1;
const SLOT_SUBSCRIBE_REQUESTS: usize = 2;
const SLOT_SUBSCRIBE_IDS: usize = 3;
const RESOLVER_SLOTS: usize = 4;
/// Slots in all after the versions: the counters and the resolver's state.
const SHARED_EXTRA: usize = RESOLVER_SLOTS + 1;

/// Slots in all for `keys` keys: the versions, the counters and the
/// resolver's state, then the subscribe-resolved ids of each key.
fn slot_count(keys: usize) -> usize {
    2 * keys + SHARED_EXTRA
}

/// State shared by the notifier, the resolver and every client.
pub struct Shared {
    base: std::time::Instant,
    /// Latest version of each key (`slots[..keys]`): bumped by the notifier
    /// before `Notify`, read by the resolver process, so a resolve after a
    /// notify sees at least its version; then the resolver's counters.
    slots: Slots,
    keys: usize,
    /// Final version of each key: how many updates the run sends to it.
    finals: Vec<u64>,
    /// `sent_ns[offsets[key] + v - 1]`: when the notify of `(key, v)` was sent.
    offsets: Vec<usize>,
    sent_ns: Vec<AtomicU64>,
    pad: String,
    pub record_latency: bool,
    /// Clients subscribed and ready / given up.
    pub ready: AtomicUsize,
    pub failed: AtomicUsize,
    pub first_error: Mutex<Option<String>>,
    /// (client, key) pairs not yet at the key's final version.
    pending: AtomicUsize,
    pub converged: Notify,
    converged_ns: AtomicU64,
    /// Push frames every client received, counted as they arrive.
    pub delivered: AtomicU64,
}

impl Shared {
    /// `updates` is the sequence of keys the run will notify, known in advance
    /// so every key's final version (and the latency table) is too.
    pub fn new(keys: usize, updates: &[u32], record_latency: bool) -> anyhow::Result<Shared> {
        let mut finals = vec![0u64; keys];
        for &k in updates {
            finals[k as usize] += 1;
        }
        let mut offsets = Vec::with_capacity(keys + 1);
        let mut total = 0usize;
        for &f in &finals {
            offsets.push(total);
            total += f as usize;
        }
        offsets.push(total);
        let id_len = keys.saturating_sub(1).to_string().len();
        let v_len = updates.len().to_string().len();
        let skeleton = r#"{"id":"","v":,"pad":""}"#.len() + id_len + v_len;
        let slots = Slots::create(slot_count(keys))
            .map_err(|err| anyhow!("cannot create the resolver's shared slots: {err}"))?;
        Ok(Shared {
            base: std::time::Instant::now(),
            slots,
            keys,
            finals,
            offsets,
            sent_ns: (0..total).map(|_| AtomicU64::new(0)).collect(),
            pad: "x".repeat(ROW_BYTES.saturating_sub(skeleton)),
            record_latency,
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            pending: AtomicUsize::new(0),
            converged: Notify::new(),
            converged_ns: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        })
    }

    fn resolver_slot(&self, slot: usize) -> u64 {
        self.slots[self.keys + slot].load(Acquire)
    }

    /// Change resolve requests the resolver answered.
    pub fn resolver_change_requests(&self) -> u64 {
        self.resolver_slot(SLOT_CHANGE_REQUESTS)
    }

    /// Ids those change requests carried.
    pub fn resolver_change_ids(&self) -> u64 {
        self.resolver_slot(SLOT_CHANGE_IDS)
    }

    /// Subscribe resolves of each key the resolver(s) answered (ids, by key).
    pub fn resolver_subscribe_by_key(&self) -> Vec<u64> {
        let base = self.keys + SHARED_EXTRA;
        (0..self.keys)
            .map(|k| self.slots[base + k].load(Acquire))
            .collect()
    }

    /// Subscribe resolve requests the resolver(s) answered, and the ids they carried.
    pub fn resolver_subscribe(&self) -> (u64, u64) {
        (
            self.resolver_slot(SLOT_SUBSCRIBE_REQUESTS),
            self.resolver_slot(SLOT_SUBSCRIBE_IDS),
        )
    }

    /// Nanoseconds since the run's origin.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Acquire)
    }

    /// When the last pending (client, key) pair reached its final version.
    pub fn converged_ns(&self) -> Option<u64> {
        Some(self.converged_ns.load(Acquire)).filter(|&ns| ns > 0)
    }

    /// How many updates the run sends to `key`.
    pub fn final_of(&self, key: usize) -> u64 {
        self.finals.get(key).copied().unwrap_or(0)
    }

    fn sent_slot(&self, key: u32, v: u64) -> Option<&AtomicU64> {
        let key = key as usize;
        if v == 0 || v > *self.finals.get(key)? {
            return None;
        }
        self.sent_ns.get(self.offsets[key] + v as usize - 1)
    }

    fn note_error(&self, err: String) {
        let mut first = self.first_error.lock().expect("lock");
        first.get_or_insert(err);
    }

    /// How many keys the run has.
    pub fn keys(&self) -> usize {
        self.keys
    }

    fn versions(&self) -> &[AtomicU64] {
        &self.slots[..self.keys]
    }

    /// The current version of `key`.
    pub fn version(&self, key: u32) -> u64 {
        self.versions()[key as usize].load(Acquire)
    }

    /// The next update of `key` by the only writer of versions (a paced
    /// scheduler): its send time is recorded first, then the version is
    /// published, so a reader that sees `v` always finds its send time.
    pub fn bump(&self, key: u32) -> u64 {
        let v = self.versions()[key as usize].load(Acquire) + 1;
        if let Some(slot) = self.sent_slot(key, v) {
            slot.store(self.now_ns(), Release);
        }
        self.versions()[key as usize].store(v, Release);
        v
    }

    /// A change of `key` by one of several concurrent writers (no send times).
    pub fn touch(&self, key: u32) {
        self.versions()[key as usize].fetch_add(1, AcqRel);
    }

    /// One row of `key` at its current version (~200 bytes of JSON).
    pub fn row(&self, id: &str) -> Option<String> {
        row_of(self.versions(), &self.pad, id)
    }
}

/// The row of `id` at its version in `versions`.
fn row_of(versions: &[AtomicU64], pad: &str, id: &str) -> Option<String> {
    let key: usize = id.parse().ok()?;
    let v = versions.get(key)?.load(Acquire);
    Some(format!(r#"{{"id":"{id}","v":{v},"pad":"{pad}"}}"#))
}

// ---------------------------------------------------------------------------
// Resolver
// ---------------------------------------------------------------------------

/// Starts the bench's resolver in a process of its own (this executable,
/// `resolver-process`), as a real backend runs: it serves entity `bench`
/// through `entity-sync-backend` on `grpc_url`, answering every request with
/// each key's latest version, read from the slots it maps with `shared`.
/// Returns once the node answered `Registered`; the handle ends once
/// `cancel` fired and the process drained and exited.
pub async fn start_resolver(
    grpc_url: &str,
    shared: Arc<Shared>,
    fetch_mode: FetchMode,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let state = &shared.slots[shared.keys + SLOT_STATE_OFFSET..];
    state[0].store(STATE_STARTING, Release);
    let mode = match fetch_mode {
        FetchMode::PerSubscriber => "per-subscriber",
        _ => "shared",
    };
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("resolver-process")
        .arg("--resolver-grpc")
        .arg(grpc_url)
        .arg("--resolver-slots")
        .arg(shared.slots.path())
        .arg("--keys")
        .arg(shared.keys.to_string())
        .arg("--resolver-pad")
        .arg(shared.pad.len().to_string())
        .arg("--fetch-mode")
        .arg(mode);
    let log = shared.slots.path().with_extension("resolver.log");
    // Tied: the kernel ends it if this (main) thread dies without cleaning up.
    let mut child = ChildGuard::spawn_tied("bench resolver", cmd, &log)?;
    let registered = timeout(Duration::from_secs(10), async {
        loop {
            match state[0].load(Acquire) {
                STATE_REGISTERED => return Ok(()),
                STATE_FAILED => return Err("it could not register".to_owned()),
                _ => {}
            }
            child.check_alive()?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    match registered {
        Ok(Ok(())) => {}
        Ok(Err(err)) => bail!(
            "the bench resolver: {err}; log: {}",
            log_tail(&log, 10, &[])
        ),
        Err(_) => bail!(
            "the bench resolver did not register within 10 s; log: {}",
            log_tail(&log, 10, &[])
        ),
    }
    Ok(tokio::spawn(async move {
        cancel.cancelled().await;
        // SIGTERM: it drains and exits; the guard waits for it (bounded).
        let _ = tokio::task::spawn_blocking(move || {
            child.signal(libc::SIGTERM);
            if child
                .wait_exit(Duration::from_secs(5))
                .is_some_and(|s| s.success())
            {
                let _ = std::fs::remove_file(&log);
            }
        })
        .await;
    }))
}

/// Index of the resolver's state after its counters.
const SLOT_STATE_OFFSET: usize = RESOLVER_SLOTS;
const STATE_STARTING: u64 = 0;
const STATE_REGISTERED: u64 = 1;
const STATE_FAILED: u64 = 2;

/// What the resolver process is told on its command line.
pub struct ResolverArgs {
    pub grpc_url: String,
    pub slots: std::path::PathBuf,
    pub keys: usize,
    pub pad: usize,
    pub fetch_mode: FetchMode,
}

/// The resolver process: serves until SIGTERM (then drains), on one thread.
pub async fn resolver_process(args: ResolverArgs) -> anyhow::Result<()> {
    let slots = Arc::new(Slots::open(&args.slots, slot_count(args.keys))?);
    let keys = args.keys;
    let pad: Arc<str> = Arc::from("x".repeat(args.pad));
    let handler = {
        let slots = slots.clone();
        move |request: ResolveRequest| {
            let (slots, pad) = (slots.clone(), pad.clone());
            async move {
                let counters = &slots[keys..];
                let ids = request.ids().len() as u64;
                match request.reason() {
                    Reason::Change => {
                        counters[SLOT_CHANGE_REQUESTS].fetch_add(1, Relaxed);
                        counters[SLOT_CHANGE_IDS].fetch_add(ids, Relaxed);
                    }
                    Reason::Subscribe => {
                        counters[SLOT_SUBSCRIBE_REQUESTS].fetch_add(1, Relaxed);
                        counters[SLOT_SUBSCRIBE_IDS].fetch_add(ids, Relaxed);
                        let per_key = &counters[SHARED_EXTRA..];
                        for id in request.ids() {
                            if let Some(k) = id.parse::<usize>().ok().filter(|&k| k < keys) {
                                per_key[k].fetch_add(1, Relaxed);
                            }
                        }
                    }
                    _ => {}
                }
                request
                    .ids()
                    .iter()
                    .map(|id| {
                        let answer = match row_of(&slots[..keys], &pad, id) {
                            Some(row) => Answer::json_rows([row]),
                            None => Answer::not_found(),
                        };
                        (id.clone(), answer)
                    })
                    .collect::<Answers>()
            }
        }
    };
    let backend = Backend::builder(args.grpc_url)
        .name("entity-sync-bench")
        .entity(ENTITY, args.fetch_mode, handler)
        .max_in_flight(MAX_IN_FLIGHT)
        .build()?;
    let mut state = backend.state();
    let report = {
        let slots = slots.clone();
        tokio::spawn(async move {
            let slot = &slots[keys + SLOT_STATE_OFFSET];
            loop {
                match &*state.borrow_and_update() {
                    BackendState::Registered { .. } => slot.store(STATE_REGISTERED, Release),
                    BackendState::Disconnected { error } => {
                        eprintln!("bench resolver: {error}");
                    }
                    _ => {}
                }
                if state.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let served = backend
        .serve(async move {
            term.recv().await;
        })
        .await;
    report.abort();
    if let Err(err) = served {
        slots[keys + SLOT_STATE_OFFSET].store(STATE_FAILED, Release);
        bail!("bench resolver: {err}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Notifier
// ---------------------------------------------------------------------------

/// What sending the updates did.
#[derive(Debug, Default)]
pub struct DriveOutcome {
    pub first_ns: u64,
    pub last_ns: u64,
    pub sent: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

pub fn key_of(id: u32) -> Key {
    Key::from((ENTITY, id))
}

/// A notifier of `grpc_url` as the bench uses it: one attempt per call and
/// no idempotency key, so the node's notify path is what is measured.
pub async fn notifier(grpc_url: &str) -> anyhow::Result<Notifier> {
    Ok(Notifier::builder(grpc_url)
        .retry_for(Duration::ZERO)
        .idempotency_keys(false)
        .connect()
        .await?)
}

pub async fn notify_one(notifier: &Notifier, keys: Vec<Key>) -> Result<(), String> {
    notifier
        .notify(keys)
        .await
        .map(|_| ())
        .map_err(|err| format!("Notify: {err}"))
}

/// Notifies every key of `seq` in order: at max rate with `concurrency`
/// callers sending `batch` keys per call, or paced at `rate` updates/s on an absolute schedule (a late
/// scheduler catches up; calls overlap, up to [`PACED_IN_FLIGHT`]). Each key's
/// version is bumped (and its send time recorded) just before its call.
pub async fn drive_updates(
    shared: Arc<Shared>,
    clients: Vec<Notifier>,
    seq: Arc<Vec<u32>>,
    rate: Option<f64>,
    concurrency: usize,
    batch: usize,
    deadline: Instant,
) -> DriveOutcome {
    let first_ns = shared.now_ns();
    let errors = Arc::new(ErrorTally::default());
    let mut calls: JoinSet<()> = JoinSet::new();
    match rate {
        None => {
            let cursor = Arc::new(AtomicUsize::new(0));
            for w in 0..concurrency.max(1) {
                let client = clients[w % clients.len()].clone();
                let (shared, seq, cursor, errors) =
                    (shared.clone(), seq.clone(), cursor.clone(), errors.clone());
                calls.spawn(async move {
                    loop {
                        let i = cursor.fetch_add(batch, Relaxed);
                        if i >= seq.len() || Instant::now() >= deadline {
                            return;
                        }
                        let keys = &seq[i..(i + batch).min(seq.len())];
                        let now = shared.now_ns();
                        for &key in keys {
                            let v = shared.versions()[key as usize].fetch_add(1, AcqRel) + 1;
                            if let Some(slot) = shared.sent_slot(key, v) {
                                slot.store(now, Release);
                            }
                        }
                        let request = keys.iter().map(|&k| key_of(k)).collect();
                        errors.record(notify_one(&client, request).await);
                    }
                });
            }
        }
        Some(rate) => {
            let t0 = Instant::now();
            for (i, &key) in seq.iter().enumerate() {
                let at = t0 + Duration::from_secs_f64(i as f64 / rate);
                if at >= deadline {
                    break;
                }
                sleep_until(at).await;
                shared.bump(key);
                let client = clients[i % clients.len()].clone();
                let errors = errors.clone();
                calls.spawn(async move {
                    errors.record(notify_one(&client, vec![key_of(key)]).await);
                });
                while calls.len() >= PACED_IN_FLIGHT {
                    calls.join_next().await;
                }
                while calls.try_join_next().is_some() {}
            }
        }
    }
    while calls.join_next().await.is_some() {}
    DriveOutcome {
        first_ns,
        last_ns: shared.now_ns(),
        // Every update bumps one version once, whether or not its call succeeded.
        sent: shared.versions().iter().map(|v| v.load(Acquire)).sum(),
        errors: errors.count.load(Acquire),
        first_error: errors.first.lock().expect("lock").clone(),
    }
}

/// Failed calls: how many, and the first one's message.
#[derive(Default)]
struct ErrorTally {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl ErrorTally {
    fn record(&self, result: Result<(), String>) {
        if let Err(err) = result {
            self.count.fetch_add(1, AcqRel);
            self.first.lock().expect("lock").get_or_insert(err);
        }
    }
}

/// Result of one Notify throughput measurement.
#[derive(Debug, Default)]
pub struct NotifyOutcome {
    pub calls: u64,
    pub keys: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub call_latencies_us: Vec<u64>,
}

/// `calls` Notify calls of `batch` random keys each (ids `0..keys`), by
/// `concurrency` callers, stopping early at `deadline`. Each key's version is
/// bumped before its call, so the rows a subscriber is pushed change.
#[allow(clippy::too_many_arguments)]
pub async fn notify_throughput(
    shared: &Arc<Shared>,
    clients: &[Notifier],
    keys: u32,
    batch: usize,
    concurrency: usize,
    calls: u64,
    seed: u64,
    deadline: Instant,
) -> NotifyOutcome {
    let cursor = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for w in 0..concurrency.max(1) {
        let client = clients[w % clients.len()].clone();
        let cursor = cursor.clone();
        let shared = shared.clone();
        let mut rng = fastrand::Rng::with_seed(seed ^ (w as u64 + 1).wrapping_mul(0x9E37));
        workers.spawn(async move {
            let mut out = NotifyOutcome::default();
            while cursor.fetch_add(1, Relaxed) < calls && Instant::now() < deadline {
                let request: Vec<Key> = (0..batch)
                    .map(|_| {
                        let key = rng.u32(..keys);
                        shared.touch(key);
                        key_of(key)
                    })
                    .collect();
                let t = Instant::now();
                match notify_one(&client, request).await {
                    Ok(()) => {
                        out.calls += 1;
                        out.keys += batch as u64;
                        out.call_latencies_us.push(t.elapsed().as_micros() as u64);
                    }
                    Err(err) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(err);
                    }
                }
            }
            out
        });
    }
    let mut total = NotifyOutcome::default();
    while let Some(Ok(out)) = workers.join_next().await {
        total.calls += out.calls;
        total.keys += out.keys;
        total.errors += out.errors;
        if total.first_error.is_none() {
            total.first_error = out.first_error;
        }
        total.call_latencies_us.extend(out.call_latencies_us);
    }
    total.elapsed = started.elapsed();
    total
}

// ---------------------------------------------------------------------------
// Websocket clients
// ---------------------------------------------------------------------------

/// One websocket client of the run.
pub struct ClientSpec {
    pub url: Arc<str>,
    /// Source address: spreading clients over 127.0.0.1..N gives each
    /// address its own ephemeral port range.
    pub src: Ipv4Addr,
    pub keys: Vec<u32>,
    pub secret: Option<String>,
    /// Small buffers for the idle scenario, where only the node's memory matters.
    pub idle: bool,
}

/// What a client saw.
#[derive(Debug, Default)]
pub struct ClientOutcome {
    pub subscribed: bool,
    /// Push frames received after its subscriptions were set up.
    pub deliveries: u64,
    pub last_delivery_ns: u64,
    pub latencies_us: Vec<u64>,
    /// Whether every key reached its final version.
    pub reached_all: bool,
    /// How the connection ended before it was told to stop, if it did.
    pub error: Option<String>,
}

/// What a run's clients received together: pushes, seconds from the first
/// update sent (`first_ns`) to the last push received, and every latency
/// (taken out of the outcomes).
pub fn delivery_totals(outcomes: &mut [ClientOutcome], first_ns: u64) -> (u64, f64, Vec<u64>) {
    let deliveries = outcomes.iter().map(|o| o.deliveries).sum();
    let last = outcomes
        .iter()
        .map(|o| o.last_delivery_ns)
        .max()
        .unwrap_or(0);
    let span_s = last.saturating_sub(first_ns) as f64 / 1e9;
    let latencies = outcomes
        .iter_mut()
        .flat_map(|o| std::mem::take(&mut o.latencies_us))
        .collect();
    (deliveries, span_s, latencies)
}

/// Connects, subscribes to every key (waiting for `subscribed` and the
/// snapshot of each), then counts pushes until `cancel`. The setup holds a
/// `setup` permit and gives up after `setup_timeout`; with `stop` set, a
/// client that has not started connecting gives up at once (idle ramp).
pub async fn run_client(
    spec: ClientSpec,
    shared: Arc<Shared>,
    setup: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
    setup_timeout: Duration,
    cancel: CancellationToken,
) -> ClientOutcome {
    let mut outcome = ClientOutcome::default();
    let ws = {
        let Ok(_permit) = setup.acquire().await else {
            return outcome;
        };
        if stop.load(Acquire) {
            shared.failed.fetch_add(1, AcqRel);
            return outcome;
        }
        match timeout(setup_timeout, connect_and_subscribe(&spec)).await {
            Ok(Ok(ws)) => ws,
            failed => {
                let err = match failed {
                    Ok(Err(err)) => format!("{err:#}"),
                    _ => format!("setup took longer than {setup_timeout:?}"),
                };
                stop.store(true, Release);
                shared.note_error(err);
                shared.failed.fetch_add(1, AcqRel);
                return outcome;
            }
        }
    };
    outcome.subscribed = true;
    let targets: Vec<u64> = spec
        .keys
        .iter()
        .map(|&k| shared.finals[k as usize])
        .collect();
    let mut last_v = vec![0u64; spec.keys.len()];
    let mut reached: Vec<bool> = targets.iter().map(|&t| t == 0).collect();
    let unreached = reached.iter().filter(|r| !**r).count();
    // Count this client's pairs in before saying it is ready: the run starts
    // notifying only once every client is ready, so the total is complete.
    shared.pending.fetch_add(unreached, AcqRel);
    shared.ready.fetch_add(1, AcqRel);

    let mut stream = ws;
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            msg = stream.next() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                outcome.error = Some(format!("closed by the node: {frame:?}"));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => {
                outcome.error = Some(format!("websocket: {err}"));
                break;
            }
            None => {
                outcome.error = Some("connection ended".into());
                break;
            }
        };
        let Some(push) = scan_push(text.as_str()) else {
            continue;
        };
        let now = shared.now_ns();
        shared.delivered.fetch_add(1, Relaxed);
        outcome.deliveries += 1;
        outcome.last_delivery_ns = now;
        let (Some(v), Ok(key)) = (push.v, push.id.parse::<u32>()) else {
            continue;
        };
        let Some(slot) = spec.keys.iter().position(|&k| k == key) else {
            continue;
        };
        if v <= last_v[slot] {
            continue;
        }
        last_v[slot] = v;
        if shared.record_latency
            && let Some(sent) = shared.sent_slot(key, v)
        {
            let sent = sent.load(Acquire);
            if sent > 0 && now > sent {
                outcome.latencies_us.push((now - sent) / 1000);
            }
        }
        if !reached[slot] && v >= targets[slot] {
            reached[slot] = true;
            if shared.pending.fetch_sub(1, AcqRel) == 1 {
                shared.converged_ns.store(now, Release);
                shared.converged.notify_one();
            }
        }
    }
    outcome.reached_all = reached.iter().all(|&r| r);
    outcome
}

/// Subscribes a throwaway client to key 0 until it succeeds or `deadline`
/// passes: on a node with no local resolver this proves a remote one is
/// reachable over NATS (the serving node subscribes to the cluster-resolve
/// subject only after it answered `Registered`). Returns the attempts made.
pub async fn probe_subscribe(url: Arc<str>, deadline: Instant) -> anyhow::Result<u32> {
    let spec = ClientSpec {
        url: url.clone(),
        src: Ipv4Addr::LOCALHOST,
        keys: vec![0],
        secret: None,
        idle: true,
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let err = match timeout(SETUP_PROBE, connect_and_subscribe(&spec)).await {
            Ok(Ok(mut ws)) => {
                let _ = ws.close(None).await;
                return Ok(attempts);
            }
            Ok(Err(err)) => err,
            Err(_) => anyhow!("subscribe probe timed out"),
        };
        if Instant::now() >= deadline {
            return Err(err.context(format!("subscribe probe of {url} ({attempts} attempts)")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One attempt of [`probe_subscribe`].
const SETUP_PROBE: Duration = Duration::from_secs(5);

async fn connect_and_subscribe(spec: &ClientSpec) -> anyhow::Result<Ws> {
    // tungstenite zero-fills its read buffer up to this size before every
    // read: a large one costs the generator a memset per frame (seen in perf).
    let options = ConnectOptions {
        source: Some(spec.src),
        recv_buffer: None,
        read_buffer: Some(if spec.idle { 1024 } else { 4096 }),
    };
    let mut ws = connect(&spec.url, &options)
        .await
        .map_err(|err| anyhow!(err))?;
    if let Some(secret) = &spec.secret {
        ws.feed(Message::text(format!(
            r#"{{"action":"secret","body":"{secret}"}}"#
        )))
        .await?;
    }
    for key in &spec.keys {
        ws.feed(Message::text(format!(
            r#"{{"action":"subscribe","body":{{"entity":"{ENTITY}","id":"{key}"}}}}"#
        )))
        .await?;
    }
    ws.flush().await?;
    let (mut acks, mut snapshots) = (0, 0);
    while acks < spec.keys.len() || snapshots < spec.keys.len() {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => bail!("closed while subscribing: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(anyhow!(err).context("while subscribing")),
            None => bail!("connection ended while subscribing"),
        };
        let text = text.as_str();
        if text.starts_with(r#"{"action":"subscribed""#) {
            acks += 1;
        } else if text.starts_with(r#"{"action":"push""#) {
            snapshots += 1;
        } else {
            bail!("unexpected frame while subscribing: {text}");
        }
    }
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_about_200_bytes_and_carry_the_version() {
        let shared = Shared::new(1000, &[17; 300], false).unwrap();
        shared.versions()[17].store(123, Release);
        let row = shared.row("17").expect("row");
        let text = row.as_str();
        assert!(
            text.starts_with(r#"{"id":"17","v":123,"pad":"xx"#),
            "{text}"
        );
        assert!((190..=210).contains(&row.len()), "{}", row.len());
        let value: serde_json::Value = serde_json::from_str(&row).expect("valid JSON");
        assert_eq!(value["v"], 123);
        assert!(shared.row("1000").is_none() && shared.row("x").is_none());
    }

    #[test]
    fn send_times_are_indexed_per_key_and_version() {
        let shared = Shared::new(3, &[0, 2, 2], false).unwrap();
        assert!(shared.sent_slot(0, 0).is_none());
        assert!(shared.sent_slot(0, 1).is_some());
        assert!(shared.sent_slot(0, 2).is_none());
        assert!(shared.sent_slot(1, 1).is_none());
        shared.sent_slot(2, 2).expect("slot").store(5, Release);
        assert_eq!(shared.sent_ns[2].load(Acquire), 5);
    }
}
