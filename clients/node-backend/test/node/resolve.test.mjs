// serve() against the real node binary: rows to a websocket subscriber,
// error answers as error frames, the in-flight cap, drain, a restart.

import assert from 'node:assert/strict';
import { after, afterEach, before, test } from 'node:test';

import { Answer, Backend, FetchMode, HANDLER_FAILED, Notifier } from '../../dist/index.js';
import { NodeProcess, WsClient, recordingLogger, sleep, until } from '../support/env.mjs';

let node;
const cleanups = [];

before(async () => {
  // One id per request, so that every subscribe is a request of its own.
  node = await new NodeProcess({ name: 'nb-resolve', args: ['--resolve-batch-size', '1'] }).start();
});
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});
after(async () => {
  await node?.stop();
});

/** Starts a backend; stopped (drained) after the test. */
async function start(options) {
  const { logger, lines } = recordingLogger();
  const backend = new Backend(node.grpcUrl, { logger, ...options });
  const stop = new AbortController();
  const serving = backend.serve(stop.signal);
  cleanups.push(async () => {
    stop.abort();
    await serving;
  });
  await backend.waitRegistered({ timeoutMs: 10_000 });
  return { backend, stop, serving, lines };
}

async function ws() {
  const client = await WsClient.open(node);
  cleanups.push(() => client.close());
  return client;
}

/** A promise and its resolve function. */
function gate() {
  let open;
  const opened = new Promise((done) => {
    open = done;
  });
  return { opened, open };
}

test('a handler’s rows reach a subscriber, and again after Notify', async () => {
  let qty = 2;
  const requests = [];
  await start({
    name: 'rows',
    entities: {
      items: {
        fetchMode: FetchMode.SHARED,
        handler: (req) => {
          requests.push({ ids: [...req.ids], reason: req.reason, shared: req.shared });
          return new Map(req.ids.map((id) => [id, Answer.row({ id: Number(id), qty })]));
        },
      },
    },
  });
  const client = await ws();
  client.subscribe('items', 101);
  const [first] = await client.waitFor('push', 'items', 101);
  assert.deepEqual(first.body.rows, [{ id: 101, qty: 2 }]);
  assert.equal(client.of('subscribed', 'items', 101).length, 1);
  assert.deepEqual(requests, [{ ids: ['101'], reason: 'subscribe', shared: false }]);

  qty = 3;
  const notifier = new Notifier(node.grpcUrl);
  cleanups.push(() => notifier.close());
  const receipt = await notifier.notify([['items', 101]]);
  assert.equal(receipt.accepted, 1);
  assert.equal(receipt.sequences.length, 1);
  assert.equal(receipt.duplicate, false);
  assert.equal(receipt.attempts, 1);
  const pushes = await client.waitFor('push', 'items', 101, 2);
  assert.deepEqual(pushes[1].body.rows, [{ id: 101, qty: 3 }]);
  assert.ok(BigInt(pushes[1].body.version) >= receipt.sequences[0]);
  assert.deepEqual(requests[1], { ids: ['101'], reason: 'change', shared: true });
  await sleep(200);
  assert.equal(client.of('push', 'items', 101).length, 2);
});

test('NOT_FOUND, FORBIDDEN and ERROR answers reach the client as error frames; a throwing handler’s text does not', async () => {
  const secrets = [];
  const { lines } = await start({
    name: 'errors',
    entities: {
      things: (req) => {
        secrets.push(req.secret);
        const [id] = req.ids;
        if (id === 'boom') throw new Error('connection to db-7 failed: password rejected');
        const answer =
          id === 'missing'
            ? Answer.notFound()
            : id === 'private'
              ? Answer.forbidden('members only')
              : Answer.error('try again later');
        return { [id]: answer };
      },
    },
  });
  const client = await ws();
  client.send({ action: 'secret', body: 'member-secret-1' });
  for (const id of ['missing', 'private', 'flaky', 'boom']) client.subscribe('things', id);
  const body = async (id) => (await client.waitFor('error', 'things', id))[0].body;
  assert.deepEqual(await body('missing'), {
    code: 'not_found',
    message: 'no such key',
    entity: 'things',
    id: 'missing',
  });
  assert.deepEqual(await body('private'), {
    code: 'forbidden',
    message: 'members only',
    entity: 'things',
    id: 'private',
  });
  assert.deepEqual(await body('flaky'), {
    code: 'resolver_error',
    message: 'try again later',
    entity: 'things',
    id: 'flaky',
  });
  assert.deepEqual(await body('boom'), {
    code: 'resolver_error',
    message: HANDLER_FAILED,
    entity: 'things',
    id: 'boom',
  });
  await sleep(200);
  for (const id of ['missing', 'private', 'flaky', 'boom']) {
    assert.equal(client.of('error', 'things', id).length, 1, id);
    assert.equal(client.of('push', 'things', id).length, 0, id);
  }
  assert.ok(!JSON.stringify(client.frames).includes('password'));
  assert.ok(!JSON.stringify(client.frames).includes('db-7'));
  const failed = lines.filter((l) => l.message.includes('db-7 failed: password rejected'));
  assert.equal(failed.length, 1);
  assert.equal(failed[0].level, 'warn');
  assert.deepEqual(secrets, Array(4).fill('member-secret-1'));
});

test('requests are answered concurrently, never more than maxInFlight at once', async () => {
  const hold = gate();
  let running = 0;
  let most = 0;
  const { backend } = await start({
    name: 'concurrent',
    maxInFlight: 3,
    entities: {
      slow: async (req) => {
        running += 1;
        most = Math.max(most, running);
        await hold.opened;
        running -= 1;
        return req.ids.map((id) => [id, Answer.row({ id })]);
      },
    },
  });
  const client = await ws();
  const ids = ['1', '2', '3', '4', '5', '6', '7', '8'];
  for (const id of ids) client.subscribe('slow', id);
  await until(() => running === 3, '3 handlers running');
  assert.equal(backend.inFlight, 3);
  await sleep(400);
  assert.equal(running, 3);
  assert.equal(most, 3);
  assert.equal(backend.inFlight, 3);
  hold.open();
  for (const id of ids) await client.waitFor('push', 'slow', id);
  assert.equal(most, 3);
  assert.equal(backend.inFlight, 0);
  for (const id of ids) assert.deepEqual(client.of('push', 'slow', id)[0].body.rows, [{ id }]);
});

test('aborting the signal drains: in-flight requests are answered, then the stream ends', async () => {
  const hold = gate();
  let started = 0;
  let calls = 0;
  const { backend, stop, serving, lines } = await start({
    name: 'drainer',
    entities: {
      drained: async (req) => {
        calls += 1;
        started += 1;
        await hold.opened;
        return req.ids.map((id) => [id, Answer.row({ id, drained: true })]);
      },
    },
  });
  const client = await ws();
  client.subscribe('drained', 'a');
  client.subscribe('drained', 'b');
  await until(() => started === 2, 'both requests in the handler');
  stop.abort();
  let ended = false;
  void serving.then(() => {
    ended = true;
  });
  await until(() => lines.some((l) => l.message.startsWith('draining')), 'the drain');
  await sleep(300);
  assert.equal(ended, false, 'serve returned with requests in flight');
  assert.equal(backend.state.phase, 'registered');
  hold.open();
  await serving;
  assert.equal(backend.state.phase, 'stopped');
  for (const id of ['a', 'b']) {
    const [push] = await client.waitFor('push', 'drained', id);
    assert.deepEqual(push.body.rows, [{ id, drained: true }]);
  }
  assert.deepEqual(
    lines.filter((l) => l.level === 'info').map((l) => l.message.replace(/\(node.*\)/, '()')),
    ['registered ()', 'draining (2 in flight)', 'drained'],
  );
  // The node has no resolver of the entity any more: a new subscribe is not answered by us.
  client.subscribe('drained', 'c');
  const [refused] = await client.waitFor('error', 'drained', 'c');
  assert.deepEqual(refused.body, {
    code: 'no_resolver',
    message: 'no resolver serves entity "drained"',
    entity: 'drained',
    id: 'c',
  });
  assert.equal(calls, 2);
});

test('a node restarted on the same ports: the backend registers again and serves', async () => {
  const { backend } = await start({
    name: 'restarts',
    reconnectBackoff: { initialMs: 50, maxMs: 400 },
    entities: { items: (req) => req.ids.map((id) => [id, Answer.row({ id, from: 'backend' })]) },
  });
  const before = backend.state.nodeId;
  assert.ok(before);
  await assert.rejects(backend.serve(), (err) => err.kind === 'config');
  await node.stop();
  await until(() => backend.state.phase !== 'registered', 'the backend to see the node go');
  await node.start();
  const again = await backend.waitRegistered({ otherThan: before, timeoutMs: 10_000 });
  assert.notEqual(again.nodeId, before);
  const client = await ws();
  client.subscribe('items', 'x');
  const [push] = await client.waitFor('push', 'items', 'x');
  assert.deepEqual(push.body.rows, [{ id: 'x', from: 'backend' }]);
});

test('pass-through: client messages without an action reach the handler', async () => {
  const received = [];
  await start({
    name: 'passer',
    entities: {},
    passThrough: (message) => {
      received.push({ id: message.connectionId, json: message.json(), secret: message.secret });
    },
  });
  const client = await ws();
  client.send({ action: 'secret', body: 'pt-secret' });
  client.send({ type: 'hello', n: 1 });
  client.send({ type: 'hello', n: 2 });
  await until(() => received.length === 2, 'two pass-through messages');
  assert.deepEqual(
    received.map((r) => [r.json, r.secret]),
    [
      [{ type: 'hello', n: 1 }, 'pt-secret'],
      [{ type: 'hello', n: 2 }, 'pt-secret'],
    ],
  );
  assert.ok(received[0].id);
  assert.equal(received[0].id, received[1].id);
});

test('refreshEveryMs: the node re-resolves a subscribed key without a Notify', async () => {
  const reasons = [];
  await start({
    name: 'refresher',
    entities: {
      clocks: {
        fetchMode: FetchMode.SHARED,
        refreshEveryMs: 1_000,
        handler: (req) => {
          reasons.push(req.reason);
          return req.ids.map((id) => [id, Answer.row({ id, n: reasons.length })]);
        },
      },
    },
  });
  const client = await ws();
  client.subscribe('clocks', 'c1');
  await client.waitFor('push', 'clocks', 'c1');
  await until(() => reasons.includes('change'), 'a refresh', 5_000);
  assert.equal(reasons[0], 'subscribe');
  // The refresh's rows differ (n grew): they are pushed.
  const pushes = await client.waitFor('push', 'clocks', 'c1', 2);
  assert.notDeepEqual(pushes[1].body.rows, pushes[0].body.rows);
});

test('a registration the node refuses for good rejects serve, without retrying', async () => {
  const { logger, lines } = recordingLogger();
  const backend = new Backend(node.grpcUrl, {
    name: 'invalid',
    logger,
    entities: { 'not a valid entity name!': () => ({}) },
  });
  await assert.rejects(backend.serve(), (err) => {
    assert.equal(err.kind, 'rejected');
    assert.equal(err.code, 'INVALID_ARGUMENT');
    return true;
  });
  assert.equal(backend.state.phase, 'stopped');
  assert.equal(lines.filter((l) => l.level === 'warn').length, 0, 'retried');
});
