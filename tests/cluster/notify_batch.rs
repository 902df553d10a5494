//! Notify on nats-server 2.12+: a call's keys stored as atomic batches of up
//! to 1,000 (all of a batch or nothing), consecutive sequences in request
//! order, idempotent retries, and calls above 1,000 keys. Each test starts
//! its own nats-server and reads the stream itself.

use entity_sync_testkit as common;

use std::time::Duration;

use async_nats::jetstream;
use common::{
    TestNode,
    nats::{NatsServer, nats_server_bin, server_version},
};
use entity_sync_backend::{Key, Notifier, Receipt};
use serde_json::{Value, json};

const STREAM: &str = "es_changes";

async fn node(nats: &NatsServer) -> TestNode {
    let url = nats.url();
    TestNode::start(move |config| {
        config.nats.url = Some(url);
        config.grpc.max_notify_keys = 5000;
    })
    .await
}

/// `Notify` of `count` keys `items/{first + i}` under `idempotency_key`,
/// once (no retry).
async fn notify_range(
    grpc: &str,
    first: usize,
    count: usize,
    idempotency_key: &str,
) -> Result<Receipt, entity_sync_backend::Error> {
    let notifier = Notifier::builder(grpc)
        .retry_for(Duration::ZERO)
        .call_timeout(Duration::from_secs(20))
        .connect_lazy()
        .expect("notifier");
    let keys: Vec<Key> = (first..first + count)
        .map(|i| Key::from(("items", i.to_string().as_str())))
        .collect();
    notifier.notify_with_key(keys, idempotency_key).await
}

/// A JetStream API request answered with JSON; panics on an error answer.
async fn api(client: &async_nats::Client, subject: String, body: Value) -> Value {
    let answer = client
        .request(subject, serde_json::to_vec(&body).unwrap().into())
        .await
        .expect("JetStream API answer");
    let value: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert!(value.get("error").is_none(), "{value}");
    value
}

/// Creates the stream the node expects, but refusing more than `max_msgs`
/// messages (`discard: new`): a batch that would exceed it is refused.
async fn create_limited_stream(client: &async_nats::Client, max_msgs: i64) {
    api(
        client,
        format!("$JS.API.STREAM.CREATE.{STREAM}"),
        json!({
            "name": STREAM,
            "subjects": ["es.changes.>"],
            "retention": "limits",
            "storage": "file",
            "discard": "new",
            "max_msgs": max_msgs,
            "num_replicas": 1,
            "duplicate_window": 120_000_000_000u64,
            "allow_atomic": true,
        }),
    )
    .await;
}

async fn stream_config(client: &async_nats::Client) -> Value {
    api(client, format!("$JS.API.STREAM.INFO.{STREAM}"), json!({})).await["config"].clone()
}

async fn stored(client: &async_nats::Client) -> u64 {
    let info = api(client, format!("$JS.API.STREAM.INFO.{STREAM}"), json!({})).await;
    info["state"]["messages"].as_u64().unwrap()
}

/// The stream's messages `first..=last`: (subject, batch id).
async fn read_stream(client: &async_nats::Client, first: u64, last: u64) -> Vec<(String, String)> {
    let stream = jetstream::new(client.clone())
        .get_stream(STREAM)
        .await
        .expect("stream");
    let mut out = Vec::new();
    for seq in first..=last {
        let message = stream.get_raw_message(seq).await.expect("stored message");
        let batch = message
            .headers
            .get("Nats-Batch-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        out.push((message.subject.to_string(), batch));
    }
    out
}

fn atomic_server() -> bool {
    server_version(&nats_server_bin()).is_some_and(|v| v >= (2, 12))
}

#[tokio::test]
async fn a_notify_is_stored_as_one_atomic_batch_in_request_order() {
    assert!(atomic_server(), "these tests need nats-server 2.12+");
    let nats = NatsServer::start().await;
    let mut node = node(&nats).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    assert_eq!(stream_config(&client).await["allow_atomic"], json!(true));

    // One key: a plain message.
    let one = notify_range(node.grpc(), 0, 1, "").await.expect("notify");
    assert_eq!(one.sequences, [1]);
    assert_eq!(read_stream(&client, 1, 1).await[0].1, "");
    for (first, count) in [(1, 100), (101, 1000)] {
        let receipt = notify_range(node.grpc(), first, count, "")
            .await
            .expect("notify");
        assert!(!receipt.duplicate);
        assert_eq!(receipt.accepted as usize, count);
        let start = receipt.sequences[0];
        let expected: Vec<u64> = (start..start + count as u64).collect();
        assert_eq!(receipt.sequences, expected, "consecutive, in request order");
        let messages = read_stream(&client, start, start + count as u64 - 1).await;
        let batch = &messages[0].1;
        assert!(!batch.is_empty(), "stored without a batch id");
        for (i, (subject, id)) in messages.iter().enumerate() {
            assert_eq!(subject, &format!("es.changes.items.{}", first + i));
            assert_eq!(id, batch, "message {i} is from another batch");
        }
    }
    assert_eq!(stored(&client).await, 1101);
    node.shutdown().await;
}

#[tokio::test]
async fn a_batch_the_stream_refuses_stores_nothing() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    create_limited_stream(&client, 10).await;
    let mut node = node(&nats).await;

    // 12 keys where 10 fit: refused whole.
    let err = notify_range(node.grpc(), 0, 12, "over")
        .await
        .expect_err("over the stream's limit");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err:?}");
    assert!(
        err.to_string().contains("maximum messages exceeded"),
        "{err}"
    );
    assert_eq!(stored(&client).await, 0);

    // 10 fit.
    let receipt = notify_range(node.grpc(), 0, 10, "fits")
        .await
        .expect("notify");
    assert_eq!(receipt.sequences, (1..=10).collect::<Vec<u64>>());
    assert_eq!(stored(&client).await, 10);
    node.shutdown().await;
}

#[tokio::test]
async fn a_retried_notify_is_a_duplicate_with_the_first_sequences() {
    let nats = NatsServer::start().await;
    let mut node = node(&nats).await;
    let client = async_nats::connect(nats.url()).await.unwrap();

    let first = notify_range(node.grpc(), 0, 300, "order-1")
        .await
        .expect("notify");
    assert!(!first.duplicate);
    let again = notify_range(node.grpc(), 0, 300, "order-1")
        .await
        .expect("retry");
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.sequences, first.sequences);
    assert_eq!(stored(&client).await, 300);

    // The same key with one more key: the first 300 answer as before, the
    // new one is stored.
    let more = notify_range(node.grpc(), 0, 301, "order-1")
        .await
        .expect("longer retry");
    assert!(!more.duplicate);
    assert_eq!(more.sequences[..300], first.sequences[..]);
    assert_eq!(more.sequences[300], 301);
    assert_eq!(stored(&client).await, 301);
    node.shutdown().await;
}

#[tokio::test]
async fn a_call_above_1000_keys_stores_whole_batches_in_order_and_a_retry_the_rest() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    // Room for one batch of 1,000 and part of the next.
    create_limited_stream(&client, 1500).await;
    let mut node = node(&nats).await;

    let err = notify_range(node.grpc(), 0, 2500, "big")
        .await
        .expect_err("the second batch does not fit");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err:?}");
    assert_eq!(stored(&client).await, 1000, "exactly the first batch");
    let first_batch = read_stream(&client, 1, 1000).await;
    for (i, (subject, _)) in first_batch.iter().enumerate() {
        assert_eq!(subject, &format!("es.changes.items.{i}"));
    }

    // Room for everything: the retry stores only the keys still missing.
    let mut config = stream_config(&client).await;
    config["max_msgs"] = json!(-1);
    api(&client, format!("$JS.API.STREAM.UPDATE.{STREAM}"), config).await;
    let receipt = notify_range(node.grpc(), 0, 2500, "big")
        .await
        .expect("retry");
    assert!(!receipt.duplicate);
    assert_eq!(receipt.sequences, (1..=2500).collect::<Vec<u64>>());
    assert_eq!(stored(&client).await, 2500);
    let batches = read_stream(&client, 1001, 2500).await;
    assert_eq!(batches[0].1, batches[999].1, "keys 1000..2000: one batch");
    assert_ne!(batches[999].1, batches[1000].1, "keys 2000..2500: the next");
    assert_eq!(batches[1499].0, "es.changes.items.2499");

    // And a third time: all duplicates.
    let again = notify_range(node.grpc(), 0, 2500, "big")
        .await
        .expect("retry");
    assert!(again.duplicate);
    assert_eq!(again.sequences, receipt.sequences);
    assert_eq!(stored(&client).await, 2500);
    node.shutdown().await;
}

#[tokio::test]
async fn an_existing_stream_without_allow_atomic_gets_it() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut config = json!({
        "name": STREAM,
        "subjects": ["es.changes.>"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": 1,
        "max_msgs": -1,
        "description": "made before",
    });
    api(
        &client,
        format!("$JS.API.STREAM.CREATE.{STREAM}"),
        config.clone(),
    )
    .await;
    assert_eq!(stream_config(&client).await.get("allow_atomic"), None);
    let mut node = node(&nats).await;
    config = stream_config(&client).await;
    assert_eq!(config["allow_atomic"], json!(true));
    assert_eq!(
        config["description"],
        json!("made before"),
        "other settings kept"
    );
    let receipt = notify_range(node.grpc(), 0, 3, "").await.expect("notify");
    let messages = read_stream(&client, receipt.sequences[0], receipt.sequences[2]).await;
    assert!(
        messages
            .iter()
            .all(|(_, id)| !id.is_empty() && *id == messages[0].1)
    );
    node.shutdown().await;
}
