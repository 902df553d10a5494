// The node endpoint both clients connect to: URL, TLS and bearer token.

import { readFileSync } from 'node:fs';
import type { SecureClientSessionOptions } from 'node:http2';

import type { Transport } from '@connectrpc/connect';
import { createGrpcTransport, Http2SessionManager } from '@connectrpc/connect-node';

import { configError } from './errors.js';

/**
 * TLS settings of a connection to a node (`https://` URLs). `ca`: PEM of
 * the CA that signed the node's certificate (absent: the system's roots).
 * `cert` and `key`: PEM of this backend's client certificate, for a node
 * that verifies clients (mutual TLS). `serverName`: the name to verify the
 * node's certificate against, when it differs from the URL's host.
 */
export interface TlsOptions {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  serverName?: string;
}

/** Reads TLS settings from PEM files. */
export function tlsFromFiles(files: {
  ca?: string;
  cert?: string;
  key?: string;
  serverName?: string;
}): TlsOptions {
  const read = (path: string | undefined): Buffer | undefined => {
    if (path === undefined) return undefined;
    try {
      return readFileSync(path);
    } catch (err) {
      throw configError(`cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
    }
  };
  const tls: TlsOptions = {};
  const ca = read(files.ca);
  const cert = read(files.cert);
  const key = read(files.key);
  if (ca) tls.ca = ca;
  if (cert) tls.cert = cert;
  if (key) tls.key = key;
  if (files.serverName !== undefined) tls.serverName = files.serverName;
  return tls;
}

/** How the clients reach a node. */
export interface ConnectionOptions {
  /** A token of the node's `--grpc-tokens-file` (never logged). */
  bearerToken?: string;
  /** TLS settings; requires an `https://` URL. */
  tls?: TlsOptions;
}

/** Keepalive: a dead node behind a live load balancer is noticed, not waited on. */
const PING_INTERVAL_MS = 20_000;
const PING_TIMEOUT_MS = 10_000;

/**
 * `http://host:port` (plaintext) or `https://host:port` (TLS), with an
 * optional bearer token sent as `authorization: Bearer TOKEN` on every call.
 */
export class Endpoint {
  readonly url: string;
  readonly secure: boolean;
  readonly #headers: Record<string, string>;
  readonly #sessionOptions: SecureClientSessionOptions;

  constructor(url: string, options: ConnectionOptions = {}) {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw configError(`invalid node URL ${JSON.stringify(url)}: use http(s)://host:port`);
    }
    if (
      (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') ||
      !parsed.hostname ||
      !parsed.port ||
      (parsed.pathname !== '/' && parsed.pathname !== '') ||
      parsed.search ||
      parsed.username
    ) {
      throw configError(`invalid node URL ${JSON.stringify(url)}: use http(s)://host:port`);
    }
    this.secure = parsed.protocol === 'https:';
    if (options.tls && !this.secure) {
      throw configError(`node URL ${JSON.stringify(url)}: with TLS settings, use https://`);
    }
    const tls = options.tls ?? {};
    if ((tls.cert === undefined) !== (tls.key === undefined)) {
      throw configError('a client certificate needs its private key, and the reverse');
    }
    this.url = `${parsed.protocol}//${parsed.host}`;
    this.#headers = {};
    const token = options.bearerToken;
    if (token !== undefined) {
      // Printable ASCII without spaces, like an HTTP token; the message
      // names the rule, never the token.
      if (!/^[\x21-\x7e]+$/.test(token)) {
        throw configError('the bearer token must be printable ASCII without spaces');
      }
      this.#headers.authorization = `Bearer ${token}`;
    }
    this.#sessionOptions = {};
    if (tls.ca !== undefined) this.#sessionOptions.ca = tls.ca;
    if (tls.cert !== undefined) this.#sessionOptions.cert = tls.cert;
    if (tls.key !== undefined) this.#sessionOptions.key = tls.key;
    if (tls.serverName !== undefined) this.#sessionOptions.servername = tls.serverName;
  }

  /** The call headers (the credentials). Never log them. */
  headers(extra: Record<string, string> = {}): Record<string, string> {
    return { ...this.#headers, ...extra };
  }

  /**
   * A connection of its own (HTTP/2, opened on first use and again after a
   * failure) and the gRPC transport over it; `close()` ends it.
   */
  connect(): { transport: Transport; close: () => void } {
    const sessions = new Http2SessionManager(
      this.url,
      { pingIntervalMs: PING_INTERVAL_MS, pingTimeoutMs: PING_TIMEOUT_MS },
      this.#sessionOptions,
    );
    const transport = createGrpcTransport({ baseUrl: this.url, sessionManager: sessions });
    return {
      transport,
      close: () => {
        sessions.abort();
      },
    };
  }

  toString(): string {
    return `Endpoint(${this.url}${'authorization' in this.#headers ? ', bearer token' : ''})`;
  }
}
