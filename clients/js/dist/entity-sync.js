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
 *   again and resubscribing every key, which yields a fresh snapshot;
 * - dropping a push whose `version` is lower than the one held for the key;
 * - retrying a subscribe refused for a passing reason (no resolver yet,
 *   resolver timeout or error), with the same backoff.
 *
 * @example
 * import { EntitySyncClient } from '@entity-sync/client';
 * const client = new EntitySyncClient('wss://sync.example.com', { secret: token });
 * const off = client.subscribe<Item>('items', '101', (rows, meta) => render(rows, meta.version));
 * // later: off();
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
]);
/** Codes of problems the client finds itself (never sent by a node). */
export const CLIENT_ERROR_CODES = Object.freeze([
    'client_connect_failed',
    'client_invalid_frame',
    'client_listener_failed',
]);
/**
 * Error codes after which the node holds no subscription for the key. The
 * client keeps the key, so a reconnect or a new secret tries again.
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
 * Of those, the ones that may pass by themselves (a backend still starting or
 * restarting): the client subscribes again after a backoff. A `forbidden` or
 * `not_found` answer would come back the same, so it waits for
 * {@link EntitySyncClient.setSecret} or a reconnect instead.
 */
const RETRYABLE = new Set([
    'no_resolver',
    'resolver_error',
    'resolver_timeout',
]);
/** Whether the node refused a key for a reason that may pass by itself. */
export function isRetryable(code) {
    return RETRYABLE.has(code);
}
/** `WebSocket.OPEN`, spelled out so that a passed-in constructor need not define it. */
const OPEN = 1;
/** A connection that stayed open this long resets the reconnect backoff. */
const STABLE_CONNECTION_MS = 5000;
/** The node's default websocket path (`--ws-path`). */
export const DEFAULT_PATH = '/ws/entity-sync/';
/** Text of a subscribe frame. */
export function encodeSubscribe(entity, id) {
    return JSON.stringify({ action: 'subscribe', body: { entity, id: String(id) } });
}
/** Text of an unsubscribe frame. */
export function encodeUnsubscribe(entity, id) {
    return JSON.stringify({ action: 'unsubscribe', body: { entity, id: String(id) } });
}
/** Text of a secret frame. */
export function encodeSecret(secret) {
    return JSON.stringify({ action: 'secret', body: secret });
}
/**
 * Delay before reconnect attempt number `attempt` (0-based): exponential,
 * capped, with "equal jitter" (half fixed, half random) so that many clients
 * dropped by one node restart do not all come back in the same instant.
 */
export function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
    const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
    return ceiling / 2 + random() * (ceiling / 2);
}
/**
 * The websocket URL to open: `http(s)://` becomes `ws(s)://`; `path` replaces
 * the URL's path; a URL without a path gets {@link DEFAULT_PATH}.
 */
export function websocketUrl(url, path) {
    const parsed = new URL(url);
    if (parsed.protocol === 'http:')
        parsed.protocol = 'ws:';
    else if (parsed.protocol === 'https:')
        parsed.protocol = 'wss:';
    if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
        throw new TypeError(`not a websocket URL: ${parsed.protocol}//…`);
    }
    if (path !== undefined)
        parsed.pathname = path;
    else if (parsed.pathname === '/' || parsed.pathname === '')
        parsed.pathname = DEFAULT_PATH;
    return parsed.toString();
}
/** Keeps a set of entity subscriptions alive over one websocket. */
export class EntitySyncClient {
    #url;
    #WebSocket;
    #secret;
    #minDelayMs;
    #maxDelayMs;
    #random;
    #stateListeners = new Set();
    #errorListeners = new Set();
    /** The current socket; events of older ones are ignored. */
    #socket = null;
    #subs = new Map();
    #reconnectTimer = null;
    #attempt = 0;
    #openedAt = 0;
    #closed = false;
    #state = 'connecting';
    /**
     * Connects right away and keeps reconnecting until {@link close}.
     * @param url `ws://`, `wss://`, `http://` or `https://` URL of the node,
     *   e.g. `wss://sync.example.com` or `ws://127.0.0.1:8080/ws/entity-sync/`
     */
    constructor(url, options = {}) {
        const Ctor = options.WebSocket ??
            globalThis.WebSocket;
        if (typeof Ctor !== 'function') {
            throw new TypeError('no WebSocket implementation: pass options.WebSocket');
        }
        this.#url = websocketUrl(url, options.path);
        this.#WebSocket = Ctor;
        this.#secret = options.secret ?? null;
        this.#minDelayMs = options.minDelayMs ?? 500;
        this.#maxDelayMs = options.maxDelayMs ?? 15000;
        this.#random = options.random ?? Math.random;
        if (options.onError)
            this.#errorListeners.add(options.onError);
        if (options.onState)
            this.#stateListeners.add(options.onState);
        this.#connect();
    }
    /** The websocket URL the client connects to. */
    get url() {
        return this.#url;
    }
    /** The connection's state now. */
    get state() {
        return this.#state;
    }
    /** Listens to state changes or errors; returns the function that stops it. */
    on(event, listener) {
        const set = (event === 'state' ? this.#stateListeners : this.#errorListeners);
        set.add(listener);
        return () => {
            set.delete(listener);
        };
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
    subscribe(entity, id, onRows, options = {}) {
        const key = keyOf(entity, id);
        const listener = { onRows: onRows, onError: options.onError };
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
        }
        else if (sub.rows !== null) {
            const held = sub;
            const rows = held.rows;
            const meta = { entity: held.entity, id: held.id, version: held.version ?? 0, snapshot: true };
            // Asynchronously, like every other delivery, so callers see one order.
            queueMicrotask(() => {
                if (held.listeners.has(listener))
                    this.#deliver(listener, rows, meta);
            });
        }
        sub.listeners.add(listener);
        let active = true;
        return () => {
            if (!active)
                return;
            active = false;
            this.#removeListener(key, listener);
        };
    }
    /** Stops every listener of a key and ends its node subscription. */
    unsubscribe(entity, id) {
        const sub = this.#subs.get(keyOf(entity, id));
        if (!sub)
            return;
        sub.listeners.clear();
        this.#drop(keyOf(entity, id), sub);
    }
    /**
     * A key as a store (see {@link KeyStore}): what UI frameworks bind to. The
     * store subscribes the key while it has listeners.
     */
    store(entity, id) {
        let value = { status: 'loading', rows: [], version: null, error: null };
        const runs = new Set();
        let off = null;
        const set = (next) => {
            value = next;
            for (const run of [...runs])
                run(value);
        };
        return {
            get: () => value,
            subscribe: (run) => {
                runs.add(run);
                run(value);
                if (off === null) {
                    off = this.subscribe(entity, id, (rows, meta) => set({ status: 'live', rows, version: meta.version, error: null }), { onError: (error) => {
                            if (SUBSCRIPTION_ENDED.has(error.code))
                                set({ ...value, status: 'failed', error });
                        } });
                }
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
    updates(entity, id, options = {}) {
        let latest = null;
        let wake = null;
        let done = false;
        const finish = () => {
            done = true;
            off();
            offClose();
            options.signal?.removeEventListener('abort', onAbort);
            const waiting = wake;
            wake = null;
            const result = { done: true, value: undefined };
            waiting?.(result);
            return result;
        };
        const onAbort = () => {
            finish();
        };
        const off = this.subscribe(entity, id, (rows, meta) => {
            const update = { rows, meta };
            if (wake) {
                const waiting = wake;
                wake = null;
                waiting({ done: false, value: update });
            }
            else {
                latest = update;
            }
        });
        const offClose = this.on('state', (state) => {
            if (state === 'closed' && !done)
                finish();
        });
        if (options.signal?.aborted)
            finish();
        else
            options.signal?.addEventListener('abort', onAbort);
        const iterator = {
            next: () => {
                if (done)
                    return Promise.resolve({ done: true, value: undefined });
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
    setSecret(secret) {
        this.#secret = secret;
        if (this.#send(encodeSecret(secret))) {
            for (const sub of this.#subs.values()) {
                if (sub.state === 'failed')
                    this.#sendSubscribe(sub);
                else
                    sub.state = 'pending';
            }
        }
    }
    /**
     * Sends a pass-through message (one with no `action`): the node hands it to
     * the backends that asked for them, with this connection's secret.
     * @returns false when not connected (the message is not queued)
     */
    send(message) {
        if (message === null || typeof message !== 'object' || Array.isArray(message)) {
            throw new TypeError('a pass-through message is a JSON object');
        }
        if ('action' in message) {
            throw new TypeError('a pass-through message must not have an "action" field');
        }
        return this.#send(JSON.stringify(message));
    }
    /** Last rows and version delivered for a key, if any. */
    current(entity, id) {
        const sub = this.#subs.get(keyOf(entity, id));
        if (!sub || sub.rows === null)
            return null;
        return { rows: sub.rows, version: sub.version ?? 0 };
    }
    /** Closes the socket for good: no reconnect, no more callbacks. */
    close() {
        if (this.#closed)
            return;
        this.#closed = true;
        if (this.#reconnectTimer !== null)
            clearTimeout(this.#reconnectTimer);
        for (const sub of this.#subs.values())
            clearRetry(sub);
        const socket = this.#socket;
        this.#socket = null;
        if (socket)
            socket.close(1000, 'client closed');
        this.#setState('closed', {});
    }
    #removeListener(key, listener) {
        const sub = this.#subs.get(key);
        if (!sub || !sub.listeners.delete(listener))
            return;
        if (sub.listeners.size === 0)
            this.#drop(key, sub);
    }
    #drop(key, sub) {
        clearRetry(sub);
        this.#subs.delete(key);
        // A key whose subscribe failed is not held by the node: nothing to undo.
        if (sub.state !== 'failed')
            this.#send(encodeUnsubscribe(sub.entity, sub.id));
    }
    #connect() {
        if (this.#closed)
            return;
        this.#setState('connecting', {});
        let socket;
        try {
            socket = new this.#WebSocket(this.#url);
        }
        catch (err) {
            // A refused URL throws at once; retrying keeps the behaviour uniform.
            this.#emitError({ code: 'client_connect_failed', message: errorText(err) });
            this.#scheduleReconnect(undefined);
            return;
        }
        this.#socket = socket;
        socket.onopen = () => {
            if (this.#socket !== socket)
                return;
            this.#openedAt = Date.now();
            this.#setState('open', {});
            // Order matters: the node applies the secret to the resolves that follow it.
            if (this.#secret !== null)
                this.#send(encodeSecret(this.#secret));
            for (const sub of this.#subs.values())
                this.#sendSubscribe(sub);
        };
        socket.onmessage = (event) => {
            if (this.#socket !== socket)
                return;
            this.#handleFrame(event.data);
        };
        socket.onclose = (event) => this.#lost(socket, event?.code);
        // Browsers follow an error with a close event, but some implementations
        // (Node 20's experimental WebSocket) report a failed connect with an
        // error alone, so an error counts as the loss of the socket too. The
        // guard in #lost makes whichever comes second a no-op.
        socket.onerror = () => this.#lost(socket, undefined);
    }
    /** The socket is gone: forget it and schedule the next connection. */
    #lost(socket, closeCode) {
        if (this.#socket !== socket)
            return;
        this.#socket = null;
        if (socket.readyState === OPEN)
            socket.close();
        for (const sub of this.#subs.values()) {
            clearRetry(sub);
            sub.state = 'pending';
            sub.awaitingSnapshot = false;
        }
        const stable = this.#openedAt > 0 && Date.now() - this.#openedAt >= STABLE_CONNECTION_MS;
        if (stable)
            this.#attempt = 0;
        this.#openedAt = 0;
        this.#scheduleReconnect(closeCode);
    }
    #scheduleReconnect(closeCode) {
        if (this.#closed)
            return;
        const delayMs = backoffDelay(this.#attempt, this.#minDelayMs, this.#maxDelayMs, this.#random);
        this.#attempt += 1;
        const info = {
            delayMs,
            attempt: this.#attempt,
        };
        if (closeCode !== undefined)
            info.closeCode = closeCode;
        this.#setState('reconnecting', info);
        this.#reconnectTimer = setTimeout(() => {
            this.#reconnectTimer = null;
            this.#connect();
        }, delayMs);
    }
    #sendSubscribe(sub) {
        clearRetry(sub);
        if (this.#send(encodeSubscribe(sub.entity, sub.id)))
            sub.state = 'pending';
    }
    /** @returns whether it was sent */
    #send(text) {
        const socket = this.#socket;
        if (!socket || socket.readyState !== OPEN)
            return false;
        socket.send(text);
        return true;
    }
    #handleFrame(data) {
        let frame;
        try {
            frame = JSON.parse(String(data));
        }
        catch {
            this.#emitError({ code: 'client_invalid_frame', message: 'frame is not JSON' });
            return;
        }
        if (frame === null || typeof frame !== 'object')
            return;
        const { action, body } = frame;
        const fields = body !== null && typeof body === 'object' ? body : {};
        switch (action) {
            case 'subscribed': {
                const sub = this.#subOf(fields);
                if (!sub)
                    return;
                sub.state = 'subscribed';
                sub.awaitingSnapshot = true;
                sub.retries = 0;
                return;
            }
            case 'push':
                this.#handlePush(fields);
                return;
            case 'error':
                this.#handleError(fields);
                return;
            default:
                // `unsubscribed`, and actions a newer node may add.
                return;
        }
    }
    #subOf(body) {
        if (typeof body.entity !== 'string' || body.id === undefined || body.id === null)
            return undefined;
        return this.#subs.get(keyOf(body.entity, String(body.id)));
    }
    #handlePush(body) {
        const sub = this.#subOf(body);
        // A push can cross an unsubscribe on the wire.
        if (!sub)
            return;
        const version = Number(body.version ?? 0);
        const snapshot = sub.awaitingSnapshot;
        if (snapshot) {
            // The snapshot answering a subscribe was resolved after that subscribe,
            // so it is current by construction and always applied. Its version can
            // be lower than the one held only when the version source went back
            // (a recreated JetStream stream, a resolver whose versions were reset);
            // comparing would then drop every push from now on.
            sub.awaitingSnapshot = false;
        }
        else if (sub.version !== null && version < sub.version) {
            return; // stale: reflects an older change than the rows held
        }
        sub.version = version;
        const rows = Array.isArray(body.rows) ? body.rows : [];
        sub.rows = rows;
        const meta = { entity: sub.entity, id: sub.id, version, snapshot };
        for (const listener of [...sub.listeners])
            this.#deliver(listener, rows, meta);
    }
    #handleError(body) {
        const code = String(body.code ?? 'unknown');
        const message = String(body.message ?? '');
        const sub = this.#subOf(body);
        if (typeof body.entity !== 'string' || body.id === undefined || body.id === null) {
            this.#emitError({ code, message });
            return;
        }
        const error = { code, message, entity: body.entity, id: String(body.id) };
        if (sub && SUBSCRIPTION_ENDED.has(code)) {
            sub.state = 'failed';
            sub.awaitingSnapshot = false;
            if (RETRYABLE.has(code))
                this.#scheduleRetry(sub);
        }
        if (sub) {
            for (const listener of [...sub.listeners]) {
                if (!listener.onError)
                    continue;
                try {
                    listener.onError(error);
                }
                catch {
                    // A faulty listener must not keep the error from the others.
                }
            }
        }
        this.#emitError(error);
    }
    #scheduleRetry(sub) {
        clearRetry(sub);
        const delayMs = backoffDelay(sub.retries, this.#minDelayMs, this.#maxDelayMs, this.#random);
        sub.retries += 1;
        sub.retryTimer = setTimeout(() => {
            sub.retryTimer = null;
            if (this.#subs.get(keyOf(sub.entity, sub.id)) === sub)
                this.#sendSubscribe(sub);
        }, delayMs);
    }
    #deliver(listener, rows, meta) {
        try {
            listener.onRows(rows, meta);
        }
        catch (err) {
            // One faulty listener must not starve the others or break the socket.
            this.#emitError({
                code: 'client_listener_failed',
                message: errorText(err),
                entity: meta.entity,
                id: meta.id,
            });
        }
    }
    #emitError(error) {
        for (const listener of [...this.#errorListeners]) {
            try {
                listener(error);
            }
            catch {
                // An error listener that throws has nowhere to report to.
            }
        }
    }
    #setState(state, info) {
        this.#state = state;
        for (const listener of [...this.#stateListeners]) {
            try {
                listener(state, info);
            }
            catch (err) {
                this.#emitError({ code: 'client_listener_failed', message: errorText(err) });
            }
        }
    }
}
function clearRetry(sub) {
    if (sub.retryTimer !== null)
        clearTimeout(sub.retryTimer);
    sub.retryTimer = null;
}
function errorText(err) {
    return err instanceof Error ? err.message : String(err);
}
function keyOf(entity, id) {
    // Entities and ids cannot hold control characters, so NUL cannot collide.
    return `${entity}\u0000${String(id)}`;
}
