//! What a node does with cluster resolve requests that no node sends: replies
//! to subjects other than inboxes, more ids than a node ever sends, an entity
//! other than the subject's. It ignores them (no reply, no resolve), while
//! well-formed requests are answered. A real nats-server, a raw NATS client.

use std::time::Duration;

use entity_sync_backend::{FetchMode, Reason, proto::v1::ResolveRequest};
use entity_sync_testkit::{
    ResolverData, ResolverOptions, SILENCE, TestNode, TestResolver, nats::NatsServer,
};
use futures_util::StreamExt;
use prost::Message;
use tokio::time::{Instant, timeout};

fn request(entity: &str, ids: usize) -> bytes::Bytes {
    ResolveRequest {
        request_id: 0,
        entity: entity.to_owned(),
        ids: (0..ids).map(|i| i.to_string()).collect(),
        secret: String::new(),
        reason: Reason::Subscribe as i32,
        shared: false,
    }
    .encode_to_vec()
    .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_no_node_would_send_are_ignored() {
    let nats = NatsServer::start().await;
    let url = nats.url();
    let node = TestNode::start(move |c| {
        c.nats.url = Some(url);
        c.nats.prefix = "hx".into();
    })
    .await;
    let data = ResolverData::new();
    data.set_rows("items", "0", &[r#"{"id":0}"#]);
    let resolver = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("svc")
            .entity("items", FetchMode::Shared)
            .entity("docs", FetchMode::Shared),
        &data,
    )
    .await;
    let client = async_nats::connect(nats.url()).await.unwrap();

    // A well-formed request is answered (once the node subscribed).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match timeout(
            Duration::from_secs(1),
            client.request("hx.resolve.items", request("items", 1)),
        )
        .await
        {
            Ok(Ok(reply)) => {
                assert!(!reply.payload.is_empty());
                break;
            }
            _ => assert!(Instant::now() < deadline, "the node never answered"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answered = resolver.requests().len();
    assert_eq!(answered, 1);

    // A reply subject that is not an inbox: nothing is published there.
    let mut elsewhere = client.subscribe("hx.changes.items.0").await.unwrap();
    client
        .publish_with_reply(
            "hx.resolve.items",
            "hx.changes.items.0",
            request("items", 1),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    assert!(
        timeout(SILENCE, elsewhere.next()).await.is_err(),
        "the node replied to a non-inbox subject"
    );

    // More ids than a node sends, or another entity than the subject's (one
    // this node serves too): no answer.
    for (entity, ids) in [("items", 65), ("docs", 1)] {
        let asked = timeout(
            Duration::from_millis(500),
            client.request("hx.resolve.items", request(entity, ids)),
        )
        .await;
        assert!(
            !matches!(asked, Ok(Ok(_))),
            "a request for {entity} with {ids} ids was answered"
        );
    }
    assert_eq!(
        resolver.requests().len(),
        answered,
        "nothing reached the resolver: {:?}",
        resolver.requests()
    );
}
