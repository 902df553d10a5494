// Compiled (`npm run typecheck`), never run: how a caller types the package
// against the committed declarations. `@ts-expect-error` lines must stay errors.

import { StrictMode } from 'react';
import {
  EntitySyncClient,
  EntitySyncError,
  EntitySyncProvider,
  useEntity,
  useEntitySync,
  type EntityState,
  type EntityStatus,
} from '../../dist/index.js';

interface Item {
  id: number;
  name: string;
  qty: number;
}

export function ItemView({ id }: { id: string }) {
  const { status, rows, version, error } = useEntity<Item>('items', id);
  const first: Item | undefined = rows[0];
  const s: 'loading' | 'live' | 'failed' = status;
  const v: number | null = version;
  const e: EntitySyncError | null = error;
  // @ts-expect-error rows are read-only
  rows.push({ id: 1, name: 'x', qty: 1 });
  // @ts-expect-error no such field on Item
  void rows[0]?.price;
  return <p>{`${s} ${String(v)} ${first?.name ?? ''} ${e?.code ?? ''}`}</p>;
}

export function Count() {
  const state: EntityState<Item> = useEntity<Item>('items', 1);
  const status: EntityStatus = state.status;
  const client: EntitySyncClient | null = useEntitySync();
  // @ts-expect-error the id is a string or a number
  useEntity('items', { id: 1 });
  return <span>{`${status} ${client?.state ?? 'none'}`}</span>;
}

export const app = (
  <StrictMode>
    <EntitySyncProvider
      url="wss://sync.example.com"
      options={{ secret: 'session', getToken: async (entity, id) => `${entity}/${id}` }}
    >
      <ItemView id="101" />
      <Count />
    </EntitySyncProvider>
  </StrictMode>
);

export const given = (
  <EntitySyncProvider
    client={new EntitySyncClient('wss://sync.example.com', { autoConnect: false })}
  >
    <Count />
  </EntitySyncProvider>
);

// @ts-expect-error options must be the client's
export const wrong = <EntitySyncProvider url="wss://x" options={{ sekret: 'x' }} />;
