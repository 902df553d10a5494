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
import { type ReactElement, type ReactNode } from 'react';
import { EntitySyncClient, type ClientOptions, type KeyValue } from '@entity-sync/client';
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
/**
 * Provides one `EntitySyncClient` to {@link useEntity} and
 * {@link useEntitySync} below it: the `client` given, or one it creates
 * for `url` (with `options`) after mounting and closes after unmounting.
 */
export declare function EntitySyncProvider(props: EntitySyncProviderProps): ReactElement;
/**
 * The provider's client: `null` on the server and in the first render in a
 * browser, before the provider's effect created it (a `client` given to the
 * provider is there at once).
 * @throws TypeError outside an {@link EntitySyncProvider}
 */
export declare function useEntitySync(): EntitySyncClient | null;
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
export declare function useEntity<Row = unknown>(entity: string, id: string | number): EntityState<Row>;
export type { ClientOptions, ConnectionState, KeyValue } from '@entity-sync/client';
export { EntitySyncClient, EntitySyncError } from '@entity-sync/client';
