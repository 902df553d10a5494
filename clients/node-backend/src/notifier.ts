// The notifier: tells the node which keys changed, retrying under one idempotency key.

import { randomBytes } from 'node:crypto';

import { create } from '@bufbuild/protobuf';
import { Code, createClient, type Client } from '@connectrpc/connect';

import { Backoff } from './backoff.js';
import { Endpoint, type ConnectionOptions } from './endpoint.js';
import { configError, EntitySyncError } from './errors.js';
import {
  EntityKeySchema,
  EntitySync,
  NotifyRequestSchema,
} from './gen/entitysync/v1/entitysync_pb.js';
import { defaultLogger, type Logger } from './logger.js';
import { delay } from './queue.js';

/** How long one `notify` keeps retrying, unless set (ms): the call's deadline. */
export const DEFAULT_RETRY_FOR_MS = 30_000;
/** Deadline of one attempt, unless set (ms). */
export const DEFAULT_CALL_TIMEOUT_MS = 10_000;
const RETRY_MIN_MS = 50;
const RETRY_MAX_MS = 2_000;
/** gRPC metadata naming a `Notify` call's trace id, both ways. */
export const TRACE_ID_HEADER = 'x-trace-id';

/** A changed key: `[entity, id]`, e.g. `['items', 101]`. */
export type Key = readonly [entity: string, id: string | number | bigint];

/** What the node answered. */
export interface Receipt {
  /** How many keys the bus stored. */
  accepted: number;
  /** The bus sequence of each key, in order. */
  sequences: bigint[];
  /** The idempotency key was seen before: an earlier attempt was applied. */
  duplicate: boolean;
  /** Calls it took (1 without retries). */
  attempts: number;
  /** The trace id the node logs this change under (empty from a node that sends none). */
  traceId: string;
}

export interface NotifierOptions extends ConnectionOptions {
  retryForMs?: number;
  callTimeoutMs?: number;
  /** Send a fresh idempotency key with each `notify` (default true). */
  idempotencyKeys?: boolean;
  logger?: Logger;
}

export interface NotifyOptions {
  /** 32 hex digits naming the change in the nodes' logs; every retry carries it. */
  traceId?: string;
  /** Aborts the call and its retries. */
  signal?: AbortSignal;
}

/**
 * Calls `Notify` on a node. It connects on first use (and again after the
 * node comes back); one instance serves any number of concurrent calls.
 */
export class Notifier {
  readonly #endpoint: Endpoint;
  readonly #retryForMs: number;
  readonly #callTimeoutMs: number;
  readonly #idempotencyKeys: boolean;
  readonly #log: Logger;
  #connection: { client: Client<typeof EntitySync>; close: () => void } | undefined;

  constructor(node: string, options: NotifierOptions = {}) {
    this.#endpoint = new Endpoint(node, options);
    this.#retryForMs = options.retryForMs ?? DEFAULT_RETRY_FOR_MS;
    this.#callTimeoutMs = options.callTimeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
    if (!(this.#retryForMs >= 0) || !(this.#callTimeoutMs > 0)) {
      throw configError('retryForMs and callTimeoutMs must be positive');
    }
    this.#idempotencyKeys = options.idempotencyKeys ?? true;
    this.#log = options.logger ?? defaultLogger;
  }

  /**
   * Tells the node that `keys` changed; resolves once the bus stored every
   * one (pushes follow). While the node or its bus is unavailable, it
   * retries with backoff for up to `retryForMs`, under one idempotency key,
   * so a retry of a call that did get through is not applied twice.
   */
  notify(keys: Iterable<Key>, options: NotifyOptions = {}): Promise<Receipt> {
    const key = this.#idempotencyKeys ? randomBytes(16).toString('hex') : '';
    return this.notifyWithKey(keys, key, options);
  }

  /**
   * Like `notify` under the caller's idempotency key (a change id, say), so
   * even a notify repeated after a restart of the caller is applied once
   * within the bus's duplicate window.
   */
  async notifyWithKey(
    keys: Iterable<Key>,
    idempotencyKey: string,
    options: NotifyOptions = {},
  ): Promise<Receipt> {
    const request = create(NotifyRequestSchema, {
      keys: [...keys].map(([entity, id]) => create(EntityKeySchema, { entity, id: String(id) })),
      idempotencyKey,
    });
    const traceId = options.traceId ?? '';
    // A value metadata cannot carry is left out: the node makes its own id.
    const headers = this.#endpoint.headers(
      traceId && /^[\x20-\x7e]+$/.test(traceId) ? { [TRACE_ID_HEADER]: traceId } : {},
    );
    const giveUp = Date.now() + this.#retryForMs;
    const backoff = new Backoff(RETRY_MIN_MS, RETRY_MAX_MS);
    let earlier: EntitySyncError | undefined;
    for (let attempts = 1; ; attempts++) {
      const client = this.#connect();
      let answeredTraceId = '';
      let error: EntitySyncError;
      const timeoutMs = Math.max(1, Math.min(this.#callTimeoutMs, giveUp - Date.now()));
      try {
        const callOptions = {
          headers,
          timeoutMs,
          onHeader: (h: Headers) => {
            answeredTraceId = h.get(TRACE_ID_HEADER) ?? '';
          },
          ...(options.signal ? { signal: options.signal } : {}),
        };
        const response = await client.notify(request, callOptions);
        return {
          accepted: response.accepted,
          sequences: [...response.sequences],
          duplicate: response.duplicate,
          attempts,
          traceId: answeredTraceId,
        };
      } catch (err) {
        error = EntitySyncError.from(err);
      }
      if (options.signal?.aborted) throw error;
      // CANCELLED: the call ended before an answer, its outcome unknown;
      // safe to repeat under the same idempotency key.
      if (error.kind !== 'unavailable' && error.status !== Code.Canceled) throw error;
      // An attempt cut short by what was left of the budget says only that
      // time ran out; the attempt before it says why (e.g. an untrusted
      // certificate), so that is the error a caller gets.
      if (
        error.status === Code.DeadlineExceeded &&
        timeoutMs < this.#callTimeoutMs &&
        earlier !== undefined
      ) {
        error = earlier;
      }
      earlier = error;
      const wait = backoff.nextDelay();
      if (Date.now() + wait >= giveUp) {
        this.#log.warn(`notify failed after ${String(attempts)} attempts: ${error.message}`);
        throw error;
      }
      this.#log.debug(`notify failed (attempt ${String(attempts)}, ${error.message}); retrying`);
      const pause = delay(wait, options.signal);
      await pause.done;
      pause.cancel();
    }
  }

  #connect(): Client<typeof EntitySync> {
    if (this.#connection === undefined) {
      const { transport, close } = this.#endpoint.connect();
      this.#connection = { client: createClient(EntitySync, transport), close };
    }
    return this.#connection.client;
  }

  /** Closes the connection (a later call opens a new one). */
  close(): void {
    const connection = this.#connection;
    this.#connection = undefined;
    connection?.close();
  }
}
