//! The NATS permissions of `deploy/nats/nats.conf` are enough for a cluster:
//! a real nats-server runs with that file's `authorization` block, and two
//! nodes authenticated as its `entity-sync` user notify, consume and resolve
//! across each other, and that user may not touch the JetStream API of any
//! other stream. A wrong password is refused without the password in the
//! error. Nodes reach a NATS that requires TLS with client certificates
//! through the `--nats-tls-*` flags.

use std::time::Duration;

use entity_sync::{bus::BusErrorKind, node::NodeError};
use entity_sync_backend::FetchMode;
use entity_sync_testkit::{
    ResolverData, ResolverOptions, TestNode, TestResolver,
    nats::{NatsServer, nats_server_bin},
    node::NodeProcess,
    notify_one,
    process::TempDir,
};
use serde_json::json;
use tokio::time::Instant;

const PASSWORD: &str = "nats-password-for-this-test-7f3a";

/// The `authorization { ... }` block of the deploy config, with the
/// password the compose file takes from the environment.
fn authorization_block() -> String {
    deploy_block("authorization").replace("$NATS_NODE_PASSWORD", &format!("\"{PASSWORD}\""))
}

/// The top-level block `name { ... }` of `deploy/nats/nats.conf`.
fn deploy_block(name: &str) -> String {
    let conf = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/nats/nats.conf"
    ))
    .unwrap();
    let start = conf
        .find(&format!("\n{name} {{"))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("deploy/nats/nats.conf has no top-level {name} block"));
    let mut depth = 0;
    let mut end = start;
    for (i, c) in conf[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    end = start + i + 1;
                    break;
                }
            }
            _ => {}
        }
    }
    assert!(end > start, "unbalanced {name} block");
    conf[start..end].to_owned()
}

async fn authorized_nats() -> NatsServer {
    let config = format!(
        "jetstream {{\n  sync_interval: always\n}}\n{}\n",
        authorization_block()
    );
    NatsServer::start_binary(&nats_server_bin(), Some(&config)).await
}

fn url(nats: &NatsServer, password: &str) -> String {
    format!("nats://entity-sync:{password}@127.0.0.1:{}", nats.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_work_through_the_deploy_permissions() {
    let nats = authorized_nats().await;
    let start = |name: &'static str| {
        let url = url(&nats, PASSWORD);
        TestNode::start(move |c| {
            c.nats.url = Some(url);
            c.node_id = name.to_owned();
        })
    };
    let a = start("node-a").await;
    let b = start("node-b").await;
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1,"v":1}"#]);
    let _resolver = TestResolver::connect(
        a.grpc(),
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
        &data,
    )
    .await;

    // B has no resolver: its snapshot comes from A over NATS request-reply.
    let mut client = b.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client.send_subscribe("items", "1").await;
        let frame = client.recv_json().await;
        if frame["action"] == "subscribed" {
            break;
        }
        assert_eq!(frame["body"]["code"], "no_resolver", "{frame}");
        assert!(Instant::now() < deadline, "B never reached A's resolver");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, rows) = client.expect_push("items", "1").await;
    assert_eq!(rows, vec![json!({"id": 1, "v": 1})]);

    // A change notified on A reaches B's client through the stream.
    data.set_rows("items", "1", &[r#"{"id":1,"v":2}"#]);
    let seq = notify_one(a.grpc(), "items", "1").await;
    let (version, rows) = client.push_at_least("items", "1", seq).await;
    assert_eq!(version, seq);
    assert_eq!(rows, vec![json!({"id": 1, "v": 2})]);
    // It came through the relay (its consumer, its rows subject), not
    // from B resolving it itself after the relay failed.
    let relayed = a.metric("entity_sync_relay_published_total").await
        + b.metric("entity_sync_relay_published_total").await;
    assert_eq!(relayed, 1.0);
    assert_eq!(b.metric("entity_sync_relay_fallbacks_total").await, 0.0);

    // Resume on A, which never held the key: its last change read from the
    // stream (STREAM.MSG.GET) says the version is current.
    let mut resumed = a.client().await;
    resumed
        .send_json(
            json!({"action": "subscribe", "body": {"entity": "items", "id": "1", "version": seq}}),
        )
        .await;
    assert_eq!(
        resumed.recv_json().await,
        json!({"action": "subscribed", "body": {"entity": "items", "id": "1", "current": true}})
    );
}

#[tokio::test]
async fn a_wrong_password_is_refused_without_the_password_in_the_error() {
    let nats = authorized_nats().await;
    let mut config = TestNode::test_config();
    config.nats.url = Some(url(&nats, "wrong-password-1234"));
    let err = match TestNode::try_start(config).await {
        Err(NodeError::Bus(err)) => {
            assert_eq!(err.kind(), BusErrorKind::Auth, "{err}");
            err.to_string()
        }
        Err(other) => panic!("expected a bus error, got {other}"),
        Ok(_) => panic!("the node connected with a wrong password"),
    };
    assert!(!err.contains("wrong-password-1234"), "{err}");
    assert!(err.contains("***@127.0.0.1"), "{err}");
}

/// The password in `--nats-url` never reaches the log, at any level: the
/// NATS client logs the server's address at debug level on every connection
/// attempt, so the node hands it addresses without their credentials (and
/// sends user and password in the handshake). Checked across a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_password_never_reaches_the_log() {
    let mut nats = authorized_nats().await;
    let dir = TempDir::new("nats-log");
    let log = dir.path().join("node.log");
    let mut node = NodeProcess::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_entity-sync")),
        &[format!("--nats-url={}", url(&nats, PASSWORD))],
        Some(&log),
        "trace",
    )
    .unwrap();
    node.wait_ready(Duration::from_secs(20)).await.unwrap();
    nats.restart().await;
    // Reconnected: a second "connected" event after the restart.
    let end = Instant::now() + Duration::from_secs(30);
    let connected = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("NATS connection event event=connected")
            .count()
    };
    while connected() < 2 {
        assert!(Instant::now() < end, "the node never reconnected to NATS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exited = node.terminate(Duration::from_secs(15)).await;
    assert!(exited.is_some(), "the node exits on SIGTERM");
    let text = std::fs::read_to_string(&log).unwrap();
    // The client's own connection lines ran (they name the server).
    assert!(
        text.contains("attempting connection"),
        "no connection attempt logged at debug level:\n{text}"
    );
    let leaks: Vec<String> = text
        .lines()
        .filter(|l| l.contains(PASSWORD))
        .map(|l| l.replace(PASSWORD, "<the password>"))
        .collect();
    assert!(
        leaks.is_empty(),
        "the NATS password is in the log:\n{leaks:#?}"
    );
}

/// `--nats-tls-ca`, `--nats-tls-cert`/`--nats-tls-key` and
/// `--nats-require-tls` against a nats-server that requires TLS with client
/// certificates: the node connects and pushes; without its certificate it
/// is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_nats_over_mutual_tls() {
    let files = entity_sync_testkit::tls::TlsFiles::new();
    let config = format!(
        "jetstream {{\n  sync_interval: always\n}}\n\
         tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
        files.server_cert.display().to_string(),
        files.server_key.display().to_string(),
        files.ca_cert.display().to_string(),
    );
    let nats = NatsServer::start_binary(&nats_server_bin(), Some(&config)).await;
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let with_tls = |c: &mut entity_sync::config::Config, client_cert: bool| {
        c.nats.url = Some(url.clone());
        c.nats.tls_ca = Some(files.ca_cert.clone());
        c.nats.require_tls = true;
        if client_cert {
            c.nats.tls_cert = Some(files.client_cert.clone());
            c.nats.tls_key = Some(files.client_key.clone());
        }
    };
    let node = TestNode::start(|c| with_tls(c, true)).await;
    assert_changes_flow(&node).await;

    let mut config = TestNode::test_config();
    with_tls(&mut config, false);
    // However the refusal surfaces (TLS 1.3 reports a missing client
    // certificate after the handshake), the node stops retrying in time.
    config.nats.startup_timeout = Duration::from_secs(3);
    let refused = tokio::time::timeout(Duration::from_secs(20), TestNode::try_start(config))
        .await
        .expect("the node gives up connecting");
    assert!(
        matches!(refused, Err(NodeError::Bus(_))),
        "a node without its client certificate connected"
    );
}

/// The compose example's NATS TLS: `deploy/nats/make-certs.sh` makes the
/// files, a nats-server runs with the deploy config's client-port `tls` and
/// `authorization` blocks, and a node connects as the compose nodes do
/// (`tls://user:password@`, `--nats-tls-ca`, `--nats-require-tls`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_tls_block_and_certificates_work() {
    let dir = entity_sync_testkit::process::TempDir::new("nats-certs");
    let made = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/nats/make-certs.sh"
    ))
    .arg(dir.path())
    .output()
    .expect("deploy/nats/make-certs.sh runs (it needs openssl)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let certs = format!("{}/", dir.path().display());
    let config = format!(
        "jetstream {{\n  sync_interval: always\n}}\n{}\n{}\n",
        deploy_block("tls").replace("/etc/nats/certs/", &certs),
        authorization_block()
    );
    let nats = NatsServer::start_binary(&nats_server_bin(), Some(&config)).await;
    let url = format!("tls://entity-sync:{PASSWORD}@127.0.0.1:{}", nats.port());
    let ca = dir.path().join("ca.pem");
    let node = TestNode::start(move |c| {
        c.nats.url = Some(url);
        c.nats.tls_ca = Some(ca);
        c.nats.require_tls = true;
    })
    .await;
    assert_changes_flow(&node).await;
}

#[tokio::test]
async fn the_node_user_may_use_only_its_own_streams_api() {
    let nats = authorized_nats().await;
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    let client =
        async_nats::ConnectOptions::with_user_and_password("entity-sync".into(), PASSWORD.into())
            .request_timeout(Some(Duration::from_millis(500)))
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    let _ = events.send(event.to_string());
                }
            })
            .connect(format!("127.0.0.1:{}", nats.port()))
            .await
            .unwrap();
    // Its own stream's API answers (404 "stream not found" before a node made it).
    let own = client
        .request("$JS.API.STREAM.INFO.es_changes", "".into())
        .await
        .expect("the node's own stream API answers");
    assert!(
        String::from_utf8_lossy(&own.payload).contains("stream not found"),
        "{:?}",
        own.payload
    );
    for subject in [
        "$JS.API.STREAM.INFO.other_changes",
        "$JS.API.STREAM.CREATE.other_changes",
        "$JS.API.STREAM.DELETE.es_changes",
        "$JS.API.STREAM.PURGE.es_changes",
        "$JS.API.CONSUMER.CREATE.other_changes",
        "$JS.API.STREAM.NAMES",
        "$JS.API.INFO",
    ] {
        let answer = client.request(subject, "".into()).await;
        assert!(answer.is_err(), "{subject} answered: {answer:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let event = tokio::time::timeout_at(deadline, seen.recv())
                .await
                .unwrap_or_else(|_| panic!("no permissions violation reported for {subject}"))
                .unwrap();
            let event = event.to_lowercase();
            if event.contains("permissions violation") && event.contains(&subject.to_lowercase()) {
                break;
            }
        }
    }
}

/// A change notified on `node` reaches its subscriber: the key went out to
/// NATS and came back through the node's consumer.
async fn assert_changes_flow(node: &TestNode) {
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    let _resolver = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
        &data,
    )
    .await;
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    let seq = notify_one(node.grpc(), "items", "1").await;
    let (version, _) = client.push_at_least("items", "1", seq).await;
    assert_eq!(version, seq, "the change went through NATS");
}
