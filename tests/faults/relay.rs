//! The cluster relay under faults (scenario 11): the node doing a change's
//! resolve for the whole cluster is killed with SIGKILL (11a), cut off from
//! NATS (11b) and stalled with SIGSTOP (11c), each while notifies stream in
//! and every node is resolving changes for the others. Resolves take 40 ms,
//! so each node always has some in flight when the fault hits. Every client
//! must end with the backend's final rows, and no client may get a push
//! older than one it holds.

use std::time::Duration;

use entity_sync_testkit::{
    fleet::{Fleet, FleetConfig},
    nats::{NatsCluster, TcpProxy},
};
use tokio::time::{Instant, sleep};

use crate::harness::{
    Bed, BedOptions, Figures, Load, RssSampler, SCENARIO_WAIT, item_keys, left, recovered, serial,
    settle,
};

const CLIENTS: usize = 300;
const RATE: f64 = 200.0;
/// How long each resolve takes: long enough that a node always has some in
/// flight, short enough that the load keeps up.
const RESOLVE_DELAY: Duration = Duration::from_millis(40);

/// The relay's counters summed over the nodes in `nodes`.
async fn relay_sum(bed: &Bed, nodes: &[usize], name: &str) -> f64 {
    let mut sum = 0.0;
    for &i in nodes {
        sum += bed.metric(i, name).await;
    }
    sum
}

/// Polls until node `i` has published relayed rows beyond `than` (it is
/// resolving changes for the cluster).
async fn relaying(bed: &Bed, i: usize, than: f64) {
    let published = "entity_sync_relay_published_total";
    bed.metric_past(
        i,
        published,
        than,
        "never resolved a change for the cluster",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_resolving_for_the_cluster_dies_or_stalls_and_nothing_is_lost() {
    let _turn = serial().await;
    // Node 0 reaches NATS only through a proxy (the servers advertise no
    // other URL), so its link can be cut.
    let nats = NatsCluster::start_with(3, true).await;
    let proxy = TcpProxy::start(nats.addr(0)).await;
    let urls = vec![proxy.url(), nats.urls_from(1), nats.urls_from(2)];
    let mut bed = Bed::start_on(
        nats,
        BedOptions {
            nats_urls: Some(urls),
            ..BedOptions::default()
        },
    )
    .await;
    for i in 0..bed.nodes.len() {
        bed.resolvers[i] = None;
        let slow = bed.resolver(i, "slow", RESOLVE_DELAY).await;
        bed.resolvers[i] = Some(slow);
    }
    let keys = item_keys(60);
    bed.rows.seed(&keys);
    let rss = RssSampler::start(bed.pids());
    let fleet = Fleet::start(FleetConfig::spread(bed.ws_urls(), CLIENTS, &keys, 2));
    recovered(&fleet, "first connect").await;

    // 11a: node 1 killed while it resolves for the cluster.
    let before = fleet.stats();
    let load = Load::start(
        &bed.rows,
        vec![bed.notifier(0), bed.notifier(2)],
        &keys,
        RATE,
        None,
    );
    load.wait_accepted(200, SCENARIO_WAIT).await;
    let published = bed.metric(1, "entity_sync_relay_published_total").await;
    relaying(&bed, 1, published).await;
    let survivors_before = relay_sum(&bed, &[0, 2], "entity_sync_relay_published_total").await;
    bed.nodes[1].kill();
    let fault = Instant::now();
    left(&fleet, 1).await;
    recovered(&fleet, "after SIGKILL of a relaying node").await;
    let back = fault.elapsed();
    load.wait_accepted(300, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    let survivors_after = relay_sum(&bed, &[0, 2], "entity_sync_relay_published_total").await;
    assert!(
        survivors_after > survivors_before,
        "the surviving nodes went on resolving for the cluster"
    );
    let fallbacks = relay_sum(&bed, &[0, 2], "entity_sync_relay_fallbacks_total").await;
    Figures {
        scenario: "11a-relay-node-sigkill",
        load: report,
        clients: CLIENTS,
        mismatches,
        fleet: fleet.stats().since(&before),
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![
            ("relayed_by_victim", published.to_string()),
            ("holder_fallbacks", fallbacks.to_string()),
        ],
    }
    .report();

    // 11b: node 1 back; node 0's link to NATS cut for 8 s while it resolves.
    bed.restart_node(1).await;
    let slow = bed.resolver(1, "slow", RESOLVE_DELAY).await;
    bed.resolvers[1] = Some(slow);
    rss.set_pids(bed.pids());
    recovered(&fleet, "node 1 back").await;
    let before = fleet.stats();
    let load = Load::start(
        &bed.rows,
        vec![bed.notifier(1), bed.notifier(2)],
        &keys,
        RATE,
        None,
    );
    load.wait_accepted(200, SCENARIO_WAIT).await;
    let published = bed.metric(0, "entity_sync_relay_published_total").await;
    relaying(&bed, 0, published).await;
    let fallbacks_before = bed.metric(0, "entity_sync_relay_fallbacks_total").await;
    proxy.cut();
    let fault = Instant::now();
    sleep(Duration::from_secs(8)).await;
    proxy.restore();
    // Node 0 reconnects and catches up: its own consumer resumes, and its
    // holders resolve what the relay published while it was away.
    load.wait_accepted(300, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    let back = fault.elapsed();
    let fallbacks = bed.metric(0, "entity_sync_relay_fallbacks_total").await - fallbacks_before;
    Figures {
        scenario: "11b-relay-node-cut-off",
        load: report,
        clients: CLIENTS,
        mismatches,
        fleet: fleet.stats().since(&before),
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![("cut_off_node_fallbacks", fallbacks.to_string())],
    }
    .report();

    // 11c: node 2 stalled (SIGSTOP) for 5 s while it resolves, then resumed.
    let before = fleet.stats();
    let load = Load::start(
        &bed.rows,
        vec![bed.notifier(0), bed.notifier(1)],
        &keys,
        RATE,
        None,
    );
    load.wait_accepted(200, SCENARIO_WAIT).await;
    let published = bed.metric(2, "entity_sync_relay_published_total").await;
    relaying(&bed, 2, published).await;
    let others_before = relay_sum(&bed, &[0, 1], "entity_sync_relay_published_total").await;
    bed.nodes[2].guard().signal(libc::SIGSTOP);
    let fault = Instant::now();
    sleep(Duration::from_secs(5)).await;
    // While it is stopped, the others take over its claims.
    let others_during = relay_sum(&bed, &[0, 1], "entity_sync_relay_published_total").await;
    bed.nodes[2].guard().signal(libc::SIGCONT);
    load.wait_accepted(300, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    let back = fault.elapsed();
    assert!(
        others_during > others_before,
        "the other nodes resolved for the cluster while node 2 was stopped"
    );
    Figures {
        scenario: "11c-relay-node-stalled",
        load: report,
        clients: CLIENTS,
        mismatches,
        fleet: fleet.stats().since(&before),
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![(
            "relayed_by_others_while_stalled",
            (others_during - others_before).to_string(),
        )],
    }
    .report();
    fleet.stop(Duration::from_secs(5)).await;
}
