// getToken passed through the provider's options, against a node that
// verifies subscribe tokens (--subscribe-token-jwks): every subscribe and
// every refresh asks the getToken of the latest render.

import './../support/dom.mjs';

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { createElement as h } from 'react';
import { cleanup, render, waitFor } from '@testing-library/react';

import { EntitySyncProvider, useEntity } from '../../dist/index.js';
import { DEADLINE_MS, NodeProcess, Resolver, until } from '../../../js/test/support/harness.mjs';
import { tokenKey } from '../../../js/test/support/tokens.mjs';

const WAIT = { timeout: DEADLINE_MS };

let key;
let node;
let resolver;

before(async () => {
  key = tokenKey();
  node = await new NodeProcess({
    name: 'react-node-tokens',
    args: ['--subscribe-token-jwks', key.jwksPath],
  }).start();
  resolver = await Resolver.start(node.grpcUrl, {
    entities: { items: 'shared' },
    name: 'react-resolver-tokens',
  });
});

after(async () => {
  cleanup();
  await resolver?.stop();
  await node?.stop();
  if (key) rmSync(key.dir, { recursive: true, force: true });
});

function Item({ id }) {
  const { status, rows, error } = useEntity('items', id);
  return h(
    'p',
    { 'data-testid': 'item' },
    `${status}|${JSON.stringify(rows)}|${error?.code ?? '-'}`,
  );
}

test('getToken goes through the provider: subscribes and refreshes call the latest one', async () => {
  await resolver.set('items', '1', { rows: [{ id: 1 }] });
  await resolver.set('items', '2', { rows: [{ id: 2 }] });
  const calls = [];
  const tree = (tag, id) =>
    h(
      EntitySyncProvider,
      {
        url: `ws://127.0.0.1:${node.wsPort}`,
        options: {
          minDelayMs: 100,
          maxDelayMs: 400,
          // A 3 s token: the client refreshes it after 1.5 s.
          getToken: (entity, keyId) => {
            calls.push(`${tag}:${entity}/${keyId}`);
            return key.mint({ entity, ids: [keyId], seconds: 3 });
          },
        },
      },
      h(Item, { id }),
    );
  const view = render(tree('first', '1'));
  const text = () => view.getByTestId('item').textContent;
  await waitFor(() => {
    assert.equal(text(), 'live|[{"id":1}]|-');
  }, WAIT);
  view.rerender(tree('second', '2'));
  await waitFor(() => {
    assert.equal(text(), 'live|[{"id":2}]|-');
  }, WAIT);
  assert.deepEqual(calls, ['first:items/1', 'second:items/2']);

  // The refresh, ahead of the expiry, without a render: the page stays live.
  await until(() => calls.includes('second:items/2') && calls.length >= 3, 'a token refresh');
  assert.ok(
    calls.slice(2).every((call) => call === 'second:items/2'),
    calls.join(', '),
  );
  await new Promise((done) => setTimeout(done, 2000));
  assert.equal(text(), 'live|[{"id":2}]|-', 'live past the first token’s expiry');
  view.unmount();
});
