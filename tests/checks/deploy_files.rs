//! Offline checks of `deploy/`: the compose file, the NATS config, the Helm
//! values and the Kubernetes manifests have the structure the running system
//! relies on (probes, ports, routes, replicas, `sync_interval: always`,
//! configuration variables the node actually reads) and the hardening they
//! promise: gRPC published on loopback only by compose and over TLS
//! everywhere (the backends trusting its CA), websocket origins restricted,
//! the nodes' NATS user limited to its own stream's JetStream API,
//! NetworkPolicies that admit only backends to gRPC and only the nodes to NATS, an unprivileged pod
//! under `RuntimeDefault` seccomp as the image's user, and a production image
//! (the Dockerfile's last stage, read stage by stage) with the node binary only.
//!
//! The YAML files are read with `serde_norway` (a maintained `serde_yaml`),
//! merge keys applied, into `serde_json` values the checks walk.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::{Map, Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

// ---------------------------------------------------------------------------
// YAML
// ---------------------------------------------------------------------------

/// Every document of `text` (documents separated by `---`) as JSON values,
/// with `<<` merge keys applied (compose's `x-` anchors rely on them);
/// `what` names the text in failure messages.
fn parse_yaml(text: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .enumerate()
        .map(|(index, document)| {
            let mut yaml = serde_norway::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{what}, document {index}: not YAML: {e}"));
            yaml.apply_merge()
                .unwrap_or_else(|e| panic!("{what}, document {index}: merge keys: {e}"));
            serde_json::to_value(yaml)
                .unwrap_or_else(|e| panic!("{what}, document {index}: not JSON-like: {e}"))
        })
        .collect()
}

/// Parses `path` (relative to the crate).
fn load(path: &str) -> Vec<Value> {
    parse_yaml(&read(path), path)
}

// ---------------------------------------------------------------------------
// Helpers on parsed values
// ---------------------------------------------------------------------------

/// `value[a][b]...`, panicking with the path when a step is missing.
fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    let mut current = value;
    for (depth, step) in path.iter().enumerate() {
        current = match current {
            Value::Object(map) => map.get(*step),
            Value::Array(items) => step.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
        .unwrap_or_else(|| panic!("missing {}", path[..=depth].join(".")));
    }
    current
}

fn text<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string: {}", path.join("."), at(value, path)))
}

fn items<'a>(value: &'a Value, path: &[&str]) -> &'a Vec<Value> {
    at(value, path)
        .as_array()
        .unwrap_or_else(|| panic!("{} is not a list", path.join(".")))
}

/// Every `ENTITY_SYNC_*` variable the node or its CLI reads.
fn known_env_vars() -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    let mut files: Vec<String> = fs::read_dir(root().join("src/config"))
        .expect("read src/config")
        .map(|entry| {
            format!(
                "src/config/{}",
                entry.unwrap().file_name().to_string_lossy()
            )
        })
        .collect();
    files.push("src/main.rs".to_owned());
    for file in &files {
        let source = read(file);
        for part in source.split("env = \"").skip(1) {
            if let Some(name) = part.split('"').next() {
                vars.insert(name.to_owned());
            }
        }
    }
    assert!(
        vars.contains("ENTITY_SYNC_NATS_URL"),
        "could not read the config's variables"
    );
    vars
}

fn assert_known_vars<'a>(
    names: impl IntoIterator<Item = &'a str>,
    known: &BTreeSet<String>,
    place: &str,
) {
    for name in names {
        if name.starts_with("ENTITY_SYNC_") {
            assert!(
                known.contains(name),
                "{place}: {name} is not a variable the node reads"
            );
        }
    }
}

/// "10s" / "2m" / "30" -> seconds.
fn seconds(text: &str) -> u64 {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("not a duration: {text:?}"));
    match unit {
        "" | "s" => n,
        "m" => n * 60,
        other => panic!("unexpected duration unit {other:?} in {text:?}"),
    }
}

/// The three NATS URLs a node is given must be the three servers.
fn assert_three_nats_urls(urls: &str, expected_hosts: &[String], place: &str) {
    let hosts: Vec<&str> = urls
        .split(',')
        .map(|url| {
            url.strip_prefix("nats://")
                .or_else(|| url.strip_prefix("tls://"))
                .map(|rest| match rest.rsplit_once('@') {
                    // The nodes' user of nats/nats.conf.
                    Some((userinfo, host)) => {
                        assert!(
                            userinfo.starts_with("entity-sync:"),
                            "{place}: NATS user of {url:?}"
                        );
                        host
                    }
                    None => rest,
                })
                .and_then(|rest| rest.strip_suffix(":4222"))
                .unwrap_or_else(|| panic!("{place}: bad NATS URL {url:?}"))
        })
        .collect();
    assert_eq!(hosts, expected_hosts, "{place}: ENTITY_SYNC_NATS_URL");
}

/// One entry of a compose service's `ports`.
#[derive(Debug)]
struct Published {
    /// The host address it is bound to; `None`: every interface.
    host_ip: Option<String>,
    host_port: Option<u16>,
    container: u16,
}

/// A service's `ports`, short (`[IP:]HOST:CONTAINER`, `CONTAINER`) or long
/// (`target`, `published`, `host_ip`) syntax; ranges and protocols other
/// than TCP fail loudly.
fn published_ports(service: &Value, name: &str) -> Vec<Published> {
    let Some(ports) = service.get("ports") else {
        return Vec::new();
    };
    let number = |text: &str| -> u16 {
        text.parse()
            .unwrap_or_else(|_| panic!("{name}: unsupported port {text:?}"))
    };
    ports
        .as_array()
        .unwrap_or_else(|| panic!("{name}: ports is not a list"))
        .iter()
        .map(|port| match port {
            Value::String(spec) => {
                let spec = spec.strip_suffix("/tcp").unwrap_or(spec.as_str());
                assert!(
                    !spec.contains(['[', '/', '-']),
                    "{name}: unsupported {spec:?}"
                );
                let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
                match parts[..] {
                    [container] => Published {
                        host_ip: None,
                        host_port: None,
                        container: number(container),
                    },
                    [container, host] => Published {
                        host_ip: None,
                        host_port: Some(number(host)),
                        container: number(container),
                    },
                    [container, host, ip] => Published {
                        host_ip: Some(ip.to_owned()).filter(|ip| !ip.is_empty()),
                        host_port: (!host.is_empty()).then(|| number(host)),
                        container: number(container),
                    },
                    _ => unreachable!(),
                }
            }
            Value::Object(long) => {
                if let Some(protocol) = long.get("protocol") {
                    assert_eq!(protocol, "tcp", "{name}: {port}");
                }
                let as_port = |v: &Value| match v {
                    Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()).unwrap(),
                    Value::String(s) => number(s),
                    other => panic!("{name}: bad port {other}"),
                };
                Published {
                    host_ip: long
                        .get("host_ip")
                        .map(|ip| ip.as_str().expect("host_ip").to_owned()),
                    host_port: long.get("published").map(as_port),
                    container: as_port(&long["target"]),
                }
            }
            other => panic!("{name}: bad ports entry {other}"),
        })
        .collect()
}

/// Every manifest of `deploy/k8s/`, by kind.
fn k8s_manifests() -> HashMap<String, Vec<Value>> {
    let dir = root().join("deploy/k8s");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut by_kind: HashMap<String, Vec<Value>> = HashMap::new();
    let mut names = BTreeSet::new();
    for file in &files {
        let relative = file
            .strip_prefix(root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        for doc in load(&relative) {
            text(&doc, &["apiVersion"]);
            let kind = text(&doc, &["kind"]).to_owned();
            let name = text(&doc, &["metadata", "name"]).to_owned();
            assert!(!name.is_empty(), "{relative}: metadata.name");
            assert!(
                names.insert((kind.clone(), name.clone())),
                "two {kind} manifests named {name}"
            );
            by_kind.entry(kind).or_default().push(doc);
        }
    }
    by_kind
}

/// The only manifest of `kind`.
fn one<'a>(by_kind: &'a HashMap<String, Vec<Value>>, kind: &str) -> &'a Value {
    match by_kind.get(kind).map(Vec::as_slice) {
        Some([doc]) => doc,
        other => panic!("expected one {kind}, found {}", other.map_or(0, <[_]>::len)),
    }
}

/// `matchLabels` of a label selector (`matchExpressions` fail loudly).
fn match_labels(selector: &Value) -> Map<String, Value> {
    let selector = selector.as_object().expect("a label selector");
    assert!(
        selector.keys().all(|k| k == "matchLabels"),
        "unsupported selector {selector:?}"
    );
    selector
        .get("matchLabels")
        .map(|m| m.as_object().expect("matchLabels").clone())
        .unwrap_or_default()
}

fn selects(selector: &Map<String, Value>, labels: &Map<String, Value>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Who NetworkPolicies let open a connection.
#[derive(Debug, PartialEq)]
enum Peer {
    /// Any source (no policy isolates the pod, or a rule without `from`).
    Anyone,
    /// Pods of the policy's namespace with these labels.
    Pods(Map<String, Value>),
    /// A namespaceSelector or an ipBlock.
    Other(Value),
}

/// The sources the policies admit to TCP `port` of pods labelled `labels`;
/// `port_names` resolves named ports.
fn admitted(
    policies: &[Value],
    labels: &Map<String, Value>,
    port: i64,
    port_names: &HashMap<String, i64>,
) -> Vec<Peer> {
    let mut isolated = false;
    let mut peers = Vec::new();
    for policy in policies {
        assert_eq!(text(policy, &["apiVersion"]), "networking.k8s.io/v1");
        if !selects(&match_labels(at(policy, &["spec", "podSelector"])), labels) {
            continue;
        }
        let types: Vec<&str> = items(policy, &["spec", "policyTypes"])
            .iter()
            .map(|t| t.as_str().expect("policy type"))
            .collect();
        if !types.contains(&"Ingress") {
            continue;
        }
        isolated = true;
        let Some(rules) = policy["spec"].get("ingress") else {
            continue;
        };
        for rule in rules.as_array().expect("ingress rules") {
            let covers = match rule.get("ports") {
                None => true,
                Some(ports) => ports.as_array().expect("ports").iter().any(|p| {
                    let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    let number = match &p["port"] {
                        Value::Number(n) => n.as_i64().unwrap(),
                        Value::String(name) => *port_names
                            .get(name)
                            .unwrap_or_else(|| panic!("unknown port name {name}")),
                        // No port: every port.
                        Value::Null => port,
                        other => panic!("bad port {other}"),
                    };
                    let end = p.get("endPort").and_then(Value::as_i64).unwrap_or(number);
                    protocol == "TCP" && (number..=end).contains(&port)
                }),
            };
            if !covers {
                continue;
            }
            match rule.get("from").and_then(Value::as_array) {
                None => peers.push(Peer::Anyone),
                Some(from) if from.is_empty() => peers.push(Peer::Anyone),
                Some(from) => {
                    for peer in from {
                        let keys: Vec<&String> = peer.as_object().expect("peer").keys().collect();
                        if keys == ["podSelector"] {
                            peers.push(Peer::Pods(match_labels(&peer["podSelector"])));
                        } else {
                            peers.push(Peer::Other(peer.clone()));
                        }
                    }
                }
            }
        }
    }
    if !isolated {
        peers.push(Peer::Anyone);
    }
    peers
}

/// A Dockerfile's stages: name, base, instructions (keyword upper-cased,
/// arguments), with line continuations joined and comments dropped.
struct Stage {
    name: Option<String>,
    base: String,
    instructions: Vec<(String, String)>,
}

fn dockerfile_stages(text: &str) -> Vec<Stage> {
    let mut instructions: Vec<String> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                pending.push_str(part);
                pending.push(' ');
            }
            None => {
                pending.push_str(trimmed);
                instructions.push(std::mem::take(&mut pending));
            }
        }
    }
    assert!(pending.is_empty(), "Dockerfile ends in a continuation");
    let mut stages: Vec<Stage> = Vec::new();
    for instruction in instructions {
        let (keyword, args) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((&instruction, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if keyword == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let (base, name) = match words[..] {
                [base] => (base, None),
                [base, r#as, name] if r#as.eq_ignore_ascii_case("as") => (base, Some(name)),
                _ => panic!("unsupported FROM {args:?}"),
            };
            stages.push(Stage {
                name: name.map(str::to_owned),
                base: base.to_owned(),
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .unwrap_or_else(|| panic!("{keyword} before FROM"))
                .instructions
                .push((keyword, args));
        }
    }
    stages
}

/// The stage named `base`, if `base` is one.
fn stage<'a>(stages: &'a [Stage], base: &str) -> Option<&'a Stage> {
    stages.iter().find(|s| {
        s.name
            .as_deref()
            .is_some_and(|n| n.eq_ignore_ascii_case(base))
    })
}

/// The production image: the last stage and the stages it is built on
/// (last first), and the external image at the bottom.
fn production_chain(stages: &[Stage]) -> (Vec<&Stage>, String) {
    let mut chain = vec![stages.last().expect("a stage")];
    loop {
        let base = &chain.last().unwrap().base;
        match stage(stages, base) {
            Some(parent) => chain.push(parent),
            None => return (chain, base.clone()),
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn yaml_loader_reads_what_the_files_use() {
    let docs = parse_yaml(
        "a: &base\n  x: 1\n  y: \"two\"\nb:\n  <<: *base\n  y: 3\nlist:\n- k: v\n  n: [\"p\", 'q']\n- plain # comment\n---\nkind: X\n",
        "the sample",
    );
    assert_eq!(
        docs,
        vec![
            json!({"a": {"x": 1, "y": "two"}, "b": {"x": 1, "y": 3}, "list": [{"k": "v", "n": ["p", "q"]}, "plain"]}),
            json!({"kind": "X"}),
        ]
    );
}

#[test]
fn compose_runs_three_nats_servers_three_nodes_and_the_demo() {
    let compose = &load("deploy/compose.yaml")[0];
    let services = at(compose, &["services"]).as_object().expect("services");
    let known = known_env_vars();

    // Three NATS servers from the official image (>= 2.10), one shared config.
    let nats: Vec<String> = (1..=3).map(|i| format!("nats-{i}")).collect();
    for name in &nats {
        let service = at(compose, &["services", name]);
        let image = text(service, &["image"]);
        let version = image
            .strip_prefix("nats:")
            .unwrap_or_else(|| panic!("{name}: not the official nats image: {image}"));
        let mut parts = version.split(['.', '-']);
        let major: u64 = parts.next().unwrap().parse().expect("major");
        let minor: u64 = parts.next().unwrap().parse().expect("minor");
        assert!(
            (major, minor) >= (2, 10),
            "{name}: nats-server {version} is older than 2.10"
        );
        let command: Vec<&str> = items(service, &["command"])
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(command, ["--config", "/etc/nats/nats.conf"], "{name}");
        let volumes: Vec<&str> = items(service, &["volumes"])
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            volumes.contains(&"./nats/nats.conf:/etc/nats/nats.conf:ro"),
            "{name}: {volumes:?}"
        );
        assert!(
            volumes.iter().any(|v| v.ends_with(":/data")),
            "{name}: no data volume: {volumes:?}"
        );
        assert_eq!(text(service, &["environment", "NATS_SERVER_NAME"]), name);
        let health: Vec<&str> = items(service, &["healthcheck", "test"])
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            health.iter().any(|t| t.contains(":8222/healthz")),
            "{name}: {health:?}"
        );
    }

    // Three nodes built from deploy/Dockerfile, on all three servers, replicas 3.
    let nodes: Vec<String> = (1..=3).map(|i| format!("entity-sync-{i}")).collect();
    let mut host_ports = BTreeSet::new();
    for name in &nodes {
        let service = at(compose, &["services", name]);
        assert_eq!(text(service, &["build", "context"]), "..", "{name}");
        assert_eq!(
            text(service, &["build", "dockerfile"]),
            "deploy/Dockerfile",
            "{name}"
        );
        let env = at(service, &["environment"])
            .as_object()
            .expect("environment");
        assert_known_vars(env.keys().map(String::as_str), &known, name);
        assert_three_nats_urls(
            text(service, &["environment", "ENTITY_SYNC_NATS_URL"]),
            &nats,
            name,
        );
        assert_eq!(
            text(service, &["environment", "ENTITY_SYNC_NATS_REPLICAS"]),
            "3",
            "{name}"
        );
        assert_eq!(text(service, &["environment", "ENTITY_SYNC_NODE_ID"]), name);
        let grace = seconds(text(
            service,
            &["environment", "ENTITY_SYNC_SHUTDOWN_GRACE"],
        ));
        assert!(
            seconds(text(service, &["stop_grace_period"])) > grace,
            "{name}: stop_grace_period"
        );
        for server in &nats {
            assert_eq!(
                text(service, &["depends_on", server, "condition"]),
                "service_healthy",
                "{name}"
            );
        }
        let ports = published_ports(service, name);
        assert!(
            ports.iter().any(|p| p.container == 8080),
            "{name}: websocket port: {ports:?}"
        );
        assert!(
            ports.iter().any(|p| p.container == 50051),
            "{name}: gRPC port: {ports:?}"
        );
        for port in ports {
            let host_port = port
                .host_port
                .unwrap_or_else(|| panic!("{name}: {port:?} has no fixed host port"));
            assert!(host_ports.insert(host_port), "host port reused: {port:?}");
        }
    }

    // The demo backend, as the Dockerfile installs it, pointed at a node.
    let demo = at(compose, &["services", "demo"]);
    let entrypoint: Vec<&str> = items(demo, &["entrypoint"])
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(entrypoint, ["/usr/local/bin/entity-sync-demo"]);
    assert!(read("deploy/Dockerfile").contains("/usr/local/bin/entity-sync-demo"));
    let command: Vec<&str> = items(demo, &["command"])
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let node_url = command
        .iter()
        .position(|a| *a == "--node")
        .map(|i| command[i + 1])
        .expect("demo --node");
    let node = node_url
        .strip_prefix("https://")
        .and_then(|rest| rest.strip_suffix(":50051"))
        .unwrap_or_else(|| panic!("demo --node {node_url}"));
    assert!(
        nodes.iter().any(|n| n == node),
        "demo --node names no node service: {node}"
    );
    assert!(
        command
            .windows(2)
            .any(|w| w == ["--http-addr", "0.0.0.0:8090"]),
        "{command:?}"
    );
    assert!(
        services.contains_key("demo") && services.len() == 7,
        "services: {:?}",
        services.keys()
    );
}

#[test]
fn nats_config_clusters_and_fsyncs_every_write() {
    let conf = read("deploy/nats/nats.conf");
    let lines: Vec<&str> = conf
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    // The body of `name { ... }` (one level; the file has no nested blocks
    // other than the routes list).
    let block = |name: &str| -> Vec<&str> {
        let start = lines
            .iter()
            .position(|l| *l == format!("{name} {{"))
            .unwrap_or_else(|| panic!("no {name} block"));
        let end = start
            + lines[start..]
                .iter()
                .position(|l| *l == "}")
                .expect("block end");
        lines[start + 1..end].to_vec()
    };
    assert!(lines.contains(&"server_name: $NATS_SERVER_NAME"));
    let jetstream = block("jetstream");
    assert!(
        jetstream.contains(&"sync_interval: always"),
        "jetstream block: {jetstream:?}"
    );
    assert!(
        jetstream.iter().any(|l| l.starts_with("store_dir: /data")),
        "{jetstream:?}"
    );
    let cluster = block("cluster");
    assert!(
        cluster.iter().any(|l| l.starts_with("name: ")),
        "{cluster:?}"
    );
    assert!(cluster.contains(&"port: 6222"), "{cluster:?}");
    for i in 1..=3 {
        let route = format!("nats-route://nats-{i}:6222");
        assert!(
            cluster.contains(&route.as_str()),
            "missing route {route}: {cluster:?}"
        );
    }
    assert!(lines.contains(&"port: 4222") && lines.contains(&"http_port: 8222"));
    // TLS on the client port and on the routes (with peer verification).
    assert!(
        lines.contains(&"tls {") && lines.contains(&"cert_file: /etc/nats/certs/server.pem"),
        "no TLS on the client port"
    );
    assert!(
        cluster.contains(&"tls {") && cluster.contains(&"verify: true"),
        "routes without verified TLS: {cluster:?}"
    );
}

#[test]
fn helm_values_enable_a_three_server_jetstream_cluster() {
    let values = &load("deploy/nats/helm-values.yaml")[0];
    assert_eq!(at(values, &["config", "cluster", "enabled"]), &json!(true));
    assert_eq!(at(values, &["config", "cluster", "replicas"]), &json!(3));
    assert_eq!(
        at(values, &["config", "jetstream", "enabled"]),
        &json!(true)
    );
    assert_eq!(
        at(values, &["config", "jetstream", "fileStore", "enabled"]),
        &json!(true)
    );
    assert_eq!(
        text(values, &["config", "jetstream", "merge", "sync_interval"]),
        "always"
    );
}

/// The subjects of `publish` and `subscribe` of the nodes' user in
/// nats/nats.conf's `authorization` block: the quoted strings of each list.
fn nats_conf_permissions() -> (Vec<String>, Vec<String>) {
    let conf = read("deploy/nats/nats.conf");
    let auth = &conf[conf.find("authorization {").expect("authorization block")..];
    let list = |name: &str| -> Vec<String> {
        let start = auth
            .find(&format!("{name}: {{"))
            .unwrap_or_else(|| panic!("no {name} permissions"));
        let rest = &auth[start..];
        let open = rest.find('[').expect("allow list");
        let close = rest.find(']').expect("allow list end");
        rest[open + 1..close]
            .lines()
            .filter_map(|line| {
                let line = line.trim();
                let quoted = line.strip_prefix('"')?;
                Some(quoted[..quoted.find('"')?].to_owned())
            })
            .collect()
    };
    (list("publish"), list("subscribe"))
}

fn strings(value: &Value, path: &[&str]) -> Vec<String> {
    items(value, path)
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

#[test]
fn helm_values_speak_tls_and_log_the_nodes_in_with_least_permissions() {
    let values = &load("deploy/nats/helm-values.yaml")[0];
    // TLS on the client port and on the routes, which verify each other.
    for block in ["nats", "cluster"] {
        assert_eq!(
            at(values, &["config", block, "tls", "enabled"]),
            &json!(true),
            "config.{block}.tls"
        );
        assert_eq!(
            text(values, &["config", block, "tls", "secretName"]),
            "nats-server-tls"
        );
    }
    assert_eq!(
        at(values, &["config", "cluster", "tls", "merge", "verify"]),
        &json!(true)
    );
    assert_eq!(at(values, &["tlsCA", "enabled"]), &json!(true));
    let ca_secret = text(values, &["tlsCA", "secretName"]);

    // The nodes' user: the same permissions as the compose servers' config.
    let users = items(values, &["config", "merge", "authorization", "users"]);
    assert_eq!(users.len(), 1, "{users:?}");
    let user = &users[0];
    assert_eq!(text(user, &["user"]), "entity-sync");
    assert_eq!(text(user, &["password"]), "<< $NATS_NODE_PASSWORD >>");
    let (publish, subscribe) = nats_conf_permissions();
    assert_eq!(publish.len(), 14, "{publish:?}");
    assert_eq!(
        strings(user, &["permissions", "publish", "allow"]),
        publish,
        "publish permissions differ from nats.conf"
    );
    assert_eq!(
        strings(user, &["permissions", "subscribe", "allow"]),
        subscribe,
        "subscribe permissions differ from nats.conf"
    );
    let password_secret = text(
        values,
        &[
            "container",
            "env",
            "NATS_NODE_PASSWORD",
            "valueFrom",
            "secretKeyRef",
            "name",
        ],
    );

    // The nodes: the same Secrets, TLS URLs, the CA mounted, TLS required.
    let by_kind = k8s_manifests();
    let pod = at(one(&by_kind, "Deployment"), &["spec", "template", "spec"]);
    let container = &items(pod, &["containers"])[0];
    let env = items(container, &["env"]);
    let position = |name: &str| {
        env.iter()
            .position(|e| text(e, &["name"]) == name)
            .unwrap_or_else(|| panic!("Deployment: no {name}"))
    };
    let password = &env[position("NATS_NODE_PASSWORD")];
    assert_eq!(
        text(password, &["valueFrom", "secretKeyRef", "name"]),
        password_secret
    );
    // Kubernetes expands $(VAR) only from variables defined before.
    let url_at = position("ENTITY_SYNC_NATS_URL");
    assert!(position("NATS_NODE_PASSWORD") < url_at);
    for url in text(&env[url_at], &["value"]).split(',') {
        assert!(
            url.starts_with("tls://entity-sync:$(NATS_NODE_PASSWORD)@"),
            "Deployment: NATS URL {url:?}"
        );
    }
    assert_eq!(
        text(&env[position("ENTITY_SYNC_NATS_REQUIRE_TLS")], &["value"]),
        "true"
    );
    let ca_path = text(&env[position("ENTITY_SYNC_NATS_TLS_CA")], &["value"]);
    let volume = items(pod, &["volumes"])
        .iter()
        .find(|v| at(v, &["secret", "secretName"]) == &json!(ca_secret))
        .unwrap_or_else(|| panic!("Deployment: no volume of Secret {ca_secret}"));
    let mount = items(container, &["volumeMounts"])
        .iter()
        .find(|m| text(m, &["name"]) == text(volume, &["name"]))
        .expect("the CA volume is not mounted");
    assert_eq!(
        ca_path,
        format!(
            "{}/{}",
            text(mount, &["mountPath"]),
            text(values, &["tlsCA", "key"])
        )
    );
}

#[test]
fn kubernetes_manifests_have_probes_ports_and_a_disruption_budget() {
    let by_kind = k8s_manifests();
    let known = known_env_vars();

    // Deployment.
    let deployment = one(&by_kind, "Deployment");
    assert_eq!(text(deployment, &["apiVersion"]), "apps/v1");
    let replicas = at(deployment, &["spec", "replicas"])
        .as_i64()
        .expect("replicas");
    assert_eq!(replicas, 3);
    let selector = at(deployment, &["spec", "selector", "matchLabels"])
        .as_object()
        .expect("selector");
    let pod_labels = at(deployment, &["spec", "template", "metadata", "labels"])
        .as_object()
        .expect("labels");
    for (key, value) in selector {
        assert_eq!(
            pod_labels.get(key),
            Some(value),
            "selector {key} does not match the pod labels"
        );
    }
    let pod = at(deployment, &["spec", "template", "spec"]);
    let container = &items(pod, &["containers"])[0];
    let mut container_ports: HashMap<String, i64> = HashMap::new();
    for port in items(container, &["ports"]) {
        container_ports.insert(
            text(port, &["name"]).to_owned(),
            at(port, &["containerPort"])
                .as_i64()
                .expect("containerPort"),
        );
    }
    let mut numbers: Vec<i64> = container_ports.values().copied().collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [8080, 50051]);
    // A probe's port: a number, or the name of a container port.
    let port_of = |probe: &Value| -> i64 {
        match at(probe, &["httpGet", "port"]) {
            Value::Number(n) => n.as_i64().unwrap(),
            Value::String(name) => container_ports[name],
            other => panic!("bad probe port {other}"),
        }
    };
    let readiness = at(container, &["readinessProbe"]);
    assert_eq!(text(readiness, &["httpGet", "path"]), "/readyz");
    assert_eq!(port_of(readiness), 8080);
    let liveness = at(container, &["livenessProbe"]);
    assert_eq!(text(liveness, &["httpGet", "path"]), "/healthz");
    assert_eq!(port_of(liveness), 8080);
    let env: HashMap<&str, &Value> = items(container, &["env"])
        .iter()
        .map(|e| (text(e, &["name"]), e))
        .collect();
    assert_known_vars(env.keys().copied(), &known, "Deployment");
    let nats_hosts: Vec<String> = (0..3).map(|i| format!("nats-{i}.nats-headless")).collect();
    assert_three_nats_urls(
        text(env["ENTITY_SYNC_NATS_URL"], &["value"]),
        &nats_hosts,
        "Deployment",
    );
    assert_eq!(text(env["ENTITY_SYNC_NATS_REPLICAS"], &["value"]), "3");
    let grace = env
        .get("ENTITY_SYNC_SHUTDOWN_GRACE")
        .map_or(10, |e| seconds(text(e, &["value"])));
    let termination = at(pod, &["terminationGracePeriodSeconds"])
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        termination as u64 > grace,
        "terminationGracePeriodSeconds {termination} <= shutdown grace {grace}"
    );

    // Service: both ports, onto the container's ports, selecting the pods.
    let service = one(&by_kind, "Service");
    let service_selector = at(service, &["spec", "selector"])
        .as_object()
        .expect("selector");
    for (key, value) in service_selector {
        assert_eq!(pod_labels.get(key), Some(value), "Service selector {key}");
    }
    let mut service_ports = Vec::new();
    for port in items(service, &["spec", "ports"]) {
        let target = match at(port, &["targetPort"]) {
            Value::Number(n) => n.as_i64().unwrap(),
            Value::String(name) => *container_ports
                .get(name)
                .unwrap_or_else(|| panic!("targetPort {name} is no container port")),
            other => panic!("bad targetPort {other}"),
        };
        let number = at(port, &["port"]).as_i64().unwrap();
        assert_eq!(number, target, "Service port {number} -> {target}");
        service_ports.push((text(port, &["name"]).to_owned(), number));
    }
    service_ports.sort();
    assert_eq!(
        service_ports,
        [("grpc".to_owned(), 50051), ("ws".to_owned(), 8080)]
    );

    // PodDisruptionBudget.
    let pdb = one(&by_kind, "PodDisruptionBudget");
    assert_eq!(text(pdb, &["apiVersion"]), "policy/v1");
    let min_available = at(pdb, &["spec", "minAvailable"])
        .as_i64()
        .expect("minAvailable");
    assert_eq!(min_available, 2);
    assert!(
        min_available < replicas,
        "the budget must allow one disruption"
    );
    assert_eq!(
        at(pdb, &["spec", "selector", "matchLabels"]).as_object(),
        Some(selector)
    );
}

#[test]
fn deploy_readme_covers_helm_and_sync_interval() {
    let readme = read("deploy/README.md");
    for needle in [
        "helm install",
        "config.cluster.enabled",
        "fileStore",
        "sync_interval: always",
        "Jepsen",
        "compose.yaml",
        "kubectl apply -f deploy/k8s/",
        "networkpolicy.yaml",
        "entity-sync/role: backend",
        "127.0.0.1",
        "RuntimeDefault",
    ] {
        assert!(
            readme.contains(needle),
            "deploy/README.md does not mention {needle:?}"
        );
    }
}

#[test]
fn compose_publishes_grpc_on_loopback_only() {
    let compose = &load("deploy/compose.yaml")[0];
    let services = at(compose, &["services"]).as_object().expect("services");
    let mut grpc = 0;
    for (name, service) in services {
        assert!(
            service.get("network_mode").is_none(),
            "{name}: network_mode bypasses the published ports"
        );
        for port in published_ports(service, name) {
            match port.container {
                50051 => {
                    assert_eq!(
                        port.host_ip.as_deref(),
                        Some("127.0.0.1"),
                        "{name}: gRPC must be published on loopback only: {port:?}"
                    );
                    grpc += 1;
                }
                // Websockets stay reachable from other hosts.
                8080 => assert_eq!(port.host_ip, None, "{name}: websocket port {port:?}"),
                _ => {}
            }
        }
    }
    assert_eq!(grpc, 3, "one loopback gRPC port per node");
    // The nodes listen on every interface of their container, so that
    // backends on the compose network reach them by service name.
    for i in 1..=3 {
        assert_eq!(
            text(
                compose,
                &[
                    "services",
                    &format!("entity-sync-{i}"),
                    "environment",
                    "ENTITY_SYNC_GRPC_ADDR"
                ]
            ),
            "0.0.0.0:50051"
        );
    }
}

#[test]
fn network_policies_admit_only_backends_to_grpc_and_only_nodes_to_nats() {
    let by_kind = k8s_manifests();
    let deployment = one(&by_kind, "Deployment");
    let policies = by_kind.get("NetworkPolicy").expect("NetworkPolicies");
    let node_labels = at(deployment, &["spec", "template", "metadata", "labels"])
        .as_object()
        .expect("pod labels")
        .clone();
    let container = &items(deployment, &["spec", "template", "spec", "containers"])[0];
    let node_ports: HashMap<String, i64> = items(container, &["ports"])
        .iter()
        .map(|p| {
            (
                text(p, &["name"]).to_owned(),
                at(p, &["containerPort"]).as_i64().unwrap(),
            )
        })
        .collect();
    let (ws, grpc) = (node_ports["ws"], node_ports["grpc"]);
    assert_eq!((ws, grpc), (8080, 50051));

    // Nodes: websockets from anyone, gRPC from backend pods only.
    let backend: Map<String, Value> = [("entity-sync/role".to_owned(), json!("backend"))]
        .into_iter()
        .collect();
    assert!(
        !selects(&backend, &node_labels),
        "the nodes must not carry the backend label"
    );
    assert!(
        admitted(policies, &node_labels, ws, &node_ports).contains(&Peer::Anyone),
        "the websocket port must stay open"
    );
    assert_eq!(
        admitted(policies, &node_labels, grpc, &node_ports),
        [Peer::Pods(backend.clone())],
        "gRPC must admit backend pods only"
    );

    // NATS: the chart's server pods for the release the node's URLs name
    // (tls://user:password@nats-0.nats-headless:4222 -> release "nats").
    let env = items(container, &["env"]);
    let urls = env
        .iter()
        .find(|e| text(e, &["name"]) == "ENTITY_SYNC_NATS_URL")
        .map(|e| text(e, &["value"]))
        .expect("ENTITY_SYNC_NATS_URL");
    let first = urls.split(',').next().unwrap();
    let (pod, rest) = first
        .strip_prefix("nats://")
        .or_else(|| first.strip_prefix("tls://"))
        .map(|r| r.rsplit_once('@').map_or(r, |(_user, host)| host))
        .and_then(|r| r.split_once('.'))
        .expect("a NATS pod URL");
    let release = pod.rsplit_once('-').expect("statefulset pod").0;
    assert_eq!(rest, format!("{release}-headless:4222"));
    let chart = |component: &str| -> Map<String, Value> {
        [
            ("app.kubernetes.io/name", "nats"),
            ("app.kubernetes.io/instance", release),
            ("app.kubernetes.io/component", component),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), json!(v)))
        .collect()
    };
    let nats_labels = chart("nats");
    let nats_ports: HashMap<String, i64> = [("nats", 4222), ("cluster", 6222), ("monitor", 8222)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let clients = admitted(policies, &nats_labels, 4222, &nats_ports);
    assert!(!clients.is_empty(), "nobody may reach NATS");
    for peer in &clients {
        let Peer::Pods(selector) = peer else {
            panic!("NATS 4222 admits more than the nodes: {peer:?}")
        };
        assert!(
            !selector.is_empty() && selects(selector, &node_labels),
            "NATS 4222 admits pods other than the nodes: {selector:?}"
        );
        assert!(!selects(selector, &backend), "backends may not reach NATS");
        assert!(!selects(selector, &chart("nats-box")), "{selector:?}");
    }
    let routes = admitted(policies, &nats_labels, 6222, &nats_ports);
    assert!(!routes.is_empty(), "the NATS servers must reach each other");
    for peer in &routes {
        let Peer::Pods(selector) = peer else {
            panic!("NATS 6222 admits more than the servers: {peer:?}")
        };
        assert!(
            !selector.is_empty()
                && selects(selector, &nats_labels)
                && !selects(selector, &node_labels),
            "NATS 6222 admits pods other than the servers: {selector:?}"
        );
    }
    assert!(
        !admitted(policies, &nats_labels, 8222, &nats_ports).contains(&Peer::Anyone),
        "NATS monitoring open to anyone"
    );
}

#[test]
fn deployment_runs_unprivileged_as_the_images_user() {
    let by_kind = k8s_manifests();
    let deployment = one(&by_kind, "Deployment");
    let pod = at(deployment, &["spec", "template", "spec"]);
    assert_eq!(at(pod, &["automountServiceAccountToken"]), &json!(false));
    assert!(pod.get("hostNetwork").is_none_or(|v| v == &json!(false)));
    let context = at(pod, &["securityContext"]);
    assert_eq!(text(context, &["seccompProfile", "type"]), "RuntimeDefault");
    assert_eq!(at(context, &["runAsNonRoot"]), &json!(true));
    let uid = at(context, &["runAsUser"]).as_i64().expect("runAsUser");
    let gid = at(context, &["runAsGroup"]).as_i64().expect("runAsGroup");

    // The production image's user, numeric, is the same.
    let stages = dockerfile_stages(&read("deploy/Dockerfile"));
    let (chain, _) = production_chain(&stages);
    let user = chain
        .iter()
        .flat_map(|s| s.instructions.iter().rev())
        .find(|(k, _)| k == "USER")
        .map(|(_, user)| user.as_str())
        .expect("the production image sets USER");
    assert_eq!(user, format!("{uid}:{gid}"), "Dockerfile USER");
    assert_ne!(uid, 0);
    assert!(
        chain
            .iter()
            .flat_map(|s| &s.instructions)
            .any(|(k, a)| k == "RUN"
                && a.contains(&format!("useradd --system --uid {uid} --gid {gid}"))),
        "the image creates user {uid}:{gid}"
    );

    for container in items(pod, &["containers"]) {
        let name = text(container, &["name"]);
        let context = at(container, &["securityContext"]);
        assert_eq!(
            at(context, &["allowPrivilegeEscalation"]),
            &json!(false),
            "{name}"
        );
        assert_eq!(
            at(context, &["readOnlyRootFilesystem"]),
            &json!(true),
            "{name}"
        );
        assert!(context.get("privileged").is_none_or(|v| v == &json!(false)));
        assert_eq!(
            at(context, &["capabilities", "drop"]),
            &json!(["ALL"]),
            "{name}"
        );
        assert!(
            at(context, &["capabilities"]).get("add").is_none(),
            "{name}"
        );
        // Nothing per container undoes the pod's settings.
        for (key, pod_value) in [
            ("runAsNonRoot", json!(true)),
            ("runAsUser", json!(uid)),
            ("seccompProfile", json!({"type": "RuntimeDefault"})),
        ] {
            if let Some(value) = context.get(key) {
                assert_eq!(value, &pod_value, "{name}: securityContext.{key}");
            }
        }
        // The tokens Secret, read-only where ENTITY_SYNC_GRPC_TOKENS_FILE points.
        let tokens_file = items(container, &["env"])
            .iter()
            .find(|e| text(e, &["name"]) == "ENTITY_SYNC_GRPC_TOKENS_FILE")
            .map(|e| text(e, &["value"]))
            .expect("ENTITY_SYNC_GRPC_TOKENS_FILE");
        let mount = items(container, &["volumeMounts"])
            .iter()
            .find(|m| Path::new(tokens_file).parent() == Some(Path::new(text(m, &["mountPath"]))))
            .expect("a mount holding the tokens file");
        assert_eq!(at(mount, &["readOnly"]), &json!(true));
        let volume = items(pod, &["volumes"])
            .iter()
            .find(|v| text(v, &["name"]) == text(mount, &["name"]))
            .expect("the tokens volume");
        assert_eq!(
            text(volume, &["secret", "secretName"]),
            "entity-sync-tokens"
        );
    }
}

#[test]
fn production_image_holds_only_the_node_binary() {
    let stages = dockerfile_stages(&read("deploy/Dockerfile"));
    let (chain, bottom) = production_chain(&stages);
    let last = chain[0];
    // The default target is the one compose and the docs build as the node.
    assert_eq!(last.name.as_deref(), Some("node"));
    let compose = &load("deploy/compose.yaml")[0];
    assert_eq!(
        text(compose, &["services", "entity-sync-1", "build", "target"]),
        "node"
    );

    // Not built on a stage that holds the toolchain and the sources.
    let builders: Vec<&Stage> = stages
        .iter()
        .filter(|s| {
            s.instructions
                .iter()
                .any(|(k, a)| k == "RUN" && a.contains("cargo "))
        })
        .collect();
    assert!(!builders.is_empty(), "no build stage found");
    for builder in &builders {
        assert!(
            !chain.iter().any(|s| std::ptr::eq(*s, *builder)),
            "the production image is built on {:?}",
            builder.name
        );
    }
    assert!(!bottom.starts_with("rust"), "production base {bottom}");

    // Its only files from elsewhere: the node binary, from the stage that
    // builds the node binary alone.
    let copies: Vec<&String> = chain
        .iter()
        .flat_map(|s| &s.instructions)
        .filter(|(k, _)| k == "COPY" || k == "ADD")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    let words: Vec<&str> = copies[0].split_whitespace().collect();
    let [from, source, target] = words[..] else {
        panic!("unexpected COPY {:?}", copies[0])
    };
    assert_eq!(source, "/usr/local/bin/entity-sync");
    assert_eq!(target, "/usr/local/bin/entity-sync");
    let from = from.strip_prefix("--from=").expect("COPY --from");
    let source_stage = stage(&stages, from).expect("COPY from a stage");
    let build_runs: Vec<&String> = source_stage
        .instructions
        .iter()
        .filter(|(k, a)| k == "RUN" && a.contains("cargo "))
        .map(|(_, a)| a)
        .collect();
    assert_eq!(build_runs.len(), 1, "{build_runs:?}");
    assert!(
        build_runs[0].contains("-p entity-sync --bin entity-sync")
            && !build_runs[0].contains("demo"),
        "{}",
        build_runs[0]
    );
    for (keyword, args) in chain.iter().flat_map(|s| &s.instructions) {
        assert!(
            !args.to_ascii_lowercase().contains("demo"),
            "production image: {keyword} {args}"
        );
    }
    let entrypoint = last
        .instructions
        .iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, a)| a.as_str());
    assert_eq!(entrypoint, Some(r#"["/usr/local/bin/entity-sync"]"#));

    // The demo has an image of its own, outside the production chain.
    let demo = stage(&stages, "demo").expect("a demo stage");
    assert!(!chain.iter().any(|s| std::ptr::eq(*s, demo)));
}

/// The demo's binary embeds files with `include_str!` (its page, the client
/// package's committed build): the stages that build it must copy each one,
/// or the image build fails where `cargo build` works.
#[test]
fn demo_image_build_copies_every_file_the_demo_embeds() {
    let stages = dockerfile_stages(&read("deploy/Dockerfile"));
    let builder = stage(&stages, "demo-build").expect("a demo-build stage");
    let mut chain = vec![builder];
    while let Some(parent) = stage(&stages, &chain.last().unwrap().base) {
        chain.push(parent);
    }
    let copied: Vec<PathBuf> = chain
        .iter()
        .flat_map(|s| &s.instructions)
        .filter(|(k, a)| k == "COPY" && !a.starts_with("--from"))
        .flat_map(|(_, a)| {
            let words: Vec<&str> = a.split_whitespace().collect();
            // Every word but the destination is a source, relative to the root.
            words[..words.len() - 1]
                .iter()
                .map(|w| PathBuf::from(w.trim_end_matches('/')))
                .collect::<Vec<_>>()
        })
        .collect();
    let source = read("examples/demo/src/main.rs");
    let embedded: Vec<PathBuf> = source
        .split("include_str!(\"")
        .skip(1)
        .map(|rest| {
            let relative = &rest[..rest.find('"').expect("a closing quote")];
            let mut path = PathBuf::from("examples/demo/src");
            for part in Path::new(relative).components() {
                match part {
                    std::path::Component::ParentDir => {
                        assert!(path.pop(), "{relative} leaves the repository");
                    }
                    other => path.push(other),
                }
            }
            path
        })
        .collect();
    assert!(
        embedded.contains(&PathBuf::from("clients/js/dist/entity-sync.js")),
        "{embedded:?}"
    );
    for file in &embedded {
        assert!(root().join(file).is_file(), "{} is missing", file.display());
        assert!(
            copied.iter().any(|c| file.starts_with(c)),
            "deploy/Dockerfile's demo build does not copy {} (copies {copied:?})",
            file.display()
        );
    }
}

#[test]
fn dockerfile_stage_parser_reads_continuations_and_bases() {
    let stages = dockerfile_stages(
        "FROM rust AS build\nRUN a \\\n # note\n && b\nFROM --platform=x debian\nFROM build as two\nUSER 1:1\n",
    );
    let summary: Vec<(Option<&str>, &str, usize)> = stages
        .iter()
        .map(|s| (s.name.as_deref(), s.base.as_str(), s.instructions.len()))
        .collect();
    assert_eq!(
        summary,
        [
            (Some("build"), "rust", 1),
            (None, "debian", 0),
            (Some("two"), "build", 1)
        ]
    );
    assert_eq!(stages[0].instructions[0].1, "a  && b");
    let (chain, bottom) = production_chain(&stages);
    assert_eq!((chain.len(), bottom.as_str()), (2, "rust"));
}

/// The container path `path` is mounted from, read-only, in `volumes`
/// (compose short syntax `SOURCE:TARGET:ro`); `None` when not mounted so.
fn compose_source<'a>(volumes: &'a [Value], path: &str) -> Option<&'a str> {
    volumes.iter().find_map(|v| {
        let spec = v.as_str()?;
        let (source, rest) = spec.split_once(':')?;
        (rest == format!("{path}:ro")).then_some(source)
    })
}

#[test]
fn grpc_speaks_tls_in_compose_and_kubernetes() {
    let compose = &load("deploy/compose.yaml")[0];
    // The certificates' script, which makes them where compose mounts them.
    let script = root().join("deploy/grpc/make-certs.sh");
    let mode = fs::metadata(&script)
        .expect("deploy/grpc/make-certs.sh")
        .permissions();
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0,
        "deploy/grpc/make-certs.sh is not executable"
    );
    let script_text = read("deploy/grpc/make-certs.sh");
    assert!(script_text.contains("$here/certs"), "default directory");
    let gitignore = read(".gitignore");
    assert!(
        gitignore.lines().any(|l| l.trim() == "deploy/grpc/certs/"),
        "the gRPC keys are not kept out of git"
    );
    let nodes: Vec<String> = (1..=3).map(|i| format!("entity-sync-{i}")).collect();
    for name in &nodes {
        // Every node name is in the certificate.
        assert!(
            script_text.contains(name.as_str()),
            "{name} not in the certificate"
        );
        let service = at(compose, &["services", name]);
        let env = at(service, &["environment"]);
        let volumes = items(service, &["volumes"]);
        for (var, file) in [
            ("ENTITY_SYNC_GRPC_TLS_CERT", "server.pem"),
            ("ENTITY_SYNC_GRPC_TLS_KEY", "server-key.pem"),
        ] {
            let path = text(env, &[var]);
            assert_eq!(
                compose_source(volumes, path),
                Some(format!("./grpc/certs/{file}").as_str()),
                "{name}: {var} {path} is not mounted read-only from deploy/grpc/certs"
            );
        }
        assert!(
            env.get("ENTITY_SYNC_GRPC_ALLOW_CLEARTEXT_TOKENS").is_none(),
            "{name}"
        );
        assert!(env.get("ENTITY_SYNC_GRPC_INSECURE").is_none(), "{name}");
        assert!(
            text(env, &["ENTITY_SYNC_GRPC_TOKENS_FILE"]).starts_with('/'),
            "{name}: tokens"
        );
    }
    // The demo backend: https to a node, trusting the CA compose mounts.
    let demo = at(compose, &["services", "demo"]);
    let command: Vec<&str> = items(demo, &["command"])
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let url = command[command.iter().position(|a| *a == "--node").unwrap() + 1];
    assert!(url.starts_with("https://"), "demo --node {url}");
    let ca = text(demo, &["environment", "DEMO_NODE_CA"]);
    assert_eq!(
        compose_source(items(demo, &["volumes"]), ca),
        Some("./grpc/certs/ca.pem"),
        "the demo's DEMO_NODE_CA {ca}"
    );
    assert!(
        read("examples/demo/src/main.rs").contains("env = \"DEMO_NODE_CA\""),
        "the demo reads DEMO_NODE_CA"
    );

    // Kubernetes: the cert and key from the Secret entity-sync-grpc-tls.
    let by_kind = k8s_manifests();
    let pod = at(one(&by_kind, "Deployment"), &["spec", "template", "spec"]);
    let container = &items(pod, &["containers"])[0];
    let env = items(container, &["env"]);
    let value = |name: &str| {
        env.iter()
            .find(|e| text(e, &["name"]) == name)
            .map(|e| text(e, &["value"]))
            .unwrap_or_else(|| panic!("Deployment: no {name}"))
    };
    for (var, key) in [
        ("ENTITY_SYNC_GRPC_TLS_CERT", "tls.crt"),
        ("ENTITY_SYNC_GRPC_TLS_KEY", "tls.key"),
    ] {
        let path = Path::new(value(var));
        assert_eq!(path.file_name().unwrap(), key, "{var}");
        let mount = items(container, &["volumeMounts"])
            .iter()
            .find(|m| path.parent() == Some(Path::new(text(m, &["mountPath"]))))
            .unwrap_or_else(|| panic!("Deployment: {var} is in no mount"));
        assert_eq!(at(mount, &["readOnly"]), &json!(true), "{var}");
        let volume = items(pod, &["volumes"])
            .iter()
            .find(|v| text(v, &["name"]) == text(mount, &["name"]))
            .expect("the gRPC TLS volume");
        assert_eq!(
            text(volume, &["secret", "secretName"]),
            "entity-sync-grpc-tls"
        );
    }
    assert!(
        env.iter().all(|e| !text(e, &["name"]).contains("CLEARTEXT")
            && text(e, &["name"]) != "ENTITY_SYNC_GRPC_INSECURE"),
        "Deployment: gRPC in clear"
    );
}

#[test]
fn websocket_origins_are_restricted_in_compose_and_kubernetes() {
    let check = |origins: &str, place: &str| {
        assert!(!origins.trim().is_empty(), "{place}: no origins");
        for origin in origins.split(',') {
            let (scheme, host) = origin
                .split_once("://")
                .unwrap_or_else(|| panic!("{place}: {origin:?} is not an origin"));
            assert!(matches!(scheme, "http" | "https"), "{place}: {origin:?}");
            assert!(
                !host.is_empty() && !host.contains(['/', '*', ' ']),
                "{place}: {origin:?} is not one origin"
            );
        }
    };
    let compose = &load("deploy/compose.yaml")[0];
    for i in 1..=3 {
        let name = format!("entity-sync-{i}");
        check(
            text(
                compose,
                &[
                    "services",
                    &name,
                    "environment",
                    "ENTITY_SYNC_ALLOWED_ORIGINS",
                ],
            ),
            &name,
        );
    }
    let by_kind = k8s_manifests();
    let pod = at(one(&by_kind, "Deployment"), &["spec", "template", "spec"]);
    let env = items(&items(pod, &["containers"])[0], &["env"]);
    let origins = env
        .iter()
        .find(|e| text(e, &["name"]) == "ENTITY_SYNC_ALLOWED_ORIGINS")
        .map(|e| text(e, &["value"]))
        .expect("Deployment: ENTITY_SYNC_ALLOWED_ORIGINS");
    check(origins, "Deployment");
}

#[test]
fn the_nodes_nats_user_may_use_only_its_own_streams_api() {
    let (publish, subscribe) = nats_conf_permissions();
    for subject in publish.iter().chain(&subscribe) {
        if let Some(api) = subject.strip_prefix("$JS.") {
            // Only the `es_changes` stream's, never a wildcard over streams.
            assert!(
                api.contains(".es_changes"),
                "{subject} reaches beyond the node's stream"
            );
            let before_stream = &api[..api.find(".es_changes").unwrap()];
            assert!(
                !before_stream.contains(['*', '>']),
                "{subject} has a wildcard before the stream name"
            );
        }
    }
    for needed in [
        "$JS.API.STREAM.INFO.es_changes",
        "$JS.API.STREAM.CREATE.es_changes",
        "$JS.API.CONSUMER.CREATE.es_changes",
    ] {
        assert!(publish.iter().any(|s| s == needed), "{needed} missing");
    }
    for refused in [
        "DELETE.es_changes",
        "PURGE",
        "STREAM.UPDATE",
        "STREAM.NAMES",
    ] {
        assert!(
            !publish
                .iter()
                .any(|s| s.contains(refused) && s.contains("STREAM")),
            "{refused} allowed"
        );
    }
}
