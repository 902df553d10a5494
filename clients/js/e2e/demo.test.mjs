// The demo page in headless Chromium, with the real node binary and the demo
// backend (its SQLite resolver, pointed at that node with --node): the page's
// client is the package's committed build, served by the demo.
//
// Needs /usr/bin/chromium (Debian's `chromium`; CHROMIUM_BIN overrides) and
// the debug binaries. Screenshots and timings go to test-output/.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { chromium } from 'playwright-core';

import {
  DEADLINE_MS,
  NodeProcess,
  demoBinary,
  httpGet,
  outputDir,
  packageRoot,
  spawnChild,
  until,
} from '../test/support/harness.mjs';

const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const shots = join(outputDir, 'screenshots');

let node;
let demo;
let browser;
let pageUrl;

before(async () => {
  mkdirSync(shots, { recursive: true });
  node = await new NodeProcess({ name: 'e2e-node' }).start();
  demo = spawnChild('e2e-demo', demoBinary(), [
    '--node',
    node.grpcUrl,
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
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
  });
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
