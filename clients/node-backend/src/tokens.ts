// Subscribe tokens: short-lived signed grants with which a browser subscribes
// to (entity, id) keys without the node asking the backend first.
//
// A subscribe token is a compact JWS. Its header is {"typ":"JWT","alg","kid"}
// (the node picks its verification key by `kid` from the JWKS file it is
// started with, `--subscribe-token-jwks PATH`); its claims, in this order:
// entity, ids ("*" for any id), exp, nbf (optional), iat, aud (optional),
// sub (optional). The Rust and Python SDKs mint the same layout: with the
// same HS256 secret, kid and claims all three produce the same token, byte
// for byte.

import {
  createHmac,
  createPrivateKey,
  createPublicKey,
  sign as cryptoSign,
  type KeyObject,
} from 'node:crypto';

/** The shortest HS256 secret accepted, in bytes (RFC 7518 section 3.2). */
export const MIN_HS256_SECRET_LEN = 32;
/** The longest lifetime `sign` gives a token: 24 hours. Keep lifetimes short (minutes). */
export const MAX_TOKEN_TTL_SECONDS = 24 * 60 * 60;
/** The `ids` value that grants every id of the entity. */
export const ANY_ID = '*';

export type Algorithm = 'HS256' | 'ES256' | 'EdDSA';
export type Audience = string | readonly string[];

/** The claims of a subscribe token. */
export interface SubscribeClaims {
  entity: string;
  ids: readonly string[];
  exp: number;
  nbf?: number;
  iat?: number;
  aud?: Audience;
  sub?: string;
}

/** A JWK of the node's verifying key. */
export type Jwk = Readonly<Record<string, string>>;

const CLAIM_ORDER = ['entity', 'ids', 'exp', 'nbf', 'iat', 'aud', 'sub'] as const;

/** A signer that cannot be built or claims that cannot be signed; the message never holds key material. */
export class TokenError extends Error {
  override readonly name = 'TokenError';
}

function b64url(data: Uint8Array | string): string {
  return Buffer.from(data).toString('base64url');
}

function checkKid(kid: string): void {
  if (typeof kid !== 'string' || kid === '') {
    throw new TokenError('the key id (kid) must be a non-empty string');
  }
}

function audienceClaim(audience: Audience): string | string[] {
  if (typeof audience === 'string') {
    if (!audience) throw new TokenError('invalid subscribe token claims: aud is empty');
    return audience;
  }
  const auds = [...audience];
  if (auds.length === 0 || !auds.every((a) => typeof a === 'string' && a !== '')) {
    throw new TokenError('invalid subscribe token claims: aud must be non-empty strings');
  }
  return auds;
}

function privateKey(pem: string | Buffer | KeyObject, alg: Algorithm): KeyObject {
  if (typeof pem === 'object' && !Buffer.isBuffer(pem)) {
    if (pem.type !== 'private') throw new TokenError(`${alg} key: not a private key`);
    return pem;
  }
  try {
    return createPrivateKey({ key: pem, format: 'pem' });
  } catch {
    // The parser's message is dropped: only say what was expected.
    throw new TokenError(`${alg} key: not an unencrypted PEM private key`);
  }
}

function positiveInt(name: string, value: unknown, required: boolean): void {
  if (value === undefined && !required) return;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
    throw new TokenError(`invalid subscribe token claims: ${name} must be a positive integer`);
  }
}

/** Checks the claims and puts them in the SDKs' order. */
function normalize(claims: SubscribeClaims): Record<string, unknown> {
  const unknown = Object.keys(claims).filter(
    (k) => !(CLAIM_ORDER as readonly string[]).includes(k),
  );
  if (unknown.length > 0) {
    throw new TokenError(`invalid subscribe token claims: unknown ${unknown.sort().join(', ')}`);
  }
  if (typeof claims.entity !== 'string' || !claims.entity) {
    throw new TokenError('invalid subscribe token claims: entity is empty');
  }
  if (!Array.isArray(claims.ids) || claims.ids.length === 0) {
    throw new TokenError('invalid subscribe token claims: ids is empty (or not a list)');
  }
  if (!claims.ids.every((id) => typeof id === 'string' && id !== '')) {
    throw new TokenError('invalid subscribe token claims: an id is empty (or not a string)');
  }
  positiveInt('exp', claims.exp, true);
  positiveInt('nbf', claims.nbf, false);
  positiveInt('iat', claims.iat, false);
  if (claims.sub !== undefined && (typeof claims.sub !== 'string' || !claims.sub)) {
    throw new TokenError('invalid subscribe token claims: sub must be a non-empty string');
  }
  const out: Record<string, unknown> = {};
  for (const name of CLAIM_ORDER) {
    const value = claims[name];
    if (value === undefined) continue;
    out[name] =
      name === 'ids'
        ? [...(value as string[])]
        : name === 'aud'
          ? audienceClaim(value as Audience)
          : value;
  }
  return out;
}

/**
 * Mints subscribe tokens with one key, and gives the node's verifying JWK.
 * Build one with `hs256`, `es256` or `eddsa`; the key never appears in
 * errors, `toString` or `JSON.stringify`.
 */
export class SubscribeTokenSigner {
  readonly kid: string;
  readonly alg: Algorithm;
  readonly #key: KeyObject | Buffer;
  readonly #jwk: Jwk;
  readonly #audience: string | string[] | undefined;
  readonly #subject: string | undefined;

  private constructor(
    kid: string,
    alg: Algorithm,
    key: KeyObject | Buffer,
    jwk: Jwk,
    defaults: { audience?: Audience; subject?: string },
  ) {
    checkKid(kid);
    this.kid = kid;
    this.alg = alg;
    this.#key = key;
    this.#jwk = Object.freeze({ ...jwk });
    this.#audience = defaults.audience === undefined ? undefined : audienceClaim(defaults.audience);
    if (
      defaults.subject !== undefined &&
      (typeof defaults.subject !== 'string' || !defaults.subject)
    ) {
      throw new TokenError('invalid subscribe token claims: sub must be a non-empty string');
    }
    this.#subject = defaults.subject;
  }

  /**
   * A signer with a shared HS256 secret of at least 32 random bytes (not a
   * password). The node's JWKS gets the same secret as an `oct` key.
   * `audience` and `subject` are the defaults of `sign`.
   */
  static hs256(
    kid: string,
    secret: Uint8Array,
    defaults: { audience?: Audience; subject?: string } = {},
  ): SubscribeTokenSigner {
    checkKid(kid);
    if (!(secret instanceof Uint8Array)) throw new TokenError('HS256 secret must be bytes');
    if (secret.length < MIN_HS256_SECRET_LEN) {
      throw new TokenError(
        `HS256 secret is ${String(secret.length)} bytes; subscribe tokens need at least ${String(MIN_HS256_SECRET_LEN)} random bytes`,
      );
    }
    const key = Buffer.from(secret);
    const jwk = { kty: 'oct', kid, alg: 'HS256', k: b64url(key) };
    return new SubscribeTokenSigner(kid, 'HS256', key, jwk, defaults);
  }

  /** A signer with an ES256 (ECDSA P-256) private key in PEM (PKCS#8 or SEC1, unencrypted). The JWKS gets only the public key. */
  static es256(
    kid: string,
    privateKeyPem: string | Buffer | KeyObject,
    defaults: { audience?: Audience; subject?: string } = {},
  ): SubscribeTokenSigner {
    checkKid(kid);
    const key = privateKey(privateKeyPem, 'ES256');
    if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
      throw new TokenError('ES256 key: not a private key on curve P-256');
    }
    const pub = createPublicKey(key).export({ format: 'jwk' });
    const jwk = {
      kty: 'EC',
      crv: 'P-256',
      kid,
      alg: 'ES256',
      x: String(pub.x),
      y: String(pub.y),
    };
    return new SubscribeTokenSigner(kid, 'ES256', key, jwk, defaults);
  }

  /** A signer with an Ed25519 private key in PKCS#8 PEM. The JWKS gets only the public key. */
  static eddsa(
    kid: string,
    privateKeyPem: string | Buffer | KeyObject,
    defaults: { audience?: Audience; subject?: string } = {},
  ): SubscribeTokenSigner {
    checkKid(kid);
    const key = privateKey(privateKeyPem, 'EdDSA');
    if (key.asymmetricKeyType !== 'ed25519') {
      throw new TokenError('EdDSA key: not an Ed25519 private key');
    }
    const pub = createPublicKey(key).export({ format: 'jwk' });
    const jwk = { kty: 'OKP', crv: 'Ed25519', kid, alg: 'EdDSA', x: String(pub.x) };
    return new SubscribeTokenSigner(kid, 'EdDSA', key, jwk, defaults);
  }

  /**
   * The claims `sign` would sign: `iat` now (or `now`), `exp` `iat +
   * ttlSeconds`, `audience` and `subject` or else the signer's.
   */
  claims(
    entity: string,
    ids: Iterable<string>,
    ttlSeconds: number,
    options: { audience?: Audience; subject?: string; now?: number } = {},
  ): SubscribeClaims {
    if (!Number.isInteger(ttlSeconds) || ttlSeconds < 1 || ttlSeconds > MAX_TOKEN_TTL_SECONDS) {
      throw new TokenError(
        `token lifetime ${String(ttlSeconds)} s is outside 1 ..= ${String(MAX_TOKEN_TTL_SECONDS)} (whole seconds)`,
      );
    }
    const iat = options.now ?? Math.floor(Date.now() / 1000);
    const claims: SubscribeClaims = {
      entity,
      ids: typeof ids === 'string' ? [ids] : [...ids],
      exp: iat + ttlSeconds,
      iat,
    };
    const aud = options.audience ?? this.#audience;
    if (aud !== undefined) claims.aud = aud;
    const sub = options.subject ?? this.#subject;
    if (sub !== undefined) claims.sub = sub;
    return claims;
  }

  /**
   * A token granting `ids` of `entity` (`"*"`: any id) for `ttlSeconds`, a
   * whole number from 1 to 86,400. `audience` (`aud`) and `subject` (`sub`,
   * the application's user id) override the signer's.
   */
  sign(
    entity: string,
    ids: Iterable<string>,
    ttlSeconds: number,
    options: { audience?: Audience; subject?: string } = {},
  ): string {
    return this.signClaims(this.claims(entity, ids, ttlSeconds, options));
  }

  /** Signs `claims` as they are (`exp` is not compared with the clock), in the SDKs' claim order. */
  signClaims(claims: SubscribeClaims): string {
    const header = { typ: 'JWT', alg: this.alg, kid: this.kid };
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(normalize(claims)))}`;
    let signature: Buffer;
    if (this.alg === 'HS256') {
      signature = createHmac('sha256', this.#key).update(input).digest();
    } else if (this.alg === 'ES256') {
      signature = cryptoSign('sha256', Buffer.from(input), {
        key: this.#key as KeyObject,
        dsaEncoding: 'ieee-p1363',
      });
    } else {
      signature = cryptoSign(null, Buffer.from(input), this.#key);
    }
    return `${input}.${b64url(signature)}`;
  }

  /**
   * The node's verifying key as a JWK: for HS256 the secret itself (`oct`),
   * for ES256 and EdDSA only the public key.
   */
  jwk(): Record<string, string> {
    return { ...this.#jwk };
  }

  toString(): string {
    return `SubscribeTokenSigner(kid=${JSON.stringify(this.kid)}, alg=${this.alg}, key=<redacted>)`;
  }

  toJSON(): Record<string, string> {
    return { kid: this.kid, alg: this.alg, key: '<redacted>' };
  }
}

/**
 * The JWKS document (`{"keys":[...]}`) of the signers' verifying keys, the
 * file given to the node with `--subscribe-token-jwks PATH`.
 */
export function jwks(signers: Iterable<SubscribeTokenSigner>): string {
  return JSON.stringify({ keys: [...signers].map((s) => s.jwk()) }, null, 2);
}
