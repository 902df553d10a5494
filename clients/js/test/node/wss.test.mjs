// wss:// with a certificate the test makes, a custom websocket path and a
// secret given at construction, against the real node binary.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

import { DEADLINE_MS, NodeProcess, Resolver, makeCerts, packageRoot } from '../support/harness.mjs';

let dir;
let certs;
let node;
let resolver;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'entity-sync-client-tls-'));
  certs = await makeCerts(dir);
  node = await new NodeProcess({
    tls: certs,
    args: ['--ws-path', '/live/sync/'],
    name: 'node-tls',
  }).start();
  resolver = await Resolver.start(node.grpcUrl, {
    entities: { lists: 'per_subscriber' },
    name: 'resolver-tls',
  });
  await resolver.set('lists', '1', {
    rows: [{ list: 1, name: 'groceries' }],
    forbidden_secrets: [''],
  });
});

after(async () => {
  await resolver?.stop();
  await node?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Runs wss-child.mjs with `env`; its events, once it exits. */
function runChild(args, env) {
  const flags =
    Number(process.versions.node.split('.')[0]) < 22 ? ['--experimental-websocket'] : [];
  const child = spawn(
    process.execPath,
    [...flags, join(packageRoot, 'test', 'support', 'wss-child.mjs'), ...args],
    {
      env: { ...process.env, NODE_EXTRA_CA_CERTS: '', ...env },
      stdio: ['ignore', 'pipe', 'inherit'],
    },
  );
  const events = [];
  createInterface({ input: child.stdout }).on('line', (line) => events.push(JSON.parse(line)));
  return new Promise((done, fail) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      fail(
        new Error(
          `the client process did not finish within ${DEADLINE_MS} ms: ${JSON.stringify(events)}`,
        ),
      );
    }, DEADLINE_MS);
    child.once('exit', (code) => {
      clearTimeout(timer);
      if (code === 0) done(events);
      else fail(new Error(`the client process exited ${code}: ${JSON.stringify(events)}`));
    });
  });
}

test('over wss:// with the CA trusted, on a custom path, the secret opens a private list', async () => {
  const events = await runChild(
    [`https://127.0.0.1:${node.wsPort}`, '/live/sync/', 'lists', '1', 'member', 'until-rows'],
    { NODE_EXTRA_CA_CERTS: certs.ca },
  );
  assert.deepEqual(events, [
    { state: 'connecting' },
    { url: `wss://127.0.0.1:${node.wsPort}/live/sync/` },
    { state: 'open' },
    { rows: [{ list: 1, name: 'groceries' }], snapshot: true },
    { state: 'closed' },
  ]);
  const [request] = await resolver.requestsFor('subscribe', 'lists', '1');
  assert.equal(request.secret, 'member');
});

test('over wss:// without trusting the CA, the connection fails and nothing is received', async () => {
  const before = (await resolver.requests()).length;
  const events = await runChild(
    [
      `wss://127.0.0.1:${node.wsPort}/live/sync/`,
      '/live/sync/',
      'lists',
      '1',
      'member',
      'until-failure',
    ],
    {},
  );
  assert.deepEqual(events, [
    { state: 'connecting' },
    { url: `wss://127.0.0.1:${node.wsPort}/live/sync/` },
    { state: 'reconnecting' },
    { state: 'closed' },
  ]);
  assert.equal((await resolver.requests()).length, before);
});
