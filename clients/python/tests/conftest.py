"""Fixtures: the real node binary on free ports (the package's pytest plugin,
``entity_sync_node``), backends run as tasks."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from entity_sync import Backend
from entity_sync.testing import DEADLINE, NodeProcess

# pytester: tests/test_testing.py runs the plugin in suites of its own.
pytest_plugins = ["pytester"]

# The node's opt-out of skipping a push of rows a connection already got.
PUSH_EACH_NOTIFY = ["--push-unchanged-rows"]

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def entity_sync_bin(pytestconfig: pytest.Config) -> Path:
    """The node binary: ``--entity-sync-bin``, ``ENTITY_SYNC_BIN``, else the
    workspace's debug build (the plugin's default would be the PATH)."""
    given = pytestconfig.getoption("entity_sync_bin") or os.environ.get("ENTITY_SYNC_BIN")
    return Path(given) if given else REPO / "target" / "debug" / "entity-sync"


@pytest.fixture(scope="session")
def entity_sync_node_args() -> list[str]:
    # The tests notify without changing rows and expect a push each time.
    return PUSH_EACH_NOTIFY


@pytest.fixture
def node_bin(entity_sync_bin: Path) -> Path:
    """The node binary, for tests that start nodes of their own."""
    return entity_sync_bin


@pytest.fixture
def node(entity_sync_node: NodeProcess) -> NodeProcess:
    """The plugin's node, under the short name the tests use."""
    return entity_sync_node


class Running:
    """A backend serving in a task until :meth:`stop`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.shutdown = asyncio.Event()
        self.task = asyncio.create_task(backend.serve(self.shutdown))

    async def registered(self, other_than: str = "") -> str:
        """Waits until registered (on a node other than ``other_than``); the node id."""
        wait = asyncio.create_task(self.backend.wait_registered(other_than=other_than))
        done, _ = await asyncio.wait(
            {wait, self.task}, timeout=DEADLINE * 2, return_when=asyncio.FIRST_COMPLETED
        )
        if wait not in done:
            wait.cancel()
            if self.task in done:
                self.task.result()  # raises the serve error
            raise TimeoutError("the backend did not register")
        return wait.result().node_id

    async def stop(self) -> None:
        self.shutdown.set()
        async with asyncio.timeout(DEADLINE * 3):
            await self.task


@pytest.fixture
async def running() -> AsyncIterator[list[Running]]:
    """Backends a test starts (append them); stopped after the test."""
    started: list[Running] = []
    yield started
    for backend in started:
        if not backend.task.done():
            backend.shutdown.set()
    for backend in started:
        try:
            async with asyncio.timeout(DEADLINE * 3):
                await backend.task
        except Exception:
            pass


def quick(endpoint: str, handlers: dict, **settings: object) -> Backend:  # type: ignore[type-arg]
    """A backend with short reconnect delays."""
    settings.setdefault("name", "test")
    settings.setdefault("reconnect_backoff", (0.02, 0.2))
    return Backend(endpoint, handlers, **settings)  # type: ignore[arg-type]
