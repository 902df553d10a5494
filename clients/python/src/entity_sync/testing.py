"""Integration-test helpers: a real ``entity-sync`` node process on free
loopback ports, and a websocket client that speaks its protocol.

Needs the ``test`` extra (``websockets``). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

DEADLINE = 10.0
"""How long a test waits for something that should happen (seconds)."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (bound at once, released together)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class NodeProcess:
    """The ``entity-sync`` binary on loopback ports, its log in a temp file.

    ``await node.start()`` waits until ``/readyz`` answers 200 and the gRPC
    port accepts connections; ``await node.stop()`` sends SIGTERM (then
    SIGKILL); ``start`` again reuses the same ports. Use it as an async
    context manager to stop it whatever happens.
    """

    def __init__(
        self,
        binary: str | Path,
        args: Sequence[str] = (),
        *,
        ws_port: int | None = None,
        grpc_port: int | None = None,
        grpc_tls: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        if ws_port is None or grpc_port is None:
            ws_port, grpc_port = free_ports(2)
        self.binary = Path(binary)
        self.args = list(args)
        self.ws_port = ws_port
        self.grpc_port = grpc_port
        self.grpc_tls = grpc_tls
        self.env = env
        self._dir = tempfile.TemporaryDirectory(prefix="entity-sync-node-")
        self.log = Path(self._dir.name) / "node.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        scheme = "https" if self.grpc_tls else "http"
        return f"{scheme}://127.0.0.1:{self.grpc_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws/entity-sync/"

    async def start(self) -> NodeProcess:
        if not self.binary.is_file():
            raise FileNotFoundError(f"{self.binary} (build it: cargo build -p entity-sync)")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("RUST_LOG", "info")
        with open(self.log, "ab") as out:
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    "--ws-addr",
                    f"127.0.0.1:{self.ws_port}",
                    "--grpc-addr",
                    f"127.0.0.1:{self.grpc_port}",
                    "--shutdown-grace",
                    "2s",
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        await self._ready()
        return self

    async def _ready(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE
        while loop.time() < end:
            self.check_alive()
            if await _readyz(self.ws_port) and await _accepts(self.grpc_port):
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"the node is not ready after {DEADLINE}s:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(f"the node is not running:\n{self.log_tail()}")

    async def stop(self) -> int | None:
        """SIGTERM, and SIGKILL after 5 s; the exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            end = loop.time() + 5
            while process.poll() is None and loop.time() < end:
                await asyncio.sleep(0.02)
            if process.poll() is None:
                process.kill()
        return process.wait()

    def send_signal(self, sig: int) -> None:
        """Sends ``sig`` (``signal.SIGHUP`` re-reads the tokens file)."""
        self.check_alive()
        assert self._process is not None
        self._process.send_signal(sig)

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def __aenter__(self) -> NodeProcess:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        self._dir.cleanup()


async def _readyz(port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout=1
        )
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout=1)
        return status.split()[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False
    finally:
        writer.close()


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


class WsClient:
    """A websocket client of a node: JSON frames in, JSON frames out."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, url: str) -> WsClient:
        return cls(await asyncio.wait_for(connect(url), timeout=DEADLINE))

    async def send(self, message: Any) -> None:
        await self.connection.send(json.dumps(message))

    async def recv(self, timeout: float = DEADLINE) -> Any:
        """The next frame, parsed."""
        frame = await asyncio.wait_for(self.connection.recv(), timeout=timeout)
        return json.loads(frame)

    async def send_secret(self, secret: str) -> None:
        await self.send({"action": "secret", "body": secret})

    async def send_subscribe(self, entity: str, id: str) -> None:
        await self.send({"action": "subscribe", "body": {"entity": entity, "id": id}})

    async def expect_subscribed(self, entity: str, id: str) -> None:
        frame = await self.recv()
        assert frame == {"action": "subscribed", "body": {"entity": entity, "id": id}}, frame

    async def expect_push(self, entity: str, id: str) -> tuple[int, list[Any]]:
        """The next frame, which must be a push of ``entity/id``: its version and rows."""
        frame = await self.recv()
        assert frame["action"] == "push", frame
        body = frame["body"]
        assert isinstance(body["version"], int), frame
        assert frame == {
            "action": "push",
            "body": {"entity": entity, "id": id, "version": body["version"], "rows": body["rows"]},
        }, frame
        return body["version"], body["rows"]

    async def expect_error(self, code: str, entity: str, id: str) -> str:
        """The next frame, which must be an error of ``code`` about
        ``entity/id``: its message."""
        frame = await self.recv()
        assert frame["action"] == "error", frame
        message = frame["body"].get("message")
        assert frame == {
            "action": "error",
            "body": {"code": code, "message": message, "entity": entity, "id": id},
        }, frame
        return str(message)

    async def subscribe(self, entity: str, id: str) -> tuple[int, list[Any]]:
        """Subscribes and takes the ``subscribed`` frame and the snapshot push."""
        await self.send_subscribe(entity, id)
        await self.expect_subscribed(entity, id)
        return await self.expect_push(entity, id)

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> WsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
