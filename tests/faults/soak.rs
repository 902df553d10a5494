//! A bounded soak (scenario 9): waves of clients come, hold keys under a
//! steady notify load, and leave; afterwards every node's RSS and open file
//! descriptors are back at their baseline. 15 s by default;
//! `ENTITY_SYNC_SOAK_SECS=N` runs it N seconds.

use std::time::Duration;

use entity_sync_testkit::{
    fleet::{Fleet, FleetConfig, FleetStats},
    procstat,
};
use tokio::time::{Instant, sleep};

use crate::harness::{
    Bed, BedOptions, Figures, Load, LoadReport, RssSampler, SCENARIO_WAIT, item_keys, recovered,
    serial, settle,
};

/// The soak's length unless `ENTITY_SYNC_SOAK_SECS` says otherwise.
const DEFAULT_SOAK: Duration = Duration::from_secs(15);
/// Clients of each wave.
const WAVE: usize = 400;
/// How long a wave holds its keys.
const WAVE_LIFE: Duration = Duration::from_secs(4);
/// How far above its baseline a node's RSS may stay once the clients left
/// (allocator caches and arenas keep some; a leak grows past this).
const RSS_SLACK_KIB: u64 = 24 * 1024;

fn soak_length() -> Duration {
    std::env::var("ENTITY_SYNC_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_SOAK)
}

/// RSS (KiB) and open fds of every node.
fn usage(bed: &Bed) -> Vec<(u64, usize)> {
    bed.pids()
        .into_iter()
        .map(|pid| {
            (
                procstat::rss_kib(pid).expect("node alive"),
                procstat::fd_count(pid).expect("node alive"),
            )
        })
        .collect()
}

/// One wave: `WAVE` clients spread over the nodes, under load for
/// `WAVE_LIFE`, checked against the final state, then gone.
async fn wave(
    bed: &Bed,
    keys: &[entity_sync_testkit::fleet::Key],
) -> (LoadReport, FleetStats, usize, Duration) {
    let fleet = Fleet::start(FleetConfig::spread(bed.ws_urls(), WAVE, keys, 3));
    recovered(&fleet, "a soak wave connecting").await;
    let load = Load::start(
        &bed.rows,
        (0..bed.nodes.len()).map(|i| bed.notifier(i)).collect(),
        keys,
        300.0,
        None,
    );
    sleep(WAVE_LIFE).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    let stats = fleet.stats();
    fleet.stop(Duration::from_secs(5)).await;
    (report, stats, mismatches, converged)
}

/// Polls until every node has no connection left.
async fn clients_gone(bed: &Bed) {
    let end = Instant::now() + SCENARIO_WAIT;
    for i in 0..bed.nodes.len() {
        while bed.metric(i, "entity_sync_connections").await > 0.0 {
            assert!(Instant::now() < end, "node {i} still holds connections");
            sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_leaves_rss_and_file_descriptors_at_their_baseline() {
    let _turn = serial().await;
    let bed = Bed::start(BedOptions::default()).await;
    let keys = item_keys(100);
    bed.rows.seed(&keys);
    let rss = RssSampler::start(bed.pids());

    // A first wave warms the nodes up (allocator, buffers, the stream's
    // consumers); the baseline is taken after it left.
    let (mut load, mut fleet_stats, mut mismatches, _) = wave(&bed, &keys).await;
    clients_gone(&bed).await;
    sleep(Duration::from_millis(500)).await;
    let baseline = usage(&bed);

    let length = soak_length();
    let started = Instant::now();
    let mut waves = 1;
    let mut converged = Duration::ZERO;
    while started.elapsed() < length {
        let (l, f, m, c) = wave(&bed, &keys).await;
        waves += 1;
        load.accepted += l.accepted;
        load.failed += l.failed;
        load.retried += l.retried;
        load.duplicates += l.duplicates;
        load.unfinished += l.unfinished;
        fleet_stats.duplicates += f.duplicates;
        fleet_stats.stale += f.stale;
        fleet_stats.connects += f.connects;
        mismatches += m;
        converged = converged.max(c);
    }
    let soaked = started.elapsed();
    clients_gone(&bed).await;

    // Back to the baseline: fds exactly (a leaked socket or task shows),
    // RSS within the slack.
    let settle_at = Instant::now();
    let mut after = usage(&bed);
    while (after
        .iter()
        .zip(&baseline)
        .any(|(a, b)| a.1 > b.1 || a.0 > b.0 + RSS_SLACK_KIB))
        && settle_at.elapsed() < Duration::from_secs(10)
    {
        sleep(Duration::from_millis(200)).await;
        after = usage(&bed);
    }
    let back = settle_at.elapsed();
    for (i, (a, b)) in after.iter().zip(&baseline).enumerate() {
        assert!(
            a.1 <= b.1,
            "node {i}: {} fds open after the clients left, {} before",
            a.1,
            b.1
        );
        assert!(
            a.0 <= b.0 + RSS_SLACK_KIB,
            "node {i}: RSS {} KiB after the clients left, {} KiB baseline",
            a.0,
            b.0
        );
    }
    let fmt = |v: &[(u64, usize)]| {
        v.iter()
            .map(|(r, f)| format!("{:.1}MiB/{f}fd", *r as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(",")
    };
    Figures {
        scenario: "9-soak",
        load,
        clients: WAVE,
        mismatches,
        fleet: fleet_stats,
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![
            ("soak_s", soaked.as_secs().to_string()),
            ("waves", waves.to_string()),
            ("client_sessions", (waves * WAVE).to_string()),
            ("baseline", fmt(&baseline)),
            ("after", fmt(&after)),
        ],
    }
    .report();
}
