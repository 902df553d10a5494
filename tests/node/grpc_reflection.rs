//! gRPC health and server reflection: what grpcurl and load balancers use,
//! exercised with real tonic clients against a real node.

use entity_sync_testkit as common;

use common::TestNode;
use futures_util::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect to the node's gRPC port")
}

async fn reflect(grpc: &str, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel(grpc).await);
    let requests = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.expect("one response").unwrap();
    response.message_response.expect("a message response")
}

#[tokio::test]
async fn reflection_lists_and_describes_the_service() {
    let mut node = TestNode::start(|_| {}).await;
    let MessageResponse::ListServicesResponse(list) =
        reflect(node.grpc(), MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "entitysync.v1.EntitySync".to_string(),
            "grpc.health.v1.Health".to_string(),
            "grpc.reflection.v1.ServerReflection".to_string(),
        ]
    );

    let MessageResponse::FileDescriptorResponse(files) = reflect(
        node.grpc(),
        MessageRequest::FileContainingSymbol("entitysync.v1.EntitySync".into()),
    )
    .await
    else {
        panic!("expected file descriptors");
    };
    // The descriptor is protobuf; its strings show what it describes.
    let file = String::from_utf8_lossy(&files.file_descriptor_proto[0]);
    assert!(file.contains("entitysync/v1/entitysync.proto"));
    assert!(file.contains("Notify") && file.contains("Resolve"));
    node.shutdown().await;
}

#[tokio::test]
async fn health_reports_serving() {
    let mut node = TestNode::start(|_| {}).await;
    let mut health = HealthClient::new(channel(node.grpc()).await);
    for service in ["", "entitysync.v1.EntitySync"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    node.shutdown().await;
}
