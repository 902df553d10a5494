// Failures of the backend and the notifier, with a kind callers match on.

import { Code, ConnectError } from '@connectrpc/connect';

/** What went wrong, broadly; match on this rather than on messages. */
export type ErrorKind =
  /** The settings are unusable (no name, a bad URL, a bad token, ...). */
  | 'config'
  /** The node refused for good: invalid, unauthenticated, not permitted. */
  | 'rejected'
  /** The node (or its bus) could not take the call now, and retries ran out. */
  | 'unavailable'
  /** A `Resolve` stream broke, or the node broke the protocol. */
  | 'stream';

const REJECTED = new Set<Code>([
  Code.InvalidArgument,
  Code.FailedPrecondition,
  Code.Unauthenticated,
  Code.PermissionDenied,
  Code.Unimplemented,
  Code.OutOfRange,
  Code.AlreadyExists,
  Code.NotFound,
]);

const UNAVAILABLE = new Set<Code>([
  Code.Unavailable,
  Code.DeadlineExceeded,
  Code.ResourceExhausted,
  Code.Aborted,
]);

/** The gRPC status name of a code, e.g. `UNAVAILABLE`. */
export function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, '$1_$2').toUpperCase();
}

/**
 * A failure of the backend or the notifier. `kind` says what broadly went
 * wrong; `code` is the gRPC status name the node (or the transport) answered
 * with, if any (`UNAVAILABLE`, `PERMISSION_DENIED`, ...). Messages never
 * carry a token or a secret.
 */
export class EntitySyncError extends Error {
  override readonly name = 'EntitySyncError';
  readonly kind: ErrorKind;
  readonly code: string | undefined;
  /** The connect status code, when a call failed. */
  readonly status: Code | undefined;

  constructor(kind: ErrorKind, message: string, status?: Code) {
    super(status === undefined ? message : `${message} (${codeName(status)})`);
    this.kind = kind;
    this.status = status;
    this.code = status === undefined ? undefined : codeName(status);
  }

  /** Whether trying the same thing again later can succeed. */
  get retryable(): boolean {
    if (this.kind === 'rejected') {
      // A fetch-mode conflict clears once the other registration leaves.
      return this.status === Code.FailedPrecondition;
    }
    return this.kind !== 'config';
  }

  /** Classifies what a call threw. */
  static from(err: unknown): EntitySyncError {
    if (err instanceof EntitySyncError) return err;
    const connect = ConnectError.from(err);
    let status = connect.code;
    // A TLS handshake that failed (an untrusted or expired certificate, a
    // name mismatch) is the connection's failure, as in gRPC's own clients:
    // UNAVAILABLE, retried (the certificate may be replaced meanwhile).
    if (isTlsFailure(connect.cause ?? err)) status = Code.Unavailable;
    const kind: ErrorKind = REJECTED.has(status)
      ? 'rejected'
      : UNAVAILABLE.has(status)
        ? 'unavailable'
        : 'stream';
    return new EntitySyncError(kind, connect.rawMessage, status);
  }
}

function isTlsFailure(cause: unknown): boolean {
  const code = (cause as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /CERT|TLS|SSL|SIGNATURE|ISSUER/.test(code);
}

/** A configuration error (never retryable). */
export function configError(message: string): EntitySyncError {
  return new EntitySyncError('config', message);
}
