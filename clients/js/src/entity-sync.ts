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
export const ERROR_CODES = Object.freeze([
  'invalid_json',
  'unknown_action',
  'invalid_body',
  'message_too_large',
  'binary_unsupported',
  'too_many_subscriptions',
  'not_subscribed',
  'forbidden',
  'not_found',
  'no_resolver',
  'resolver_error',
  'resolver_timeout',
  'no_pass_through',
  'overloaded',
  'rate_limited',
  'secret_too_long',
  'token_invalid',
  'token_expired',
] as const);

/** A code of the node's error frames. */
export type ErrorCode = (typeof ERROR_CODES)[number];

/** Codes of problems the client finds itself (never sent by a node). */
export const CLIENT_ERROR_CODES = Object.freeze([
  'client_connect_failed',
  'client_invalid_frame',
  'client_listener_failed',
  'client_token_unavailable',
] as const);

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
export class EntitySyncError extends Error {
  static {
    // On the prototype and not enumerable, like `TypeError.prototype.name`.
    Object.defineProperty(this.prototype, 'name', {
      value: 'EntitySyncError',
      writable: true,
      configurable: true,
    });
  }

  /** Always `'EntitySyncError'`. */
  declare readonly name: 'EntitySyncError';
  /** The node's stable code, or the client's own (`client_…`). */
  declare readonly code: ErrorCode | ClientErrorCode;
  /** The key's entity: present when the error concerns one key. */
  declare readonly entity?: string;
  /** The key's id: present when the error concerns one key. */
  declare readonly id?: string;
  /**
   * `true` when the node refused the key for a reason that may pass by
   * itself (`isRetryable(code)`): the client subscribes it again after a
   * backoff. `false` for every other error.
   */
  declare readonly retryable: boolean;

  /**
   * @param message human-readable; a resolver's own message for `forbidden`
   *   and `resolver_error`
   */
  constructor(
    code: ErrorCode | ClientErrorCode,
    message: string,
    options: EntitySyncErrorOptions = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    // Assigned here (`declare` fields emit nothing), in this order, and only
    // when present: a keyless error has no `entity` property at all.
    this.code = code;
    if (options.entity !== undefined) this.entity = options.entity;
    if (options.id !== undefined) this.id = options.id;
    this.retryable = isRetryable(code);
  }

  /** What `JSON.stringify` writes: the fields, `message` included. */
  toJSON(): {
    name: 'EntitySyncError';
    code: ErrorCode | ClientErrorCode;
    message: string;
    entity?: string;
    id?: string;
    retryable: boolean;
  } {
    return {
      name: this.name,
      code: this.code,
      message: this.message,
      ...(this.entity === undefined ? {} : { entity: this.entity }),
      ...(this.id === undefined ? {} : { id: this.id }),
      retryable: this.retryable,
    };
  }
}

/**
 * Error codes after which the node holds no subscription for the key. The
 * client keeps the key, so a reconnect or a new secret tries again.
 */
const SUBSCRIPTION_ENDED: ReadonlySet<string> = new Set<ErrorCode>([
  'forbidden',
  'token_invalid',
  'token_expired',
  'not_found',
  'no_resolver',
  'resolver_error',
  'resolver_timeout',
  'too_many_subscriptions',
]);

/**
 * Of those, the ones that may pass by themselves (a backend still starting or
 * restarting, a token that expired): the client subscribes again, after a
 * backoff (`token_expired`: at once with a fresh token the first time). A
 * `forbidden`, `not_found` or `token_invalid` answer would come back the
 * same, so it waits for {@link EntitySyncClient.setSecret} or a reconnect
 * instead.
 */
const RETRYABLE: ReadonlySet<string> = new Set<ErrorCode>([
  'no_resolver',
  'resolver_error',
  'resolver_timeout',
  'token_expired',
]);

/**
 * The client's own problems that it gets over by itself:
 * `client_token_unavailable` (`getToken` failed), called again after a
 * backoff.
 */
const CLIENT_RETRYABLE: ReadonlySet<string> = new Set<ClientErrorCode>([
  'client_token_unavailable',
]);

/**
 * Whether the node refused a key for a reason that may pass by itself, or
 * the client met a problem it tries again by itself (`getToken` failing).
 */
export function isRetryable(code: string): boolean {
  return RETRYABLE.has(code) || CLIENT_RETRYABLE.has(code);
}

/** `WebSocket.OPEN`, spelled out so that a passed-in constructor need not define it. */
const OPEN = 1;

/** A connection that stayed open this long resets the reconnect backoff. */
const STABLE_CONNECTION_MS = 5000;

/** The node's default websocket path (`--ws-path`). */
export const DEFAULT_PATH = '/ws/entity-sync/';

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
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code?: number }) => void) | null;
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
export function encodeSubscribe(
  entity: string,
  id: string | number,
  version?: number | null,
  token?: string | null,
): string {
  const body: { entity: string; id: string; version?: number; token?: string } = {
    entity,
    id: String(id),
  };
  if (isResumable(version)) body.version = version;
  if (typeof token === 'string') body.token = token;
  return JSON.stringify({ action: 'subscribe', body });
}

/** Text of a ping frame: the node answers `{"action":"pong"}`. */
export function encodePing(): string {
  return JSON.stringify({ action: 'ping' });
}

/**
 * The claims of a compact JWS (`header.payload.signature`) that the client
 * uses: `exp` and `iat`, in seconds since the epoch, when they are numbers.
 * Nothing is verified (the node does that); `null` when the token is not a
 * JWS with a JSON object payload.
 */
export function decodeTokenClaims(token: string): { exp?: number; iat?: number } | null {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  const payload = parts[1] ?? '';
  if (!/^[A-Za-z0-9_-]*$/.test(payload)) return null;
  let claims: unknown;
  try {
    const base64 = payload.replace(/-/g, '+').replace(/_/g, '/');
    const binary = atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), '='));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    claims = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch {
    return null;
  }
  if (claims === null || typeof claims !== 'object' || Array.isArray(claims)) return null;
  const { exp, iat } = claims as { exp?: unknown; iat?: unknown };
  const out: { exp?: number; iat?: number } = {};
  if (typeof exp === 'number' && Number.isFinite(exp)) out.exp = exp;
  if (typeof iat === 'number' && Number.isFinite(iat)) out.iat = iat;
  return out;
}

/**
 * How long a token obtained now stays valid, in ms, or `null` when it has no
 * `exp`. The shorter of `exp` minus the local clock and, when it has one,
 * `exp - iat` (its whole lifetime on the issuer's clock): a client clock
 * behind the issuer's does not make it wait past the expiry, and a token
 * issued a while ago is not taken for a fresh one.
 */
export function tokenLifetime(token: string, nowMs: number = Date.now()): number | null {
  const claims = decodeTokenClaims(token);
  if (claims?.exp === undefined) return null;
  const byClock = claims.exp * 1000 - nowMs;
  return claims.iat === undefined ? byClock : Math.min(byClock, (claims.exp - claims.iat) * 1000);
}

/** The shortest wait before a token is refreshed, whatever its lifetime. */
export const MIN_TOKEN_REFRESH_MS = 1000;

/**
 * When to get a new token, in ms after obtaining one valid for `lifetimeMs`:
 * 30 s before it expires or at 80% of its lifetime, whichever is earlier,
 * but never before half of it (nor before {@link MIN_TOKEN_REFRESH_MS}).
 * A 1 h token: after 48 min; a 2 min token: after 90 s; a 60 s token: after
 * 30 s; a 3 s token: after 1.5 s.
 */
export function tokenRefreshDelay(lifetimeMs: number): number {
  const delay = Math.max(lifetimeMs / 2, Math.min(lifetimeMs * 0.8, lifetimeMs - 30_000));
  return Math.max(MIN_TOKEN_REFRESH_MS, delay);
}

/** A version a node takes in a subscribe: an integer in 0..2^53-1. */
function isResumable(version: number | null | undefined): version is number {
  return typeof version === 'number' && Number.isSafeInteger(version) && version >= 0;
}

/** Text of an unsubscribe frame. */
export function encodeUnsubscribe(entity: string, id: string | number): string {
  return JSON.stringify({ action: 'unsubscribe', body: { entity, id: String(id) } });
}

/** Text of a secret frame. */
export function encodeSecret(secret: string): string {
  return JSON.stringify({ action: 'secret', body: secret });
}

/**
 * Delay before reconnect attempt number `attempt` (0-based): exponential,
 * capped, with "equal jitter" (half fixed, half random) so that many clients
 * dropped by one node restart do not all come back in the same instant.
 */
export function backoffDelay(
  attempt: number,
  minMs: number,
  maxMs: number,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}

/**
 * The websocket URL to open: `http(s)://` becomes `ws(s)://`; `path` replaces
 * the URL's path; a URL without a path gets {@link DEFAULT_PATH}.
 */
export function websocketUrl(url: string, path?: string): string {
  const parsed = new URL(url);
  if (parsed.protocol === 'http:') parsed.protocol = 'ws:';
  else if (parsed.protocol === 'https:') parsed.protocol = 'wss:';
  if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
    throw new TypeError(`not a websocket URL: ${parsed.protocol}//…`);
  }
  if (path !== undefined) parsed.pathname = path;
  else if (parsed.pathname === '/' || parsed.pathname === '') parsed.pathname = DEFAULT_PATH;
  return parsed.toString();
}

interface Listener {
  readonly onRows: RowsListener<unknown>;
  readonly onError: ((error: EntitySyncError) => void) | undefined;
  readonly onResumed: ((meta: ResumeMeta) => void) | undefined;
}

interface Subscription {
  readonly entity: string;
  readonly id: string;
  readonly listeners: Set<Listener>;
  /** Highest version delivered, kept across reconnects. */
  version: number | null;
  /** Last rows delivered. */
  rows: readonly unknown[] | null;
  state: 'pending' | 'subscribed' | 'failed';
  /** The next push answers a subscribe. */
  awaitingSnapshot: boolean;
  /**
   * Version of the rows held when they are known to be resolved for the
   * current secret: sent with a resubscribe to resume. `null` before the
   * first rows, and after a new secret until rows resolved for it arrive.
   */
  resumeVersion: number | null;
  /**
   * Answers (`subscribed` or an error) the node owes this key on this
   * connection: one per subscribe sent, one per re-check of a new secret.
   * Rows that arrive while some are due may have been resolved for an
   * earlier secret, so they are not resumed from.
   */
  answersDue: number;
  /** Failed subscribe attempts in a row. */
  retries: number;
  retryTimer: ReturnType<typeof setTimeout> | null;
  /** The last token `getToken` gave for the key. */
  token: string | null;
  /** When (`Date.now()`) {@link token} is due for a refresh; `Infinity` without `exp`. */
  tokenRefreshAt: number;
  refreshTimer: ReturnType<typeof setTimeout> | null;
  /** A `getToken` call is under way (one at a time per key). */
  tokenFetching: boolean;
  /** `getToken` failures in a row (its backoff). */
  tokenFailures: number;
  /** The next `getToken` call after a failure. */
  tokenRetryTimer: ReturnType<typeof setTimeout> | null;
  /** A subscribe waits for a token. */
  subscribeWanted: boolean;
  /** A refresh (a resubscribe of a key the node holds) waits for a token. */
  refreshWanted: boolean;
  /** Refresh subscribes sent whose `subscribed` answer has not come yet. */
  refreshesDue: number;
  /** A `token_invalid` was answered by one retry with a fresh token. */
  invalidTokenRetried: boolean;
}

interface Frame {
  action?: unknown;
  body?: unknown;
}

interface KeyBody {
  entity?: unknown;
  id?: unknown;
  version?: unknown;
  rows?: unknown;
  code?: unknown;
  message?: unknown;
}

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
export class EntitySyncClient {
  readonly #url: string;
  readonly #WebSocket: WebSocketConstructor;
  #secret: string | null;
  readonly #minDelayMs: number;
  readonly #maxDelayMs: number;
  readonly #random: () => number;
  readonly #resume: boolean;
  readonly #getToken: ((entity: string, id: string) => Promise<string> | string) | null;
  readonly #heartbeatIntervalMs: number;
  readonly #heartbeatTimeoutMs: number;
  /** Each event's listeners; the value tells a `once` listener. */
  readonly #listeners: { [E in ClientEventName]: Map<ClientEvents[E], boolean> } = {
    state: new Map(),
    error: new Map(),
  };

  /** The current socket; events of older ones are ignored. */
  #socket: WebSocketLike | null = null;
  readonly #subs = new Map<string, Subscription>();
  #reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  #attempt = 0;
  #openedAt = 0;
  /** Between {@link connect} and {@link disconnect} or {@link close}. */
  #active = false;
  #closed = false;
  #state: ConnectionState = 'disconnected';
  #heartbeatTimer: ReturnType<typeof setTimeout> | null = null;
  /** When the current socket last received a frame (or opened). */
  #lastFrameAt = 0;
  /** When the last ping was sent on the current socket. */
  #lastPingAt = 0;
  /** A ping waits for an answer (any frame) since then; `0`: none does. */
  #pingOutstandingSince = 0;
  /** Removes the browser's `online`/`offline`/`visibilitychange` listeners. */
  #removeBrowserListeners: (() => void) | null = null;

  /**
   * Connects right away (unless `options.autoConnect` is `false`) and keeps
   * reconnecting until {@link disconnect} or {@link close}.
   * @param url `ws://`, `wss://`, `http://` or `https://` URL of the node,
   *   e.g. `wss://sync.example.com` or `ws://127.0.0.1:8080/ws/entity-sync/`
   */
  constructor(url: string, options: ClientOptions = {}) {
    const Ctor =
      options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (typeof Ctor !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    }
    this.#url = websocketUrl(url, options.path);
    this.#WebSocket = Ctor;
    this.#secret = options.secret ?? null;
    this.#minDelayMs = options.minDelayMs ?? 500;
    this.#maxDelayMs = options.maxDelayMs ?? 15000;
    this.#random = options.random ?? Math.random;
    this.#resume = options.resume ?? true;
    this.#getToken = options.getToken ?? null;
    this.#heartbeatIntervalMs = options.heartbeatIntervalMs ?? 15000;
    this.#heartbeatTimeoutMs = options.heartbeatTimeoutMs ?? 5000;
    if (options.onError) this.on('error', options.onError);
    if (options.onState) this.on('state', options.onState);
    if (options.autoConnect ?? true) this.connect();
  }

  /** The websocket URL the client connects to. */
  get url(): string {
    return this.#url;
  }

  /** The connection's state now. */
  get state(): ConnectionState {
    return this.#state;
  }

  /**
   * Opens the connection: sends the secret, then subscribes every key
   * registered (those of listeners added while disconnected, and those kept
   * by {@link disconnect}), and keeps reconnecting with backoff until
   * {@link disconnect} or {@link close}. Does nothing while already
   * connecting, open or reconnecting.
   * @returns the client, for chaining (`new EntitySyncClient(url, { autoConnect: false }).connect()`)
   * @throws Error after {@link close}, which is final: make a new client
   */
  connect(): this {
    if (this.#closed) {
      throw new Error(
        'EntitySyncClient: connect() after close(); close() is final, make a new client',
      );
    }
    if (this.#active) return this;
    this.#active = true;
    this.#attempt = 0;
    this.#addBrowserListeners();
    this.#open();
    return this;
  }

  /**
   * Closes the socket and stops reconnecting (a scheduled reconnect or retry
   * is cancelled), but keeps every subscription, its listeners and its last
   * rows: a later {@link connect} subscribes the keys again, each with the
   * version it holds (a key changed since gets a fresh snapshot, an
   * unchanged one is resumed as it is). The state becomes `disconnected`.
   * Does nothing when not connected.
   * @returns the client, for chaining
   */
  disconnect(): this {
    if (!this.#active) return this;
    this.#active = false;
    this.#stop('client disconnected');
    this.#setState('disconnected', {});
    return this;
  }

  /**
   * Listens to an event of {@link ClientEvents} (`state` or `error`) until the
   * returned function or {@link off} stops it. A function is registered once
   * per event: adding it again changes nothing (except that `on` makes a
   * {@link once} listener a lasting one).
   * @returns the function that stops this listener
   */
  on<E extends ClientEventName>(event: E, listener: ClientEvents[E]): Unsubscribe {
    const listeners = this.#listenersOf(event);
    listeners.set(listener, false);
    return () => {
      listeners.delete(listener);
    };
  }

  /**
   * Listens to the next emission of an event only.
   * @returns the function that stops it before then
   */
  once<E extends ClientEventName>(event: E, listener: ClientEvents[E]): Unsubscribe {
    const listeners = this.#listenersOf(event);
    if (!listeners.has(listener)) listeners.set(listener, true);
    return () => {
      listeners.delete(listener);
    };
  }

  /**
   * Stops a listener added with {@link on}, {@link once} or the `onState` /
   * `onError` options; without a listener, every listener of the event.
   * @returns the client, for chaining
   */
  off<E extends ClientEventName>(event: E, listener?: ClientEvents[E]): this {
    const listeners = this.#listenersOf(event);
    if (listener === undefined) listeners.clear();
    else listeners.delete(listener);
    return this;
  }

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
  subscribe<Row = unknown>(
    entity: string,
    id: string | number,
    onRows: RowsListener<Row>,
    options: SubscribeOptions = {},
  ): Unsubscribe {
    const key = keyOf(entity, id);
    const listener: Listener = {
      onRows: onRows as RowsListener<unknown>,
      onError: options.onError,
      onResumed: options.onResumed,
    };
    let sub = this.#subs.get(key);
    if (!sub) {
      sub = {
        entity,
        id: String(id),
        listeners: new Set(),
        version: null,
        rows: null,
        state: 'pending',
        awaitingSnapshot: false,
        resumeVersion: null,
        answersDue: 0,
        retries: 0,
        retryTimer: null,
        token: null,
        tokenRefreshAt: 0,
        refreshTimer: null,
        tokenFetching: false,
        tokenFailures: 0,
        tokenRetryTimer: null,
        subscribeWanted: false,
        refreshWanted: false,
        refreshesDue: 0,
        invalidTokenRetried: false,
      };
      this.#subs.set(key, sub);
      this.#sendSubscribe(sub);
    } else if (sub.rows !== null) {
      const held = sub;
      const rows = held.rows as readonly Row[];
      const meta: PushMeta = {
        entity: held.entity,
        id: held.id,
        version: held.version ?? 0,
        snapshot: true,
      };
      // Asynchronously, like every other delivery, so callers see one order.
      queueMicrotask(() => {
        if (held.listeners.has(listener)) this.#deliver(listener, rows, meta);
      });
    }
    sub.listeners.add(listener);
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      this.#removeListener(key, listener);
    };
  }

  /** Stops every listener of a key and ends its node subscription. */
  unsubscribe(entity: string, id: string | number): void {
    const sub = this.#subs.get(keyOf(entity, id));
    if (!sub) return;
    sub.listeners.clear();
    this.#drop(keyOf(entity, id), sub);
  }

  /**
   * A key as a store (see {@link KeyStore}): what UI frameworks bind to. The
   * store subscribes the key while it has listeners.
   */
  store<Row = unknown>(entity: string, id: string | number): KeyStore<Row> {
    let value: KeyValue<Row> = { status: 'loading', rows: [], version: null, error: null };
    const runs = new Set<(value: KeyValue<Row>) => void>();
    let off: Unsubscribe | null = null;
    const set = (next: KeyValue<Row>): void => {
      value = next;
      for (const run of [...runs]) run(value);
    };
    return {
      get: () => value,
      subscribe: (run) => {
        runs.add(run);
        run(value);
        off ??= this.subscribe<Row>(
          entity,
          id,
          (rows, meta) => {
            set({ status: 'live', rows, version: meta.version, error: null });
          },
          {
            onError: (error) => {
              if (SUBSCRIPTION_ENDED.has(error.code)) set({ ...value, status: 'failed', error });
            },
            // Nothing changed but the status: the rows held are still the latest.
            onResumed: () => {
              if (value.status !== 'live') set({ ...value, status: 'live', error: null });
            },
          },
        );
        return () => {
          runs.delete(run);
          if (runs.size === 0 && off !== null) {
            off();
            off = null;
          }
        };
      },
    };
  }

  /**
   * A key's pushes as an async iterator: `for await (const { rows, meta } of
   * client.updates('items', 1)) …`. Latest state wins: while the loop body
   * runs, only the newest push is kept for the next turn. The key is
   * subscribed until the loop ends (`break`, `signal` aborted, or
   * {@link close}).
   */
  updates<Row = unknown>(
    entity: string,
    id: string | number,
    options: UpdatesOptions = {},
  ): AsyncIterableIterator<Update<Row>> {
    let latest: Update<Row> | null = null;
    let wake: ((result: IteratorResult<Update<Row>>) => void) | null = null;
    let done = false;
    const finish = (): IteratorResult<Update<Row>> => {
      done = true;
      off();
      offClose();
      options.signal?.removeEventListener('abort', onAbort);
      const waiting = wake;
      wake = null;
      const result: IteratorResult<Update<Row>> = { done: true, value: undefined };
      waiting?.(result);
      return result;
    };
    const onAbort = (): void => {
      finish();
    };
    const off = this.subscribe<Row>(entity, id, (rows, meta) => {
      const update = { rows, meta };
      if (wake) {
        const waiting = wake;
        wake = null;
        waiting({ done: false, value: update });
      } else {
        latest = update;
      }
    });
    const offClose = this.on('state', (state) => {
      if (state === 'closed' && !done) finish();
    });
    if (options.signal?.aborted) finish();
    else options.signal?.addEventListener('abort', onAbort);
    const iterator: AsyncIterableIterator<Update<Row>> = {
      next: () => {
        if (done) return Promise.resolve({ done: true, value: undefined });
        if (latest) {
          const value = latest;
          latest = null;
          return Promise.resolve({ done: false, value });
        }
        return new Promise((resolve) => {
          wake = resolve;
        });
      },
      return: () => Promise.resolve(done ? { done: true, value: undefined } : finish()),
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  /**
   * Changes the secret: what the client may see can change either way. The
   * node re-checks every key it holds with the new secret by itself
   * (`subscribed` and a fresh snapshot, or an error that ends the key); the
   * keys it refused before are subscribed again here.
   */
  setSecret(secret: string): void {
    // The rows held were resolved for the old secret: never resume from them.
    const changed = secret !== this.#secret;
    if (changed) for (const sub of this.#subs.values()) sub.resumeVersion = null;
    this.#secret = secret;
    if (this.#send(encodeSecret(secret))) {
      for (const sub of this.#subs.values()) {
        if (sub.state === 'failed') this.#sendSubscribe(sub);
        else {
          sub.state = 'pending';
          // The node re-checks the keys it holds and answers each.
          if (changed) sub.answersDue += 1;
        }
      }
    }
  }

  /**
   * Sends a pass-through message (one with no `action`): the node hands it to
   * the backends that asked for them, with this connection's secret.
   * @returns false when not connected (the message is not queued)
   */
  send(message: Record<string, unknown>): boolean {
    // For callers in plain JavaScript, whom the types do not stop.
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition
    if (message === null || typeof message !== 'object' || Array.isArray(message)) {
      throw new TypeError('a pass-through message is a JSON object');
    }
    if ('action' in message) {
      throw new TypeError('a pass-through message must not have an "action" field');
    }
    return this.#send(JSON.stringify(message));
  }

  /** Last rows and version delivered for a key, if any. */
  // `Row` types the rows for the caller, as in subscribe() (unchecked).
  // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-parameters
  current<Row = unknown>(
    entity: string,
    id: string | number,
  ): { rows: readonly Row[]; version: number } | null {
    const sub = this.#subs.get(keyOf(entity, id));
    if (!sub?.rows) return null;
    return { rows: sub.rows as readonly Row[], version: sub.version ?? 0 };
  }

  /**
   * Ends the client for good: closes the socket, no reconnect, no more rows;
   * `updates()` iterators end. The state becomes `closed`, and
   * {@link connect} throws from then on. To go offline for a while and come
   * back with the same subscriptions, use {@link disconnect}.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const sub of this.#subs.values()) clearTokenTimers(sub);
    if (this.#active) {
      this.#active = false;
      this.#stop('client closed');
    }
    this.#setState('closed', {});
  }

  /** Cancels every timer and closes the socket; the keys wait, pending. */
  #stop(reason: string): void {
    this.#removeBrowserListeners?.();
    this.#removeBrowserListeners = null;
    if (this.#reconnectTimer !== null) clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    this.#stopHeartbeat();
    for (const sub of this.#subs.values()) {
      clearRetry(sub);
      resetKeyOnLoss(sub);
      // Not called again before connect(): a token fetched meanwhile would be
      // stale by then anyway.
      if (sub.tokenRetryTimer !== null) clearTimeout(sub.tokenRetryTimer);
      sub.tokenRetryTimer = null;
    }
    this.#attempt = 0;
    this.#openedAt = 0;
    const socket = this.#socket;
    // Forgotten first: the close event it sends back is then ignored.
    this.#socket = null;
    if (socket) socket.close(1000, reason);
  }

  #listenersOf<E extends ClientEventName>(event: E): Map<ClientEvents[E], boolean> {
    // Checked for callers in plain JavaScript, whom the types do not stop.
    if (!Object.hasOwn(this.#listeners, event)) {
      throw new TypeError(`unknown event: ${event} (events: state, error)`);
    }
    return this.#listeners[event];
  }

  /**
   * Calls the event's listeners (a `once` one is removed first). A listener
   * that throws does not keep the event from the others; its exception is
   * reported as a `client_listener_failed` error, except from an `error`
   * listener, which has nowhere to report to.
   */
  #emit<E extends ClientEventName>(event: E, ...args: Parameters<ClientEvents[E]>): void {
    const listeners = this.#listenersOf(event);
    for (const [listener, once] of [...listeners]) {
      // Stopped by a listener called before it, in this same emission.
      if (!listeners.has(listener)) continue;
      if (once) listeners.delete(listener);
      try {
        (listener as (...values: Parameters<ClientEvents[E]>) => void)(...args);
      } catch (err) {
        if (event !== 'error') {
          this.#emitError(
            new EntitySyncError('client_listener_failed', errorText(err), { cause: err }),
          );
        }
      }
    }
  }

  #removeListener(key: string, listener: Listener): void {
    const sub = this.#subs.get(key);
    if (!sub?.listeners.delete(listener)) return;
    if (sub.listeners.size === 0) this.#drop(key, sub);
  }

  #drop(key: string, sub: Subscription): void {
    clearRetry(sub);
    clearTokenTimers(sub);
    this.#subs.delete(key);
    // A key whose subscribe failed is not held by the node, nor one whose
    // subscribe still waits for its token: nothing to undo.
    const unsent = sub.subscribeWanted && sub.answersDue === 0 && sub.state !== 'subscribed';
    if (sub.state !== 'failed' && !unsent) this.#send(encodeUnsubscribe(sub.entity, sub.id));
    sub.subscribeWanted = false;
    sub.refreshWanted = false;
  }

  #open(): void {
    if (!this.#active) return;
    this.#setState('connecting', {});
    let socket: WebSocketLike;
    try {
      socket = new this.#WebSocket(this.#url);
    } catch (err) {
      // A refused URL throws at once; retrying keeps the behaviour uniform.
      this.#emitError(new EntitySyncError('client_connect_failed', errorText(err), { cause: err }));
      this.#scheduleReconnect(undefined);
      return;
    }
    this.#socket = socket;
    socket.onopen = () => {
      if (this.#socket !== socket) return;
      this.#openedAt = Date.now();
      this.#startHeartbeat();
      this.#setState('open', {});
      // Order matters: the node applies the secret to the resolves that follow it.
      if (this.#secret !== null) this.#send(encodeSecret(this.#secret));
      for (const sub of this.#subs.values()) this.#sendSubscribe(sub);
    };
    socket.onmessage = (event) => {
      if (this.#socket !== socket) return;
      this.#frameReceived();
      this.#handleFrame(event.data);
    };
    // Some libraries call onclose without an event.
    socket.onclose = (event?: { code?: number }) => {
      this.#lost(socket, event?.code);
    };
    // Browsers follow an error with a close event, but some implementations
    // (Node 20's experimental WebSocket) report a failed connect with an
    // error alone, so an error counts as the loss of the socket too. The
    // guard in #lost makes whichever comes second a no-op.
    socket.onerror = () => {
      this.#lost(socket, undefined);
    };
  }

  /** The socket is gone: forget it and schedule the next connection. */
  #lost(socket: WebSocketLike, closeCode: number | undefined, heartbeatTimeout = false): void {
    if (this.#socket !== socket) return;
    this.#socket = null;
    this.#stopHeartbeat();
    if (socket.readyState === OPEN) {
      if (heartbeatTimeout) socket.close(4000, 'heartbeat timeout');
      else socket.close();
    }
    for (const sub of this.#subs.values()) {
      clearRetry(sub);
      resetKeyOnLoss(sub);
    }
    const stable = this.#openedAt > 0 && Date.now() - this.#openedAt >= STABLE_CONNECTION_MS;
    if (stable) this.#attempt = 0;
    this.#openedAt = 0;
    this.#scheduleReconnect(closeCode, heartbeatTimeout);
  }

  #scheduleReconnect(closeCode: number | undefined, heartbeatTimeout = false): void {
    if (!this.#active) return;
    const delayMs = backoffDelay(this.#attempt, this.#minDelayMs, this.#maxDelayMs, this.#random);
    this.#attempt += 1;
    const info: { delayMs: number; attempt: number; closeCode?: number; heartbeatTimeout?: true } =
      {
        delayMs,
        attempt: this.#attempt,
      };
    if (closeCode !== undefined) info.closeCode = closeCode;
    if (heartbeatTimeout) info.heartbeatTimeout = true;
    this.#setState('reconnecting', info);
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      this.#open();
    }, delayMs);
  }

  #sendSubscribe(sub: Subscription): void {
    clearRetry(sub);
    if (this.#getToken === null) {
      this.#sendSubscribeFrame(sub, null);
      return;
    }
    if (!this.#isOpen()) return;
    // Sent once a token is there: now if the one held is still fresh.
    sub.subscribeWanted = true;
    if (sub.token !== null && Date.now() < sub.tokenRefreshAt) this.#tokenReady(sub);
    else this.#fetchToken(sub);
  }

  #sendSubscribeFrame(sub: Subscription, token: string | null): void {
    const version = this.#resume ? sub.resumeVersion : null;
    if (this.#send(encodeSubscribe(sub.entity, sub.id, version, token))) {
      sub.state = 'pending';
      sub.answersDue += 1;
    }
  }

  #isOpen(): boolean {
    return this.#socket?.readyState === OPEN;
  }

  /** Whether the node holds the key with every answer in: a refresh can go now. */
  #refreshable(sub: Subscription): boolean {
    return (
      this.#isOpen() && sub.state === 'subscribed' && !sub.awaitingSnapshot && sub.answersDue === 0
    );
  }

  /** Refreshes the key's token if it is due and the key is held (else it waits for that). */
  #refreshIfDue(sub: Subscription): void {
    if (this.#getToken === null || sub.token === null) return;
    if (Date.now() < sub.tokenRefreshAt || !this.#refreshable(sub)) return;
    sub.refreshWanted = true;
    this.#fetchToken(sub);
  }

  /**
   * Calls `getToken` for the key, unless a call is under way or waits for its
   * backoff: either ends in {@link #tokenReady}, which sends what waits.
   */
  #fetchToken(sub: Subscription): void {
    const getToken = this.#getToken;
    if (getToken === null || sub.tokenFetching || sub.tokenRetryTimer !== null) return;
    sub.tokenFetching = true;
    let pending: Promise<string>;
    try {
      pending = Promise.resolve(getToken(sub.entity, sub.id));
    } catch (err) {
      pending = Promise.reject(err instanceof Error ? err : new Error(String(err)));
    }
    const current = (): boolean =>
      !this.#closed && this.#subs.get(keyOf(sub.entity, sub.id)) === sub;
    pending
      .then((token: unknown) => {
        if (typeof token !== 'string' || token === '') {
          throw new TypeError(`getToken gave ${token === '' ? 'an empty string' : typeof token}`);
        }
        return token;
      })
      .then(
        (token) => {
          sub.tokenFetching = false;
          if (!current()) return;
          sub.tokenFailures = 0;
          this.#setToken(sub, token);
          this.#tokenReady(sub);
        },
        (err: unknown) => {
          sub.tokenFetching = false;
          if (!current()) return;
          const delayMs = backoffDelay(
            sub.tokenFailures,
            this.#minDelayMs,
            this.#maxDelayMs,
            this.#random,
          );
          sub.tokenFailures += 1;
          sub.tokenRetryTimer = setTimeout(() => {
            sub.tokenRetryTimer = null;
            // Called again only if something still waits for a token.
            if (current() && (sub.subscribeWanted || sub.refreshWanted)) this.#fetchToken(sub);
          }, delayMs);
          this.#keyError(
            sub,
            new EntitySyncError(
              'client_token_unavailable',
              `getToken failed (attempt ${String(sub.tokenFailures)}, next in ${String(Math.round(delayMs))} ms): ${errorText(err)}`,
              { entity: sub.entity, id: sub.id, cause: err },
            ),
          );
        },
      );
  }

  /** Holds a new token and schedules its refresh. */
  #setToken(sub: Subscription, token: string): void {
    sub.token = token;
    if (sub.refreshTimer !== null) clearTimeout(sub.refreshTimer);
    sub.refreshTimer = null;
    const lifetime = tokenLifetime(token);
    if (lifetime === null) {
      // No `exp`: kept until the node says it expired.
      sub.tokenRefreshAt = Infinity;
      return;
    }
    const delayMs = tokenRefreshDelay(lifetime);
    sub.tokenRefreshAt = Date.now() + delayMs;
    sub.refreshTimer = setTimeout(() => {
      sub.refreshTimer = null;
      // Due now, even if the timer fired a millisecond before the wall clock
      // says so (timers run on a monotonic clock): else no refresh at all.
      if (sub.token === token) sub.tokenRefreshAt = Math.min(sub.tokenRefreshAt, Date.now());
      this.#refreshIfDue(sub);
    }, delayMs);
  }

  /** A fresh token is held: send the subscribe or the refresh that waits for it. */
  #tokenReady(sub: Subscription): void {
    const token = sub.token;
    if (token === null) return;
    if (sub.subscribeWanted) {
      sub.subscribeWanted = false;
      sub.refreshWanted = false;
      this.#sendSubscribeFrame(sub, token);
    } else if (sub.refreshWanted) {
      sub.refreshWanted = false;
      if (!this.#refreshable(sub)) return;
      // The version held, whatever `resume` says: the node holds the key on
      // this connection and pushed us those rows, so it answers `current`.
      if (this.#send(encodeSubscribe(sub.entity, sub.id, sub.resumeVersion, token))) {
        sub.answersDue += 1;
        sub.refreshesDue += 1;
      }
    }
  }

  /** An error of one key: to its `onError` listeners, then the client's. */
  #keyError(sub: Subscription, error: EntitySyncError): void {
    for (const listener of [...sub.listeners]) {
      if (!listener.onError) continue;
      try {
        listener.onError(error);
      } catch {
        // A faulty listener must not keep the error from the others.
      }
    }
    this.#emitError(error);
  }

  // --- heartbeat ---

  #startHeartbeat(): void {
    this.#lastFrameAt = Date.now();
    this.#lastPingAt = 0;
    this.#pingOutstandingSince = 0;
    this.#armHeartbeat();
  }

  #stopHeartbeat(): void {
    if (this.#heartbeatTimer !== null) clearTimeout(this.#heartbeatTimer);
    this.#heartbeatTimer = null;
    this.#pingOutstandingSince = 0;
  }

  /** Sets the one heartbeat timer: for the ping's answer, or for the next idle check. */
  #armHeartbeat(): void {
    if (this.#heartbeatTimer !== null) clearTimeout(this.#heartbeatTimer);
    this.#heartbeatTimer = null;
    if (!this.#isOpen()) return;
    let due: number;
    if (this.#pingOutstandingSince > 0) {
      due = this.#pingOutstandingSince + this.#heartbeatTimeoutMs;
    } else if (this.#heartbeatIntervalMs > 0) {
      due = Math.max(this.#lastFrameAt, this.#lastPingAt) + this.#heartbeatIntervalMs;
    } else {
      return;
    }
    this.#heartbeatTimer = setTimeout(
      () => {
        this.#heartbeatTimer = null;
        this.#heartbeatDue();
      },
      Math.max(0, due - Date.now()),
    );
  }

  #heartbeatDue(): void {
    const socket = this.#socket;
    if (socket === null || !this.#isOpen()) return;
    const now = Date.now();
    if (this.#pingOutstandingSince > 0) {
      if (now - this.#pingOutstandingSince >= this.#heartbeatTimeoutMs) {
        // Nothing at all since the ping: the connection is dead even if the
        // socket does not know it yet (a peer gone without a FIN, a network
        // that drops everything). Forget it and reconnect.
        this.#lost(socket, undefined, true);
        return;
      }
    } else if (now - Math.max(this.#lastFrameAt, this.#lastPingAt) >= this.#heartbeatIntervalMs) {
      this.#ping();
      return;
    }
    this.#armHeartbeat();
  }

  /** Sends a ping now (unless one waits for its answer) and waits for any frame. */
  #ping(): void {
    if (this.#pingOutstandingSince > 0) return;
    if (!this.#send(encodePing())) return;
    this.#lastPingAt = Date.now();
    if (this.#heartbeatTimeoutMs > 0) this.#pingOutstandingSince = this.#lastPingAt;
    this.#armHeartbeat();
  }

  #frameReceived(): void {
    this.#lastFrameAt = Date.now();
    if (this.#pingOutstandingSince > 0) {
      this.#pingOutstandingSince = 0;
      this.#armHeartbeat();
    }
  }

  // --- browser events ---

  /**
   * In a browser: `online` reconnects at once (skipping the backoff wait) or
   * checks an open connection with a ping; `offline` checks the open
   * connection with a ping; the page becoming visible again checks it too
   * (after a sleep it may be dead) or reconnects at once. Nothing in Node.
   */
  #addBrowserListeners(): void {
    if (this.#removeBrowserListeners !== null) return;
    const scope = globalThis as {
      window?: Pick<EventTarget, 'addEventListener' | 'removeEventListener'>;
      document?: Pick<EventTarget, 'addEventListener' | 'removeEventListener'> & {
        visibilityState?: string;
      };
    };
    const win = scope.window;
    if (typeof win?.addEventListener !== 'function') return;
    const doc = scope.document;
    const onOnline = (): void => {
      this.#checkNow();
    };
    const onOffline = (): void => {
      if (this.#isOpen()) this.#ping();
    };
    const onVisibility = (): void => {
      if (doc?.visibilityState === 'visible') this.#checkNow();
    };
    win.addEventListener('online', onOnline);
    win.addEventListener('offline', onOffline);
    doc?.addEventListener('visibilitychange', onVisibility);
    this.#removeBrowserListeners = () => {
      win.removeEventListener('online', onOnline);
      win.removeEventListener('offline', onOffline);
      doc?.removeEventListener('visibilitychange', onVisibility);
    };
  }

  /** Open: ping to check the connection. Waiting to reconnect: reconnect now. */
  #checkNow(): void {
    if (!this.#active) return;
    if (this.#isOpen()) {
      this.#ping();
    } else if (this.#reconnectTimer !== null) {
      clearTimeout(this.#reconnectTimer);
      this.#reconnectTimer = null;
      this.#open();
    }
  }

  /** @returns whether it was sent */
  #send(text: string): boolean {
    const socket = this.#socket;
    if (socket?.readyState !== OPEN) return false;
    socket.send(text);
    return true;
  }

  #handleFrame(data: unknown): void {
    let frame: unknown;
    try {
      frame = JSON.parse(String(data));
    } catch {
      this.#emitError(new EntitySyncError('client_invalid_frame', 'frame is not JSON'));
      return;
    }
    if (frame === null || typeof frame !== 'object') return;
    const { action, body } = frame as Frame;
    const fields: KeyBody = body !== null && typeof body === 'object' ? body : {};
    switch (action) {
      case 'subscribed': {
        const sub = this.#subOf(fields);
        if (!sub) return;
        sub.state = 'subscribed';
        sub.retries = 0;
        sub.answersDue = Math.max(0, sub.answersDue - 1);
        // `current`: the version sent with the subscribe is still the
        // latest; no snapshot follows and the rows held stay as they are.
        const current = (fields as { current?: unknown }).current === true;
        sub.awaitingSnapshot = !current;
        sub.invalidTokenRetried = false;
        // A token refresh answered `current` is nothing new for the page.
        const refresh = sub.refreshesDue > 0;
        if (refresh) sub.refreshesDue -= 1;
        if (current && !refresh) this.#resumed(sub);
        this.#refreshIfDue(sub);
        return;
      }
      case 'push':
        this.#handlePush(fields);
        return;
      case 'pong':
        // Its only use is to have arrived (see #frameReceived).
        return;
      case 'error':
        this.#handleError(fields);
        return;
      default:
        // `unsubscribed`, and actions a newer node may add.
        return;
    }
  }

  #subOf(body: KeyBody): Subscription | undefined {
    const key = keyFields(body);
    return key && this.#subs.get(keyOf(key.entity, key.id));
  }

  #handlePush(body: KeyBody): void {
    const sub = this.#subOf(body);
    // A push can cross an unsubscribe on the wire.
    if (!sub) return;
    const version = Number(body.version ?? 0);
    const snapshot = sub.awaitingSnapshot;
    if (snapshot) {
      // The snapshot answering a subscribe was resolved after that subscribe,
      // so it is current by construction and always applied. Its version can
      // be lower than the one held only when the version source went back
      // (a recreated JetStream stream, a resolver whose versions were reset);
      // comparing would then drop every push from now on.
      sub.awaitingSnapshot = false;
    } else if (sub.version !== null && version < sub.version) {
      return; // stale: reflects an older change than the rows held
    }
    sub.version = version;
    sub.resumeVersion = sub.answersDue === 0 ? version : null;
    const rows: readonly unknown[] = Array.isArray(body.rows) ? body.rows : [];
    sub.rows = rows;
    const meta: PushMeta = { entity: sub.entity, id: sub.id, version, snapshot };
    for (const listener of [...sub.listeners]) this.#deliver(listener, rows, meta);
    if (snapshot) this.#refreshIfDue(sub);
  }

  #handleError(body: KeyBody): void {
    // Typed as the codes known here; a newer node's new code passes through.
    const code = (typeof body.code === 'string' ? body.code : 'unknown') as EntitySyncError['code'];
    const message = typeof body.message === 'string' ? body.message : '';
    const key = keyFields(body);
    if (!key) {
      this.#emitError(new EntitySyncError(code, message));
      return;
    }
    const error = new EntitySyncError(code, message, key);
    const sub = this.#subs.get(keyOf(key.entity, key.id));
    if (!sub) {
      this.#emitError(error);
      return;
    }
    if (SUBSCRIPTION_ENDED.has(code)) {
      // The node ended a held key (its token expired) without a subscribe
      // owing an answer: only a refused subscribe takes one off.
      if (sub.answersDue > 0) sub.answersDue -= 1;
      if (sub.refreshesDue > 0) sub.refreshesDue -= 1;
      sub.state = 'failed';
      sub.awaitingSnapshot = false;
      if (code === 'token_expired' || code === 'token_invalid') this.#tokenRefused(sub, code);
      else if (RETRYABLE.has(code)) this.#scheduleRetry(sub);
    }
    this.#keyError(sub, error);
  }

  /**
   * The node refused the key's token or ended the key when it expired: the
   * token held is dropped. `token_expired`: subscribe again with a fresh
   * token, at once the first time, after a backoff if it comes again before
   * the key is subscribed. `token_invalid`: one retry with a fresh token
   * (a key rotated since the token was issued), then the key waits, failed,
   * for a reconnect.
   */
  #tokenRefused(sub: Subscription, code: 'token_expired' | 'token_invalid'): void {
    sub.token = null;
    sub.tokenRefreshAt = 0;
    if (sub.refreshTimer !== null) clearTimeout(sub.refreshTimer);
    sub.refreshTimer = null;
    sub.refreshWanted = false;
    if (this.#getToken === null) return;
    if (code === 'token_invalid') {
      if (sub.invalidTokenRetried) return;
      sub.invalidTokenRetried = true;
      this.#sendSubscribe(sub);
    } else if (sub.retries === 0) {
      sub.retries = 1;
      this.#sendSubscribe(sub);
    } else {
      this.#scheduleRetry(sub);
    }
  }

  /** The node found the rows held current: tell the key's `onResumed` listeners. */
  #resumed(sub: Subscription): void {
    // Only a subscribe that carried a version is answered so.
    if (sub.rows === null || sub.version === null) return;
    const meta: ResumeMeta = { entity: sub.entity, id: sub.id, version: sub.version };
    for (const listener of [...sub.listeners]) {
      if (!listener.onResumed) continue;
      try {
        listener.onResumed(meta);
      } catch (err) {
        this.#emitError(
          new EntitySyncError('client_listener_failed', errorText(err), {
            entity: sub.entity,
            id: sub.id,
            cause: err,
          }),
        );
      }
    }
  }

  #scheduleRetry(sub: Subscription): void {
    clearRetry(sub);
    const delayMs = backoffDelay(sub.retries, this.#minDelayMs, this.#maxDelayMs, this.#random);
    sub.retries += 1;
    sub.retryTimer = setTimeout(() => {
      sub.retryTimer = null;
      if (this.#subs.get(keyOf(sub.entity, sub.id)) === sub) this.#sendSubscribe(sub);
    }, delayMs);
  }

  #deliver(listener: Listener, rows: readonly unknown[], meta: PushMeta): void {
    try {
      listener.onRows(rows, meta);
    } catch (err) {
      // One faulty listener must not starve the others or break the socket.
      this.#emitError(
        new EntitySyncError('client_listener_failed', errorText(err), {
          entity: meta.entity,
          id: meta.id,
          cause: err,
        }),
      );
    }
  }

  #emitError(error: EntitySyncError): void {
    this.#emit('error', error);
  }

  #setState(state: ConnectionState, info: StateInfo): void {
    this.#state = state;
    this.#emit('state', state, info);
  }
}

/** The key a frame's body names, if it names one. */
function keyFields(body: KeyBody): { entity: string; id: string } | undefined {
  if (typeof body.entity !== 'string') return undefined;
  // The node sends ids as strings; a number is taken as its decimal string.
  if (typeof body.id === 'string') return { entity: body.entity, id: body.id };
  if (typeof body.id === 'number') return { entity: body.entity, id: String(body.id) };
  return undefined;
}

/** What a key forgets when its connection is gone. */
function resetKeyOnLoss(sub: Subscription): void {
  sub.state = 'pending';
  sub.awaitingSnapshot = false;
  sub.answersDue = 0;
  sub.refreshesDue = 0;
  sub.subscribeWanted = false;
  sub.refreshWanted = false;
}

function clearTokenTimers(sub: Subscription): void {
  if (sub.refreshTimer !== null) clearTimeout(sub.refreshTimer);
  sub.refreshTimer = null;
  if (sub.tokenRetryTimer !== null) clearTimeout(sub.tokenRetryTimer);
  sub.tokenRetryTimer = null;
}

function clearRetry(sub: Subscription): void {
  if (sub.retryTimer !== null) clearTimeout(sub.retryTimer);
  sub.retryTimer = null;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function keyOf(entity: string, id: string | number): string {
  // Entities and ids cannot hold control characters, so NUL cannot collide.
  return `${entity}\u0000${String(id)}`;
}
