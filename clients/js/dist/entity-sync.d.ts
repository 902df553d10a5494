/**
 * Client for entity-sync: subscribe to `(entity, id)` keys over one websocket
 * and get each key's rows pushed whenever the backend notifies a change.
 *
 * Dependency-free ES module for browsers and Node (Node 22's global
 * `WebSocket`, or any constructor passed as `options.WebSocket`). It speaks
 * the JSON envelope protocol of an entity-sync node (not the
 * `--compat-bare-rows` mode, whose bare row frames carry no key or version).
 *
 * What it takes care of:
 * - one server subscription per key, however many listeners share it;
 * - reconnecting with jittered exponential backoff, then sending the secret
 *   again and resubscribing every key with the version it holds: the node
 *   answers `current` for a key unchanged since (nothing to apply) and a
 *   fresh snapshot for the others;
 * - dropping a push whose `version` is lower than the one held for the key;
 * - retrying a subscribe refused for a passing reason (no resolver yet,
 *   resolver timeout or error), with the same backoff;
 * - with `getToken`, a signed subscribe token in every subscribe, refreshed
 *   ahead of its expiry without the page noticing;
 * - a heartbeat (`ping` when the connection has been quiet) that finds a
 *   connection dead without a close, and reconnects;
 * - in browsers, reconnecting at once when the network comes back and
 *   checking the connection when the page becomes visible again.
 *
 * @example
 * import { EntitySyncClient } from '@entity-sync/client';
 * const client = new EntitySyncClient('wss://sync.example.com', { secret: token });
 * const off = client.subscribe<Item>('items', '101', (rows, meta) => render(rows, meta.version));
 * // later: off(); client.disconnect(); … client.connect(); … client.close();
 *
 * @module
 */
/**
 * Every `code` an error frame of the node may carry: the node's stable error
 * codes (`ErrorCode::ALL` in its `protocol` module; a test of the node checks
 * this list against it).
 */
export declare const ERROR_CODES: readonly ["invalid_json", "unknown_action", "invalid_body", "message_too_large", "binary_unsupported", "too_many_subscriptions", "not_subscribed", "forbidden", "not_found", "no_resolver", "resolver_error", "resolver_timeout", "no_pass_through", "overloaded", "rate_limited", "secret_too_long", "token_invalid", "token_expired"];
/** A code of the node's error frames. */
export type ErrorCode = (typeof ERROR_CODES)[number];
/** Codes of problems the client finds itself (never sent by a node). */
export declare const CLIENT_ERROR_CODES: readonly ["client_connect_failed", "client_invalid_frame", "client_listener_failed", "client_token_unavailable"];
/** A code of a problem the client found itself. */
export type ClientErrorCode = (typeof CLIENT_ERROR_CODES)[number];
/** What an {@link EntitySyncError} carries besides its code and message. */
export interface EntitySyncErrorOptions {
    /** The key's entity, when the error concerns one key. */
    readonly entity?: string;
    /** The key's id, when the error concerns one key. */
    readonly id?: string;
    /** What caused it: a listener's exception, the WebSocket constructor's. */
    readonly cause?: unknown;
}
/**
 * An error frame of the node (`code` one of {@link ERROR_CODES}) or a problem
 * the client found (`code` one of {@link CLIENT_ERROR_CODES}). Every error the
 * client hands out (the `error` event, `onError` callbacks, a store's
 * `error`) is one: `error instanceof EntitySyncError` holds.
 *
 * `JSON.stringify` gives `{ name, code, message, entity?, id?, retryable }`
 * (an `Error`'s `message` is not enumerable by itself).
 */
export declare class EntitySyncError extends Error {
    /** Always `'EntitySyncError'`. */
    readonly name: 'EntitySyncError';
    /** The node's stable code, or the client's own (`client_…`). */
    readonly code: ErrorCode | ClientErrorCode;
    /** The key's entity: present when the error concerns one key. */
    readonly entity?: string;
    /** The key's id: present when the error concerns one key. */
    readonly id?: string;
    /**
     * `true` when the node refused the key for a reason that may pass by
     * itself (`isRetryable(code)`): the client subscribes it again after a
     * backoff. `false` for every other error.
     */
    readonly retryable: boolean;
    /**
     * @param message human-readable; a resolver's own message for `forbidden`
     *   and `resolver_error`
     */
    constructor(code: ErrorCode | ClientErrorCode, message: string, options?: EntitySyncErrorOptions);
    /** What `JSON.stringify` writes: the fields, `message` included. */
    toJSON(): {
        name: 'EntitySyncError';
        code: ErrorCode | ClientErrorCode;
        message: string;
        entity?: string;
        id?: string;
        retryable: boolean;
    };
}
/**
 * Whether the node refused a key for a reason that may pass by itself, or
 * the client met a problem it tries again by itself (`getToken` failing).
 */
export declare function isRetryable(code: string): boolean;
/** The node's default websocket path (`--ws-path`). */
export declare const DEFAULT_PATH = "/ws/entity-sync/";
/**
 * State of the connection to the node:
 * - `disconnected`: not connected and not trying to be: before
 *   {@link EntitySyncClient.connect} (with `autoConnect: false`) and after
 *   {@link EntitySyncClient.disconnect}; `connect()` starts again;
 * - `connecting`, `open`: a socket is being opened, is open;
 * - `reconnecting`: the socket was lost, the next attempt is scheduled;
 * - `closed`: after {@link EntitySyncClient.close}, for good.
 */
export type ConnectionState = 'disconnected' | 'connecting' | 'open' | 'reconnecting' | 'closed';
/** What comes with a state change. */
export interface StateInfo {
    /** With `reconnecting`: time until the next attempt. */
    readonly delayMs?: number;
    /** With `reconnecting`: how many attempts failed in a row. */
    readonly attempt?: number;
    /** With `reconnecting`: close code of the socket, when it closed with one (1001: node shutting down). */
    readonly closeCode?: number;
    /**
     * With `reconnecting`: `true` when the heartbeat found the connection dead
     * (no frame at all within `heartbeatTimeoutMs` of a ping) and the client
     * closed it.
     */
    readonly heartbeatTimeout?: boolean;
}
/** What comes with the rows of a push. */
export interface PushMeta {
    readonly entity: string;
    readonly id: string;
    /** The change this push reflects (bus sequence, or the resolver's own version). */
    readonly version: number;
    /** True for the push that answers a (re)subscribe. */
    readonly snapshot: boolean;
}
/** Called with a key's rows, in the resolver's order. */
export type RowsListener<Row> = (rows: readonly Row[], meta: PushMeta) => void;
/** Stops what it was returned by. */
export type Unsubscribe = () => void;
/** What comes with a resumed key (see {@link SubscribeOptions.onResumed}). */
export interface ResumeMeta {
    readonly entity: string;
    readonly id: string;
    /** The version held, which the node found still current. */
    readonly version: number;
}
/** Per-listener options of {@link EntitySyncClient.subscribe}. */
export interface SubscribeOptions {
    /** Error frames of this key only (they reach the client's `error` listeners too). */
    readonly onError?: (error: EntitySyncError) => void;
    /**
     * A resubscribe that carried the version held was answered `current`: the
     * key has not changed since, the rows held stay as they are and no
     * snapshot follows (the rows listener is not called). The key is live
     * again.
     */
    readonly onResumed?: (meta: ResumeMeta) => void;
}
/** The part of a WebSocket the client uses. */
export interface WebSocketLike {
    readonly readyState: number;
    send(data: string): void;
    close(code?: number, reason?: string): void;
    onopen: ((event: unknown) => void) | null;
    onmessage: ((event: {
        data: unknown;
    }) => void) | null;
    onclose: ((event: {
        code?: number;
    }) => void) | null;
    onerror: ((event: unknown) => void) | null;
}
/** A WebSocket constructor: the global one, or a library's. */
export type WebSocketConstructor = new (url: string) => WebSocketLike;
/** Options of {@link EntitySyncClient}. */
export interface ClientOptions {
    /** Sent after every connect, before the subscribes. Never logged or put in an error. */
    readonly secret?: string;
    /**
     * Websocket path, replacing the URL's. Without it, a URL with no path gets
     * {@link DEFAULT_PATH}, and a URL with a path keeps it.
     */
    readonly path?: string;
    /** Constructor to use; defaults to `globalThis.WebSocket`. */
    readonly WebSocket?: WebSocketConstructor;
    /**
     * Connect from the constructor (default `true`). With `false` the client
     * starts `disconnected`: subscribe, set listeners, then call
     * {@link EntitySyncClient.connect}.
     */
    readonly autoConnect?: boolean;
    /** Ceiling of the first reconnect delay, doubling from there (default 500). */
    readonly minDelayMs?: number;
    /** Largest reconnect delay (default 15000). */
    readonly maxDelayMs?: number;
    /** Jitter source, like `Math.random` (the default). */
    readonly random?: () => number;
    /**
     * Resume by version (default `true`): a resubscribe (after a reconnect,
     * `connect()` after `disconnect()`, a retry) carries the version of the
     * rows held for the key, and the node answers `current` instead of a
     * snapshot when the key has not changed since. `false`: every subscribe
     * asks for a snapshot.
     */
    readonly resume?: boolean;
    /**
     * Gives the signed subscribe token (a compact JWS the application issues)
     * for a key. With it, every subscribe frame carries a token from it: the
     * first subscribe, the resubscribes after a reconnect (still with the
     * version held, so resume works), the retries. The client reads the
     * token's `exp` (and `iat`) claims, without verifying anything, and gets a
     * new token ahead of the expiry (see {@link tokenRefreshDelay}): it sends
     * it in a subscribe with the version held, which the node answers
     * `current` with no push, so no listener is called. One call at a time per
     * key; a call that throws or rejects is reported as a
     * `client_token_unavailable` error and made again after a jittered,
     * capped backoff (`minDelayMs`, `maxDelayMs`). A token still fresh is used
     * again for a resubscribe rather than asking for a new one.
     */
    readonly getToken?: (entity: string, id: string) => Promise<string> | string;
    /**
     * Sends a `ping` when no frame at all has come from the node for this long
     * (default 15000; `0`: never).
     */
    readonly heartbeatIntervalMs?: number;
    /**
     * After a ping, how long to wait for any frame (the `pong` or anything
     * else) before the connection counts as dead: the client closes it and
     * reconnects, resuming by version (default 5000; `0`: pings are still sent
     * but never wait for an answer). A connection that dies silently is found
     * within `heartbeatIntervalMs + heartbeatTimeoutMs` of its last frame.
     */
    readonly heartbeatTimeoutMs?: number;
    /** Same as `client.on('error', …)` from the start. */
    readonly onError?: (error: EntitySyncError) => void;
    /** Same as `client.on('state', …)` from the start. */
    readonly onState?: (state: ConnectionState, info: StateInfo) => void;
}
/**
 * What a client emits, by event name: the listener type of each event for
 * {@link EntitySyncClient.on}, {@link EntitySyncClient.once} and
 * {@link EntitySyncClient.off}.
 */
export interface ClientEvents {
    /** Every state change, with what comes with it. */
    state: (state: ConnectionState, info: StateInfo) => void;
    /** Every error frame of the node, and the client's own problems. */
    error: (error: EntitySyncError) => void;
}
/** An event name of {@link ClientEvents}. */
export type ClientEventName = keyof ClientEvents;
/** A key's current value, as {@link KeyStore} holds it. */
export interface KeyValue<Row> {
    /** `loading` until the first push; `failed` after an error that ended the subscription. */
    readonly status: 'loading' | 'live' | 'failed';
    /** Rows of the last push (kept after a failure; empty before the first push). */
    readonly rows: readonly Row[];
    /** Version of the last push, `null` before the first one. */
    readonly version: number | null;
    /** The error that ended the subscription, while `status` is `failed`. */
    readonly error: EntitySyncError | null;
}
/**
 * One key as a store: `subscribe(run)` calls `run` at once with the current
 * value and again on every change, and returns the function that stops it
 * (the Svelte store contract); `get()` returns the current value, the same
 * object until it changes (what React's `useSyncExternalStore` needs). The
 * key is subscribed on the node while the store has at least one listener.
 */
export interface KeyStore<Row> {
    subscribe(run: (value: KeyValue<Row>) => void): Unsubscribe;
    get(): KeyValue<Row>;
}
/** One push, as {@link EntitySyncClient.updates} yields it. */
export interface Update<Row> {
    readonly rows: readonly Row[];
    readonly meta: PushMeta;
}
/** Options of {@link EntitySyncClient.updates}. */
export interface UpdatesOptions {
    /** Ends the iteration when aborted. */
    readonly signal?: AbortSignal;
}
/**
 * Text of a subscribe frame; with `version` (the version of the rows held),
 * the node answers `subscribed` with `current: true` and no snapshot when
 * the key has not changed since.
 */
export declare function encodeSubscribe(entity: string, id: string | number, version?: number | null, token?: string | null): string;
/** Text of a ping frame: the node answers `{"action":"pong"}`. */
export declare function encodePing(): string;
/**
 * The claims of a compact JWS (`header.payload.signature`) that the client
 * uses: `exp` and `iat`, in seconds since the epoch, when they are numbers.
 * Nothing is verified (the node does that); `null` when the token is not a
 * JWS with a JSON object payload.
 */
export declare function decodeTokenClaims(token: string): {
    exp?: number;
    iat?: number;
} | null;
/**
 * How long a token obtained now stays valid, in ms, or `null` when it has no
 * `exp`. The shorter of `exp` minus the local clock and, when it has one,
 * `exp - iat` (its whole lifetime on the issuer's clock): a client clock
 * behind the issuer's does not make it wait past the expiry, and a token
 * issued a while ago is not taken for a fresh one.
 */
export declare function tokenLifetime(token: string, nowMs?: number): number | null;
/** The shortest wait before a token is refreshed, whatever its lifetime. */
export declare const MIN_TOKEN_REFRESH_MS = 1000;
/**
 * When to get a new token, in ms after obtaining one valid for `lifetimeMs`:
 * 30 s before it expires or at 80% of its lifetime, whichever is earlier,
 * but never before half of it (nor before {@link MIN_TOKEN_REFRESH_MS}).
 * A 1 h token: after 48 min; a 2 min token: after 90 s; a 60 s token: after
 * 30 s; a 3 s token: after 1.5 s.
 */
export declare function tokenRefreshDelay(lifetimeMs: number): number;
/** Text of an unsubscribe frame. */
export declare function encodeUnsubscribe(entity: string, id: string | number): string;
/** Text of a secret frame. */
export declare function encodeSecret(secret: string): string;
/**
 * Delay before reconnect attempt number `attempt` (0-based): exponential,
 * capped, with "equal jitter" (half fixed, half random) so that many clients
 * dropped by one node restart do not all come back in the same instant.
 */
export declare function backoffDelay(attempt: number, minMs: number, maxMs: number, random?: () => number): number;
/**
 * The websocket URL to open: `http(s)://` becomes `ws(s)://`; `path` replaces
 * the URL's path; a URL without a path gets {@link DEFAULT_PATH}.
 */
export declare function websocketUrl(url: string, path?: string): string;
/**
 * Keeps a set of entity subscriptions alive over one websocket.
 *
 * Lifecycle: the constructor connects (unless `autoConnect: false`);
 * {@link disconnect} closes the socket and keeps the subscriptions, which
 * {@link connect} subscribes again; {@link close} ends the client for good.
 *
 * Events ({@link on}, {@link once}, {@link off}) are a small typed emitter of
 * its own rather than an `EventTarget`: listeners keep their plain
 * `(state, info)` and `(error)` signatures (no `CustomEvent` to unwrap, no
 * `detail`), each event's listener type is checked against
 * {@link ClientEvents}, `on` returns the function that stops the listener,
 * and a listener that throws is reported as a `client_listener_failed` error
 * instead of reaching the host's global error handler.
 */
export declare class EntitySyncClient {
    #private;
    /**
     * Connects right away (unless `options.autoConnect` is `false`) and keeps
     * reconnecting until {@link disconnect} or {@link close}.
     * @param url `ws://`, `wss://`, `http://` or `https://` URL of the node,
     *   e.g. `wss://sync.example.com` or `ws://127.0.0.1:8080/ws/entity-sync/`
     */
    constructor(url: string, options?: ClientOptions);
    /** The websocket URL the client connects to. */
    get url(): string;
    /** The connection's state now. */
    get state(): ConnectionState;
    /**
     * Opens the connection: sends the secret, then subscribes every key
     * registered (those of listeners added while disconnected, and those kept
     * by {@link disconnect}), and keeps reconnecting with backoff until
     * {@link disconnect} or {@link close}. Does nothing while already
     * connecting, open or reconnecting.
     * @returns the client, for chaining (`new EntitySyncClient(url, { autoConnect: false }).connect()`)
     * @throws Error after {@link close}, which is final: make a new client
     */
    connect(): this;
    /**
     * Closes the socket and stops reconnecting (a scheduled reconnect or retry
     * is cancelled), but keeps every subscription, its listeners and its last
     * rows: a later {@link connect} subscribes the keys again, each with the
     * version it holds (a key changed since gets a fresh snapshot, an
     * unchanged one is resumed as it is). The state becomes `disconnected`.
     * Does nothing when not connected.
     * @returns the client, for chaining
     */
    disconnect(): this;
    /**
     * Listens to an event of {@link ClientEvents} (`state` or `error`) until the
     * returned function or {@link off} stops it. A function is registered once
     * per event: adding it again changes nothing (except that `on` makes a
     * {@link once} listener a lasting one).
     * @returns the function that stops this listener
     */
    on<E extends ClientEventName>(event: E, listener: ClientEvents[E]): Unsubscribe;
    /**
     * Listens to the next emission of an event only.
     * @returns the function that stops it before then
     */
    once<E extends ClientEventName>(event: E, listener: ClientEvents[E]): Unsubscribe;
    /**
     * Stops a listener added with {@link on}, {@link once} or the `onState` /
     * `onError` options; without a listener, every listener of the event.
     * @returns the client, for chaining
     */
    off<E extends ClientEventName>(event: E, listener?: ClientEvents[E]): this;
    /**
     * Listens to a key's rows. The first listener of a key sends a subscribe
     * frame (now, or as soon as the socket is open); a later one shares it and
     * is called at once (in a microtask) with the rows already held.
     *
     * `Row` is the type the caller expects the resolver's rows to have; the
     * client does not check it.
     * @returns the function that stops this listener; the node subscription
     *   ends with the key's last listener
     */
    subscribe<Row = unknown>(entity: string, id: string | number, onRows: RowsListener<Row>, options?: SubscribeOptions): Unsubscribe;
    /** Stops every listener of a key and ends its node subscription. */
    unsubscribe(entity: string, id: string | number): void;
    /**
     * A key as a store (see {@link KeyStore}): what UI frameworks bind to. The
     * store subscribes the key while it has listeners.
     */
    store<Row = unknown>(entity: string, id: string | number): KeyStore<Row>;
    /**
     * A key's pushes as an async iterator: `for await (const { rows, meta } of
     * client.updates('items', 1)) …`. Latest state wins: while the loop body
     * runs, only the newest push is kept for the next turn. The key is
     * subscribed until the loop ends (`break`, `signal` aborted, or
     * {@link close}).
     */
    updates<Row = unknown>(entity: string, id: string | number, options?: UpdatesOptions): AsyncIterableIterator<Update<Row>>;
    /**
     * Changes the secret: what the client may see can change either way. The
     * node re-checks every key it holds with the new secret by itself
     * (`subscribed` and a fresh snapshot, or an error that ends the key); the
     * keys it refused before are subscribed again here.
     */
    setSecret(secret: string): void;
    /**
     * Sends a pass-through message (one with no `action`): the node hands it to
     * the backends that asked for them, with this connection's secret.
     * @returns false when not connected (the message is not queued)
     */
    send(message: Record<string, unknown>): boolean;
    /** Last rows and version delivered for a key, if any. */
    current<Row = unknown>(entity: string, id: string | number): {
        rows: readonly Row[];
        version: number;
    } | null;
    /**
     * Ends the client for good: closes the socket, no reconnect, no more rows;
     * `updates()` iterators end. The state becomes `closed`, and
     * {@link connect} throws from then on. To go offline for a while and come
     * back with the same subscriptions, use {@link disconnect}.
     */
    close(): void;
}
