// The committed dist/ is what a consumer imports: it must be exactly what
// tsc makes of src/ now. Fails when the source was edited without
// `npm run build`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const tsc = join(root, 'node_modules', '.bin', 'tsc');

test('the committed dist/ equals a fresh tsc build of src/', () => {
  const out = mkdtempSync(join(tmpdir(), 'entity-sync-react-build-'));
  try {
    execFileSync(tsc, ['-p', join(root, 'tsconfig.json'), '--outDir', out], {
      cwd: root,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const fresh = readdirSync(out).sort();
    assert.deepEqual(readdirSync(join(root, 'dist')).sort(), fresh);
    assert.deepEqual(fresh, ['index.d.ts', 'index.js']);
    for (const name of fresh) {
      assert.ok(
        readFileSync(join(root, 'dist', name), 'utf8') === readFileSync(join(out, name), 'utf8'),
        `dist/${name} differs from a fresh build: run \`npm run build\` in clients/react and commit dist/`,
      );
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
