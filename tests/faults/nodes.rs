//! Nodes going away under load: one killed with SIGKILL while it holds 500
//! clients (scenario 1), one stopped with SIGTERM (scenario 2).

use std::time::Duration;

use entity_sync_testkit::fleet::{Fleet, FleetConfig};
use tokio::time::Instant;

use crate::harness::{
    Bed, BedOptions, Figures, Load, RssSampler, SCENARIO_WAIT, item_keys, left, recovered, serial,
    settle,
};

/// Clients on the node that is killed.
const ON_VICTIM: usize = 500;
/// Clients on each other node.
const ON_OTHERS: usize = 100;
/// Notifies per second while the fault happens.
const RATE: f64 = 200.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_or_stopped_under_load_loses_no_client() {
    let _turn = serial().await;
    let mut bed = Bed::start(BedOptions::default()).await;
    let keys = item_keys(60);
    bed.rows.seed(&keys);
    let rss = RssSampler::start(bed.pids());

    // Scenario 1: node 1 holds 500 clients, the others 100 each.
    let clients = ON_VICTIM + 2 * ON_OTHERS;
    let mut config = FleetConfig::spread(bed.ws_urls(), clients, &keys, 2);
    for (i, place) in config.placement.iter_mut().enumerate() {
        *place = match i {
            i if i < ON_VICTIM => 1,
            i if i < ON_VICTIM + ON_OTHERS => 0,
            _ => 2,
        };
    }
    let fleet = Fleet::start(config);
    recovered(&fleet, "first connect").await;
    assert_eq!(
        fleet.connected_to(1),
        ON_VICTIM,
        "clients on the node to kill"
    );
    let before = fleet.stats();
    let load = Load::start(
        &bed.rows,
        vec![bed.notifier(0), bed.notifier(2)],
        &keys,
        RATE,
        None,
    );
    load.wait_accepted(300, SCENARIO_WAIT).await;

    bed.nodes[1].kill();
    let fault = Instant::now();
    // The killed node's clients find the others while notifies go on.
    left(&fleet, 1).await;
    recovered(&fleet, "after SIGKILL").await;
    let back = fault.elapsed();
    assert_eq!(fleet.connected_to(1), 0);
    assert_eq!(fleet.connected_to(0) + fleet.connected_to(2), clients);
    load.wait_accepted(300, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    let seen = fleet.stats().since(&before);
    // Every client of the killed node lost its socket without a close frame.
    assert!(
        seen.abnormal_ends >= ON_VICTIM as u64,
        "{} connections ended abnormally, {ON_VICTIM} were on the killed node",
        seen.abnormal_ends
    );
    Figures {
        scenario: "1-node-sigkill",
        load: report,
        clients,
        mismatches,
        fleet: seen,
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![("moved", seen.abnormal_ends.to_string())],
    }
    .report();

    // Scenario 2: node 1 back, then node 2 stopped with SIGTERM.
    bed.restart_node(1).await;
    rss.set_pids(bed.pids());
    let before = fleet.stats();
    let on_stopped = fleet.connected_to(2);
    assert!(on_stopped > 0, "clients on the node to stop");
    let load = Load::start(
        &bed.rows,
        vec![bed.notifier(0), bed.notifier(1)],
        &keys,
        RATE,
        None,
    );
    load.wait_accepted(300, SCENARIO_WAIT).await;
    bed.nodes[2].guard().signal(libc::SIGTERM);
    let fault = Instant::now();
    bed.wait_exited(2, Duration::from_secs(15)).await;
    recovered(&fleet, "after SIGTERM").await;
    let back = fault.elapsed();
    load.wait_accepted(300, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    let seen = fleet.stats().since(&before);
    // Each of them was told 1001 and moved without an error.
    assert_eq!(
        seen.closes_going_away, on_stopped as u64,
        "1001 closes for the {on_stopped} clients of the stopped node: {seen:?}"
    );
    assert_eq!(
        seen.abnormal_ends, 0,
        "no connection ended without a close: {seen:?}"
    );
    assert_eq!(seen.error_frames, 0, "no error frame: {seen:?}");
    assert_eq!(fleet.connected_to(0) + fleet.connected_to(1), clients);
    Figures {
        scenario: "2-node-sigterm",
        load: report,
        clients,
        mismatches,
        fleet: seen,
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![("closed_1001", seen.closes_going_away.to_string())],
    }
    .report();
    fleet.stop(Duration::from_secs(5)).await;
}
