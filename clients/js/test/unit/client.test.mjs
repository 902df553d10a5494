// Edge cases of the client against a fake WebSocket whose "server" side each
// test drives by hand (frame orders a real node does not produce on demand).
// The same behaviours against a real node: test/node/.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  EntitySyncClient,
  EntitySyncError,
  backoffDelay,
  encodeSecret,
  encodeSubscribe,
  encodeUnsubscribe,
  websocketUrl,
  ERROR_CODES,
  CLIENT_ERROR_CODES,
  isRetryable,
} from '../../dist/entity-sync.js';

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
  const states = [];
  const client = new EntitySyncClient('ws://node.test/ws/entity-sync/', {
    WebSocket: FakeSocket,
    minDelayMs: 2,
    maxDelayMs: 8,
    random: () => 0.5,
    onError: (err) => errors.push(err),
    onState: (state) => states.push(state),
    ...options,
  });
  return { client, errors, states, socket: () => FakeSocket.made.at(-1) };
}

/** Resolves once `predicate()` holds; fails the test after a second. */
async function until(predicate, what) {
  const deadline = Date.now() + 1000;
  while (!predicate()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

/** The error the client makes of an error frame's body. */
const errorOf = ({ code, message, ...key }) => new EntitySyncError(code, message, key);

const subscribed = (entity, id) => ({ action: 'subscribed', body: { entity, id } });
const push = (entity, id, version, rows) => ({
  action: 'push',
  body: { entity, id, version, rows },
});

test('frames are encoded exactly as the protocol spells them', () => {
  assert.equal(
    encodeSubscribe('items', '100'),
    '{"action":"subscribe","body":{"entity":"items","id":"100"}}',
  );
  // Numeric ids are sent as their decimal string, as the node would turn them.
  assert.equal(
    encodeSubscribe('items', 100),
    '{"action":"subscribe","body":{"entity":"items","id":"100"}}',
  );
  assert.equal(
    encodeUnsubscribe('lists', 7),
    '{"action":"unsubscribe","body":{"entity":"lists","id":"7"}}',
  );
  assert.equal(
    encodeSubscribe('items', 100, 42),
    '{"action":"subscribe","body":{"entity":"items","id":"100","version":42}}',
  );
  // Only a version a node takes (an integer in 0..2^53-1) is sent.
  for (const bad of [null, undefined, -1, 1.5, Number.NaN, 2 ** 53]) {
    assert.equal(
      encodeSubscribe('items', 100, bad),
      '{"action":"subscribe","body":{"entity":"items","id":"100"}}',
    );
  }
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
  assert.equal(client.state, 'open');
  client.close();
});

test('the last listener of a key sends the unsubscribe', () => {
  const { client, socket } = makeClient();
  socket().accept();
  const a = () => {};
  const b = () => {};
  const offA = client.subscribe('items', '1', a);
  const offB = client.subscribe('items', '1', b);
  socket().push(subscribed('items', '1'));
  offA();
  offA(); // twice is once
  assert.equal(
    socket()
      .frames()
      .filter((f) => f.action === 'unsubscribe').length,
    0,
  );
  offB();
  assert.deepEqual(socket().frames().at(-1), {
    action: 'unsubscribe',
    body: { entity: 'items', id: '1' },
  });
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
  const { client, socket, states } = makeClient({ secret: 's' });
  const first = socket();
  first.accept();
  const seen = [];
  client.subscribe('lists', '1', (rows, meta) =>
    seen.push([meta.version, meta.snapshot, rows[0].name]),
  );
  first.push(subscribed('lists', '1'));
  first.push(push('lists', '1', 40, [{ name: 'before' }]));
  first.push(push('lists', '1', 41, [{ name: 'changed' }]));

  first.drop(1001); // node going away
  assert.equal(client.state, 'reconnecting');
  await until(() => FakeSocket.made.length === 2, 'a second socket');
  const second = socket();
  assert.notEqual(second, first);
  assert.equal(second.url, 'ws://node.test/ws/entity-sync/');

  // Events of the old socket no longer count.
  first.push(push('lists', '1', 99, [{ name: 'ghost' }]));

  second.accept();
  assert.deepEqual(second.frames(), [
    { action: 'secret', body: 's' },
    // With the version of the rows held: a restarted node cannot place it.
    { action: 'subscribe', body: { entity: 'lists', id: '1', version: 41 } },
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
  assert.deepEqual(states, ['connecting', 'open', 'reconnecting', 'connecting', 'open']);
  client.close();
});

test('a connect that fails with an error event alone is retried', async () => {
  // Node 20's WebSocket reports a refused connection this way, with no close.
  const { client, socket } = makeClient();
  const first = socket();
  first.onerror?.({ type: 'error' });
  assert.equal(client.state, 'reconnecting');
  await until(() => FakeSocket.made.length === 2, 'a second socket');
  // A close event that still follows the error changes nothing.
  first.drop();
  socket().accept();
  assert.equal(client.state, 'open');
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(FakeSocket.made.length, 2);
  client.close();
});

test('reconnect attempts back off, capped, and each tells its delay and attempt', async () => {
  const infos = [];
  const { client, socket } = makeClient({
    minDelayMs: 4,
    maxDelayMs: 16,
    onState: (state, info) => state === 'reconnecting' && infos.push(info),
  });
  for (let i = 0; i < 4; i += 1) {
    const count = FakeSocket.made.length;
    socket().drop(1006);
    await until(() => FakeSocket.made.length === count + 1, `reconnect ${i + 1}`);
  }
  // With random() = 0.5: ceilings 4, 8, 16, 16 ms, each delay three quarters of it.
  assert.deepEqual(infos, [
    { delayMs: 3, attempt: 1, closeCode: 1006 },
    { delayMs: 6, attempt: 2, closeCode: 1006 },
    { delayMs: 12, attempt: 3, closeCode: 1006 },
    { delayMs: 12, attempt: 4, closeCode: 1006 },
  ]);
  // A connection that never opened does not reset the backoff; one that
  // opens and drops at once does not either (it must hold 5 s).
  socket().accept();
  socket().drop(1006);
  assert.deepEqual(infos.at(-1), { delayMs: 12, attempt: 5, closeCode: 1006 });
  client.close();
});

test('backoffDelay grows exponentially, is capped and jittered', () => {
  assert.equal(
    backoffDelay(0, 100, 1000, () => 0),
    50,
  );
  assert.equal(
    backoffDelay(0, 100, 1000, () => 1),
    100,
  );
  assert.equal(
    backoffDelay(3, 100, 1000, () => 1),
    800,
  );
  assert.equal(
    backoffDelay(4, 100, 1000, () => 1),
    1000,
  );
  assert.equal(
    backoffDelay(400, 100, 1000, () => 0),
    500,
  );
});

test('error frames reach onError; a passing failure is retried, forbidden waits for a new secret', async () => {
  const { client, socket, errors } = makeClient();
  socket().accept();
  client.subscribe('lists', '1', () => {});
  client.subscribe('items', '5', () => {});

  socket().push({
    action: 'error',
    body: { code: 'forbidden', message: 'private list', entity: 'lists', id: '1' },
  });
  socket().push({
    action: 'error',
    body: { code: 'no_resolver', message: 'none yet', entity: 'items', id: '5' },
  });
  socket().push({ action: 'error', body: { code: 'invalid_json', message: 'bad frame' } });
  socket().push('not json at all');

  assert.deepEqual(errors.slice(0, 3), [
    errorOf({ code: 'forbidden', message: 'private list', entity: 'lists', id: '1' }),
    errorOf({ code: 'no_resolver', message: 'none yet', entity: 'items', id: '5' }),
    errorOf({ code: 'invalid_json', message: 'bad frame' }),
  ]);
  assert.deepEqual(
    errors.slice(0, 3).map((error) => error.retryable),
    [false, true, false],
  );
  assert.equal(errors[3].code, 'client_invalid_frame');

  const subscribesOf = (entity) =>
    socket()
      .frames()
      .filter((f) => f.action === 'subscribe' && f.body.entity === entity).length;
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
  socket().push({
    action: 'error',
    body: { code: 'forbidden', message: 'private list', entity: 'lists', id: '1' },
  });
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
  socket().push({
    action: 'error',
    body: { code: 'not_found', message: 'no such list', entity: 'lists', id: '2' },
  });
  off();
  assert.equal(
    socket()
      .frames()
      .filter((f) => f.action === 'unsubscribe').length,
    0,
  );
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
  assert.equal(
    socket()
      .frames()
      .filter((f) => f.action === 'subscribe').length,
    1,
  );
  client.close();
});

test('close() ends the socket and stops reconnecting', async () => {
  const { client, socket, states } = makeClient();
  socket().accept();
  client.close();
  assert.deepEqual(socket().closedByClient, { code: 1000, reason: 'client closed' });
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.equal(FakeSocket.made.length, 1);
  assert.equal(states.at(-1), 'closed');
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

test('the URL: http(s) becomes ws(s), a bare host gets the default path, a path option replaces it', () => {
  assert.equal(websocketUrl('ws://127.0.0.1:8080'), 'ws://127.0.0.1:8080/ws/entity-sync/');
  assert.equal(websocketUrl('https://sync.example.com'), 'wss://sync.example.com/ws/entity-sync/');
  assert.equal(websocketUrl('http://h:1/'), 'ws://h:1/ws/entity-sync/');
  assert.equal(websocketUrl('wss://h/custom/path'), 'wss://h/custom/path');
  assert.equal(websocketUrl('wss://h/custom/path', '/other/'), 'wss://h/other/');
  assert.equal(websocketUrl('ws://h', '/rt'), 'ws://h/rt');
  assert.throws(() => websocketUrl('ftp://h/'), TypeError);
  const { client, socket } = makeClient();
  client.close();
  const custom = new EntitySyncClient('https://node.test', {
    WebSocket: FakeSocket,
    path: '/live/',
  });
  assert.equal(custom.url, 'wss://node.test/live/');
  assert.equal(socket().url, 'wss://node.test/live/');
  custom.close();
});

test('the code lists: node codes and client codes are distinct, and only passing failures are retryable', () => {
  assert.equal(ERROR_CODES.length, 18);
  assert.deepEqual(ERROR_CODES.slice(-2), ['token_invalid', 'token_expired']);
  assert.ok(CLIENT_ERROR_CODES.every((code) => code.startsWith('client_')));
  assert.ok(ERROR_CODES.every((code) => !code.startsWith('client_')));
  assert.deepEqual(ERROR_CODES.filter(isRetryable), [
    'no_resolver',
    'resolver_error',
    'resolver_timeout',
    'token_expired',
  ]);
  assert.deepEqual(CLIENT_ERROR_CODES.filter(isRetryable), ['client_token_unavailable']);
  assert.throws(() => ERROR_CODES.push('x'), TypeError, 'frozen');
});

test('on() adds and removes state and error listeners; a reconnect tells the close code', async () => {
  const { client, socket } = makeClient();
  const seen = [];
  const offState = client.on('state', (state, info) => seen.push([state, info.closeCode ?? null]));
  const errors = [];
  const offError = client.on('error', (error) => errors.push(error.code));
  socket().accept();
  socket().push({ action: 'error', body: { code: 'rate_limited', message: 'slow down' } });
  socket().drop(1001);
  assert.deepEqual(seen, [
    ['open', null],
    ['reconnecting', 1001],
  ]);
  assert.deepEqual(errors, ['rate_limited']);
  offState();
  offError();
  await until(() => FakeSocket.made.length === 2, 'a second socket');
  socket().push({ action: 'error', body: { code: 'rate_limited', message: 'again' } });
  socket().accept();
  assert.equal(seen.length, 2);
  assert.deepEqual(errors, ['rate_limited']);
  client.close();
});

test("a key error reaches that key's onError and the client's error listeners", () => {
  const { client, socket, errors } = makeClient();
  socket().accept();
  const mine = [];
  const other = [];
  client.subscribe('lists', '2', () => {}, { onError: (error) => mine.push(error) });
  client.subscribe('lists', '3', () => {}, { onError: (error) => other.push(error) });
  const body = { code: 'forbidden', message: 'private list', entity: 'lists', id: '2' };
  socket().push({ action: 'error', body });
  assert.deepEqual(mine, [errorOf(body)]);
  assert.deepEqual(other, []);
  assert.deepEqual(errors, [errorOf(body)]);
  assert.equal(mine[0], errors[0], 'one error object for both');
  client.close();
});

test('a store subscribes while it has listeners, starts loading, goes live and fails on forbidden', () => {
  const { client, socket } = makeClient();
  socket().accept();
  const store = client.store('lists', '1');
  assert.deepEqual(store.get(), { status: 'loading', rows: [], version: null, error: null });
  assert.equal(socket().sent.length, 0, 'no listener yet: nothing subscribed');
  const a = [];
  const b = [];
  const offA = store.subscribe((value) => a.push(value));
  const offB = store.subscribe((value) => b.push(value.status));
  assert.deepEqual(socket().frames(), [
    { action: 'subscribe', body: { entity: 'lists', id: '1' } },
  ]);
  const before = store.get();
  assert.equal(store.get(), before, 'the same object until it changes');
  socket().push(subscribed('lists', '1'));
  socket().push(push('lists', '1', 9, [{ name: 'milk' }]));
  assert.notEqual(store.get(), before);
  assert.deepEqual(store.get(), {
    status: 'live',
    rows: [{ name: 'milk' }],
    version: 9,
    error: null,
  });
  const forbidden = { code: 'forbidden', message: 'no', entity: 'lists', id: '1' };
  socket().push({ action: 'error', body: forbidden });
  assert.deepEqual(store.get(), {
    status: 'failed',
    rows: [{ name: 'milk' }],
    version: 9,
    error: errorOf(forbidden),
  });
  assert.ok(store.get().error instanceof EntitySyncError);
  assert.deepEqual(
    a.map((value) => value.status),
    ['loading', 'live', 'failed'],
  );
  assert.deepEqual(b, ['loading', 'live', 'failed']);
  offA();
  assert.equal(socket().frames().length, 1, 'one listener left');
  offB();
  // The node no longer held the key (forbidden), so nothing is unsubscribed.
  assert.equal(
    socket()
      .frames()
      .filter((f) => f.action === 'unsubscribe').length,
    0,
  );
  client.close();
});

test('updates() yields pushes, keeps only the latest while the loop is busy, and ends on break', async () => {
  const { client, socket } = makeClient();
  socket().accept();
  const iterator = client.updates('items', '7');
  socket().push(subscribed('items', '7'));
  socket().push(push('items', '7', 1, [{ qty: 1 }]));
  socket().push(push('items', '7', 2, [{ qty: 2 }]));
  socket().push(push('items', '7', 3, [{ qty: 3 }]));
  const first = await iterator.next();
  assert.deepEqual(first, {
    done: false,
    value: { rows: [{ qty: 3 }], meta: { entity: 'items', id: '7', version: 3, snapshot: false } },
  });
  const waiting = iterator.next();
  socket().push(push('items', '7', 4, [{ qty: 4 }]));
  assert.deepEqual((await waiting).value.rows, [{ qty: 4 }]);
  const seen = [];
  setTimeout(() => socket().push(push('items', '7', 5, [{ qty: 5 }])), 1);
  for await (const { meta } of iterator) {
    seen.push(meta.version);
    break;
  }
  assert.deepEqual(seen, [5]);
  assert.deepEqual(socket().frames().at(-1), {
    action: 'unsubscribe',
    body: { entity: 'items', id: '7' },
  });
  assert.deepEqual(await iterator.next(), { done: true, value: undefined });
  client.close();
});

test('updates() ends when its signal aborts or the client closes', async () => {
  const { client, socket } = makeClient();
  socket().accept();
  const controller = new AbortController();
  const aborted = client.updates('items', '1', { signal: controller.signal });
  const pending = aborted.next();
  controller.abort();
  assert.deepEqual(await pending, { done: true, value: undefined });
  const closed = client.updates('items', '2');
  const waiting = closed.next();
  client.close();
  assert.deepEqual(await waiting, { done: true, value: undefined });
});

test('a listener that throws is reported and does not starve the others', () => {
  const { client, socket, errors } = makeClient();
  socket().accept();
  const seen = [];
  client.subscribe('items', '1', () => {
    throw new Error('render failed');
  });
  client.subscribe('items', '1', (rows) => seen.push(rows));
  socket().push(subscribed('items', '1'));
  socket().push(push('items', '1', 1, [{ id: 1 }]));
  assert.deepEqual(seen, [[{ id: 1 }]]);
  assert.equal(errors.length, 1);
  assert.ok(errors[0] instanceof EntitySyncError);
  assert.deepEqual(errors[0].toJSON(), {
    name: 'EntitySyncError',
    code: 'client_listener_failed',
    message: 'render failed',
    entity: 'items',
    id: '1',
    retryable: false,
  });
  assert.ok(errors[0].cause instanceof Error, "the listener's exception is the cause");
  assert.equal(errors[0].cause.message, 'render failed');
  client.close();
});

test('the secret is never in an error or a state event', async () => {
  const secret = 'never-show-me-42';
  const { client, socket, errors } = makeClient({ secret });
  const infos = [];
  client.on('state', (state, info) => infos.push(JSON.stringify([state, info])));
  socket().accept();
  socket().push('garbage');
  socket().drop();
  await until(() => FakeSocket.made.length === 2, 'a second socket');
  assert.ok(errors.length > 0 && infos.length > 0);
  for (const text of [...errors.map((e) => JSON.stringify(e)), ...infos]) {
    assert.ok(!text.includes(secret), text);
  }
  client.close();
});

// --- connect() / disconnect() / autoConnect ---------------------------------

test('with autoConnect: false nothing connects until connect(); keys registered before are sent then', () => {
  const { client, states } = makeClient({ autoConnect: false, secret: 's' });
  assert.equal(FakeSocket.made.length, 0);
  assert.equal(client.state, 'disconnected');
  const seen = [];
  client.subscribe('items', '1', (rows) => seen.push(rows));
  assert.equal(client.send({ type: 'typing' }), false);

  assert.equal(client.connect(), client, 'connect() returns the client');
  assert.equal(client.connect(), client);
  assert.equal(FakeSocket.made.length, 1, 'a second connect() is a no-op');
  assert.equal(client.state, 'connecting');
  const socket = FakeSocket.made[0];
  socket.accept();
  assert.deepEqual(socket.frames(), [
    { action: 'secret', body: 's' },
    { action: 'subscribe', body: { entity: 'items', id: '1' } },
  ]);
  socket.push(subscribed('items', '1'));
  socket.push(push('items', '1', 3, [{ id: 1 }]));
  assert.deepEqual(seen, [[{ id: 1 }]]);
  assert.deepEqual(states, ['connecting', 'open']);
  client.close();
});

test('disconnect() closes the socket, stops reconnecting and keeps the keys; connect() resubscribes them', async () => {
  const { client, socket, states } = makeClient({ secret: 's' });
  const first = socket();
  first.accept();
  const seen = [];
  client.subscribe('lists', '1', (rows, meta) => seen.push([meta.version, meta.snapshot, rows]));
  const offItem = client.subscribe('items', '9', () => {});
  first.push(subscribed('lists', '1'));
  first.push(subscribed('items', '9'));
  first.push(push('lists', '1', 40, [{ name: 'before' }]));

  assert.equal(client.disconnect(), client, 'disconnect() returns the client');
  assert.deepEqual(first.closedByClient, { code: 1000, reason: 'client disconnected' });
  assert.equal(client.state, 'disconnected');
  client.disconnect(); // idempotent: no second state event
  assert.deepEqual(states, ['connecting', 'open', 'disconnected']);
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.equal(FakeSocket.made.length, 1, 'no reconnect after disconnect()');
  // Events of the old socket no longer count.
  first.push(push('lists', '1', 99, [{ name: 'ghost' }]));
  assert.equal(seen.length, 1);
  // The rows held are kept; keys change while disconnected, locally.
  assert.deepEqual(client.current('lists', '1'), { rows: [{ name: 'before' }], version: 40 });
  assert.equal(client.send({ type: 'typing' }), false);
  offItem();
  client.subscribe('orders', '2', () => {});
  client.setSecret('s2');

  client.connect();
  const second = socket();
  assert.notEqual(second, first);
  second.accept();
  assert.deepEqual(second.frames(), [
    { action: 'secret', body: 's2' },
    // No version: the rows held were resolved for the previous secret.
    { action: 'subscribe', body: { entity: 'lists', id: '1' } },
    { action: 'subscribe', body: { entity: 'orders', id: '2' } },
  ]);
  // The fresh snapshot is taken even with a lower version (a restarted bus).
  second.push(subscribed('lists', '1'));
  second.push(push('lists', '1', 3, [{ name: 'latest' }]));
  assert.deepEqual(seen, [
    [40, true, [{ name: 'before' }]],
    [3, true, [{ name: 'latest' }]],
  ]);
  assert.deepEqual(states, ['connecting', 'open', 'disconnected', 'connecting', 'open']);
  client.close();
});

test('disconnect() while reconnecting cancels the reconnect; connect() starts again from the first delay', async () => {
  const infos = [];
  const { client, socket } = makeClient({
    minDelayMs: 20,
    maxDelayMs: 80,
    onState: (state, info) => state === 'reconnecting' && infos.push(info),
  });
  socket().drop(1006);
  assert.equal(client.state, 'reconnecting');
  client.disconnect();
  assert.equal(client.state, 'disconnected');
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.equal(FakeSocket.made.length, 1, 'the scheduled reconnect was cancelled');

  client.connect();
  assert.equal(FakeSocket.made.length, 2);
  socket().drop(1006);
  assert.deepEqual(
    infos.map((info) => info.attempt),
    [1, 1],
    'the backoff starts over after connect()',
  );
  client.close();
  await new Promise((resolve) => setTimeout(resolve, 40));
  assert.equal(FakeSocket.made.length, 2);
});

test('disconnect() cancels the retry of a refused key: a connect() after it subscribes it once', async () => {
  const { client, socket } = makeClient({ minDelayMs: 40, maxDelayMs: 40 });
  socket().accept();
  client.subscribe('items', '5', () => {});
  socket().push({
    action: 'error',
    body: { code: 'no_resolver', message: 'none yet', entity: 'items', id: '5' },
  });
  client.disconnect();
  client.connect();
  socket().accept();
  await new Promise((resolve) => setTimeout(resolve, 80));
  assert.deepEqual(socket().frames(), [
    { action: 'subscribe', body: { entity: 'items', id: '5' } },
  ]);
  client.close();
});

test('disconnect() keeps updates() iterating; close() is final and connect() after it throws', async () => {
  const { client, socket, states } = makeClient();
  socket().accept();
  const iterator = client.updates('items', '7');
  socket().push(subscribed('items', '7'));
  socket().push(push('items', '7', 1, [{ qty: 1 }]));
  assert.equal((await iterator.next()).value.meta.version, 1);
  client.disconnect();
  const waiting = iterator.next();
  client.connect();
  socket().accept();
  socket().push(subscribed('items', '7'));
  socket().push(push('items', '7', 2, [{ qty: 2 }]));
  assert.deepEqual((await waiting).value.rows, [{ qty: 2 }]);

  client.disconnect();
  client.close();
  assert.equal(client.state, 'closed');
  assert.deepEqual(await iterator.next(), { done: true, value: undefined });
  assert.throws(() => client.connect(), /close\(\) is final/);
  client.close();
  client.disconnect();
  assert.deepEqual(states.slice(-2), ['disconnected', 'closed']);
});

// --- on() / once() / off() ----------------------------------------------------

test('once() listens to one emission; off() stops on() and once() listeners', async () => {
  const { client, socket } = makeClient({ onState: undefined, onError: undefined });
  const onceStates = [];
  const allStates = [];
  client.once('state', (state) => onceStates.push(state));
  const stopAll = client.on('state', (state) => allStates.push(state));
  const errorsSeen = [];
  const onError = (error) => errorsSeen.push(error.code);
  client.once('error', onError);
  client.off('error', onError); // stopped before it fired
  const stopOnce = client.once('error', (error) => errorsSeen.push(`stopped ${error.code}`));
  stopOnce();

  socket().accept();
  socket().push({ action: 'error', body: { code: 'rate_limited', message: 'slow down' } });
  socket().drop(1006);
  assert.deepEqual(onceStates, ['open']);
  assert.deepEqual(allStates, ['open', 'reconnecting']);
  assert.deepEqual(errorsSeen, []);

  assert.equal(
    client.off('state', () => {}),
    client,
    'off() returns the client',
  );
  stopAll();
  await until(() => FakeSocket.made.length === 2, 'a second socket');
  assert.deepEqual(allStates, ['open', 'reconnecting']);

  // on() after once() with the same function makes it a lasting listener.
  const both = [];
  const listener = (error) => both.push(error.code);
  client.once('error', listener);
  client.on('error', listener);
  client.on('error', listener); // registered once per event
  socket().accept();
  socket().push({ action: 'error', body: { code: 'rate_limited', message: 'a' } });
  socket().push({ action: 'error', body: { code: 'overloaded', message: 'b' } });
  assert.deepEqual(both, ['rate_limited', 'overloaded']);
  // off(event) without a listener stops every listener of the event.
  client.off('error');
  socket().push({ action: 'error', body: { code: 'rate_limited', message: 'c' } });
  assert.deepEqual(both, ['rate_limited', 'overloaded']);
  client.close();
});

test('a listener stopped by another during one emission is not called; a throwing state listener is reported', () => {
  const { client, socket, errors } = makeClient();
  const calls = [];
  const second = () => calls.push('second');
  client.on('state', () => {
    calls.push('first');
    client.off('state', second);
  });
  client.on('state', second);
  client.on('state', () => {
    throw new Error('state view failed');
  });
  socket().accept();
  assert.deepEqual(calls, ['first']);
  assert.equal(errors.length, 1);
  assert.ok(errors[0] instanceof EntitySyncError);
  assert.equal(errors[0].code, 'client_listener_failed');
  assert.equal(errors[0].message, 'state view failed');
  assert.equal('entity' in errors[0], false);
  client.close();
});

test('an unknown event name is a TypeError (for callers in plain JavaScript)', () => {
  const { client } = makeClient();
  assert.throws(() => client.on('message', () => {}), TypeError);
  assert.throws(() => client.once('open', () => {}), TypeError);
  assert.throws(() => client.off('close'), TypeError);
  client.close();
});

// --- EntitySyncError -------------------------------------------------------------

test('EntitySyncError is an Error: instanceof, name, code, key, retryable, cause and JSON', () => {
  const keyed = new EntitySyncError('resolver_timeout', 'slow backend', {
    entity: 'items',
    id: '3',
  });
  assert.ok(keyed instanceof EntitySyncError);
  assert.ok(keyed instanceof Error);
  assert.equal(keyed.name, 'EntitySyncError');
  assert.equal(String(keyed), 'EntitySyncError: slow backend');
  assert.match(keyed.stack, /^EntitySyncError: slow backend\n/);
  assert.equal(keyed.code, 'resolver_timeout');
  assert.equal(keyed.entity, 'items');
  assert.equal(keyed.id, '3');
  assert.equal(keyed.retryable, true);
  assert.deepEqual(Object.keys(keyed), ['code', 'entity', 'id', 'retryable']);
  assert.equal(
    JSON.stringify(keyed),
    '{"name":"EntitySyncError","code":"resolver_timeout","message":"slow backend","entity":"items","id":"3","retryable":true}',
  );

  const cause = new TypeError('bad URL');
  const keyless = new EntitySyncError('client_connect_failed', 'bad URL', { cause });
  assert.equal('entity' in keyless, false);
  assert.equal('id' in keyless, false);
  assert.equal(keyless.retryable, false);
  assert.equal(keyless.cause, cause);
  assert.deepEqual(keyless.toJSON(), {
    name: 'EntitySyncError',
    code: 'client_connect_failed',
    message: 'bad URL',
    retryable: false,
  });
});

test('every error the client emits is an EntitySyncError: frames, invalid frames, a failed connect', () => {
  class Refusing {
    constructor() {
      throw new TypeError('refused');
    }
  }
  const seen = [];
  const refused = new EntitySyncClient('ws://node.test/', {
    WebSocket: Refusing,
    minDelayMs: 1000,
    onError: (error) => seen.push(error),
  });
  refused.close();
  const { client, socket, errors } = makeClient();
  socket().accept();
  socket().push('not json');
  socket().push({ action: 'error', body: { code: 'invalid_body', message: 'no' } });
  client.close();
  const all = [...seen, ...errors];
  assert.deepEqual(
    all.map((error) => error.code),
    ['client_connect_failed', 'client_invalid_frame', 'invalid_body'],
  );
  assert.ok(all.every((error) => error instanceof EntitySyncError));
  assert.ok(seen[0].cause instanceof TypeError);
});

const current = (entity, id) => ({ action: 'subscribed', body: { entity, id, current: true } });

/** A client holding lists/1 at v41 (snapshot v40, then a change) and items/2 with no rows yet. */
async function heldThenDropped(options = {}) {
  const made = makeClient({ secret: 's', ...options });
  const first = made.socket();
  first.accept();
  const seen = [];
  const resumed = [];
  made.client.subscribe(
    'lists',
    '1',
    (rows, meta) => seen.push([meta.version, meta.snapshot, rows[0].name]),
    { onResumed: (meta) => resumed.push(meta) },
  );
  made.client.subscribe('items', '2', () => {});
  first.push(subscribed('lists', '1'));
  first.push(push('lists', '1', 40, [{ name: 'before' }]));
  first.push(push('lists', '1', 41, [{ name: 'changed' }]));
  first.push(subscribed('items', '2'));
  first.drop(1006);
  // Added while away: it never had rows.
  made.client.subscribe('orders', '3', () => {});
  await until(() => FakeSocket.made.length === 2, 'a second socket');
  const second = made.socket();
  second.accept();
  return { ...made, first, second, seen, resumed };
}

test('a resubscribe after a reconnect carries the version held; keys without rows carry none', async () => {
  const { client, second } = await heldThenDropped();
  assert.deepEqual(second.sent, [
    '{"action":"secret","body":"s"}',
    '{"action":"subscribe","body":{"entity":"lists","id":"1","version":41}}',
    '{"action":"subscribe","body":{"entity":"items","id":"2"}}',
    '{"action":"subscribe","body":{"entity":"orders","id":"3"}}',
  ]);
  client.close();
});

test('with resume: false a resubscribe carries no version', async () => {
  const { client, second } = await heldThenDropped({ resume: false });
  assert.deepEqual(second.frames().slice(1), [
    { action: 'subscribe', body: { entity: 'lists', id: '1' } },
    { action: 'subscribe', body: { entity: 'items', id: '2' } },
    { action: 'subscribe', body: { entity: 'orders', id: '3' } },
  ]);
  client.close();
});

test('current: true keeps the rows and version held, calls no rows listener, and the next change is applied', async () => {
  const { client, second, seen, resumed, errors } = await heldThenDropped();
  const store = client.store('lists', '1');
  const values = [];
  store.subscribe((value) => values.push(value));
  await until(() => values.length === 2, 'the store to take the rows held');
  const live = store.get();
  assert.equal(live.status, 'live');
  const iterator = client.updates('lists', '1');
  assert.deepEqual((await iterator.next()).value.rows, [{ name: 'changed' }], 'rows held first');
  let yielded = null;
  const next = iterator.next().then((result) => {
    yielded = result;
  });
  const before = seen.length;

  second.push(current('lists', '1'));
  assert.deepEqual(resumed, [{ entity: 'lists', id: '1', version: 41 }]);
  assert.equal(seen.length, before, 'no rows listener is called');
  assert.deepEqual(client.current('lists', '1'), { rows: [{ name: 'changed' }], version: 41 });
  await new Promise((resolve) => setTimeout(resolve, 5));
  assert.equal(store.get(), live, 'the store keeps the same value: no update');
  assert.equal(values.length, 2);
  assert.equal(yielded, null, 'updates() yields nothing');

  // No snapshot is waited for: a push older than the rows held is stale...
  second.push(push('lists', '1', 39, [{ name: 'stale' }]));
  // ...and the next change is a change.
  second.push(push('lists', '1', 42, [{ name: 'next' }]));
  await next;
  assert.deepEqual(yielded.value.meta, { entity: 'lists', id: '1', version: 42, snapshot: false });
  assert.deepEqual(seen.slice(before), [[42, false, 'next']]);
  assert.deepEqual(store.get().rows, [{ name: 'next' }]);
  assert.deepEqual(errors, []);
  // The version resumed from follows the rows applied.
  second.drop(1006);
  await until(() => FakeSocket.made.length === 3, 'a third socket');
  FakeSocket.made[2].accept();
  assert.deepEqual(FakeSocket.made[2].frames()[1], {
    action: 'subscribe',
    body: { entity: 'lists', id: '1', version: 42 },
  });
  await iterator.return();
  client.close();
});

test('a failed key goes live again when its retry is answered current: true', async () => {
  const { client, second, seen } = await heldThenDropped();
  const store = client.store('lists', '1');
  store.subscribe(() => {});
  await until(() => store.get().status === 'live', 'the store to take the rows held');
  second.push({
    action: 'error',
    body: { code: 'resolver_error', message: 'db down', entity: 'lists', id: '1' },
  });
  assert.equal(store.get().status, 'failed');
  await until(() => second.sent.length === 5, 'the retry');
  assert.deepEqual(second.frames()[4], {
    action: 'subscribe',
    body: { entity: 'lists', id: '1', version: 41 },
  });
  const before = seen.length;
  second.push(current('lists', '1'));
  assert.deepEqual(store.get(), {
    status: 'live',
    rows: [{ name: 'changed' }],
    version: 41,
    error: null,
  });
  assert.equal(seen.length, before);
  client.close();
});

test('rows that may be resolved for an earlier secret are not resumed from', async () => {
  const { client, socket } = makeClient({ secret: 's1' });
  socket().accept();
  client.subscribe('lists', '1', () => {});
  client.subscribe('lists', '2', () => {});
  for (const id of ['1', '2']) {
    socket().push(subscribed('lists', id));
    socket().push(push('lists', id, 10, [{ id }]));
  }
  client.setSecret('s2');
  // lists/1: a change resolved before the node read the new secret, then the re-check.
  socket().push(push('lists', '1', 11, [{ old: true }]));
  socket().push(subscribed('lists', '1'));
  socket().push(push('lists', '1', 12, [{ fresh: true }]));
  // lists/2: a change crosses the secret; the re-check has not answered yet.
  socket().push(push('lists', '2', 11, [{ old: true }]));
  socket().drop(1006);
  await until(() => FakeSocket.made.length === 2, 'a second socket');
  socket().accept();
  assert.deepEqual(socket().frames(), [
    { action: 'secret', body: 's2' },
    { action: 'subscribe', body: { entity: 'lists', id: '1', version: 12 } },
    { action: 'subscribe', body: { entity: 'lists', id: '2' } },
  ]);
  // The same secret again re-checks nothing: versions are still resumed from.
  socket().push(subscribed('lists', '2'));
  socket().push(push('lists', '2', 13, [{ fresh: true }]));
  client.setSecret('s2');
  socket().push(push('lists', '2', 14, [{ fresh: true }]));
  socket().drop(1006);
  await until(() => FakeSocket.made.length === 3, 'a third socket');
  socket().accept();
  assert.deepEqual(socket().frames().slice(1), [
    { action: 'subscribe', body: { entity: 'lists', id: '1', version: 12 } },
    { action: 'subscribe', body: { entity: 'lists', id: '2', version: 14 } },
  ]);
  client.close();
});
