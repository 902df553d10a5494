// Run by test/node/wss.test.mjs in a process of its own, so that the trust
// store (NODE_EXTRA_CA_CERTS, read once at start) is the test's to choose.
// Prints one JSON line per event; exits after the first rows, or after the
// first failed connection when it is told to expect one.
//   node [--experimental-websocket] wss-child.mjs URL PATH ENTITY ID SECRET until-rows|until-failure

import { EntitySyncClient } from '../../dist/entity-sync.js';

const [url, path, entity, id, secret, mode] = process.argv.slice(2);
const print = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
const client = new EntitySyncClient(url, {
  path,
  secret,
  minDelayMs: 100,
  maxDelayMs: 200,
  onState: (state) => {
    print({ state });
    if (state === 'reconnecting' && mode === 'until-failure') client.close();
  },
  onError: (error) => print({ error }),
});
print({ url: client.url });
client.subscribe(entity, id, (rows, meta) => {
  print({ rows, snapshot: meta.snapshot });
  client.close();
});
