"""An entity-sync backend on PostgreSQL: rows from SQL, changes from triggers.

The schema's triggers send ``pg_notify('entity_sync', '[["items","1"],...]')``
on every insert, update and delete. This backend LISTENs on that channel and
calls the node's ``Notify`` with the changed keys (one call in flight; keys
that arrive meanwhile are coalesced into the next), and answers the node's
resolve requests with one SQL query per entity and request:

- ``lists/{id}`` (PER_SUBSCRIBER): the list row, then its items. A private list
  is readable only by the users in ``list_readers``, recognized by the secret
  their browser sent; anyone else is answered FORBIDDEN.
- ``items/{id}`` (SHARED): the item row, authorized on subscribe by its list.

So any program that writes to these tables (psql, a migration, another
service) reaches the browsers.

Run: ``python backend.py --database-url postgresql://... --node http://127.0.0.1:50051``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import Iterable

import psycopg
from psycopg_pool import AsyncConnectionPool

from entity_sync import (
    Answer,
    Answers,
    Entity,
    Error,
    FetchMode,
    Key,
    Notifier,
    ResolveRequest,
    serve,
)

log = logging.getLogger("postgres-backend")

CHANNEL = "entity_sync"
MAX_KEYS_PER_NOTIFY = 1_000
PRIVATE = "this list is private"


def numeric_ids(ids: Iterable[str]) -> dict[int, str]:
    """The ids that can be table ids (others are not found), by value."""
    return {int(id): id for id in ids if id.isdigit() and len(id) < 19}


class Resolvers:
    """The SQL behind each entity."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def lists(self, req: ResolveRequest) -> Answers:
        ids = numeric_ids(req.ids)
        answers = {id: Answer.not_found() for id in req.ids}
        async with self.pool.connection() as conn:
            lists = await conn.execute(
                """
                SELECT l.id, l.private,
                       EXISTS (SELECT 1 FROM list_readers r JOIN users u ON u.id = r.user_id
                               WHERE r.list_id = l.id AND u.secret = %(secret)s) AS reader,
                       json_build_object('id', l.id, 'name', l.name, 'private', l.private)::text
                FROM lists l WHERE l.id = ANY(%(ids)s)
                """,
                {"ids": list(ids), "secret": req.secret},
            )
            list_rows: dict[int, list[str]] = {}
            for list_id, private, reader, row in await lists.fetchall():
                if private and not reader:
                    answers[ids[list_id]] = Answer.forbidden(PRIVATE)
                else:
                    list_rows[list_id] = [row]
            # The rows a list refers to: its items, in order, after the list.
            items = await conn.execute(
                """
                SELECT list_id, json_build_object('id', id, 'list_id', list_id,
                                                  'name', name, 'qty', qty)::text
                FROM items WHERE list_id = ANY(%s) ORDER BY list_id, id
                """,
                [list(list_rows)],
            )
            for list_id, row in await items.fetchall():
                list_rows[list_id].append(row)
        for list_id, rows in list_rows.items():
            answers[ids[list_id]] = Answer.json_rows(rows)
        return answers

    async def items(self, req: ResolveRequest) -> Answers:
        ids = numeric_ids(req.ids)
        answers = {id: Answer.not_found() for id in req.ids}
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                """
                SELECT i.id, l.private,
                       EXISTS (SELECT 1 FROM list_readers r JOIN users u ON u.id = r.user_id
                               WHERE r.list_id = l.id AND u.secret = %(secret)s) AS reader,
                       json_build_object('id', i.id, 'list_id', i.list_id,
                                         'name', i.name, 'qty', i.qty)::text
                FROM items i JOIN lists l ON l.id = i.list_id
                WHERE i.id = ANY(%(ids)s)
                """,
                {"ids": list(ids), "secret": req.secret},
            )
            for item_id, private, reader, row in await cursor.fetchall():
                # SHARED: a change resolve carries no secret; its subscribers
                # were authorized when they subscribed.
                if private and not reader and not req.shared:
                    answers[ids[item_id]] = Answer.forbidden(PRIVATE)
                else:
                    answers[ids[item_id]] = Answer.json_rows([row])
        return answers


class Coalescer:
    """Changed keys on their way to ``Notify``: one call in flight, the keys
    that arrive meanwhile wait (each once) for the next call."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.pending: dict[Key, None] = {}  # an ordered set
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()  # nothing pending, no call in flight
        self.idle.set()

    def add(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.pending[key] = None
        if self.pending:
            self.idle.clear()
            self.wake.set()

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                batch = list(self.pending)[:MAX_KEYS_PER_NOTIFY]
                for key in batch:
                    del self.pending[key]
                await self.notify(batch)
            self.idle.set()

    async def notify(self, batch: list[Key]) -> None:
        try:
            await self.notifier.notify(batch)
        except Error as err:
            if err.retryable:
                # The node stayed unavailable for the notifier's whole retry
                # window: keep the keys for the next round.
                log.warning("notify failed, keeping %d keys: %s", len(batch), err)
                self.add(batch)
                await asyncio.sleep(1)
            else:
                log.error("notify refused, %d keys dropped: %s", len(batch), err)


def parse_payload(payload: str) -> list[Key]:
    try:
        keys = json.loads(payload)
        return [(str(entity), str(id)) for entity, id in keys]
    except (ValueError, TypeError):
        log.warning("a notification that is not a key list was ignored")
        return []


async def listen(database_url: str, coalescer: Coalescer) -> None:
    """LISTENs on the channel and hands every key to the coalescer;
    reconnects when the connection drops."""
    delay = 0.1
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                log.info("listening on %s", CHANNEL)
                delay = 0.1
                async for notification in conn.notifies():
                    coalescer.add(parse_payload(notification.payload))
        except psycopg.OperationalError as err:
            # Changes committed while no connection listened are not
            # delivered: see README ("What LISTEN/NOTIFY does not do").
            log.warning("LISTEN connection lost (%s); reconnecting in %.1fs", err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def run(args: argparse.Namespace) -> None:
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)
    async with AsyncConnectionPool(
        args.database_url, min_size=1, max_size=args.pool_size, open=False
    ) as pool:
        await pool.open(wait=True, timeout=30)
        resolvers = Resolvers(pool)
        notifier_token = os.environ.get("ENTITY_SYNC_NOTIFIER_TOKEN")
        async with (
            Notifier(args.node, bearer_token=notifier_token) as notifier,
            # LISTEN and the coalescer live as long as the backend serves; if
            # one of them fails, the group stops serving too, and run()
            # raises why (rather than serve on without notifying).
            asyncio.TaskGroup() as background,
        ):
            coalescer = Coalescer(notifier)
            listening = background.create_task(listen(args.database_url, coalescer))
            notifying = background.create_task(coalescer.run())
            try:
                await serve(
                    args.node,
                    {
                        "lists": Entity(resolvers.lists, FetchMode.PER_SUBSCRIBER),
                        "items": Entity(resolvers.items, FetchMode.SHARED),
                    },
                    name="postgres-example",
                    shutdown=shutdown,
                    max_in_flight=args.pool_size * 2,
                    bearer_token=os.environ.get("ENTITY_SYNC_RESOLVER_TOKEN"),
                )
            finally:
                listening.cancel()
                # Keys already received still go out (bounded).
                try:
                    async with asyncio.timeout(5):
                        await coalescer.idle.wait()
                except TimeoutError:
                    log.warning("stopping with %d keys not notified", len(coalescer.pending))
                notifying.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description="entity-sync backend on PostgreSQL")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--node", default=os.environ.get("ENTITY_SYNC_NODE", "http://127.0.0.1:50051")
    )
    parser.add_argument("--pool-size", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
