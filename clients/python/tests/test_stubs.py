"""The committed gRPC stubs are what the generation script makes from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "scripts" / "generate_stubs.py"
COMMITTED = HERE.parent / "src" / "entity_sync" / "_proto"


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
    ]
    for fresh in written:
        committed = COMMITTED / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is out of date: run python clients/python/scripts/generate_stubs.py"
        )
