"""The committed gRPC stubs are what the generation script makes from proto/,
and they type the calls: mypy --strict passes on the package and fails on
code that misuses a call."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from mypy import api as mypy

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "scripts" / "generate_stubs.py"
SRC = HERE.parent / "src"
COMMITTED = SRC / "entity_sync" / "_proto"
CONFIG = HERE.parent / "pyproject.toml"


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate_stubs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.generate(tmp_path)
    assert sorted(p.name for p in written) == [
        "entitysync_pb2.py",
        "entitysync_pb2.pyi",
        "entitysync_pb2_grpc.py",
        "entitysync_pb2_grpc.pyi",
    ]
    for fresh in written:
        committed = COMMITTED / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is out of date: run python clients/python/scripts/generate_stubs.py"
        )


def _mypy(*paths: Path) -> tuple[str, int]:
    """mypy --strict (the package's settings) on ``paths``: its report and status."""
    out, err, status = mypy.run(
        ["--config-file", str(CONFIG), "--no-incremental", "--no-error-summary", *map(str, paths)]
    )
    return out + err, status


def test_the_package_is_clean_under_mypy_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYPYPATH", str(SRC))
    report, status = _mypy(SRC / "entity_sync")
    assert status == 0, report


MISUSE = """
import grpc.aio

from entity_sync._proto import entitysync_pb2 as pb
from entity_sync._proto.entitysync_pb2_grpc import EntitySyncStub


async def misuse(channel: grpc.aio.Channel) -> None:
    stub = EntitySyncStub(channel)
    await stub.Notify(pb.Register(name="x"))
    response = await stub.Notify(pb.NotifyRequest())
    response.acepted
    call = stub.Resolve()
    await call.write(pb.NotifyRequest())
    async for message in call:
        reveal_type(message)
"""


def test_the_stubs_type_the_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Untyped stubs (``Any``) would let every line below through."""
    monkeypatch.setenv("MYPYPATH", str(SRC))
    snippet = tmp_path / "misuse.py"
    snippet.write_text(MISUSE)
    report, status = _mypy(snippet)
    assert status == 1, report
    lines = report.splitlines()

    def on(line: int, text: str) -> None:
        assert any(f"misuse.py:{line}: " in r and text in r for r in lines), (line, text, report)

    on(10, '"Register"')  # a Register where Notify takes a NotifyRequest
    on(12, '"acepted"')  # no such field of NotifyResponse
    on(14, '"NotifyRequest"')  # Resolve's requests are ResolverMessages
    on(16, "entitysync_pb2.NodeMessage")  # what the stream gives
