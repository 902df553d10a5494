//! Resolvers under faults (scenario 5): one killed in the middle of a burst,
//! one that answers after seconds, and every resolver of the entity gone
//! for 10 s, then back.

use std::time::Duration;

use entity_sync_testkit::fleet::{Fleet, FleetConfig};
use tokio::time::{Instant, sleep};

use crate::harness::{
    Bed, BedOptions, Figures, ITEMS, Load, RssSampler, SCENARIO_WAIT, item_keys, recovered, serial,
    settle,
};

const CLIENTS: usize = 300;
const RATE: f64 = 200.0;
/// How long a slow resolver takes to answer.
const SLOW: Duration = Duration::from_secs(2);
/// How long every resolver stays away.
const OUTAGE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolvers_killed_slow_or_gone_lose_no_push() {
    let _turn = serial().await;
    let mut bed = Bed::start(BedOptions::default()).await;
    let keys = item_keys(60);
    bed.rows.seed(&keys);
    let rss = RssSampler::start(bed.pids());
    // Node 0 has a second resolver, to which the first one's work moves.
    let mut spare = Some(bed.resolver(0, "spare", Duration::ZERO).await);
    let fleet = Fleet::start(FleetConfig::spread(bed.ws_urls(), CLIENTS, &keys, 2));
    recovered(&fleet, "first connect").await;
    let notifiers = |bed: &Bed| (0..3).map(|i| bed.notifier(i)).collect::<Vec<_>>();

    // 5a: a burst of every key at once, and node 0's resolver killed while
    // it answers it.
    let before = fleet.stats();
    let load = Load::start(&bed.rows, notifiers(&bed), &keys, RATE, None);
    load.wait_accepted(200, SCENARIO_WAIT).await;
    for key in &keys {
        bed.rows.write(key);
    }
    let burst: Vec<(&str, &str)> = keys.iter().map(|k| (ITEMS, k.1.as_str())).collect();
    bed.notifier(1).notify(burst).await.expect("burst accepted");
    bed.resolvers[0].take().expect("resolver 0").kill();
    let fault = Instant::now();
    recovered(&fleet, "after the resolver was killed").await;
    let back = fault.elapsed();
    load.wait_accepted(300, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    Figures {
        scenario: "5a-resolver-killed",
        load: report,
        clients: CLIENTS,
        mismatches,
        fleet: fleet.stats().since(&before),
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![("burst_keys", keys.len().to_string())],
    }
    .report();

    // 5b: node 1's resolver replaced by one that answers after seconds.
    let before = fleet.stats();
    let load = Load::start(&bed.rows, notifiers(&bed), &keys, RATE, None);
    load.wait_accepted(200, SCENARIO_WAIT).await;
    let mut slow = bed.resolver(1, "slow", SLOW).await;
    bed.resolvers[1].take().expect("resolver 1").kill();
    let fault = Instant::now();
    recovered(&fleet, "after the resolver was replaced").await;
    let back = fault.elapsed();
    load.wait_accepted(600, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    assert!(
        !slow.requests().is_empty(),
        "the slow resolver was never asked"
    );
    Figures {
        scenario: "5b-resolver-slow",
        load: report,
        clients: CLIENTS,
        mismatches,
        fleet: fleet.stats().since(&before),
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![
            ("slow_answer_ms", SLOW.as_millis().to_string()),
            ("slow_requests", slow.requests().len().to_string()),
        ],
    }
    .report();
    slow.kill();
    bed.resolvers[1] = Some(bed.resolver(1, "backend", Duration::ZERO).await);

    // 5c: every resolver of the entity gone for 10 s. Changes keep coming;
    // new clients arrive meanwhile and are refused (`no_resolver`) until
    // the resolvers are back, then subscribe again by themselves.
    let before = fleet.stats();
    let load = Load::start(&bed.rows, notifiers(&bed), &keys, RATE, None);
    load.wait_accepted(200, SCENARIO_WAIT).await;
    for resolver in bed.resolvers.iter_mut() {
        if let Some(mut resolver) = resolver.take() {
            resolver.kill();
        }
    }
    if let Some(mut spare) = spare.take() {
        spare.kill();
    }
    let gone = Instant::now();
    sleep(Duration::from_millis(500)).await;
    let late = Fleet::start(FleetConfig::spread(bed.ws_urls(), 60, &keys, 2));
    sleep(OUTAGE.saturating_sub(gone.elapsed())).await;
    let late_refused = late.stats().error_frames;
    let mut fresh = Vec::new();
    for i in 0..bed.nodes.len() {
        fresh.push(Some(bed.resolver(i, "backend", Duration::ZERO).await));
    }
    bed.resolvers = fresh;
    let back_at = Instant::now();
    recovered(&late, "late clients after the resolvers came back").await;
    let back = back_at.elapsed();
    load.wait_accepted(300, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    let late_mismatches = match late
        .wait_converged(&bed.rows.expected(), SCENARIO_WAIT)
        .await
    {
        Ok(_) => 0,
        Err(left) => left,
    };
    assert!(
        late_refused > 0,
        "clients subscribing with no resolver got no error frame"
    );
    let late_stats = late.stats();
    assert_eq!(late_stats.stale, 0);
    Figures {
        scenario: "5c-resolvers-gone-10s",
        load: report,
        clients: CLIENTS + late.len(),
        mismatches: mismatches + late_mismatches,
        fleet: fleet.stats().since(&before),
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![
            ("outage_ms", (back_at - gone).as_millis().to_string()),
            ("late_clients_refused", late_refused.to_string()),
            ("late_resubscribes", late_stats.resubscribes.to_string()),
        ],
    }
    .report();
    late.stop(Duration::from_secs(5)).await;
    fleet.stop(Duration::from_secs(5)).await;
}
