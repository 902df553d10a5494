// The whole of a backend: serves items/{id} and notifies a change.
//
// Run a node (cargo run --release -- --grpc-addr 127.0.0.1:50051), then
// node examples/dist/quickstart.js [NODE_URL]; Ctrl-C drains and stops it.

import { Answer, FetchMode, Notifier, serve, type ResolveRequest } from '@entity-sync/backend';

/** Rows of items/{id}: from memory here; a real backend queries its database. */
const ROWS = new Map([['101', { id: 101, name: 'milk', qty: 2 }]]);
const items = (req: ResolveRequest) =>
  req.ids.map((id) => [id, ROWS.has(id) ? Answer.row(ROWS.get(id)) : Answer.notFound()] as const);

const node = process.argv[2] ?? 'http://127.0.0.1:50051';
const stop = new AbortController();
for (const signal of ['SIGINT', 'SIGTERM'] as const)
  process.once(signal, () => {
    stop.abort();
  });
// Serves until Ctrl-C; registers again by itself whenever the node restarts.
const serving = serve(node, {
  name: 'grocery',
  entities: { items: { handler: items, fetchMode: FetchMode.SHARED } },
  signal: stop.signal,
});
// After a change in the database: every subscriber of items/101 is pushed.
const notifier = new Notifier(node);
const receipt = await notifier.notify([['items', 101]]);
notifier.close();
console.log(`notified, bus sequence ${String(receipt.sequences[0])}`);
await serving;
