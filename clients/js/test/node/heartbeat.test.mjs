// The heartbeat against the real node binary: a ping is answered by a pong,
// and a connection that stops delivering without closing (a TCP proxy that
// drops every byte) is found dead within heartbeatIntervalMs +
// heartbeatTimeoutMs, replaced, and every key resumed by version.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import { EntitySyncClient } from '../../dist/entity-sync.js';
import { NodeProcess, Resolver, recorder, until } from '../support/harness.mjs';
import { StallProxy } from '../support/stall-proxy.mjs';

const INTERVAL_MS = 400;
const TIMEOUT_MS = 400;
/** Timers on a shared, busy machine: how late the detection may be. */
const SLACK_MS = 600;

let node;
let resolver;
let proxy;
const clients = [];

before(async () => {
  node = await new NodeProcess({ name: 'node-heartbeat' }).start();
  resolver = await Resolver.start(node.grpcUrl, {
    entities: { items: 'shared' },
    name: 'resolver-heartbeat',
  });
  proxy = await StallProxy.start(node.wsPort);
});

after(async () => {
  for (const made of clients) made.close();
  await proxy?.close();
  await resolver?.stop();
  await node?.stop();
});

function client(options) {
  const made = new EntitySyncClient(`ws://127.0.0.1:${proxy.port}`, {
    minDelayMs: 100,
    maxDelayMs: 400,
    heartbeatIntervalMs: INTERVAL_MS,
    heartbeatTimeoutMs: TIMEOUT_MS,
    ...options,
  });
  clients.push(made);
  return made;
}

test('a quiet connection is pinged every heartbeatIntervalMs and the node answers pong; nothing else happens', async () => {
  const rec = recorder();
  const c = client(rec.options);
  await until(() => c.state === 'open', 'the connection');
  await until(
    () => rec.seen.frames.filter((f) => f.action === 'pong').length >= 2,
    'two pongs',
    INTERVAL_MS * 2 + TIMEOUT_MS + SLACK_MS * 2,
  );
  const pings = rec.seen.sent.filter((f) => f.action === 'ping');
  assert.ok(pings.length >= 2 && pings.length <= 3, `${pings.length} pings`);
  assert.ok(pings.every((f) => JSON.stringify(f) === '{"action":"ping"}'));
  // Every frame received was a pong, one per ping.
  assert.deepEqual(
    rec.seen.frames.map((f) => JSON.stringify(f)),
    rec.seen.frames.map(() => '{"action":"pong"}'),
  );
  assert.ok(rec.seen.frames.length >= pings.length - 1);
  assert.equal(rec.seen.sockets, 1);
  assert.deepEqual(
    rec.seen.states.map(([s]) => s),
    ['connecting', 'open'],
  );
  assert.deepEqual(rec.seen.errors, []);
  c.close();
  await until(() => proxy.connections.every((x) => x.client.destroyed), 'the proxy to see it go');
});

test('a connection that stops forwarding without closing is found dead within interval + timeout, replaced, and resumed by version; later pushes arrive', async () => {
  await resolver.set('items', 'h1', { rows: [{ id: 'h1', v: 'before' }] });
  await resolver.set('items', 'h2', { rows: [{ id: 'h2', v: 'kept' }] });
  const rec = recorder();
  const c = client(rec.options);
  c.subscribe('items', 'h1', rec.listener);
  c.subscribe('items', 'h2', rec.listener);
  await until(() => rec.of('items/h1').length === 1 && rec.of('items/h2').length === 1, 'rows');
  const held = { h1: rec.of('items/h1')[0].version, h2: rec.of('items/h2')[0].version };
  const connectionsBefore = proxy.count;
  const connection = proxy.connections.at(-1);
  assert.equal(connection.client.destroyed, false, "the client's connection, open");

  const stalledAt = Date.now();
  proxy.stall();
  // Changed while the connection is dead: the push is lost in the proxy.
  await resolver.set('items', 'h1', { rows: [{ id: 'h1', v: 'during' }] });
  await resolver.notify(['items', 'h1']);
  await until(
    () => rec.seen.states.some(([s]) => s === 'reconnecting'),
    'the dead connection to be found',
    INTERVAL_MS + TIMEOUT_MS + SLACK_MS + 2000,
  );
  const detectedMs = Date.now() - stalledAt;
  const [, info] = rec.seen.states.find(([s]) => s === 'reconnecting');
  assert.equal(info.heartbeatTimeout, true);
  assert.ok(detectedMs >= TIMEOUT_MS - 20, `not before a ping went unanswered: ${detectedMs} ms`);
  assert.ok(
    detectedMs <= INTERVAL_MS + TIMEOUT_MS + SLACK_MS,
    `found after ${detectedMs} ms, bound ${INTERVAL_MS + TIMEOUT_MS} ms`,
  );
  assert.ok(connection.dropped > 0, 'the ping was dropped');
  assert.equal(rec.of('items/h1').length, 1, 'the push of the change was lost');

  const sentBefore = rec.seen.sent.length;
  const framesBefore = rec.seen.frames.length;
  await until(() => rec.of('items/h1').length === 2, 'the snapshot of the changed key');
  assert.equal(rec.seen.sockets, 2);
  assert.equal(proxy.count, connectionsBefore + 1, 'through the proxy again, a new connection');
  assert.deepEqual(
    rec.seen.sent
      .slice(sentBefore)
      .filter((f) => f.action === 'subscribe')
      .map((f) => f.body),
    [
      { entity: 'items', id: 'h1', version: held.h1 },
      { entity: 'items', id: 'h2', version: held.h2 },
    ],
  );
  await until(
    () => rec.seen.frames.slice(framesBefore).filter((f) => f.action === 'subscribed').length === 2,
    'both answers',
  );
  const answers = rec.seen.frames
    .slice(framesBefore)
    .filter((f) => f.action !== 'pong')
    .map((f) => [f.action, f.body.id, f.body.current === true]);
  assert.deepEqual(
    answers.filter(([, id]) => id === 'h2'),
    [['subscribed', 'h2', true]],
  );
  assert.deepEqual(
    answers.filter(([, id]) => id === 'h1'),
    [
      ['subscribed', 'h1', false],
      ['push', 'h1', false],
    ],
  );
  assert.deepEqual(rec.of('items/h1')[1].rows, [{ id: 'h1', v: 'during' }]);
  assert.equal(rec.of('items/h2').length, 1, 'the unchanged key: no second delivery');

  // Live on the new connection.
  await resolver.set('items', 'h2', { rows: [{ id: 'h2', v: 'after' }] });
  await resolver.notify(['items', 'h2']);
  await until(() => rec.of('items/h2').length === 2, 'the push after the reconnect');
  assert.equal(rec.of('items/h2')[1].snapshot, false);
  assert.deepEqual(rec.of('items/h2')[1].rows, [{ id: 'h2', v: 'after' }]);
  assert.deepEqual(rec.seen.errors, []);
  assert.equal(c.state, 'open');
});
