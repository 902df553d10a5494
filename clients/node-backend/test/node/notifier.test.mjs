// Notifier against the real node: retries while the node is down, one
// idempotency key across all attempts of a call, and the retry deadline.

import assert from 'node:assert/strict';
import { createServer, connect } from 'node:net';
import { after, before, test } from 'node:test';

import { EntitySyncError, Notifier } from '../../dist/index.js';
import { NodeProcess, recordingLogger, sleep } from '../support/env.mjs';

let node;
before(async () => {
  node = await new NodeProcess({ name: 'nb-notifier' }).start();
});
after(async () => {
  await node?.stop();
});

/**
 * A TCP proxy in front of the node's gRPC port: its first `drops`
 * connections are read (the bytes kept) and then cut, the others forwarded.
 */
async function proxy(target, drops, { hold = false, cutAfterMs = 150 } = {}) {
  const dropped = [];
  const sockets = new Set();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    if (dropped.length < drops) {
      const chunks = [];
      dropped.push(chunks);
      socket.on('data', (chunk) => chunks.push(chunk));
      // Cut after a while, or (`hold`) keep it open and silent.
      if (!hold) setTimeout(() => socket.destroy(), cutAfterMs);
      return;
    }
    const upstream = connect(target, '127.0.0.1');
    sockets.add(upstream);
    upstream.on('error', () => socket.destroy());
    socket.pipe(upstream).pipe(socket);
  });
  await new Promise((done) => server.listen(0, '127.0.0.1', done));
  return {
    url: `http://127.0.0.1:${String(server.address().port)}`,
    dropped,
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

test('every attempt of one notify carries one idempotency key; the retry that lands is applied once', async () => {
  const front = await proxy(node.grpcPort, 2);
  const notifier = new Notifier(front.url, { retryForMs: 10_000 });
  try {
    const receipt = await notifier.notify([
      ['items', 1],
      ['items', 2],
    ]);
    assert.equal(receipt.attempts, 3);
    assert.equal(receipt.accepted, 2);
    assert.equal(receipt.duplicate, false);
    assert.equal(front.dropped.length, 2);
    const keys = front.dropped.map((chunks) => {
      const found =
        Buffer.concat(chunks)
          .toString('latin1')
          .match(/[0-9a-f]{32}/g) ?? [];
      assert.equal(found.length, 1, 'one idempotency key per attempt');
      return found[0];
    });
    assert.equal(keys[0], keys[1]);
    // The attempt that got through used it too: the same key again is a duplicate.
    const direct = new Notifier(node.grpcUrl);
    const again = await direct.notifyWithKey(
      [
        ['items', 1],
        ['items', 2],
      ],
      keys[0],
    );
    direct.close();
    assert.equal(again.duplicate, true);
    assert.deepEqual(again.sequences, receipt.sequences);
    // A fresh notify gets a fresh key.
    const next = await notifier.notify([['items', 1]]);
    assert.equal(next.duplicate, false);
    assert.equal(next.attempts, 1);
  } finally {
    notifier.close();
    front.close();
  }
});

test('a notify made while the node is down lands once it is back', async () => {
  await node.stop();
  const { logger, lines } = recordingLogger();
  const notifier = new Notifier(node.grpcUrl, { retryForMs: 15_000, logger });
  try {
    const pending = notifier.notify([['items', 7]], {
      traceId: '0af7651916cd43dd8448eb211c80319c',
    });
    await sleep(600);
    await node.start();
    const receipt = await pending;
    assert.ok(receipt.attempts > 1, `attempts ${String(receipt.attempts)}`);
    assert.equal(receipt.accepted, 1);
    assert.equal(receipt.duplicate, false);
    assert.equal(receipt.traceId, '0af7651916cd43dd8448eb211c80319c');
    assert.ok(
      lines.some((l) => l.level === 'debug' && /notify failed \(attempt 1/.test(l.message)),
    );
  } finally {
    notifier.close();
  }
});

test('attempts past their deadline are retried until the call’s deadline, then it fails', async () => {
  const front = await proxy(node.grpcPort, 1_000, { hold: true });
  const { logger, lines } = recordingLogger();
  const notifier = new Notifier(front.url, { retryForMs: 1_200, callTimeoutMs: 250, logger });
  const started = Date.now();
  try {
    await assert.rejects(notifier.notify([['items', 1]]), (err) => {
      assert.ok(err instanceof EntitySyncError);
      assert.equal(err.kind, 'unavailable');
      assert.equal(err.code, 'DEADLINE_EXCEEDED');
      assert.equal(err.retryable, true);
      return true;
    });
  } finally {
    notifier.close();
    front.close();
  }
  const took = Date.now() - started;
  assert.ok(took >= 1_000 && took < 2_000, `gave up after ${String(took)} ms`);
  const retried = lines.filter((l) =>
    /^notify failed \(attempt \d+, .*DEADLINE_EXCEEDED/.test(l.message),
  );
  assert.ok(retried.length >= 2, `${String(retried.length)} retries`);
  assert.equal(lines.filter((l) => l.level === 'warn').length, 1);
  assert.match(lines.find((l) => l.level === 'warn').message, /notify failed after \d+ attempts/);
});

test('a call that is refused is not retried', async () => {
  const notifier = new Notifier(node.grpcUrl);
  try {
    await assert.rejects(notifier.notify([['', '1']]), (err) => {
      assert.equal(err.kind, 'rejected');
      assert.equal(err.code, 'INVALID_ARGUMENT');
      return true;
    });
  } finally {
    notifier.close();
  }
});

test('a node down for longer than the retry window: UNAVAILABLE', async () => {
  // A port nothing listens on: connections are refused.
  const closed = createServer();
  await new Promise((done) => closed.listen(0, '127.0.0.1', done));
  const port = closed.address().port;
  await new Promise((done) => closed.close(done));
  const { logger, lines } = recordingLogger();
  const notifier = new Notifier(`http://127.0.0.1:${String(port)}`, { retryForMs: 600, logger });
  try {
    await assert.rejects(notifier.notify([['items', 1]]), (err) => {
      assert.equal(err.kind, 'unavailable');
      assert.equal(err.code, 'UNAVAILABLE');
      return true;
    });
  } finally {
    notifier.close();
  }
  assert.ok(lines.filter((l) => l.level === 'debug').length >= 2);
});
