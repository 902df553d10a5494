// `node --test` with a global WebSocket: Node 22 and newer have one; Node 20
// needs --experimental-websocket (which later versions may not take).
//   node test/run.mjs [node --test options and paths...]

import { spawnSync } from 'node:child_process';

const major = Number(process.versions.node.split('.')[0]);
const flags = major < 22 ? ['--experimental-websocket'] : [];
const { status, signal } = spawnSync(
  process.execPath,
  [...flags, '--test', ...process.argv.slice(2)],
  { stdio: 'inherit' },
);
process.exit(status ?? (signal ? 1 : 0));
