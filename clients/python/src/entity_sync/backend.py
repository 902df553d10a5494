"""The backend: registers entities on a node's ``Resolve`` stream and answers
its requests, reconnecting until shutdown.

One stream at a time: connect, send ``Register``, wait for ``Registered``,
then answer each request in its own task (the node keeps at most
``max_in_flight`` outstanding). When the stream breaks, the node hands what
this backend held to other resolvers; the backend waits a jittered, growing
delay and registers again. On shutdown it sends ``Drain``, answers what it
already received, and ends the stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import grpc
import grpc.aio

from ._backoff import Backoff
from ._proto import entitysync_pb2 as pb
from .endpoint import EOF, Endpoint, Tls
from .errors import ConfigError, Error, StreamError, UnavailableError
from .request import Answer, Answers, FetchMode, PassThrough, ResolveRequest, _results

log = logging.getLogger("entity_sync")

Handler = Callable[[ResolveRequest], Awaitable[Answers] | Answers]
"""Resolves the rows of one entity: called concurrently, once per request (a
request carries one or several ids); returns an :class:`Answer` per id, as a
mapping or pairs. An ``async def`` normally; a plain function must not block."""

PassThroughHandler = Callable[[PassThrough], Awaitable[None] | None]
"""Receives the client messages that carry no ``action``."""

DEFAULT_MAX_IN_FLIGHT = 64
"""Requests the node may keep outstanding on the stream, unless set."""
DEFAULT_RECONNECT_BACKOFF = (0.1, 10.0)
"""First and longest reconnect delay in seconds, unless set."""
DEFAULT_DRAIN_TIMEOUT = 10.0
"""How long shutdown waits for handlers still running, unless set (seconds)."""
REGISTER_TIMEOUT = 10.0
"""How long the node may take to answer ``Register`` with ``Registered``."""
_CLOSE_TIMEOUT = 2.0
"""After the last answer, how long the backend waits for the node to end the
stream (so the answers are flushed before the connection drops)."""
HANDLER_FAILED = "the backend failed to resolve this key"
"""What an ERROR answer says when a handler raised: the exception stays in
this backend's log."""
_NOT_SERVED = "this backend does not serve the entity"
MIN_REFRESH_EVERY = 1.0
"""Shortest ``Entity.refresh_every`` the node accepts (seconds)."""
MAX_REFRESH_EVERY = 86_400.0
"""Longest ``Entity.refresh_every`` the node accepts (24 hours, in seconds)."""


@dataclasses.dataclass(frozen=True)
class Entity:
    """An entity's handler and fetch mode. A bare handler in ``serve``'s
    mapping means ``FetchMode.PER_SUBSCRIBER`` (the node's safe default).

    ``refresh_every`` (seconds, 1 to 86,400; ``None``: never) asks the node to
    re-resolve each subscribed key of the entity about that often even when
    no ``Notify`` came: a safety net for writes that forgot to notify. Those
    requests have reason CHANGE; rows that did not change push nothing to
    clients. When several backends register the entity with different
    intervals, the node uses the smallest."""

    handler: Handler
    fetch_mode: FetchMode = FetchMode.PER_SUBSCRIBER
    refresh_every: float | None = None

    def refresh_interval_ms(self) -> int:
        """``refresh_every`` as ``EntityRegistration.refresh_interval_ms`` (0: none)."""
        if self.refresh_every is None:
            return 0
        return round(self.refresh_every * 1000)


def each_id(f: Callable[[str, ResolveRequest], Awaitable[Answer]]) -> Handler:
    """A handler that answers one id at a time, like the original entity-sync's
    per-key handlers: ``f(id, request)`` is called for every id of a request
    concurrently."""

    async def handler(request: ResolveRequest) -> Answers:
        answers = await asyncio.gather(*(f(id, request) for id in request.ids))
        return dict(zip(request.ids, answers, strict=True))

    return handler


class Phase(enum.Enum):
    CONNECTING = "connecting"
    """Connecting and registering."""
    REGISTERED = "registered"
    """Registered: the node sends requests."""
    DISCONNECTED = "disconnected"
    """The last stream failed or ended; the backend tries again after a delay."""
    STOPPED = "stopped"
    """``serve`` returned."""


@dataclasses.dataclass(frozen=True)
class BackendState:
    """Where a :class:`Backend` stands (for a health check)."""

    phase: Phase
    node_id: str = ""
    resolver_id: str = ""
    error: Error | None = None


class Backend:
    """Serves entities to entity-sync nodes; run it with :meth:`serve`.

    ``endpoint``: ``http://host:50051``, or ``https://host:50051`` (TLS, with
    ``tls`` settings or the system's roots). ``handlers``: entity name to
    :class:`Entity` (or a bare handler, PER_SUBSCRIBER). ``name``: the service
    name; backends sharing one are replicas (each pass-through message goes to
    one of them). ``bearer_token``: a resolver token of the node's
    ``--grpc-tokens-file`` (never logged).
    """

    def __init__(
        self,
        endpoint: str,
        handlers: Mapping[str, Entity | Handler],
        *,
        name: str,
        pass_through: PassThroughHandler | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        reconnect_backoff: tuple[float, float] = DEFAULT_RECONNECT_BACKOFF,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        bearer_token: str | None = None,
        tls: Tls | None = None,
    ) -> None:
        if not name.strip():
            raise ConfigError("a backend needs a name")
        if not handlers and pass_through is None:
            raise ConfigError("register at least one entity or a pass-through handler")
        if max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        self._endpoint = Endpoint(endpoint, bearer_token=bearer_token, tls=tls)
        self._name = name
        self._entities = {
            entity: spec if isinstance(spec, Entity) else Entity(spec)
            for entity, spec in handlers.items()
        }
        for entity, spec in self._entities.items():
            every = spec.refresh_every
            if every is not None and not MIN_REFRESH_EVERY <= every <= MAX_REFRESH_EVERY:
                raise ConfigError(
                    f"entity {entity!r}: refresh_every must be {MIN_REFRESH_EVERY:g} to "
                    f"{MAX_REFRESH_EVERY:g} seconds, got {every:g}"
                )
        self._pass_through = pass_through
        self._max_in_flight = max_in_flight
        self._reconnect = reconnect_backoff
        self._drain_timeout = drain_timeout
        self._state = BackendState(Phase.CONNECTING)
        self._state_changed = asyncio.Event()

    @property
    def state(self) -> BackendState:
        """The current state."""
        return self._state

    async def wait_registered(self, *, other_than: str = "") -> BackendState:
        """Waits until registered on a node whose id is not ``other_than``
        (bound it with ``asyncio.timeout``)."""
        while not (self._state.phase is Phase.REGISTERED and self._state.node_id != other_than):
            if self._state.phase is Phase.STOPPED:
                raise StreamError("the backend stopped")
            await self._state_changed.wait()
        return self._state

    def _set_state(self, state: BackendState) -> None:
        self._state = state
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()

    async def serve(self, shutdown: asyncio.Event | Awaitable[Any] | None = None) -> None:
        """Serves until ``shutdown`` is set (or completes): connects, registers,
        answers, and reconnects with jittered exponential backoff whenever the
        stream breaks. On shutdown it drains (answers what it holds) and
        returns. Cancelling the task that runs it stops at once, without a
        drain. Raises :class:`Error` only when the node refuses the
        registration for good (invalid, unauthenticated, not permitted)."""
        stop, owned = _stop_future(shutdown)
        backoff = Backoff(*self._reconnect)
        try:
            while True:
                self._set_state(BackendState(Phase.CONNECTING))
                try:
                    await self._stream(stop, backoff)
                    return
                except Error as err:
                    if not err.retryable:
                        log.error("the node refused this backend; not retrying: %s", err)
                        raise
                    error = err
                delay = backoff.next_delay()
                log.warning("resolve stream lost (%s); reconnecting in %.2fs", error, delay)
                self._set_state(BackendState(Phase.DISCONNECTED, error=error))
                done, _ = await asyncio.wait({stop}, timeout=delay)
                if done:
                    return
        finally:
            if owned:
                stop.cancel()
            self._set_state(BackendState(Phase.STOPPED))

    async def _stream(self, stop: asyncio.Future[Any], backoff: Backoff) -> None:
        """One stream's life. Returns on shutdown (drained); raises
        :class:`Error` when the stream failed or the node ended it."""
        channel = self._endpoint.channel()
        # Answers and pass-through acks share the queue; a full queue makes
        # handlers wait, which the node's in-flight cap bounds anyway.
        outbound: asyncio.Queue[pb.ResolverMessage | None] = asyncio.Queue(self._max_in_flight + 16)
        outbound.put_nowait(pb.ResolverMessage(register=self._register()))
        call = self._endpoint.stub(channel).Resolve(metadata=self._endpoint.metadata)
        writer = asyncio.create_task(_write(call, outbound))
        # Cancelling a pending read cancels the whole call (grpc.aio), so one
        # task reads the stream from its start to its end, and the phases
        # below wait on it rather than on reads of their own.
        received: asyncio.Queue[pb.NodeMessage] = asyncio.Queue()
        reader = asyncio.create_task(_read_all(call, received))
        try:
            registered = await self._registered(received, reader, stop)
            if registered is None:
                return
            log.info(
                "registered (node %s, resolver %s, entities %s)",
                registered.node_id,
                registered.resolver_id,
                sorted(self._entities),
            )
            backoff.reset()
            self._set_state(
                BackendState(Phase.REGISTERED, registered.node_id, registered.resolver_id)
            )
            await self._serve_registered(received, reader, outbound, stop)
            # Ends the request stream: the node deregisters this resolver;
            # its end of the stream says the answers were read.
            await outbound.put(None)
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await reader
            except (TimeoutError, Error):
                pass
            log.info("drained")
        finally:
            reader.cancel()
            writer.cancel()
            call.cancel()
            # Nothing of this stream outlives it, and what its tasks raised
            # after nobody waited on them is collected here, not logged as
            # never retrieved.
            await asyncio.gather(reader, writer, return_exceptions=True)
            await channel.close(grace=None)

    async def _registered(
        self,
        received: asyncio.Queue[pb.NodeMessage],
        reader: asyncio.Task[None],
        stop: asyncio.Future[Any],
    ) -> pb.Registered | None:
        """The node's ``Registered`` answer; ``None`` on shutdown first."""
        first = asyncio.create_task(received.get())
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT):
                await asyncio.wait({first, reader, stop}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise UnavailableError(f"no Registered within {REGISTER_TIMEOUT:g}s") from None
        finally:
            first.cancel()
        if first.done() and not first.cancelled():
            message = first.result()
            if message.WhichOneof("kind") != "registered":
                raise StreamError(f"the node sent {message.WhichOneof('kind')} before Registered")
            return message.registered
        if reader.done():
            reader.result()  # raises why the stream failed
            raise StreamError("the node ended the stream before Registered")
        return None

    async def _serve_registered(
        self,
        received: asyncio.Queue[pb.NodeMessage],
        reader: asyncio.Task[None],
        outbound: asyncio.Queue[pb.ResolverMessage | None],
        stop: asyncio.Future[Any],
    ) -> None:
        """Answers the node's messages, each in a task of one group, until
        shutdown (then drains: ``Drain``, and answers what the node sent
        before it read it, for up to ``drain_timeout``); raises
        :class:`Error` when the stream ends first, cancelling the handlers
        (the node hands their requests to other resolvers)."""
        in_flight = 0
        idle = asyncio.Event()  # set when the last handler of a drain ends

        def done(task: asyncio.Task[None]) -> None:
            nonlocal in_flight
            if task.cancelled():
                return  # the group is ending: what is cancelled is unanswered
            in_flight -= 1
            if not in_flight:
                idle.set()

        def dispatch(message: pb.NodeMessage) -> None:
            nonlocal in_flight
            coro = self._handle(message, outbound)
            if coro is not None:
                handlers.create_task(coro).add_done_callback(done)
                in_flight += 1

        async def next_or(*others: asyncio.Future[Any]) -> pb.NodeMessage | None:
            """The next message, or ``None`` when one of ``others`` ended first."""
            get = asyncio.create_task(received.get())
            try:
                await asyncio.wait({get, *others}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                get.cancel()
            return get.result() if get.done() and not get.cancelled() else None

        try:
            # The deadline is set at shutdown: it bounds the drain, and when
            # it passes it cancels the handlers still running (the group
            # ends with them).
            async with asyncio.timeout(None) as drain_deadline:
                try:
                    async with asyncio.TaskGroup() as handlers:
                        while (message := await next_or(reader, stop)) is not None:
                            dispatch(message)
                        if not stop.done():
                            reader.result()  # raises why the stream failed
                            raise StreamError("the node ended the stream")
                        loop = asyncio.get_running_loop()
                        drain_deadline.reschedule(loop.time() + self._drain_timeout)
                        await outbound.put(pb.ResolverMessage(drain=pb.Drain()))
                        log.info("draining (%d in flight)", in_flight)
                        # Requests the node sent before it read Drain are
                        # answered too, while any handler still runs (it
                        # sends none after, and ends the stream after we do).
                        while in_flight:
                            idle.clear()
                            waiting = asyncio.create_task(idle.wait())
                            try:
                                message = await next_or(reader, waiting)
                            finally:
                                waiting.cancel()
                            if message is None and reader.done():
                                break  # the stream ended: no answer can go out
                            if message is not None:
                                dispatch(message)
                except* Error as failed:
                    # From the group's body (the handlers catch their own):
                    # the group cancelled the handlers; raise it as it is.
                    raise failed.exceptions[0] from None
        except TimeoutError:
            log.warning(
                "drain timed out with %d unanswered; the node retries them elsewhere", in_flight
            )

    def _register(self) -> pb.Register:
        return pb.Register(
            name=self._name,
            entities=[
                pb.EntityRegistration(
                    entity=entity,
                    fetch_mode=spec.fetch_mode.value,
                    refresh_interval_ms=spec.refresh_interval_ms(),
                )
                for entity, spec in self._entities.items()
            ],
            pass_through=self._pass_through is not None,
            max_in_flight=self._max_in_flight,
        )

    def _handle(
        self,
        message: pb.NodeMessage,
        outbound: asyncio.Queue[pb.ResolverMessage | None],
    ) -> Coroutine[Any, Any, None] | None:
        """What answers one node message (``None``: nothing to do)."""
        kind = message.WhichOneof("kind")
        if kind == "request":
            spec = self._entities.get(message.request.entity)
            request = ResolveRequest._from_proto(message.request)
            return self._answer(spec, message.request.request_id, request, outbound)
        if kind == "pass_through":
            if self._pass_through is None:
                log.debug("pass-through message without a handler, dropped")
                return None
            return _receive(
                self._pass_through,
                PassThrough(
                    connection_id=message.pass_through.connection_id,
                    payload=message.pass_through.payload,
                    secret=message.pass_through.secret,
                ),
            )
        if kind == "registered":
            log.warning("a second Registered on one stream, ignored")
        # Otherwise a message kind of a newer node: nothing to do with it.
        return None

    async def _answer(
        self,
        spec: Entity | None,
        request_id: int,
        request: ResolveRequest,
        outbound: asyncio.Queue[pb.ResolverMessage | None],
    ) -> None:
        """Runs the handler of one request (catching its exceptions) and queues its answer."""
        if spec is None:
            log.warning("request for an entity this backend did not register: %s", request.entity)
            results = _results(
                request.entity, request.ids, _all(request, Answer.error(_NOT_SERVED))
            )
        else:
            try:
                answers = spec.handler(request)
                if inspect.isawaitable(answers):
                    answers = await answers
                results = _results(request.entity, request.ids, answers)
            except Exception:
                log.warning("the resolve handler of %s failed", request.entity, exc_info=True)
                results = _results(
                    request.entity, request.ids, _all(request, Answer.error(HANDLER_FAILED))
                )
        response = pb.ResolveResponse(request_id=request_id, results=results)
        await outbound.put(pb.ResolverMessage(response=response))


async def serve(
    endpoint: str,
    handlers: Mapping[str, Entity | Handler],
    *,
    name: str,
    shutdown: asyncio.Event | Awaitable[Any] | None = None,
    pass_through: PassThroughHandler | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    reconnect_backoff: tuple[float, float] = DEFAULT_RECONNECT_BACKOFF,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    bearer_token: str | None = None,
    tls: Tls | None = None,
) -> None:
    """Serves ``handlers`` to the node at ``endpoint`` until ``shutdown`` is
    set: :class:`Backend` and :meth:`Backend.serve` in one call."""
    backend = Backend(
        endpoint,
        handlers,
        name=name,
        pass_through=pass_through,
        max_in_flight=max_in_flight,
        reconnect_backoff=reconnect_backoff,
        drain_timeout=drain_timeout,
        bearer_token=bearer_token,
        tls=tls,
    )
    await backend.serve(shutdown)


def _stop_future(
    shutdown: asyncio.Event | Awaitable[Any] | None,
) -> tuple[asyncio.Future[Any], bool]:
    """What ``serve`` waits on to stop, and whether it made it (a future it
    made is cancelled when it returns; a caller's future is left alone)."""
    if shutdown is None:
        return asyncio.get_running_loop().create_future(), True
    if isinstance(shutdown, asyncio.Event):
        return asyncio.create_task(shutdown.wait()), True
    if isinstance(shutdown, asyncio.Future):
        return shutdown, False
    return asyncio.create_task(_awaited(shutdown)), True


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


async def _write(
    call: grpc.aio.StreamStreamCall[pb.ResolverMessage, pb.NodeMessage],
    queue: asyncio.Queue[pb.ResolverMessage | None],
) -> None:
    """Writes what the queue holds to the request stream (the only writer:
    gRPC takes one write at a time), and ends the stream at ``None``. If a
    write fails the call is cancelled, so the read side ends the stream too
    (and reports why)."""
    try:
        while (message := await queue.get()) is not None:
            await call.write(message)
        await call.done_writing()
    except asyncio.CancelledError:
        raise
    except Exception as err:
        log.debug("resolve stream write failed: %s", type(err).__name__)
        call.cancel()


async def _read_all(
    call: grpc.aio.StreamStreamCall[pb.ResolverMessage, pb.NodeMessage],
    received: asyncio.Queue[pb.NodeMessage],
) -> None:
    """Reads the node's messages into ``received`` until the stream's end;
    raises :class:`Error` when the stream fails."""
    while True:
        try:
            message = await call.read()
        except grpc.RpcError as err:
            raise Error.from_rpc(err) from None
        if message is EOF:
            return
        assert isinstance(message, pb.NodeMessage)
        received.put_nowait(message)


def _all(request: ResolveRequest, answer: Answer) -> dict[str, Answer]:
    return {id: answer for id in request.ids}


async def _receive(handler: PassThroughHandler, message: PassThrough) -> None:
    try:
        result = handler(message)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.error("the pass-through handler failed", exc_info=True)
