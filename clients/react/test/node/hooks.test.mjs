// The hooks in jsdom with React Testing Library, against the real node
// binary (embedded bus) and the testkit's resolver, over real sockets on
// 127.0.0.1. Every socket is Node's own WebSocket, tapped by the client
// package's `recorder()` to count what goes over the wire.

import './../support/dom.mjs';

import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { StrictMode, createElement as h, useState } from 'react';
import { act, cleanup, render, waitFor } from '@testing-library/react';

import {
  EntitySyncClient,
  EntitySyncError,
  EntitySyncProvider,
  useEntity,
  useEntitySync,
} from '../../dist/index.js';
import {
  DEADLINE_MS,
  NodeProcess,
  Resolver,
  metric,
  recorder,
  until,
} from '../../../js/test/support/harness.mjs';

const FAST = { minDelayMs: 100, maxDelayMs: 400 };
const WAIT = { timeout: DEADLINE_MS };

let node;
let resolver;
const clients = [];

before(async () => {
  node = await new NodeProcess({ name: 'react-node' }).start();
  resolver = await Resolver.start(node.grpcUrl, {
    entities: { items: 'shared' },
    name: 'react-resolver',
  });
});

after(async () => {
  cleanup();
  for (const made of clients) made.close();
  await resolver?.stop();
  await node?.stop();
});

/** The node's gauges: open connections and subscriptions held. */
async function gauges() {
  const text = await node.metrics();
  return {
    connections: metric(text, 'entity_sync_connections'),
    subscriptions: metric(text, 'entity_sync_subscriptions'),
  };
}

beforeEach(async () => {
  // Each test starts from a node that holds nothing.
  cleanup();
  for (const made of clients.splice(0)) made.close();
  await until(async () => {
    const { connections, subscriptions } = await gauges();
    return connections === 0 && subscriptions === 0;
  }, 'the node to hold no connection');
});

const wsUrl = () => `ws://127.0.0.1:${node.wsPort}`;

function client(options = {}) {
  const made = new EntitySyncClient(wsUrl(), { ...FAST, ...options });
  clients.push(made);
  return made;
}

/** Renders one key as text: `status|version|rows as JSON|error code`. */
function Item({ entity = 'items', id, label = 'item' }) {
  const { status, rows, version, error } = useEntity(entity, id);
  return h(
    'p',
    { 'data-testid': label },
    `${status}|${version ?? '-'}|${JSON.stringify(rows)}|${error?.code ?? '-'}`,
  );
}

const text = (view, label = 'item') => view.getByTestId(label).textContent;

const subscribes = (rec, id) =>
  rec.seen.sent.filter((f) => f.action === 'subscribe' && f.body.id === String(id));
const unsubscribes = (rec, id) =>
  rec.seen.sent.filter((f) => f.action === 'unsubscribe' && f.body.id === String(id));

test('useEntity renders the rows, then the rows a notify pushes', async () => {
  await resolver.set('items', '1', { rows: [{ id: 1, name: 'milk', qty: 2 }] });
  const rec = recorder();
  const c = client(rec.options);
  const view = render(h(EntitySyncProvider, { client: c }, h(Item, { id: '1' })));
  assert.match(text(view), /^loading\|-\|\[\]\|-$/);
  await waitFor(() => {
    assert.match(text(view), /^live\|\d+\|\[\{"id":1,"name":"milk","qty":2\}\]\|-$/);
  }, WAIT);
  const first = Number(text(view).split('|')[1]);

  await resolver.set('items', '1', { rows: [{ id: 1, name: 'milk', qty: 5 }] });
  const [sequence] = await resolver.notify(['items', '1']);
  await waitFor(() => {
    assert.match(text(view), /"qty":5/);
  }, WAIT);
  const second = Number(text(view).split('|')[1]);
  assert.ok(second > first && second >= sequence, `version ${first} → ${second}`);
  assert.deepEqual(rec.seen.errors, []);
});

test('components following one key share one subscription; the last unmount unsubscribes', async () => {
  await resolver.set('items', '2', { rows: [{ id: 2 }] });
  const requestsBefore = (await resolver.requestsFor('subscribe', 'items', '2')).length;
  const rec = recorder();
  const c = client(rec.options);
  function Pair() {
    const [shown, setShown] = useState(2);
    return h(
      'div',
      null,
      h('button', { onClick: () => setShown((n) => n - 1) }, 'hide'),
      h(Item, { id: 2, label: 'a' }),
      shown > 1 ? h(Item, { id: '2', label: 'b' }) : null,
    );
  }
  const view = render(h(EntitySyncProvider, { client: c }, h(Pair)));
  await waitFor(() => {
    assert.match(text(view, 'a'), /^live/);
    assert.match(text(view, 'b'), /^live/);
  }, WAIT);
  assert.equal(subscribes(rec, 2).length, 1, 'one subscribe frame for two components');
  assert.equal((await resolver.requestsFor('subscribe', 'items', '2')).length, requestsBefore + 1);
  assert.equal((await gauges()).subscriptions, 1);

  // One of the two leaves: the key stays subscribed.
  act(() => view.getByText('hide').click());
  await new Promise((done) => setTimeout(done, 100));
  assert.equal(unsubscribes(rec, 2).length, 0);
  assert.equal((await gauges()).subscriptions, 1);

  // A push still reaches the one left.
  await resolver.set('items', '2', { rows: [{ id: 2, note: 'changed' }] });
  await resolver.notify(['items', '2']);
  await waitFor(() => {
    assert.match(text(view, 'a'), /changed/);
  }, WAIT);

  // The last one leaves: an unsubscribe frame, and the node's gauge drops.
  view.unmount();
  await until(() => unsubscribes(rec, 2).length === 1, 'the unsubscribe frame');
  await until(async () => (await gauges()).subscriptions === 0, 'the subscription gauge to drop');
  assert.equal(subscribes(rec, 2).length, 1);
});

test('a new id re-subscribes: the old key is unsubscribed, the new one rendered', async () => {
  await resolver.set('items', '3', { rows: [{ id: 3 }] });
  await resolver.set('items', '4', { rows: [{ id: 4 }] });
  const rec = recorder();
  const c = client(rec.options);
  const view = render(h(EntitySyncProvider, { client: c }, h(Item, { id: '3' })));
  await waitFor(() => {
    assert.match(text(view), /^live\|\d+\|\[\{"id":3\}\]/);
  }, WAIT);
  view.rerender(h(EntitySyncProvider, { client: c }, h(Item, { id: '4' })));
  await waitFor(() => {
    assert.match(text(view), /^live\|\d+\|\[\{"id":4\}\]/);
  }, WAIT);
  await until(() => unsubscribes(rec, 3).length === 1, 'the old key unsubscribed');
  assert.equal(subscribes(rec, 3).length, 1);
  assert.equal(subscribes(rec, 4).length, 1);
  await until(async () => (await gauges()).subscriptions === 1, 'one subscription held');
});

test('a provider with a url creates one client under StrictMode, subscribes once, and closes it on unmount', async () => {
  await resolver.set('items', '5', { rows: [{ id: 5 }] });
  const rec = recorder();
  const states = [];
  let seenClient;
  function Probe() {
    seenClient = useEntitySync();
    return null;
  }
  const options = {
    ...FAST,
    ...rec.options,
    onState: (state) => states.push(state),
  };
  const view = render(
    h(
      StrictMode,
      null,
      h(EntitySyncProvider, { url: wsUrl(), options }, h(Item, { id: '5' }), h(Probe)),
    ),
  );
  await waitFor(() => {
    assert.match(text(view), /^live\|\d+\|\[\{"id":5\}\]/);
  }, WAIT);
  assert.ok(seenClient instanceof EntitySyncClient);
  assert.equal(rec.seen.sockets, 1, 'one socket for the double mount');
  assert.equal(subscribes(rec, 5).length, 1, 'one subscribe frame');
  assert.deepEqual(await gauges(), { connections: 1, subscriptions: 1 });
  assert.ok(!states.includes('closed'), 'the live tree keeps its client open');

  view.unmount();
  await until(() => states.includes('closed'), 'the client the provider made to close');
  await until(async () => (await gauges()).connections === 0, 'the node to lose the connection');
  assert.equal(rec.seen.sockets, 1);
});

test('StrictMode with a given client: one subscribe for the double-mounted component', async () => {
  await resolver.set('items', '6', { rows: [{ id: 6 }] });
  const rec = recorder();
  const c = client(rec.options);
  await until(() => c.state === 'open', 'the client to connect');
  const view = render(
    h(StrictMode, null, h(EntitySyncProvider, { client: c }, h(Item, { id: 6 }))),
  );
  await waitFor(() => {
    assert.match(text(view), /^live/);
  }, WAIT);
  await new Promise((done) => setTimeout(done, 100));
  assert.equal(subscribes(rec, 6).length, 1);
  assert.equal(unsubscribes(rec, 6).length, 0);
  assert.equal((await gauges()).subscriptions, 1);
  view.unmount();
  await until(() => unsubscribes(rec, 6).length === 1, 'the unsubscribe frame');
  assert.equal(c.state, 'open', 'a given client is not closed by the provider');
});

test('a key the backend does not have fails with not_found in status and error', async () => {
  const c = client();
  let state;
  function Missing() {
    state = useEntity('items', '404');
    return h('p', { 'data-testid': 'item' }, state.status);
  }
  const view = render(h(EntitySyncProvider, { client: c }, h(Missing)));
  await waitFor(() => {
    assert.equal(text(view), 'failed');
  }, WAIT);
  assert.ok(state.error instanceof EntitySyncError);
  assert.equal(state.error.code, 'not_found');
  assert.equal(state.error.entity, 'items');
  assert.equal(state.error.id, '404');
  assert.deepEqual(state.rows, []);
  assert.equal(state.version, null);
});

test('after a node restart the client reconnects and the component shows the rows changed meanwhile', async () => {
  await resolver.set('items', '10', { rows: [{ id: 10, v: 'before' }] });
  const c = client();
  const view = render(h(EntitySyncProvider, { client: c }, h(Item, { id: '10' })));
  await waitFor(() => {
    assert.match(text(view), /^live\|\d+\|\[\{"id":10,"v":"before"\}\]/);
  }, WAIT);
  const oldNode = resolver.nodeId;

  await node.kill();
  await until(() => c.state === 'reconnecting', 'the client to notice');
  // While the node is away the rows held stay on screen.
  assert.match(text(view), /^live\|\d+\|\[\{"id":10,"v":"before"\}\]/);
  await resolver.set('items', '10', { rows: [{ id: 10, v: 'after' }] });
  await node.start();
  await resolver.waitRegistered(oldNode);

  await waitFor(() => {
    assert.match(text(view), /^live\|\d+\|\[\{"id":10,"v":"after"\}\]\|-$/);
  }, WAIT);
  assert.equal(c.state, 'open');
});
