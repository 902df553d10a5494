// Subscribe tokens against the real node binary started with
// --subscribe-token-jwks (one HS256 `oct` key); the tokens are signed here
// with node:crypto.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';

import { EntitySyncClient } from '../../dist/entity-sync.js';
import { NodeProcess, Resolver, metric, recorder, until } from '../support/harness.mjs';
import { tokenKey } from '../support/tokens.mjs';

let key;
let node;
let resolver;
const clients = [];

before(async () => {
  key = tokenKey();
  node = await new NodeProcess({
    name: 'node-tokens',
    args: ['--subscribe-token-jwks', key.jwksPath],
  }).start();
  resolver = await Resolver.start(node.grpcUrl, {
    entities: { items: 'shared' },
    name: 'resolver-tokens',
  });
});

after(async () => {
  for (const made of clients) made.close();
  await resolver?.stop();
  await node?.stop();
  if (key) rmSync(key.dir, { recursive: true, force: true });
});

function client(options) {
  const made = new EntitySyncClient(`ws://127.0.0.1:${node.wsPort}`, {
    minDelayMs: 100,
    maxDelayMs: 400,
    ...options,
  });
  clients.push(made);
  return made;
}

/** A getToken that signs a token for the key asked, recording its calls. */
function issuer({ seconds = 60, answers = [] } = {}) {
  const calls = [];
  return {
    calls,
    getToken: (entity, id) => {
      calls.push({ entity, id, at: Date.now() });
      const answer = answers.shift();
      if (answer) return answer(entity, id);
      return key.mint({ entity, ids: [id], seconds });
    },
  };
}

const subscribesOf = (rec, id) =>
  rec.seen.sent.filter((f) => f.action === 'subscribe' && f.body.id === id);
const framesOf = (rec, id) => rec.seen.frames.filter((f) => f.body?.id === id);

test('a subscribe with the token of getToken gets the rows and the pushes', async () => {
  await resolver.set('items', 't1', { rows: [{ id: 't1', qty: 1 }] });
  const tokens = issuer();
  const rec = recorder();
  const c = client({ ...rec.options, getToken: tokens.getToken });
  c.subscribe('items', 't1', rec.listener);
  await until(() => rec.of('items/t1').length === 1, 'the snapshot');
  assert.deepEqual(rec.of('items/t1')[0].rows, [{ id: 't1', qty: 1 }]);
  assert.deepEqual(
    tokens.calls.map(({ entity, id }) => [entity, id]),
    [['items', 't1']],
  );
  const [subscribe] = subscribesOf(rec, 't1');
  assert.deepEqual(Object.keys(subscribe.body), ['entity', 'id', 'token']);
  assert.match(subscribe.body.token, /^[\w-]+\.[\w-]+\.[\w-]+$/);

  await resolver.set('items', 't1', { rows: [{ id: 't1', qty: 2 }] });
  await resolver.notify(['items', 't1']);
  await until(() => rec.of('items/t1').length === 2, 'the push');
  assert.deepEqual(rec.of('items/t1')[1].rows, [{ id: 't1', qty: 2 }]);
  assert.deepEqual(rec.seen.errors, []);
});

test('a 3 s token is refreshed before it expires, with the version held: the page notices nothing and pushes keep coming', async () => {
  await resolver.set('items', 't2', { rows: [{ id: 't2', v: 'first' }] });
  const tokens = issuer({ seconds: 3 });
  const rec = recorder();
  const resumed = [];
  const c = client({ ...rec.options, getToken: tokens.getToken });
  c.subscribe('items', 't2', rec.listener, { onResumed: (meta) => resumed.push(meta) });
  await until(() => rec.of('items/t2').length === 1, 'the snapshot');
  const { version } = rec.of('items/t2')[0];
  const askedBefore = (await resolver.requests()).filter((r) => r.ids.includes('t2')).length;
  const metricsBefore = await node.metrics();
  const firstExp = JSON.parse(
    Buffer.from(subscribesOf(rec, 't2')[0].body.token.split('.')[1], 'base64url'),
  ).exp;

  // Past the first token's expiry (and the second's): two refreshes at least.
  await until(
    () => tokens.calls.length >= 3 && Date.now() / 1000 > firstExp + 0.5,
    'two refreshes and the first expiry',
    8000,
  );
  await until(
    () => framesOf(rec, 't2').filter((f) => f.action === 'subscribed').length >= 3,
    'the answers to the refreshes',
  );
  assert.ok(Date.now() / 1000 > firstExp, 'the first token has expired by now');
  const subscribes = subscribesOf(rec, 't2');
  assert.ok(subscribes.length >= 3);
  for (const refresh of subscribes.slice(1)) {
    assert.deepEqual(Object.keys(refresh.body), ['entity', 'id', 'version', 'token']);
    assert.equal(refresh.body.version, version);
  }
  assert.equal(new Set(subscribes.map((f) => f.body.token)).size, subscribes.length);
  // Each refresh came before the token it replaced expired.
  for (let i = 1; i < subscribes.length; i += 1) {
    const replaced = JSON.parse(
      Buffer.from(subscribes[i - 1].body.token.split('.')[1], 'base64url'),
    ).exp;
    assert.ok(tokens.calls[i].at < replaced * 1000, `refresh ${i} before its token expired`);
  }
  // The node answered each refresh current, with no push; no backend was asked.
  const answers = framesOf(rec, 't2').map((f) => [f.action, f.body.current === true]);
  assert.deepEqual(answers.slice(0, 2), [
    ['subscribed', false],
    ['push', false],
  ]);
  assert.ok(answers.length >= 4 && answers.length <= subscribes.length + 1, `${answers.length}`);
  assert.deepEqual(
    answers.slice(2),
    answers.slice(2).map(() => ['subscribed', true]),
  );
  assert.equal(
    (await resolver.requests()).filter((r) => r.ids.includes('t2')).length,
    askedBefore,
    'no backend was asked for a refresh',
  );
  const metricsAfter = await node.metrics();
  // Each refresh renewed the subscription on the node (one more may have
  // gone out since the answers were counted).
  const renewed =
    metric(metricsAfter, 'entity_sync_token_refreshes_total') -
    metric(metricsBefore, 'entity_sync_token_refreshes_total');
  assert.ok(
    renewed >= answers.length - 2 && renewed <= tokens.calls.length - 1,
    `${renewed} renewals for ${answers.length - 2} answers`,
  );
  assert.equal(
    metric(metricsAfter, 'entity_sync_token_expiries_total'),
    metric(metricsBefore, 'entity_sync_token_expiries_total'),
    'no subscription ended',
  );
  assert.equal(rec.of('items/t2').length, 1, 'no rows callback');
  assert.deepEqual(resumed, [], 'no onResumed');
  assert.deepEqual(
    rec.seen.states.map(([s]) => s),
    ['connecting', 'open'],
  );
  assert.deepEqual(rec.seen.errors, []);

  await resolver.set('items', 't2', { rows: [{ id: 't2', v: 'later' }] });
  await resolver.notify(['items', 't2']);
  await until(() => rec.of('items/t2').length === 2, 'the push after the refreshes');
  assert.deepEqual(rec.of('items/t2')[1].rows, [{ id: 't2', v: 'later' }]);
  assert.equal(rec.of('items/t2')[1].snapshot, false);
  assert.deepEqual(rec.seen.errors, []);
});

test('getToken failing twice, then giving a token: two client_token_unavailable errors, backoff, then one subscribe and the rows', async () => {
  await resolver.set('items', 't3', { rows: [{ id: 't3' }] });
  const tokens = issuer({
    answers: [
      () => Promise.reject(new Error('token service unavailable')),
      () => Promise.reject(new Error('token service unavailable')),
    ],
  });
  const rec = recorder();
  const keyErrors = [];
  const c = client({ ...rec.options, getToken: tokens.getToken, random: () => 1 });
  c.subscribe('items', 't3', rec.listener, { onError: (e) => keyErrors.push(e.code) });
  await until(() => rec.of('items/t3').length === 1, 'the rows after the failures');
  assert.equal(tokens.calls.length, 3);
  // random 1: the full ceiling, 100 ms then 200 ms.
  const gaps = tokens.calls.slice(1).map((call, i) => call.at - tokens.calls[i].at);
  assert.ok(gaps[0] >= 95 && gaps[1] >= 195, `gaps ${gaps}`);
  assert.deepEqual(
    rec.seen.errors.map((e) => [e.code, e.entity, e.id, e.retryable]),
    [
      ['client_token_unavailable', 'items', 't3', true],
      ['client_token_unavailable', 'items', 't3', true],
    ],
  );
  assert.deepEqual(keyErrors, ['client_token_unavailable', 'client_token_unavailable']);
  assert.equal(subscribesOf(rec, 't3').length, 1, 'nothing was sent without a token');
  assert.deepEqual(rec.of('items/t3')[0].rows, [{ id: 't3' }]);
});

test('an expired token is refused with token_expired; the client gets a fresh one and subscribes again at once', async () => {
  await resolver.set('items', 't4', { rows: [{ id: 't4' }] });
  const tokens = issuer({
    answers: [(entity, id) => key.mint({ entity, ids: [id], seconds: -600 })],
  });
  const rec = recorder();
  const c = client({ ...rec.options, getToken: tokens.getToken });
  c.subscribe('items', 't4', rec.listener);
  await until(() => rec.of('items/t4').length === 1, 'the rows');
  assert.deepEqual(
    rec.seen.errors.map((e) => [e.code, e.id, e.retryable]),
    [['token_expired', 't4', true]],
  );
  assert.equal(tokens.calls.length, 2);
  assert.equal(subscribesOf(rec, 't4').length, 2);
  assert.deepEqual(
    framesOf(rec, 't4').map((f) => f.action),
    ['error', 'subscribed', 'push'],
  );
});

test('a token for another id is refused with token_invalid: one retry with a fresh token, then the key stays failed', async () => {
  await resolver.set('items', 't5', { rows: [{ id: 't5' }] });
  const calls = [];
  const rec = recorder();
  const keyErrors = [];
  const c = client({
    ...rec.options,
    getToken: (entity, id) => {
      calls.push([entity, id]);
      return key.mint({ entity, ids: ['not-t5'] });
    },
  });
  c.subscribe('items', 't5', rec.listener, { onError: (e) => keyErrors.push(e.code) });
  await until(() => keyErrors.length === 2, 'two refusals');
  await new Promise((resolve) => setTimeout(resolve, 800));
  assert.deepEqual(keyErrors, ['token_invalid', 'token_invalid']);
  assert.deepEqual(calls, [
    ['items', 't5'],
    ['items', 't5'],
  ]);
  assert.equal(subscribesOf(rec, 't5').length, 2);
  assert.equal(rec.of('items/t5').length, 0);
  assert.equal(c.state, 'open');
});
