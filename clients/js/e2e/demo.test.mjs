// The demo page in headless Chromium, with the real node binary and the demo
// backend (its SQLite resolver, pointed at that node with --node, signing the
// page's subscribe tokens with the node's key): the page's client is the
// package's committed build, served by the demo.
//
// Needs /usr/bin/chromium (Debian's `chromium`; CHROMIUM_BIN overrides) and
// the debug binaries. Screenshots and timings go to test-output/.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { chromium } from 'playwright-core';

import { launchChromium } from '../test/support/browser.mjs';
import {
  DEADLINE_MS,
  NodeProcess,
  demoBinary,
  httpGet,
  metric,
  outputDir,
  packageRoot,
  spawnChild,
  until,
} from '../test/support/harness.mjs';
import { tokenKey } from '../test/support/tokens.mjs';

const shots = join(outputDir, 'screenshots');

let node;
let demo;
let browser;
let pageUrl;

before(async () => {
  mkdirSync(shots, { recursive: true });
  // The node verifies subscribe tokens; the demo signs the page's with the
  // key of the same JWKS file.
  const { jwksPath } = tokenKey({ kid: 'demo' });
  node = await new NodeProcess({
    name: 'e2e-node',
    args: ['--subscribe-token-jwks', jwksPath],
  }).start();
  demo = spawnChild('e2e-demo', demoBinary(), [
    '--node',
    node.grpcUrl,
    '--subscribe-token-jwks',
    jwksPath,
    '--ws-addr',
    `127.0.0.1:${node.wsPort}`,
    '--http-addr',
    '127.0.0.1:0',
    '--auto-edit',
    '0',
  ]);
  // The demo binds its page port itself and prints the page's address.
  pageUrl = await demo.firstLine(
    (line) => line.match(/Open the demo page:\s+(http:\/\/127\.0\.0\.1:\d+\/)/)?.[1],
    "the demo page's address",
  );
  await until(async () => {
    if (!demo.alive) throw new Error('the demo exited; see test-output/logs/e2e-demo.log');
    return (await httpGet(`${pageUrl}api/config`))?.status === 200;
  }, 'the demo page server');
  // A fresh profile per launch (playwright makes a temp user-data-dir and
  // removes it on close).
  browser = await launchChromium(chromium);
});

after(async () => {
  await browser?.close();
  await demo?.stop();
  await node?.stop();
});

/** A page in a browser context of its own (its own storage and socket). */
async function openPage(name) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(DEADLINE_MS);
  const problems = [];
  page.on('pageerror', (err) => problems.push(`${name}: ${err.message}`));
  await page.goto(`${pageUrl}?list=1`);
  return { page, problems };
}

const qty = (page, item) => page.locator(`input[aria-label="qty of item ${item}"]`);
const pill = (page) => page.locator('#status');

async function waitLive(page) {
  await page.waitForFunction(() => document.querySelector('#status')?.textContent === 'live');
  await page.waitForFunction(() => document.querySelectorAll('#items tr').length === 8);
}

test("the demo serves the package's committed build as the page's client", async () => {
  const served = await httpGet(`${pageUrl}entity-sync.js`);
  assert.equal(served.status, 200);
  assert.ok(
    served.body === readFileSync(join(packageRoot, 'dist', 'entity-sync.js'), 'utf8'),
    'the demo serves dist/entity-sync.js as it is (rebuild the demo after `npm run build`)',
  );
  const page = await httpGet(pageUrl);
  assert.match(page.body, /import \{ EntitySyncClient \} from '\/entity-sync\.js';/);
});

test('the demo page: an edit reaches a second browser, no secret is refused, and the page recovers from a node restart', async (t) => {
  const timings = {};
  const started = performance.now();
  const lap = (name, since) => {
    timings[name] = Math.round(performance.now() - since);
    return performance.now();
  };
  let mark = performance.now();

  const a = await openPage('A');
  const b = await openPage('B');
  await Promise.all([waitLive(a.page), waitLive(b.page)]);
  assert.equal(await qty(a.page, 101).inputValue(), '2');
  assert.equal(await qty(b.page, 101).inputValue(), '2');
  mark = lap('two pages live (ms)', mark);

  // An edit through page A's input: saved, notified, pushed to both pages.
  await qty(a.page, 101).fill('42');
  await qty(a.page, 101).press('Enter');
  await b.page.waitForFunction(
    () => document.querySelector('input[aria-label="qty of item 101"]')?.value === '42',
  );
  await a.page.waitForFunction(
    () => document.querySelector('input[aria-label="qty of item 101"]')?.value === '42',
  );
  mark = lap('edit in A seen in B (ms)', mark);
  assert.match(await b.page.locator('#list-version').textContent(), /^v\d+ · change$/);
  await a.page.screenshot({ path: join(shots, '1-edited-a.png') });
  await b.page.screenshot({ path: join(shots, '1-edited-b.png') });

  // Page A clears its secret: the private list is refused there, B keeps it.
  await a.page.locator('#secret').fill('');
  await a.page.locator('#secret-form button').click();
  await a.page.locator('#list-error').waitFor({ state: 'visible' });
  assert.match(
    await a.page.locator('#list-error').textContent(),
    /^forbidden: this list is private/,
  );
  assert.equal(await a.page.locator('#items tr').count(), 0);
  assert.equal(await b.page.locator('#items tr').count(), 8);
  lap('secret cleared, list refused (ms)', mark);
  await a.page.screenshot({ path: join(shots, '2-forbidden-a.png') });

  // The node is killed and started again on the same ports.
  await node.kill();
  await Promise.all(
    [a.page, b.page].map((page) =>
      page.waitForFunction(() =>
        document.querySelector('#status')?.classList.contains('reconnecting'),
      ),
    ),
  );
  assert.match(await pill(b.page).textContent(), /^reconnecting in \d+\.\d s$/);
  await b.page.screenshot({ path: join(shots, '3-node-down-b.png') });
  const restarted = performance.now();
  await node.start();
  await waitLive(b.page);
  mark = lap('node restarted, page B live again (ms)', restarted);
  // A came back too, with the secret it holds now (none): still refused.
  await a.page.waitForFunction(() => document.querySelector('#status')?.textContent === 'live');
  await a.page.locator('#list-error').waitFor({ state: 'visible' });
  // Edits flow again, and the secret opens the list on A again.
  await qty(b.page, 102).fill('9');
  await qty(b.page, 102).press('Enter');
  await b.page.waitForFunction(
    () => document.querySelector('input[aria-label="qty of item 102"]')?.value === '9',
  );
  await a.page.locator('#secret').fill('demo-secret');
  await a.page.locator('#secret-form button').click();
  await waitLive(a.page);
  assert.equal(await qty(a.page, 102).inputValue(), '9');
  assert.equal(await qty(a.page, 101).inputValue(), '42');
  assert.equal(await a.page.locator('#list-error').isVisible(), false);
  lap('edit after restart, secret restored (ms)', mark);
  await a.page.screenshot({ path: join(shots, '4-recovered-a.png') });
  await b.page.screenshot({ path: join(shots, '4-recovered-b.png') });

  assert.deepEqual([...a.problems, ...b.problems], []);
  timings['whole test (ms)'] = Math.round(performance.now() - started);
  writeFileSync(join(outputDir, 'e2e-timings.json'), `${JSON.stringify(timings, null, 2)}\n`);
  for (const [name, ms] of Object.entries(timings)) t.diagnostic(`${name}: ${ms}`);
});

test("the page's client resumes by version after its connection drops: the unchanged key without a snapshot, the changed one with its new rows", async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(DEADLINE_MS);
  const problems = [];
  page.on('pageerror', (err) => problems.push(err.message));

  // Every websocket of the page goes through here to the node: the test sees
  // the frames of each connection and can drop one. A reconnect waits at
  // `gate` until the test opens it.
  const connections = [];
  let gate = Promise.resolve();
  await page.routeWebSocket(/\/ws\/entity-sync\//, async (ws) => {
    const connection = { ws, server: null, sent: [], received: [] };
    connections.push(connection);
    await gate;
    const server = ws.connectToServer();
    connection.server = server;
    ws.onMessage((message) => {
      connection.sent.push(JSON.parse(String(message)));
      server.send(message);
    });
    server.onMessage((message) => {
      connection.received.push(JSON.parse(String(message)));
      ws.send(message);
    });
    ws.onClose((code, reason) => server.close({ code, reason }));
    server.onClose((code, reason) => ws.close({ code, reason }));
  });
  await page.goto(`${pageUrl}?list=1&watch=103`);
  await waitLive(page);
  await page.waitForFunction(() => document.querySelector('#watch-count')?.textContent === '1');
  const [first] = connections;
  const lastPush = (key) =>
    first.received
      .filter((f) => f.action === 'push' && `${f.body.entity}/${f.body.id}` === key)
      .at(-1);
  const held = { list: lastPush('lists/1').body.version, item: lastPush('items/103').body.version };
  const metricsBefore = await node.metrics();
  const currentBefore = metric(metricsBefore, 'entity_sync_resumed_current_total');
  const snapshotBefore = metric(metricsBefore, 'entity_sync_resumed_snapshot_total');

  // The connection drops; the page's reconnect waits at the gate meanwhile.
  let open;
  gate = new Promise((resolve) => {
    open = resolve;
  });
  await first.server.close({ code: 1001, reason: 'going away' });
  await first.ws.close({ code: 1001, reason: 'going away' });
  await page.waitForFunction(() =>
    document.querySelector('#status')?.classList.contains('reconnecting'),
  );
  // Item 104 changes while the page is away: lists/1 changes, items/103 does not.
  const edit = await fetch(`${pageUrl}api/items/104`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ qty: 61 }),
    signal: AbortSignal.timeout(DEADLINE_MS),
  });
  assert.equal(edit.status, 200);
  const [changed] = (await edit.json()).sequences;
  open();

  await page.waitForFunction(
    () => document.querySelector('input[aria-label="qty of item 104"]')?.value === '61',
  );
  await page.waitForFunction(() => document.querySelector('#status')?.textContent === 'live');
  await until(
    () => connections[1]?.received.some((f) => f.body?.current === true),
    'the resumed key',
  );
  const second = connections[1];
  // The resubscribes carried the versions the page held.
  assert.deepEqual(
    second.sent
      .filter((f) => f.action === 'subscribe')
      .map(({ body: { token, ...body } }) => {
        // Each with a subscribe token from the demo's /api/token.
        assert.equal(token?.split('.').length, 3, `no token in ${JSON.stringify(body)}`);
        return body;
      }),
    [
      { entity: 'lists', id: '1', version: held.list },
      { entity: 'items', id: '103', version: held.item },
    ],
  );
  // items/103: current, no snapshot; lists/1: subscribed and its new rows.
  const answers = second.received.map((f) => [
    f.action,
    `${f.body.entity}/${f.body.id}`,
    f.body.current === true,
  ]);
  assert.deepEqual(
    answers.filter(([, key]) => key === 'items/103'),
    [['subscribed', 'items/103', true]],
  );
  assert.deepEqual(
    answers.filter(([, key]) => key === 'lists/1'),
    [
      ['subscribed', 'lists/1', false],
      ['push', 'lists/1', false],
    ],
  );
  const snapshot = second.received.find((f) => f.action === 'push');
  assert.ok(snapshot.body.version >= changed, `v${snapshot.body.version} < change ${changed}`);
  assert.equal(snapshot.body.rows.find((row) => row.id === 104)?.qty, 61);
  const metricsAfter = await node.metrics();
  assert.equal(metric(metricsAfter, 'entity_sync_resumed_current_total'), currentBefore + 1);
  assert.equal(metric(metricsAfter, 'entity_sync_resumed_snapshot_total'), snapshotBefore + 1);
  // The watched item kept what it showed: no second delivery.
  assert.equal(await page.locator('#watch-count').textContent(), '1');
  assert.equal(await page.locator('#watch-version').textContent(), `v${held.item}`);
  await page.screenshot({ path: join(shots, '5-resumed.png') });
  assert.deepEqual(problems, []);
  await context.close();
});
