// Subscribe tokens and the heartbeat in headless Chromium: a page of the
// test's own (served here, with the package's committed build and a /token
// endpoint that signs HS256 tokens) against the real node binary started
// with --subscribe-token-jwks and the testkit's resolver.
//
// Needs /usr/bin/chromium (CHROMIUM_BIN overrides) and the debug binaries.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';

import { chromium } from 'playwright-core';

import { launchChromium } from '../test/support/browser.mjs';
import {
  DEADLINE_MS,
  NodeProcess,
  Resolver,
  outputDir,
  packageRoot,
  until,
} from '../test/support/harness.mjs';
import { StallProxy } from '../test/support/stall-proxy.mjs';
import { tokenKey } from '../test/support/tokens.mjs';

/** Polled, not on animation frames (which a headless page may not run). */
const POLL = { polling: 50 };

// The page: one client, one key, everything it sees logged in window.__log.
const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>entity-sync tokens</title>
<script type="module">
import { EntitySyncClient } from '/entity-sync.js';
const params = new URLSearchParams(location.search);
const log = { rows: [], errors: [], states: [], resumed: [], tokenCalls: 0 };
window.__log = log;
const client = new EntitySyncClient(params.get('ws'), {
  minDelayMs: 100,
  maxDelayMs: 400,
  heartbeatIntervalMs: Number(params.get('interval') ?? 15000),
  heartbeatTimeoutMs: Number(params.get('timeout') ?? 5000),
  getToken: async (entity, id) => {
    log.tokenCalls += 1;
    const answer = await fetch('/token?' + new URLSearchParams({ entity, id, seconds: params.get('seconds') ?? '60' }));
    if (!answer.ok) throw new Error('token endpoint: ' + answer.status);
    return answer.text();
  },
  onError: (error) => log.errors.push(error.toJSON()),
  onState: (state, info) => log.states.push({ state, info, at: Date.now() }),
});
client.subscribe('items', params.get('id'), (rows, meta) => log.rows.push({ rows, ...meta }), {
  onResumed: (meta) => log.resumed.push(meta),
});
</script>
`;

let key;
let node;
let resolver;
let server;
let pageBase;
let browser;
const tokenRequests = [];

before(async () => {
  mkdirSync(join(outputDir, 'screenshots'), { recursive: true });
  key = tokenKey();
  node = await new NodeProcess({
    name: 'e2e-node-tokens',
    args: ['--subscribe-token-jwks', key.jwksPath],
  }).start();
  resolver = await Resolver.start(node.grpcUrl, {
    entities: { items: 'shared' },
    name: 'e2e-resolver-tokens',
  });
  const build = readFileSync(join(packageRoot, 'dist', 'entity-sync.js'), 'utf8');
  server = createServer((request, response) => {
    const url = new URL(request.url, 'http://page.test');
    if (url.pathname === '/entity-sync.js') {
      response.writeHead(200, { 'content-type': 'text/javascript' });
      response.end(build);
    } else if (url.pathname === '/token') {
      const entity = url.searchParams.get('entity');
      const id = url.searchParams.get('id');
      const seconds = Number(url.searchParams.get('seconds'));
      tokenRequests.push({ entity, id, seconds, at: Date.now() });
      response.writeHead(200, { 'content-type': 'text/plain' });
      response.end(key.mint({ entity, ids: [id], seconds }));
    } else if (url.pathname === '/') {
      response.writeHead(200, { 'content-type': 'text/html' });
      response.end(PAGE);
    } else {
      response.writeHead(404);
      response.end();
    }
  });
  await new Promise((done) => server.listen(0, '127.0.0.1', done));
  pageBase = `http://127.0.0.1:${server.address().port}/`;
  browser = await launchChromium(chromium);
});

after(async () => {
  await browser?.close();
  await new Promise((done) => (server ? server.close(done) : done()));
  await resolver?.stop();
  await node?.stop();
  if (key) rmSync(key.dir, { recursive: true, force: true });
});

async function openPage(params, { observe = false } = {}) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(DEADLINE_MS);
  const problems = [];
  page.on('pageerror', (err) => problems.push(err.message));
  // Optionally every frame of the page's websockets, on their way through.
  const frames = { sent: [], received: [] };
  if (observe) {
    await page.routeWebSocket(/\/ws\/entity-sync\//, (ws) => {
      const upstream = ws.connectToServer();
      ws.onMessage((message) => {
        frames.sent.push(JSON.parse(String(message)));
        upstream.send(message);
      });
      upstream.onMessage((message) => {
        frames.received.push(JSON.parse(String(message)));
        ws.send(message);
      });
      ws.onClose((code, reason) => upstream.close({ code, reason }));
      upstream.onClose((code, reason) => ws.close({ code, reason }));
    });
  }
  await page.goto(`${pageBase}?${new URLSearchParams(params)}`);
  const log = () => page.evaluate(() => window.__log);
  return { context, page, problems, frames, log };
}

test('a page whose token expires during the test is refreshed without noticing: rows stay, no error, later pushes arrive', async () => {
  await resolver.set('items', 'e1', { rows: [{ id: 'e1', v: 'first' }] });
  const { context, page, problems, frames, log } = await openPage(
    { ws: `ws://127.0.0.1:${node.wsPort}`, id: 'e1', seconds: '3' },
    { observe: true },
  );
  await page.waitForFunction(() => window.__log?.rows.length === 1, null, POLL);
  const first = (await log()).rows[0];
  assert.deepEqual(first.rows, [{ id: 'e1', v: 'first' }]);
  const firstToken = frames.sent.find((f) => f.action === 'subscribe').body.token;
  const firstExp = JSON.parse(Buffer.from(firstToken.split('.')[1], 'base64url')).exp;

  // Two refreshes at least, and past the first token's expiry.
  await until(
    async () => (await log()).tokenCalls >= 3 && Date.now() / 1000 > firstExp + 0.5,
    'two refreshes and the first expiry',
    8000,
  );
  await until(
    () => frames.received.filter((f) => f.action === 'subscribed').length >= 3,
    'the answers to the refreshes',
  );
  assert.ok(Date.now() / 1000 > firstExp, 'the first token has expired by now');
  const subscribes = frames.sent.filter((f) => f.action === 'subscribe');
  for (const refresh of subscribes.slice(1)) {
    assert.deepEqual(Object.keys(refresh.body), ['entity', 'id', 'version', 'token']);
    assert.equal(refresh.body.version, first.version);
  }
  const answers = frames.received.map((f) => [f.action, f.body?.current === true]);
  assert.deepEqual(answers.slice(0, 2), [
    ['subscribed', false],
    ['push', false],
  ]);
  assert.deepEqual(
    answers.slice(2),
    answers.slice(2).map(() => ['subscribed', true]),
  );
  assert.ok(tokenRequests.filter((r) => r.id === 'e1').length >= 3, 'the page fetched its tokens');

  const seen = await log();
  assert.equal(seen.rows.length, 1, 'no rows callback for a refresh');
  assert.deepEqual(seen.errors, []);
  assert.deepEqual(seen.resumed, []);
  assert.deepEqual(
    seen.states.map((s) => s.state),
    ['connecting', 'open'],
  );

  await resolver.set('items', 'e1', { rows: [{ id: 'e1', v: 'later' }] });
  await resolver.notify(['items', 'e1']);
  await page.waitForFunction(() => window.__log.rows.length === 2, null, POLL);
  const later = (await log()).rows[1];
  assert.deepEqual(later.rows, [{ id: 'e1', v: 'later' }]);
  assert.equal(later.snapshot, false);
  assert.deepEqual((await log()).errors, []);
  await page.screenshot({ path: join(outputDir, 'screenshots', 'tokens-refreshed.png') });
  assert.deepEqual(problems, []);
  await context.close();
});

test('in the browser, a connection that stops forwarding without closing is found dead within interval + timeout and resumed by version', async () => {
  const proxy = await StallProxy.start(node.wsPort);
  try {
    await resolver.set('items', 'e2', { rows: [{ id: 'e2', v: 'kept' }] });
    const interval = 500;
    const timeout = 500;
    const { context, page, problems, log } = await openPage({
      ws: `ws://127.0.0.1:${proxy.port}`,
      id: 'e2',
      seconds: '60',
      interval: String(interval),
      timeout: String(timeout),
    });
    await page.waitForFunction(() => window.__log?.rows.length === 1, null, POLL);
    const held = (await log()).rows[0].version;
    assert.equal(proxy.count, 1);

    const stalledAt = Date.now();
    proxy.stall();
    await page.waitForFunction(
      () => window.__log.states.some((s) => s.state === 'reconnecting'),
      null,
      { ...POLL, timeout: interval + timeout + 3000 },
    );
    const seenAt = (await log()).states.find((s) => s.state === 'reconnecting');
    const detectedMs = seenAt.at - stalledAt;
    assert.equal(seenAt.info.heartbeatTimeout, true);
    assert.ok(
      detectedMs >= timeout - 50 && detectedMs <= interval + timeout + 600,
      `found after ${detectedMs} ms, bound ${interval + timeout} ms`,
    );
    assert.ok(proxy.connections[0].dropped > 0, 'the ping went into the stalled proxy');

    // Resumed through the proxy, on a new connection: current, no snapshot.
    await page.waitForFunction(() => window.__log.resumed.length === 1, null, POLL);
    const resumed = await log();
    assert.deepEqual(resumed.resumed, [{ entity: 'items', id: 'e2', version: held }]);
    assert.equal(resumed.rows.length, 1);
    assert.equal(proxy.count, 2);
    assert.equal(resumed.tokenCalls, 1, 'the token held was still fresh: used again');
    assert.deepEqual(
      resumed.states.map((s) => s.state),
      ['connecting', 'open', 'reconnecting', 'connecting', 'open'],
    );

    await resolver.set('items', 'e2', { rows: [{ id: 'e2', v: 'after' }] });
    await resolver.notify(['items', 'e2']);
    await page.waitForFunction(() => window.__log.rows.length === 2, null, POLL);
    const after = await log();
    assert.deepEqual(after.rows[1].rows, [{ id: 'e2', v: 'after' }]);
    assert.equal(after.rows[1].snapshot, false);
    assert.deepEqual(after.errors, []);
    assert.deepEqual(problems, []);
    await context.close();
  } finally {
    await proxy.close();
  }
});
