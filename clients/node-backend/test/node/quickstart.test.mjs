// examples/quickstart.ts, compiled and run against the real node: it
// registers, notifies once, serves a subscriber, and exits on SIGTERM.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';

import { NodeProcess, WsClient, metric, packageRoot, until } from '../support/env.mjs';

let node;
before(async () => {
  node = await new NodeProcess({ name: 'nb-quickstart' }).start();
});
after(async () => {
  await node?.stop();
});

test('the quickstart serves items and notifies', async () => {
  const tsc = spawnSync(
    join(packageRoot, 'node_modules', '.bin', 'tsc'),
    ['-p', join(packageRoot, 'examples', 'tsconfig.json')],
    { encoding: 'utf8', timeout: 60_000 },
  );
  assert.equal(tsc.status, 0, tsc.stdout + tsc.stderr);
  const child = spawn(
    process.execPath,
    [join(packageRoot, 'examples', 'dist', 'quickstart.js'), node.grpcUrl],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const out = [];
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  createInterface({ input: child.stdout }).on('line', (line) => out.push(line));
  const exited = new Promise((done) =>
    child.once('exit', (code, signal) => done({ code, signal })),
  );
  try {
    await until(() => out.length > 0, 'the quickstart’s output');
    assert.match(out[0], /^notified, bus sequence \d+$/);
    // The notify can be answered before the serve call registered.
    await until(
      async () => metric(await node.metrics(), 'entity_sync_resolvers') === 1,
      'the quickstart registered',
    );
    const client = await WsClient.open(node);
    client.subscribe('items', 101);
    client.subscribe('items', 7);
    const [push] = await client.waitFor('push', 'items', 101);
    assert.deepEqual(push.body.rows, [{ id: 101, name: 'milk', qty: 2 }]);
    const [missing] = await client.waitFor('error', 'items', 7);
    assert.equal(missing.body.code, 'not_found');
    client.close();
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
    const { code, signal } = await exited;
    clearTimeout(timer);
    assert.deepEqual({ code, signal }, { code: 0, signal: null }, stderr);
    assert.deepEqual(out, [out[0]]);
    assert.equal(stderr, '');
  } finally {
    child.kill('SIGKILL');
  }
});

test('the README shows the quickstart as it is', () => {
  const example = readFileSync(join(packageRoot, 'examples', 'quickstart.ts'), 'utf8');
  const body = example.slice(example.indexOf('import '));
  const readme = readFileSync(join(packageRoot, 'README.md'), 'utf8');
  const shown = readme.match(/```ts\n(import [\s\S]*?\n)```/);
  assert.ok(shown, 'no ts block in the README');
  assert.equal(shown[1], body);
});
