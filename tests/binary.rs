//! The real `entity-sync` binary: bad configuration exits non-zero with a
//! clear message, `notify` calls Notify, SIGTERM closes websockets with 1001
//! and exits 0.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{ResolverOptions, TestNode, WsClient};
use entity_sync::proto::v1::FetchMode;
use serde_json::Value;

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

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_exits_0() {
    let child = Command::new(BIN)
        .args(["--ws-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let stderr = running.0.stderr.take().unwrap();
    // The first log line names the bound addresses.
    let (ws_addr, lines) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let event: Value = serde_json::from_str(&line).unwrap();
            if event["fields"]["message"] == "node started" {
                let addr = event["fields"]["ws_addr"].as_str().unwrap().to_string();
                return (addr, lines);
            }
        }
        panic!("the node exited before logging that it started");
    })
    .await
    .unwrap();
    let mut client = WsClient::connect(&format!("ws://{ws_addr}/ws/entity-sync/")).await;

    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(running.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    assert_eq!(client.recv_close().await, 1001);
    let status = tokio::task::spawn_blocking(move || {
        let status = running.0.wait().unwrap();
        drop(lines);
        status
    });
    let status = tokio::time::timeout(Duration::from_secs(15), status)
        .await
        .expect("the node exits within its shutdown grace")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
