// src/gen/ is what `npm run generate` writes from the proto: regenerate it
// into a temporary directory and compare, file by file.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { test } from 'node:test';

import { packageRoot, repoRoot } from '../support/paths.mjs';

function files(dir) {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath ?? e.path, e.name)))
    .sort();
}

test('src/gen matches a fresh generation from the proto', () => {
  const out = mkdtempSync(join(tmpdir(), 'es-gen-'));
  try {
    const template = join(out, 'buf.gen.yaml');
    const ours = readFileSync(join(packageRoot, 'buf.gen.yaml'), 'utf8');
    assert.match(ours, /out: src\/gen/);
    writeFileSync(template, ours.replace('out: src/gen', `out: ${join(out, 'gen')}`));
    const buf = join(packageRoot, 'node_modules', '.bin', 'buf');
    const run = spawnSync(buf, ['generate', join(repoRoot, 'proto'), '--template', template], {
      cwd: packageRoot,
      encoding: 'utf8',
      env: {
        ...process.env,
        PATH: `${join(packageRoot, 'node_modules', '.bin')}:${process.env.PATH}`,
      },
      timeout: 60_000,
    });
    assert.equal(run.status, 0, run.stderr);
    const committed = join(packageRoot, 'src', 'gen');
    assert.deepEqual(files(join(out, 'gen')), files(committed));
    assert.ok(files(committed).length > 0);
    for (const file of files(committed)) {
      assert.equal(
        readFileSync(join(out, 'gen', file), 'utf8'),
        readFileSync(join(committed, file), 'utf8'),
        `${file} is stale: run npm run generate`,
      );
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
