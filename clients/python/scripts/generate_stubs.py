"""Generates the gRPC stubs of ``proto/entitysync/v1/entitysync.proto``.

Run from anywhere (``python clients/python/scripts/generate_stubs.py``); it
writes ``src/entity_sync/_proto/`` (or ``--out DIR``). The generated files are
committed; ``tests/test_stubs.py`` regenerates them into a temp dir and fails
when the committed ones are out of date. Needs ``grpcio-tools`` and
``mypy-protobuf`` (the test extra pins the versions the committed files were
made with): protoc writes the messages and the service, mypy-protobuf their
type stubs, the stub of the service typed for ``grpc.aio`` channels too.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "src" / "entity_sync" / "_proto"
REPO = HERE.parent.parent.parent
PROTO_ROOT = REPO / "proto"
PROTO = "entitysync/v1/entitysync.proto"
FILES = (
    "entitysync_pb2.py",
    "entitysync_pb2.pyi",
    "entitysync_pb2_grpc.py",
    "entitysync_pb2_grpc.pyi",
)
PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


def _plugin(name: str) -> str:
    """The path of a protoc plugin of mypy-protobuf: the one installed beside
    this Python first (a venv that is not activated has its scripts off
    PATH), else the one on PATH."""
    found = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install -e 'clients/python[test]'")
    return found


def generate(out: Path) -> list[Path]:
    """Writes the stubs into ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={raw}",
            f"--grpc_python_out={raw}",
            *(f"--plugin={name}={_plugin(name)}" for name in PLUGINS),
            f"--mypy_out={raw}",
            f"--mypy_grpc_out={raw}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO}")
        written = []
        for name in FILES:
            text = (Path(raw) / "entitysync" / "v1" / name).read_text()
            # protoc imports siblings by their proto package path; the stubs
            # live inside entity_sync._proto, so import them relatively.
            text = re.sub(
                r"^from entitysync\.v1 import entitysync_pb2 as",
                "from . import entitysync_pb2 as",
                text,
                flags=re.MULTILINE,
            )
            target = out / name
            target.write_text(text)
            written.append(target)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE, help="output directory")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
