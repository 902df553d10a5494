//! The real `entity-sync` binary: bad configuration exits non-zero with a
//! clear message, `notify` calls Notify, SIGTERM closes websockets with 1001
//! and exits 0.

use entity_sync_testkit as common;

use std::{path::Path, process::Command, time::Duration};

use common::{
    DEADLINE, NodeProcess, ResolverData, ResolverOptions, TestNode, TestResolver, WsClient,
    notify_one,
};
use entity_sync_backend::FetchMode;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_entity-sync");

#[test]
fn bad_flags_exit_with_code_2_naming_the_flag() {
    let out = Command::new(BIN)
        .args(["--ws-addr", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--ws-addr"), "{stderr}");
}

#[test]
fn inconsistent_config_exits_1_with_a_message() {
    let out = Command::new(BIN)
        .args(["--ws-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args(["--max-message-bytes", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--max-message-bytes must be at least 256"),
        "{stderr}"
    );
}

#[test]
fn environment_variables_configure_like_flags() {
    let out = Command::new(BIN)
        .args(["--ws-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .env("ENTITY_SYNC_RESOLVE_BATCH_SIZE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--resolve-batch-size"), "{stderr}");
}

#[tokio::test]
async fn notify_subcommand_pushes_to_subscribers() {
    let (mut node, _resolver, data) = TestNode::start_with_resolver(
        |_| {},
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
    )
    .await;
    data.set_rows("items", "7", &[r#"{"id":7}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "7").await;

    let server = node.grpc().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["notify", "--server", &server, "items/7"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let seq: u64 = stdout
        .trim()
        .strip_prefix("items/7 sequence ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {stdout:?}"));
    let (version, rows) = client.expect_push("items", "7").await;
    assert_eq!(version, seq);
    assert_eq!(rows, vec![serde_json::json!({"id": 7})]);
    node.shutdown().await;
}

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_exits_0() {
    let mut node = NodeProcess::spawn(Path::new(BIN), &[], None, "info").unwrap();
    node.wait_ready(DEADLINE).await.unwrap();
    let mut client = WsClient::connect(&node.ws_url()).await;

    node.guard().signal(libc::SIGTERM);
    assert_eq!(client.recv_close().await, 1001);
    let status =
        tokio::task::spawn_blocking(move || node.guard().wait_exit(Duration::from_secs(15)))
            .await
            .unwrap()
            .expect("the node exits within its shutdown grace");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_killed_node_restarted_on_its_ports_is_served_again_by_the_same_backend() {
    let mut node = NodeProcess::spawn(Path::new(BIN), &[], None, "info").unwrap();
    node.wait_ready(DEADLINE).await.unwrap();
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1,"v":1}"#]);
    let mut resolver = TestResolver::connect(
        &node.grpc_url(),
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
        &data,
    )
    .await;
    let first = resolver.node_id.clone();
    let mut client = WsClient::connect(&node.ws_url()).await;
    client.subscribe("items", "1").await;

    // SIGKILL: no close frames, no stream ends; the backend only sees its
    // connection break.
    node.kill();
    node.restart().unwrap();
    node.wait_ready(DEADLINE).await.unwrap();
    let second = resolver.wait_registered(&first, DEADLINE * 2).await;
    assert_ne!(first, second, "a new node process");

    data.set_rows("items", "1", &[r#"{"id":1,"v":2}"#]);
    let mut client = WsClient::connect(&node.ws_url()).await;
    let (_, rows) = client.subscribe("items", "1").await;
    assert_eq!(rows, vec![json!({"id": 1, "v": 2})]);
    data.set_rows("items", "1", &[r#"{"id":1,"v":3}"#]);
    let seq = notify_one(&node.grpc_url(), "items", "1").await;
    let (_, rows) = client.push_at_least("items", "1", seq).await;
    assert_eq!(rows, vec![json!({"id": 1, "v": 3})]);
}
