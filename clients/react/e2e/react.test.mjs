// The package in headless Chromium: vite builds the page of e2e/app/ (a
// provider and useEntity('items', '1')) into a temporary directory, a small
// static server here serves it, and the page follows the real node binary
// fed by the testkit's resolver, through a change the test notifies.
//
// Needs /usr/bin/chromium (CHROMIUM_BIN overrides) and the debug binaries.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, extname, join, normalize, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';
import { build } from 'vite';

import { launchChromium } from '../../js/test/support/browser.mjs';
import {
  DEADLINE_MS,
  NodeProcess,
  Resolver,
  metric,
  until,
} from '../../js/test/support/harness.mjs';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const outputDir = join(root, 'test-output');
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
};

let out;
let node;
let resolver;
let server;
let browser;

before(async () => {
  out = mkdtempSync(join(tmpdir(), 'entity-sync-react-e2e-'));
  await build({
    configFile: false,
    root: join(root, 'e2e', 'app'),
    logLevel: 'warn',
    // The page imports the package by its name: the committed build.
    resolve: { alias: { '@entity-sync/react': join(root, 'dist', 'index.js') } },
    // React's development build: StrictMode double-mounts the tree, as in
    // `vite dev`, and the page must still hold one socket.
    mode: 'development',
    define: { 'process.env.NODE_ENV': JSON.stringify('development') },
    build: { outDir: out, emptyOutDir: true, minify: false },
  });
  node = await new NodeProcess({ name: 'react-e2e-node' }).start();
  resolver = await Resolver.start(node.grpcUrl, {
    entities: { items: 'shared' },
    name: 'react-e2e-resolver',
  });
  server = createServer((request, response) => {
    const { pathname } = new URL(request.url, 'http://page.test');
    const file = normalize(join(out, pathname === '/' ? 'index.html' : pathname));
    if (!file.startsWith(out + '/')) {
      response.writeHead(403);
      response.end();
      return;
    }
    try {
      const body = readFileSync(file);
      response.writeHead(200, {
        'content-type': TYPES[extname(file)] ?? 'application/octet-stream',
      });
      response.end(body);
    } catch {
      response.writeHead(404);
      response.end();
    }
  });
  await new Promise((done) => server.listen(0, '127.0.0.1', done));
  browser = await launchChromium(chromium);
});

after(async () => {
  await browser?.close();
  await new Promise((done) => (server ? server.close(done) : done()));
  await resolver?.stop();
  await node?.stop();
  if (out) rmSync(out, { recursive: true, force: true });
});

test('a vite-built page renders useEntity from the node and follows a notified change', async () => {
  await resolver.set('items', '1', { rows: [{ id: 1, name: 'milk', qty: 2 }] });
  const page = await browser.newPage();
  page.setDefaultTimeout(DEADLINE_MS);
  const problems = [];
  page.on('pageerror', (err) => problems.push(err.message));
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(ws.url()));
  const base = `http://127.0.0.1:${server.address().port}/`;
  await page.goto(`${base}?${new URLSearchParams({ ws: `ws://127.0.0.1:${node.wsPort}` })}`);

  await page.locator('#status', { hasText: 'live' }).waitFor();
  assert.equal(await page.locator('#rows li').innerText(), 'milk × 2');
  const first = Number(await page.locator('#version').innerText());

  await resolver.set('items', '1', {
    rows: [
      { id: 1, name: 'milk', qty: 7 },
      { id: 2, name: 'tea', qty: 1 },
    ],
  });
  await resolver.notify(['items', '1']);
  await page.locator('#rows li', { hasText: 'tea × 1' }).waitFor();
  assert.deepEqual(await page.locator('#rows li').allInnerTexts(), ['milk × 7', 'tea × 1']);
  assert.ok(Number(await page.locator('#version').innerText()) > first);
  assert.equal(await page.locator('#status').innerText(), 'live');

  // Double-mounted by StrictMode, yet one socket and one subscription.
  assert.equal(sockets.length, 1, sockets.join(', '));
  const text = await node.metrics();
  assert.equal(metric(text, 'entity_sync_connections'), 1);
  assert.equal(metric(text, 'entity_sync_subscriptions'), 1);
  assert.deepEqual(problems, []);

  mkdirSync(join(outputDir, 'screenshots'), { recursive: true });
  await page.screenshot({ path: join(outputDir, 'screenshots', 'react-live.png') });
  await page.close();
  await until(
    async () => metric(await node.metrics(), 'entity_sync_connections') === 0,
    'the page’s connection to close',
  );
});
