// What a handler is given (a resolve request, a pass-through message) and what it answers.

import { create } from '@bufbuild/protobuf';

import {
  FetchMode as PbFetchMode,
  KeyResultSchema,
  Reason as PbReason,
  Status,
  type KeyResult,
  type PassThrough as PbPassThrough,
  type ResolveRequest as PbResolveRequest,
} from './gen/entitysync/v1/entitysync_pb.js';

/** How the node resolves an entity's changes. */
export const FetchMode = {
  /** One resolve per node per change, rows fanned out to every subscriber (authorize at subscribe). */
  SHARED: 'shared',
  /** One resolve per distinct secret among a key's subscribers (the safe default). */
  PER_SUBSCRIBER: 'per_subscriber',
} as const;
export type FetchMode = (typeof FetchMode)[keyof typeof FetchMode];

/** The wire value of a fetch mode. */
export function fetchModeValue(mode: FetchMode): PbFetchMode {
  return mode === 'shared' ? PbFetchMode.SHARED : PbFetchMode.PER_SUBSCRIBER;
}

/** Why the node asks: a client subscribes (authorize it now), or the key changed. */
export type Reason = 'subscribe' | 'change' | 'unspecified';

/**
 * The node asks for the current rows of some ids of one entity.
 *
 * `secret` is the subscriber's: empty for a client that sent none, and for
 * a shared resolve of a SHARED entity (`shared` true): a change, whose
 * subscribers were authorized when they subscribed, or a subscribe whose
 * signed subscribe token the node verified. It is not enumerable, so a
 * request can be logged whole (`JSON.stringify`, `console.log`).
 */
export class ResolveRequest {
  readonly entity: string;
  readonly ids: readonly string[];
  readonly reason: Reason;
  readonly shared: boolean;
  /** Aborted when the stream that carried the request ends: nobody reads the answer any more. */
  readonly signal: AbortSignal;
  declare readonly secret: string;

  constructor(init: {
    entity: string;
    ids: readonly string[];
    secret?: string;
    reason?: Reason;
    shared?: boolean;
    signal?: AbortSignal;
  }) {
    this.entity = init.entity;
    this.ids = Object.freeze([...init.ids]);
    this.reason = init.reason ?? 'unspecified';
    this.shared = init.shared ?? false;
    this.signal = init.signal ?? new AbortController().signal;
    Object.defineProperty(this, 'secret', { value: init.secret ?? '', enumerable: false });
  }

  /** Whether a client is subscribing (authorize it now, unless `shared`: the node verified its subscribe token). */
  get isSubscribe(): boolean {
    return this.reason === 'subscribe';
  }

  /** From the node's message. */
  static fromProto(request: PbResolveRequest, signal?: AbortSignal): ResolveRequest {
    const reason: Reason =
      request.reason === PbReason.SUBSCRIBE
        ? 'subscribe'
        : request.reason === PbReason.CHANGE
          ? 'change'
          : 'unspecified';
    return new ResolveRequest({
      entity: request.entity,
      ids: request.ids,
      secret: request.secret,
      reason,
      shared: request.shared,
      ...(signal ? { signal } : {}),
    });
  }
}

/** A client's websocket message without an `action`, forwarded by the node. */
export class PassThrough {
  /** Which connection sent it (unique across the cluster's nodes). */
  readonly connectionId: string;
  /** The message as the client sent it (a JSON text). */
  readonly payload: Uint8Array;
  /** The connection's secret when it sent the message (not enumerable). */
  declare readonly secret: string;

  constructor(connectionId: string, payload: Uint8Array, secret = '') {
    this.connectionId = connectionId;
    this.payload = payload;
    Object.defineProperty(this, 'secret', { value: secret, enumerable: false });
  }

  /** The message parsed. */
  json(): unknown {
    return JSON.parse(new TextDecoder().decode(this.payload));
  }

  static fromProto(message: PbPassThrough): PassThrough {
    return new PassThrough(message.connectionId, message.payload, message.secret);
  }
}

const encoder = new TextEncoder();

/** The answer's status. */
export type AnswerStatus = 'ok' | 'not_found' | 'forbidden' | 'error';

const STATUS_VALUE: Record<AnswerStatus, Status> = {
  ok: Status.OK,
  not_found: Status.NOT_FOUND,
  forbidden: Status.FORBIDDEN,
  error: Status.ERROR,
};

/**
 * How one id is answered. Build it with `Answer.rows`, `Answer.row`,
 * `Answer.jsonRows`, `Answer.notFound`, `Answer.forbidden` or `Answer.error`.
 */
export class Answer {
  readonly status: AnswerStatus;
  /** The rows as JSON texts (UTF-8). */
  readonly rowsJson: readonly Uint8Array[];
  readonly message: string;
  readonly version: bigint;

  private constructor(
    status: AnswerStatus,
    rowsJson: readonly Uint8Array[] = [],
    message = '',
    version = 0n,
  ) {
    this.status = status;
    this.rowsJson = rowsJson;
    this.message = message;
    this.version = version;
  }

  /**
   * The key's rows, each serialized to JSON, in order. A row that cannot be
   * serialized makes the whole answer an error (the client sees
   * `resolver_error`).
   */
  static rows(rows: Iterable<unknown>, options: { version?: bigint | number } = {}): Answer {
    const encoded: Uint8Array[] = [];
    for (const row of rows) {
      let text: string | undefined;
      try {
        text = JSON.stringify(row);
      } catch {
        text = undefined;
      }
      if (text === undefined) return Answer.error('the backend could not serialize a row');
      encoded.push(encoder.encode(text));
    }
    return new Answer('ok', encoded, '', BigInt(options.version ?? 0));
  }

  /** A key with one row. */
  static row(row: unknown, options: { version?: bigint | number } = {}): Answer {
    return Answer.rows([row], options);
  }

  /** Rows that already are JSON texts (from the database, say); the node checks each. */
  static jsonRows(
    rows: Iterable<string | Uint8Array>,
    options: { version?: bigint | number } = {},
  ): Answer {
    const encoded = [...rows].map((r) => (typeof r === 'string' ? encoder.encode(r) : r));
    return new Answer('ok', encoded, '', BigInt(options.version ?? 0));
  }

  /** No such key: subscribing fails with `not_found`; a subscriber of a key that is gone gets a push with no rows. */
  static notFound(): Answer {
    return new Answer('not_found');
  }

  /** This secret may not read the key: subscribing fails with `forbidden`; on a change the subscription ends. `message` reaches the client. */
  static forbidden(message = ''): Answer {
    return new Answer('forbidden', [], message);
  }

  /** The backend could not answer now; the node retries changes with backoff. `message` reaches a subscribing client: keep internals out. */
  static error(message = ''): Answer {
    return new Answer('error', [], message);
  }

  /** The backend's own version of the rows (must grow with every change of the key). */
  withVersion(version: bigint | number): Answer {
    return new Answer(this.status, this.rowsJson, this.message, BigInt(version));
  }

  get isOk(): boolean {
    return this.status === 'ok';
  }

  /** The wire result of id `id`. */
  toResult(id: string): KeyResult {
    return create(KeyResultSchema, {
      id,
      status: STATUS_VALUE[this.status],
      rows: [...this.rowsJson],
      version: this.version,
      message: this.message,
    });
  }
}

/** What a handler returns: an answer per id, as a Map, a plain object or pairs. */
export type Answers =
  | ReadonlyMap<string, Answer>
  | Readonly<Record<string, Answer>>
  | Iterable<readonly [string, Answer]>;

/** What an id the handler left unanswered gets. */
export const UNANSWERED_MESSAGE = 'the backend gave no answer for this id';

function isIterable(value: unknown): value is Iterable<readonly [string, Answer]> {
  return (
    typeof value === 'object' &&
    value !== null &&
    typeof (value as Record<symbol, unknown>)[Symbol.iterator] === 'function'
  );
}

/**
 * One result per requested id, in the request's order; `missing(id)` is
 * called for each id without an `Answer` (which is answered ERROR).
 */
export function toResults(
  ids: readonly string[],
  answers: Answers,
  missing: (id: string) => void = () => undefined,
): KeyResult[] {
  const byId = new Map<string, unknown>();
  if (answers instanceof Map) {
    for (const [id, answer] of answers as ReadonlyMap<string, Answer>) byId.set(id, answer);
  } else if (isIterable(answers)) {
    for (const [id, answer] of answers) byId.set(id, answer);
  } else if (typeof answers === 'object') {
    for (const [id, answer] of Object.entries(answers)) byId.set(id, answer);
  }
  return ids.map((id) => {
    const answer = byId.get(id);
    if (answer instanceof Answer) return answer.toResult(id);
    missing(id);
    return Answer.error(UNANSWERED_MESSAGE).toResult(id);
  });
}

/** The same answer for every id. */
export function allIds(ids: readonly string[], answer: Answer): Map<string, Answer> {
  return new Map(ids.map((id) => [id, answer]));
}
