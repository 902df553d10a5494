"""The PostgreSQL example end to end: its own PostgreSQL server (initdb on a
temp dir, its Unix socket only), the node binary, backend.py as a process, websocket
clients; writes with plain SQL from another connection, and the pushes they
cause. Also measures notify -> push latency (printed, never asserted)."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from entity_sync.testing import DEADLINE, NodeProcess, WsClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PRIVATE = "this list is private"


def pg_bin() -> Path:
    """Where initdb and pg_ctl are: PG_BIN, the PATH, or Debian's newest."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not versions:
        pytest.fail("initdb not found: install PostgreSQL (apt-get install postgresql)")
    return Path(versions[-1]).parent


class Postgres:
    """A PostgreSQL server of the test's own: a temp data dir, stopped and
    removed at the end. As root (CI), it runs as the `postgres` user, because
    initdb refuses root.

    It listens on its Unix socket only, in that temp dir: PostgreSQL cannot
    bind TCP port 0 and report the port it got, and a port picked for it in
    advance could be taken before it binds. In a directory of its own, the
    port number only names the socket file, so the default one is free."""

    port = 5432

    def __init__(self) -> None:
        self.bin = pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="entity-sync-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.url = f"postgresql://postgres@/postgres?host={self.dir}&port={self.port}"

    def run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, stdout=subprocess.DEVNULL, timeout=120)

    def start(self) -> None:
        self.run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                 "postgres", "--no-sync", "-E", "UTF8")  # fmt: skip
        options = f"-p {self.port} -k {self.dir} -c listen_addresses= -c fsync=off"
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                 "-l", str(self.dir / "postgres.log"), "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        try:
            self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                     "-w", "-t", "30", "stop")  # fmt: skip
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        server.start()
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute((HERE / "schema.sql").read_text())
            conn.execute(
                """
                INSERT INTO users (id, name, secret) VALUES
                    (1, 'alice', 'alice-secret-1b2c3d'), (2, 'bob', 'bob-secret-4e5f6a');
                INSERT INTO lists (id, name, private) VALUES
                    (1, 'groceries', false), (2, 'presents', true), (3, 'burst', false);
                INSERT INTO list_readers VALUES (2, 1);
                INSERT INTO items (id, list_id, name, qty) VALUES
                    (1, 1, 'milk', 2), (2, 1, 'eggs', 12), (3, 2, 'book', 1),
                    (4, 3, 'counter', 0), (5, 3, 'latency', 0);
                SELECT setval('items_id_seq', 100);
                """
            )
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def entity_sync_bin(pytestconfig: pytest.Config) -> Path:
    """The node binary of the package's pytest plugin: ``--entity-sync-bin``,
    ``ENTITY_SYNC_BIN``, else the workspace's debug build."""
    given = pytestconfig.getoption("entity_sync_bin") or os.environ.get("ENTITY_SYNC_BIN")
    return Path(given) if given else REPO / "target" / "debug" / "entity-sync"


@pytest.fixture(scope="module")
def node(entity_sync_node: NodeProcess) -> NodeProcess:
    """The plugin's node, one per module (pytest.ini: entity_sync_node_scope)."""
    return entity_sync_node


READY = ("registered (node", "listening on entity_sync")
"""What backend.py logs once it serves and LISTENs."""


@pytest.fixture(scope="module")
async def backend(postgres: Postgres, node: NodeProcess) -> AsyncIterator[Path]:
    """backend.py as its own process, ready once it logged that it registered
    and LISTENs (its output is read as it comes, and kept in a log file)."""
    log = postgres.dir.parent / f"{postgres.dir.name}-backend.log"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "backend.py"), "--database-url", postgres.url,
        "--node", node.grpc_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    ready = asyncio.Event()

    async def copy(stdout: asyncio.StreamReader) -> None:
        # Reads to the end, so that the backend never blocks on a full pipe.
        seen = set()
        with open(log, "ab") as out:
            async for line in stdout:
                out.write(line)
                out.flush()
                seen.update(marker for marker in READY if marker.encode() in line)
                if len(seen) == len(READY):
                    ready.set()

    copying = asyncio.create_task(copy(process.stdout))
    try:
        started = asyncio.create_task(ready.wait())
        try:
            async with asyncio.timeout(DEADLINE):
                await asyncio.wait({started, copying}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        finally:
            started.cancel()
        if not ready.is_set():
            pytest.fail(f"the backend did not start:\n{log.read_text(errors='replace')}")
        yield log
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            async with asyncio.timeout(10):
                code = await process.wait()
        except TimeoutError:
            process.kill()
            code = await process.wait()
        await copying
        text = log.read_text(errors="replace")
        log.unlink(missing_ok=True)
    # SIGTERM drains and stops it cleanly: serve returns, the notifier closes.
    assert code == 0, f"backend.py exited with {code}:\n{text}"


@pytest.fixture
async def db(postgres: Postgres) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """The other program that writes: a plain SQL connection, autocommit."""
    async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as conn:
        yield conn


def item(id: int, list_id: int, name: str, qty: int) -> dict[str, Any]:
    return {"id": id, "list_id": list_id, "name": name, "qty": qty}


async def pushes(client: WsClient, n: int) -> dict[tuple[str, str], list[Any]]:
    """The next ``n`` frames, all pushes, by key (their order across keys is free)."""
    out = {}
    for _ in range(n):
        frame = await client.recv()
        assert frame["action"] == "push", frame
        body = frame["body"]
        assert isinstance(body["version"], int), frame
        assert frame == {
            "action": "push",
            "body": {"entity": body["entity"], "id": body["id"], "version": body["version"],
                     "rows": body["rows"]},
        }, frame  # fmt: skip
        out[(body["entity"], body["id"])] = body["rows"]
    return out


async def test_writes_in_sql_reach_subscribers_rows_and_referring_keys(
    backend: Path, node: NodeProcess, db: psycopg.AsyncConnection[Any]
) -> None:
    async with await WsClient.connect(node.ws_url) as client:
        _, rows = await client.subscribe("items", "1")
        assert rows == [item(1, 1, "milk", 2)]
        _, rows = await client.subscribe("lists", "1")
        assert rows == [
            {"id": 1, "name": "groceries", "private": False},
            item(1, 1, "milk", 2),
            item(2, 1, "eggs", 12),
        ]
        # An update: the item's key and its list's.
        await db.execute("UPDATE items SET qty = 3 WHERE id = 1")
        assert await pushes(client, 2) == {
            ("items", "1"): [item(1, 1, "milk", 3)],
            ("lists", "1"): [
                {"id": 1, "name": "groceries", "private": False},
                item(1, 1, "milk", 3),
                item(2, 1, "eggs", 12),
            ],
        }
        # An insert: the list gains a row.
        await db.execute("INSERT INTO items (id, list_id, name, qty) VALUES (7, 1, 'tea', 1)")
        assert await pushes(client, 1) == {
            ("lists", "1"): [
                {"id": 1, "name": "groceries", "private": False},
                item(1, 1, "milk", 3),
                item(2, 1, "eggs", 12),
                item(7, 1, "tea", 1),
            ],
        }
        # A list's own row.
        await db.execute("UPDATE lists SET name = 'shopping' WHERE id = 1")
        (rows,) = (await pushes(client, 1)).values()
        assert rows[0] == {"id": 1, "name": "shopping", "private": False}
        # A delete: empty rows for the item, the list without it.
        await db.execute("DELETE FROM items WHERE id = 1")
        assert await pushes(client, 2) == {
            ("items", "1"): [],
            ("lists", "1"): [
                {"id": 1, "name": "shopping", "private": False},
                item(2, 1, "eggs", 12),
                item(7, 1, "tea", 1),
            ],
        }
        # A rolled-back write notifies nothing; the next committed one does.
        async with db.transaction(force_rollback=True):
            await db.execute("UPDATE items SET qty = 99 WHERE id = 2")
        await db.execute("UPDATE items SET qty = 13 WHERE id = 2")
        (rows,) = (await pushes(client, 1)).values()
        assert rows[1:] == [item(2, 1, "eggs", 13), item(7, 1, "tea", 1)]


async def test_a_private_list_is_read_only_by_its_readers_and_revoked_in_sql(
    backend: Path, node: NodeProcess, db: psycopg.AsyncConnection[Any]
) -> None:
    presents = [{"id": 2, "name": "presents", "private": True}, item(3, 2, "book", 1)]
    async with (
        await WsClient.connect(node.ws_url) as anonymous,
        await WsClient.connect(node.ws_url) as bob,
        await WsClient.connect(node.ws_url) as alice,
    ):
        await anonymous.send_subscribe("lists", "2")
        assert await anonymous.expect_error("forbidden", "lists", "2") == PRIVATE
        await anonymous.send_subscribe("items", "3")
        assert await anonymous.expect_error("forbidden", "items", "3") == PRIVATE
        await anonymous.send_subscribe("lists", "404")
        assert await anonymous.expect_error("not_found", "lists", "404") == "no such key"
        await bob.send_secret("bob-secret-4e5f6a")
        await bob.send_subscribe("lists", "2")
        assert await bob.expect_error("forbidden", "lists", "2") == PRIVATE

        await alice.send_secret("alice-secret-1b2c3d")
        _, rows = await alice.subscribe("lists", "2")
        assert rows == presents
        # Bob is made a reader: he may subscribe now. Alice's rows did not
        # change, so she is pushed nothing (the node skips a push of rows a
        # connection already holds).
        await db.execute("INSERT INTO list_readers VALUES (2, 2)")
        _, rows = await bob.subscribe("lists", "2")
        assert rows == presents
        # Alice is removed: her subscription ends with `forbidden`; Bob's lives on.
        await db.execute("DELETE FROM list_readers WHERE list_id = 2 AND user_id = 1")
        assert await alice.expect_error("forbidden", "lists", "2") == PRIVATE
        # A new secret for Bob in the users table: the old one reads nothing.
        await db.execute("UPDATE users SET secret = 'bob-secret-rotated-77' WHERE id = 2")
        assert await bob.expect_error("forbidden", "lists", "2") == PRIVATE


async def test_a_burst_of_1000_updates_ends_at_the_latest_state(
    backend: Path, node: NodeProcess, db: psycopg.AsyncConnection[Any], capsys: Any
) -> None:
    async with await WsClient.connect(node.ws_url) as client:
        version, rows = await client.subscribe("items", "4")
        assert rows == [item(4, 3, "counter", 0)]
        started = time.perf_counter()
        for qty in range(1, 1001):
            await db.execute("UPDATE items SET qty = %s WHERE id = 4", [qty])
        written = time.perf_counter() - started
        received = 0
        while rows != [item(4, 3, "counter", 1000)]:
            latest, rows = await client.expect_push("items", "4")
            received += 1
            assert latest >= version, "versions never go back"
            version = latest
            assert received <= 1000, "more pushes than changes"
    with capsys.disabled():
        print(
            f"\nburst: 1,000 committed updates in {written:.2f}s; the subscriber got "
            f"{received} pushes and ended at qty 1000"
        )


async def test_notify_to_push_latency(
    backend: Path, node: NodeProcess, db: psycopg.AsyncConnection[Any], capsys: Any
) -> None:
    """COMMIT returned -> websocket frame received, over 200 single updates."""
    updates = 200
    async with await WsClient.connect(node.ws_url) as client:
        await client.subscribe("items", "5")
        arrivals: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

        async def read() -> None:
            # Stamps each frame as it arrives, while the writer waits for COMMIT.
            while True:
                frame = await client.recv(timeout=DEADLINE * 6)
                await arrivals.put((time.perf_counter(), frame))

        reader = asyncio.create_task(read())
        latencies = []
        try:
            for qty in range(1, updates + 1):
                await db.execute("UPDATE items SET qty = %s WHERE id = 5", [qty])
                committed = time.perf_counter()
                while True:
                    async with asyncio.timeout(DEADLINE):
                        at, frame = await arrivals.get()
                    assert frame["action"] == "push", frame
                    if frame["body"]["rows"] == [item(5, 3, "latency", qty)]:
                        break
                latencies.append(at - committed)
                await asyncio.sleep(0.005)
        finally:
            reader.cancel()
    assert len(latencies) == updates
    ms = sorted(x * 1000 for x in latencies)
    p50 = statistics.median(ms)
    p99 = ms[int(len(ms) * 0.99) - 1]
    with capsys.disabled():
        print(
            f"\nnotify -> push latency over {updates} updates (COMMIT returned -> frame "
            f"received): p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"
        )
