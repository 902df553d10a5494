import assert from 'node:assert/strict';
import { test } from 'node:test';

import { create } from '@bufbuild/protobuf';

import {
  FetchMode as PbFetchMode,
  Reason as PbReason,
  ResolveRequestSchema,
  Status,
} from '../../dist/gen/entitysync/v1/entitysync_pb.js';
import {
  Answer,
  Backend,
  eachId,
  EntitySyncError,
  FetchMode,
  HANDLER_FAILED,
  Notifier,
  ResolveRequest,
  toResults,
  UNANSWERED_MESSAGE,
} from '../../dist/index.js';
import { recordingLogger } from '../support/logger.mjs';

const text = (bytes) => new TextDecoder().decode(bytes);

test('a node request maps to a ResolveRequest; its secret is not enumerable', () => {
  const pb = create(ResolveRequestSchema, {
    requestId: 7n,
    entity: 'items',
    ids: ['1', '2'],
    secret: 's3cret',
    reason: PbReason.SUBSCRIBE,
    shared: false,
  });
  const req = ResolveRequest.fromProto(pb);
  assert.equal(req.entity, 'items');
  assert.deepEqual(req.ids, ['1', '2']);
  assert.equal(req.secret, 's3cret');
  assert.equal(req.reason, 'subscribe');
  assert.equal(req.isSubscribe, true);
  assert.equal(req.shared, false);
  assert.ok(!JSON.stringify(req).includes('s3cret'));
  assert.deepEqual(Object.keys(req).sort(), ['entity', 'ids', 'reason', 'shared', 'signal']);

  const change = ResolveRequest.fromProto(
    create(ResolveRequestSchema, {
      entity: 'items',
      ids: ['1'],
      reason: PbReason.CHANGE,
      shared: true,
    }),
  );
  assert.equal(change.reason, 'change');
  assert.equal(change.isSubscribe, false);
  assert.equal(change.shared, true);
  assert.equal(change.secret, '');
  const unknown = ResolveRequest.fromProto(
    create(ResolveRequestSchema, { entity: 'items', ids: ['1'], reason: 9 }),
  );
  assert.equal(unknown.reason, 'unspecified');
});

test('answers map to key results in request order, whatever shape the handler returns', () => {
  const answers = {
    b: Answer.rows([{ id: 'b', n: 1 }, 'x']),
    a: Answer.notFound(),
    c: Answer.forbidden('no'),
    d: Answer.error('later'),
    e: Answer.jsonRows(['{"raw":true}', new TextEncoder().encode('[1]')]).withVersion(42),
  };
  const ids = ['a', 'b', 'c', 'd', 'e'];
  for (const shape of [answers, new Map(Object.entries(answers)), Object.entries(answers)]) {
    const results = toResults(ids, shape);
    assert.deepEqual(
      results.map((r) => [r.id, r.status, r.rows.map(text), r.version, r.message]),
      [
        ['a', Status.NOT_FOUND, [], 0n, ''],
        ['b', Status.OK, ['{"id":"b","n":1}', '"x"'], 0n, ''],
        ['c', Status.FORBIDDEN, [], 0n, 'no'],
        ['d', Status.ERROR, [], 0n, 'later'],
        ['e', Status.OK, ['{"raw":true}', '[1]'], 42n, ''],
      ],
    );
  }
});

test('an id without an answer is answered ERROR, and reported', () => {
  const missing = [];
  const results = toResults(['1', '2'], { 1: Answer.row(1), 2: 'not an answer' }, (id) =>
    missing.push(id),
  );
  assert.deepEqual(
    results.map((r) => [r.id, r.status, r.message]),
    [
      ['1', Status.OK, ''],
      ['2', Status.ERROR, UNANSWERED_MESSAGE],
    ],
  );
  assert.deepEqual(missing, ['2']);
});

test('a row that cannot be serialized makes the answer an error', () => {
  const cyclic = {};
  cyclic.self = cyclic;
  for (const bad of [cyclic, 1n, undefined]) {
    const answer = Answer.row(bad);
    assert.equal(answer.status, 'error', String(typeof bad));
    assert.equal(answer.message, 'the backend could not serialize a row');
  }
});

const backendWith = (handler, logger) =>
  new Backend('http://127.0.0.1:1', {
    name: 'unit',
    logger,
    entities: { items: { handler, fetchMode: FetchMode.SHARED } },
  });

test('a handler that throws answers ERROR with the fixed message; its text goes to the log', async () => {
  for (const handler of [
    () => {
      throw new Error('db password=hunter2 refused');
    },
    () => Promise.reject(new Error('db password=hunter2 refused')),
  ]) {
    const { logger, lines } = recordingLogger();
    const results = await backendWith(handler, logger).resolve(
      new ResolveRequest({ entity: 'items', ids: ['1', '2'] }),
    );
    assert.deepEqual(
      results.map((r) => [r.id, r.status, r.message, r.rows.length]),
      [
        ['1', Status.ERROR, HANDLER_FAILED, 0],
        ['2', Status.ERROR, HANDLER_FAILED, 0],
      ],
    );
    const warned = lines.filter((l) => l.level === 'warn');
    assert.equal(warned.length, 1);
    assert.match(warned[0].message, /resolve handler of items failed: .*hunter2 refused/);
  }
});

test('a request for an entity not registered is answered ERROR', async () => {
  const { logger, lines } = recordingLogger();
  const results = await backendWith(() => ({}), logger).resolve(
    new ResolveRequest({ entity: 'other', ids: ['1'] }),
  );
  assert.deepEqual(
    results.map((r) => [r.status, r.message]),
    [[Status.ERROR, 'this backend does not serve the entity']],
  );
  assert.equal(lines.length, 1);
});

test('eachId calls the per-key function for every id', async () => {
  const seen = [];
  const handler = eachId(async (id, req) => {
    seen.push([id, req.secret]);
    return id === '2' ? Answer.notFound() : Answer.row({ id });
  });
  const results = await backendWith(handler).resolve(
    new ResolveRequest({ entity: 'items', ids: ['1', '2'], secret: 'k' }),
  );
  assert.deepEqual(seen, [
    ['1', 'k'],
    ['2', 'k'],
  ]);
  assert.deepEqual(
    results.map((r) => r.status),
    [Status.OK, Status.NOT_FOUND],
  );
});

test('the fetch modes map to the wire values', () => {
  assert.equal(FetchMode.SHARED, 'shared');
  assert.equal(PbFetchMode.SHARED, 1);
  assert.equal(PbFetchMode.PER_SUBSCRIBER, 2);
});

test('invalid settings are config errors that name the problem, never the token', () => {
  const cases = [
    [() => new Backend('http://127.0.0.1:1', { name: ' ', entities: { a: () => ({}) } }), /name/],
    [() => new Backend('http://127.0.0.1:1', { name: 'x', entities: {} }), /at least one/],
    [
      () =>
        new Backend('http://127.0.0.1:1', {
          name: 'x',
          entities: { a: () => ({}) },
          maxInFlight: 0,
        }),
      /maxInFlight/,
    ],
    [
      () =>
        new Backend('http://127.0.0.1:1', {
          name: 'x',
          entities: { a: { handler: () => ({}), refreshEveryMs: 500 } },
        }),
      /refreshEveryMs must be a whole number from 1000 to 86400000, got 500/,
    ],
    [() => new Notifier('127.0.0.1:50051'), /use http\(s\):\/\/host:port/],
    [() => new Notifier('http://127.0.0.1'), /use http\(s\):\/\/host:port/],
    [() => new Notifier('http://127.0.0.1:1/path'), /use http\(s\):\/\/host:port/],
    [() => new Notifier('http://127.0.0.1:1', { tls: {} }), /use https/],
    [() => new Notifier('http://127.0.0.1:1', { bearerToken: 'sec ret' }), /printable ASCII/],
    [() => new Notifier('https://127.0.0.1:1', { tls: { cert: 'x' } }), /private key/],
  ];
  for (const [make, message] of cases) {
    assert.throws(make, (err) => {
      assert.ok(err instanceof EntitySyncError);
      assert.equal(err.kind, 'config');
      assert.equal(err.retryable, false);
      assert.match(err.message, message);
      assert.ok(!err.message.includes('sec ret'));
      return true;
    });
  }
});
