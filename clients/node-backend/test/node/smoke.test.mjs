import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Answer, Backend, FetchMode, Notifier } from '../../dist/index.js';
import { NodeProcess, WsClient, recordingLogger } from '../support/env.mjs';

let node;
before(async () => {
  node = await new NodeProcess({ name: 'nb-smoke' }).start();
});
after(async () => {
  await node?.stop();
});

test('rows reach a subscriber, after a notify too', async () => {
  let qty = 2;
  const { logger, lines } = recordingLogger();
  const backend = new Backend(node.grpcUrl, {
    name: 'smoke',
    logger,
    entities: {
      items: {
        fetchMode: FetchMode.SHARED,
        handler: (req) => req.ids.map((id) => [id, Answer.row({ id, qty })]),
      },
    },
  });
  const stop = new AbortController();
  const serving = backend.serve(stop.signal);
  await backend.waitRegistered({ timeoutMs: 10_000 });
  const ws = await WsClient.open(node);
  ws.subscribe('items', 101);
  await ws.waitFor('push', 'items', 101, 1);
  qty = 3;
  const notifier = new Notifier(node.grpcUrl);
  const receipt = await notifier.notify([['items', 101]]);
  assert.equal(receipt.accepted, 1);
  const pushes = await ws.waitFor('push', 'items', 101, 2);
  assert.deepEqual(pushes[1].body.rows, [{ id: '101', qty: 3 }]);
  notifier.close();
  ws.close();
  stop.abort();
  await serving;
  console.log(lines);
});
