//! `tokens`: what verifying subscribe tokens costs a node, in token
//! verifications per second per core (per CPU second of the node process).
//!
//! One node (started with `--subscribe-token-jwks`, a JWKS holding an HS256
//! key with a random secret, and the ES256 and EdDSA test keys of the backend
//! SDK), the bench's resolver, and holder connections that subscribe every key
//! first (without tokens), so every key is warm: a token subscribe's snapshot
//! comes from the node cache, with no resolve. Then, per algorithm, two
//! phases on fresh connections (`--token-conns` of them; the node verifies at
//! most 512 tokens at once and 64/s per connection): each connection sends
//! `--token-subs` subscribes of distinct keys, each with a token of its own
//! (a distinct `sub`, so the node never reuses the token it verified last on
//! the connection), and waits for every answer:
//!
//! - `valid`: the tokens are good; each subscribe gets its snapshot from the
//!   cache. The node's CPU covers the verification and the whole subscribe.
//! - `invalid`: the same tokens with one signature character changed; each
//!   is verified (the signature computed and compared) and refused with a
//!   `token_invalid` error frame. Closer to the verification alone.
//!
//! The figure is the node's verifications (its `entity_sync_subscribe_tokens_total`
//! counters) over the node's CPU seconds in the phase (`/proc`), and over the
//! wall-clock seconds. Tokens are signed before each phase, outside it.

use std::{path::Path, time::Duration};

use anyhow::{Context, bail};
use entity_sync_backend::SubscribeTokenSigner;
use entity_sync_testkit::{
    procstat::{cpu_seconds, loadavg},
    ws::{ConnectOptions, Ws, connect},
};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::{
    task::JoinSet,
    time::{Instant, timeout_at},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    Cli, Env,
    load::ENTITY,
    restart::{TOKENS_EXPIRED, TOKENS_INVALID, TOKENS_VALID, token_setup},
    round, source_addr, source_count,
    stats::scan_push,
};

/// The backend SDK's test keys (never used outside tests and this bench).
const ES256_PEM: &[u8] = include_bytes!("../../backend/tests/keys/es256-test-private.pem");
const ED25519_PEM: &[u8] = include_bytes!("../../backend/tests/keys/ed25519-test-private.pem");
const ED25519_PUB_PEM: &[u8] = include_bytes!("../../backend/tests/keys/ed25519-test-public.pem");
/// Keys one holder connection subscribes (the node's default limit is 1,024).
const HOLDER_KEYS: usize = 1_000;
/// Most subscribes one connection sends at once: the node's burst of token verifications.
const MAX_SUBS_PER_CONN: usize = 512;
/// Lifetime of the tokens: well beyond any run.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// A signing algorithm of the `tokens` scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Alg {
    Hs256,
    Es256,
    Eddsa,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Es256 => "ES256",
            Alg::Eddsa => "EdDSA",
        }
    }
}

/// What one phase measured.
#[derive(Serialize)]
pub struct TokensReport {
    scenario: &'static str,
    alg: &'static str,
    /// `valid` (subscribes answered from the cache) or `invalid` (refused).
    tokens: &'static str,
    conns: usize,
    subs_per_conn: usize,
    keys: u32,
    /// 1-minute load average when the phase started (the machine is shared).
    loadavg_1m: Option<f64>,
    /// Verifications the node counted in the phase, by result.
    valid: u64,
    invalid: u64,
    expired: u64,
    /// Answers the clients received: snapshots, `token_invalid`, other error frames.
    snapshots: u64,
    token_invalid_frames: u64,
    other_error_frames: u64,
    /// Subscribes with no answer by the deadline.
    unanswered: u64,
    node_cpu_s: f64,
    wall_s: f64,
    /// Verifications per node CPU second (per core), and per wall-clock second.
    verifications_per_cpu_s: Option<f64>,
    verifications_per_s: Option<f64>,
    /// Backend resolves in the phase (warm keys: goal 0).
    resolves: u64,
    generator_cpu_s: f64,
    first_error: Option<String>,
}

impl TokensReport {
    fn ok(&self) -> bool {
        self.unanswered == 0 && self.other_error_frames == 0
    }
}

/// `count / secs` rounded, `None` for no time.
pub fn per_second(count: u64, secs: f64) -> Option<f64> {
    (secs > 0.0).then(|| (count as f64 / secs).round())
}

/// The token with one character of its signature changed (still base64url,
/// same length): it verifies as a bad signature.
pub fn corrupt_signature(token: &str) -> String {
    let sig_at = token.rfind('.').map_or(0, |i| i + 1);
    let at = sig_at + (token.len() - sig_at) / 2;
    let mut bytes = token.as_bytes().to_vec();
    if let Some(b) = bytes.get_mut(at) {
        *b = if *b == b'A' { b'B' } else { b'A' };
    }
    String::from_utf8(bytes).expect("ASCII in, ASCII out")
}

/// The key connection `c` subscribes with its `n`-th token: distinct within a connection.
pub fn key_of(c: usize, n: usize, subs: usize, keys: u32) -> u32 {
    ((c * subs + n) % keys as usize) as u32
}

fn subscribe_frame(key: u32, token: Option<&str>) -> String {
    match token {
        Some(t) => format!(
            r#"{{"action":"subscribe","body":{{"entity":"{ENTITY}","id":"{key}","token":"{t}"}}}}"#
        ),
        None => format!(r#"{{"action":"subscribe","body":{{"entity":"{ENTITY}","id":"{key}"}}}}"#),
    }
}

/// How a connection's subscribes were answered.
#[derive(Default)]
struct Answers {
    snapshots: u64,
    token_invalid: u64,
    other_errors: u64,
    unanswered: u64,
    first_error: Option<String>,
}

/// Sends `frames` on `ws` and reads until each has an answer (a snapshot
/// push or an error frame) or the deadline.
async fn drive(mut ws: Ws, frames: Vec<String>, deadline: Instant) -> Answers {
    let mut out = Answers::default();
    let want = frames.len() as u64;
    let sent = async {
        for frame in frames {
            ws.feed(Message::text(frame)).await?;
        }
        ws.flush().await
    };
    if let Err(err) = timeout_at(deadline, sent).await.unwrap_or(Ok(())) {
        out.unanswered = want;
        out.first_error = Some(format!("subscribe: {err}"));
        return out;
    }
    while out.snapshots + out.token_invalid + out.other_errors < want {
        let text = match timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(err))) => {
                out.first_error = Some(format!("websocket: {err}"));
                break;
            }
            Ok(None) => {
                out.first_error = Some("connection ended".into());
                break;
            }
            Err(_) => {
                out.first_error = Some("no answer by the deadline".into());
                break;
            }
        };
        let text = text.as_str();
        if scan_push(text).is_some() {
            out.snapshots += 1;
        } else if text.starts_with(r#"{"action":"error","body":{"code":"token_invalid""#) {
            out.token_invalid += 1;
        } else if text.starts_with(r#"{"action":"error""#) {
            out.other_errors += 1;
            out.first_error.get_or_insert_with(|| text.to_owned());
        }
    }
    out.unanswered = want - (out.snapshots + out.token_invalid + out.other_errors).min(want);
    let _ = ws.close(None).await;
    out
}

async fn open(url: &str, count: usize, sources: u8, deadline: Instant) -> anyhow::Result<Vec<Ws>> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let options = ConnectOptions {
            source: Some(source_addr(i, sources)),
            recv_buffer: None,
            read_buffer: Some(4096),
        };
        let ws = timeout_at(deadline, connect(url, &options))
            .await
            .context("connecting: the deadline passed")?
            .map_err(anyhow::Error::msg)?;
        out.push(ws);
    }
    Ok(out)
}

/// The node's verifications so far: valid, invalid, expired.
async fn token_counters(env: &Env) -> anyhow::Result<[u64; 3]> {
    let mut out = [0u64; 3];
    for (v, name) in out
        .iter_mut()
        .zip([TOKENS_VALID, TOKENS_INVALID, TOKENS_EXPIRED])
    {
        *v = env.metric(name).await?[0];
    }
    Ok(out)
}

pub async fn tokens_scenario(cli: &Cli, log_dir: &Path) -> anyhow::Result<bool> {
    let deadline = Instant::now() + cli.timeout;
    let (def_conns, def_subs, def_keys) = if cli.smoke {
        (4, 50, 200)
    } else {
        (100, 256, 1_000)
    };
    let keys = cli.keys.unwrap_or(def_keys).max(1);
    let conns = cli.token_conns.unwrap_or(def_conns).max(1);
    let subs = cli
        .token_subs
        .unwrap_or(def_subs)
        .clamp(1, MAX_SUBS_PER_CONN.min(keys as usize));

    // The keys: HS256 with a random secret, the SDK's ES256 and EdDSA test keys.
    let (hs256, _) = token_setup(log_dir, "bench-hs256")?;
    let es256 = SubscribeTokenSigner::es256("bench-es256", ES256_PEM)?;
    let eddsa = SubscribeTokenSigner::eddsa("bench-eddsa", ED25519_PEM, ED25519_PUB_PEM)?;
    let jwks_path = log_dir.join("subscribe-token-jwks-all.json");
    std::fs::write(
        &jwks_path,
        entity_sync_backend::jwks(&[&hs256, &es256, &eddsa]),
    )?;
    let mut node_cli = cli.clone();
    node_cli
        .node_args
        .push(format!("--subscribe-token-jwks={}", jwks_path.display()));
    let (mut env, shared, cancel, resolver) =
        crate::one_node_with_resolver(&node_cli, node_cli.nats, keys, log_dir, deadline).await?;
    let url = env.nodes[0].ws_url();
    let pid = env.nodes[0].pid();
    let sources = source_count(cli, conns);

    // Every key held (warm) by holder connections, kept open throughout.
    let holder_count = (keys as usize).div_ceil(HOLDER_KEYS);
    let mut holders = open(&url, holder_count, sources, deadline).await?;
    for (h, ws) in holders.iter_mut().enumerate() {
        let range = h * HOLDER_KEYS..((h + 1) * HOLDER_KEYS).min(keys as usize);
        let want = range.len();
        for key in range {
            ws.feed(Message::text(subscribe_frame(key as u32, None)))
                .await?;
        }
        ws.flush().await?;
        let mut snapshots = 0;
        while snapshots < want {
            match timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    if scan_push(text.as_str()).is_some() {
                        snapshots += 1;
                    } else if text.as_str().starts_with(r#"{"action":"error""#) {
                        bail!("holder subscribe refused: {}", text.as_str());
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => bail!("holder {h}: {snapshots} of {want} snapshots by the deadline"),
            }
        }
    }
    eprintln!(
        "tokens: {keys} keys warm on the node; {conns} connections x {subs} token subscribes per phase"
    );

    let mut reports = Vec::new();
    let signers = [
        (Alg::Hs256, &hs256),
        (Alg::Es256, &es256),
        (Alg::Eddsa, &eddsa),
    ];
    for (alg, signer) in signers {
        if !cli.token_algs.contains(&alg) {
            continue;
        }
        for valid in [true, false] {
            // Signed before the phase: the node's figure, not the bench's.
            let mut frames = Vec::with_capacity(conns);
            for c in 0..conns {
                let mut of_conn = Vec::with_capacity(subs);
                for n in 0..subs {
                    let key = key_of(c, n, subs, keys);
                    let token = signer.sign_as(
                        &format!("user-{c}-{n}"),
                        ENTITY,
                        &[key.to_string()],
                        TOKEN_TTL,
                    )?;
                    let token = if valid {
                        token
                    } else {
                        corrupt_signature(&token)
                    };
                    of_conn.push(subscribe_frame(key, Some(&token)));
                }
                frames.push(of_conn);
            }
            let sockets = open(&url, conns, sources, deadline).await?;
            let loadavg_1m = loadavg();
            let before = token_counters(&env).await?;
            let resolves_before = shared.resolver_subscribe().0;
            let gen_before = cpu_seconds(None);
            let cpu_before = cpu_seconds(Some(pid));
            let t0 = Instant::now();
            let mut tasks = JoinSet::new();
            for (ws, frames) in sockets.into_iter().zip(frames) {
                tasks.spawn(drive(ws, frames, deadline));
            }
            let mut answers = Answers::default();
            while let Some(done) = tasks.join_next().await {
                let a = done?;
                answers.snapshots += a.snapshots;
                answers.token_invalid += a.token_invalid;
                answers.other_errors += a.other_errors;
                answers.unanswered += a.unanswered;
                if answers.first_error.is_none() {
                    answers.first_error = a.first_error;
                }
            }
            let wall_s = t0.elapsed().as_secs_f64();
            let node_cpu_s = cpu_seconds(Some(pid)) - cpu_before;
            let generator_cpu_s = cpu_seconds(None) - gen_before;
            let after = token_counters(&env).await?;
            env.check_alive()?;
            let [valid_n, invalid_n, expired_n] =
                [0, 1, 2].map(|k| after[k].saturating_sub(before[k]));
            let verifications = valid_n + invalid_n + expired_n;
            let report = TokensReport {
                scenario: "tokens",
                alg: alg.name(),
                tokens: if valid { "valid" } else { "invalid" },
                conns,
                subs_per_conn: subs,
                keys,
                loadavg_1m,
                valid: valid_n,
                invalid: invalid_n,
                expired: expired_n,
                snapshots: answers.snapshots,
                token_invalid_frames: answers.token_invalid,
                other_error_frames: answers.other_errors,
                unanswered: answers.unanswered,
                node_cpu_s: round(node_cpu_s, 3),
                wall_s: round(wall_s, 3),
                verifications_per_cpu_s: per_second(verifications, node_cpu_s),
                verifications_per_s: per_second(verifications, wall_s),
                resolves: shared.resolver_subscribe().0 - resolves_before,
                generator_cpu_s: round(generator_cpu_s, 2),
                first_error: answers.first_error,
            };
            println!("{}", serde_json::to_string(&report)?);
            reports.push(report);
        }
    }
    drop(holders);
    cancel.cancel();
    let _ = resolver.await;
    print_table(&reports);
    Ok(!reports.is_empty() && reports.iter().all(TokensReport::ok))
}

fn print_table(reports: &[TokensReport]) {
    let Some(head) = reports.first() else {
        println!("  no algorithm measured (--token-algs)");
        return;
    };
    println!(
        "  token verification cost: 1 node, {} keys warm, {} connections x {} subscribes, a token each",
        head.keys, head.conns, head.subs_per_conn
    );
    println!(
        "  {:>6} {:>8} {:>8} {:>8} {:>9} {:>8} {:>14} {:>12} {:>8} {:>8} {:>7}",
        "alg",
        "tokens",
        "verified",
        "answers",
        "node cpu",
        "wall s",
        "verif/cpu-s",
        "verif/s",
        "resolves",
        "gen cpu",
        "load"
    );
    for r in reports {
        println!(
            "  {:>6} {:>8} {:>8} {:>8} {:>9} {:>8} {:>14} {:>12} {:>8} {:>8} {:>7}",
            r.alg,
            r.tokens,
            r.valid + r.invalid + r.expired,
            r.snapshots + r.token_invalid_frames + r.other_error_frames,
            r.node_cpu_s,
            r.wall_s,
            r.verifications_per_cpu_s
                .map_or("-".into(), |v| v.to_string()),
            r.verifications_per_s.map_or("-".into(), |v| v.to_string()),
            r.resolves,
            r.generator_cpu_s,
            r.loadavg_1m.map_or("-".into(), |v| v.to_string()),
        );
    }
    println!(
        "  (verif/cpu-s: verifications per CPU second of the node = per core; valid: the whole \
         subscribe from the cache, invalid: verified and refused; the machine is shared, figures are noisy)"
    );
    if let Some(err) = reports.iter().find_map(|r| r.first_error.as_ref()) {
        println!("  first error: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupted_tokens_keep_their_shape() {
        let token = "aGVhZA.Y2xhaW1z.c2lnbmF0dXJlQUJD";
        let bad = corrupt_signature(token);
        assert_eq!(bad.len(), token.len());
        assert_ne!(bad, token);
        assert_eq!(bad[..15], token[..15], "header and claims untouched");
        // An 'A' in the middle becomes a 'B'.
        assert_eq!(corrupt_signature("h.c.xxAxx"), "h.c.xxBxx");
    }

    #[test]
    fn keys_are_distinct_within_a_connection() {
        for c in 0..5 {
            let keys: std::collections::HashSet<u32> =
                (0..100).map(|n| key_of(c, n, 100, 250)).collect();
            assert_eq!(keys.len(), 100);
        }
        assert_eq!(key_of(2, 10, 100, 250), 210);
        assert_eq!(key_of(3, 0, 100, 250), 50);
    }

    #[test]
    fn rates() {
        assert_eq!(per_second(1_000, 0.5), Some(2_000.0));
        assert_eq!(per_second(10, 0.0), None);
        assert_eq!(per_second(10, 3.0), Some(3.0));
    }

    #[test]
    fn the_test_keys_make_signers() {
        let es = SubscribeTokenSigner::es256("k", ES256_PEM).expect("ES256 test key");
        assert_eq!(es.alg_name(), "ES256");
        let ed = SubscribeTokenSigner::eddsa("k", ED25519_PEM, ED25519_PUB_PEM).expect("EdDSA");
        assert_eq!(ed.alg_name(), "EdDSA");
        let frame = subscribe_frame(7, Some("a.b.c"));
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["body"]["token"], "a.b.c");
        assert_eq!(v["body"]["id"], "7");
    }
}
