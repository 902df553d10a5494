//! Subscribe tokens in a cluster: a node that serves no resolver of its own
//! takes a token subscribe of a SHARED key with one shared resolve through
//! the node that does (then its cache), and learns that a PER_SUBSCRIBER
//! entity's rows depend on the secret (the shared request is refused without
//! reaching the backend, and the secret's resolve follows).

use std::time::Duration;

use entity_sync_testkit as common;

use common::{
    ResolverData, ResolverOptions, TestNode, TestResolver, nats::NatsServer, process::TempDir,
};
use entity_sync_backend::{FetchMode, Reason, SubscribeTokenSigner, jwks};
use serde_json::{Value, json};

fn subscribe(entity: &str, id: &str, token: &str, version: Option<u64>) -> Value {
    let mut body = json!({"entity": entity, "id": id, "token": token});
    if let Some(version) = version {
        body["version"] = json!(version);
    }
    json!({"action": "subscribe", "body": body})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_resolver_takes_token_subscribes_through_the_cluster() {
    crate::cluster::init_tracing();
    let nats = NatsServer::start().await;
    let signer = SubscribeTokenSigner::hs256("k1", b"cluster-token-secret-0123456789ab").unwrap();
    let dir = TempDir::new("jwks");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&signer])).unwrap();
    let start = || {
        let (url, path) = (nats.url(), path.clone());
        TestNode::start(move |config| {
            config.nats.url = Some(url);
            config.ws.subscribe_token_jwks = Some(path);
        })
    };
    let (serving, bare) = (start().await, start().await);
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    data.set_rows("docs", "1", &[r#"{"mine":true}"#]);
    let resolver = TestResolver::connect(
        serving.grpc(),
        ResolverOptions::new("backend")
            .entity("items", FetchMode::Shared)
            .entity("docs", FetchMode::PerSubscriber),
        &data,
    )
    .await;
    let ttl = Duration::from_secs(60);
    let items = signer.sign("items", &["1"], ttl).unwrap();
    let docs = signer.sign("docs", &["1"], ttl).unwrap();
    let seen = || -> Vec<(Reason, String, bool)> {
        resolver
            .requests()
            .into_iter()
            .map(|r| (r.reason, r.secret, r.shared))
            .collect()
    };

    // SHARED: one shared resolve through the serving node, then the cache.
    let mut first = bare.client().await;
    first.send_json(subscribe("items", "1", &items, None)).await;
    first.expect_subscribed("items", "1").await;
    let (version, rows) = first.expect_push("items", "1").await;
    assert_eq!(rows, [json!({"n": 1})]);
    assert_eq!(seen(), [(Reason::Subscribe, String::new(), true)]);
    let mut second = bare.client().await;
    second
        .send_json(subscribe("items", "1", &items, None))
        .await;
    second.expect_subscribed("items", "1").await;
    assert_eq!(second.expect_push("items", "1").await.0, version);
    let mut third = bare.client().await;
    third
        .send_json(subscribe("items", "1", &items, Some(version)))
        .await;
    assert_eq!(
        third.recv_json().await,
        json!({"action": "subscribed", "body": {"entity": "items", "id": "1", "current": true}})
    );
    assert_eq!(seen().len(), 1, "{:?}", seen());

    // PER_SUBSCRIBER: the shared ask is refused by the serving node (the
    // backend never sees it), and the secret's resolve answers.
    let mut reader = bare.client().await;
    reader.send_secret("alice").await;
    reader.send_json(subscribe("docs", "1", &docs, None)).await;
    reader.expect_subscribed("docs", "1").await;
    assert_eq!(
        reader.expect_push("docs", "1").await.1,
        [json!({"mine": true})]
    );
    assert_eq!(
        seen(),
        [
            (Reason::Subscribe, String::new(), true),
            (Reason::Subscribe, "alice".to_owned(), false)
        ]
    );
    // Learned: the next one goes with the secret at once.
    let mut again = bare.client().await;
    again.send_secret("bob").await;
    again.send_json(subscribe("docs", "1", &docs, None)).await;
    again.expect_subscribed("docs", "1").await;
    again.expect_push("docs", "1").await;
    assert_eq!(seen().len(), 3);
    assert_eq!(seen()[2], (Reason::Subscribe, "bob".to_owned(), false));
}
