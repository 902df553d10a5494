"""Integration-test helpers: a real ``entity-sync`` node process on loopback
ports it binds itself and reports, and a websocket client that speaks its
protocol.

Importable with the runtime dependencies alone: :class:`NodeProcess` runs on
asyncio's subprocesses; :class:`WsClient` needs ``websockets`` (the ``test``
extra) when it connects. Every wait is bounded. With pytest, the
``entity_sync_node`` fixture (:mod:`entity_sync.pytest_plugin`, loaded
automatically once the package is installed) starts a node per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

DEADLINE = 10.0
"""How long a test waits for something that should happen (seconds)."""
STOP_GRACE = 5.0
"""How long :meth:`NodeProcess.stop` waits after SIGTERM before SIGKILL (seconds)."""
_RETRY_CONNECT = 0.02
"""Pause between connection attempts to a port nothing listens on yet (a
refused connect returns at once); the wait ends early if the node exits."""


_LISTENING = "entity_sync::node::listening"
"""The target of the node's ``listening`` log line (its own, so that one
more ``RUST_LOG`` directive lets it through whatever else is filtered)."""


def _log_port(line: str, field: str) -> int | None:
    """The port of address field ``field`` of a log line: ``field=ADDR``
    (text) or ``"field":"ADDR"`` (JSON)."""
    found = re.search(rf'"{field}":"([^"]+)"|(?:^|\s){field}=(\S+)', line)
    if found is None:
        return None
    address = found.group(1) or found.group(2)
    return int(address.rsplit(":", 1)[1])


class NodeProcess:
    """The ``entity-sync`` binary on loopback ports, its log in a temp file.

    The node binds port 0 (unless ``ws_port``/``grpc_port`` are given) and
    logs the addresses it got once both ports are bound, at info level, in
    one line (``--log-format text``, here on two, or the same fields in JSON)::

        2026-01-01T00:00:00.000000Z  INFO entity_sync::node::listening: listening
            ws_addr=127.0.0.1:40123 grpc_addr=127.0.0.1:40124

    (``metrics_addr=...`` too with ``--metrics-addr``). ``await node.start()``
    reads that line into :attr:`ws_port`, :attr:`grpc_port` and
    :attr:`metrics_port`, then waits until the gRPC port accepts connections
    and ``/readyz`` on the websocket port answers 200 (raising if the node
    exits first, or is not ready within :data:`DEADLINE`); ``await
    node.stop()`` sends SIGTERM (then SIGKILL); ``start`` again reuses the
    same ports. Use it as an async context manager to stop it whatever
    happens.
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
        self.binary = Path(binary)
        self.args = list(args)
        self.ws_port = ws_port or 0
        """The websocket port (0 until the node first reported it)."""
        self.grpc_port = grpc_port or 0
        """The gRPC port (0 until the node first reported it)."""
        self.metrics_port: int | None = None
        """The ``/metrics`` port, when the args set ``--metrics-addr``."""
        self.grpc_tls = grpc_tls
        self.env = env
        self._dir = tempfile.TemporaryDirectory(prefix="entity-sync-node-")
        self.log = Path(self._dir.name) / "node.log"
        self._process: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None

    @property
    def grpc_url(self) -> str:
        """The URL a :class:`~entity_sync.Backend` or :class:`~entity_sync.Notifier` takes."""
        scheme = "https" if self.grpc_tls else "http"
        return f"{scheme}://127.0.0.1:{self.grpc_port}"

    @property
    def ws_url(self) -> str:
        """The URL a websocket client connects to."""
        return f"ws://127.0.0.1:{self.ws_port}/ws/entity-sync/"

    @property
    def returncode(self) -> int | None:
        """The exit status once the process ended, else ``None``."""
        return None if self._process is None else self._process.returncode

    async def start(self) -> NodeProcess:
        """Starts the node and waits until it is ready."""
        if not self.binary.is_file():
            raise FileNotFoundError(f"{self.binary} (build it: cargo build -p entity-sync)")
        if self._process is not None and self._process.returncode is None:
            raise RuntimeError("the node is running already")
        env = dict(os.environ if self.env is None else self.env)
        rust_log = env.get("RUST_LOG", "").strip()
        env["RUST_LOG"] = f"{rust_log},{_LISTENING}=info" if rust_log else "info"
        # Only what this start logs: the file holds an earlier start's lines.
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self._process = await asyncio.create_subprocess_exec(
                self.binary,
                "--ws-addr",
                f"127.0.0.1:{self.ws_port}",
                "--grpc-addr",
                f"127.0.0.1:{self.grpc_port}",
                "--shutdown-grace",
                "2s",
                *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        self._exited = asyncio.create_task(self._process.wait())
        try:
            async with asyncio.timeout(DEADLINE):
                await self._listening(offset)
                await self._accepting(self.grpc_port)
                while not await _readyz(self.ws_port):
                    await self._unless_exited(_RETRY_CONNECT)
        except TimeoutError:
            await self.stop()
            raise TimeoutError(
                f"the node is not ready after {DEADLINE:g}s:\n{self.log_tail()}"
            ) from None
        except BaseException:
            await self.stop()
            raise
        return self

    async def _listening(self, offset: int) -> None:
        """Waits for the node's ``listening`` line (after byte ``offset`` of
        the log) and takes the ports from it."""
        while True:
            with open(self.log, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
            # Complete lines only: the last one may be half written.
            for line in text[: text.rfind("\n") + 1].splitlines():
                if _LISTENING not in line:
                    continue
                ws, grpc = _log_port(line, "ws_addr"), _log_port(line, "grpc_addr")
                if ws is not None and grpc is not None:
                    self.ws_port, self.grpc_port = ws, grpc
                    self.metrics_port = _log_port(line, "metrics_addr")
                    return
            await self._unless_exited(_RETRY_CONNECT)

    async def _accepting(self, port: int) -> None:
        """Returns once ``port`` accepts a connection."""
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await self._unless_exited(_RETRY_CONNECT)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def _unless_exited(self, seconds: float) -> None:
        """Waits ``seconds``, or raises as soon as the node exits."""
        assert self._exited is not None
        done, _ = await asyncio.wait({self._exited}, timeout=seconds)
        if done:
            raise RuntimeError(
                f"the node exited ({self._exited.result()}) before it was ready:\n{self.log_tail()}"
            )

    def check_alive(self) -> None:
        """Raises (with the log's tail) unless the node runs."""
        if self._process is None or self._process.returncode is not None:
            raise RuntimeError(f"the node is not running:\n{self.log_tail()}")

    async def stop(self) -> int | None:
        """SIGTERM, and SIGKILL after :data:`STOP_GRACE`; the exit code
        (``None`` if it was not started)."""
        process, self._process = self._process, None
        exited, self._exited = self._exited, None
        if process is None or exited is None:
            return None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            done, _ = await asyncio.wait({exited}, timeout=STOP_GRACE)
            if not done:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        return await exited

    def send_signal(self, sig: int) -> None:
        """Sends ``sig`` (``signal.SIGHUP`` re-reads the tokens file)."""
        self.check_alive()
        assert self._process is not None
        self._process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, no grace (``await stop()`` then reaps it and gives the exit code)."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the node's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        """The node's whole log so far."""
        return self.log.read_text(errors="replace")

    async def __aenter__(self) -> NodeProcess:
        try:
            return await self.start()
        except BaseException:
            self._dir.cleanup()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            self._dir.cleanup()


async def _readyz(port: int) -> bool:
    """Whether ``GET /readyz`` answers 200 (each step bounded by one second)."""
    try:
        async with asyncio.timeout(1):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, TimeoutError):
        return False
    try:
        async with asyncio.timeout(1):
            writer.write(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            status = await reader.readline()
        return status.split()[1:2] == [b"200"]
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


class WsClient:
    """A websocket client of a node: JSON frames in, JSON frames out."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, url: str) -> WsClient:
        """Connects (within :data:`DEADLINE`). Needs ``websockets`` (the ``test`` extra)."""
        try:
            from websockets.asyncio.client import connect
        except ImportError as err:
            raise ImportError(
                "WsClient needs the websockets package: pip install 'entity_sync[test]'"
            ) from err
        async with asyncio.timeout(DEADLINE):
            return cls(await connect(url))

    async def send(self, message: Any) -> None:
        await self.connection.send(json.dumps(message))

    async def recv(self, timeout: float = DEADLINE) -> Any:
        """The next frame, parsed."""
        async with asyncio.timeout(timeout):
            frame = await self.connection.recv()
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
