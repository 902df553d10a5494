// Bearer tokens and TLS on the gRPC port, and subscribe tokens the node
// verifies with the JWKS this package writes.

import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import {
  Answer,
  Backend,
  FetchMode,
  jwks,
  Notifier,
  SubscribeTokenSigner,
  tlsFromFiles,
} from '../../dist/index.js';
import { NodeProcess, WsClient, makeCerts, recordingLogger } from '../support/env.mjs';

const dir = mkdtempSync(join(tmpdir(), 'nb-security-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const RESOLVER_TOKEN = 'resolver-token-0123456789abcdef';
const NOTIFIER_TOKEN = 'notifier-token-0123456789abcdef';

async function serving(node, url, options) {
  const { logger, lines } = recordingLogger();
  const backend = new Backend(url, { logger, ...options });
  const stop = new AbortController();
  const done = backend.serve(stop.signal);
  return {
    backend,
    lines,
    done,
    stop: async () => {
      stop.abort();
      await done;
    },
  };
}

describe('bearer token over TLS with a custom CA', () => {
  let node;
  let certs;
  let url;
  before(async () => {
    certs = await makeCerts(join(dir, 'certs'));
    const tokens = join(dir, 'tokens');
    writeFileSync(tokens, `resolver ${RESOLVER_TOKEN} items\nnotifier ${NOTIFIER_TOKEN} items\n`);
    node = await new NodeProcess({
      name: 'nb-tls',
      args: [
        '--grpc-tokens-file',
        tokens,
        '--grpc-tls-cert',
        certs.cert,
        '--grpc-tls-key',
        certs.key,
      ],
    }).start();
    url = `https://127.0.0.1:${String(node.grpcPort)}`;
  });
  after(async () => {
    await node?.stop();
  });

  test('a backend and a notifier with the token and the CA serve and notify', async () => {
    let qty = 1;
    const tls = tlsFromFiles({ ca: certs.ca });
    const b = await serving(node, url, {
      name: 'secure',
      bearerToken: RESOLVER_TOKEN,
      tls,
      entities: { items: (req) => req.ids.map((id) => [id, Answer.row({ id, qty })]) },
    });
    try {
      await b.backend.waitRegistered({ timeoutMs: 10_000 });
      const client = await WsClient.open(node);
      client.subscribe('items', 5);
      await client.waitFor('push', 'items', 5);
      qty = 2;
      const notifier = new Notifier(url, { bearerToken: NOTIFIER_TOKEN, tls });
      const receipt = await notifier.notify([['items', 5]]);
      notifier.close();
      assert.equal(receipt.accepted, 1);
      const pushes = await client.waitFor('push', 'items', 5, 2);
      assert.deepEqual(
        pushes.map((p) => p.body.rows),
        [[{ id: '5', qty: 1 }], [{ id: '5', qty: 2 }]],
      );
      client.close();
    } finally {
      await b.stop();
    }
  });

  test('no token, an unknown one, or the wrong role: refused for good, not retried', async () => {
    const tls = { ca: readFileSync(certs.ca) };
    for (const [bearer, code] of [
      [undefined, 'UNAUTHENTICATED'],
      ['unknown-token-0123456789abcdef', 'UNAUTHENTICATED'],
      [NOTIFIER_TOKEN, 'PERMISSION_DENIED'],
    ]) {
      const b = await serving(node, url, {
        name: 'refused',
        ...(bearer ? { bearerToken: bearer } : {}),
        tls,
        entities: { items: () => ({}) },
      });
      await assert.rejects(b.done, (err) => {
        assert.equal(err.kind, 'rejected');
        assert.equal(err.code, code);
        assert.equal(err.retryable, false);
        return true;
      });
      assert.equal(b.backend.state.phase, 'stopped');
      assert.equal(b.lines.filter((l) => l.level === 'error').length, 1);
      assert.ok(!b.lines.some((l) => bearer && l.message.includes(bearer)));
    }
    const notifier = new Notifier(url, { bearerToken: RESOLVER_TOKEN, tls });
    await assert.rejects(notifier.notify([['items', 1]]), (err) => {
      assert.equal(err.code, 'PERMISSION_DENIED');
      return true;
    });
    notifier.close();
  });

  test('without the CA the node’s certificate is not trusted', async () => {
    const notifier = new Notifier(url, { bearerToken: NOTIFIER_TOKEN, retryForMs: 300 });
    await assert.rejects(notifier.notify([['items', 1]]), (err) => {
      assert.equal(err.kind, 'unavailable');
      assert.equal(err.code, 'UNAVAILABLE');
      assert.match(err.message, /certificate/);
      return true;
    });
    notifier.close();
  });
});

describe('subscribe tokens', () => {
  let node;
  const hs = SubscribeTokenSigner.hs256('k-hs', Buffer.from('0123456789abcdef0123456789abcdef'));
  const es = SubscribeTokenSigner.es256(
    'k-es',
    generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey,
  );
  const ed = SubscribeTokenSigner.eddsa('k-ed', generateKeyPairSync('ed25519').privateKey);
  before(async () => {
    const path = join(dir, 'jwks.json');
    writeFileSync(path, jwks([hs, es, ed]));
    node = await new NodeProcess({
      name: 'nb-jwks',
      args: ['--subscribe-token-jwks', path],
    }).start();
  });
  after(async () => {
    await node?.stop();
  });

  test('a token from each algorithm subscribes: subscribed, then a push of the shared resolve', async () => {
    const requests = [];
    const b = await serving(node, node.grpcUrl, {
      name: 'tokens',
      entities: {
        items: {
          fetchMode: FetchMode.SHARED,
          handler: (req) => {
            requests.push([req.reason, req.shared, req.secret, [...req.ids]]);
            return req.ids.map((id) => [id, Answer.row({ id })]);
          },
        },
      },
    });
    try {
      await b.backend.waitRegistered({ timeoutMs: 10_000 });
      const client = await WsClient.open(node);
      const signers = [hs, es, ed];
      signers.forEach((signer, i) => {
        client.subscribe('items', `t${String(i)}`, {
          token: signer.sign('items', [`t${String(i)}`], 60),
        });
      });
      for (let i = 0; i < signers.length; i++) {
        const id = `t${String(i)}`;
        assert.equal((await client.waitFor('subscribed', 'items', id)).length, 1);
        const [push] = await client.waitFor('push', 'items', id);
        assert.deepEqual(push.body.rows, [{ id }]);
        assert.equal(client.of('error', 'items', id).length, 0);
      }
      assert.deepEqual(
        requests.map(([reason, shared, secret]) => [reason, shared, secret]),
        signers.map(() => ['subscribe', true, '']),
      );
      // A token for another id grants nothing.
      client.subscribe('items', 'other', { token: hs.sign('items', ['t0'], 60) });
      const [refused] = await client.waitFor('error', 'items', 'other');
      assert.equal(refused.body.code, 'token_invalid');
      client.close();
    } finally {
      await b.stop();
    }
  });
});
