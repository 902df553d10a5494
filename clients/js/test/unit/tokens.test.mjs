// Subscribe tokens, the heartbeat and the browser's network events, against a
// fake WebSocket whose "server" side each test drives by hand. The same
// against the real node: test/node/tokens.test.mjs.

import { afterEach, test } from 'node:test';
import assert from 'node:assert/strict';

import {
  EntitySyncClient,
  EntitySyncError,
  MIN_TOKEN_REFRESH_MS,
  decodeTokenClaims,
  encodePing,
  encodeSubscribe,
  tokenLifetime,
  tokenRefreshDelay,
} from '../../dist/entity-sync.js';

class FakeSocket {
  static made = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
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
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }

  accept() {
    this.readyState = 1;
    this.onopen?.({});
  }

  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code });
  }

  frames() {
    return this.sent.map((text) => JSON.parse(text));
  }
}

const made = [];
afterEach(() => {
  for (const client of made.splice(0)) client.close();
  delete globalThis.window;
  delete globalThis.document;
});

function makeClient(options = {}) {
  FakeSocket.made = [];
  const errors = [];
  const states = [];
  const client = new EntitySyncClient('ws://node.test/ws/entity-sync/', {
    WebSocket: FakeSocket,
    minDelayMs: 2,
    maxDelayMs: 8,
    random: () => 0.5,
    heartbeatIntervalMs: 0,
    onError: (err) => errors.push(err),
    onState: (state, info) => states.push([state, info]),
    ...options,
  });
  made.push(client);
  return { client, errors, states, socket: () => FakeSocket.made.at(-1) };
}

async function until(predicate, what, ms = 2000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const b64url = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
/** An unsigned token of the JWS shape (the client verifies nothing). */
const token = (claims) => `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}.c2ln`;
const nowS = () => Date.now() / 1000;

const subscribed = (entity, id, current = false) => ({
  action: 'subscribed',
  body: current ? { entity, id, current: true } : { entity, id },
});
const push = (entity, id, version, rows) => ({
  action: 'push',
  body: { entity, id, version, rows },
});
const subscribes = (socket) => socket.frames().filter((f) => f.action === 'subscribe');

/** A getToken that records its calls and answers from `answers` (functions or values), then `fallback`. */
function tokenSource(fallback = () => token({ exp: Math.floor(nowS()) + 3600 })) {
  const source = {
    calls: [],
    answers: [],
    getToken: (entity, id) => {
      source.calls.push({ entity, id, at: Date.now() });
      const answer = source.answers.shift() ?? fallback;
      return typeof answer === 'function' ? answer() : answer;
    },
  };
  return source;
}

test('decodeTokenClaims reads exp and iat from a base64url JSON payload and nothing else', () => {
  assert.deepEqual(decodeTokenClaims(token({ exp: 2000000000, iat: 1999999000, sub: 'u' })), {
    exp: 2000000000,
    iat: 1999999000,
  });
  // Unpadded base64url with `-` and `_` (these bytes encode to both), UTF-8 text.
  const payload = Buffer.from(JSON.stringify({ exp: 1700000000, name: 'Zoë ~~~>>>???' })).toString(
    'base64url',
  );
  assert.match(payload, /[-_]/);
  assert.doesNotMatch(payload, /=/);
  assert.deepEqual(decodeTokenClaims(`h.${payload}.s`), { exp: 1700000000 });
  assert.deepEqual(decodeTokenClaims(token({ exp: '2000000000' })), {});
  assert.deepEqual(decodeTokenClaims(token({})), {});
  assert.equal(decodeTokenClaims('not-a-token'), null);
  assert.equal(decodeTokenClaims('a.b'), null);
  assert.equal(decodeTokenClaims('a.b.c.d'), null);
  assert.equal(decodeTokenClaims(`h.${Buffer.from('[1]').toString('base64url')}.s`), null);
  assert.equal(decodeTokenClaims(`h.${Buffer.from('{oops').toString('base64url')}.s`), null);
  assert.equal(decodeTokenClaims('h.a+b/.s'), null, 'standard base64 is not base64url');
  assert.equal(decodeTokenClaims(`h.${Buffer.from([0xff, 0xfe]).toString('base64url')}.s`), null);
});

test('tokenLifetime: exp by the local clock, or exp - iat when that is shorter; null without exp', () => {
  const now = 1_700_000_000_000;
  assert.equal(tokenLifetime(token({ exp: 1_700_000_060 }), now), 60_000);
  // A client clock 10 s behind the issuer's: the whole lifetime (exp - iat) is shorter.
  assert.equal(tokenLifetime(token({ exp: 1_700_000_070, iat: 1_700_000_010 }), now), 60_000);
  // A token issued long ago: what is left by the clock is shorter.
  assert.equal(tokenLifetime(token({ exp: 1_700_000_030, iat: 1_699_990_000 }), now), 30_000);
  assert.equal(tokenLifetime(token({ exp: 1_699_999_990 }), now), -10_000);
  assert.equal(tokenLifetime(token({ sub: 'x' }), now), null);
  assert.equal(tokenLifetime('garbage', now), null);
});

test('tokenRefreshDelay: 80% of the lifetime or 30 s before expiry, whichever is earlier, never before half of it', () => {
  assert.equal(tokenRefreshDelay(3_600_000), 2_880_000, '1 h: at 80%');
  assert.equal(tokenRefreshDelay(120_000), 90_000, '2 min: 30 s before');
  assert.equal(tokenRefreshDelay(100_000), 70_000, '100 s: 30 s before');
  assert.equal(tokenRefreshDelay(60_000), 30_000, '60 s: at half');
  assert.equal(tokenRefreshDelay(3_000), 1_500, '3 s: at half');
  assert.equal(MIN_TOKEN_REFRESH_MS, 1000);
  assert.equal(tokenRefreshDelay(1_000), 1_000, 'never sooner than MIN_TOKEN_REFRESH_MS');
  assert.equal(tokenRefreshDelay(-5_000), 1_000, 'an expired token: MIN_TOKEN_REFRESH_MS');
});

test('subscribe and ping frames are encoded exactly', () => {
  assert.equal(
    encodeSubscribe('items', 100, 7, 'a.b.c'),
    '{"action":"subscribe","body":{"entity":"items","id":"100","version":7,"token":"a.b.c"}}',
  );
  assert.equal(
    encodeSubscribe('items', '100', null, 'a.b.c'),
    '{"action":"subscribe","body":{"entity":"items","id":"100","token":"a.b.c"}}',
  );
  assert.equal(encodePing(), '{"action":"ping"}');
});

test("every subscribe carries getToken's token; a reconnect reuses a fresh one with the version held", async () => {
  const source = tokenSource();
  const t1 = token({ exp: Math.floor(nowS()) + 3600 });
  source.answers.push(t1);
  const { client, socket, errors } = makeClient({ getToken: source.getToken });
  const rows = [];
  client.subscribe('items', 100, (r, meta) => rows.push([r, meta.version]));
  socket().accept();
  await until(() => subscribes(socket()).length === 1, 'the subscribe');
  assert.deepEqual(
    source.calls.map(({ entity, id }) => [entity, id]),
    [['items', '100']],
  );
  assert.deepEqual(socket().sent, [
    '{"action":"subscribe","body":{"entity":"items","id":"100","token":"' + t1 + '"}}',
  ]);
  socket().push(subscribed('items', '100'));
  socket().push(push('items', '100', 5, [{ id: 1 }]));
  assert.deepEqual(rows, [[[{ id: 1 }], 5]]);

  socket().drop();
  await until(() => FakeSocket.made.length === 2, 'the reconnect');
  socket().accept();
  await until(() => subscribes(socket()).length === 1, 'the resubscribe');
  assert.deepEqual(subscribes(socket()), [
    { action: 'subscribe', body: { entity: 'items', id: '100', version: 5, token: t1 } },
  ]);
  assert.equal(source.calls.length, 1, 'a token far from its expiry is used again');
  assert.deepEqual(errors, []);
});

test('single flight: a burst of subscribes and reconnects while getToken is under way makes one call and one subscribe', async () => {
  let release;
  const t1 = token({ exp: Math.floor(nowS()) + 3600 });
  const source = tokenSource();
  source.answers.push(
    () =>
      new Promise((resolve) => {
        release = () => resolve(t1);
      }),
  );
  const { client, socket } = makeClient({ getToken: source.getToken });
  client.subscribe('items', 1, () => {});
  client.subscribe('items', '1', () => {});
  socket().accept();
  socket().drop();
  await until(() => FakeSocket.made.length === 2, 'reconnect 1');
  socket().accept();
  socket().drop();
  await until(() => FakeSocket.made.length === 3, 'reconnect 2');
  socket().accept();
  assert.equal(source.calls.length, 1);
  release();
  await until(() => subscribes(socket()).length === 1, 'the subscribe');
  await sleep(20);
  assert.equal(source.calls.length, 1);
  assert.deepEqual(
    FakeSocket.made.map((s) => subscribes(s).length),
    [0, 0, 1],
  );
  assert.deepEqual(subscribes(socket())[0].body, { entity: 'items', id: '1', token: t1 });
});

test('a key unsubscribed while its token is being fetched sends nothing at all', async () => {
  let release;
  const source = tokenSource();
  source.answers.push(() => new Promise((resolve) => (release = resolve)));
  const { client, socket, errors } = makeClient({ getToken: source.getToken });
  socket().accept();
  const off = client.subscribe('items', 1, () => {});
  off();
  release(token({ exp: Math.floor(nowS()) + 60 }));
  await sleep(10);
  assert.deepEqual(socket().sent, []);
  assert.deepEqual(errors, []);
});

test('the token is refreshed ahead of its expiry with the version held: no rows callback, no onResumed, no state change, no error', async () => {
  const source = tokenSource(() => token({ exp: Math.floor(nowS()) + 2 }));
  const { client, socket, errors, states } = makeClient({ getToken: source.getToken });
  const rows = [];
  const resumed = [];
  client.subscribe('items', 7, (r, meta) => rows.push(meta.version), {
    onResumed: (meta) => resumed.push(meta),
  });
  socket().accept();
  await until(() => subscribes(socket()).length === 1, 'the subscribe');
  const first = subscribes(socket())[0].body.token;
  const lifetime = tokenLifetime(first);
  const expiresAt = Date.now() + lifetime;
  socket().push(subscribed('items', '7'));
  socket().push(push('items', '7', 3, [{ v: 3 }]));
  const statesBefore = states.length;

  // exp is whole seconds: a lifetime between 1 and 2 s; refreshed at half, 1 s at least.
  const due = Date.now() + tokenRefreshDelay(lifetime);
  await until(() => subscribes(socket()).length === 2, 'the refresh', 3000);
  assert.ok(Date.now() >= due - 5, 'not before the refresh is due');
  assert.ok(Date.now() < expiresAt, 'before the expiry');
  const refresh = subscribes(socket())[1];
  assert.deepEqual(Object.keys(refresh.body), ['entity', 'id', 'version', 'token']);
  assert.equal(refresh.body.version, 3);
  assert.equal(source.calls.length, 2);
  socket().push(subscribed('items', '7', true));
  socket().push(push('items', '7', 4, [{ v: 4 }]));
  assert.deepEqual(rows, [3, 4]);
  assert.deepEqual(resumed, []);
  assert.equal(states.length, statesBefore);
  assert.deepEqual(errors, []);
});

test('getToken failing is reported as client_token_unavailable and called again after a jittered, capped backoff', async () => {
  const source = tokenSource();
  source.answers.push(
    () => Promise.reject(new Error('auth server down')),
    () => {
      throw new Error('still down');
    },
    () => 42,
  );
  const keyErrors = [];
  const { client, socket, errors } = makeClient({
    getToken: source.getToken,
    minDelayMs: 40,
    maxDelayMs: 80,
  });
  client.subscribe('items', 9, () => {}, { onError: (e) => keyErrors.push(e) });
  socket().accept();
  await until(() => subscribes(socket()).length === 1, 'the subscribe after three failures');
  assert.equal(source.calls.length, 4);
  // random 0.5: 40 → 30 ms, 80 → 60 ms, then capped at 80 → 60 ms.
  const gaps = source.calls.slice(1).map((c, i) => c.at - source.calls[i].at);
  assert.ok(gaps[0] >= 29 && gaps[1] >= 59 && gaps[2] >= 59, `gaps ${gaps}`);
  assert.deepEqual(
    errors.map((e) => [e.code, e.entity, e.id, e.retryable]),
    [
      ['client_token_unavailable', 'items', '9', true],
      ['client_token_unavailable', 'items', '9', true],
      ['client_token_unavailable', 'items', '9', true],
    ],
  );
  assert.ok(errors.every((e) => e instanceof EntitySyncError));
  assert.match(errors[0].message, /auth server down/);
  assert.match(errors[2].message, /getToken gave number/);
  assert.deepEqual(keyErrors, errors);
  assert.equal(subscribes(socket()).length, 1);
});

test('token_expired for a held key: a fresh token and a resubscribe with the version held at once, then backoff if it comes again', async () => {
  const source = tokenSource();
  const { client, socket, errors } = makeClient({
    getToken: source.getToken,
    minDelayMs: 60,
    maxDelayMs: 60,
  });
  const rows = [];
  client.subscribe('items', 5, (r, meta) => rows.push(meta.version));
  socket().accept();
  await until(() => subscribes(socket()).length === 1, 'the subscribe');
  socket().push(subscribed('items', '5'));
  socket().push(push('items', '5', 11, []));

  const expired = {
    action: 'error',
    body: { code: 'token_expired', message: 'expired', entity: 'items', id: '5' },
  };
  socket().push(expired);
  await until(() => subscribes(socket()).length === 2, 'the resubscribe');
  assert.equal(source.calls.length, 2, 'the token held is not used again');
  assert.deepEqual(subscribes(socket())[1].body, {
    entity: 'items',
    id: '5',
    version: 11,
    token: subscribes(socket())[1].body.token,
  });
  assert.deepEqual(
    errors.map((e) => [e.code, e.retryable]),
    [['token_expired', true]],
  );

  // Again, before the key was subscribed: not at once.
  const again = Date.now();
  socket().push(expired);
  await sleep(15);
  assert.equal(subscribes(socket()).length, 2);
  await until(() => subscribes(socket()).length === 3, 'the retry after its backoff');
  assert.ok(Date.now() - again >= 40);
  socket().push(subscribed('items', '5', true));
  assert.deepEqual(rows, [11]);
});

test('token_invalid: reported to the key, one retry with a fresh token, then no more', async () => {
  const source = tokenSource();
  const { client, socket, errors } = makeClient({ getToken: source.getToken });
  const keyErrors = [];
  const store = client.store('items', 3);
  const values = [];
  store.subscribe((v) => values.push(v.status));
  client.subscribe('items', 3, () => {}, { onError: (e) => keyErrors.push(e.code) });
  socket().accept();
  await until(() => subscribes(socket()).length === 1, 'the subscribe');
  const invalid = {
    action: 'error',
    body: { code: 'token_invalid', message: 'bad signature', entity: 'items', id: '3' },
  };
  socket().push(invalid);
  await until(() => subscribes(socket()).length === 2, 'the one retry');
  socket().push(invalid);
  await sleep(40);
  assert.equal(subscribes(socket()).length, 2);
  assert.equal(source.calls.length, 2);
  assert.deepEqual(keyErrors, ['token_invalid', 'token_invalid']);
  assert.deepEqual(
    errors.map((e) => [e.code, e.retryable]),
    [
      ['token_invalid', false],
      ['token_invalid', false],
    ],
  );
  assert.equal(store.get().status, 'failed');
  assert.equal(store.get().error.code, 'token_invalid');
});

test('heartbeat: a ping after the interval of quiet; an answer keeps the connection, silence past the timeout reconnects and resumes', async () => {
  const { client, socket, states, errors } = makeClient({
    heartbeatIntervalMs: 40,
    heartbeatTimeoutMs: 40,
  });
  client.subscribe('items', 1, () => {});
  const opened = Date.now();
  socket().accept();
  socket().push(subscribed('items', '1'));
  socket().push(push('items', '1', 8, []));
  const pings = () => socket().sent.filter((t) => t === '{"action":"ping"}');
  await until(() => pings().length === 1, 'the first ping');
  assert.ok(Date.now() - opened >= 38, 'not before the interval');
  socket().push({ action: 'pong' });
  await until(() => pings().length === 2, 'the second ping');
  assert.equal(FakeSocket.made.length, 1, 'answered: the same connection');
  const pinged = Date.now();
  // No answer now.
  await until(() => FakeSocket.made.length === 2, 'the reconnect');
  const detected = Date.now() - pinged;
  assert.ok(detected >= 38 && detected < 500, `detected after ${detected} ms`);
  assert.deepEqual(FakeSocket.made[0].closedByClient, { code: 4000, reason: 'heartbeat timeout' });
  const reconnecting = states.find(([s]) => s === 'reconnecting');
  assert.equal(reconnecting[1].heartbeatTimeout, true);
  socket().accept();
  assert.deepEqual(subscribes(socket()), [
    { action: 'subscribe', body: { entity: 'items', id: '1', version: 8 } },
  ]);
  assert.deepEqual(errors, [], 'pong is handled silently');
});

test('heartbeat: frames keep the connection quiet of pings; 0 disables it', async () => {
  const { client, socket } = makeClient({ heartbeatIntervalMs: 40, heartbeatTimeoutMs: 40 });
  socket().accept();
  for (let i = 0; i < 6; i += 1) {
    await sleep(15);
    socket().push({ action: 'unsubscribed', body: { entity: 'x', id: String(i) } });
  }
  assert.deepEqual(socket().sent, [], 'a frame every 15 ms: no ping');
  await until(() => socket().sent.length === 1, 'the ping once frames stop');
  client.close();

  const off = makeClient({ heartbeatIntervalMs: 0, heartbeatTimeoutMs: 0 });
  off.socket().accept();
  await sleep(100);
  assert.deepEqual(off.socket().sent, []);
  assert.equal(FakeSocket.made.length, 1);
});

test('browser events: online reconnects at once, visible again pings, offline pings; none after close()', async () => {
  const win = new EventTarget();
  const doc = new EventTarget();
  doc.visibilityState = 'hidden';
  globalThis.window = win;
  globalThis.document = doc;
  const { client, socket, states } = makeClient({
    heartbeatIntervalMs: 60_000,
    heartbeatTimeoutMs: 60_000,
    minDelayMs: 60_000,
    maxDelayMs: 60_000,
  });
  socket().accept();
  doc.dispatchEvent(new Event('visibilitychange'));
  assert.deepEqual(socket().sent, [], 'hidden: nothing');
  doc.visibilityState = 'visible';
  doc.dispatchEvent(new Event('visibilitychange'));
  assert.deepEqual(socket().sent, ['{"action":"ping"}']);
  doc.dispatchEvent(new Event('visibilitychange'));
  assert.equal(socket().sent.length, 1, 'one ping waits for its answer at a time');
  socket().push({ action: 'pong' });
  win.dispatchEvent(new Event('offline'));
  assert.deepEqual(socket().sent, ['{"action":"ping"}', '{"action":"ping"}']);

  socket().drop();
  assert.equal(client.state, 'reconnecting');
  assert.ok(states.at(-1)[1].delayMs >= 30_000);
  win.dispatchEvent(new Event('online'));
  assert.equal(FakeSocket.made.length, 2, 'online: no backoff wait');
  assert.equal(client.state, 'connecting');

  client.close();
  win.dispatchEvent(new Event('online'));
  doc.dispatchEvent(new Event('visibilitychange'));
  assert.equal(FakeSocket.made.length, 2);
  assert.deepEqual(FakeSocket.made[1].sent, []);
});

test('the refresh happens even when its timer fires before the wall clock reaches the time it is due', async () => {
  const source = tokenSource(() => token({ exp: Math.floor(nowS()) + 2 }));
  const { client, socket } = makeClient({ getToken: source.getToken });
  client.subscribe('items', 8, () => {});
  socket().accept();
  await until(() => subscribes(socket()).length === 1, 'the subscribe');
  socket().push(subscribed('items', '8'));
  socket().push(push('items', '8', 1, []));
  // The wall clock now lags the timers' clock by 50 ms.
  const realNow = Date.now;
  Date.now = () => realNow() - 50;
  try {
    await until(() => subscribes(socket()).length === 2, 'the refresh', 3000);
  } finally {
    Date.now = realNow;
  }
  assert.equal(subscribes(socket())[1].body.version, 1);
});
