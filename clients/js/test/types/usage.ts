// Compiled (never run) by test/unit/build.test.mjs against the committed
// declarations: what a TypeScript caller may and may not write. Each
// `@ts-expect-error` fails the compile if the error it expects goes away.

import {
  EntitySyncClient,
  EntitySyncError,
  ERROR_CODES,
  type ClientErrorCode,
  type ConnectionState,
  type ErrorCode,
  type KeyValue,
  type PushMeta,
  type ResumeMeta,
  tokenLifetime,
  tokenRefreshDelay,
} from '../../dist/entity-sync.js';

interface Item {
  id: number;
  name: string;
}

const client = new EntitySyncClient('wss://sync.example.com', { secret: 's', path: '/rt/' });

const stop: () => void = client.subscribe<Item>('items', 1, (rows, meta: PushMeta) => {
  const first: Item | undefined = rows[0];
  const name: string | undefined = first?.name;
  const version: number = meta.version;
  void name;
  void version;
  // @ts-expect-error rows are read-only
  rows.push({ id: 2, name: 'x' });
});
stop();

const resumable = new EntitySyncClient('wss://sync.example.com', { resume: false });
resumable.subscribe<Item>('items', 2, () => {}, {
  onResumed: (meta: ResumeMeta) => {
    const held: number = meta.version;
    void held;
  },
});
// @ts-expect-error resume is a boolean
void new EntitySyncClient('wss://sync.example.com', { resume: 'yes' });

const code: ErrorCode = ERROR_CODES[0];
// @ts-expect-error not a code of the node
const wrong: ErrorCode = 'no_such_code';
void code;
void wrong;

client.on('error', (error: EntitySyncError) => {
  switch (error.code) {
    case 'forbidden':
    case 'client_listener_failed':
      break;
    // @ts-expect-error not a code of the node or the client
    case 'nope':
      break;
  }
});
client.on('state', (state: ConnectionState, info) => {
  const delay: number | undefined = info.delayMs;
  void delay;
  // @ts-expect-error states are a closed set
  if (state === 'gone') return;
});

const store = client.store<Item>('lists', '1');
const value: KeyValue<Item> = store.get();
const status: 'loading' | 'live' | 'failed' = value.status;
void status;
store.subscribe((next) => {
  const ids: number[] = next.rows.map((row) => row.id);
  void ids;
})();

async function loop(signal: AbortSignal): Promise<void> {
  for await (const { rows } of client.updates<Item>('items', 1, { signal })) {
    const names: string[] = rows.map((row) => row.name);
    void names;
  }
}
void loop;

client.send({ type: 'typing' });
// @ts-expect-error a pass-through message is an object
client.send('text');

// Lifecycle: chaining, autoConnect, a state union that includes 'disconnected'.
const later: EntitySyncClient = new EntitySyncClient('ws://127.0.0.1:8080', {
  autoConnect: false,
}).connect();
later.disconnect().connect();
later.close();
const idle: ConnectionState = 'disconnected';
void idle;
// @ts-expect-error autoConnect is a boolean
new EntitySyncClient('ws://h', { autoConnect: 'yes' });

// Events: once/off take the same typed listeners as on.
const onState = (state: ConnectionState): void => {
  void state;
};
const stopOnce: () => void = client.once('state', onState);
stopOnce();
const same: EntitySyncClient = client.off('state', onState).off('error');
void same;
client.once('error', (error) => {
  const retryable: boolean = error.retryable;
  const entity: string | undefined = error.entity;
  void retryable;
  void entity;
});
// @ts-expect-error not an event of the client
client.on('message', () => {});
// @ts-expect-error an error listener gets an EntitySyncError, not a state
client.once('error', (state: ConnectionState) => state);
// @ts-expect-error off takes the event's listener type
client.off('state', (error: EntitySyncError) => error);

// Errors: a class, so instanceof narrows an unknown.
function describe(err: unknown): string {
  if (err instanceof EntitySyncError) {
    const code: ErrorCode | ClientErrorCode = err.code;
    const name: 'EntitySyncError' = err.name;
    return `${name} ${code} ${err.message}`;
  }
  return String(err);
}
void describe(new EntitySyncError('forbidden', 'no', { entity: 'lists', id: '1' }));
// @ts-expect-error the code is one of the known codes
new EntitySyncError('nope', 'x');

// Subscribe tokens and the heartbeat.
const tokened = new EntitySyncClient('wss://sync.example.com', {
  getToken: async (entity: string, id: string) => `${entity}.${id}.sig`,
  heartbeatIntervalMs: 10_000,
  heartbeatTimeoutMs: 3_000,
});
void new EntitySyncClient('wss://sync.example.com', { getToken: () => 'a.b.c' });
// @ts-expect-error getToken gives a string (or a promise of one)
void new EntitySyncClient('wss://sync.example.com', { getToken: () => 42 });
// @ts-expect-error the heartbeat interval is a number of ms
void new EntitySyncClient('wss://sync.example.com', { heartbeatIntervalMs: '15s' });
tokened.on('state', (_state, info) => {
  const dead: boolean | undefined = info.heartbeatTimeout;
  void dead;
});
tokened.on('error', (error) => {
  if (error.code === 'token_expired' || error.code === 'client_token_unavailable') return;
});
const refreshIn: number = tokenRefreshDelay(60_000);
const lifetime: number | null = tokenLifetime('a.b.c');
void refreshIn;
void lifetime;
