// `node --test` with a global WebSocket (Node 20 needs --experimental-websocket):
//   node test/run.mjs [node --test options and paths...]

import { spawnSync } from 'node:child_process';

const major = Number(process.versions.node.split('.')[0]);
const flags = major < 22 ? ['--experimental-websocket'] : [];
const result = spawnSync(process.execPath, [...flags, '--test', ...process.argv.slice(2)], {
  stdio: 'inherit',
});
process.exit(result.status ?? 1);
