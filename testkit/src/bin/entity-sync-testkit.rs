//! The testkit as a program, for tests written in other languages (the
//! JavaScript client's tests drive it):
//!
//! - `entity-sync-testkit resolver --node URL [--name NAME] [--entity NAME=shared|per_subscriber]... [--pass-through]`
//!   connects a [`TestResolver`] (on `entity-sync-backend`, like a real
//!   backend: it registers again whenever the node comes back) and takes
//!   commands on stdin, one JSON object a line; it answers each with one JSON
//!   line on stdout, in order. The first line it prints is
//!   `{"ready":true,"node_id":…}` once registered. Commands:
//!   - `{"op":"set","entity":E,"id":I,"rows":[…],"version":N,"status":"ok"|"not_found"|"forbidden"|"error","message":M,"forbidden_secrets":[…]}`
//!     (all but entity and id optional): what the resolver answers for the key;
//!   - `{"op":"notify","keys":[[E,I],…]}`: `Notify`, no retries; answers `sequences`;
//!   - `{"op":"requests"}`: every `ResolveRequest` seen (`entity`, `ids`, `reason`, `shared`, `secret`);
//!   - `{"op":"pass_throughs"}`: every `PassThrough` seen (`connection_id`, `secret`, `payload`);
//!   - `{"op":"wait_registered","except":NODE_ID,"timeout_ms":N}`: until registered on another node.
//!
//!   Failures answer `{"ok":false,"error":…}`. Secrets appear only in the
//!   answers to `requests` and `pass_throughs`, which report what the node
//!   sent, to the test that set them; nothing is logged.
//! - `entity-sync-testkit certs DIR` writes `ca.pem`, `server.pem` and
//!   `server.key` (a fresh CA and a server certificate for 127.0.0.1 and
//!   localhost) to DIR.

use std::{process::ExitCode, time::Duration};

use entity_sync_backend::{FetchMode, Key, Notifier, Reason, proto::v1::Status as KeyStatus};
use entity_sync_testkit::{
    Entry, ResolverData, ResolverOptions, TestCa, TestResolver, notify::notifier,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

const USAGE: &str = "usage: entity-sync-testkit resolver --node URL [--name NAME] \
[--entity NAME=shared|per_subscriber]... [--pass-through]\n       entity-sync-testkit certs DIR";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("resolver") => resolver_options(&args[1..]).and_then(|(node, options)| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|err| format!("runtime: {err}"))?
                .block_on(serve(node, options))
        }),
        Some("certs") if args.len() == 2 => write_certs(&args[1]),
        _ => Err(USAGE.to_owned()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("entity-sync-testkit: {err}");
            ExitCode::FAILURE
        }
    }
}

fn resolver_options(args: &[String]) -> Result<(String, ResolverOptions), String> {
    let mut node = None;
    let mut options = ResolverOptions::new("testkit");
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--node" => node = Some(value()?.clone()),
            "--name" => options.name = value()?.clone(),
            "--pass-through" => options.pass_through = true,
            "--entity" => {
                let spec = value()?;
                let (entity, mode) = spec
                    .split_once('=')
                    .ok_or_else(|| format!("--entity {spec:?}: NAME=MODE"))?;
                let mode = match mode {
                    "shared" => FetchMode::Shared,
                    "per_subscriber" => FetchMode::PerSubscriber,
                    other => return Err(format!("--entity {entity}: unknown mode {other:?}")),
                };
                options = options.entity(entity, mode);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let node = node.ok_or_else(|| format!("--node is needed\n{USAGE}"))?;
    if options.entities.is_empty() {
        return Err("at least one --entity is needed".to_owned());
    }
    Ok((node, options))
}

async fn serve(node: String, options: ResolverOptions) -> Result<(), String> {
    let data = ResolverData::new();
    let mut resolver = TestResolver::try_connect(&node, options, &data)
        .await
        .map_err(|err| format!("registration refused: {err}"))?;
    let notifier = notifier(&node).await;
    let mut stdout = tokio::io::stdout();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    write_line(
        &mut stdout,
        &json!({"ready": true, "node_id": resolver.node_id}),
    )
    .await?;
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|err| format!("stdin: {err}"))?
    {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(command) => run(&command, &data, &mut resolver, &notifier)
                .await
                .unwrap_or_else(|err| json!({"ok": false, "error": err})),
            Err(err) => json!({"ok": false, "error": format!("not JSON: {err}")}),
        };
        write_line(&mut stdout, &answer).await?;
    }
    // stdin closed: the test is done with us.
    resolver.kill();
    Ok(())
}

async fn write_line(stdout: &mut tokio::io::Stdout, value: &Value) -> Result<(), String> {
    let mut text = value.to_string();
    text.push('\n');
    stdout
        .write_all(text.as_bytes())
        .await
        .and(stdout.flush().await)
        .map_err(|err| format!("stdout: {err}"))
}

async fn run(
    command: &Value,
    data: &ResolverData,
    resolver: &mut TestResolver,
    notifier: &Notifier,
) -> Result<Value, String> {
    let text = |field: &str| {
        command[field]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{field:?} must be a string"))
    };
    match command["op"].as_str() {
        Some("set") => {
            let (entity, id) = (text("entity")?, text("id")?);
            let rows: Vec<String> = match &command["rows"] {
                Value::Null => Vec::new(),
                Value::Array(rows) => rows.iter().map(Value::to_string).collect(),
                _ => return Err("\"rows\" must be an array".to_owned()),
            };
            let status = match command["status"].as_str().unwrap_or("ok") {
                "ok" => KeyStatus::Ok,
                "not_found" => KeyStatus::NotFound,
                "forbidden" => KeyStatus::Forbidden,
                "error" => KeyStatus::Error,
                other => return Err(format!("unknown status {other:?}")),
            };
            let mut entry = Entry::status(status, command["message"].as_str().unwrap_or(""));
            entry.rows = rows;
            entry.version = command["version"].as_u64().unwrap_or(0);
            if let Some(secrets) = command["forbidden_secrets"].as_array() {
                entry.forbidden_secrets = secrets
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect();
            }
            data.set(&entity, &id, entry);
            Ok(json!({"ok": true}))
        }
        Some("notify") => {
            let keys = command["keys"]
                .as_array()
                .ok_or("\"keys\" must be an array of [entity, id]")?
                .iter()
                .map(|key| match (key[0].as_str(), key[1].as_str()) {
                    (Some(entity), Some(id)) => Ok(Key::from((entity, id))),
                    _ => Err(format!("not an [entity, id] pair: {key}")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let receipt = tokio::time::timeout(Duration::from_secs(5), notifier.notify(keys))
                .await
                .map_err(|_| "notify timed out".to_owned())?
                .map_err(|err| format!("notify failed: {err}"))?;
            Ok(json!({"ok": true, "sequences": receipt.sequences}))
        }
        Some("requests") => {
            let requests: Vec<Value> = resolver
                .requests()
                .into_iter()
                .map(|r| {
                    json!({
                        "entity": r.entity,
                        "ids": r.ids,
                        "reason": match r.reason {
                            Reason::Subscribe => "subscribe",
                            Reason::Change => "change",
                            Reason::Unspecified => "unspecified",
                        },
                        "shared": r.shared,
                        "secret": r.secret,
                    })
                })
                .collect();
            Ok(json!({"ok": true, "requests": requests}))
        }
        Some("pass_throughs") => {
            let seen: Vec<Value> = resolver
                .pass_throughs()
                .into_iter()
                .map(|p| {
                    json!({
                        "connection_id": p.connection_id,
                        "secret": p.secret,
                        "payload": String::from_utf8_lossy(&p.payload),
                    })
                })
                .collect();
            Ok(json!({"ok": true, "pass_throughs": seen}))
        }
        Some("wait_registered") => {
            let except = text("except")?;
            let wait = Duration::from_millis(command["timeout_ms"].as_u64().unwrap_or(10_000));
            let states = resolver.states();
            let node_id = tokio::time::timeout(wait, registered_elsewhere(states, &except))
                .await
                .map_err(|_| format!("not registered again within {wait:?}"))?;
            Ok(json!({"ok": true, "node_id": node_id}))
        }
        _ => Err(format!("unknown op in {command}")),
    }
}

/// Until the backend is registered on a node whose id is not `except`.
async fn registered_elsewhere(
    mut states: tokio::sync::watch::Receiver<entity_sync_backend::BackendState>,
    except: &str,
) -> String {
    loop {
        if let entity_sync_backend::BackendState::Registered { node_id, .. } =
            &*states.borrow_and_update()
            && node_id != except
        {
            return node_id.clone();
        }
        if states.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn write_certs(dir: &str) -> Result<(), String> {
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    let ca = TestCa::new("entity-sync test CA");
    let server = ca.server_cert();
    for (name, pem) in [
        ("ca.pem", ca.cert_pem()),
        ("server.pem", server.cert_pem),
        ("server.key", server.key_pem),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, pem).map_err(|err| format!("{}: {err}", path.display()))?;
    }
    Ok(())
}
