//! The cluster relay: a change of a SHARED key costs the backends one
//! resolve in the whole cluster, however many nodes hold the key; a key no
//! node holds costs none; the rows reach every holder; a relaying node that
//! goes away mid-resolve is replaced; resume by version works on any node.
//! Three nodes on one nats-server, each with its own resolver counting the
//! requests it gets.

use std::time::Duration;

use entity_sync_testkit as common;

use common::{
    DEADLINE, ResolverData, ResolverOptions, TestNode, TestResolver, WsClient, nats::NatsServer,
    notify_one,
};
use entity_sync::config::Config;
use entity_sync_backend::FetchMode;
use serde_json::{Value, json};
use tokio::time::Instant;

async fn node(nats: &NatsServer, modify: impl FnOnce(&mut Config)) -> TestNode {
    crate::cluster::init_tracing();
    let url = nats.url();
    TestNode::start(move |config| {
        config.nats.url = Some(url);
        modify(config);
    })
    .await
}

async fn resolver(node: &TestNode, data: &ResolverData) -> TestResolver {
    TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("backend").entity("items", FetchMode::Shared),
        data,
    )
    .await
}

struct Cluster {
    nodes: Vec<TestNode>,
    resolvers: Vec<TestResolver>,
    data: ResolverData,
    _nats: NatsServer,
}

impl Cluster {
    async fn start(relay: bool) -> Cluster {
        let nats = NatsServer::start().await;
        let data = ResolverData::new();
        let mut nodes = Vec::new();
        let mut resolvers = Vec::new();
        for _ in 0..3 {
            let node = node(&nats, |c| c.nats.cluster_relay = relay).await;
            resolvers.push(resolver(&node, &data).await);
            nodes.push(node);
        }
        Cluster {
            nodes,
            resolvers,
            data,
            _nats: nats,
        }
    }

    fn change_resolves(&self, id: &str) -> usize {
        self.resolvers
            .iter()
            .map(|r| r.change_count("items", id))
            .sum()
    }

    async fn metric_sum(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for node in &self.nodes {
            sum += node.metric(name).await;
        }
        sum
    }

    /// A client on each node subscribed to `items/id`.
    async fn holders(&self, id: &str) -> Vec<WsClient> {
        let mut clients = Vec::new();
        for node in &self.nodes {
            let mut client = node.client().await;
            client.subscribe("items", id).await;
            clients.push(client);
        }
        clients
    }
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !done().await {
        assert!(Instant::now() < end, "{what} did not happen in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_change_is_resolved_once_for_the_whole_cluster() {
    let cluster = Cluster::start(true).await;
    cluster.data.set_rows("items", "1", &[r#"{"n":0}"#]);
    let mut clients = cluster.holders("1").await;
    for n in 1..=5 {
        cluster
            .data
            .set_rows("items", "1", &[&format!(r#"{{"n":{n}}}"#)]);
        let version = notify_one(cluster.nodes[n % 3].grpc(), "items", "1").await;
        for client in &mut clients {
            assert_eq!(
                client.expect_push("items", "1").await,
                (version, vec![json!({"n": n})])
            );
        }
        assert_eq!(cluster.change_resolves("1"), n, "after change {n}");
    }
    for client in &mut clients {
        client.silent().await;
    }
    assert_eq!(cluster.change_resolves("1"), 5);
    assert_eq!(
        cluster
            .metric_sum("entity_sync_relay_published_total")
            .await,
        5.0
    );
    assert_eq!(
        cluster
            .metric_sum("entity_sync_relay_fallbacks_total")
            .await,
        0.0
    );
    // Each node pushed what the relay brought (the claiming node's own
    // subscribers included).
    assert_eq!(
        cluster.metric_sum("entity_sync_relay_received_total").await,
        15.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_a_key_no_node_holds_costs_no_resolve() {
    let cluster = Cluster::start(true).await;
    cluster.data.set_rows("items", "1", &[r#"{"n":0}"#]);
    // Held, then let go: it costs nothing after.
    let clients = cluster.holders("1").await;
    drop(clients);
    wait_for("the key leaves every node", async || {
        let mut keys = 0.0;
        for node in &cluster.nodes {
            keys += node.metric("entity_sync_subscribed_keys").await;
        }
        keys == 0.0
    })
    .await;
    // The rows subscriptions go a moment after the key (a sweep).
    tokio::time::sleep(Duration::from_millis(600)).await;
    for id in ["1", "2"] {
        notify_one(cluster.nodes[0].grpc(), "items", id).await;
    }
    wait_for("the relay skips both changes", async || {
        cluster.metric_sum("entity_sync_relay_unheld_total").await == 2.0
    })
    .await;
    assert_eq!(
        cluster.change_resolves("1") + cluster.change_resolves("2"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_relay_off_each_holding_node_resolves() {
    let cluster = Cluster::start(false).await;
    cluster.data.set_rows("items", "1", &[r#"{"n":0}"#]);
    let mut clients = cluster.holders("1").await;
    cluster.data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let version = notify_one(cluster.nodes[0].grpc(), "items", "1").await;
    for client in &mut clients {
        assert_eq!(
            client.expect_push("items", "1").await,
            (version, vec![json!({"n": 1})])
        );
    }
    assert_eq!(cluster.change_resolves("1"), 3);
    assert_eq!(
        cluster
            .metric_sum("entity_sync_relay_published_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaying_node_that_goes_away_mid_resolve_is_replaced() {
    let mut cluster = Cluster::start(true).await;
    cluster.data.set_rows("items", "1", &[r#"{"n":0}"#]);
    let mut clients = cluster.holders("1").await;
    for resolver in &cluster.resolvers {
        resolver.hold("items");
    }
    cluster.data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let version = notify_one(cluster.nodes[0].grpc(), "items", "1").await;
    // The node that claimed the change is the one whose resolver got it.
    let mut claimed = None;
    wait_for("a node claims the change", async || {
        claimed = cluster.resolvers.iter().position(|r| r.held_count() > 0);
        claimed.is_some()
    })
    .await;
    let claimed = claimed.unwrap();
    // It goes away without answering; the others answer from now on.
    let gone = cluster.nodes.remove(claimed);
    let gone_resolver = cluster.resolvers.remove(claimed);
    drop(gone);
    drop(gone_resolver);
    clients.remove(claimed);
    for resolver in &cluster.resolvers {
        resolver.release().await;
    }
    for client in &mut clients {
        let (pushed, rows) = client.expect_push("items", "1").await;
        assert!(pushed >= version, "{pushed} < {version}");
        assert_eq!(rows, [json!({"n": 1})]);
    }
    // Replaced once for the cluster (not by each holder itself).
    assert_eq!(
        cluster
            .metric_sum("entity_sync_relay_fallbacks_total")
            .await,
        0.0
    );
}

fn resume(id: &str, version: u64) -> Value {
    json!({"action": "subscribe", "body": {"entity": "items", "id": id, "version": version}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_from_one_node_resumes_on_another() {
    let cluster = Cluster::start(true).await;
    cluster.data.set_rows("items", "1", &[r#"{"n":0}"#]);
    let mut first = cluster.nodes[0].client().await;
    first.subscribe("items", "1").await;
    cluster.data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let version = notify_one(cluster.nodes[0].grpc(), "items", "1").await;
    let (held, _) = first.expect_push("items", "1").await;
    assert_eq!(held, version);

    // Node 1 never held the key: the bus places the version.
    let mut elsewhere = cluster.nodes[1].client().await;
    elsewhere.send_json(resume("1", held)).await;
    assert_eq!(
        elsewhere.recv_json().await,
        json!({"action": "subscribed", "body": {"entity": "items", "id": "1", "current": true}})
    );
    elsewhere.silent().await;
    assert_eq!(
        cluster.nodes[1]
            .metric("entity_sync_cache_misses_total")
            .await,
        1.0
    );

    // An older version gets a snapshot, on any node.
    let mut behind = cluster.nodes[2].client().await;
    behind.send_json(resume("1", held - 1)).await;
    behind.expect_subscribed("items", "1").await;
    assert_eq!(behind.expect_push("items", "1").await.1, [json!({"n": 1})]);

    // Node 0 holds the key and has seen its last change: its cache places it.
    let mut again = cluster.nodes[0].client().await;
    again.send_json(resume("1", held)).await;
    assert_eq!(again.recv_json().await["body"]["current"], true);
    assert_eq!(
        cluster.nodes[0]
            .metric("entity_sync_cache_hits_total")
            .await,
        1.0
    );
}
