/**
 * Browser client for entity-sync: subscribe to `(entity, id)` keys over one
 * websocket and get the key's rows pushed whenever the backend notifies a
 * change.
 *
 * Dependency-free ES module. It speaks the JSON envelope protocol of an
 * entity-sync node (not the `compat_bare_rows` mode, whose bare row frames
 * carry no key or version).
 *
 * What it takes care of:
 * - one server subscription per key, however many callbacks listen to it;
 * - reconnecting with jittered exponential backoff, then sending the secret
 *   again and resubscribing every key, which yields a fresh snapshot;
 * - dropping a push whose `version` is lower than the one it holds for the key;
 * - retrying a subscribe that failed for a passing reason (no resolver yet,
 *   resolver timeout or error), with the same backoff.
 *
 * @example
 * import { EntitySyncClient } from './entity-sync.js';
 * const client = new EntitySyncClient('ws://127.0.0.1:8080/ws/entity-sync/', {
 *   secret: 'demo-secret',
 *   onError: (err) => console.warn(err.code, err.message),
 * });
 * const off = client.subscribe('items', '101', (rows, meta) => console.log(meta.version, rows));
 * // later: off();
 *
 * @module entity-sync
 */

/** `WebSocket.OPEN`; spelled out so that injected fakes need not define it. */
const OPEN = 1;

/**
 * Every `code` an error frame of the node may carry (the node's stable error
 * codes; a test of the node checks this list against its own). Client-side
 * problems use codes starting with `client_`.
 * @type {readonly string[]}
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
]);

/**
 * Error codes after which the node holds no subscription for the key (see the
 * node's error codes). The client keeps the key, so a reconnect or a new
 * secret tries again.
 */
const SUBSCRIPTION_ENDED = new Set([
  'forbidden',
  'not_found',
  'no_resolver',
  'resolver_error',
  'resolver_timeout',
  'too_many_subscriptions',
]);

/**
 * Of those, the ones that may pass by themselves (a backend that is still
 * starting or restarting): the client resubscribes after a backoff. A
 * `forbidden` or `not_found` answer would only come back the same, so it waits
 * for `setSecret` or a reconnect instead.
 */
const RETRYABLE = new Set(['no_resolver', 'resolver_error', 'resolver_timeout']);

/** A connection that stayed open this long resets the reconnect backoff. */
const STABLE_CONNECTION_MS = 5000;

/**
 * Text of a subscribe frame.
 * @param {string} entity
 * @param {string|number} id
 * @returns {string}
 */
export function encodeSubscribe(entity, id) {
  return JSON.stringify({ action: 'subscribe', body: { entity, id: String(id) } });
}

/**
 * Text of an unsubscribe frame.
 * @param {string} entity
 * @param {string|number} id
 * @returns {string}
 */
export function encodeUnsubscribe(entity, id) {
  return JSON.stringify({ action: 'unsubscribe', body: { entity, id: String(id) } });
}

/**
 * Text of a secret frame.
 * @param {string} secret
 * @returns {string}
 */
export function encodeSecret(secret) {
  return JSON.stringify({ action: 'secret', body: secret });
}

/**
 * Delay before reconnect attempt number `attempt` (0-based): exponential,
 * capped, with "equal jitter" (half fixed, half random) so that many clients
 * dropped by one node restart do not all come back in the same instant.
 * @param {number} attempt
 * @param {number} minMs
 * @param {number} maxMs
 * @param {() => number} random a source like `Math.random`
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
  const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}

/**
 * @typedef {object} PushMeta
 * @property {string} entity
 * @property {string} id
 * @property {number} version the change this push reflects (bus sequence or resolver version)
 * @property {boolean} snapshot true for the push that answers a (re)subscribe
 */

/**
 * @callback RowsCallback
 * @param {unknown[]} rows the key's rows, in the resolver's order
 * @param {PushMeta} meta
 * @returns {void}
 */

/**
 * An error frame from the node, or a client-side problem (`code` starting with
 * `client_`).
 * @typedef {object} EntitySyncError
 * @property {string} code stable code, e.g. `forbidden`, `not_found`, `no_resolver`
 * @property {string} message
 * @property {string} [entity] present when the error concerns one key
 * @property {string} [id]
 */

/**
 * @typedef {'connecting'|'open'|'reconnecting'|'closed'} ConnectionStatus
 */

/**
 * @typedef {object} StatusInfo
 * @property {number} [delayMs] with `reconnecting`: time until the next attempt
 * @property {number} [attempt] with `reconnecting`: how many attempts failed in a row
 * @property {number} [code] with `reconnecting`/`closed`: close code of the socket
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} [secret] sent after every connect, before the subscribes
 * @property {(error: EntitySyncError) => void} [onError]
 * @property {(status: ConnectionStatus, info: StatusInfo) => void} [onStatus]
 * @property {typeof WebSocket} [WebSocket] constructor to use; defaults to the global one
 *   (inject a fake in tests, or a library's in Node)
 * @property {number} [minDelayMs=500] first reconnect delay ceiling
 * @property {number} [maxDelayMs=15000] largest reconnect delay
 * @property {() => number} [random=Math.random] jitter source
 */

/**
 * @typedef {object} Subscription
 * @property {string} entity
 * @property {string} id
 * @property {Set<RowsCallback>} listeners
 * @property {number|null} version highest version delivered, kept across reconnects
 * @property {unknown[]|null} rows last rows delivered
 * @property {'pending'|'subscribed'|'failed'} state
 * @property {boolean} awaitingSnapshot the next push answers a subscribe
 * @property {number} retries failed subscribe attempts in a row
 * @property {ReturnType<typeof setTimeout>|null} retryTimer
 */

/** Keeps a set of entity subscriptions alive over one websocket. */
export class EntitySyncClient {
  /** @type {string} */
  #url;
  /** @type {typeof WebSocket} */
  #WebSocket;
  /** @type {string|null} */
  #secret;
  #onError;
  #onStatus;
  #minDelayMs;
  #maxDelayMs;
  #random;

  /** @type {WebSocket|null} the current socket; events of older ones are ignored */
  #socket = null;
  /** @type {Map<string, Subscription>} keyed by {@link keyOf} */
  #subs = new Map();
  /** @type {ReturnType<typeof setTimeout>|null} */
  #reconnectTimer = null;
  #attempt = 0;
  #openedAt = 0;
  #closed = false;
  /** @type {ConnectionStatus} */
  #status = 'connecting';

  /**
   * Connects right away and keeps reconnecting until {@link close}.
   * @param {string} url websocket URL, e.g. `ws://127.0.0.1:8080/ws/entity-sync/`
   * @param {ClientOptions} [options]
   */
  constructor(url, options = {}) {
    const Ctor = options.WebSocket ?? globalThis.WebSocket;
    if (typeof Ctor !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    }
    this.#url = url;
    this.#WebSocket = Ctor;
    this.#secret = options.secret ?? null;
    this.#onError = options.onError ?? null;
    this.#onStatus = options.onStatus ?? null;
    this.#minDelayMs = options.minDelayMs ?? 500;
    this.#maxDelayMs = options.maxDelayMs ?? 15000;
    this.#random = options.random ?? Math.random;
    this.#connect();
  }

  /** @returns {ConnectionStatus} */
  get status() {
    return this.#status;
  }

  /**
   * Starts listening to a key. The first subscription of a key sends a
   * subscribe frame (now, or as soon as the socket is open); a later one shares
   * it and is called at once with the rows already held.
   * @param {string} entity
   * @param {string|number} id
   * @param {RowsCallback} onRows
   * @returns {() => void} stops this listener (same as {@link unsubscribe})
   */
  subscribe(entity, id, onRows) {
    const key = keyOf(entity, id);
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
        retries: 0,
        retryTimer: null,
      };
      this.#subs.set(key, sub);
      this.#sendSubscribe(sub);
    } else if (sub.rows !== null) {
      const rows = sub.rows;
      const meta = { entity: sub.entity, id: sub.id, version: sub.version ?? 0, snapshot: true };
      // Asynchronously, like every other delivery, so callers see one order.
      queueMicrotask(() => this.#deliver(onRows, rows, meta));
    }
    sub.listeners.add(onRows);
    return () => this.unsubscribe(entity, id, onRows);
  }

  /**
   * Stops listening. Without `onRows` every listener of the key goes; the
   * server subscription ends with the last one.
   * @param {string} entity
   * @param {string|number} id
   * @param {RowsCallback} [onRows]
   */
  unsubscribe(entity, id, onRows) {
    const key = keyOf(entity, id);
    const sub = this.#subs.get(key);
    if (!sub) return;
    if (onRows) sub.listeners.delete(onRows);
    else sub.listeners.clear();
    if (sub.listeners.size > 0) return;
    clearTimeout(sub.retryTimer ?? undefined);
    this.#subs.delete(key);
    // A key whose subscribe failed is not held by the node: nothing to undo.
    if (sub.state !== 'failed') this.#send(encodeUnsubscribe(sub.entity, sub.id));
  }

  /**
   * Changes the secret: what the client may see can change either way. The
   * node re-checks every key it holds with the new secret by itself
   * (`subscribed` and a fresh snapshot, or an error that ends the key); the
   * keys it refused before are subscribed again here.
   * @param {string} secret
   */
  setSecret(secret) {
    this.#secret = secret;
    if (this.#send(encodeSecret(secret))) {
      for (const sub of this.#subs.values()) {
        if (sub.state === 'failed') this.#sendSubscribe(sub);
        else sub.state = 'pending';
      }
    }
  }

  /**
   * Sends a message with no `action`; the node hands it to the backends that
   * asked for pass-through messages, with this connection's secret.
   * @param {Record<string, unknown>} message
   * @returns {boolean} false when not connected (the message is not queued)
   */
  send(message) {
    if (message && typeof message === 'object' && 'action' in message) {
      throw new TypeError('a pass-through message must not have an "action" field');
    }
    return this.#send(JSON.stringify(message));
  }

  /**
   * Last rows and version delivered for a key, if any.
   * @param {string} entity
   * @param {string|number} id
   * @returns {{rows: unknown[], version: number}|null}
   */
  current(entity, id) {
    const sub = this.#subs.get(keyOf(entity, id));
    if (!sub || sub.rows === null) return null;
    return { rows: sub.rows, version: sub.version ?? 0 };
  }

  /** Closes the socket for good: no reconnect, no more callbacks. */
  close() {
    this.#closed = true;
    clearTimeout(this.#reconnectTimer ?? undefined);
    for (const sub of this.#subs.values()) clearTimeout(sub.retryTimer ?? undefined);
    const socket = this.#socket;
    this.#socket = null;
    if (socket) socket.close(1000, 'client closed');
    this.#setStatus('closed', {});
  }

  #connect() {
    if (this.#closed) return;
    this.#setStatus('connecting', {});
    let socket;
    try {
      socket = new this.#WebSocket(this.#url);
    } catch (err) {
      // A malformed URL throws at once; retrying keeps the behaviour uniform.
      this.#emitError({ code: 'client_connect_failed', message: String(err) });
      this.#scheduleReconnect(undefined);
      return;
    }
    this.#socket = socket;
    socket.onopen = () => {
      if (this.#socket !== socket) return;
      this.#openedAt = Date.now();
      this.#setStatus('open', {});
      // Order matters: the node applies the secret to resolves that follow it.
      if (this.#secret !== null) this.#send(encodeSecret(this.#secret));
      for (const sub of this.#subs.values()) this.#sendSubscribe(sub);
    };
    socket.onmessage = (event) => {
      if (this.#socket !== socket) return;
      this.#handleFrame(event.data);
    };
    socket.onclose = (event) => this.#lost(socket, event?.code);
    // Browsers follow an error with a close event, but some implementations
    // (Node 20's experimental WebSocket) report a failed connect with an error
    // alone, so an error counts as the loss of the socket too. The guard in
    // #lost makes whichever comes second a no-op.
    socket.onerror = () => this.#lost(socket, undefined);
  }

  /**
   * The socket is gone: forget it and schedule the next connection.
   * @param {WebSocket} socket
   * @param {number|undefined} code close code, when there was a close event
   */
  #lost(socket, code) {
    if (this.#socket !== socket) return;
    this.#socket = null;
    if (socket.readyState === OPEN) socket.close();
    for (const sub of this.#subs.values()) {
      clearTimeout(sub.retryTimer ?? undefined);
      sub.retryTimer = null;
      sub.state = 'pending';
      sub.awaitingSnapshot = false;
    }
    const stable = this.#openedAt > 0 && Date.now() - this.#openedAt >= STABLE_CONNECTION_MS;
    if (stable) this.#attempt = 0;
    this.#openedAt = 0;
    this.#scheduleReconnect(code);
  }

  /** @param {number|undefined} code */
  #scheduleReconnect(code) {
    if (this.#closed) return;
    const delayMs = backoffDelay(this.#attempt, this.#minDelayMs, this.#maxDelayMs, this.#random);
    this.#attempt += 1;
    this.#setStatus('reconnecting', { delayMs, attempt: this.#attempt, code });
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      this.#connect();
    }, delayMs);
  }

  /** @param {Subscription} sub */
  #sendSubscribe(sub) {
    clearTimeout(sub.retryTimer ?? undefined);
    sub.retryTimer = null;
    if (this.#send(encodeSubscribe(sub.entity, sub.id))) sub.state = 'pending';
  }

  /**
   * @param {string} text
   * @returns {boolean} whether it was sent
   */
  #send(text) {
    const socket = this.#socket;
    if (!socket || socket.readyState !== OPEN) return false;
    socket.send(text);
    return true;
  }

  /** @param {unknown} data */
  #handleFrame(data) {
    let frame;
    try {
      frame = JSON.parse(String(data));
    } catch {
      this.#emitError({ code: 'client_invalid_frame', message: 'frame is not JSON' });
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    const body = frame.body ?? {};
    switch (frame.action) {
      case 'subscribed': {
        const sub = this.#subs.get(keyOf(body.entity, body.id));
        if (!sub) return;
        sub.state = 'subscribed';
        sub.awaitingSnapshot = true;
        sub.retries = 0;
        return;
      }
      case 'push':
        this.#handlePush(body);
        return;
      case 'error':
        this.#handleError(body);
        return;
      default:
        // `unsubscribed`, and actions a newer node may add.
        return;
    }
  }

  /** @param {{entity: string, id: string, version?: number, rows?: unknown[]}} body */
  #handlePush(body) {
    const sub = this.#subs.get(keyOf(body.entity, body.id));
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
      return; // stale: reflects an older change than the rows we hold
    }
    sub.version = version;
    sub.rows = Array.isArray(body.rows) ? body.rows : [];
    const meta = { entity: sub.entity, id: sub.id, version, snapshot };
    for (const listener of [...sub.listeners]) this.#deliver(listener, sub.rows, meta);
  }

  /** @param {{code?: string, message?: string, entity?: string, id?: string}} body */
  #handleError(body) {
    const error = { code: String(body.code ?? 'unknown'), message: String(body.message ?? '') };
    if (body.entity !== undefined && body.id !== undefined) {
      Object.assign(error, { entity: body.entity, id: String(body.id) });
      const sub = this.#subs.get(keyOf(body.entity, body.id));
      if (sub && SUBSCRIPTION_ENDED.has(error.code)) {
        sub.state = 'failed';
        sub.awaitingSnapshot = false;
        if (RETRYABLE.has(error.code)) this.#scheduleRetry(sub);
      }
    }
    this.#emitError(error);
  }

  /** @param {Subscription} sub */
  #scheduleRetry(sub) {
    clearTimeout(sub.retryTimer ?? undefined);
    const delayMs = backoffDelay(sub.retries, this.#minDelayMs, this.#maxDelayMs, this.#random);
    sub.retries += 1;
    sub.retryTimer = setTimeout(() => {
      sub.retryTimer = null;
      if (this.#subs.get(keyOf(sub.entity, sub.id)) === sub) this.#sendSubscribe(sub);
    }, delayMs);
  }

  /**
   * @param {RowsCallback} listener
   * @param {unknown[]} rows
   * @param {PushMeta} meta
   */
  #deliver(listener, rows, meta) {
    try {
      listener(rows, meta);
    } catch (err) {
      // One faulty listener must not starve the others or break the socket.
      this.#emitError({ code: 'client_listener_failed', message: String(err), entity: meta.entity, id: meta.id });
    }
  }

  /** @param {EntitySyncError} error */
  #emitError(error) {
    if (this.#onError) this.#onError(error);
  }

  /**
   * @param {ConnectionStatus} status
   * @param {StatusInfo} info
   */
  #setStatus(status, info) {
    this.#status = status;
    if (this.#onStatus) this.#onStatus(status, info);
  }
}

/**
 * @param {string} entity
 * @param {string|number} id
 * @returns {string}
 */
function keyOf(entity, id) {
  // Entities and ids cannot hold control characters, so NUL cannot collide.
  return `${entity}\u0000${id}`;
}
