/**
 * React bindings for entity-sync: {@link EntitySyncProvider} owns (or is
 * given) one `EntitySyncClient` for a tree, {@link useEntity} follows one
 * `(entity, id)` key through `useSyncExternalStore` over the client's
 * `store()`, {@link useEntitySync} hands the client itself out.
 *
 * - Server rendering: the provider creates its client in an effect, which
 *   does not run on the server, and `useEntity` answers the loading state
 *   there; nothing touches `WebSocket`.
 * - StrictMode: the provider's client is closed a macrotask after its effect
 *   is cleaned up, and kept when the effect runs again before that (React's
 *   development double mount), so a tree never holds two sockets. A key's
 *   subscription is released the same way, so a double mount sends one
 *   `subscribe`.
 * - Components that follow the same key share one store, one client
 *   listener, and so one subscription on the node (the client also shares
 *   keys among its own listeners).
 *
 * @example
 * <EntitySyncProvider url="wss://sync.example.com" options={{ secret }}>
 *   <Item id="101" />
 * </EntitySyncProvider>
 * function Item({ id }: { id: string }) {
 *   const { status, rows, error } = useEntity<Item>('items', id);
 * }
 *
 * @module
 */

import {
  createContext,
  createElement,
  useCallback,
  useContext,
  useEffect,
  useInsertionEffect,
  useMemo,
  useRef,
  useState,
  useSyncExternalStore,
  type ReactElement,
  type ReactNode,
} from 'react';
import {
  EntitySyncClient,
  type ClientOptions,
  type KeyStore,
  type KeyValue,
  type Unsubscribe,
} from '@entity-sync/client';

/**
 * What {@link useEntity} returns: the client's `KeyValue` of the key.
 * - `status`: `'loading'` until the first rows (and always on the server),
 *   `'live'` once rows came, `'failed'` after an error that ended the
 *   subscription (`not_found`, `forbidden`, …; passing ones are retried by
 *   the client, which sets `'live'` again with the next rows);
 * - `rows`: the last rows (kept after a failure; empty before the first);
 * - `version`: the version of those rows, `null` before the first;
 * - `error`: the `EntitySyncError` while `status` is `'failed'`, else `null`.
 */
export type EntityState<Row> = KeyValue<Row>;

/** A status of {@link EntityState}. */
export type EntityStatus = EntityState<unknown>['status'];

/** Props of {@link EntitySyncProvider}: `client`, or `url` with `options`. */
export interface EntitySyncProviderProps {
  /**
   * A client made by the application: used as it is, never closed by the
   * provider. Takes precedence over `url`.
   */
  readonly client?: EntitySyncClient;
  /**
   * URL of the node (`ws(s)://` or `http(s)://`): the provider creates its
   * own client for it once mounted in a browser, and closes it on unmount.
   * A new URL makes a new client.
   */
  readonly url?: string;
  /**
   * Options of the client the provider creates, read when it is created:
   * change `url` (or the provider's `key`) for a client with other options.
   * The callbacks (`getToken`, `onError`, `onState`) are an exception: the
   * client always calls the ones of the latest render.
   */
  readonly options?: ClientOptions;
  readonly children?: ReactNode;
}

/** `undefined`: no provider above; `null`: a provider without a client yet (server, first render). */
const ClientContext = createContext<EntitySyncClient | null | undefined>(undefined);
ClientContext.displayName = 'EntitySyncContext';

/** How long a released client or key waits for a remount before it is closed or unsubscribed. */
const RELEASE_DELAY_MS = 0;

/**
 * Provides one `EntitySyncClient` to {@link useEntity} and
 * {@link useEntitySync} below it: the `client` given, or one it creates
 * for `url` (with `options`) after mounting and closes after unmounting.
 */
export function EntitySyncProvider(props: EntitySyncProviderProps): ReactElement {
  const { client: given, url, options, children } = props;
  if (given === undefined && url === undefined) {
    throw new TypeError('EntitySyncProvider needs a `client` or a `url`');
  }
  const owned = useOwnedClient(given === undefined ? url : undefined, options);
  return createElement(ClientContext.Provider, { value: given ?? owned }, children);
}

interface Owned {
  readonly url: string;
  readonly client: EntitySyncClient;
  closeTimer: ReturnType<typeof setTimeout> | null;
}

/** The client the provider owns for `url`: `null` until its effect ran (and on the server). */
function useOwnedClient(
  url: string | undefined,
  options: ClientOptions | undefined,
): EntitySyncClient | null {
  const [client, setClient] = useState<EntitySyncClient | null>(null);
  const latest = useRef(options);
  const held = useRef<Owned | null>(null);
  // Before any passive effect of the commit: a child's subscribe may call
  // getToken at once, and must see this render's options.
  useInsertionEffect(() => {
    latest.current = options;
  });
  useEffect(() => {
    if (url === undefined) return undefined;
    let own = held.current;
    if (own?.url === url) {
      // Mounted again before the close was due (StrictMode): keep it.
      if (own.closeTimer !== null) clearTimeout(own.closeTimer);
      own.closeTimer = null;
    } else {
      own = { url, client: createClient(url, latest), closeTimer: null };
      held.current = own;
    }
    const current = own;
    setClient(current.client);
    return () => {
      current.closeTimer = setTimeout(() => {
        current.closeTimer = null;
        current.client.close();
        if (held.current === current) held.current = null;
      }, RELEASE_DELAY_MS);
    };
  }, [url]);
  return url === undefined ? null : client;
}

/** A client whose callbacks are those of the latest render's options. */
function createClient(
  url: string,
  latest: { readonly current: ClientOptions | undefined },
): EntitySyncClient {
  const first = latest.current ?? {};
  const now = (): ClientOptions => latest.current ?? first;
  const { getToken, onError, onState } = first;
  return new EntitySyncClient(url, {
    ...first,
    ...(getToken === undefined
      ? {}
      : { getToken: (entity: string, id: string) => (now().getToken ?? getToken)(entity, id) }),
    ...(onError === undefined
      ? {}
      : {
          onError: (error) => {
            (now().onError ?? onError)(error);
          },
        }),
    ...(onState === undefined
      ? {}
      : {
          onState: (state, info) => {
            (now().onState ?? onState)(state, info);
          },
        }),
  });
}

/**
 * The provider's client: `null` on the server and in the first render in a
 * browser, before the provider's effect created it (a `client` given to the
 * provider is there at once).
 * @throws TypeError outside an {@link EntitySyncProvider}
 */
export function useEntitySync(): EntitySyncClient | null {
  const client = useContext(ClientContext);
  if (client === undefined) {
    throw new TypeError('useEntitySync and useEntity need an EntitySyncProvider above them');
  }
  return client;
}

/** What the hooks of one client share for one key. */
interface Entry {
  readonly key: string;
  readonly store: KeyStore<unknown>;
  /** `onStoreChange` of every component following the key. */
  readonly listeners: Set<() => void>;
  /** Stops the store subscription (and so the key's client listener). */
  stop: Unsubscribe | null;
  releaseTimer: ReturnType<typeof setTimeout> | null;
}

/** Per client, the keys its components follow. Gone with the client. */
const entries = new WeakMap<EntitySyncClient, Map<string, Entry>>();

function keysOf(client: EntitySyncClient): Map<string, Entry> {
  let keys = entries.get(client);
  if (keys === undefined) {
    keys = new Map();
    entries.set(client, keys);
  }
  return keys;
}

function entryOf(client: EntitySyncClient, entity: string, id: string): Entry {
  const keys = keysOf(client);
  // Entities and ids hold no control characters: NUL does not collide.
  const key = `${entity}\u0000${id}`;
  let entry = keys.get(key);
  if (entry === undefined) {
    entry = {
      key,
      store: client.store(entity, id),
      listeners: new Set(),
      stop: null,
      releaseTimer: null,
    };
    keys.set(key, entry);
  }
  return entry;
}

/** Adds a component's listener; the last one leaving releases the key after a delay. */
function listen(client: EntitySyncClient, entry: Entry, onChange: () => void): Unsubscribe {
  const keys = keysOf(client);
  if (!keys.has(entry.key)) keys.set(entry.key, entry);
  entry.listeners.add(onChange);
  if (entry.releaseTimer !== null) clearTimeout(entry.releaseTimer);
  entry.releaseTimer = null;
  entry.stop ??= entry.store.subscribe(() => {
    for (const listener of [...entry.listeners]) listener();
  });
  return () => {
    entry.listeners.delete(onChange);
    if (entry.listeners.size > 0 || entry.releaseTimer !== null) return;
    entry.releaseTimer = setTimeout(() => {
      entry.releaseTimer = null;
      if (entry.listeners.size > 0) return;
      entry.stop?.();
      entry.stop = null;
      if (keys.get(entry.key) === entry) keys.delete(entry.key);
    }, RELEASE_DELAY_MS);
  };
}

/** The state before any rows, on the server, and without a client yet. */
const LOADING: EntityState<never> = Object.freeze({
  status: 'loading',
  rows: Object.freeze([]),
  version: null,
  error: null,
});

const noop: Unsubscribe = () => undefined;
const loading = (): EntityState<never> => LOADING;

/**
 * Follows the key `(entity, id)` of the provider's client: subscribed while
 * the component is mounted (shared with every other component following the
 * same key), re-subscribed when `entity` or `id` change, unsubscribed after
 * the last one unmounts. The client reconnects, resumes by version and
 * refreshes subscribe tokens by itself; the component re-renders with each
 * push.
 *
 * `Row` is the type the resolver's rows are expected to have; they are not
 * checked.
 */
export function useEntity<Row = unknown>(entity: string, id: string | number): EntityState<Row> {
  const client = useEntitySync();
  const key = String(id);
  const entry = useMemo(
    () => (client === null ? null : entryOf(client, entity, key)),
    [client, entity, key],
  );
  const subscribe = useCallback(
    (onChange: () => void): Unsubscribe =>
      client === null || entry === null ? noop : listen(client, entry, onChange),
    [client, entry],
  );
  const getSnapshot = useCallback(
    (): EntityState<unknown> => (entry === null ? LOADING : entry.store.get()),
    [entry],
  );
  return useSyncExternalStore(subscribe, getSnapshot, loading) as EntityState<Row>;
}

export type { ClientOptions, ConnectionState, KeyValue } from '@entity-sync/client';
export { EntitySyncClient, EntitySyncError } from '@entity-sync/client';
