//! TLS on both ports: gRPC over TLS and mutual TLS with the backend SDK,
//! `wss://` and `https://` on the websocket port, plaintext refused on TLS
//! ports, handshakes that never finish, and bad TLS flags.

use entity_sync_testkit as common;

use std::{process::Command, time::Duration};

use common::{
    DEADLINE, NodeProcess, ResolverData, ResolverOptions, TestCa, TestNode, TestResolver, TlsFiles,
    WssClient, connect, connect_wss,
    http::{http_get, https_get},
    ws::ConnectOptions,
};
use entity_sync::config::Config;
use entity_sync_backend::{ErrorKind, FetchMode, Notifier, NotifierBuilder, Tls};
use tokio::{io::AsyncReadExt, time::timeout};

const BIN: &str = env!("CARGO_BIN_EXE_entity-sync");

fn grpc_tls(config: &mut Config, files: &TlsFiles) {
    config.grpc.tls_cert = Some(files.server_cert.clone());
    config.grpc.tls_key = Some(files.server_key.clone());
}

fn grpc_mtls(config: &mut Config, files: &TlsFiles) {
    grpc_tls(config, files);
    config.grpc.tls_client_ca = Some(files.ca_cert.clone());
}

fn ws_tls(config: &mut Config, files: &TlsFiles) {
    config.ws.tls_cert = Some(files.server_cert.clone());
    config.ws.tls_key = Some(files.server_key.clone());
}

fn resolver_options(tls: Option<Tls>) -> ResolverOptions {
    let options = ResolverOptions::new("svc").entity("items", FetchMode::Shared);
    match tls {
        Some(tls) => options.tls(tls),
        None => options,
    }
}

/// Connects and calls `Notify(items/1)` once, without retries: the first failure.
async fn notify_once(builder: NotifierBuilder) -> Result<u64, entity_sync_backend::Error> {
    let notifier = builder
        .retry_for(Duration::ZERO)
        .call_timeout(DEADLINE)
        .connect()
        .await?;
    let receipt = notifier.notify([("items", "1")]).await?;
    Ok(receipt.sequences[0])
}

/// A call the node refused at the transport, after the client's side of the
/// TLS handshake was done (in TLS 1.3 the server checks the client's
/// certificate after that). How tonic reports it depends on timing: UNKNOWN
/// "transport error" with the node's alert (`alert`) when the client read it,
/// or the broken or closed connection (UNKNOWN or CANCELLED) when the client
/// wrote first. The exact alert is checked by [`raw_handshake_alert`].
fn assert_refused_at_transport(err: &entity_sync_backend::Error, what: &str, alert: &str) {
    assert_eq!(err.kind(), ErrorKind::Stream, "{what}: {err}");
    assert!(
        matches!(
            err.code(),
            Some(tonic::Code::Unknown | tonic::Code::Cancelled)
        ),
        "{what}: {err}"
    );
    let message = err.message();
    assert!(
        message.ends_with(&format!("received fatal alert: {alert}"))
            || message.ends_with("stream closed because of a broken pipe")
            || message.ends_with("connection closed")
            || message.contains("connection reset"),
        "{what}: {err}"
    );
}

/// A plaintext HTTP/2 client on a TLS port: the node reads its preface as a
/// bad TLS record and hangs up, which tonic reports as UNKNOWN or CANCELLED
/// (timing) with the connection's end as the cause.
fn assert_closed_by_the_node(err: &entity_sync_backend::Error) {
    assert_eq!(err.kind(), ErrorKind::Stream, "{err}");
    assert!(
        matches!(
            err.code(),
            Some(tonic::Code::Unknown | tonic::Code::Cancelled)
        ),
        "{err}"
    );
    let message = err.message();
    assert!(
        message.ends_with("stream closed because of a broken pipe")
            || message.ends_with("connection closed")
            || message.contains("connection reset"),
        "{err}"
    );
}

/// Does a TLS handshake with `addr` as rustls (trusting `ca_pem`, presenting
/// `identity`), then reads without writing: returns what the read gave, the
/// node's alert (`received fatal alert: ...`) when it refused the client.
async fn raw_handshake_alert(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&common::CertKey>,
) -> String {
    use std::sync::Arc;
    use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
    let mut config = common::tls::client_config(ca_pem, identity).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(addr.ip().to_string()).unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the client's side of the handshake completes");
    let mut buf = [0u8; 64];
    match timeout(DEADLINE, tls.read(&mut buf)).await {
        Err(_) => "no answer".into(),
        Ok(Ok(n)) => format!("read {n} bytes"),
        Ok(Err(err)) => err.to_string(),
    }
}

/// [`notify_once`] must fail at the transport, see [`assert_refused_at_transport`].
fn assert_notify_refused(
    outcome: Result<u64, entity_sync_backend::Error>,
    what: &str,
    alert: &str,
) {
    assert_refused_at_transport(&outcome.expect_err(what), what, alert);
}

#[tokio::test]
async fn grpc_over_tls_registers_resolvers_and_notifies_with_the_sdk() {
    let files = TlsFiles::new();
    let node = TestNode::start(|c| grpc_tls(c, &files)).await;
    assert!(node.grpc().starts_with("https://"), "{}", node.grpc());
    assert!(!node.grpc_client_auth());
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"v":1}"#]);
    let _resolver =
        TestResolver::connect(node.grpc(), resolver_options(Some(files.sdk())), &data).await;

    let mut client = node.client().await;
    let (_, rows) = client.subscribe("items", "1").await;
    assert_eq!(rows, vec![serde_json::json!({"v": 1})]);

    data.set_rows("items", "1", &[r#"{"v":2}"#]);
    let seq = notify_once(Notifier::builder(node.grpc()).tls(files.sdk()))
        .await
        .expect("notify over TLS");
    let (version, rows) = client.push_at_least("items", "1", seq).await;
    assert_eq!(version, seq);
    assert_eq!(rows, vec![serde_json::json!({"v": 2})]);
}

#[tokio::test]
async fn plaintext_grpc_is_refused_on_the_tls_port() {
    let files = TlsFiles::new();
    let node = TestNode::start(|c| grpc_tls(c, &files)).await;
    let plain = format!("http://{}", node.grpc_addr());

    let err = notify_once(Notifier::builder(plain.clone()))
        .await
        .expect_err("plaintext notify on a TLS port");
    assert_eq!(err.code(), Some(tonic::Code::Unknown), "{err}");
    assert!(
        err.message()
            .starts_with("transport error: connection error: "),
        "{err}"
    );
    let err = TestResolver::try_connect(&plain, resolver_options(None), &ResolverData::new())
        .await
        .err()
        .expect("plaintext resolver refused");
    assert_closed_by_the_node(&err);
    assert_eq!(node.stats().resolvers, 0);

    // A client that does not trust the node's CA refuses the node.
    let stranger = TestCa::new("another CA");
    let err = notify_once(
        Notifier::builder(node.grpc()).tls(Tls::new().ca_certificate(stranger.cert_pem())),
    )
    .await
    .expect_err("notify trusting another CA");
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(
        err.message()
            .ends_with("transport error: invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn mutual_tls_admits_only_certificates_the_configured_ca_signed() {
    let files = TlsFiles::new();
    let node = TestNode::start(|c| grpc_mtls(c, &files)).await;
    assert!(node.grpc_client_auth());
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"v":1}"#]);

    // No client certificate.
    assert_notify_refused(
        notify_once(Notifier::builder(node.grpc()).tls(files.sdk())).await,
        "notify without a client certificate",
        "CertificateRequired",
    );
    let err = TestResolver::try_connect(node.grpc(), resolver_options(Some(files.sdk())), &data)
        .await
        .err()
        .expect("resolver without a client certificate refused");
    assert_refused_at_transport(
        &err,
        "resolver without a certificate",
        "CertificateRequired",
    );

    // A client certificate another CA signed.
    let other = TestCa::new("another CA").client_cert("intruder");
    let forged = files.sdk().identity(&other.cert_pem, &other.key_pem);
    assert_notify_refused(
        notify_once(Notifier::builder(node.grpc()).tls(forged.clone())).await,
        "notify with another CA's certificate",
        "UnknownCA",
    );
    let err = TestResolver::try_connect(node.grpc(), resolver_options(Some(forged)), &data)
        .await
        .err()
        .expect("resolver with another CA's certificate refused");
    assert_refused_at_transport(&err, "resolver with another CA's certificate", "UnknownCA");
    assert_eq!(node.stats().resolvers, 0, "nothing registered");

    // What the node answered, exactly.
    assert_eq!(
        raw_handshake_alert(node.grpc_addr(), &files.ca_pem(), None).await,
        "received fatal alert: CertificateRequired"
    );
    assert_eq!(
        raw_handshake_alert(node.grpc_addr(), &files.ca_pem(), Some(&other)).await,
        "received fatal alert: UnknownCA"
    );
    // With the right certificate the node speaks HTTP/2 first (its SETTINGS).
    let answer = raw_handshake_alert(node.grpc_addr(), &files.ca_pem(), Some(&files.client)).await;
    assert!(answer.starts_with("read "), "{answer}");

    // The configured CA's client certificate: resolver and notifier work.
    let _resolver = TestResolver::connect(
        node.grpc(),
        resolver_options(Some(files.sdk_with_client_cert())),
        &data,
    )
    .await;
    assert_eq!(node.stats().resolvers, 1);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    data.set_rows("items", "1", &[r#"{"v":2}"#]);
    let seq = notify_once(Notifier::builder(node.grpc()).tls(files.sdk_with_client_cert()))
        .await
        .expect("notify with the right client certificate");
    let (_, rows) = client.push_at_least("items", "1", seq).await;
    assert_eq!(rows, vec![serde_json::json!({"v": 2})]);
}

#[tokio::test]
async fn wss_subscribes_gets_snapshot_and_pushes_and_plain_ws_fails() {
    let files = TlsFiles::new();
    let (node, _resolver, data) = TestNode::start_with_resolver(
        |c| ws_tls(c, &files),
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
    )
    .await;
    assert!(node.ws_url().starts_with("wss://"), "{}", node.ws_url());
    data.set_rows("items", "1", &[r#"{"v":1}"#]);

    let mut client = WssClient::connect_tls(node.ws_url(), &files.ca_pem()).await;
    let (_, rows) = client.subscribe("items", "1").await;
    assert_eq!(rows, vec![serde_json::json!({"v": 1})]);
    data.set_rows("items", "1", &[r#"{"v":2}"#]);
    let seq = common::notify_one(node.grpc(), "items", "1").await;
    let (_, rows) = client.push_at_least("items", "1", seq).await;
    assert_eq!(rows, vec![serde_json::json!({"v": 2})]);

    // Plain ws:// on the TLS port: no websocket.
    let plain = format!("ws://{}/ws/entity-sync/", node.ws_addr());
    let outcome = timeout(DEADLINE, connect(&plain, &ConnectOptions::default()))
        .await
        .expect("a plain handshake is answered (refused), not left hanging");
    assert!(outcome.is_err(), "plain ws:// worked on the TLS port");
    // A client that does not trust the node's CA gets no websocket.
    let stranger = TestCa::new("another CA");
    let err = connect_wss(node.ws_url(), &stranger.cert_pem())
        .await
        .expect_err("wss trusting another CA refused");
    assert!(
        err.ends_with("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    assert_eq!(node.stats().connections, 1, "only the trusted wss client");
}

#[tokio::test]
async fn https_serves_health_readiness_and_metrics_and_plain_http_fails() {
    let files = TlsFiles::new();
    let node = TestNode::start(|c| ws_tls(c, &files)).await;
    let ca = files.ca_pem();
    assert_eq!(
        https_get(node.ws_addr(), "/healthz", &ca).await,
        Ok((200, "ok\n".into()))
    );
    assert_eq!(
        https_get(node.ws_addr(), "/readyz", &ca).await,
        Ok((200, "ready\n".into()))
    );
    let (status, body) = https_get(node.ws_addr(), "/metrics", &ca).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("entity_sync_connections"), "{body}");
    let plain = http_get(node.ws_addr(), "/healthz").await;
    assert!(
        plain.is_err(),
        "plain HTTP answered on the TLS port: {plain:?}"
    );
}

#[tokio::test]
async fn shutdown_closes_wss_clients_with_1001() {
    let files = TlsFiles::new();
    let mut node = TestNode::start(|c| ws_tls(c, &files)).await;
    let mut client = WssClient::connect_tls(node.ws_url(), &files.ca_pem()).await;
    node.wait_stats("connected", |s| s.connections == 1).await;
    node.shutdown().await;
    assert_eq!(client.recv_close().await, 1001);
}

#[tokio::test]
async fn a_stalled_handshake_blocks_no_one_and_is_closed_after_the_timeout() {
    let files = TlsFiles::new();
    let node = TestNode::start(|c| ws_tls(c, &files)).await;
    // Connects and never sends a ClientHello.
    let mut stalled = tokio::net::TcpStream::connect(node.ws_addr())
        .await
        .unwrap();

    let mut client = WssClient::connect_tls(node.ws_url(), &files.ca_pem()).await;
    client.send_subscribe("items", "1").await;
    client
        .expect_error("no_resolver", Some(("items", "1")))
        .await;
    assert_eq!(
        https_get(node.ws_addr(), "/healthz", &files.ca_pem()).await,
        Ok((200, "ok\n".into()))
    );

    // Closed once the handshake timeout (10 s) passed, not before.
    let mut byte = [0u8; 1];
    let early = timeout(Duration::from_secs(5), stalled.read(&mut byte)).await;
    assert!(early.is_err(), "closed too early: {early:?}");
    let read = timeout(Duration::from_secs(10), stalled.read(&mut byte))
        .await
        .expect("the stalled socket is closed after the handshake timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn unusable_tls_files_stop_the_node_at_start_naming_flag_and_path() {
    let files = TlsFiles::new();
    let start = |modify: &dyn Fn(&mut Config)| {
        let mut config = TestNode::test_config();
        modify(&mut config);
        async move {
            TestNode::try_start(config)
                .await
                .err()
                .expect("refused")
                .to_string()
        }
    };

    let missing = files.dir().join("missing.pem");
    let err = start(&|c| {
        grpc_tls(c, &files);
        c.grpc.tls_cert = Some(missing.clone());
    })
    .await;
    assert!(
        err.starts_with(&format!(
            "TLS: --grpc-tls-cert {}: cannot read: ",
            missing.display()
        )),
        "{err}"
    );

    // A "key" that is a certificate, with text that must not be echoed.
    let not_a_key = files.dir().join("not-a-key.pem");
    std::fs::write(
        &not_a_key,
        format!("MARKER-hunter2\n{}", files.server.cert_pem),
    )
    .unwrap();
    let err = start(&|c| {
        ws_tls(c, &files);
        c.ws.tls_key = Some(not_a_key.clone());
    })
    .await;
    assert_eq!(
        err,
        format!(
            "TLS: --ws-tls-key {}: no PEM private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY \
             or EC PRIVATE KEY) in the file",
            not_a_key.display()
        )
    );
    assert!(!err.contains("hunter2"));

    // The client's key is not the server certificate's.
    let err = start(&|c| {
        grpc_tls(c, &files);
        c.grpc.tls_key = Some(files.client_key.clone());
    })
    .await;
    assert!(
        err.starts_with("TLS: --grpc-tls-cert/--grpc-tls-key: "),
        "{err}"
    );

    let garbage = files.dir().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nMARKER-hunter2\n").unwrap();
    let err = start(&|c| {
        grpc_mtls(c, &files);
        c.grpc.tls_client_ca = Some(garbage.clone());
    })
    .await;
    assert_eq!(
        err,
        format!(
            "TLS: --grpc-tls-client-ca {}: not valid PEM: a section has no END line",
            garbage.display()
        )
    );
}

/// Runs the binary with `args` (on ports it may not keep) and `env`;
/// (exit code, stderr).
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["--ws-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_tls_flag_combinations_exit_1_with_a_message_naming_the_flags() {
    let (code, stderr) = run_binary(&["--grpc-tls-cert", "/c.pem"], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--grpc-tls-cert and --grpc-tls-key go together: give both, or neither"),
        "{stderr}"
    );
    let (code, stderr) = run_binary(&["--grpc-tls-key", "/k.pem"], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--grpc-tls-cert and --grpc-tls-key go together"),
        "{stderr}"
    );
    let (code, stderr) = run_binary(&["--grpc-tls-client-ca", "/ca.pem"], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key"),
        "{stderr}"
    );
    // Environment variables count like flags.
    let (code, stderr) = run_binary(&[], &[("ENTITY_SYNC_WS_TLS_CERT", "/c.pem")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--ws-tls-cert and --ws-tls-key go together: give both, or neither"),
        "{stderr}"
    );
    let (code, stderr) = run_binary(
        &[],
        &[
            ("ENTITY_SYNC_GRPC_TLS_CERT", "/nonexistent/c.pem"),
            ("ENTITY_SYNC_GRPC_TLS_KEY", "/nonexistent/k.pem"),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("TLS: --grpc-tls-cert /nonexistent/c.pem: cannot read: "),
        "{stderr}"
    );
    // The cause is said once, not once per level of the error chain.
    assert_eq!(stderr.matches("cannot read").count(), 1, "{stderr}");
}

#[tokio::test]
async fn the_binary_serves_wss_and_mutual_tls_grpc() {
    let files = TlsFiles::new();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let args = [
        format!("--grpc-tls-cert={}", path(&files.server_cert)),
        format!("--grpc-tls-key={}", path(&files.server_key)),
        format!("--grpc-tls-client-ca={}", path(&files.ca_cert)),
        format!("--ws-tls-cert={}", path(&files.server_cert)),
        format!("--ws-tls-key={}", path(&files.server_key)),
        // A push per notify, rows changed or not (the test notifies unchanged rows).
        "--push-unchanged-rows".to_owned(),
    ];
    let node = NodeProcess::spawn(std::path::Path::new(BIN), &args, None, "info").unwrap();
    let ca = files.ca_pem();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while https_get(node.ws, "/readyz", &ca).await != Ok((200, "ready\n".into())) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node not ready over https"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let grpc = format!("https://{}", node.grpc);
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"v":1}"#]);
    let _resolver = TestResolver::connect(
        &grpc,
        resolver_options(Some(files.sdk_with_client_cert())),
        &data,
    )
    .await;
    let url = format!("wss://{}/ws/entity-sync/", node.ws);
    let mut client = WssClient::connect_tls(&url, &ca).await;
    client.subscribe("items", "1").await;
    data.set_rows("items", "1", &[r#"{"v":2}"#]);
    let seq = notify_once(Notifier::builder(grpc.clone()).tls(files.sdk_with_client_cert()))
        .await
        .expect("notify with a client certificate");
    let (_, rows) = client.push_at_least("items", "1", seq).await;
    assert_eq!(rows, vec![serde_json::json!({"v": 2})]);
    assert_notify_refused(
        notify_once(Notifier::builder(grpc).tls(files.sdk())).await,
        "notify without a client certificate",
        "CertificateRequired",
    );
    // The notify subcommand, with the client certificate.
    let out = {
        let (server, ca, cert, key) = (
            format!("https://{}", node.grpc),
            path(&files.ca_cert),
            path(&files.client_cert),
            path(&files.client_key),
        );
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["notify", "--server", &server, "--tls-ca", &ca])
                .args(["--tls-cert", &cert, "--tls-key", &key, "items/1"])
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (version, _) = client.push_at_least("items", "1", seq + 1).await;
    assert_eq!(version, seq + 1);
    // A plain websocket on the TLS port is refused.
    let plain = format!("ws://{}/ws/entity-sync/", node.ws);
    assert!(connect(&plain, &ConnectOptions::default()).await.is_err());
}

#[tokio::test]
async fn a_stalled_grpc_tls_handshake_is_closed_after_the_grpc_handshake_timeout() {
    let files = TlsFiles::new();
    let node = TestNode::start(|c| {
        grpc_tls(c, &files);
        c.grpc.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    let started = std::time::Instant::now();
    // Connects and never sends a ClientHello.
    let mut stalled = tokio::net::TcpStream::connect(node.grpc_addr())
        .await
        .unwrap();
    // Others are served meanwhile.
    notify_once(Notifier::builder(node.grpc()).tls(files.sdk()))
        .await
        .expect("notify over TLS while a handshake stalls");
    let mut byte = [0u8; 1];
    let read = timeout(Duration::from_secs(5), stalled.read(&mut byte))
        .await
        .expect("the stalled socket is closed after --grpc-handshake-timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// The files of `deploy/grpc/make-certs.sh` serve the gRPC port, with
/// tokens, to a backend that trusts the script's CA (as the compose demo does).
#[tokio::test]
async fn the_deploy_grpc_certificates_serve_tokens_over_tls() {
    let dir = common::process::TempDir::new("grpc-certs");
    let made = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grpc/make-certs.sh"
    ))
    .arg(dir.path())
    .output()
    .expect("deploy/grpc/make-certs.sh runs (it needs openssl)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    const TOKEN: &str = "notifier-token-0123456789";
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("notifier {TOKEN}\n")).unwrap();
    let (cert, key) = (
        dir.path().join("server.pem"),
        dir.path().join("server-key.pem"),
    );
    let node = TestNode::start(move |c| {
        c.grpc.tls_cert = Some(cert);
        c.grpc.tls_key = Some(key);
        c.grpc.tokens_file = Some(tokens);
    })
    .await;
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    notify_once(
        Notifier::builder(node.grpc())
            .tls(Tls::new().ca_certificate(ca))
            .bearer_token(TOKEN),
    )
    .await
    .expect("notify over the deploy certificates");
}
