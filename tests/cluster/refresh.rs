//! The refresh safety net in a cluster: every node holding a key of an
//! entity registered with `refresh_interval_ms` publishes its refresh, and
//! the stream stores one change per key and slot, not one per node.

use std::{collections::BTreeSet, time::Duration};

use entity_sync_testkit as common;

use async_nats::header::NATS_MESSAGE_ID;
use common::{ResolverData, ResolverOptions, TestNode, TestResolver, nats::NatsServer};
use entity_sync_backend::{FetchMode, Reason};

const INTERVAL: Duration = Duration::from_millis(1_000);

async fn node(nats_url: &str) -> TestNode {
    let nats_url = nats_url.to_owned();
    TestNode::start(move |config| {
        config.nats.url = Some(nats_url);
        config.nats.prefix = "rf".into();
        config.ws.push_unchanged_rows = false;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_holding_a_key_store_one_refresh_per_slot() {
    let nats = NatsServer::start().await;
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let mut nodes = Vec::new();
    let mut resolvers = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let node = node(&nats.url()).await;
        let resolver = TestResolver::connect(
            node.grpc(),
            ResolverOptions::new(&format!("backend-{i}"))
                .entity("items", FetchMode::Shared)
                .refresh_every("items", INTERVAL),
            &data,
        )
        .await;
        let mut client = node.client().await;
        client.subscribe("items", "1").await;
        nodes.push(node);
        resolvers.push(resolver);
        clients.push(client);
    }

    // About four intervals with all three holding the key; unchanged rows
    // push nothing.
    for client in &mut clients {
        client.expect_silence(INTERVAL * 4 / 3).await;
    }
    // Nobody holds the key any more: the refreshes stop (the next tick
    // drops it), so the stream and the counters stay put while read.
    for client in clients {
        client.close().await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;

    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let stream = js.get_stream("rf_changes").await.expect("stream exists");
    let info = stream.get_info().await.expect("info");
    let mut ids = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let message = stream.get_raw_message(seq).await.expect("stored message");
        assert_eq!(message.subject.as_str(), "rf.changes.items.1");
        let id = message
            .headers
            .get(NATS_MESSAGE_ID)
            .expect("a message id")
            .to_string();
        ids.push(id);
    }
    let slots: BTreeSet<u64> = ids
        .iter()
        .map(|id| {
            id.strip_prefix("refresh.items.1.")
                .and_then(|slot| slot.parse().ok())
                .unwrap_or_else(|| panic!("not a refresh id: {id}"))
        })
        .collect();
    assert_eq!(slots.len(), ids.len(), "one change per slot: {ids:?}");
    assert!(ids.len() >= 3, "{ids:?}");
    // Consecutive slots: none skipped while the key was held.
    let (first, last) = (*slots.first().unwrap(), *slots.last().unwrap());
    assert_eq!(last - first + 1, slots.len() as u64, "{ids:?}");

    // Which node stored each change varies; together, every one once.
    let mut stored = 0;
    for node in &nodes {
        stored += node.metric("entity_sync_refresh_changes_total").await as usize;
    }
    assert_eq!(stored, ids.len());
    // Each refresh change was resolved once for the three nodes (the
    // relay), whichever node claimed it; the latest may still be on its way.
    let resolved: usize = resolvers
        .iter()
        .map(|r| r.requests_for(Reason::Change, "items", "1").len())
        .sum();
    assert!(
        resolved <= ids.len() && resolved + 1 >= ids.len(),
        "{resolved} CHANGE resolves for {} refresh changes",
        ids.len()
    );

    for mut node in nodes {
        node.shutdown().await;
    }
}
