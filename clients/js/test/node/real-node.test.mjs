// The client against the real node binary (embedded bus) and a real backend
// (the testkit's resolver on entity-sync-backend), over real sockets on
// 127.0.0.1. Run `cargo build -p entity-sync -p entity-sync-testkit` first
// (scripts/test.sh does).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import { EntitySyncClient, EntitySyncError } from '../../dist/entity-sync.js';
import { NodeProcess, Resolver, metric, recorder, until } from '../support/harness.mjs';

/** Fast reconnects, so a restart is recovered from quickly. */
const FAST = { minDelayMs: 100, maxDelayMs: 400 };

let node;
let resolver;
const clients = [];

function client(options = {}) {
  const made = new EntitySyncClient(`ws://127.0.0.1:${node.wsPort}`, { ...FAST, ...options });
  clients.push(made);
  return made;
}

before(async () => {
  node = await new NodeProcess().start();
  resolver = await Resolver.start(node.grpcUrl, {
    entities: { items: 'shared', lists: 'per_subscriber' },
    passThrough: true,
  });
});

after(async () => {
  for (const made of clients) made.close();
  await resolver?.stop();
  await node?.stop();
});

test('subscribe gets the snapshot; a notify pushes the fresh rows; listeners of a key share one subscription', async () => {
  await resolver.set('items', '1', { rows: [{ id: 1, name: 'milk', qty: 2 }] });
  const rec = recorder();
  const c = client(rec.options);
  const other = [];
  c.subscribe('items', 1, rec.listener);
  c.subscribe('items', '1', (rows) => other.push(rows));
  await until(() => rec.of('items/1').length === 1, 'the snapshot');
  const [snapshot] = rec.of('items/1');
  assert.deepEqual(snapshot.rows, [{ id: 1, name: 'milk', qty: 2 }]);
  assert.equal(snapshot.snapshot, true);
  assert.ok(
    Number.isSafeInteger(snapshot.version) && snapshot.version > 0,
    `version ${snapshot.version}`,
  );
  assert.deepEqual(
    rec.seen.frames.map((f) => f.action),
    ['subscribed', 'push'],
    'one subscribe answered once, though two listeners listen',
  );
  assert.equal((await resolver.requestsFor('subscribe', 'items', '1')).length, 1);

  await resolver.set('items', '1', {
    rows: [{ id: 1, name: 'milk', qty: 5 }, { note: 'second row' }],
  });
  const [sequence] = await resolver.notify(['items', '1']);
  await until(() => rec.of('items/1').length === 2, 'the push');
  const pushed = rec.of('items/1')[1];
  assert.deepEqual(pushed.rows, [{ id: 1, name: 'milk', qty: 5 }, { note: 'second row' }]);
  assert.equal(pushed.snapshot, false);
  assert.ok(pushed.version >= sequence, `push v${pushed.version} reflects change ${sequence}`);
  await until(() => other.length === 2, 'the second listener');
  assert.deepEqual(other.at(-1), pushed.rows);
  assert.deepEqual(c.current('items', 1), { rows: pushed.rows, version: pushed.version });
  assert.deepEqual(rec.seen.errors, []);
});

test('typed stores and async iteration follow the same key', async () => {
  await resolver.set('items', '2', { rows: [{ id: 2, qty: 1 }] });
  const c = client();
  const store = c.store('items', '2');
  const values = [];
  const off = store.subscribe((value) => values.push(value));
  await until(() => store.get().status === 'live', 'the store to go live');
  assert.deepEqual(store.get().rows, [{ id: 2, qty: 1 }]);

  const seen = [];
  const loop = (async () => {
    for await (const { rows, meta } of c.updates('items', '2')) {
      seen.push([rows[0].qty, meta.snapshot]);
      if (rows[0].qty === 3) break;
    }
  })();
  // The iterator's listener joined a held key: it starts with the rows held.
  await until(() => seen.length === 1, 'the iterator to start');
  await resolver.set('items', '2', { rows: [{ id: 2, qty: 3 }] });
  await resolver.notify(['items', '2']);
  await loop;
  assert.deepEqual(seen, [
    [1, true],
    [3, false],
  ]);
  await until(() => store.get().rows[0]?.qty === 3, 'the store to follow');
  assert.deepEqual(
    values.map((v) => v.status),
    ['loading', 'live', 'live'],
  );
  off();
});

test('after the node is killed and restarted on its ports, every key is resubscribed with the secret and gets a fresh snapshot', async () => {
  await resolver.set('items', '10', { rows: [{ id: 10, v: 'before' }] });
  await resolver.set('lists', '10', { rows: [{ list: 10, v: 'before' }], forbidden_secrets: [''] });
  const rec = recorder();
  const c = client({ ...rec.options, secret: 'member-secret' });
  c.subscribe('items', '10', rec.listener);
  c.subscribe('lists', '10', rec.listener);
  await until(
    () => rec.of('items/10').length === 1 && rec.of('lists/10').length === 1,
    'both snapshots',
  );
  const before = { items: rec.of('items/10')[0].version, lists: rec.of('lists/10')[0].version };
  const oldNode = resolver.nodeId;
  const requestsBefore = (await resolver.requests()).length;

  await node.kill();
  await until(() => c.state === 'reconnecting', 'the client to notice');
  // Changed while the node was away: nobody was notified.
  await resolver.set('items', '10', { rows: [{ id: 10, v: 'after' }] });
  await resolver.set('lists', '10', { rows: [{ list: 10, v: 'after' }], forbidden_secrets: [''] });
  const errorsBefore = rec.seen.errors.length;
  const framesBefore = rec.seen.frames.length;
  await node.start();
  await resolver.waitRegistered(oldNode);

  await until(
    () => rec.of('items/10').length === 2 && rec.of('lists/10').length === 2,
    'fresh snapshots',
  );
  for (const key of ['items/10', 'lists/10']) {
    const fresh = rec.of(key)[1];
    assert.equal(fresh.snapshot, true, key);
    assert.equal(fresh.rows[0].v, 'after', `${key}: no stale rows`);
  }
  assert.ok(rec.of('items/10')[1].version > before.items);
  assert.ok(rec.of('lists/10')[1].version > before.lists);
  assert.equal(c.state, 'open');
  // Until the resolver registered again the node may have said no_resolver
  // (the client retries that); nothing else.
  const errors = rec.seen.errors.slice(errorsBefore).map((e) => e.code);
  assert.ok(
    errors.every((code) => code === 'no_resolver'),
    errors.join(),
  );
  // The new node was asked once per key, with the secret (lists/10 is
  // forbidden without it), and the new socket carried one snapshot per key.
  // (Other tests' clients resubscribe their own keys too.)
  const asked = (await resolver.requests())
    .slice(requestsBefore)
    .filter((r) => r.ids.includes('10'));
  assert.deepEqual(
    asked.map((r) => [r.reason, r.entity, r.ids, r.secret === 'member-secret']).sort(),
    [
      ['subscribe', 'items', ['10'], true],
      ['subscribe', 'lists', ['10'], true],
    ],
  );
  const pushes = rec.seen.frames.slice(framesBefore).filter((f) => f.action === 'push');
  assert.deepEqual(pushes.map((f) => `${f.body.entity}/${f.body.id}`).sort(), [
    'items/10',
    'lists/10',
  ]);
  const states = rec.seen.states.map(([state]) => state);
  assert.ok(states.indexOf('reconnecting') < states.lastIndexOf('open'));
  assert.equal(rec.seen.states.find(([state]) => state === 'reconnecting')[1].attempt, 1);
});

test('disconnect() drops the socket and keeps the keys; connect() resubscribes them, with the secret, and gets the latest rows', async () => {
  await resolver.set('items', '50', { rows: [{ id: 50, v: 'before' }] });
  await resolver.set('lists', '50', {
    rows: [{ list: 50, v: 'before' }],
    forbidden_secrets: [''],
  });
  const rec = recorder();
  const c = client({ ...rec.options, secret: 'member-secret', autoConnect: false });
  c.subscribe('items', '50', rec.listener);
  c.subscribe('lists', '50', rec.listener);
  assert.equal(c.state, 'disconnected');
  assert.equal(rec.seen.sockets, 0, 'autoConnect: false opens no socket');
  c.connect();
  await until(
    () => rec.of('items/50').length === 1 && rec.of('lists/50').length === 1,
    'both snapshots',
  );
  const before = { items: rec.of('items/50')[0].version, lists: rec.of('lists/50')[0].version };
  const requestsBefore = (await resolver.requests()).length;

  c.disconnect();
  assert.equal(c.state, 'disconnected');
  // Changed while disconnected: notified, but nobody of this client listens.
  await resolver.set('items', '50', { rows: [{ id: 50, v: 'latest' }] });
  await resolver.set('lists', '50', { rows: [{ list: 50, v: 'latest' }], forbidden_secrets: [''] });
  await resolver.notify(['items', '50'], ['lists', '50']);
  // Longer than the largest reconnect delay: nothing reconnects by itself.
  await new Promise((resolve) => setTimeout(resolve, FAST.maxDelayMs + 200));
  assert.equal(rec.seen.sockets, 1, 'no reconnect after disconnect()');
  assert.equal(rec.of('items/50').length, 1);
  assert.deepEqual(c.current('items', '50').rows, [{ id: 50, v: 'before' }], 'rows held are kept');
  // A key added while disconnected waits for connect().
  await resolver.set('items', '51', { rows: [{ id: 51 }] });
  c.subscribe('items', '51', rec.listener);

  c.connect();
  await until(
    () =>
      rec.of('items/50').length === 2 &&
      rec.of('lists/50').length === 2 &&
      rec.of('items/51').length === 1,
    'fresh snapshots after connect()',
  );
  for (const key of ['items/50', 'lists/50']) {
    const fresh = rec.of(key)[1];
    assert.equal(fresh.snapshot, true, key);
    assert.equal(fresh.rows[0].v, 'latest', `${key}: the latest rows`);
  }
  assert.ok(rec.of('items/50')[1].version > before.items);
  assert.ok(rec.of('lists/50')[1].version > before.lists);
  assert.deepEqual(rec.of('items/51')[0].rows, [{ id: 51 }]);
  assert.equal(rec.seen.sockets, 2);
  assert.deepEqual(rec.seen.errors, []);
  // Asked once per key on the new socket, with the secret (lists/50 is
  // forbidden without it).
  const asked = (await resolver.requests())
    .slice(requestsBefore)
    .filter((r) => r.ids.includes('50') || r.ids.includes('51'));
  assert.deepEqual(
    asked.map((r) => [r.reason, r.entity, r.ids, r.secret === 'member-secret']).sort(),
    [
      ['subscribe', 'items', ['50'], true],
      ['subscribe', 'items', ['51'], true],
      ['subscribe', 'lists', ['50'], true],
    ],
  );
  assert.deepEqual(
    rec.seen.states.map(([state]) => state),
    ['connecting', 'open', 'disconnected', 'connecting', 'open'],
  );

  // Live again: a change is pushed.
  await resolver.set('items', '50', { rows: [{ id: 50, v: 'pushed' }] });
  await resolver.notify(['items', '50']);
  await until(() => rec.of('items/50').length === 3, 'the push after connect()');
  assert.equal(rec.of('items/50')[2].snapshot, false);
  assert.deepEqual(rec.of('items/50')[2].rows, [{ id: 50, v: 'pushed' }]);
});

test('after the node closes the connection, the client resumes by version: current for the unchanged keys, a snapshot for the key changed while it was away', async () => {
  await resolver.set('items', '60', { rows: [{ id: 60, v: 'kept' }] });
  await resolver.set('items', '61', { rows: [{ id: 61, v: 'before' }] });
  await resolver.set('lists', '60', { rows: [{ list: 60, v: 'kept' }], forbidden_secrets: [''] });
  const rec = recorder();
  // The reconnect waits exactly 2 s (no jitter): the change below is made and
  // notified within it, which the test checks.
  const c = client({
    ...rec.options,
    secret: 'member-secret',
    minDelayMs: 2000,
    maxDelayMs: 2000,
    random: () => 1,
  });
  const resumed = [];
  const store = c.store('items', '60');
  const storeValues = [];
  store.subscribe((value) => storeValues.push(value));
  for (const [entity, id] of [
    ['items', '60'],
    ['items', '61'],
    ['lists', '60'],
  ]) {
    c.subscribe(entity, id, rec.listener, { onResumed: (meta) => resumed.push(meta) });
  }
  await until(
    () => ['items/60', 'items/61', 'lists/60'].every((key) => rec.of(key).length === 1),
    'three snapshots',
  );
  await until(() => store.get().status === 'live', 'the store to go live');
  const held = Object.fromEntries(
    ['items/60', 'items/61', 'lists/60'].map((key) => [key, rec.of(key)[0].version]),
  );
  const metrics = await node.metrics();
  const currentBefore = metric(metrics, 'entity_sync_resumed_current_total');
  const snapshotBefore = metric(metrics, 'entity_sync_resumed_snapshot_total');
  const requestsBefore = (await resolver.requests()).length;
  const framesBefore = rec.seen.frames.length;
  const sentBefore = rec.seen.sent.length;
  const storeBefore = storeValues.length;

  // A frame over twice --max-message-bytes (64 KiB): the node closes the connection (1009).
  c.send({ pad: 'x'.repeat(140 * 1024) });
  await until(() => c.state === 'reconnecting', 'the node to close the connection');
  assert.equal(rec.seen.states.at(-1)[1].closeCode, 1009);
  // Changed and notified while the client is away.
  await resolver.set('items', '61', { rows: [{ id: 61, v: 'changed while away' }] });
  const [changed] = await resolver.notify(['items', '61']);
  assert.equal(c.state, 'reconnecting', 'changed before the client came back');
  assert.equal(rec.seen.sockets, 1);

  await until(() => rec.of('items/61').length === 2, "the changed key's snapshot", 5000);
  await until(() => resumed.length === 2, 'both unchanged keys resumed');

  // The resubscribes carried the versions held, after the secret.
  assert.deepEqual(rec.seen.sent.slice(sentBefore + 1), [
    { action: 'secret', body: 'member-secret' },
    { action: 'subscribe', body: { entity: 'items', id: '60', version: held['items/60'] } },
    { action: 'subscribe', body: { entity: 'items', id: '61', version: held['items/61'] } },
    { action: 'subscribe', body: { entity: 'lists', id: '60', version: held['lists/60'] } },
  ]);
  // The node answered current for the unchanged keys, a snapshot for the changed one.
  const answers = rec.seen.frames.slice(framesBefore);
  assert.deepEqual(
    answers
      .filter((f) => f.body.current === true)
      .map((f) => `${f.action} ${f.body.entity}/${f.body.id}`)
      .sort(),
    ['subscribed items/60', 'subscribed lists/60'],
  );
  assert.deepEqual(
    answers.filter((f) => f.action === 'push').map((f) => `${f.body.entity}/${f.body.id}`),
    ['items/61'],
  );
  const fresh = rec.of('items/61')[1];
  assert.equal(fresh.snapshot, true);
  assert.deepEqual(fresh.rows, [{ id: 61, v: 'changed while away' }]);
  assert.ok(fresh.version >= changed, `snapshot v${fresh.version} reflects change ${changed}`);
  // The unchanged keys: no delivery, rows and versions as held, the store untouched.
  assert.equal(rec.of('items/60').length, 1);
  assert.equal(rec.of('lists/60').length, 1);
  assert.deepEqual(resumed.map((meta) => [`${meta.entity}/${meta.id}`, meta.version]).sort(), [
    ['items/60', held['items/60']],
    ['lists/60', held['lists/60']],
  ]);
  assert.deepEqual(c.current('lists', '60'), {
    rows: [{ list: 60, v: 'kept' }],
    version: held['lists/60'],
  });
  assert.equal(storeValues.length, storeBefore, 'the store got no update');
  assert.equal(store.get().status, 'live');
  const after = await node.metrics();
  assert.equal(metric(after, 'entity_sync_resumed_current_total'), currentBefore + 2);
  assert.equal(metric(after, 'entity_sync_resumed_snapshot_total'), snapshotBefore + 1);
  // Authorized all the same: each key was asked for again, with the secret.
  const asked = (await resolver.requests())
    .slice(requestsBefore)
    .filter((r) => r.ids.includes('60') || r.ids.includes('61'));
  assert.deepEqual(
    asked.map((r) => [r.reason, r.entity, r.ids, r.secret === 'member-secret']).sort(),
    [
      ['subscribe', 'items', ['60'], true],
      ['subscribe', 'items', ['61'], true],
      ['subscribe', 'lists', ['60'], true],
    ],
  );
  assert.deepEqual(rec.seen.errors, []);

  // A resumed key is live: its next change is pushed.
  await resolver.set('items', '60', { rows: [{ id: 60, v: 'changed after' }] });
  await resolver.notify(['items', '60']);
  await until(() => rec.of('items/60').length === 2, 'the push after the resume');
  assert.equal(rec.of('items/60')[1].snapshot, false);
  assert.deepEqual(store.get().rows, [{ id: 60, v: 'changed after' }]);
  c.close();
});

test('with resume: false a reconnect asks every key for a snapshot', async () => {
  await resolver.set('items', '70', { rows: [{ id: 70 }] });
  const rec = recorder();
  const c = client({ ...rec.options, resume: false });
  c.subscribe('items', '70', rec.listener);
  await until(() => rec.of('items/70').length === 1, 'the snapshot');
  c.send({ pad: 'x'.repeat(140 * 1024) });
  await until(() => rec.of('items/70').length === 2, 'the snapshot after the reconnect', 5000);
  assert.equal(rec.of('items/70')[1].snapshot, true);
  assert.deepEqual(
    rec.seen.sent.filter((f) => f.action === 'subscribe').map((f) => f.body),
    [
      { entity: 'items', id: '70' },
      { entity: 'items', id: '70' },
    ],
  );
  assert.equal(rec.seen.frames.filter((f) => f.body?.current === true).length, 0);
  c.close();
});

test('a push older than the rows held never reaches a listener', async () => {
  // The resolver sets its own versions here, so one can go back.
  await resolver.set('items', '20', { rows: [{ v: 'A' }], version: 1000 });
  const rec = recorder();
  const c = client(rec.options);
  c.subscribe('items', '20', rec.listener);
  await until(() => rec.of('items/20').length === 1, 'the snapshot');
  assert.equal(rec.of('items/20')[0].version, 1000);
  const staleBefore = metric(await node.metrics(), 'entity_sync_pushes_skipped_stale_total');

  await resolver.set('items', '20', { rows: [{ v: 'B, older' }], version: 500 });
  await resolver.notify(['items', '20']);
  await until(
    async () =>
      metric(await node.metrics(), 'entity_sync_pushes_skipped_stale_total') === staleBefore + 1,
    'the stale push to be skipped',
  );
  await resolver.set('items', '20', { rows: [{ v: 'C' }], version: 2000 });
  await resolver.notify(['items', '20']);
  await until(() => rec.of('items/20').length === 2, 'the newer push');

  assert.deepEqual(
    rec.of('items/20').map((r) => [r.version, r.rows[0].v]),
    [
      [1000, 'A'],
      [2000, 'C'],
    ],
  );
  // The node dropped the older one before the socket: the client never had to.
  assert.deepEqual(
    rec.seen.frames.filter((f) => f.action === 'push').map((f) => f.body.version),
    [1000, 2000],
  );
  assert.deepEqual(c.current('items', '20'), { rows: [{ v: 'C' }], version: 2000 });
});

test('forbidden ends the key with its code until a secret opens it', async () => {
  await resolver.set('lists', '30', { rows: [{ list: 30 }], forbidden_secrets: ['', 'guest'] });
  await resolver.set('items', '30', { rows: [{ id: 30 }] });
  const rec = recorder();
  const c = client({ ...rec.options, secret: 'guest' });
  const keyErrors = [];
  c.subscribe('lists', '30', rec.listener, { onError: (error) => keyErrors.push(error) });
  await until(() => keyErrors.length === 1, 'the error');
  assert.deepEqual(keyErrors, [
    new EntitySyncError('forbidden', 'forbidden for this secret', { entity: 'lists', id: '30' }),
  ]);
  assert.deepEqual(rec.seen.errors, keyErrors);
  assert.deepEqual(rec.of('lists/30'), []);
  // Another key after it, answered in order: by then a retry would have gone out.
  c.subscribe('items', '30', rec.listener);
  await until(() => rec.of('items/30').length === 1, 'the other key');
  assert.equal(
    (await resolver.requestsFor('subscribe', 'lists', '30')).length,
    1,
    'forbidden is not retried by itself',
  );

  c.setSecret('member');
  await until(() => rec.of('lists/30').length === 1, 'the list under the new secret');
  assert.deepEqual(rec.of('lists/30')[0].rows, [{ list: 30 }]);
  const asked = await resolver.requestsFor('subscribe', 'lists', '30');
  assert.deepEqual(
    asked.map((r) => r.secret === 'member'),
    [false, true],
  );
  assert.equal(rec.seen.errors.length, 1);
});

test('a key the backend does not have is not_found, and a store of it fails with that error', async () => {
  const c = client();
  const store = c.store('items', '404');
  const off = store.subscribe(() => {});
  await until(() => store.get().status === 'failed', 'the store to fail');
  const { error, ...rest } = store.get();
  assert.deepEqual(rest, { status: 'failed', rows: [], version: null });
  assert.ok(error instanceof EntitySyncError);
  assert.deepEqual(
    { ...error.toJSON(), message: typeof error.message },
    {
      name: 'EntitySyncError',
      code: 'not_found',
      message: 'string',
      entity: 'items',
      id: '404',
      retryable: false,
    },
  );
  off();
});

test('passing failures are retried until they pass: resolver_error, then no_resolver', async () => {
  await resolver.set('items', '40', { status: 'error', message: 'database restarting' });
  const rec = recorder();
  const c = client(rec.options);
  c.subscribe('items', '40', rec.listener);
  await until(() => rec.seen.errors.length === 1, 'the resolver error');
  assert.deepEqual(rec.seen.errors, [
    new EntitySyncError('resolver_error', 'database restarting', { entity: 'items', id: '40' }),
  ]);
  assert.equal(rec.seen.errors[0].retryable, true);
  await resolver.set('items', '40', { rows: [{ id: 40 }] });
  await until(() => rec.of('items/40').length === 1, 'the retried subscribe');
  const attempts = (await resolver.requestsFor('subscribe', 'items', '40')).length;
  assert.equal(rec.seen.errors.length, attempts - 1, 'one error per failed attempt');

  // No backend serves `orders` yet: refused, retried, and served once one registers.
  c.subscribe('orders', '1', rec.listener);
  await until(() => rec.seen.errors.some((e) => e.code === 'no_resolver'), 'no_resolver');
  assert.deepEqual(rec.seen.errors.find((e) => e.code === 'no_resolver').entity, 'orders');
  const late = await Resolver.start(node.grpcUrl, {
    entities: { orders: 'shared' },
    name: 'orders-resolver',
  });
  try {
    await late.set('orders', '1', { rows: [{ order: 1 }] });
    await until(() => rec.of('orders/1').length === 1, 'the order once a backend serves it');
    assert.deepEqual(rec.of('orders/1')[0].rows, [{ order: 1 }]);
    assert.ok(
      rec.seen.errors.every((e) => e.code === 'resolver_error' || e.code === 'no_resolver'),
    );
  } finally {
    c.close();
    await late.stop();
  }
});

test("send() passes a message through to the backend with the connection's secret", async () => {
  const c = client({ secret: 'typing-secret' });
  await until(() => c.state === 'open', 'the connection');
  const before = (await resolver.passThroughs()).length;
  assert.equal(c.send({ type: 'typing', list: 7 }), true);
  const all = await until(async () => {
    const seen = await resolver.passThroughs();
    return seen.length === before + 1 && seen;
  }, 'the pass-through');
  const [message] = all.slice(before);
  assert.equal(message.payload, '{"type":"typing","list":7}');
  assert.equal(message.secret, 'typing-secret');
  assert.ok(message.connection_id.length > 0);
  assert.throws(() => c.send({ action: 'subscribe' }), TypeError);
});
