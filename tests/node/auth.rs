//! Backend credentials: `--grpc-tokens-file` roles and entity lists, reload
//! (in-process and on SIGHUP, also while a stream waits for its `Register`),
//! idempotency keys scoped per credential, resolver streams per credential,
//! the refusal to serve an exposed gRPC port without credentials (or with
//! tokens in clear), and no secret or token in the node's logs even at
//! trace level.

use std::{path::Path, process::Command, time::Duration};

use entity_sync::node::NodeError;
use entity_sync_backend::{ErrorKind, FetchMode};
use entity_sync_testkit::{
    self as common, DEADLINE, NodeProcess, ResolverData, ResolverOptions, TestNode, TestResolver,
    WsClient, notify::notifier_with, process::TempDir,
};
use serde_json::json;
use tokio::time::Instant;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_entity-sync");
const NOTIFIER: &str = "notifier-token-0123456789";
const OTHER_NOTIFIER: &str = "notifier-token-abcdefghij";
const ITEMS_RESOLVER: &str = "resolver-items-0123456789";
const ANY_RESOLVER: &str = "resolver-any-0123456789ab";
const ITEMS_NOTIFIER: &str = "notifier-items-0123456789";

const TOKENS: &str = "\
# test credentials
notifier {NOTIFIER}
notifier {OTHER_NOTIFIER}
resolver {ITEMS_RESOLVER} items   # may serve items only
resolver {ANY_RESOLVER} *
notifier {ITEMS_NOTIFIER} items   # may notify items only
";

fn tokens_text() -> String {
    TOKENS
        .replace("{NOTIFIER}", NOTIFIER)
        .replace("{OTHER_NOTIFIER}", OTHER_NOTIFIER)
        .replace("{ITEMS_RESOLVER}", ITEMS_RESOLVER)
        .replace("{ANY_RESOLVER}", ANY_RESOLVER)
        .replace("{ITEMS_NOTIFIER}", ITEMS_NOTIFIER)
}

/// A node whose tokens file (in the returned dir) holds [`TOKENS`].
async fn node_with_tokens() -> (TestNode, TempDir) {
    let dir = TempDir::new("tokens");
    let path = dir.path().join("tokens");
    std::fs::write(&path, tokens_text()).unwrap();
    let node = TestNode::start(|c| c.grpc.tokens_file = Some(path)).await;
    (node, dir)
}

async fn notify_code(node: &TestNode, token: Option<&str>) -> Option<tonic::Code> {
    let notifier = notifier_with(node.grpc(), token).await;
    notifier
        .notify([("items", "1")])
        .await
        .err()
        .map(|e| e.code().expect("a status"))
}

async fn register_code(node: &TestNode, options: ResolverOptions) -> Option<tonic::Code> {
    let data = ResolverData::new();
    TestResolver::try_connect(node.grpc(), options, &data)
        .await
        .err()
        .map(|e| e.code().expect("a status"))
}

fn items(name: &str) -> ResolverOptions {
    ResolverOptions::new(name).entity("items", FetchMode::Shared)
}

#[tokio::test]
async fn notify_needs_a_notifier_token() {
    let (node, _dir) = node_with_tokens().await;
    assert_eq!(
        notify_code(&node, None).await,
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        notify_code(&node, Some("not-a-known-token-000")).await,
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        notify_code(&node, Some(ANY_RESOLVER)).await,
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(notify_code(&node, Some(NOTIFIER)).await, None);
}

#[tokio::test]
async fn resolve_needs_a_resolver_token_allowed_its_entities() {
    let (node, _dir) = node_with_tokens().await;
    assert_eq!(
        register_code(&node, items("anon")).await,
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        register_code(&node, items("wrong-role").token(NOTIFIER)).await,
        Some(tonic::Code::PermissionDenied)
    );
    // An entity outside the token's list: refused, nothing registered.
    let docs = ResolverOptions::new("docs")
        .entity("items", FetchMode::Shared)
        .entity("docs", FetchMode::Shared)
        .token(ITEMS_RESOLVER);
    assert_eq!(
        register_code(&node, docs).await,
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(node.stats().resolvers, 0);
    // Pass-through carries every client's messages and secrets: `*` only.
    let chat = items("chat").pass_through(true).token(ITEMS_RESOLVER);
    assert_eq!(
        register_code(&node, chat).await,
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(node.stats().resolvers, 0);

    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    let _items =
        TestResolver::connect(node.grpc(), items("items").token(ITEMS_RESOLVER), &data).await;
    let _all = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("all")
            .entity("docs", FetchMode::Shared)
            .pass_through(true)
            .token(ANY_RESOLVER),
        &data,
    )
    .await;
    assert_eq!(node.stats().resolvers, 2);
    let mut client = node.client().await;
    let (_, rows) = client.subscribe("items", "1").await;
    assert_eq!(rows, vec![json!({"id": 1})]);
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let (node, _dir) = node_with_tokens().await;
    let channel = tonic::transport::Channel::from_shared(node.grpc().to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers without a token")
        .into_inner();
    assert_eq!(status.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_calling_credential() {
    let (node, _dir) = node_with_tokens().await;
    let mine = notifier_with(node.grpc(), Some(NOTIFIER)).await;
    let theirs = notifier_with(node.grpc(), Some(OTHER_NOTIFIER)).await;
    let first = theirs
        .notify_with_key([("items", "1")], "order-42")
        .await
        .unwrap();
    assert!(!first.duplicate);
    // Another notifier sent the same key first: mine is still applied.
    let applied = mine
        .notify_with_key([("items", "1")], "order-42")
        .await
        .unwrap();
    assert!(!applied.duplicate, "{applied:?}");
    assert_ne!(applied.sequences, first.sequences);
    // My own retry is a duplicate.
    let retry = mine
        .notify_with_key([("items", "1")], "order-42")
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.sequences, applied.sequences);
}

#[tokio::test]
async fn a_reload_admits_new_tokens_and_ends_the_streams_of_removed_ones() {
    let (node, dir) = node_with_tokens().await;
    let data = ResolverData::new();
    let mut removed =
        TestResolver::connect(node.grpc(), items("items").token(ITEMS_RESOLVER), &data).await;
    let _kept = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("docs")
            .entity("docs", FetchMode::Shared)
            .token(ANY_RESOLVER),
        &data,
    )
    .await;
    const NEW_NOTIFIER: &str = "notifier-token-new-000000";
    assert_eq!(
        notify_code(&node, Some(NEW_NOTIFIER)).await,
        Some(tonic::Code::Unauthenticated)
    );

    let path = dir.path().join("tokens");
    std::fs::write(
        &path,
        format!("notifier {NEW_NOTIFIER}\nresolver {ANY_RESOLVER}\n"),
    )
    .unwrap();
    assert_eq!(node.reload_credentials().unwrap(), 2);
    assert_eq!(notify_code(&node, Some(NEW_NOTIFIER)).await, None);
    assert_eq!(
        notify_code(&node, Some(NOTIFIER)).await,
        Some(tonic::Code::Unauthenticated)
    );
    // The removed token's stream is ended; its backend is refused when it
    // comes back, and gives up (a refusal for good).
    node.wait_stats("the removed credential's stream ended", |s| {
        s.resolvers == 1
    })
    .await;
    let outcome = removed.stop().await;
    assert_eq!(outcome.map_err(|e| e.kind()), Err(ErrorKind::Rejected));

    // A file that does not parse changes nothing.
    std::fs::write(&path, "root everything\n").unwrap();
    let err = node.reload_credentials().unwrap_err().to_string();
    assert!(err.contains("line 1"), "{err}");
    assert_eq!(notify_code(&node, Some(NEW_NOTIFIER)).await, None);
}

#[tokio::test]
async fn a_bad_tokens_file_stops_the_node_naming_the_line_not_the_token() {
    let dir = TempDir::new("tokens");
    let path = dir.path().join("tokens");
    std::fs::write(
        &path,
        format!("notifier {NOTIFIER}\nresolver {NOTIFIER} items\n"),
    )
    .unwrap();
    let mut config = TestNode::test_config();
    config.grpc.tokens_file = Some(path);
    let err = match TestNode::try_start(config).await {
        Err(err @ NodeError::Credentials(_)) => err.to_string(),
        Err(other) => panic!("expected a credentials error, got {other}"),
        Ok(_) => panic!("the node started with a bad tokens file"),
    };
    assert!(
        err.contains("line 2") && err.contains("earlier line"),
        "{err}"
    );
    assert!(!err.contains(NOTIFIER), "{err}");
}

#[tokio::test]
async fn sighup_reloads_the_tokens_file_of_the_binary() {
    let dir = TempDir::new("tokens");
    let path = dir.path().join("tokens");
    std::fs::write(&path, format!("notifier {NOTIFIER}\n")).unwrap();
    let mut node = NodeProcess::spawn(
        Path::new(BIN),
        &[format!("--grpc-tokens-file={}", path.display())],
        None,
        "info",
    )
    .unwrap();
    node.wait_ready(DEADLINE).await.unwrap();
    let grpc = node.grpc_url();
    let code = |token: &'static str| {
        let grpc = grpc.clone();
        async move {
            let notifier = notifier_with(&grpc, Some(token)).await;
            notifier
                .notify([("items", "1")])
                .await
                .err()
                .and_then(|e| e.code())
        }
    };
    assert_eq!(
        code(OTHER_NOTIFIER).await,
        Some(tonic::Code::Unauthenticated)
    );
    std::fs::write(&path, format!("notifier {OTHER_NOTIFIER}\n")).unwrap();
    node.guard().signal(libc::SIGHUP);
    let deadline = Instant::now() + DEADLINE;
    while code(OTHER_NOTIFIER).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the tokens file"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(code(NOTIFIER).await, Some(tonic::Code::Unauthenticated));
    node.guard()
        .check_alive()
        .expect("SIGHUP does not stop the node");
}

#[test]
fn an_exposed_grpc_port_without_credentials_is_refused() {
    let out = Command::new(BIN)
        .args(["--ws-addr", "127.0.0.1:0", "--grpc-addr", "0.0.0.0:0"])
        .env_remove("ENTITY_SYNC_GRPC_INSECURE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for flag in [
        "--grpc-tokens-file",
        "--grpc-tls-client-ca",
        "--grpc-insecure",
    ] {
        assert!(stderr.contains(flag), "{flag} missing from: {stderr}");
    }
}

#[tokio::test]
async fn no_secret_or_token_reaches_the_log_even_at_trace_level() {
    const SECRET: &str = "client-secret-do-not-log-42";
    let dir = TempDir::new("tokens");
    let path = dir.path().join("tokens");
    std::fs::write(&path, tokens_text()).unwrap();
    let log = dir.path().join("node.log");
    // Subscribe tokens too: one that verifies, one that does not (signed
    // with another secret under the same kid).
    let signer = entity_sync_backend::SubscribeTokenSigner::hs256(
        "k1",
        b"jwks-secret-do-not-log-0123456789",
    )
    .unwrap();
    let forger = entity_sync_backend::SubscribeTokenSigner::hs256(
        "k1",
        b"forged-secret-do-not-log-01234567",
    )
    .unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, entity_sync_backend::jwks(&[&signer])).unwrap();
    let ttl = Duration::from_secs(60);
    let (good, bad) = (
        signer.sign("docs", &["1"], ttl).unwrap(),
        forger.sign("docs", &["1"], ttl).unwrap(),
    );
    let mut node = NodeProcess::spawn(
        Path::new(BIN),
        // A push per notify, rows changed or not (the test notifies unchanged rows).
        &[
            format!("--grpc-tokens-file={}", path.display()),
            format!("--subscribe-token-jwks={}", jwks.display()),
            "--push-unchanged-rows".into(),
        ],
        Some(&log),
        "trace",
    )
    .unwrap();
    node.wait_ready(DEADLINE).await.unwrap();
    let data = ResolverData::new();
    data.set_rows("docs", "1", &[r#"{"id":1}"#]);
    let _resolver = TestResolver::connect(
        &node.grpc_url(),
        ResolverOptions::new("docs")
            .entity("docs", FetchMode::PerSubscriber)
            .pass_through(true)
            .token(ANY_RESOLVER),
        &data,
    )
    .await;
    let mut client = WsClient::connect(&node.ws_url()).await;
    client.send_secret(SECRET).await;
    client.subscribe("docs", "1").await;
    client.send_json(json!({"say": "hello"})).await;
    let mut with_tokens = WsClient::connect(&node.ws_url()).await;
    with_tokens.send_secret(SECRET).await;
    with_tokens
        .send_json(
            json!({"action": "subscribe", "body": {"entity": "docs", "id": "1", "token": bad}}),
        )
        .await;
    with_tokens
        .expect_error("token_invalid", Some(("docs", "1")))
        .await;
    with_tokens
        .send_json(
            json!({"action": "subscribe", "body": {"entity": "docs", "id": "1", "token": good}}),
        )
        .await;
    with_tokens.expect_subscribed("docs", "1").await;
    with_tokens.expect_push("docs", "1").await;
    with_tokens.close().await;
    let seq = common::notify::notifier_with(&node.grpc_url(), Some(NOTIFIER))
        .await
        .notify([("docs", "1")])
        .await
        .unwrap()
        .sequences[0];
    client.push_at_least("docs", "1", seq).await;
    client.close().await;
    let exited = node.terminate(Duration::from_secs(15)).await;
    assert!(exited.is_some(), "the node exits on SIGTERM");

    let text = std::fs::read_to_string(&log).unwrap();
    // `RUST_LOG=trace` took effect: dependencies log at debug level (their
    // trace output, which would carry the secret, is what the node drops).
    assert!(
        text.lines().filter(|l| l.contains("DEBUG")).count() > 10,
        "the node logged (almost) nothing at debug level:\n{text}"
    );
    let jwk_secret = signer.jwk()["k"].as_str().unwrap().to_owned();
    let signatures = [&good, &bad].map(|t| t.rsplit('.').next().unwrap().to_owned());
    for needle in [SECRET, NOTIFIER, ANY_RESOLVER, &good, &bad, &jwk_secret]
        .into_iter()
        .chain(signatures.iter().map(String::as_str))
    {
        assert!(!text.contains(needle), "{needle} is in the log");
    }
    assert!(
        text.contains("subscribe token refused") && text.contains("subscribe token accepted"),
        "the token checks are logged (without the tokens)"
    );
}

#[tokio::test]
async fn a_notifier_with_an_entity_list_may_notify_only_those_entities() {
    let (node, _dir) = node_with_tokens().await;
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    data.set_rows("docs", "1", &[r#"{"id":1}"#]);
    let _resolver = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("all")
            .entity("items", FetchMode::Shared)
            .entity("docs", FetchMode::Shared)
            .token(ANY_RESOLVER),
        &data,
    )
    .await;
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    client.subscribe("docs", "1").await;

    let scoped = notifier_with(node.grpc(), Some(ITEMS_NOTIFIER)).await;
    let refused = scoped
        .notify([("items", "1"), ("docs", "1")])
        .await
        .expect_err("docs is outside the notifier's list");
    assert_eq!(
        refused.code(),
        Some(tonic::Code::PermissionDenied),
        "{refused}"
    );
    assert!(refused.message().contains("\"docs\""), "{refused}");
    // Nothing of the call was stored: not even the allowed key is pushed.
    client.expect_silence(common::SILENCE).await;

    let receipt = scoped.notify([("items", "1")]).await.unwrap();
    client
        .push_at_least("items", "1", receipt.sequences[0])
        .await;
    // An unscoped notifier still notifies anything.
    assert_eq!(notify_code(&node, Some(NOTIFIER)).await, None);
}

#[tokio::test]
async fn one_credential_cannot_take_every_resolver_slot() {
    let dir = TempDir::new("tokens");
    let path = dir.path().join("tokens");
    std::fs::write(&path, tokens_text()).unwrap();
    let node = TestNode::start(|c| {
        c.grpc.tokens_file = Some(path);
        c.grpc.max_resolver_streams_per_credential = 2;
    })
    .await;
    let data = ResolverData::new();
    let mut first =
        TestResolver::connect(node.grpc(), items("items-1").token(ITEMS_RESOLVER), &data).await;
    let _second =
        TestResolver::connect(node.grpc(), items("items-2").token(ITEMS_RESOLVER), &data).await;
    let refused =
        TestResolver::try_connect(node.grpc(), items("items-3").token(ITEMS_RESOLVER), &data)
            .await
            .err()
            .expect("a third stream of the same credential is refused");
    assert_eq!(
        refused.code(),
        Some(tonic::Code::ResourceExhausted),
        "{refused}"
    );
    assert!(
        refused
            .message()
            .contains("--max-resolver-streams-per-credential"),
        "{refused}"
    );
    // Another credential still registers.
    let _other = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("other")
            .entity("items", FetchMode::Shared)
            .token(ANY_RESOLVER),
        &data,
    )
    .await;
    assert_eq!(node.stats().resolvers, 3);
    // A stream that ends gives its slot back.
    first.stop().await.unwrap();
    node.wait_stats("the first stream ended", |s| s.resolvers == 2)
        .await;
    let _third =
        TestResolver::connect(node.grpc(), items("items-3").token(ITEMS_RESOLVER), &data).await;
}

/// Polls `log` until it contains `needle`.
async fn wait_for_log(log: &Path, needle: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if std::fs::read_to_string(log).is_ok_and(|text| text.contains(needle)) {
            return;
        }
        assert!(Instant::now() < deadline, "{needle:?} never logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_credential_removed_before_register_ends_the_stream_without_requests() {
    use entity_sync_backend::proto::v1::{
        EntityRegistration, NodeMessage, Register, ResolverMessage,
        entity_sync_client::EntitySyncClient, node_message, resolver_message,
    };
    let dir = TempDir::new("tokens");
    let path = dir.path().join("tokens");
    std::fs::write(&path, tokens_text()).unwrap();
    let log = dir.path().join("node.log");
    let mut node = NodeProcess::spawn(
        Path::new(BIN),
        &[format!("--grpc-tokens-file={}", path.display())],
        Some(&log),
        "info,entity_sync=debug",
    )
    .unwrap();
    node.wait_ready(DEADLINE).await.unwrap();

    // A Resolve stream with a valid token, and no Register yet.
    let mut grpc = EntitySyncClient::connect(node.grpc_url()).await.unwrap();
    let (messages, outbound) = tokio::sync::mpsc::channel::<ResolverMessage>(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ITEMS_RESOLVER}").parse().unwrap(),
    );
    let call = tokio::spawn(async move { grpc.resolve(request).await });
    wait_for_log(&log, "waiting for its Register").await;

    // The token goes (SIGHUP) while the stream waits; then its Register comes.
    std::fs::write(
        &path,
        format!("resolver {ANY_RESOLVER}\nnotifier {NOTIFIER}\n"),
    )
    .unwrap();
    node.guard().signal(libc::SIGHUP);
    wait_for_log(&log, "tokens file reloaded").await;
    // (The node may have ended the call already: then there is no one to send to.)
    let _ = messages
        .send(ResolverMessage {
            kind: Some(resolver_message::Kind::Register(Register {
                name: "late".into(),
                entities: vec![EntityRegistration {
                    entity: "items".into(),
                    fetch_mode: FetchMode::Shared as i32,
                    refresh_interval_ms: 0,
                }],
                ..Register::default()
            })),
        })
        .await;
    // A subscriber whose key (and secret) the stream would be asked for.
    let mut client = WsClient::connect(&node.ws_url()).await;
    client.send_secret("subscriber-secret-0000").await;
    client.send_subscribe("items", "1").await;

    let answered = tokio::time::timeout(DEADLINE, call)
        .await
        .expect("the call ends")
        .unwrap();
    let status = match answered {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                let message = tokio::time::timeout(DEADLINE, stream.message())
                    .await
                    .expect("the stream of a removed credential ends");
                match message {
                    Err(status) => break status,
                    Ok(Some(NodeMessage {
                        kind: Some(node_message::Kind::Request(request)),
                    })) => panic!(
                        "a removed credential's stream was asked to resolve {:?}",
                        request.ids
                    ),
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended without a status"),
                }
            }
        }
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    client
        .expect_error("no_resolver", Some(("items", "1")))
        .await;
}

/// Runs the binary with `args` until it exits (killed after 10 s): its exit
/// code (`None` if it had to be killed) and stderr.
fn run_until_exit(args: &[&str]) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("ENTITY_SYNC_GRPC_INSECURE")
        .env_remove("ENTITY_SYNC_GRPC_ALLOW_CLEARTEXT_TOKENS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (code, stderr)
}

#[test]
fn bearer_tokens_on_an_exposed_grpc_port_need_tls() {
    let dir = TempDir::new("tokens");
    let path = dir.path().join("tokens");
    std::fs::write(&path, tokens_text()).unwrap();
    let tokens = format!("--grpc-tokens-file={}", path.display());
    let (code, stderr) = run_until_exit(&[
        "--ws-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "0.0.0.0:0",
        &tokens,
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    for flag in [
        "--grpc-tls-cert",
        "--grpc-tls-key",
        "--grpc-allow-cleartext-tokens",
    ] {
        assert!(stderr.contains(flag), "{flag} missing from: {stderr}");
    }
    for token in [NOTIFIER, ITEMS_RESOLVER] {
        assert!(!stderr.contains(token), "{stderr}");
    }
}
