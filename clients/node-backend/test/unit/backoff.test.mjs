import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Backoff } from '../../dist/index.js';

test('delays double up to the ceiling, each in the upper half of its step', () => {
  const low = new Backoff(100, 1000, () => 0);
  assert.deepEqual(
    Array.from({ length: 6 }, () => low.nextDelay()),
    [50, 100, 200, 400, 500, 500],
  );
  const high = new Backoff(100, 1000, () => 0.999999);
  const delays = Array.from({ length: 6 }, () => high.nextDelay());
  const steps = [100, 200, 400, 800, 1000, 1000];
  delays.forEach((d, i) => {
    assert.ok(d < steps[i] && d > steps[i] * 0.99, `${String(d)} for step ${String(steps[i])}`);
  });
});

test('jitter spreads the delays of one step', () => {
  const seen = new Set();
  for (let i = 0; i < 50; i++) seen.add(Math.round(new Backoff(1000, 1000).nextDelay()));
  assert.ok(seen.size > 10, `only ${String(seen.size)} distinct delays`);
  for (const d of seen) assert.ok(d >= 500 && d <= 1000);
});

test('reset goes back to the floor', () => {
  const b = new Backoff(10, 1000, () => 0);
  b.nextDelay();
  b.nextDelay();
  b.nextDelay();
  assert.equal(b.nextDelay(), 40);
  b.reset();
  assert.equal(b.nextDelay(), 5);
});

test('a ceiling below the floor is the floor', () => {
  const b = new Backoff(200, 50, () => 0);
  assert.deepEqual([b.nextDelay(), b.nextDelay()], [100, 100]);
});
