//! The bus under faults: one NATS server of three killed and restarted
//! (scenario 3), all of them restarted (scenario 4), and a faulty link
//! between a node and NATS: added latency, dropped connections, a half-open
//! stall (scenario 8).

use std::time::Duration;

use entity_sync_backend::Notifier;
use entity_sync_testkit::{
    fleet::{Fleet, FleetConfig},
    nats::{NatsCluster, TcpProxy},
};
use tokio::time::{Instant, sleep};

use crate::harness::{
    Bed, BedOptions, Figures, Load, RssSampler, SCENARIO_WAIT, item_keys, recovered, serial, settle,
};

const CLIENTS: usize = 300;
const RATE: f64 = 200.0;

/// Polls until every live node's `/metrics` says its bus is connected; the
/// time it took.
async fn buses_connected(bed: &Bed, nodes: &[usize]) -> Duration {
    let started = Instant::now();
    for &i in nodes {
        loop {
            if bed.metric(i, "entity_sync_bus_connected").await == 1.0 {
                break;
            }
            assert!(
                started.elapsed() < SCENARIO_WAIT,
                "node {i} never got its bus back"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
    started.elapsed()
}

/// Polls until node `i` has consumed more change keys than `than`; the time
/// it took (how long a node took to get its link back and catch up).
async fn consuming_past(bed: &Bed, i: usize, than: f64) -> Duration {
    let consumed = "entity_sync_changes_consumed_total";
    bed.metric_past(i, consumed, than, "consumes nothing after the fault")
        .await
}

/// Polls `Notify` without retries on `grpc` until it answers UNAVAILABLE.
async fn wait_unavailable(grpc: &str) -> Duration {
    let notifier = Notifier::builder(grpc)
        .retry_for(Duration::ZERO)
        .call_timeout(Duration::from_secs(3))
        .connect_lazy()
        .expect("notifier");
    let started = Instant::now();
    loop {
        match notifier.notify([("items", "0")]).await {
            Err(err) if err.code() == Some(tonic::Code::Unavailable) => return started.elapsed(),
            other => assert!(
                started.elapsed() < SCENARIO_WAIT,
                "Notify never answered UNAVAILABLE with the bus down; last: {other:?}"
            ),
        }
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_servers_killed_and_restarted_lose_no_acknowledged_notify() {
    let _turn = serial().await;
    let mut bed = Bed::start(BedOptions::default()).await;
    let keys = item_keys(60);
    bed.rows.seed(&keys);
    let rss = RssSampler::start(bed.pids());
    let fleet = Fleet::start(FleetConfig::spread(bed.ws_urls(), CLIENTS, &keys, 2));
    recovered(&fleet, "first connect").await;
    let notifiers = |bed: &Bed| (0..3).map(|i| bed.notifier(i)).collect::<Vec<_>>();

    // Scenario 3: one server of three killed, then restarted.
    let before = fleet.stats();
    let load = Load::start(&bed.rows, notifiers(&bed), &keys, RATE, None);
    load.wait_accepted(300, SCENARIO_WAIT).await;
    bed.nats.kill(0);
    // Two of three keep the stream's quorum: notifies keep being accepted.
    load.wait_accepted(300, SCENARIO_WAIT).await;
    bed.nats.restart(0).await;
    let back = buses_connected(&bed, &[0, 1, 2]).await;
    load.wait_accepted(300, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    Figures {
        scenario: "3-one-nats-killed",
        load: report,
        clients: CLIENTS,
        mismatches,
        fleet: fleet.stats().since(&before),
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![],
    }
    .report();

    // Scenario 4: every server down for seconds, then back.
    let before = fleet.stats();
    let load = Load::start(&bed.rows, notifiers(&bed), &keys, RATE, None);
    load.wait_accepted(300, SCENARIO_WAIT).await;
    let accepted_before = load.accepted();
    for i in 0..bed.nats.len() {
        bed.nats.kill(i);
    }
    let down = Instant::now();
    let refused_after = wait_unavailable(&bed.nodes[0].grpc_url()).await;
    // The bus stays down for a few seconds whatever the probe took.
    sleep(Duration::from_secs(3).saturating_sub(down.elapsed())).await;
    let accepted_down = load.accepted();
    for i in 0..bed.nats.len() {
        bed.nats.restart(i).await;
    }
    let outage = down.elapsed();
    let back = buses_connected(&bed, &[0, 1, 2]).await;
    load.wait_accepted(400, SCENARIO_WAIT).await;
    let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
    // The notifier rode the outage out: calls made while it lasted retried
    // until the bus was back, and were then accepted.
    assert!(
        report.retried > 0,
        "no notify was retried across the outage: {report:?}"
    );
    Figures {
        scenario: "4-all-nats-restarted",
        load: report,
        clients: CLIENTS,
        mismatches,
        fleet: fleet.stats().since(&before),
        max_rss_mib: rss.max_mib(),
        recovered: back,
        converged,
        extra: vec![
            ("bus_down_ms", outage.as_millis().to_string()),
            (
                "unavailable_after_ms",
                refused_after.as_millis().to_string(),
            ),
            (
                "accepted_while_down",
                accepted_down.saturating_sub(accepted_before).to_string(),
            ),
            ("receipt_duplicates", report.duplicates.to_string()),
        ],
    }
    .report();
    fleet.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_link_between_a_node_and_nats_loses_nothing() {
    let _turn = serial().await;
    // Node 0 reaches NATS only through the proxy: the servers advertise no
    // other URL, so it never goes around it.
    let nats = NatsCluster::start_with(3, true).await;
    let proxy = TcpProxy::start(nats.addr(0)).await;
    let urls = vec![proxy.url(), nats.urls_from(1), nats.urls_from(2)];
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

    // Notifies go through the nodes with a sound link: the faulty node's
    // clients depend on it consuming what the others publish.
    let faults: [(&'static str, &str); 3] = [
        ("8a-nats-link-latency", "latency"),
        ("8b-nats-link-dropped", "drop"),
        ("8c-nats-link-stalled", "stall"),
    ];
    for (scenario, fault) in faults {
        let before = fleet.stats();
        let load = Load::start(
            &bed.rows,
            vec![bed.notifier(1), bed.notifier(2)],
            &keys,
            RATE,
            None,
        );
        load.wait_accepted(200, SCENARIO_WAIT).await;
        let mut extra = vec![];
        let back = match fault {
            "latency" => {
                proxy.set_latency(Duration::from_millis(150));
                load.wait_accepted(300, SCENARIO_WAIT).await;
                proxy.set_latency(Duration::ZERO);
                let consumed = bed.metric(0, "entity_sync_changes_consumed_total").await;
                consuming_past(&bed, 0, consumed).await
            }
            "drop" => {
                let consumed = bed.metric(0, "entity_sync_changes_consumed_total").await;
                let dropped = proxy.drop_all();
                assert!(dropped >= 1, "node 0 had no link to drop");
                extra.push(("links_dropped", dropped.to_string()));
                consuming_past(&bed, 0, consumed).await
            }
            _ => {
                let stalled_at = Instant::now();
                let stalled = proxy.stall();
                assert!(stalled >= 1, "node 0 had no link to stall");
                extra.push(("links_stalled", stalled.to_string()));
                // What was already on its way in is consumed first.
                sleep(Duration::from_millis(300)).await;
                let consumed = bed.metric(0, "entity_sync_changes_consumed_total").await;
                // Nothing reaches node 0 until its pings go unanswered and
                // it connects again (through the proxy, which forwards new
                // connections).
                consuming_past(&bed, 0, consumed).await;
                let took = stalled_at.elapsed();
                extra.push(("noticed_ms", took.as_millis().to_string()));
                took
            }
        };
        load.wait_accepted(200, SCENARIO_WAIT).await;
        let (report, converged, mismatches) = settle(load, &bed.rows, &fleet).await;
        Figures {
            scenario,
            load: report,
            clients: CLIENTS,
            mismatches,
            fleet: fleet.stats().since(&before),
            max_rss_mib: rss.max_mib(),
            recovered: back,
            converged,
            extra,
        }
        .report();
    }
    fleet.stop(Duration::from_secs(5)).await;
}
