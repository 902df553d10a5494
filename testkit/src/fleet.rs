//! A fleet of websocket clients that behave like the browser client
//! (clients/js): each reconnects with jittered exponential backoff (to the
//! next node of its list, as a load balancer would send it), subscribes again
//! to every key it holds, takes the snapshot answering each subscribe as
//! current, drops a push whose version is lower than the one held, and
//! subscribes again after a backoff when the node answers a retryable error
//! (`no_resolver`, `resolver_error`, `resolver_timeout`).
//!
//! The fleet counts what a user would notice: duplicates (a push of the
//! version already held), stale pushes (lower than the held version, after a
//! newer one), close codes, connections that ended without a close frame,
//! error frames; and compares every client's rows with an expected state
//! ([`Fleet::mismatches`], [`Fleet::wait_converged`]).
//!
//! Every client is one task; all stop on [`Fleet::stop`] (closing their
//! sockets with a close frame) or are aborted when the fleet is dropped.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    sync::watch,
    task::JoinSet,
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_tungstenite::tungstenite::Message;

use entity_sync_backend::Backoff;

use crate::ws::{ConnectOptions, Ws, connect};

/// A subscribed key: `(entity, id)`.
pub type Key = (String, String);

/// Error codes after which the browser client subscribes again by itself.
const RETRYABLE: [&str; 3] = ["no_resolver", "resolver_error", "resolver_timeout"];

/// A session that lasted this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(1);

/// How the fleet's clients connect and behave.
#[derive(Clone)]
pub struct FleetConfig {
    /// Websocket URLs of the nodes, `ws://127.0.0.1:PORT/path`.
    pub urls: Vec<String>,
    /// Per client: the index in `urls` it connects to first.
    pub placement: Vec<usize>,
    /// Per client: the keys it subscribes to.
    pub keys: Vec<Vec<Key>>,
    /// Floor and ceiling of the reconnect (and resubscribe) backoff.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// The client's websocket read buffer (small keeps thousands cheap).
    pub read_buffer: usize,
    /// Clients connect in waves of this many at the start.
    pub wave: usize,
    /// Where the notify times of versions are, to measure push latency.
    pub clock: Option<LatencyClock>,
}

impl FleetConfig {
    /// `clients` clients placed round-robin on `urls`, client `i` holding
    /// `per_client` of `keys` (consecutive, starting at `i * per_client`,
    /// wrapping), with browser-like defaults.
    pub fn spread(urls: Vec<String>, clients: usize, keys: &[Key], per_client: usize) -> Self {
        let n = urls.len().max(1);
        FleetConfig {
            placement: (0..clients).map(|i| i % n).collect(),
            keys: (0..clients)
                .map(|i| {
                    (0..per_client)
                        .map(|k| keys[(i * per_client + k) % keys.len()].clone())
                        .collect()
                })
                .collect(),
            urls,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            read_buffer: 4096,
            wave: 200,
            clock: None,
        }
    }

    /// Every client starts on `urls[index]`.
    pub fn all_on(mut self, index: usize) -> Self {
        self.placement.iter_mut().for_each(|p| *p = index);
        self
    }

    /// Push latencies are measured against `clock`.
    pub fn clock(mut self, clock: LatencyClock) -> Self {
        self.clock = Some(clock);
        self
    }
}

/// When each change (by its bus sequence) was notified: the load generator
/// records, the clients look up, so that a push's latency is measured from
/// the notify that caused it.
///
/// The sequence is known only once `Notify` answered, and a push can beat
/// that answer: such a push is kept as early and timed when its sequence is
/// recorded, so fast pushes are not left out of the figures.
#[derive(Clone, Default)]
pub struct LatencyClock {
    // std Mutexes: one insert or lookup at a time, never held across `.await`.
    sent: Arc<Mutex<HashMap<u64, Instant>>>,
    /// Pushes received before their sequence was recorded: (sequence, when).
    early: Arc<Mutex<Vec<(u64, Instant)>>>,
}

impl LatencyClock {
    /// Change `sequence` was notified at `at` (the call's start).
    pub fn record(&self, sequence: u64, at: Instant) {
        self.sent.lock().unwrap().insert(sequence, at);
    }

    /// The latency of a push of `sequence` received now, if the change was
    /// recorded; else it is kept as early.
    fn received(&self, sequence: u64) -> Option<Duration> {
        let now = Instant::now();
        if let Some(sent) = self.sent.lock().unwrap().get(&sequence) {
            return Some(now.saturating_duration_since(*sent));
        }
        self.early.lock().unwrap().push((sequence, now));
        None
    }

    /// The latencies of the early pushes whose sequence is recorded by now
    /// (the others were not caused by this clock's notifies).
    fn take_early(&self) -> Vec<Duration> {
        let early = std::mem::take(&mut *self.early.lock().unwrap());
        let sent = self.sent.lock().unwrap();
        early
            .into_iter()
            .filter_map(|(seq, at)| sent.get(&seq).map(|s| at.saturating_duration_since(*s)))
            .collect()
    }
}

/// What the fleet's clients saw, summed over all of them.
#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    snapshots: AtomicU64,
    pushes: AtomicU64,
    duplicates: AtomicU64,
    stale: AtomicU64,
    closes_going_away: AtomicU64,
    closes_slow_client: AtomicU64,
    closes_other: AtomicU64,
    abnormal_ends: AtomicU64,
    error_frames: AtomicU64,
    resubscribes: AtomicU64,
}

/// A copy of the fleet's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetStats {
    /// Websocket handshakes that succeeded.
    pub connects: u64,
    /// Connection attempts that failed (refused, timed out, handshake refused).
    pub connect_failures: u64,
    /// Snapshots taken (one per subscribe answered OK).
    pub snapshots: u64,
    /// Change pushes applied (snapshots not included).
    pub pushes: u64,
    /// Change pushes of the very version already held.
    pub duplicates: u64,
    /// Change pushes older than the version held (dropped).
    pub stale: u64,
    /// Connections the node closed with 1001 (going away).
    pub closes_going_away: u64,
    /// Connections the node closed with 1008 (slow client).
    pub closes_slow_client: u64,
    /// Connections closed with another code.
    pub closes_other: u64,
    /// Connections that ended without a close frame (reset, EOF, error).
    pub abnormal_ends: u64,
    /// Error frames received.
    pub error_frames: u64,
    /// Subscribes sent again after a retryable error frame.
    pub resubscribes: u64,
}

impl FleetStats {
    /// `self - earlier`, counter by counter.
    pub fn since(&self, earlier: &FleetStats) -> FleetStats {
        FleetStats {
            connects: self.connects - earlier.connects,
            connect_failures: self.connect_failures - earlier.connect_failures,
            snapshots: self.snapshots - earlier.snapshots,
            pushes: self.pushes - earlier.pushes,
            duplicates: self.duplicates - earlier.duplicates,
            stale: self.stale - earlier.stale,
            closes_going_away: self.closes_going_away - earlier.closes_going_away,
            closes_slow_client: self.closes_slow_client - earlier.closes_slow_client,
            closes_other: self.closes_other - earlier.closes_other,
            abnormal_ends: self.abnormal_ends - earlier.abnormal_ends,
            error_frames: self.error_frames - earlier.error_frames,
            resubscribes: self.resubscribes - earlier.resubscribes,
        }
    }
}

/// The rows and version a client holds for one key.
#[derive(Debug, Clone, Default)]
struct Held {
    rows: Option<Value>,
    version: u64,
    /// Subscribed (again) and its snapshot not in yet.
    awaiting_snapshot: bool,
}

/// One client's state, shared between its task and the fleet.
#[derive(Default)]
struct ClientState {
    /// Index in the URL list of the node it is connected to, if connected.
    connected_to: Option<usize>,
    held: HashMap<Key, Held>,
}

/// What every client shares.
struct Shared {
    counters: Counters,
    /// Push latencies in microseconds (std Mutex: one push at a time).
    latencies: Mutex<Vec<u64>>,
}

/// A fleet of browser-like websocket clients.
pub struct Fleet {
    config: FleetConfig,
    clients: Vec<Arc<Mutex<ClientState>>>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts every client (connecting in waves); returns at once.
    pub fn start(config: FleetConfig) -> Fleet {
        assert_eq!(config.placement.len(), config.keys.len());
        assert!(!config.urls.is_empty(), "a fleet needs a node");
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            latencies: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut clients = Vec::with_capacity(config.keys.len());
        let config_arc = Arc::new(config.clone());
        for (i, keys) in config.keys.iter().enumerate() {
            let state = Arc::new(Mutex::new(ClientState {
                connected_to: None,
                held: keys.iter().map(|k| (k.clone(), Held::default())).collect(),
            }));
            clients.push(state.clone());
            // Waves: client i waits (i / wave) * 50 ms before its first connect.
            let delay = Duration::from_millis(50 * (i / config.wave.max(1)) as u64);
            tasks.spawn(run_client(
                i,
                config_arc.clone(),
                state,
                shared.clone(),
                stopped.clone(),
                delay,
            ));
        }
        Fleet {
            config,
            clients,
            shared,
            stop,
            tasks,
        }
    }

    /// How many clients there are.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether the fleet has no clients.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The counters so far.
    pub fn stats(&self) -> FleetStats {
        let c = &self.shared.counters;
        FleetStats {
            connects: c.connects.load(Relaxed),
            connect_failures: c.connect_failures.load(Relaxed),
            snapshots: c.snapshots.load(Relaxed),
            pushes: c.pushes.load(Relaxed),
            duplicates: c.duplicates.load(Relaxed),
            stale: c.stale.load(Relaxed),
            closes_going_away: c.closes_going_away.load(Relaxed),
            closes_slow_client: c.closes_slow_client.load(Relaxed),
            closes_other: c.closes_other.load(Relaxed),
            abnormal_ends: c.abnormal_ends.load(Relaxed),
            error_frames: c.error_frames.load(Relaxed),
            resubscribes: c.resubscribes.load(Relaxed),
        }
    }

    /// How many clients are connected to `urls[index]` right now.
    pub fn connected_to(&self, index: usize) -> usize {
        self.clients
            .iter()
            .filter(|c| c.lock().unwrap().connected_to == Some(index))
            .count()
    }

    /// How many clients are connected and hold a snapshot (or newer) of
    /// every one of their keys.
    pub fn ready(&self) -> usize {
        self.clients
            .iter()
            .filter(|c| {
                let c = c.lock().unwrap();
                c.connected_to.is_some()
                    && c.held
                        .values()
                        .all(|h| h.rows.is_some() && !h.awaiting_snapshot)
            })
            .count()
    }

    /// Polls until every client is [`ready`](Self::ready); the time it took,
    /// or the number still not ready at `wait`.
    pub async fn wait_ready(&self, wait: Duration) -> Result<Duration, usize> {
        let started = Instant::now();
        loop {
            let ready = self.ready();
            if ready == self.len() {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= wait {
                return Err(self.len() - ready);
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Client-keys whose rows differ from `expected` (a key missing from
    /// `expected` counts as a mismatch), summed over all clients.
    pub fn mismatches(&self, expected: &HashMap<Key, Value>) -> usize {
        self.clients
            .iter()
            .map(|c| {
                let c = c.lock().unwrap();
                c.held
                    .iter()
                    .filter(|(key, held)| match (&held.rows, expected.get(*key)) {
                        (Some(rows), Some(want)) => rows != want,
                        _ => true,
                    })
                    .count()
            })
            .sum()
    }

    /// Polls until no client-key differs from `expected`: the time it took,
    /// or the mismatches left at `wait`.
    pub async fn wait_converged(
        &self,
        expected: &HashMap<Key, Value>,
        wait: Duration,
    ) -> Result<Duration, usize> {
        let started = Instant::now();
        loop {
            let left = self.mismatches(expected);
            if left == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= wait {
                return Err(left);
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// The push latencies measured since the last call (µs), sorted.
    pub fn take_latencies(&self) -> Vec<u64> {
        let mut samples = std::mem::take(&mut *self.shared.latencies.lock().unwrap());
        if let Some(clock) = &self.config.clock {
            samples.extend(clock.take_early().iter().map(|d| d.as_micros() as u64));
        }
        samples.sort_unstable();
        samples
    }

    /// The URLs the clients use.
    pub fn urls(&self) -> &[String] {
        &self.config.urls
    }

    /// Stops every client: each closes its socket with a close frame (or is
    /// aborted after `wait`).
    pub async fn stop(mut self, wait: Duration) {
        let _ = self.stop.send(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if timeout(wait, all).await.is_err() {
            self.tasks.abort_all();
        }
    }
}

/// How a session ended.
enum End {
    Stopped,
    Closed(u16),
    Abnormal,
}

async fn run_client(
    index: usize,
    config: Arc<FleetConfig>,
    state: Arc<Mutex<ClientState>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    first_delay: Duration,
) {
    let counters = &shared.counters;
    let options = ConnectOptions {
        read_buffer: Some(config.read_buffer),
        ..ConnectOptions::default()
    };
    let mut url_index = config.placement[index] % config.urls.len();
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    let mut delay = first_delay;
    loop {
        tokio::select! {
            () = sleep(delay) => {}
            () = stopped(&mut stop) => return,
        }
        let url = &config.urls[url_index];
        let ws = tokio::select! {
            ws = timeout(config.connect_timeout, connect(url, &options)) => ws,
            () = stopped(&mut stop) => return,
        };
        let ws = match ws {
            Ok(Ok(ws)) => ws,
            _ => {
                counters.connect_failures.fetch_add(1, Relaxed);
                delay = backoff.next_delay();
                url_index = (url_index + 1) % config.urls.len();
                continue;
            }
        };
        counters.connects.fetch_add(1, Relaxed);
        let started = Instant::now();
        state.lock().unwrap().connected_to = Some(url_index);
        let end = session(ws, &config, &state, &shared, &mut stop).await;
        state.lock().unwrap().connected_to = None;
        match end {
            End::Stopped => return,
            End::Closed(1001) => counters.closes_going_away.fetch_add(1, Relaxed),
            End::Closed(1008) => counters.closes_slow_client.fetch_add(1, Relaxed),
            End::Closed(_) => counters.closes_other.fetch_add(1, Relaxed),
            End::Abnormal => counters.abnormal_ends.fetch_add(1, Relaxed),
        };
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        delay = backoff.next_delay();
        // The load balancer sends the next connection elsewhere.
        url_index = (url_index + 1) % config.urls.len();
    }
}

/// Resolves once the fleet is told to stop (the watch's guard is dropped
/// inside, so a task holding this future stays `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn subscribe_frame(key: &Key) -> Message {
    Message::text(
        json!({"action": "subscribe", "body": {"entity": key.0, "id": key.1}}).to_string(),
    )
}

/// One connection: subscribes to every held key, then applies frames until
/// the socket ends or the fleet stops.
async fn session(
    mut ws: Ws,
    config: &FleetConfig,
    state: &Mutex<ClientState>,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let counters = &shared.counters;
    let keys: Vec<Key> = {
        let mut st = state.lock().unwrap();
        st.held
            .values_mut()
            .for_each(|held| held.awaiting_snapshot = true);
        st.held.keys().cloned().collect()
    };
    for key in &keys {
        if ws.feed(subscribe_frame(key)).await.is_err() {
            return End::Abnormal;
        }
    }
    if ws.flush().await.is_err() {
        return End::Abnormal;
    }
    // Keys to subscribe again after a retryable error: (when, key).
    let mut retries: Vec<(Instant, Key)> = Vec::new();
    let mut backoffs: HashMap<Key, Backoff> = HashMap::new();
    loop {
        let next_retry = retries.iter().map(|r| r.0).min();
        let retry_due = async {
            match next_retry {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stopped(stop) => {
                let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
                return End::Stopped;
            }
            () = retry_due => {
                let now = Instant::now();
                let due: Vec<Key> = retries
                    .iter()
                    .filter(|r| r.0 <= now)
                    .map(|r| r.1.clone())
                    .collect();
                retries.retain(|r| r.0 > now);
                for key in due {
                    counters.resubscribes.fetch_add(1, Relaxed);
                    if let Some(held) = state.lock().unwrap().held.get_mut(&key) {
                        held.awaiting_snapshot = true;
                    }
                    if ws.send(subscribe_frame(&key)).await.is_err() {
                        return End::Abnormal;
                    }
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if let Some((key, code)) = apply(&frame, config, state, shared)
                        && RETRYABLE.contains(&code.as_str())
                    {
                        let backoff = backoffs
                            .entry(key.clone())
                            .or_insert_with(|| Backoff::new(config.backoff_min, config.backoff_max));
                        let at = Instant::now() + backoff.next_delay();
                        retries.push((at, key));
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(frame) => End::Closed(u16::from(frame.code)),
                        None => End::Closed(1005),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return End::Abnormal,
            }
        }
    }
}

/// Applies one frame to the client's state, like the browser client; an
/// error frame for a key returns that key and its code.
fn apply(
    frame: &Value,
    config: &FleetConfig,
    state: &Mutex<ClientState>,
    shared: &Shared,
) -> Option<(Key, String)> {
    let counters = &shared.counters;
    let body = &frame["body"];
    let key = || -> Option<Key> {
        let entity = body["entity"].as_str()?;
        let id = match &body["id"] {
            Value::String(id) => id.clone(),
            other => other.to_string(),
        };
        Some((entity.to_owned(), id))
    };
    match frame["action"].as_str() {
        Some("push") => {
            let key = key()?;
            let version = body["version"].as_u64().unwrap_or(0);
            let mut st = state.lock().unwrap();
            let held = st.held.get_mut(&key)?;
            if held.awaiting_snapshot {
                // The snapshot answering a subscribe is current by
                // construction: always applied.
                held.awaiting_snapshot = false;
                counters.snapshots.fetch_add(1, Relaxed);
            } else if version < held.version {
                counters.stale.fetch_add(1, Relaxed);
                return None;
            } else {
                if version == held.version {
                    counters.duplicates.fetch_add(1, Relaxed);
                }
                counters.pushes.fetch_add(1, Relaxed);
                if let Some(latency) = config.clock.as_ref().and_then(|c| c.received(version)) {
                    let micros = latency.as_micros() as u64;
                    shared.latencies.lock().unwrap().push(micros);
                }
            }
            held.version = version;
            held.rows = Some(body["rows"].clone());
            None
        }
        Some("error") => {
            counters.error_frames.fetch_add(1, Relaxed);
            let key = key()?;
            let code = body["code"].as_str().unwrap_or("").to_owned();
            let mut st = state.lock().unwrap();
            if let Some(held) = st.held.get_mut(&key) {
                held.awaiting_snapshot = false;
            }
            Some((key, code))
        }
        // `subscribed`, `unsubscribed`, and whatever a newer node adds.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(keys: &[(&str, &str)]) -> (FleetConfig, Mutex<ClientState>, Shared) {
        let keys: Vec<Key> = keys
            .iter()
            .map(|(e, i)| (e.to_string(), i.to_string()))
            .collect();
        let config = FleetConfig::spread(vec!["ws://127.0.0.1:1/".into()], 1, &keys, keys.len());
        let state = Mutex::new(ClientState {
            connected_to: Some(0),
            held: keys.iter().map(|k| (k.clone(), Held::default())).collect(),
        });
        let shared = Shared {
            counters: Counters::default(),
            latencies: Mutex::new(Vec::new()),
        };
        (config, state, shared)
    }

    fn push(id: &str, version: u64, n: u64) -> Value {
        json!({"action": "push", "body": {"entity": "items", "id": id, "version": version, "rows": [{"n": n}]}})
    }

    #[test]
    fn snapshots_apply_stale_pushes_are_dropped_and_counted() {
        let (config, state, shared) = client(&[("items", "1")]);
        let key: Key = ("items".into(), "1".into());
        state
            .lock()
            .unwrap()
            .held
            .get_mut(&key)
            .unwrap()
            .awaiting_snapshot = true;
        apply(&push("1", 10, 1), &config, &state, &shared);
        apply(&push("1", 12, 2), &config, &state, &shared);
        apply(&push("1", 11, 9), &config, &state, &shared); // stale
        apply(&push("1", 12, 2), &config, &state, &shared); // duplicate
        let c = &shared.counters;
        assert_eq!(c.snapshots.load(Relaxed), 1);
        assert_eq!(c.pushes.load(Relaxed), 2);
        assert_eq!(c.stale.load(Relaxed), 1);
        assert_eq!(c.duplicates.load(Relaxed), 1);
        let fleet_expected: HashMap<Key, Value> = [(key.clone(), json!([{"n": 2}]))].into();
        let held = state.lock().unwrap().held[&key].clone();
        assert_eq!(held.version, 12);
        assert_eq!(Some(&held.rows.unwrap()), fleet_expected.get(&key));
        // A snapshot after a reconnect is applied even if its version is lower.
        state
            .lock()
            .unwrap()
            .held
            .get_mut(&key)
            .unwrap()
            .awaiting_snapshot = true;
        apply(&push("1", 5, 3), &config, &state, &shared);
        assert_eq!(state.lock().unwrap().held[&key].version, 5);
        assert_eq!(c.stale.load(Relaxed), 1);
    }

    #[test]
    fn an_error_frame_names_its_key_and_code() {
        let (config, state, shared) = client(&[("items", "1")]);
        let error = json!({"action": "error", "body": {"code": "no_resolver", "message": "m", "entity": "items", "id": "1"}});
        let got = apply(&error, &config, &state, &shared);
        assert_eq!(
            got,
            Some((("items".into(), "1".into()), "no_resolver".into()))
        );
        assert_eq!(shared.counters.error_frames.load(Relaxed), 1);
    }
}
