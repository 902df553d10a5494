// The committed dist/ is what the demo serves and what npm publishes: it must
// be exactly what tsc makes of src/ now. Fails when the source was edited
// without `npm run build`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

test('the committed dist/ equals a fresh tsc build of src/', () => {
  const out = mkdtempSync(join(tmpdir(), 'entity-sync-client-build-'));
  try {
    execFileSync(
      join(root, 'node_modules', '.bin', 'tsc'),
      ['-p', join(root, 'tsconfig.json'), '--outDir', out],
      {
        cwd: root,
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    const fresh = readdirSync(out).sort();
    const committed = readdirSync(join(root, 'dist')).sort();
    assert.deepEqual(committed, fresh, 'dist/ holds exactly the files tsc makes');
    assert.deepEqual(fresh, ['entity-sync.d.ts', 'entity-sync.js']);
    for (const name of fresh) {
      const want = readFileSync(join(out, name), 'utf8');
      const have = readFileSync(join(root, 'dist', name), 'utf8');
      assert.ok(
        have === want,
        `dist/${name} differs from a fresh build: run \`npm run build\` in clients/js and commit dist/`,
      );
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('the declarations type a caller strictly (test/types/usage.ts compiles, its expected errors stay errors)', () => {
  try {
    execFileSync(
      join(root, 'node_modules', '.bin', 'tsc'),
      ['-p', join(root, 'test', 'types', 'tsconfig.json')],
      {
        cwd: root,
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
  } catch (err) {
    assert.fail(`tsc on test/types/usage.ts:\n${err.stdout}${err.stderr}`);
  }
});
