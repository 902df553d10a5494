import assert from 'node:assert/strict';
import {
  createHmac,
  createPublicKey,
  generateKeyPairSync,
  verify as cryptoVerify,
} from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

import {
  ANY_ID,
  jwks,
  MAX_TOKEN_TTL_SECONDS,
  SubscribeTokenSigner,
  TokenError,
} from '../../dist/index.js';
import { repoRoot } from '../support/paths.mjs';

// A test-only HS256 secret of exactly 32 bytes.
const SECRET = Buffer.from('0123456789abcdef0123456789abcdef');

// The test vector the Rust and Python SDKs assert (backend/src/tokens/tests.rs,
// clients/python/tests/test_tokens.py): HS256 with SECRET, kid "k1".
const VECTOR_CLAIMS = {
  entity: 'items',
  ids: ['101', '*'],
  exp: 2_000_000_000,
  nbf: 1_700_000_000,
  iat: 1_700_000_000,
  aud: 'shop',
  sub: 'user-42',
};
const VECTOR_TOKEN =
  'eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.' +
  'eyJlbnRpdHkiOiJpdGVtcyIsImlkcyI6WyIxMDEiLCIqIl0sImV4cCI6MjAwMDAwMDAwMCwibmJmIjoxNzAw' +
  'MDAwMDAwLCJpYXQiOjE3MDAwMDAwMDAsImF1ZCI6InNob3AiLCJzdWIiOiJ1c2VyLTQyIn0.' +
  'kwCO3gQw41re6HoB6GGKytXOQOwmM5ITFbySaLi5YuU';
// The same claims signed EdDSA with the Rust SDK's test Ed25519 key, kid "k1".
const VECTOR_TOKEN_EDDSA =
  'eyJ0eXAiOiJKV1QiLCJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.' +
  'eyJlbnRpdHkiOiJpdGVtcyIsImlkcyI6WyIxMDEiLCIqIl0sImV4cCI6MjAwMDAwMDAwMCwibmJmIjoxNzAwMDAwMDAwLCJpYXQiOjE3MDAwMDAwMDAsImF1ZCI6InNob3AiLCJzdWIiOiJ1c2VyLTQyIn0.' +
  'D5UNhnrCHxYzlB4Z_Jc14zuSNdmNmZ4h4OcVVhyp9S1SmXhmHcrRpIUdR6JQXpiiGM9ydzXYSBqdQ7lSrhBhCw';
const RUST_TEST_KEYS = join(repoRoot, 'backend', 'tests', 'keys');

const pem = (key) => key.export({ format: 'pem', type: 'pkcs8' });
const es256Key = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
const ed25519Key = generateKeyPairSync('ed25519').privateKey;

/** Verifies `token` with the JWK of its kid in `jwksJson` (independently of the signer); its claims. */
function verify(jwksJson, token) {
  const [h, p, s] = token.split('.');
  const header = JSON.parse(Buffer.from(h, 'base64url').toString());
  const jwk = JSON.parse(jwksJson).keys.find((k) => k.kid === header.kid);
  assert.ok(jwk, `no key ${String(header.kid)}`);
  assert.equal(header.alg, jwk.alg);
  const input = Buffer.from(`${h}.${p}`);
  const signature = Buffer.from(s, 'base64url');
  let ok;
  if (jwk.kty === 'oct') {
    const expected = createHmac('sha256', Buffer.from(jwk.k, 'base64url')).update(input).digest();
    ok = expected.equals(signature);
  } else {
    const material = { ...jwk };
    delete material.kid;
    delete material.alg;
    const key = createPublicKey({ key: material, format: 'jwk' });
    ok =
      jwk.kty === 'EC'
        ? cryptoVerify('sha256', input, { key, dsaEncoding: 'ieee-p1363' }, signature)
        : cryptoVerify(null, input, key, signature);
  }
  assert.ok(ok, 'signature does not verify');
  return JSON.parse(Buffer.from(p, 'base64url').toString());
}

test('HS256 mints the SDKs\u2019 shared test vector, byte for byte', () => {
  const signer = SubscribeTokenSigner.hs256('k1', SECRET);
  assert.equal(signer.signClaims(VECTOR_CLAIMS), VECTOR_TOKEN);
  // Claim order does not depend on the caller's.
  const reversed = Object.fromEntries(Object.entries(VECTOR_CLAIMS).reverse());
  assert.equal(signer.signClaims(reversed), VECTOR_TOKEN);
  assert.deepEqual(verify(jwks([signer]), VECTOR_TOKEN), VECTOR_CLAIMS);
});

test('the JWKs have the layout of the other SDKs', () => {
  assert.deepEqual(SubscribeTokenSigner.hs256('k-hs', SECRET).jwk(), {
    kty: 'oct',
    kid: 'k-hs',
    alg: 'HS256',
    k: 'MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY',
  });
  const es = SubscribeTokenSigner.es256('k-es', pem(es256Key)).jwk();
  assert.deepEqual(Object.keys(es), ['kty', 'crv', 'kid', 'alg', 'x', 'y']);
  assert.deepEqual([es.kty, es.crv, es.alg], ['EC', 'P-256', 'ES256']);
  const ed = SubscribeTokenSigner.eddsa('k-ed', ed25519Key).jwk();
  assert.deepEqual(Object.keys(ed), ['kty', 'crv', 'kid', 'alg', 'x']);
  assert.ok(!('d' in es) && !('d' in ed), 'a private part in a JWK');
  const doc = JSON.parse(
    jwks([SubscribeTokenSigner.hs256('a', SECRET), SubscribeTokenSigner.eddsa('b', ed25519Key)]),
  );
  assert.deepEqual(
    doc.keys.map((k) => k.kid),
    ['a', 'b'],
  );
});

test(
  'the Rust SDK test keys give its JWKs and its EdDSA vector',
  { skip: !existsSync(RUST_TEST_KEYS) },
  () => {
    const ed = SubscribeTokenSigner.eddsa(
      'k-ed',
      readFileSync(join(RUST_TEST_KEYS, 'ed25519-test-private.pem')),
    );
    assert.equal(ed.jwk().x, 'fZlFHCBo3_lSZZWFv4v_E-Xt5g8ovaG1wgyIWCoWbU4');
    const es = SubscribeTokenSigner.es256(
      'k-es',
      readFileSync(join(RUST_TEST_KEYS, 'es256-test-private.pem'), 'utf8'),
    );
    assert.deepEqual(
      [es.jwk().x, es.jwk().y],
      [
        'A-GMSPMn7O6HkFj4w4UJiyPOcFSr3yByMTl3FRUp5h8',
        '7pOrJvwb3Vnst9baGhKK22Rg-_qK9zBkj7xeChATN-A',
      ],
    );
    const k1 = SubscribeTokenSigner.eddsa(
      'k1',
      readFileSync(join(RUST_TEST_KEYS, 'ed25519-test-private.pem')),
    );
    assert.equal(k1.signClaims(VECTOR_CLAIMS), VECTOR_TOKEN_EDDSA);
    const token = es.sign('items', ['1'], 60);
    const publicKey = createPublicKey(readFileSync(join(RUST_TEST_KEYS, 'es256-test-public.pem')));
    const [h, p, s] = token.split('.');
    assert.ok(
      cryptoVerify(
        'sha256',
        Buffer.from(`${h}.${p}`),
        { key: publicKey, dsaEncoding: 'ieee-p1363' },
        Buffer.from(s, 'base64url'),
      ),
    );
  },
);

test('sign: header and claims in order, iat now, exp iat + ttl, defaults and overrides', () => {
  for (const signer of [
    SubscribeTokenSigner.hs256('k-hs', SECRET, { audience: 'shop', subject: 'u1' }),
    SubscribeTokenSigner.es256('k-es', pem(es256Key), { audience: 'shop', subject: 'u1' }),
    SubscribeTokenSigner.eddsa('k-ed', pem(ed25519Key), { audience: 'shop', subject: 'u1' }),
  ]) {
    const before = Math.floor(Date.now() / 1000);
    const token = signer.sign('items', ['101', ANY_ID], 300);
    const after = Math.floor(Date.now() / 1000);
    const header = JSON.parse(Buffer.from(token.split('.')[0], 'base64url').toString());
    assert.deepEqual(Object.entries(header), [
      ['typ', 'JWT'],
      ['alg', signer.alg],
      ['kid', signer.kid],
    ]);
    const claims = verify(jwks([signer]), token);
    assert.deepEqual(Object.keys(claims), ['entity', 'ids', 'exp', 'iat', 'aud', 'sub']);
    assert.ok(claims.iat >= before && claims.iat <= after);
    assert.equal(claims.exp, claims.iat + 300);
    assert.deepEqual(
      [claims.entity, claims.ids, claims.aud, claims.sub],
      ['items', ['101', '*'], 'shop', 'u1'],
    );
    const other = verify(
      jwks([signer]),
      signer.sign('lists', ['1'], 60, { audience: ['a', 'b'], subject: 'u2' }),
    );
    assert.deepEqual([other.aud, other.sub], [['a', 'b'], 'u2']);
  }
  const plain = verify(
    jwks([SubscribeTokenSigner.hs256('k', SECRET)]),
    SubscribeTokenSigner.hs256('k', SECRET).sign('items', ['1'], 1),
  );
  assert.deepEqual(Object.keys(plain), ['entity', 'ids', 'exp', 'iat']);
});

test('bad keys and claims are refused without key material in the message', () => {
  const secretText = 'short-secret-value';
  const rsa = pem(generateKeyPairSync('rsa', { modulusLength: 1024 }).privateKey);
  const p384 = pem(generateKeyPairSync('ec', { namedCurve: 'P-384' }).privateKey);
  const signer = SubscribeTokenSigner.hs256('k', SECRET);
  const cases = [
    [
      () => SubscribeTokenSigner.hs256('k', Buffer.from(secretText)),
      /18 bytes; subscribe tokens need at least 32/,
    ],
    [() => SubscribeTokenSigner.hs256('', SECRET), /kid/],
    [
      () => SubscribeTokenSigner.es256('k', 'not a pem'),
      /ES256 key: not an unencrypted PEM private key/,
    ],
    [() => SubscribeTokenSigner.es256('k', rsa), /not a private key on curve P-256/],
    [() => SubscribeTokenSigner.es256('k', p384), /not a private key on curve P-256/],
    [() => SubscribeTokenSigner.eddsa('k', pem(es256Key)), /not an Ed25519 private key/],
    [() => signer.sign('items', ['1'], 0), /outside 1 \.\.= 86400/],
    [() => signer.sign('items', ['1'], MAX_TOKEN_TTL_SECONDS + 1), /outside/],
    [() => signer.sign('items', ['1'], 1.5), /whole seconds/],
    [() => signer.sign('', ['1'], 60), /entity is empty/],
    [() => signer.sign('items', [], 60), /ids is empty/],
    [() => signer.sign('items', [''], 60), /an id is empty/],
    [() => signer.sign('items', ['1'], 60, { audience: '' }), /aud is empty/],
    [() => signer.signClaims({ ...VECTOR_CLAIMS, role: 'admin' }), /unknown role/],
    [() => signer.signClaims({ entity: 'items', ids: ['1'] }), /exp must be a positive integer/],
  ];
  for (const [make, message] of cases) {
    assert.throws(make, (err) => {
      assert.ok(err instanceof TokenError, String(err));
      assert.match(err.message, message);
      assert.ok(!err.message.includes(secretText) && !err.message.includes('PRIVATE'));
      return true;
    });
  }
  assert.ok(!String(signer).includes('0123'));
  assert.ok(!JSON.stringify(signer).includes('0123'));
});
