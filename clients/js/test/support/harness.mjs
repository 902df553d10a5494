// Real processes for the client's tests: the node binary, the testkit's
// resolver (a backend on entity-sync-backend, driven over stdin), the demo.
// Everything listens on 127.0.0.1: each program binds port 0 and reports the
// port it got (the node in its `listening` log line, the demo in the page
// address it prints), so no port is picked here and taken by another process
// meanwhile. Readiness is polled (never a fixed sleep) and every wait has a
// deadline.

import { spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, readFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

export const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const repoRoot = resolve(packageRoot, '..', '..');
/** Logs, screenshots and measurements of a run (gitignored). */
export const outputDir = join(packageRoot, 'test-output');

/** How long any single wait may take before the test fails. */
export const DEADLINE_MS = 10_000;

/** A binary of the workspace: `$ENV` if set, else `target/debug/NAME`. */
export function binary(name, envVar) {
  const path = process.env[envVar] ?? join(repoRoot, 'target', 'debug', name);
  if (!existsSync(path)) {
    throw new Error(`${path} not found: run \`cargo build -p ${name}\` (or set ${envVar})`);
  }
  return path;
}

export const nodeBinary = () => binary('entity-sync', 'ENTITY_SYNC_BIN');
export const testkitBinary = () => binary('entity-sync-testkit', 'ENTITY_SYNC_TESTKIT_BIN');
export const demoBinary = () => binary('entity-sync-demo', 'ENTITY_SYNC_DEMO_BIN');

/** Resolves once `predicate()` is truthy (polled); fails after `ms` with `what`. */
export async function until(predicate, what, ms = DEADLINE_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((done) => setTimeout(done, 10));
  }
}

/** GET over http or https (trusting `ca` when given): `{status, body}`, or null if nothing answers. */
export function httpGet(url, { ca } = {}) {
  return new Promise((done) => {
    const request = (url.startsWith('https:') ? httpsRequest : httpRequest)(
      url,
      { ca, timeout: 2000 },
      (response) => {
        let body = '';
        response.setEncoding('utf8');
        response.on('data', (chunk) => {
          body += chunk;
        });
        response.on('end', () => done({ status: response.statusCode, body }));
      },
    );
    request.on('error', () => done(null));
    request.on('timeout', () => request.destroy());
    request.end();
  });
}

/** The value of a Prometheus counter without labels in `/metrics` text. */
export function metric(text, name) {
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  if (!line) throw new Error(`metric ${name} not found`);
  return Number(line.slice(name.length + 1));
}

function logStream(name) {
  mkdirSync(join(outputDir, 'logs'), { recursive: true });
  return createWriteStream(join(outputDir, 'logs', `${name}.log`), { flags: 'a' });
}

/** A child process whose output goes to test-output/logs/NAME.log. */
class Child {
  constructor(name, file, args, { env = {}, stdin = 'ignore' } = {}) {
    this.name = name;
    const log = logStream(name);
    log.write(`--- ${new Date().toISOString()} ${file} ${args.join(' ')}\n`);
    this.process = spawn(file, args, {
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info', ...env },
      stdio: [stdin, 'pipe', 'pipe'],
    });
    // With stdin piped, stdout is the program's answers: the caller reads it.
    if (stdin !== 'pipe') this.process.stdout.pipe(log, { end: false });
    this.process.stderr.pipe(log, { end: false });
    this.exited = new Promise((done) =>
      this.process.once('exit', (code, signal) => done({ code, signal })),
    );
    this.alive = true;
    this.exited.then(() => {
      this.alive = false;
    });
    // Every output line goes by `#watchers`, for `firstLine`.
    this.watchers = [];
    const streams =
      stdin === 'pipe' ? [this.process.stderr] : [this.process.stdout, this.process.stderr];
    for (const stream of streams) {
      createInterface({ input: stream }).on('line', (line) => {
        this.watchers = this.watchers.filter((watch) => !watch(line));
      });
    }
  }

  /**
   * The first value `parse(line)` gives for a line printed from now on;
   * fails if the process exits first or after `DEADLINE_MS`.
   */
  firstLine(parse, what) {
    return new Promise((done, fail) => {
      const timer = setTimeout(() => fail(new Error(`timed out waiting for ${what}`)), DEADLINE_MS);
      this.exited.then(() => {
        clearTimeout(timer);
        fail(
          new Error(`${this.name} exited before ${what}; see test-output/logs/${this.name}.log`),
        );
      });
      this.watchers.push((line) => {
        const value = parse(line);
        if (value === undefined) return false;
        clearTimeout(timer);
        done(value);
        return true;
      });
    });
  }

  /** Signals the process and waits until it is gone (SIGKILL after 5 s). */
  async stop(signal = 'SIGTERM') {
    if (!this.alive) return;
    this.process.kill(signal);
    const timer = setTimeout(() => this.process.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(timer);
  }
}

/** The log target of the node's `listening` line (the addresses it bound). */
const LISTENING_TARGET = 'entity_sync::node::listening';

/** The port in field `key` of a node log line, text (`key=ADDR`) or JSON. */
function logPort(line, key) {
  const match = line.match(new RegExp(`(?:\\s|")${key}(?:=|":")[^\\s"]*:(\\d+)`));
  return match ? Number(match[1]) : undefined;
}

/**
 * The node binary (embedded bus). The first `start()` binds port 0 for both
 * listeners and learns the ports from the node's `listening` log line; it
 * returns once `/readyz` answers 200. `kill()` is SIGKILL (nothing flushed
 * or closed politely); a node started again binds the same ports: the
 * "restart".
 */
export class NodeProcess {
  constructor({ args = [], tls = null, name = 'node' } = {}) {
    this.wsPort = 0;
    this.grpcPort = 0;
    this.args = args;
    this.tls = tls;
    this.name = name;
    this.child = null;
  }

  get grpcUrl() {
    return `http://127.0.0.1:${this.grpcPort}`;
  }

  get httpUrl() {
    return `${this.tls ? 'https' : 'http'}://127.0.0.1:${this.wsPort}`;
  }

  async start() {
    const args = [
      '--ws-addr',
      `127.0.0.1:${this.wsPort}`,
      '--grpc-addr',
      `127.0.0.1:${this.grpcPort}`,
      '--resolve-timeout',
      '2s',
      ...this.args,
    ];
    if (this.tls) args.push('--ws-tls-cert', this.tls.cert, '--ws-tls-key', this.tls.key);
    const rustLog = `${process.env.RUST_LOG ?? 'info'},${LISTENING_TARGET}=info`;
    const child = new Child(this.name, nodeBinary(), args, { env: { RUST_LOG: rustLog } });
    this.child = child;
    const ports = await child.firstLine((line) => {
      if (!line.includes(LISTENING_TARGET)) return undefined;
      const ws = logPort(line, 'ws_addr');
      const grpc = logPort(line, 'grpc_addr');
      return ws && grpc ? { ws, grpc } : undefined;
    }, `${this.name}'s listening line`);
    this.wsPort = ports.ws;
    this.grpcPort = ports.grpc;
    await until(async () => {
      if (!child.alive)
        throw new Error(`${this.name} exited; see test-output/logs/${this.name}.log`);
      const answer = await httpGet(`${this.httpUrl}/readyz`, { ca: this.tls?.caPem });
      return answer?.status === 200;
    }, `${this.name} /readyz`);
    return this;
  }

  async metrics() {
    const answer = await httpGet(`${this.httpUrl}/metrics`, { ca: this.tls?.caPem });
    if (answer?.status !== 200) throw new Error(`/metrics: ${answer?.status}`);
    return answer.body;
  }

  async kill() {
    await this.child?.stop('SIGKILL');
  }

  async stop() {
    await this.child?.stop('SIGTERM');
  }
}

/**
 * The testkit's resolver (`entity-sync-testkit resolver`): a backend built on
 * entity-sync-backend that serves the rows the test sets and notifies.
 * Every command answers one line, in order.
 */
export class Resolver {
  static async start(grpcUrl, { entities, passThrough = false, name = 'resolver' }) {
    const args = ['resolver', '--node', grpcUrl, '--name', name];
    for (const [entity, mode] of Object.entries(entities))
      args.push('--entity', `${entity}=${mode}`);
    if (passThrough) args.push('--pass-through');
    const resolver = new Resolver(new Child(name, testkitBinary(), args, { stdin: 'pipe' }));
    const ready = await resolver.#next();
    if (!ready.ready) throw new Error(`resolver did not start: ${JSON.stringify(ready)}`);
    resolver.nodeId = ready.node_id;
    return resolver;
  }

  constructor(child) {
    this.child = child;
    this.lines = [];
    this.waiting = [];
    createInterface({ input: child.process.stdout }).on('line', (line) => {
      const value = JSON.parse(line);
      const waiter = this.waiting.shift();
      if (waiter) waiter(value);
      else this.lines.push(value);
    });
    child.exited.then(({ code }) => {
      for (const waiter of this.waiting.splice(0))
        waiter({ ok: false, error: `resolver exited (${code})` });
    });
  }

  #next() {
    if (this.lines.length > 0) return Promise.resolve(this.lines.shift());
    if (!this.child.alive) return Promise.resolve({ ok: false, error: 'resolver exited' });
    return new Promise((done, fail) => {
      const timer = setTimeout(
        () => fail(new Error('the resolver did not answer in time')),
        DEADLINE_MS + 5000,
      );
      this.waiting.push((value) => {
        clearTimeout(timer);
        done(value);
      });
    });
  }

  async command(command) {
    this.child.process.stdin.write(`${JSON.stringify(command)}\n`);
    const answer = await this.#next();
    if (!answer.ok) throw new Error(`resolver ${command.op}: ${answer.error}`);
    return answer;
  }

  /** What the resolver answers for `entity/id`: `rows` (JSON values) and optional `version`, `status`, `message`, `forbidden_secrets`. */
  set(entity, id, entry) {
    return this.command({ op: 'set', entity, id: String(id), ...entry });
  }

  /** `Notify(keys)`; the keys' bus sequences. */
  async notify(...keys) {
    return (
      await this.command({ op: 'notify', keys: keys.map(([entity, id]) => [entity, String(id)]) })
    ).sequences;
  }

  async requests() {
    return (await this.command({ op: 'requests' })).requests;
  }

  /** Requests of `reason` that include `entity/id`. */
  async requestsFor(reason, entity, id) {
    return (await this.requests()).filter(
      (r) => r.reason === reason && r.entity === entity && r.ids.includes(String(id)),
    );
  }

  async passThroughs() {
    return (await this.command({ op: 'pass_throughs' })).pass_throughs;
  }

  /** Waits until registered on a node other than `except` (a restarted node). */
  async waitRegistered(except) {
    const { node_id: nodeId } = await this.command({
      op: 'wait_registered',
      except,
      timeout_ms: DEADLINE_MS,
    });
    this.nodeId = nodeId;
    return nodeId;
  }

  async stop() {
    this.child.process.stdin.end();
    const timer = setTimeout(() => this.child.process.kill('SIGKILL'), 5000);
    await this.child.exited;
    clearTimeout(timer);
  }
}

/** A fresh CA and a server certificate for 127.0.0.1, from the testkit. */
export async function makeCerts(dir) {
  mkdirSync(dir, { recursive: true });
  const child = new Child('certs', testkitBinary(), ['certs', dir]);
  const { code } = await child.exited;
  if (code !== 0) throw new Error(`entity-sync-testkit certs exited ${code}`);
  return {
    ca: join(dir, 'ca.pem'),
    cert: join(dir, 'server.pem'),
    key: join(dir, 'server.key'),
    caPem: readFileSync(join(dir, 'ca.pem'), 'utf8'),
  };
}

/** A child process of the harness, for other programs (the demo). */
export function spawnChild(name, file, args, options) {
  return new Child(name, file, args, options);
}

/**
 * Records what one client sees: deliveries per key, errors and states, how
 * many sockets it opened, and every frame its sockets received and sent (a
 * tap on the real WebSocket, which the client still drives).
 */
export function recorder() {
  const seen = { rows: [], errors: [], states: [], frames: [], sent: [], sockets: 0 };
  class TappedWebSocket extends globalThis.WebSocket {
    constructor(url) {
      super(url);
      seen.sockets += 1;
      this.addEventListener('message', (event) => seen.frames.push(JSON.parse(String(event.data))));
    }

    send(text) {
      seen.sent.push(JSON.parse(text));
      super.send(text);
    }
  }
  return {
    seen,
    options: {
      WebSocket: TappedWebSocket,
      onError: (error) => seen.errors.push(error),
      onState: (state, info) => seen.states.push([state, info]),
    },
    listener: (rows, meta) =>
      seen.rows.push({
        key: `${meta.entity}/${meta.id}`,
        rows,
        version: meta.version,
        snapshot: meta.snapshot,
      }),
    of: (key) => seen.rows.filter((r) => r.key === key),
  };
}
