// Tests of the browser client against a fake WebSocket: `node --test client/test/`.
// No dependencies; the fake stands in for the node's side of the socket.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  EntitySyncClient,
  backoffDelay,
  encodeSecret,
  encodeSubscribe,
  encodeUnsubscribe,
} from '../entity-sync.js';

/** A WebSocket look-alike whose "server" side the test drives by hand. */
class FakeSocket {
  /** @type {FakeSocket[]} every socket made by the current test's client */
  static made = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    /** @type {string[]} frames the client sent */
    this.sent = [];
    this.closedByClient = null;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    FakeSocket.made.push(this);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open');
    this.sent.push(text);
  }

  close(code = 1000, reason = '') {
    this.closedByClient = { code, reason };
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code, reason, wasClean: true }));
  }

  // --- the server's side ---

  accept() {
    this.readyState = 1;
    this.onopen?.({});
  }

  push(frame) {
    this.onmessage?.({ data: typeof frame === 'string' ? frame : JSON.stringify(frame) });
  }

  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: '', wasClean: false });
  }

  /** Frames sent so far, parsed. */
  frames() {
    return this.sent.map((text) => JSON.parse(text));
  }
}

/** A client on a fresh fake, with fast, deterministic backoff. */
function makeClient(options = {}) {
  FakeSocket.made = [];
  const errors = [];
  const statuses = [];
  const client = new EntitySyncClient('ws://node.test/ws/entity-sync/', {
    WebSocket: FakeSocket,
    minDelayMs: 2,
    maxDelayMs: 8,
    random: () => 0.5,
    onError: (err) => errors.push(err),
    onStatus: (status) => statuses.push(status),
    ...options,
  });
  return { client, errors, statuses, socket: () => FakeSocket.made.at(-1) };
}

/** Resolves once `predicate()` holds; fails the test after a second. */
async function until(predicate, what) {
  const deadline = Date.now() + 1000;
  while (!predicate()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

const subscribed = (entity, id) => ({ action: 'subscribed', body: { entity, id } });
const push = (entity, id, version, rows) => ({ action: 'push', body: { entity, id, version, rows } });

test('frames are encoded exactly as the protocol spells them', () => {
  assert.equal(encodeSubscribe('items', '100'), '{"action":"subscribe","body":{"entity":"items","id":"100"}}');
  // Numeric ids are sent as their decimal string, as the node would turn them.
  assert.equal(encodeSubscribe('items', 100), '{"action":"subscribe","body":{"entity":"items","id":"100"}}');
  assert.equal(encodeUnsubscribe('lists', 7), '{"action":"unsubscribe","body":{"entity":"lists","id":"7"}}');
  assert.equal(encodeSecret('s3cret "x"'), '{"action":"secret","body":"s3cret \\"x\\""}');
});

test('on open it sends the secret first, then one subscribe per key', async () => {
  const { client, socket } = makeClient({ secret: 'demo-secret' });
  client.subscribe('items', 101, () => {});
  client.subscribe('items', '101', () => {}); // same key: shares the subscription
  client.subscribe('lists', '1', () => {});
  assert.deepEqual(socket().sent, [], 'nothing is sent before the socket opens');

  socket().accept();
  assert.deepEqual(socket().sent, [
    '{"action":"secret","body":"demo-secret"}',
    '{"action":"subscribe","body":{"entity":"items","id":"101"}}',
    '{"action":"subscribe","body":{"entity":"lists","id":"1"}}',
  ]);
  assert.equal(client.status, 'open');
  client.close();
});

test('the last listener of a key sends the unsubscribe', () => {
  const { client, socket } = makeClient();
  socket().accept();
  const a = () => {};
  const b = () => {};
  client.subscribe('items', '1', a);
  const offB = client.subscribe('items', '1', b);
  socket().push(subscribed('items', '1'));
  client.unsubscribe('items', '1', a);
  assert.equal(socket().frames().filter((f) => f.action === 'unsubscribe').length, 0);
  offB();
  assert.deepEqual(socket().frames().at(-1), { action: 'unsubscribe', body: { entity: 'items', id: '1' } });
  client.close();
});

test('pushes reach every listener; a push older than the held version is dropped', () => {
  const { client, socket } = makeClient();
  socket().accept();
  const seen = [];
  const seenToo = [];
  client.subscribe('items', '100', (rows, meta) => seen.push([meta.version, meta.snapshot, rows]));
  client.subscribe('items', '100', (rows, meta) => seenToo.push(meta.version));

  socket().push(subscribed('items', '100'));
  socket().push(push('items', '100', 5, [{ qty: 1 }]));
  socket().push(push('items', '100', 7, [{ qty: 3 }]));
  socket().push(push('items', '100', 6, [{ qty: 2 }])); // stale: reflects change 6 < 7
  socket().push(push('items', '100', 7, [{ qty: 3 }, { note: 'same change, resolved again' }]));
  socket().push(push('items', '999', 9, [{ other: true }])); // not subscribed: ignored

  assert.deepEqual(seen, [
    [5, true, [{ qty: 1 }]],
    [7, false, [{ qty: 3 }]],
    [7, false, [{ qty: 3 }, { note: 'same change, resolved again' }]],
  ]);
  assert.deepEqual(seenToo, [5, 7, 7]);
  assert.deepEqual(client.current('items', 100), {
    version: 7,
    rows: [{ qty: 3 }, { note: 'same change, resolved again' }],
  });
  client.close();
});

test('after a drop it reconnects, resubscribes and takes the fresh snapshot', async () => {
  const { client, socket, statuses } = makeClient({ secret: 's' });
  const first = socket();
  first.accept();
  const seen = [];
  client.subscribe('lists', '1', (rows, meta) => seen.push([meta.version, meta.snapshot, rows[0].name]));
  first.push(subscribed('lists', '1'));
  first.push(push('lists', '1', 40, [{ name: 'before' }]));
  first.push(push('lists', '1', 41, [{ name: 'changed' }]));

  first.drop(1001); // node going away
  assert.equal(client.status, 'reconnecting');
  await until(() => FakeSocket.made.length === 2, 'a second socket');
  const second = socket();
  assert.notEqual(second, first);
  assert.equal(second.url, 'ws://node.test/ws/entity-sync/');

  // Events of the old socket no longer count.
  first.push(push('lists', '1', 99, [{ name: 'ghost' }]));

  second.accept();
  assert.deepEqual(second.frames(), [
    { action: 'secret', body: 's' },
    { action: 'subscribe', body: { entity: 'lists', id: '1' } },
  ]);
  // Before the new snapshot, an older push is still dropped...
  second.push(push('lists', '1', 39, [{ name: 'stale' }]));
  // ...and the snapshot answering the resubscribe is taken: here the node is a
  // restarted one on the embedded bus, whose counter started again.
  second.push(subscribed('lists', '1'));
  second.push(push('lists', '1', 3, [{ name: 'after restart' }]));
  second.push(push('lists', '1', 2, [{ name: 'older than snapshot' }]));
  second.push(push('lists', '1', 4, [{ name: 'next change' }]));

  assert.deepEqual(seen, [
    [40, true, 'before'],
    [41, false, 'changed'],
    [3, true, 'after restart'],
    [4, false, 'next change'],
  ]);
  assert.deepEqual(statuses, ['connecting', 'open', 'reconnecting', 'connecting', 'open']);
  client.close();
});

test('a connect that fails with an error event alone is retried', async () => {
  // Node 20's WebSocket reports a refused connection this way, with no close.
  const { client, socket } = makeClient();
  const first = socket();
  first.onerror?.({ type: 'error' });
  assert.equal(client.status, 'reconnecting');
  await until(() => FakeSocket.made.length === 2, 'a second socket');
  // A close event that still follows the error changes nothing.
  first.drop();
  socket().accept();
  assert.equal(client.status, 'open');
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(FakeSocket.made.length, 2);
  client.close();
});

test('reconnect attempts back off until one connection holds', async () => {
  const { client, socket } = makeClient({ minDelayMs: 4, maxDelayMs: 16 });
  const delays = [];
  let last = Date.now();
  for (let i = 0; i < 4; i += 1) {
    const count = FakeSocket.made.length;
    socket().drop();
    await until(() => FakeSocket.made.length === count + 1, `reconnect ${i + 1}`);
    delays.push(Date.now() - last);
    last = Date.now();
  }
  // With random() = 0.5 the delays are 3, 6, 12, 12 ms: growing, then capped.
  assert.ok(delays[2] >= 12 - 2, `third delay ${delays[2]}ms should have grown`);
  client.close();
});

test('backoffDelay grows exponentially, is capped and jittered', () => {
  assert.equal(backoffDelay(0, 100, 1000, () => 0), 50);
  assert.equal(backoffDelay(0, 100, 1000, () => 1), 100);
  assert.equal(backoffDelay(3, 100, 1000, () => 1), 800);
  assert.equal(backoffDelay(4, 100, 1000, () => 1), 1000);
  assert.equal(backoffDelay(400, 100, 1000, () => 0), 500);
});

test('error frames reach onError; a passing failure is retried, forbidden waits for a new secret', async () => {
  const { client, socket, errors } = makeClient();
  socket().accept();
  client.subscribe('lists', '1', () => {});
  client.subscribe('items', '5', () => {});

  socket().push({ action: 'error', body: { code: 'forbidden', message: 'private list', entity: 'lists', id: '1' } });
  socket().push({ action: 'error', body: { code: 'no_resolver', message: 'none yet', entity: 'items', id: '5' } });
  socket().push({ action: 'error', body: { code: 'invalid_json', message: 'bad frame' } });
  socket().push('not json at all');

  assert.deepEqual(errors.slice(0, 3), [
    { code: 'forbidden', message: 'private list', entity: 'lists', id: '1' },
    { code: 'no_resolver', message: 'none yet', entity: 'items', id: '5' },
    { code: 'invalid_json', message: 'bad frame' },
  ]);
  assert.equal(errors[3].code, 'client_invalid_frame');

  const subscribesOf = (entity) =>
    socket().frames().filter((f) => f.action === 'subscribe' && f.body.entity === entity).length;
  await until(() => subscribesOf('items') === 2, 'the no_resolver key to be retried');
  assert.equal(subscribesOf('lists'), 1, 'forbidden is not retried by itself');

  client.setSecret('demo-secret');
  const frames = socket().frames();
  // items/5's retried subscribe is held by the node, which re-checks it.
  assert.deepEqual(frames.slice(-2), [
    { action: 'secret', body: 'demo-secret' },
    { action: 'subscribe', body: { entity: 'lists', id: '1' } },
  ]);
  client.close();
});

test('a new secret resubscribes only the keys the node does not hold', () => {
  const { client, socket } = makeClient();
  socket().accept();
  client.subscribe('items', '1', () => {});
  client.subscribe('lists', '1', () => {});
  socket().push(subscribed('items', '1'));
  socket().push(push('items', '1', 3, [{ id: 1 }]));
  socket().push({ action: 'error', body: { code: 'forbidden', message: 'private list', entity: 'lists', id: '1' } });
  const before = socket().frames().length;
  client.setSecret('other');
  // The node re-checks items/1 itself; lists/1 it refused, so it is asked again.
  assert.deepEqual(socket().frames().slice(before), [
    { action: 'secret', body: 'other' },
    { action: 'subscribe', body: { entity: 'lists', id: '1' } },
  ]);
  client.close();
});

test('unsubscribing a key the node refused sends nothing', () => {
  const { client, socket } = makeClient();
  socket().accept();
  const off = client.subscribe('lists', '2', () => {});
  socket().push({ action: 'error', body: { code: 'not_found', message: 'no such list', entity: 'lists', id: '2' } });
  off();
  assert.equal(socket().frames().filter((f) => f.action === 'unsubscribe').length, 0);
  client.close();
});

test('a late listener gets the rows already held', async () => {
  const { client, socket } = makeClient();
  socket().accept();
  client.subscribe('items', '1', () => {});
  socket().push(subscribed('items', '1'));
  socket().push(push('items', '1', 12, [{ id: 1 }]));
  const late = [];
  client.subscribe('items', '1', (rows, meta) => late.push([meta.version, rows]));
  await until(() => late.length === 1, 'the late listener');
  assert.deepEqual(late, [[12, [{ id: 1 }]]]);
  assert.equal(socket().frames().filter((f) => f.action === 'subscribe').length, 1);
  client.close();
});

test('close() ends the socket and stops reconnecting', async () => {
  const { client, socket, statuses } = makeClient();
  socket().accept();
  client.close();
  assert.deepEqual(socket().closedByClient, { code: 1000, reason: 'client closed' });
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.equal(FakeSocket.made.length, 1);
  assert.equal(statuses.at(-1), 'closed');
});

test('pass-through messages are sent as they are, and only when connected', () => {
  const { client, socket } = makeClient();
  assert.equal(client.send({ type: 'typing', list: 1 }), false);
  socket().accept();
  assert.equal(client.send({ type: 'typing', list: 1 }), true);
  assert.equal(socket().sent.at(-1), '{"type":"typing","list":1}');
  assert.throws(() => client.send({ action: 'subscribe' }), TypeError);
  client.close();
});
