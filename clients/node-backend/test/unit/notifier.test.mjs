import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { test } from 'node:test';

import { Notifier } from '../../dist/index.js';

// A port whose first connection is cut at once and whose later ones are held
// open without a word: the first attempt fails for a reason, the last one
// only runs out of the time left.
async function cutThenSilent() {
  const held = [];
  let connections = 0;
  const server = createServer((socket) => {
    connections++;
    if (connections === 1) socket.destroy();
    else held.push(socket);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${String(server.address().port)}`,
    connections: () => connections,
    close: () => {
      for (const socket of held) socket.destroy();
      server.close();
    },
  };
}

test('a notify that runs out of time reports why the attempt before failed', async () => {
  const port = await cutThenSilent();
  const lines = [];
  const logger = {
    debug: (m) => lines.push(['debug', m]),
    info: (m) => lines.push(['info', m]),
    warn: (m) => lines.push(['warn', m]),
    error: (m) => lines.push(['error', m]),
  };
  const notifier = new Notifier(port.url, { retryForMs: 400, logger });
  try {
    await assert.rejects(notifier.notify([['items', 1]]), (err) => {
      // The cut connection's error, not the silent one's DEADLINE_EXCEEDED.
      assert.equal(err.code, 'CANCELED');
      return true;
    });
    assert.ok(port.connections() >= 2, `connections: ${String(port.connections())}`);
    const warnings = lines.filter(([level]) => level === 'warn');
    assert.equal(warnings.length, 1);
    assert.doesNotMatch(warnings[0][1], /DEADLINE_EXCEEDED/);
  } finally {
    notifier.close();
    port.close();
  }
});
