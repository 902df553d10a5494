//! Offline checks of `deploy/`: the compose file, the NATS config, the Helm
//! values and the Kubernetes manifests have the structure the running system
//! relies on (probes, ports, routes, replicas, `sync_interval: always`,
//! configuration variables the node actually reads).
//!
//! No YAML crate is a dependency, so the files are read with a small parser
//! for the YAML subset they use (block mappings and sequences, plain and
//! quoted scalars, flow sequences, anchors, aliases and `<<` merge keys);
//! anything outside that subset fails loudly. When python3 with PyYAML is
//! installed, every file is also parsed by PyYAML and must give the same
//! value, which checks both the files' validity and this parser.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{Map, Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

// ---------------------------------------------------------------------------
// YAML subset
// ---------------------------------------------------------------------------

struct Line {
    indent: usize,
    text: String,
    number: usize,
}

/// Parses every document of `text` (documents separated by `---`).
fn parse_yaml(text: &str) -> Vec<Value> {
    let mut documents = Vec::new();
    let mut current = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        assert!(!raw.contains('\t'), "line {}: tab in YAML", index + 1);
        if raw.trim_end() == "---" {
            documents.push(std::mem::take(&mut current));
            continue;
        }
        let content = strip_comment(raw);
        if content.trim().is_empty() {
            continue;
        }
        let indent = content.len() - content.trim_start().len();
        current.push(Line {
            indent,
            text: content.trim().to_owned(),
            number: index + 1,
        });
    }
    documents.push(current);
    documents
        .into_iter()
        .filter(|lines| !lines.is_empty())
        .map(|mut lines| {
            let mut parser = Parser {
                anchors: HashMap::new(),
            };
            let mut i = 0;
            let indent = lines[0].indent;
            let value = parser.block(&mut lines, &mut i, indent);
            assert_eq!(
                i,
                lines.len(),
                "line {}: unexpected indentation",
                lines[i.min(lines.len() - 1)].number
            );
            value
        })
        .collect()
}

/// The line without its comment (a `#` at the start or after a space,
/// outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && previous == ' ' => return line[..i].trim_end(),
            None => {}
        }
        previous = c;
    }
    line.trim_end()
}

struct Parser {
    anchors: HashMap<String, Value>,
}

impl Parser {
    fn block(&mut self, lines: &mut [Line], i: &mut usize, indent: usize) -> Value {
        if is_item(&lines[*i].text) {
            self.sequence(lines, i, indent)
        } else {
            self.mapping(lines, i, indent)
        }
    }

    fn sequence(&mut self, lines: &mut [Line], i: &mut usize, indent: usize) -> Value {
        let mut items = Vec::new();
        while *i < lines.len() && lines[*i].indent == indent && is_item(&lines[*i].text) {
            let rest = lines[*i].text[1..].trim_start().to_owned();
            if rest.is_empty() {
                *i += 1;
                let child = lines[*i].indent;
                assert!(
                    child > indent,
                    "line {}: empty sequence item",
                    lines[*i].number
                );
                items.push(self.block(lines, i, child));
            } else if split_key(&rest).is_some() && !rest.starts_with(['"', '\'', '[', '{']) {
                // "- key: value": a mapping whose first line is the item's rest.
                let child = indent + (lines[*i].text.len() - rest.len());
                lines[*i].indent = child;
                lines[*i].text = rest;
                items.push(self.mapping(lines, i, child));
            } else {
                let number = lines[*i].number;
                items.push(self.inline(&rest, number));
                *i += 1;
            }
        }
        Value::Array(items)
    }

    fn mapping(&mut self, lines: &mut [Line], i: &mut usize, indent: usize) -> Value {
        let mut map = Map::new();
        let mut merged = Vec::new();
        while *i < lines.len() && lines[*i].indent == indent && !is_item(&lines[*i].text) {
            let number = lines[*i].number;
            let (key, rest) = split_key(&lines[*i].text)
                .unwrap_or_else(|| panic!("line {number}: expected `key: value`"));
            let key = match key.strip_prefix(['"', '\'']) {
                Some(quoted) => quoted[..quoted.len() - 1].to_owned(),
                None => key,
            };
            *i += 1;
            let (anchor, rest) = match rest.strip_prefix('&') {
                Some(anchored) => {
                    let (name, rest) = anchored.split_once(' ').unwrap_or((anchored, ""));
                    (Some(name.to_owned()), rest.trim().to_owned())
                }
                None => (None, rest),
            };
            let value = if !rest.is_empty() {
                self.inline(&rest, number)
            } else if *i < lines.len() && lines[*i].indent > indent {
                let child = lines[*i].indent;
                self.block(lines, i, child)
            } else if *i < lines.len() && lines[*i].indent == indent && is_item(&lines[*i].text) {
                // A sequence may sit at its key's indentation.
                self.sequence(lines, i, indent)
            } else {
                Value::Null
            };
            if let Some(anchor) = anchor {
                self.anchors.insert(anchor, value.clone());
            }
            if key == "<<" {
                merged.push(value);
            } else {
                assert!(
                    !map.contains_key(&key),
                    "line {number}: duplicate key {key:?}"
                );
                map.insert(key, value);
            }
        }
        // Merge keys: explicit keys win over merged ones.
        for value in merged {
            let Value::Object(entries) = value else {
                panic!("`<<` must merge a mapping")
            };
            for (key, value) in entries {
                map.entry(key).or_insert(value);
            }
        }
        Value::Object(map)
    }

    /// A value on the same line as its key or dash.
    fn inline(&self, text: &str, number: usize) -> Value {
        if let Some(alias) = text.strip_prefix('*') {
            return self
                .anchors
                .get(alias)
                .unwrap_or_else(|| panic!("line {number}: unknown alias {alias}"))
                .clone();
        }
        if let Some(inner) = text.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .unwrap_or_else(|| panic!("line {number}: multi-line flow sequence"));
            if inner.trim().is_empty() {
                return json!([]);
            }
            return Value::Array(
                inner
                    .split(',')
                    .map(|item| scalar(item.trim(), number))
                    .collect(),
            );
        }
        if text == "{}" {
            return json!({});
        }
        assert!(
            !text.starts_with(['{', '|', '>', '!', '&']),
            "line {number}: unsupported YAML construct {text:?}"
        );
        scalar(text, number)
    }
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// `key: rest` (rest possibly empty), if the line is a mapping entry.
fn split_key(text: &str) -> Option<(String, String)> {
    let mut quote = None;
    for (i, c) in text.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == ':' && (i + 1 == text.len() || text[i + 1..].starts_with(' ')) => {
                return Some((text[..i].to_owned(), text[i + 1..].trim().to_owned()));
            }
            None if c == '[' || c == '{' => return None,
            None => {}
        }
    }
    None
}

fn scalar(text: &str, number: usize) -> Value {
    if let Some(inner) = text.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .unwrap_or_else(|| panic!("line {number}: unterminated string"));
        assert!(
            !inner.contains('\\'),
            "line {number}: escapes are not supported"
        );
        return Value::String(inner.to_owned());
    }
    if let Some(inner) = text.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .unwrap_or_else(|| panic!("line {number}: unterminated string"));
        return Value::String(inner.replace("''", "'"));
    }
    match text {
        "true" => return json!(true),
        "false" => return json!(false),
        "null" | "~" => return Value::Null,
        _ => {}
    }
    if let Ok(n) = text.parse::<i64>() {
        return json!(n);
    }
    // YAML 1.1 readers take "8080:80" as a base-60 number: such values must be quoted.
    assert!(
        !text
            .split(':')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())),
        "line {number}: quote {text:?} (YAML 1.1 reads it as a number)"
    );
    Value::String(text.to_owned())
}

/// The documents as PyYAML reads them, or `None` (with the reason printed)
/// when python3 or PyYAML is not installed.
fn pyyaml(path: &Path) -> Option<Vec<Value>> {
    let script = "import json, sys, yaml\n\
                  print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let output = match Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
    {
        Ok(output) => output,
        Err(err) => {
            eprintln!("PyYAML cross-check skipped: cannot run python3 ({err})");
            return None;
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("No module named 'yaml'") {
            eprintln!("PyYAML cross-check skipped: python3 has no yaml module");
            return None;
        }
        panic!("PyYAML cannot read {}:\n{stderr}", path.display());
    }
    Some(serde_json::from_slice(&output.stdout).expect("PyYAML output is JSON"))
}

/// Parses `path` (relative to the crate), cross-checked with PyYAML.
fn load(path: &str) -> Vec<Value> {
    let ours = parse_yaml(&read(path));
    if let Some(theirs) = pyyaml(&root().join(path)) {
        assert_eq!(ours, theirs, "{path}: this parser and PyYAML disagree");
    }
    ours
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
    for file in ["src/config.rs", "src/main.rs"] {
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
                .and_then(|rest| rest.strip_suffix(":4222"))
                .unwrap_or_else(|| panic!("{place}: bad NATS URL {url:?}"))
        })
        .collect();
    assert_eq!(hosts, expected_hosts, "{place}: ENTITY_SYNC_NATS_URL");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn yaml_subset_parser_reads_what_the_files_use() {
    let docs = parse_yaml(
        "a: &base\n  x: 1\n  y: \"two\"\nb:\n  <<: *base\n  y: 3\nlist:\n- k: v\n  n: [\"p\", 'q']\n- plain # comment\n---\nkind: X\n",
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
        let ports: Vec<&str> = items(service, &["ports"])
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            ports.iter().any(|p| p.ends_with(":8080")),
            "{name}: websocket port: {ports:?}"
        );
        assert!(
            ports.iter().any(|p| p.ends_with(":50051")),
            "{name}: gRPC port: {ports:?}"
        );
        for port in ports {
            assert!(
                host_ports.insert(port.split(':').next().unwrap().to_owned()),
                "host port reused: {port}"
            );
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
        .strip_prefix("http://")
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

#[test]
fn kubernetes_manifests_have_probes_ports_and_a_disruption_budget() {
    let dir = root().join("deploy/k8s");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut by_kind: HashMap<String, Value> = HashMap::new();
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
            assert!(
                !text(&doc, &["metadata", "name"]).is_empty(),
                "{relative}: metadata.name"
            );
            assert!(
                by_kind.insert(kind.clone(), doc).is_none(),
                "two {kind} manifests"
            );
        }
    }
    let known = known_env_vars();

    // Deployment.
    let deployment = by_kind.get("Deployment").expect("a Deployment");
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
    let service = by_kind.get("Service").expect("a Service");
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
    let pdb = by_kind
        .get("PodDisruptionBudget")
        .expect("a PodDisruptionBudget");
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
    ] {
        assert!(
            readme.contains(needle),
            "deploy/README.md does not mention {needle:?}"
        );
    }
}
