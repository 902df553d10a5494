"""The notifier: tells the nodes which keys changed, retrying under one idempotency key."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from ._backoff import Backoff
from ._proto import entitysync_pb2 as pb
from .endpoint import Endpoint, Tls
from .errors import Error, ErrorKind

if TYPE_CHECKING:
    from ._proto.entitysync_pb2_grpc import EntitySyncAsyncStub

log = logging.getLogger("entity_sync")

DEFAULT_RETRY_FOR = 30.0
"""How long one ``notify`` keeps retrying, unless set (seconds)."""
DEFAULT_CALL_TIMEOUT = 10.0
"""Deadline of one attempt, unless set (seconds)."""
_RETRY_MIN = 0.05
_RETRY_MAX = 2.0
TRACE_ID_HEADER = "x-trace-id"
"""gRPC metadata naming a ``Notify`` call's trace id, both ways."""

Key = tuple[str, str | int]
"""A changed key: ``(entity, id)``, e.g. ``("items", 101)``."""


@dataclasses.dataclass(frozen=True)
class Receipt:
    """What the node answered."""

    accepted: int
    """How many keys the bus stored."""
    sequences: tuple[int, ...]
    """The bus sequence of each key, in order: pushes of these changes carry
    versions at or above them."""
    duplicate: bool
    """The idempotency key was seen before: an earlier attempt was applied."""
    attempts: int
    """Calls it took (1 without retries)."""
    trace_id: str = ""
    """The trace id the node logs this change under (its ``x-trace-id``
    answer): the one given to :meth:`Notifier.notify`, else one the node
    made. Empty from a node that sends none."""


class Notifier:
    """Calls ``Notify`` on a node. It connects on first use (and again after
    the node comes back); one instance serves any number of concurrent calls.
    ``bearer_token``: a notifier token of the node's ``--grpc-tokens-file``
    (never logged)."""

    def __init__(
        self,
        endpoint: str,
        *,
        bearer_token: str | None = None,
        tls: Tls | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        idempotency_keys: bool = True,
    ) -> None:
        self._endpoint = Endpoint(endpoint, bearer_token=bearer_token, tls=tls)
        self._retry_for = retry_for
        self._call_timeout = call_timeout
        self._idempotency_keys = idempotency_keys
        self._channel: grpc.aio.Channel | None = None
        self._stub: EntitySyncAsyncStub | None = None

    async def notify(self, keys: Iterable[Key], *, trace_id: str = "") -> Receipt:
        """Tells the node that ``keys`` changed; returns once the bus stored
        every one (pushes follow). While the node or its bus is unavailable,
        it retries with backoff for up to ``retry_for`` seconds, under one
        idempotency key, so that a retry of a call that did get through is
        not applied twice.

        ``trace_id`` (32 hex digits, e.g. the caller's W3C trace-id): the id
        under which the nodes log this change from the call to its pushes;
        every retry carries it. Empty: the node makes one. Either way,
        :attr:`Receipt.trace_id` tells which."""
        key = secrets.token_hex(16) if self._idempotency_keys else ""
        return await self.notify_with_key(keys, key, trace_id=trace_id)

    async def notify_with_key(
        self, keys: Iterable[Key], idempotency_key: str, *, trace_id: str = ""
    ) -> Receipt:
        """Like :meth:`notify` under the caller's idempotency key (a change id,
        say), so that even a notify repeated after a restart of the caller is
        applied once within the bus's duplicate window."""
        request = pb.NotifyRequest(
            keys=[pb.EntityKey(entity=entity, id=str(id)) for entity, id in keys],
            idempotency_key=idempotency_key,
        )
        metadata = self._endpoint.metadata
        # A value gRPC metadata cannot carry is left out: the node would
        # ignore an invalid id anyway and make its own.
        if trace_id and trace_id.isascii() and trace_id.isprintable():
            metadata = (*metadata, (TRACE_ID_HEADER, trace_id))
        stub = self._connect()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._retry_for
        backoff = Backoff(_RETRY_MIN, _RETRY_MAX)
        attempts = 0
        while True:
            attempts += 1
            call = stub.Notify(request, timeout=self._call_timeout, metadata=metadata)
            try:
                response = await call
                answered = await call.initial_metadata()
            except grpc.RpcError as err:
                error = Error.from_rpc(err)
            else:
                return Receipt(
                    accepted=response.accepted,
                    sequences=tuple(response.sequences),
                    duplicate=response.duplicate,
                    attempts=attempts,
                    trace_id=_metadata_value(answered, TRACE_ID_HEADER),
                )
            # CANCELLED: the call ended before an answer, its outcome unknown
            # (the node's gRPC server ends a call at the deadline this attempt
            # sent, and that can arrive before our own deadline). Safe to
            # repeat under the same idempotency key.
            cancelled = error.code is grpc.StatusCode.CANCELLED
            if error.kind is not ErrorKind.UNAVAILABLE and not cancelled:
                raise error
            delay = backoff.next_delay()
            if loop.time() + delay >= give_up:
                log.warning("notify failed after %d attempts: %s", attempts, error)
                raise error
            log.debug("notify failed (attempt %d, %s); retrying in %.2fs", attempts, error, delay)
            await asyncio.sleep(delay)

    def _connect(self) -> EntitySyncAsyncStub:
        if self._stub is None:
            self._channel = self._endpoint.channel()
            self._stub = self._endpoint.stub(self._channel)
        return self._stub

    async def close(self) -> None:
        """Closes the connection (a later call opens a new one)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace=None)

    async def __aenter__(self) -> Notifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _metadata_value(metadata: grpc.aio.Metadata | None, name: str) -> str:
    """The text of metadata entry ``name``, empty when absent (or binary)."""
    if metadata is None:
        return ""
    value = metadata.get(name)
    return value if isinstance(value, str) else ""
