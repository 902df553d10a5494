//! The docs stay true to the code: every flag the binary takes, every error
//! code a client can get, every metric a node exports and every module of the
//! node is documented, and every relative link in the Markdown pages leads to
//! a file (and heading) that exists; the README shows the Rust quickstart as
//! it is compiled. Each test names what is missing.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use entity_sync::websocket::protocol::ErrorCode;
use entity_sync_testkit::TestNode;

const BIN: &str = env!("CARGO_BIN_EXE_entity-sync");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn doc(name: &str) -> String {
    read(&root().join("docs").join(name))
}

/// Whether `token` occurs in `text` as a whole word: not inside a longer flag
/// or name (`--tls-ca` is not found in `--nats-tls-ca`, nor `x_total` in
/// `x_total_seconds`).
fn has_token(text: &str, token: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices(token).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + token.len()..].chars().next();
        !before.is_some_and(part) && !after.is_some_and(part)
    })
}

/// The long flags `entity-sync ARGS --help` lists: the first `--name` of each
/// option line (`  -h, --help`, `      --ws-addr <WS_ADDR>`).
fn help_flags(args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(BIN)
        .args(args)
        .arg("--help")
        .output()
        .expect("run entity-sync --help");
    assert!(out.status.success(), "{args:?} --help failed: {out:?}");
    let help = String::from_utf8(out.stdout).expect("UTF-8 help");
    let flags: BTreeSet<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .filter_map(|line| {
            line.split([' ', ','])
                .take_while(|word| word.starts_with('-') || word.is_empty())
                .find(|word| word.starts_with("--"))
                .map(|flag| flag.split('=').next().unwrap_or(flag).to_string())
        })
        .collect();
    assert!(
        flags.len() > 2,
        "no flags found in {args:?} --help:\n{help}"
    );
    flags
}

#[test]
fn every_flag_is_in_configuration_md() {
    let page = doc("configuration.md");
    let mut missing = Vec::new();
    for args in [&[][..], &["notify"][..]] {
        for flag in help_flags(args) {
            if !has_token(&page, &flag) {
                let command = ["entity-sync"].iter().chain(args).copied();
                missing.push(format!("{} {flag}", command.collect::<Vec<_>>().join(" ")));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not mention these flags of --help: {missing:?}"
    );
}

#[test]
fn every_error_code_is_in_protocol_md() {
    let page = doc("protocol.md");
    let missing: Vec<&str> = ErrorCode::ALL
        .iter()
        .map(|code| code.as_str())
        .filter(|code| !page.contains(&format!("`{code}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/protocol.md does not list these error codes: {missing:?}"
    );
}

#[tokio::test]
async fn every_metric_is_in_operations_md() {
    let node = TestNode::start_default().await;
    let (status, text) = node.http_get("/metrics").await;
    assert_eq!(status, 200, "/metrics answered {status}");
    // `# TYPE NAME KIND`; a counter's samples (and the docs) add `_total`.
    let families: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            Some((words.next()?, words.next()?))
        })
        .collect();
    assert!(
        families.len() > 10,
        "too few metric families in /metrics:\n{text}"
    );
    let page = doc("operations.md");
    let missing: Vec<String> = families
        .iter()
        .filter(|(name, kind)| {
            let total = format!("{name}_total");
            let named = has_token(&page, &format!("`{name}`"))
                || (*kind == "counter" && has_token(&page, &format!("`{total}`")));
            !named
        })
        .map(|(name, kind)| format!("{name} ({kind})"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not list these metrics of /metrics: {missing:?}"
    );
}

#[test]
fn every_module_is_in_the_code_map() {
    let lib = read(&root().join("src/lib.rs"));
    let page = doc("architecture.md");
    let modules: Vec<&str> = lib
        .lines()
        // Top-level modules only: nested ones (`proto::v1`) are indented.
        .filter_map(|line| {
            let rest = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("pub(crate) mod "))?;
            Some(rest.trim_end_matches([';', '{', ' ']))
        })
        .collect();
    assert!(modules.len() > 10, "no modules found in src/lib.rs");
    let missing: Vec<&&str> = modules
        .iter()
        .filter(|module| !page.contains(&format!("- `{module}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md's code map does not name these modules of src/lib.rs: {missing:?}"
    );
}

#[test]
fn the_readme_shows_the_rust_quickstart_as_it_is() {
    let code = read(&root().join("backend/examples/quickstart.rs"));
    let body = &code[code.find("use ").expect("a use line")..];
    let readme = read(&root().join("README.md"));
    assert!(
        readme.contains(&format!("```rust\n{body}```")),
        "README.md does not show backend/examples/quickstart.rs (from its first `use`) as it is"
    );
}

#[test]
fn the_readme_shows_the_node_quickstart_as_it_is() {
    let code = read(&root().join("clients/node-backend/examples/quickstart.ts"));
    let body = &code[code.find("import ").expect("an import line")..];
    let readme = read(&root().join("README.md"));
    assert!(
        readme.contains(&format!("```ts\n{body}```")),
        "README.md does not show clients/node-backend/examples/quickstart.ts (from its first `import`) as it is"
    );
}

/// The Markdown files whose links must resolve.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md"), root().join("deploy/README.md")];
    for dir in ["docs", "clients"] {
        for entry in std::fs::read_dir(root().join(dir)).expect(dir) {
            let path = entry.expect("dir entry").path();
            if dir == "docs" && path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            } else if dir == "clients" && path.join("README.md").is_file() {
                files.push(path.join("README.md"));
            }
        }
    }
    files.sort();
    files
}

/// Markdown text outside fenced code blocks.
fn prose(text: &str) -> impl Iterator<Item = &str> {
    let mut fenced = false;
    text.lines().filter(move |line| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// Targets of inline links, `[text](target)`, outside code. A link's text may
/// span lines; a target that does (or holds a space) is returned as it is, and
/// resolves to no file.
fn link_targets(text: &str) -> Vec<String> {
    let prose: Vec<&str> = prose(text).collect();
    let prose = prose.join("\n");
    // Inline code may hold `](` that is no link.
    let prose: String = prose
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, part)| part)
        .collect::<Vec<_>>()
        .join("``");
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let end = rest.find(')').unwrap_or(rest.len());
        targets.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    targets
}

/// The anchors GitHub gives a page's headings: lowercased, punctuation but `-`
/// and `_` dropped, spaces as `-`; a repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while !seen.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
    }
    seen
}

#[test]
fn every_relative_link_resolves() {
    let files = markdown_files();
    assert!(
        files.iter().any(|f| f.ends_with("docs/architecture.md")),
        "docs/architecture.md is missing: {files:?}"
    );
    let mut broken = Vec::new();
    for file in &files {
        let text = read(file);
        let shown = file.strip_prefix(root()).unwrap_or(file).display();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a file's dir").join(path)
            };
            if !resolved.exists() {
                broken.push(format!("{shown}: {target} (no such file)"));
                continue;
            }
            if let Some(anchor) = anchor
                && resolved.extension().is_some_and(|e| e == "md")
                && !anchors(&read(&resolved)).contains(anchor)
            {
                broken.push(format!("{shown}: {target} (no such heading)"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}

#[test]
fn anchors_follow_github() {
    let page = "# Top\n## Why `sync_interval: always`\n```\n# not a heading\n```\n## Idle memory (2026-12-03)\n## Top\n";
    let found = anchors(page);
    let expected: BTreeSet<String> = [
        "top",
        "why-sync_interval-always",
        "idle-memory-2026-12-03",
        "top-1",
    ]
    .map(String::from)
    .into();
    assert_eq!(found, expected);
    assert_eq!(
        link_targets("[a](x.md#b) `[c](d)` [e\nf](g)\n```\n[h](i)\n```\n[j](k-\nl)"),
        ["x.md#b", "g", "k-\nl"]
    );
}
