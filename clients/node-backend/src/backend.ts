// The backend: registers entities on a node's `Resolve` stream and answers
// its requests, reconnecting until shutdown.
//
// One stream at a time: connect, send `Register`, wait for `Registered`,
// then answer each request concurrently (the node keeps at most
// `maxInFlight` outstanding). When the stream breaks, the node hands what
// this backend held to other resolvers; the backend waits a jittered,
// growing delay and registers again. On shutdown it sends `Drain`, answers
// what it already received, and ends the stream.

import { create } from '@bufbuild/protobuf';
import { createClient } from '@connectrpc/connect';

import { Backoff } from './backoff.js';
import { Endpoint, type ConnectionOptions } from './endpoint.js';
import { configError, EntitySyncError } from './errors.js';
import {
  DrainSchema,
  EntityRegistrationSchema,
  EntitySync,
  RegisterSchema,
  ResolveResponseSchema,
  ResolverMessageSchema,
  type KeyResult,
  type NodeMessage,
  type Register,
  type ResolverMessage,
} from './gen/entitysync/v1/entitysync_pb.js';
import { defaultLogger, type Logger } from './logger.js';
import { delay, Inbox, Outbox, raceTimeout } from './queue.js';
import {
  allIds,
  Answer,
  fetchModeValue,
  FetchMode,
  PassThrough,
  ResolveRequest,
  toResults,
  type Answers,
} from './request.js';

/**
 * Resolves the rows of one entity: called concurrently, once per request (a
 * request carries one or several ids); returns an `Answer` per id.
 */
export type Handler = (request: ResolveRequest) => Answers | Promise<Answers>;

/** Receives the client messages that carry no `action`. */
export type PassThroughHandler = (message: PassThrough) => void | Promise<void>;

/**
 * An entity's handler and fetch mode. A bare handler means
 * `FetchMode.PER_SUBSCRIBER` (the node's safe default). `refreshEveryMs`
 * (1,000 to 86,400,000; absent: never) asks the node to re-resolve each
 * subscribed key that often even without a `Notify` (reason `change`).
 */
export interface Entity {
  handler: Handler;
  fetchMode?: FetchMode;
  refreshEveryMs?: number;
}

/** Requests the node may keep outstanding on the stream, unless set. */
export const DEFAULT_MAX_IN_FLIGHT = 64;
/** First and longest reconnect delay (ms), unless set. */
export const DEFAULT_RECONNECT_BACKOFF = { initialMs: 100, maxMs: 10_000 } as const;
/** How long shutdown waits for handlers still running (ms), unless set. */
export const DEFAULT_DRAIN_TIMEOUT_MS = 10_000;
/** How long the node may take to answer `Register` with `Registered` (ms). */
export const REGISTER_TIMEOUT_MS = 10_000;
/** After the last answer, how long the backend waits for the node to end the stream (ms). */
const CLOSE_TIMEOUT_MS = 2_000;
/** What an ERROR answer says when a handler threw: the error itself stays in this backend's log. */
export const HANDLER_FAILED = 'the backend failed to resolve this key';
const NOT_SERVED = 'this backend does not serve the entity';
/** Shortest and longest `refreshEveryMs` the node accepts. */
export const MIN_REFRESH_EVERY_MS = 1_000;
export const MAX_REFRESH_EVERY_MS = 86_400_000;

export interface BackendOptions extends ConnectionOptions {
  /** The service name; backends sharing one are replicas (each pass-through message goes to one of them). */
  name: string;
  /** Entity name to `Entity` (or a bare handler: PER_SUBSCRIBER). */
  entities: Readonly<Record<string, Entity | Handler>>;
  passThrough?: PassThroughHandler;
  maxInFlight?: number;
  reconnectBackoff?: { initialMs: number; maxMs: number };
  drainTimeoutMs?: number;
  logger?: Logger;
}

/** Where a backend stands (for a health check). */
export interface BackendState {
  phase: 'connecting' | 'registered' | 'disconnected' | 'stopped';
  nodeId: string;
  resolverId: string;
  error?: EntitySyncError;
}

/** A handler that answers one id at a time: `f(id, request)` runs for every id of a request concurrently. */
export function eachId(
  f: (id: string, request: ResolveRequest) => Answer | Promise<Answer>,
): Handler {
  return async (request) => {
    return Promise.all(request.ids.map(async (id) => [id, await f(id, request)] as const));
  };
}

function errorText(err: unknown): string {
  return err instanceof Error ? (err.stack ?? err.message) : String(err);
}

/** Serves entities to an entity-sync node; run it with `serve(signal)`. */
export class Backend {
  readonly #endpoint: Endpoint;
  readonly #name: string;
  readonly #entities: Map<string, Required<Pick<Entity, 'handler' | 'fetchMode'>> & Entity>;
  readonly #passThrough: PassThroughHandler | undefined;
  readonly #maxInFlight: number;
  readonly #reconnect: { initialMs: number; maxMs: number };
  readonly #drainTimeoutMs: number;
  readonly #log: Logger;
  #state: BackendState = { phase: 'connecting', nodeId: '', resolverId: '' };
  #stateWaiters: (() => void)[] = [];
  #inFlight = 0;
  #serving = false;

  constructor(node: string, options: BackendOptions) {
    if (!options.name.trim()) throw configError('a backend needs a name');
    const entries = Object.entries(options.entities);
    if (entries.length === 0 && !options.passThrough) {
      throw configError('register at least one entity or a pass-through handler');
    }
    const maxInFlight = options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
    if (!Number.isInteger(maxInFlight) || maxInFlight < 1 || maxInFlight > 0xffffffff) {
      throw configError('maxInFlight must be a positive integer');
    }
    this.#entities = new Map();
    for (const [entity, spec] of entries) {
      const full = typeof spec === 'function' ? { handler: spec } : spec;
      const every = full.refreshEveryMs;
      if (
        every !== undefined &&
        !(Number.isInteger(every) && every >= MIN_REFRESH_EVERY_MS && every <= MAX_REFRESH_EVERY_MS)
      ) {
        throw configError(
          `entity ${JSON.stringify(entity)}: refreshEveryMs must be a whole number from ${String(MIN_REFRESH_EVERY_MS)} to ${String(MAX_REFRESH_EVERY_MS)}, got ${String(every)}`,
        );
      }
      this.#entities.set(entity, {
        ...full,
        fetchMode: full.fetchMode ?? FetchMode.PER_SUBSCRIBER,
      });
    }
    this.#endpoint = new Endpoint(node, options);
    this.#name = options.name;
    this.#passThrough = options.passThrough;
    this.#maxInFlight = maxInFlight;
    this.#reconnect = options.reconnectBackoff ?? DEFAULT_RECONNECT_BACKOFF;
    this.#drainTimeoutMs = options.drainTimeoutMs ?? DEFAULT_DRAIN_TIMEOUT_MS;
    this.#log = options.logger ?? defaultLogger;
  }

  /** The current state. */
  get state(): BackendState {
    return this.#state;
  }

  /** Requests being answered right now. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /**
   * Resolves once registered on a node whose id is not `otherThan` (a
   * restarted node); rejects when the backend stops or after `timeoutMs`.
   */
  async waitRegistered(
    options: { otherThan?: string; timeoutMs?: number } = {},
  ): Promise<BackendState> {
    const deadline = Date.now() + (options.timeoutMs ?? 30_000);
    for (;;) {
      const state = this.#state;
      if (state.phase === 'registered' && state.nodeId !== (options.otherThan ?? '')) return state;
      if (state.phase === 'stopped') throw new EntitySyncError('stream', 'the backend stopped');
      const left = deadline - Date.now();
      if (left <= 0) throw new EntitySyncError('unavailable', 'not registered in time');
      await raceTimeout([new Promise<void>((done) => this.#stateWaiters.push(done))], left);
    }
  }

  #setState(state: BackendState): void {
    this.#state = state;
    for (const waiter of this.#stateWaiters.splice(0)) waiter();
  }

  /**
   * Serves until `signal` aborts: connects, registers, answers, and
   * reconnects with jittered exponential backoff whenever the stream
   * breaks. On abort it drains (answers what it holds) and resolves.
   * Rejects with an `EntitySyncError` only when the node refuses the
   * registration for good (invalid, unauthenticated, not permitted).
   */
  async serve(signal?: AbortSignal): Promise<void> {
    if (this.#serving) throw configError('this backend is serving already');
    this.#serving = true;
    const stop = signal ?? new AbortController().signal;
    const backoff = new Backoff(this.#reconnect.initialMs, this.#reconnect.maxMs);
    try {
      while (!stop.aborted) {
        this.#setState({ phase: 'connecting', nodeId: '', resolverId: '' });
        let error: EntitySyncError;
        try {
          await this.#stream(stop, backoff);
          return;
        } catch (err) {
          error = EntitySyncError.from(err);
          if (!error.retryable) {
            this.#log.error(`the node refused this backend; not retrying: ${error.message}`);
            throw error;
          }
        }
        const wait = backoff.nextDelay();
        this.#log.warn(
          `resolve stream lost (${error.message}); reconnecting in ${(wait / 1000).toFixed(2)}s`,
        );
        this.#setState({ phase: 'disconnected', nodeId: '', resolverId: '', error });
        const pause = delay(wait, stop);
        await pause.done;
        pause.cancel();
      }
    } finally {
      this.#serving = false;
      this.#setState({ phase: 'stopped', nodeId: '', resolverId: '' });
    }
  }

  /** One stream's life: resolves on shutdown (drained); rejects when the stream failed or the node ended it. */
  async #stream(stop: AbortSignal, backoff: Backoff): Promise<void> {
    const connection = this.#endpoint.connect();
    const client = createClient(EntitySync, connection.transport);
    const call = new AbortController();
    const outbox = new Outbox<ResolverMessage>();
    outbox.push(
      create(ResolverMessageSchema, { kind: { case: 'register', value: this.#register() } }),
    );
    const inbox = new Inbox<NodeMessage>();
    const reading = inbox.readAll(
      client.resolve(outbox, { signal: call.signal, headers: this.#endpoint.headers() }),
    );
    const stopped = delay(2 ** 31 - 1, stop);
    try {
      // Registered first.
      const registerBy = Date.now() + REGISTER_TIMEOUT_MS;
      while (inbox.items.length === 0 && !inbox.hasEnded() && !stop.aborted) {
        const left = registerBy - Date.now();
        if (left <= 0) {
          throw new EntitySyncError(
            'unavailable',
            `no Registered within ${String(REGISTER_TIMEOUT_MS / 1000)}s`,
          );
        }
        await raceTimeout([inbox.changed(), stopped.done], left);
      }
      if (stop.aborted && inbox.items.length === 0) return;
      const first = inbox.items.shift();
      if (first === undefined) throw this.#ended(inbox);
      if (first.kind.case !== 'registered') {
        throw new EntitySyncError(
          'stream',
          `the node sent ${String(first.kind.case)} before Registered`,
        );
      }
      const { nodeId, resolverId } = first.kind.value;
      this.#log.info(
        `registered (node ${nodeId}, resolver ${resolverId}, entities ${[...this.#entities.keys()].join(', ')})`,
      );
      backoff.reset();
      this.#setState({ phase: 'registered', nodeId, resolverId });

      // Answer until shutdown, each request on its own.
      let active = 0; // this stream's requests being answered
      let idle: () => void = () => undefined;
      const dispatch = (message: NodeMessage): void => {
        const work = this.#handle(message, outbox, call.signal);
        if (work === undefined) return;
        active += 1;
        this.#inFlight += 1;
        void work
          .catch((err: unknown) => {
            this.#log.error(`answering a request failed: ${errorText(err)}`);
          })
          .finally(() => {
            active -= 1;
            this.#inFlight -= 1;
            if (active === 0) idle();
          });
      };
      for (;;) {
        const message = inbox.items.shift();
        if (message !== undefined) {
          dispatch(message);
          continue;
        }
        if (inbox.hasEnded()) throw this.#ended(inbox);
        if (stop.aborted) break;
        await Promise.race([inbox.changed(), stopped.done]);
      }

      // Drain: the node sends nothing more once it reads Drain; what it
      // sent before is answered too, while any handler runs.
      outbox.push(
        create(ResolverMessageSchema, { kind: { case: 'drain', value: create(DrainSchema) } }),
      );
      this.#log.info(`draining (${String(active)} in flight)`);
      const drainBy = Date.now() + this.#drainTimeoutMs;
      while (active > 0 || inbox.items.length > 0) {
        const message = inbox.items.shift();
        if (message !== undefined) {
          dispatch(message);
          continue;
        }
        if (inbox.hasEnded()) break; // no answer can go out any more
        const left = drainBy - Date.now();
        if (left <= 0) {
          this.#log.warn(
            `drain timed out with ${String(active)} unanswered; the node retries them elsewhere`,
          );
          break;
        }
        const isIdle = new Promise<void>((done) => {
          idle = done;
        });
        await raceTimeout([inbox.changed(), isIdle], left);
      }
      // Ends the request stream: the node deregisters this resolver; its
      // end of the stream says the answers were read.
      outbox.close();
      await raceTimeout([reading], CLOSE_TIMEOUT_MS);
      this.#log.info('drained');
    } finally {
      stopped.cancel();
      outbox.close();
      call.abort();
      await reading;
      connection.close();
    }
  }

  #ended(inbox: Inbox<NodeMessage>): EntitySyncError {
    if (inbox.error !== undefined) return EntitySyncError.from(inbox.error);
    return new EntitySyncError('stream', 'the node ended the stream');
  }

  #register(): Register {
    return create(RegisterSchema, {
      name: this.#name,
      entities: [...this.#entities].map(([entity, spec]) =>
        create(EntityRegistrationSchema, {
          entity,
          fetchMode: fetchModeValue(spec.fetchMode),
          refreshIntervalMs: spec.refreshEveryMs ?? 0,
        }),
      ),
      passThrough: this.#passThrough !== undefined,
      maxInFlight: this.#maxInFlight,
    });
  }

  /** What answers one node message (undefined: nothing to do). */
  #handle(
    message: NodeMessage,
    outbox: Outbox<ResolverMessage>,
    signal: AbortSignal,
  ): Promise<void> | undefined {
    switch (message.kind.case) {
      case 'request': {
        const request = ResolveRequest.fromProto(message.kind.value, signal);
        return this.#answer(message.kind.value.requestId, request, outbox);
      }
      case 'passThrough': {
        const handler = this.#passThrough;
        if (handler === undefined) {
          this.#log.debug('pass-through message without a handler, dropped');
          return undefined;
        }
        const passThrough = PassThrough.fromProto(message.kind.value);
        return (async () => {
          try {
            await handler(passThrough);
          } catch (err) {
            this.#log.error(`the pass-through handler failed: ${errorText(err)}`);
          }
        })();
      }
      case 'registered':
        this.#log.warn('a second Registered on one stream, ignored');
        return undefined;
      default:
        // A message kind of a newer node: nothing to do with it.
        return undefined;
    }
  }

  /** Runs the handler of one request (catching what it throws) and queues its answer. */
  async #answer(
    requestId: bigint,
    request: ResolveRequest,
    outbox: Outbox<ResolverMessage>,
  ): Promise<void> {
    const results = await this.resolve(request);
    const response = create(ResolveResponseSchema, { requestId, results });
    outbox.push(create(ResolverMessageSchema, { kind: { case: 'response', value: response } }));
  }

  /**
   * The results this backend answers `request` with: its handler's answers
   * in the request's order, ERROR with a fixed message for every id when the
   * handler throws or rejects (the error itself goes to the log).
   */
  async resolve(request: ResolveRequest): Promise<KeyResult[]> {
    const spec = this.#entities.get(request.entity);
    if (spec === undefined) {
      this.#log.warn(`request for an entity this backend did not register: ${request.entity}`);
      return toResults(request.ids, allIds(request.ids, Answer.error(NOT_SERVED)));
    }
    try {
      const answers = await spec.handler(request);
      return toResults(request.ids, answers, (id) => {
        this.#log.warn(`the handler gave no answer for an id (entity ${request.entity}, id ${id})`);
      });
    } catch (err) {
      this.#log.warn(`the resolve handler of ${request.entity} failed: ${errorText(err)}`);
      return toResults(request.ids, allIds(request.ids, Answer.error(HANDLER_FAILED)));
    }
  }
}

/** `new Backend(node, options).serve(options.signal)` in one call. */
export async function serve(
  node: string,
  options: BackendOptions & { signal?: AbortSignal },
): Promise<void> {
  await new Backend(node, options).serve(options.signal);
}
