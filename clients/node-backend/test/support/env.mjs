// Test helpers of this package: the node binary and the testkit (through
// the browser client's harness, which starts them), a raw websocket client
// that records every frame, and a logger that keeps what it is told.

import { existsSync } from 'node:fs';
import { join } from 'node:path';

import { repoRoot } from './paths.mjs';

export { packageRoot, repoRoot } from './paths.mjs';

// The harness finds the binaries by these variables, else in the
// repository's target/debug; set them here so both agree.
for (const [name, envVar] of [
  ['entity-sync', 'ENTITY_SYNC_BIN'],
  ['entity-sync-testkit', 'ENTITY_SYNC_TESTKIT_BIN'],
]) {
  process.env[envVar] ??= join(repoRoot, 'target', 'debug', name);
  if (!existsSync(process.env[envVar])) {
    throw new Error(`${process.env[envVar]} not found: run \`cargo build\` (or set ${envVar})`);
  }
}

export {
  NodeProcess,
  makeCerts,
  metric,
  until,
  DEADLINE_MS,
} from '../../../js/test/support/harness.mjs';

/** A websocket client that records every frame it receives. */
export class WsClient {
  static async open(node, path = '/ws/entity-sync/') {
    const ws = new WebSocket(`ws://127.0.0.1:${node.wsPort}${path}`);
    const client = new WsClient(ws);
    await new Promise((done, fail) => {
      ws.addEventListener('open', done, { once: true });
      ws.addEventListener('error', () => fail(new Error('websocket failed to open')), {
        once: true,
      });
    });
    return client;
  }

  constructor(ws) {
    this.ws = ws;
    this.frames = [];
    ws.addEventListener('message', (event) => this.frames.push(JSON.parse(String(event.data))));
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  subscribe(entity, id, extra = {}) {
    this.send({ action: 'subscribe', body: { entity, id: String(id), ...extra } });
  }

  /** Frames of `action` about `entity/id`. */
  of(action, entity, id) {
    return this.frames.filter(
      (f) => f.action === action && f.body?.entity === entity && f.body?.id === String(id),
    );
  }

  /** Waits until `count` frames of `action` about `entity/id` arrived; returns them. */
  async waitFor(action, entity, id, count = 1, ms = 10_000) {
    const deadline = Date.now() + ms;
    for (;;) {
      const found = this.of(action, entity, id);
      if (found.length >= count) return found;
      if (Date.now() > deadline) {
        throw new Error(
          `timed out waiting for ${String(count)} ${action} of ${entity}/${String(id)}; frames: ${JSON.stringify(this.frames)}`,
        );
      }
      await new Promise((done) => setTimeout(done, 10));
    }
  }

  close() {
    this.ws.close();
  }
}

export { recordingLogger } from './logger.mjs';

export const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
