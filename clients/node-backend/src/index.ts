// @entity-sync/backend: a Node.js backend of entity-sync. `serve` (or
// `Backend`) answers a node's resolve requests; `Notifier` tells it which
// keys changed; `SubscribeTokenSigner` mints subscribe tokens.

export {
  Backend,
  DEFAULT_DRAIN_TIMEOUT_MS,
  DEFAULT_MAX_IN_FLIGHT,
  DEFAULT_RECONNECT_BACKOFF,
  eachId,
  HANDLER_FAILED,
  MAX_REFRESH_EVERY_MS,
  MIN_REFRESH_EVERY_MS,
  REGISTER_TIMEOUT_MS,
  serve,
  type BackendOptions,
  type BackendState,
  type Entity,
  type Handler,
  type PassThroughHandler,
} from './backend.js';
export { Backoff } from './backoff.js';
export { tlsFromFiles, type ConnectionOptions, type TlsOptions } from './endpoint.js';
export { EntitySyncError, type ErrorKind } from './errors.js';
export { defaultLogger, type Logger } from './logger.js';
export {
  DEFAULT_CALL_TIMEOUT_MS,
  DEFAULT_RETRY_FOR_MS,
  Notifier,
  TRACE_ID_HEADER,
  type Key,
  type NotifierOptions,
  type NotifyOptions,
  type Receipt,
} from './notifier.js';
export {
  Answer,
  FetchMode,
  PassThrough,
  ResolveRequest,
  toResults,
  UNANSWERED_MESSAGE,
  type Answers,
  type AnswerStatus,
  type Reason,
} from './request.js';
export {
  ANY_ID,
  jwks,
  MAX_TOKEN_TTL_SECONDS,
  MIN_HS256_SECRET_LEN,
  SubscribeTokenSigner,
  TokenError,
  type Algorithm,
  type Audience,
  type Jwk,
  type SubscribeClaims,
} from './tokens.js';
