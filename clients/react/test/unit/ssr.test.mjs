// Server rendering: react-dom/server in plain Node, with no DOM and a
// WebSocket global that fails the test when anything reads it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createElement as h } from 'react';
import { renderToString } from 'react-dom/server';

import { EntitySyncProvider, useEntity, useEntitySync } from '../../dist/index.js';

let reads = 0;
Object.defineProperty(globalThis, 'WebSocket', {
  configurable: true,
  get() {
    reads += 1;
    throw new Error('WebSocket read during server rendering');
  },
});

function Item({ id }) {
  const { status, rows, version, error } = useEntity('items', id);
  const client = useEntitySync();
  return h(
    'p',
    null,
    `${status}|${JSON.stringify(rows)}|${String(version)}|${String(error)}|${String(client)}`,
  );
}

test('renderToString of a tree using useEntity yields the loading state and opens nothing', () => {
  const html = renderToString(
    h(
      EntitySyncProvider,
      { url: 'wss://sync.example.com', options: { secret: 's' } },
      h(Item, { id: '1' }),
      h(Item, { id: 2 }),
    ),
  );
  assert.equal(html, '<p>loading|[]|null|null|null</p><p>loading|[]|null|null|null</p>');
  assert.equal(reads, 0);
});

test('outside a provider the hooks throw a TypeError', () => {
  assert.throws(() => renderToString(h(Item, { id: '1' })), {
    name: 'TypeError',
    message: /need an EntitySyncProvider/,
  });
});

test('a provider with neither client nor url is a TypeError', () => {
  assert.throws(() => renderToString(h(EntitySyncProvider, null, h('p'))), {
    name: 'TypeError',
    message: /needs a `client` or a `url`/,
  });
});
