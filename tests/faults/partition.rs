//! A NATS server cut off from the rest of the cluster while a node stays
//! connected to it (scenario 10): the three servers route to each other only
//! through proxies, and the test cuts every route of one server for 12 s.
//! The node on it keeps its TCP link to its server, so only what it receives
//! (or not) tells it that it is cut off: its `/readyz` must say so within a
//! few seconds, `Notify` through it answers UNAVAILABLE while the nodes on
//! the majority side keep accepting, and after the heal its clients are
//! current soon after the node is ready again for good (its last turn to
//! ready: the healed server may answer for the stream at once and lose it
//! again during the election its return forces).

use std::time::Duration;

use async_nats::jetstream;
use entity_sync_backend::Notifier;
use entity_sync_testkit::{
    NodeProcess,
    fleet::{Fleet, FleetConfig},
    http::http_get,
    nats::NatsCluster,
};
use tokio::time::{Instant, sleep};

use crate::harness::{
    Bed, BedOptions, Figures, Load, LoadReport, RssSampler, SCENARIO_WAIT, item_keys, recovered,
    serial, settle,
};

const CLIENTS: usize = 150;
const RATE: f64 = 100.0;
/// How long the server's routes stay cut.
const CUT_FOR: Duration = Duration::from_secs(12);
/// The node turns not ready within about 2 s of the cut (a probe a second,
/// each with a 1 s deadline); asserted with room for a loaded machine.
const UNREADY_WITHIN: Duration = Duration::from_secs(5);
/// Every subscriber is current about a second after the node is ready again
/// for good; asserted with room for a loaded machine.
const CURRENT_WITHIN: Duration = Duration::from_secs(5);
/// A node on the majority side whose consumer lived on the cut-off server
/// sees it stall (no delivery for two checks, a second apart) and recreates it.
const MAJORITY_READY_WITHIN: Duration = Duration::from_secs(8);
/// The stream the nodes use (`--nats-prefix=faults`).
const STREAM: &str = "faults_changes";

/// Polls `/readyz` of `node` until it answers `(status, body)`; the time it
/// took. Panics after `wait`.
async fn readyz_becomes(node: &NodeProcess, status: u16, body: &str, wait: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = http_get(node.ws, "/readyz").await;
        if got.as_ref().is_ok_and(|(s, b)| *s == status && b == body) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < wait,
            "/readyz never answered {status} {body:?} within {wait:?}; last: {got:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// The stream's leader as `js`'s server sees it, if it answers within 500 ms.
async fn stream_leader(js: &jetstream::Context) -> Option<String> {
    let ask = async {
        let mut stream = js.get_stream(STREAM).await.ok()?;
        let info = stream.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    };
    tokio::time::timeout(Duration::from_millis(500), ask)
        .await
        .ok()
        .flatten()
}

/// Polls until the stream has a leader that answers through `js`; the time
/// it took. Panics after `wait`.
async fn leader_answers(js: &jetstream::Context, wait: Duration) -> (Duration, String) {
    let started = Instant::now();
    loop {
        if let Some(leader) = stream_leader(js).await {
            return (started.elapsed(), leader);
        }
        assert!(
            started.elapsed() < wait,
            "the stream never answered within {wait:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// Watches `/readyz` of a node (every 20 ms) from now until stopped: the
/// times, since the start, at which it turned ready (200) after not being
/// ready (or at the first look).
struct ReadyEdges {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<Duration>>,
}

impl ReadyEdges {
    fn watch(node: &NodeProcess) -> ReadyEdges {
        let addr = node.ws;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let (mut edges, mut ready) = (Vec::new(), false);
            loop {
                let now_ready = http_get(addr, "/readyz")
                    .await
                    .is_ok_and(|(status, _)| status == 200);
                if now_ready && !ready {
                    edges.push(started.elapsed());
                }
                ready = now_ready;
                tokio::select! {
                    _ = &mut stopped => return edges,
                    () = sleep(Duration::from_millis(20)) => {}
                }
            }
        });
        ReadyEdges { stop, task }
    }

    async fn stop(self) -> Vec<Duration> {
        let _ = self.stop.send(());
        self.task.await.expect("readiness watch")
    }
}

/// A notifier of node `grpc` that does not retry.
fn one_shot(grpc: &str) -> Notifier {
    Notifier::builder(grpc)
        .retry_for(Duration::ZERO)
        .call_timeout(Duration::from_secs(8))
        .connect_lazy()
        .expect("notifier")
}

fn sum(a: LoadReport, b: LoadReport) -> LoadReport {
    LoadReport {
        accepted: a.accepted + b.accepted,
        failed: a.failed + b.failed,
        retried: a.retried + b.retried,
        duplicates: a.duplicates + b.duplicates,
        unfinished: a.unfinished + b.unfinished,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_nats_server_is_cut_off_says_so_and_catches_up_after_the_heal() {
    let _turn = serial().await;
    let nats = NatsCluster::start_with_route_proxies(3).await;
    // Each node on its own server, and on that one only (the servers
    // advertise no other client URL).
    let urls = (0..nats.len()).map(|i| nats.url(i)).collect();
    let bed = Bed::start_on(
        nats,
        BedOptions {
            nats_urls: Some(urls),
            ..BedOptions::default()
        },
    )
    .await;
    let keys = item_keys(60);
    bed.rows.seed(&keys);
    let rss = RssSampler::start(bed.pids());
    let fleet = Fleet::start(FleetConfig::spread(bed.ws_urls(), CLIENTS, &keys, 2));
    recovered(&fleet, "first connect").await;

    // The server cut off is one that does not lead the stream (a leader cut
    // off answers from its own server until it notices it lost its quorum,
    // which the node tells from the replicas it reports; here the case of a
    // follower's node, whose stream stops answering).
    let probe = |i: usize| {
        let url = bed.nats.url(i);
        async move { jetstream::new(async_nats::connect(url).await.expect("connect")) }
    };
    let (_, leader) = leader_answers(&probe(0).await, SCENARIO_WAIT).await;
    let cut = (0..bed.nats.len())
        .find(|&i| bed.nats.name(i) != leader)
        .expect("a follower");
    let others: Vec<usize> = (0..bed.nodes.len()).filter(|&i| i != cut).collect();
    let cut_js = probe(cut).await;
    let node = &bed.nodes[cut];

    // Notifies go through the majority side's nodes; the cut node's clients
    // depend on it consuming what they publish.
    let before = fleet.stats();
    let load = Load::start(
        &bed.rows,
        others.iter().map(|&i| bed.notifier(i)).collect(),
        &keys,
        RATE,
        None,
    );
    load.wait_accepted(150, SCENARIO_WAIT).await;
    assert_eq!(node.metric("entity_sync_bus_available").await, Ok(1.0));

    bed.nats.cut_routes(cut);
    let cut_at = Instant::now();
    // The server is cut off indeed: no route left.
    bed.nats
        .wait_routed(cut, false, Duration::from_secs(5))
        .await;
    readyz_becomes(node, 503, "not ready: bus unavailable\n", SCENARIO_WAIT).await;
    let unready = cut_at.elapsed();
    assert!(
        unready <= UNREADY_WITHIN,
        "node {cut} turned not ready {unready:?} after the cut (bound {UNREADY_WITHIN:?})"
    );
    // Its TCP link to its server is up all along: not "bus down".
    assert_eq!(node.metric("entity_sync_bus_connected").await, Ok(1.0));
    assert_eq!(node.metric("entity_sync_bus_available").await, Ok(0.0));
    assert_eq!(node.metric("entity_sync_ready").await, Ok(0.0));
    assert_eq!(
        node.metric("entity_sync_not_ready{reason=\"bus unavailable\"}")
            .await,
        Ok(1.0)
    );
    // Notify through it fails, through the majority side it is accepted.
    let refused = one_shot(&node.grpc_url()).notify([("items", "0")]).await;
    assert_eq!(
        refused.as_ref().err().and_then(|e| e.code()),
        Some(tonic::Code::Unavailable),
        "Notify through the cut-off node: {refused:?}"
    );
    let accepted = load.accepted();
    load.wait_accepted(100, SCENARIO_WAIT).await;
    // The majority side's nodes are ready (one whose consumer lived on the
    // cut-off server finds it stalled and recreates it within seconds).
    for &i in &others {
        readyz_becomes(&bed.nodes[i], 200, "ready\n", MAJORITY_READY_WITHIN).await;
    }
    sleep(CUT_FOR.saturating_sub(cut_at.elapsed())).await;
    let accepted_during_cut = load.accepted() - accepted;
    // What every subscriber must end with: the load stops before the heal.
    let cut_report = load.stop().await;
    let expected = bed.rows.expected();
    let cut_lasted = cut_at.elapsed();

    bed.nats.heal_routes(cut);
    let edges = ReadyEdges::watch(node);
    let (routes_back, leader_back, ready_back, current) = tokio::join!(
        bed.nats.wait_routed(cut, true, SCENARIO_WAIT),
        leader_answers(&cut_js, SCENARIO_WAIT),
        readyz_becomes(node, 200, "ready\n", SCENARIO_WAIT),
        fleet.wait_converged(&expected, SCENARIO_WAIT),
    );
    let edges = edges.stop().await;
    let (leader_back, new_leader) = leader_back;
    let current = current.unwrap_or_else(|left| {
        panic!("{left} client keys not current {SCENARIO_WAIT:?} after the heal")
    });
    // The healed server may answer for the stream at once and then lose it
    // again for seconds (the returning replica forces an election, and the
    // node says so): what counts is the node's last turn to ready before
    // its clients were current, when changes could flow to it for good.
    let ready_for_good = edges
        .iter()
        .copied()
        .rfind(|edge| *edge <= current)
        .unwrap_or(current);
    let current_after_leader = current.saturating_sub(leader_back);
    let current_after_ready = current.saturating_sub(ready_for_good);
    assert!(
        current_after_ready <= CURRENT_WITHIN,
        "subscribers current {current:?} after the heal, {current_after_ready:?} after the \
         node was last ready again (bound {CURRENT_WITHIN:?}; readiness edges {edges:?}, \
         leader answered after {leader_back:?})"
    );
    assert_eq!(node.metric("entity_sync_bus_available").await, Ok(1.0));
    // (The stream may lose its leader again for a moment while the healed
    // server catches up: the notifier rides that out.)
    let healed = bed.notifier(cut).notify([("items", "0")]).await;
    assert!(healed.is_ok(), "Notify through the healed node: {healed:?}");

    // Then every node takes notifies again, and every client ends current.
    let load = Load::start(
        &bed.rows,
        (0..bed.nodes.len()).map(|i| bed.notifier(i)).collect(),
        &keys,
        RATE,
        None,
    );
    load.wait_accepted(150, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    Figures {
        scenario: "10-nats-server-cut-off",
        load: sum(cut_report, report),
        clients: CLIENTS,
        mismatches,
        fleet: fleet.stats().since(&before),
        max_rss_mib: rss.max_mib(),
        recovered: current,
        converged,
        extra: vec![
            ("cut_ms", cut_lasted.as_millis().to_string()),
            ("unready_after_ms", unready.as_millis().to_string()),
            ("accepted_while_cut", accepted_during_cut.to_string()),
            ("routes_after_heal_ms", routes_back.as_millis().to_string()),
            ("leader_after_heal_ms", leader_back.as_millis().to_string()),
            ("ready_after_heal_ms", ready_back.as_millis().to_string()),
            (
                "current_after_leader_ms",
                current_after_leader.as_millis().to_string(),
            ),
            (
                "current_after_ready_ms",
                current_after_ready.as_millis().to_string(),
            ),
            ("ready_edges", edges.len().to_string()),
            ("leader_before", leader),
            ("leader_after", new_leader),
        ],
    }
    .report();
    fleet.stop(Duration::from_secs(5)).await;
}
