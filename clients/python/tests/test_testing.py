"""The testing helper: the node process on asyncio, on the ports it binds
and reports in its log, its readiness by the ports, its failures told at
once; importable without the test extra; the pytest plugin's fixture."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from entity_sync import Notifier
from entity_sync.testing import DEADLINE, NodeProcess


async def test_the_plugin_fixture_gives_a_ready_node(entity_sync_node: NodeProcess) -> None:
    """Ready means serving: both ports answer as soon as start returns."""
    entity_sync_node.check_alive()
    async with Notifier(entity_sync_node.grpc_url, retry_for=0) as notifier:
        receipt = await notifier.notify([("items", "1")])
    assert (receipt.accepted, receipt.attempts) == (1, 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", entity_sync_node.ws_port)
    writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
    assert (await reader.readline()).split()[1] == b"200"
    writer.close()


async def test_stop_ends_the_node_with_its_exit_code_and_start_reuses_the_ports(
    node_bin: Path,
) -> None:
    node = NodeProcess(node_bin)
    async with node:
        ports = (node.ws_port, node.grpc_port)
        assert await node.stop() == 0  # SIGTERM: a clean shutdown
        assert node.returncode is None  # stopped: no process any more
        with pytest.raises(RuntimeError, match="not running"):
            node.check_alive()
        await node.start()
        assert (node.ws_port, node.grpc_port) == ports
        node.check_alive()
    assert await node.stop() is None  # stopping twice is harmless


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_the_node_binds_port_0_and_its_listening_line_tells_the_ports(
    node_bin: Path, log_format: str
) -> None:
    """One info line once the ports are bound, in either log format, whatever
    RUST_LOG holds back: the addresses the node got."""
    args = ["--log-format", log_format, "--metrics-addr", "127.0.0.1:0"]
    node = NodeProcess(node_bin, args, env={**os.environ, "RUST_LOG": "warn"})
    assert (node.ws_port, node.grpc_port, node.metrics_port) == (0, 0, None)
    async with node:
        ports = (node.ws_port, node.grpc_port, node.metrics_port)
        assert 0 not in ports and None not in ports and len(set(ports)) == 3, ports
        (line,) = [
            line for line in node.log_text().splitlines() if "entity_sync::node::listening" in line
        ]
        for field, port in zip(("ws_addr", "grpc_addr", "metrics_addr"), ports, strict=True):
            text = f" {field}=127.0.0.1:{port}"
            written = f'"{field}":"127.0.0.1:{port}"' if log_format == "json" else text
            assert written in line, line
        reader, writer = await asyncio.open_connection("127.0.0.1", node.metrics_port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert (await reader.readline()).split()[1] == b"200"
        writer.close()


async def test_a_node_that_exits_at_start_is_reported_at_once_with_its_log(
    node_bin: Path,
) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(RuntimeError, match="exited") as err:
        async with NodeProcess(node_bin, ["--no-such-flag"]):
            pass
    # Told when the process ended, not at the readiness deadline.
    assert loop.time() - began < DEADLINE / 2
    assert "--no-such-flag" in str(err.value)


async def test_a_node_that_never_listens_times_out_and_is_stopped(tmp_path: Path) -> None:
    # A stand-in binary that runs but never opens its ports.
    script = tmp_path / "silent-node"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    node = NodeProcess(script)
    with pytest.raises(TimeoutError, match="not ready"):
        await node.start()
    assert node.returncode is None  # it was stopped (and reaped)


def test_the_helper_imports_without_the_test_extra() -> None:
    """websockets and pytest are test-only: the helper's module must not need them."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("websockets", "pytest", "pytest_asyncio"):
            sys.modules[name] = None  # any import of it fails
        import entity_sync.testing as testing
        assert testing.NodeProcess and testing.WsClient
        try:
            import asyncio
            asyncio.run(testing.WsClient.connect("ws://127.0.0.1:1/"))
        except ImportError as err:
            print(err)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "WsClient needs the websockets package" in out


def test_the_plugin_is_registered_and_its_scope_is_an_ini_option(
    pytester: pytest.Pytester, node_bin: Path
) -> None:
    """A suite of its own, as a user's would be: one node for a module's tests."""
    pytester.makeini(
        """
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = module
        asyncio_default_test_loop_scope = module
        entity_sync_node_scope = module
        """
    )
    pytester.makepyfile(
        """
        seen = set()

        async def test_one(entity_sync_node):
            seen.add(entity_sync_node.grpc_port)

        async def test_two(entity_sync_node):
            seen.add(entity_sync_node.grpc_port)
            assert len(seen) == 1
        """
    )
    result = pytester.runpytest_subprocess(
        f"--entity-sync-bin={node_bin}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2)


def test_without_a_binary_the_plugin_skips(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENTITY_SYNC_BIN", raising=False)
    monkeypatch.setenv("PATH", str(pytester.path))
    pytester.makepyfile(
        """
        async def test_node(entity_sync_node):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "asyncio_mode=auto")
    result.assert_outcomes(skipped=1)
