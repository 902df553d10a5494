// Subscribe tokens for tests: a JWKS file with one HS256 `oct` key for the
// node (`--subscribe-token-jwks`), and compact JWS tokens signed with it.

import { createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const b64url = (value) =>
  Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

/** A fresh secret, written as a JWKS file; `mint` signs tokens with it. */
export function tokenKey({ kid = 'k1' } = {}) {
  const secret = randomBytes(32);
  const dir = mkdtempSync(join(tmpdir(), 'entity-sync-client-jwks-'));
  const jwksPath = join(dir, 'jwks.json');
  writeFileSync(
    jwksPath,
    JSON.stringify({ keys: [{ kty: 'oct', kid, alg: 'HS256', k: secret.toString('base64url') }] }),
  );
  /**
   * A token for `entity` and `ids`, valid `seconds` from now (`exp` in whole
   * seconds, so 1 s less at worst); `claims` override or add.
   */
  const mint = ({ entity, ids, seconds = 60, claims = {}, header = {} }) => {
    const now = Math.floor(Date.now() / 1000);
    const head = b64url({ alg: 'HS256', typ: 'JWT', kid, ...header });
    const body = b64url({ entity, ids, iat: now, exp: now + seconds, ...claims });
    const signature = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
    return `${head}.${body}.${signature}`;
  };
  return { jwksPath, dir, mint };
}
