//! Signed subscribe tokens (`--subscribe-token-jwks`): a valid token
//! authorizes a subscribe without a resolver's say (a SHARED key's snapshot
//! comes from the node cache, or one shared resolve); a refused token gets
//! `token_invalid` or `token_expired` and costs no backend call; a held key
//! ends with `token_expired` when its token runs out, unless a newer token
//! renewed it (no resolve, no push); the keys are re-read on SIGHUP.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use entity_sync_testkit as common;

use common::{
    NodeProcess, ResolverOptions, TestNode, TestResolver, notify_one, process::TempDir,
    ws::WsClient,
};
use entity_sync_backend::{FetchMode, Reason};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_entity-sync");
const SECRET_K1: &[u8] = b"k1-secret-k1-secret-k1-secret-k1";
const SECRET_K2: &[u8] = b"k2-secret-k2-secret-k2-secret-k2";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn oct(kid: &str, secret: &[u8]) -> Value {
    json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": b64(secret)})
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token of `kid` over `claims`.
fn hs256(kid: &str, secret: &[u8], claims: Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// A k1 token for `entity` / `ids`, valid for `ttl` seconds.
fn token(entity: &str, ids: &[&str], ttl: i64) -> String {
    hs256(
        "k1",
        SECRET_K1,
        json!({"exp": now() as i64 + ttl, "entity": entity, "ids": ids, "sub": "user-7"}),
    )
}

fn subscribe(entity: &str, id: &str, token: &str) -> Value {
    json!({"action": "subscribe", "body": {"entity": entity, "id": id, "token": token}})
}

fn resume(entity: &str, id: &str, version: u64, token: &str) -> Value {
    json!({"action": "subscribe", "body": {"entity": entity, "id": id, "version": version, "token": token}})
}

fn current(entity: &str, id: &str) -> Value {
    json!({"action": "subscribed", "body": {"entity": entity, "id": id, "current": true}})
}

/// The JWKS file of a test and the directory it lives in.
struct Jwks {
    _dir: TempDir,
    path: PathBuf,
}

impl Jwks {
    fn new(keys: &[Value]) -> Jwks {
        let dir = TempDir::new("jwks");
        let path = dir.path().join("jwks.json");
        let jwks = Jwks { _dir: dir, path };
        jwks.write(keys);
        jwks
    }

    fn write(&self, keys: &[Value]) {
        std::fs::write(&self.path, json!({ "keys": keys }).to_string()).unwrap();
    }
}

/// A node verifying tokens with `jwks` (and `audience`), with a resolver of
/// `items` (SHARED) and `docs` (PER_SUBSCRIBER).
async fn node(
    jwks: &Path,
    audience: Option<&str>,
) -> (TestNode, TestResolver, common::ResolverData) {
    let (path, audience) = (jwks.to_owned(), audience.map(str::to_owned));
    TestNode::start_with_resolver(
        move |c| {
            c.ws.subscribe_token_jwks = Some(path);
            c.ws.subscribe_token_audience = audience;
        },
        ResolverOptions::new("backend")
            .entity("items", FetchMode::Shared)
            .entity("docs", FetchMode::PerSubscriber),
    )
    .await
}

/// The requests the resolver saw, as (reason, ids, secret, shared).
fn seen(resolver: &TestResolver) -> Vec<(Reason, Vec<String>, String, bool)> {
    resolver
        .requests()
        .into_iter()
        .map(|r| (r.reason, r.ids, r.secret, r.shared))
        .collect()
}

#[tokio::test]
async fn a_valid_token_opens_a_shared_key_with_one_shared_resolve_then_none() {
    let jwks = Jwks::new(&[oct("k1", SECRET_K1)]);
    let (node, resolver, data) = node(&jwks.path, None).await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let token = token("items", &["1", "2"], 60);

    // Cold: one shared resolve (reason SUBSCRIBE, empty secret).
    let mut first = node.client().await;
    first.send_secret("not-asked").await;
    first.send_json(subscribe("items", "1", &token)).await;
    first.expect_subscribed("items", "1").await;
    let (version, rows) = first.expect_push("items", "1").await;
    assert_eq!(rows, [json!({"n": 1})]);
    assert_eq!(
        seen(&resolver),
        [(Reason::Subscribe, vec!["1".to_owned()], String::new(), true)]
    );

    // Warm: the node cache's rows, no resolve.
    let mut second = node.client().await;
    second.send_json(subscribe("items", "1", &token)).await;
    second.expect_subscribed("items", "1").await;
    assert_eq!(
        second.expect_push("items", "1").await,
        (version, vec![json!({"n": 1})])
    );
    // With the version it holds: current, nothing at all.
    let mut third = node.client().await;
    third.send_json(resume("items", "1", version, &token)).await;
    assert_eq!(third.recv_json().await, current("items", "1"));
    third.silent().await;
    assert_eq!(resolver.requests().len(), 1, "{:?}", seen(&resolver));

    // Every one of them is live: a change reaches all three.
    data.set_rows("items", "1", &[r#"{"n":2}"#]);
    let changed = notify_one(node.grpc(), "items", "1").await;
    for client in [&mut first, &mut second, &mut third] {
        assert_eq!(
            client.expect_push("items", "1").await,
            (changed, vec![json!({"n": 2})])
        );
    }
    assert_eq!(
        node.metric("entity_sync_subscribe_tokens_total{result=\"valid\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn concurrent_token_subscribes_of_a_cold_key_join_one_shared_resolve() {
    let jwks = Jwks::new(&[oct("k1", SECRET_K1)]);
    let (node, resolver, data) = node(&jwks.path, None).await;
    data.set_rows("items", "5", &[r#"{"n":5}"#]);
    let token = token("items", &["*"], 60);
    resolver.hold("items");
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut client = node.client().await;
        client.send_json(subscribe("items", "5", &token)).await;
        clients.push(client);
    }
    // Every subscribe is in before the one request is answered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while node
        .metric("entity_sync_subscribe_tokens_total{result=\"valid\"}")
        .await
        < 5.0
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    resolver.release().await;
    for client in &mut clients {
        client.expect_subscribed("items", "5").await;
        assert_eq!(client.expect_push("items", "5").await.1, [json!({"n": 5})]);
    }
    assert_eq!(
        seen(&resolver),
        [(Reason::Subscribe, vec!["5".to_owned()], String::new(), true)]
    );
}

#[tokio::test]
async fn a_per_subscriber_key_is_still_resolved_with_the_secret() {
    let jwks = Jwks::new(&[oct("k1", SECRET_K1)]);
    let (node, resolver, data) = node(&jwks.path, None).await;
    data.set_rows("docs", "1", &[r#"{"mine":true}"#]);
    let mut client = node.client().await;
    client.send_secret("alice").await;
    client
        .send_json(subscribe("docs", "1", &token("docs", &["1"], 60)))
        .await;
    client.expect_subscribed("docs", "1").await;
    assert_eq!(
        client.expect_push("docs", "1").await.1,
        [json!({"mine": true})]
    );
    assert_eq!(
        seen(&resolver),
        [(
            Reason::Subscribe,
            vec!["1".to_owned()],
            "alice".to_owned(),
            false
        )]
    );
}

#[tokio::test]
async fn refused_tokens_get_their_code_and_cost_no_backend_call() {
    let jwks = Jwks::new(&[oct("k1", SECRET_K1), oct("k2", SECRET_K2)]);
    let (node, resolver, data) = node(&jwks.path, Some("app")).await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let t = now() as i64;
    let claims = |extra: Value| {
        let mut claims = json!({"exp": t + 60, "entity": "items", "ids": ["1"], "aud": "app"});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    let good = hs256("k1", SECRET_K1, claims(json!({})));
    let parts: Vec<&str> = good.split('.').collect();
    let any_id = hs256("k1", SECRET_K1, claims(json!({"ids": ["*"]})));
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        any_id.split('.').nth(1).unwrap(),
        parts[2]
    );
    let no_exp = {
        let mut c = claims(json!({}));
        c.as_object_mut().unwrap().remove("exp");
        hs256("k1", SECRET_K1, c)
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("tampered", tampered, "1", "token_invalid"),
        (
            "signed by another secret",
            hs256("k1", SECRET_K2, claims(json!({}))),
            "1",
            "token_invalid",
        ),
        (
            "unknown kid",
            hs256("k3", SECRET_K1, claims(json!({}))),
            "1",
            "token_invalid",
        ),
        (
            "another kid's key",
            hs256("k2", SECRET_K1, claims(json!({}))),
            "1",
            "token_invalid",
        ),
        (
            "another entity",
            hs256("k1", SECRET_K1, claims(json!({"entity": "docs"}))),
            "1",
            "token_invalid",
        ),
        ("another id", good.clone(), "2", "token_invalid"),
        (
            "expired",
            hs256("k1", SECRET_K1, claims(json!({"exp": t - 60}))),
            "1",
            "token_expired",
        ),
        (
            "not yet valid",
            hs256("k1", SECRET_K1, claims(json!({"nbf": t + 60}))),
            "1",
            "token_invalid",
        ),
        (
            "another audience",
            hs256("k1", SECRET_K1, claims(json!({"aud": "other"}))),
            "1",
            "token_invalid",
        ),
        (
            "no audience",
            hs256("k1", SECRET_K1, {
                let mut c = claims(json!({}));
                c.as_object_mut().unwrap().remove("aud");
                c
            }),
            "1",
            "token_invalid",
        ),
        ("no exp", no_exp, "1", "token_invalid"),
        (
            "alg none",
            format!("{}.{}.", b64(br#"{"alg":"none","kid":"k1"}"#), parts[1]),
            "1",
            "token_invalid",
        ),
        ("not a JWS", "not-a-token".to_owned(), "1", "token_invalid"),
        (
            "too large",
            format!("{}.{}.{}", parts[0], "A".repeat(9000), parts[2]),
            "1",
            "token_invalid",
        ),
    ];
    let mut client = node.client().await;
    for (what, token, id, code) in &cases {
        client.send_json(subscribe("items", id, token)).await;
        let body = client.expect_error(code, Some(("items", id))).await;
        let message = body["message"].as_str().unwrap();
        assert!(!message.contains(token.as_str()), "{what}: {message}");
    }
    client.silent().await;
    // Not subscribed: a change pushes nothing; and no backend call at all.
    notify_one(node.grpc(), "items", "1").await;
    client.silent().await;
    assert_eq!(resolver.requests(), [], "no resolve for a refused token");
    // The same connection subscribes fine with a good token.
    client.send_json(subscribe("items", "1", &good)).await;
    client.expect_subscribed("items", "1").await;
    client.expect_push("items", "1").await;
    assert_eq!(
        node.metric("entity_sync_subscribe_tokens_total{result=\"invalid\"}")
            .await,
        (cases.len() - 1) as f64
    );
    assert_eq!(
        node.metric("entity_sync_subscribe_tokens_total{result=\"expired\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_node_without_keys_refuses_every_token() {
    let (node, resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let mut client = node.client().await;
    client
        .send_json(subscribe("items", "1", &token("items", &["1"], 60)))
        .await;
    let body = client
        .expect_error("token_invalid", Some(("items", "1")))
        .await;
    assert_eq!(
        body["message"],
        "this node accepts no subscribe tokens (it has no --subscribe-token-jwks)"
    );
    assert_eq!(resolver.requests(), []);
}

/// One connection's token expires while it holds the key: the node ends it
/// with `token_expired`. Another renews its token first with the version it
/// holds: `subscribed` `current`, no resolve, no push, and it keeps getting
/// changes after the first token's expiry.
#[tokio::test]
async fn a_held_key_ends_when_its_token_expires_unless_a_newer_token_renewed_it() {
    let jwks = Jwks::new(&[oct("k1", SECRET_K1)]);
    let (node, resolver, data) = node(&jwks.path, None).await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let short = token("items", &["1"], 1);
    let mut expiring = node.client().await;
    expiring.send_json(subscribe("items", "1", &short)).await;
    expiring.expect_subscribed("items", "1").await;
    let (version, _) = expiring.expect_push("items", "1").await;
    let mut renewing = node.client().await;
    renewing.send_json(subscribe("items", "1", &short)).await;
    renewing.expect_subscribed("items", "1").await;
    assert_eq!(renewing.expect_push("items", "1").await.0, version);
    let requests = resolver.requests().len();

    renewing
        .send_json(resume("items", "1", version, &token("items", &["1"], 600)))
        .await;
    assert_eq!(renewing.recv_json().await, current("items", "1"));
    assert_eq!(
        resolver.requests().len(),
        requests,
        "a refresh resolves nothing"
    );
    assert_eq!(node.metric("entity_sync_token_refreshes_total").await, 1.0);

    // exp (1 s) + leeway (5 s), checked on the second.
    let body = expiring
        .recv_until_quiet(Duration::from_secs(9), Duration::from_secs(12))
        .await;
    assert_eq!(
        body,
        [json!({"action": "error", "body": {
            "code": "token_expired",
            "message": "the subscribe token expired; the subscription ended (subscribe again with a fresh token)",
            "entity": "items", "id": "1"}})]
    );
    renewing.silent().await;
    assert_eq!(node.metric("entity_sync_token_expiries_total").await, 1.0);

    data.set_rows("items", "1", &[r#"{"n":2}"#]);
    let changed = notify_one(node.grpc(), "items", "1").await;
    assert_eq!(
        renewing.expect_push("items", "1").await,
        (changed, vec![json!({"n": 2})])
    );
    expiring.silent().await;
    // The ended one subscribes again with a fresh token and its version.
    expiring
        .send_json(resume("items", "1", version, &token("items", &["1"], 60)))
        .await;
    expiring.expect_subscribed("items", "1").await;
    assert_eq!(
        expiring.expect_push("items", "1").await,
        (changed, vec![json!({"n": 2})])
    );
}

#[tokio::test]
async fn new_keys_verify_after_a_reload_and_removed_ones_no_longer() {
    let jwks = Jwks::new(&[oct("k1", SECRET_K1)]);
    let (node, _resolver, data) = node(&jwks.path, None).await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let claims = json!({"exp": now() + 60, "entity": "items", "ids": ["1"]});
    let by_k1 = hs256("k1", SECRET_K1, claims.clone());
    let by_k2 = hs256("k2", SECRET_K2, claims);
    let mut client = node.client().await;
    client.send_json(subscribe("items", "1", &by_k2)).await;
    client
        .expect_error("token_invalid", Some(("items", "1")))
        .await;

    jwks.write(&[oct("k2", SECRET_K2)]);
    assert_eq!(node.reload_subscribe_token_keys().unwrap(), 1);
    client.send_json(subscribe("items", "1", &by_k2)).await;
    client.expect_subscribed("items", "1").await;
    client.expect_push("items", "1").await;
    let mut other = node.client().await;
    other.send_json(subscribe("items", "1", &by_k1)).await;
    other
        .expect_error("token_invalid", Some(("items", "1")))
        .await;

    // A file that does not load leaves the keys in force.
    std::fs::write(&jwks.path, "{\"keys\": [oops").unwrap();
    let err = node.reload_subscribe_token_keys().unwrap_err().to_string();
    assert!(err.contains("not JSON"), "{err}");
    other.send_json(subscribe("items", "1", &by_k2)).await;
    other.expect_subscribed("items", "1").await;
}

#[tokio::test]
async fn sighup_reloads_the_subscribe_token_keys_of_the_binary() {
    let jwks = Jwks::new(&[oct("k1", SECRET_K1)]);
    let mut node = NodeProcess::spawn(
        Path::new(BIN),
        &[format!("--subscribe-token-jwks={}", jwks.path.display())],
        None,
        "info",
    )
    .unwrap();
    node.wait_ready(Duration::from_secs(20)).await.unwrap();
    let url = format!("ws://{}/ws/entity-sync/", node.ws);
    let by_k2 = hs256(
        "k2",
        SECRET_K2,
        json!({"exp": now() + 60, "entity": "items", "ids": ["1"]}),
    );
    // No resolver serves items: a token that verifies gets `no_resolver`.
    let code = |token: String| {
        let url = url.clone();
        async move {
            let mut client = WsClient::connect(&url).await;
            client.send_json(subscribe("items", "1", &token)).await;
            client.recv_json().await["body"]["code"].clone()
        }
    };
    assert_eq!(code(by_k2.clone()).await, "token_invalid");
    jwks.write(&[oct("k2", SECRET_K2)]);
    node.guard().signal(libc::SIGHUP);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while code(by_k2.clone()).await == "token_invalid" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload the JWKS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(code(by_k2).await, "no_resolver");
    node.guard()
        .check_alive()
        .expect("SIGHUP does not stop the node");
}

#[tokio::test]
async fn es256_eddsa_and_rs256_tokens_verify_with_their_public_keys() {
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
    let ec = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let point = ec.public_key_raw(); // 0x04 || x || y
    // RSA keys cannot be generated here: a committed test key pair.
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/keys");
    let rsa_public: Value =
        serde_json::from_slice(&std::fs::read(keys.join("rs256-test-public.jwk.json")).unwrap())
            .unwrap();
    let rsa_private = std::fs::read(keys.join("rs256-test-private.pem")).unwrap();
    let jwks = Jwks::new(&[
        json!({"kty": "EC", "crv": "P-256", "kid": "ec", "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
        json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(ed.public_key_raw())}),
        rsa_public,
    ]);
    let (node, _resolver, data) = node(&jwks.path, None).await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let claims = json!({"exp": now() + 60, "entity": "items", "ids": ["1"]});
    let sign = |alg: Algorithm, kid: &str, key: EncodingKey| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        encode(&header, &claims, &key).unwrap()
    };
    let es256 = sign(
        Algorithm::ES256,
        "ec",
        EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
    );
    let eddsa = sign(
        Algorithm::EdDSA,
        "ed",
        EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap(),
    );
    let rs256 = sign(
        Algorithm::RS256,
        "rs",
        EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
    );
    for token in [&es256, &eddsa, &rs256] {
        let mut client = node.client().await;
        client.send_json(subscribe("items", "1", token)).await;
        client.expect_subscribed("items", "1").await;
        client.expect_push("items", "1").await;
    }
    // A token signed by one key but naming the other's kid.
    let mut client = node.client().await;
    let crossed = sign(
        Algorithm::EdDSA,
        "ec",
        EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap(),
    );
    client.send_json(subscribe("items", "1", &crossed)).await;
    client
        .expect_error("token_invalid", Some(("items", "1")))
        .await;
}

#[tokio::test]
async fn token_verifications_per_connection_are_bounded() {
    let jwks = Jwks::new(&[oct("k1", SECRET_K1)]);
    let (node, _resolver, data) = node(&jwks.path, None).await;
    let mut client = node.client().await;
    // One token for many keys is verified once: 520 subscribes with it,
    // more than the 512 verifications a connection may make at once.
    let good = token("items", &["*"], 60);
    for id in 0..520 {
        data.set_rows("items", &format!("g{id}"), &[r#"{"g":1}"#]);
    }
    for id in 0..520 {
        client
            .send_json(subscribe("items", &format!("g{id}"), &good))
            .await;
    }
    let frames = client
        .recv_until_quiet(Duration::from_millis(500), Duration::from_secs(30))
        .await;
    let count = |f: &dyn Fn(&Value) -> bool| frames.iter().filter(|v| f(v)).count();
    assert_eq!(count(&|v| v["action"] == "subscribed"), 520);
    assert_eq!(count(&|v| v["action"] == "push"), 520);
    assert_eq!(count(&|v| v["action"] == "error"), 0);
    // 600 distinct bad tokens at once: what is left of the 512 (and 64 a
    // second more while they come in) are verified and refused, the rest
    // dropped unverified.
    for i in 0..600 {
        let bad = hs256(
            "k1",
            SECRET_K2,
            json!({"exp": now() + 60, "entity": "items", "ids": [i.to_string()]}),
        );
        client
            .send_json(subscribe("items", &i.to_string(), &bad))
            .await;
    }
    let frames = client
        .recv_until_quiet(Duration::from_millis(500), Duration::from_secs(20))
        .await;
    let codes = |code: &str| frames.iter().filter(|f| f["body"]["code"] == code).count();
    let (verified, dropped) = (codes("token_invalid"), codes("rate_limited"));
    assert_eq!(verified + dropped, 600, "{frames:?}");
    assert!((511..=560).contains(&verified), "{verified} verified");
}

/// Tokens the backend SDK mints, with the JWKS it writes, verify on the
/// node: HS256 and ES256 (a test key) side by side in one file.
#[tokio::test]
async fn tokens_minted_by_the_backend_sdk_verify_with_the_jwks_it_writes() {
    use entity_sync_backend::{SubscribeTokenSigner, jwks};
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("backend/tests/keys");
    let hs = SubscribeTokenSigner::hs256("hs", b"a-32-byte-secret-for-hs256-tests")
        .unwrap()
        .audience("app");
    let es = SubscribeTokenSigner::es256(
        "es",
        &std::fs::read(keys.join("es256-test-private.pem")).unwrap(),
    )
    .unwrap()
    .audience("app");
    let dir = TempDir::new("jwks");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&hs, &es])).unwrap();
    let (node, resolver, data) = node(&path, Some("app")).await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    for signer in [&hs, &es] {
        let token = signer
            .sign("items", &["1"], Duration::from_secs(60))
            .unwrap();
        let mut client = node.client().await;
        client.send_json(subscribe("items", "1", &token)).await;
        client.expect_subscribed("items", "1").await;
        assert_eq!(client.expect_push("items", "1").await.1, [json!({"n": 1})]);
        // Only for the ids it names.
        client.send_json(subscribe("items", "2", &token)).await;
        client
            .expect_error("token_invalid", Some(("items", "2")))
            .await;
    }
    assert_eq!(
        resolver.requests().len(),
        1,
        "one shared resolve, then the cache"
    );
}
