"""The pytest plugin of entity-sync: a real node per test.

Loaded by pytest once the package is installed (the ``pytest11`` entry
point). The fixtures:

- ``entity_sync_node``: a started :class:`~entity_sync.testing.NodeProcess`
  (stopped after the test), on loopback ports it binds itself. Async: it needs
  pytest-asyncio (the ``test`` extra).
- ``entity_sync_node_args``: extra command-line arguments of that node (none
  unless a ``conftest.py`` overrides it, e.g. ``["--push-unchanged-rows"]``).
- ``entity_sync_bin``: the node binary: ``--entity-sync-bin``, else the
  ``ENTITY_SYNC_BIN`` environment variable, else ``entity-sync`` on the PATH
  (tests that use it are skipped when none is found).

The fixture scope of ``entity_sync_node`` is the ini option
``entity_sync_node_scope`` (``function`` unless set): a suite whose tests
share one node sets ``module`` or ``session`` (with an asyncio loop scope
at least as wide).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal, get_args

import pytest

from .testing import NodeProcess

_Scope = Literal["function", "class", "module", "package", "session"]
_SCOPES: tuple[_Scope, ...] = get_args(_Scope)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("entity_sync", "entity-sync node")
    group.addoption(
        "--entity-sync-bin",
        default=None,
        help="the entity-sync node binary (default: $ENTITY_SYNC_BIN, else entity-sync on PATH)",
    )
    parser.addini(
        "entity_sync_node_scope",
        default="function",
        help="the pytest scope of the entity_sync_node fixture (default: function)",
    )


def _node_scope(fixture_name: str, config: pytest.Config) -> _Scope:
    """The scope of ``entity_sync_node``: the ini option's."""
    scope = str(config.getini("entity_sync_node_scope"))
    for known in _SCOPES:
        if scope == known:
            return known
    raise pytest.UsageError(f"entity_sync_node_scope = {scope!r}: use one of {_SCOPES}")


@pytest.fixture(scope="session")
def entity_sync_bin(pytestconfig: pytest.Config) -> Path:
    """The node binary the ``entity_sync_node`` fixture runs."""
    given = pytestconfig.getoption("entity_sync_bin") or os.environ.get("ENTITY_SYNC_BIN")
    if given:
        return Path(given)
    found = shutil.which("entity-sync")
    if found is None:
        pytest.skip("no entity-sync binary: set ENTITY_SYNC_BIN or pass --entity-sync-bin")
    return Path(found)


@pytest.fixture(scope="session")
def entity_sync_node_args() -> list[str]:
    """Extra arguments of the ``entity_sync_node`` node; override it to add some."""
    return []


async def _entity_sync_node(
    entity_sync_bin: Path, entity_sync_node_args: list[str]
) -> AsyncIterator[NodeProcess]:
    """A node on loopback ports it binds itself, ready; stopped after the test (or
    the scope's last test)."""
    async with NodeProcess(entity_sync_bin, entity_sync_node_args) as node:
        yield node


def _without_pytest_asyncio() -> None:
    """Stands in for the fixture where pytest-asyncio is missing."""
    pytest.fail("the entity_sync_node fixture needs pytest-asyncio: pip install pytest-asyncio")


# Without pytest-asyncio the plugin still loads (it is loaded in every pytest
# run of an environment the package is installed in), and only a test that
# asks for the node fails, saying why.
_node_fixture: object
try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the test extra has it
    _node_fixture = pytest.fixture(scope=_node_scope, name="entity_sync_node")(
        _without_pytest_asyncio
    )
else:
    _node_fixture = pytest_asyncio.fixture(scope=_node_scope, name="entity_sync_node")(
        _entity_sync_node
    )
