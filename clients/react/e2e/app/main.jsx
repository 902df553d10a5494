// The e2e page: one provider (its own client, for the node given as `?ws=`)
// and one component following items/1. Built by vite in e2e/react.test.mjs.

import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { EntitySyncProvider, useEntity } from '@entity-sync/react';

function Item({ id }) {
  const { status, rows, version, error } = useEntity('items', id);
  return (
    <section>
      <p id="status">{status}</p>
      <p id="version">{version ?? '-'}</p>
      <ul id="rows">
        {rows.map((row) => (
          <li key={row.id}>
            {row.name} × {row.qty}
          </li>
        ))}
      </ul>
      {error && <p id="error">{error.code}</p>}
    </section>
  );
}

const ws = new URLSearchParams(location.search).get('ws');

createRoot(document.getElementById('root')).render(
  <StrictMode>
    <EntitySyncProvider url={ws} options={{ minDelayMs: 100, maxDelayMs: 400 }}>
      <Item id="1" />
    </EntitySyncProvider>
  </StrictMode>,
);
