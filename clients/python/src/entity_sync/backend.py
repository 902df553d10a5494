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
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
import grpc.aio

from ._backoff import Backoff
from ._proto import entitysync_pb2 as pb
from .endpoint import EOF, Endpoint, Tls
from .errors import Error, ErrorKind
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


@dataclasses.dataclass(frozen=True)
class Entity:
    """An entity's handler and fetch mode. A bare handler in ``serve``'s
    mapping means ``FetchMode.PER_SUBSCRIBER`` (the node's safe default)."""

    handler: Handler
    fetch_mode: FetchMode = FetchMode.PER_SUBSCRIBER


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
            raise Error(ErrorKind.CONFIG, "a backend needs a name")
        if not handlers and pass_through is None:
            raise Error(ErrorKind.CONFIG, "register at least one entity or a pass-through handler")
        if max_in_flight < 1:
            raise Error(ErrorKind.CONFIG, "max_in_flight must be at least 1")
        self._endpoint = Endpoint(endpoint, bearer_token=bearer_token, tls=tls)
        self._name = name
        self._entities = {
            entity: spec if isinstance(spec, Entity) else Entity(spec)
            for entity, spec in handlers.items()
        }
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
        (bound it with ``asyncio.wait_for``)."""
        while not (self._state.phase is Phase.REGISTERED and self._state.node_id != other_than):
            if self._state.phase is Phase.STOPPED:
                raise Error(ErrorKind.STREAM, "the backend stopped")
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
        returns. Raises :class:`Error` only when the node refuses the
        registration for good (invalid, unauthenticated, not permitted)."""
        if shutdown is None:
            stop: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        elif isinstance(shutdown, asyncio.Event):
            stop = asyncio.ensure_future(shutdown.wait())
        else:
            stop = asyncio.ensure_future(shutdown)
        # A future of the caller's is left as it is; one made here is cancelled at the end.
        owned = stop is not shutdown
        backoff = Backoff(*self._reconnect)
        try:
            while True:
                self._set_state(BackendState(Phase.CONNECTING))
                try:
                    if await self._stream(stop, backoff):
                        return
                    error = Error(ErrorKind.STREAM, "the node ended the stream")
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

    async def _stream(self, stop: asyncio.Future[Any], backoff: Backoff) -> bool:
        """One stream's life: ``True`` on shutdown, ``False`` when the node ended it."""
        channel = self._endpoint.channel()
        # Answers and pass-through acks share the queue; a full queue makes
        # handlers wait, which the node's in-flight cap bounds anyway.
        outbound: asyncio.Queue[pb.ResolverMessage | None] = asyncio.Queue(self._max_in_flight + 16)
        outbound.put_nowait(pb.ResolverMessage(register=self._register()))
        tasks: set[asyncio.Task[None]] = set()
        read: asyncio.Task[Any] | None = None
        call = None
        writer: asyncio.Task[None] | None = None
        try:
            call = self._endpoint.stub(channel).Resolve(metadata=self._endpoint.metadata)
            writer = asyncio.ensure_future(_write(call, outbound))
            read = asyncio.ensure_future(asyncio.wait_for(call.read(), REGISTER_TIMEOUT))
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                return True
            first = _message(read)
            if first is None or first.WhichOneof("kind") != "registered":
                what = "ended the stream" if first is None else f"sent {first.WhichOneof('kind')}"
                raise Error(ErrorKind.STREAM, f"the node {what} before Registered")
            registered = first.registered
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
            while True:
                read = asyncio.ensure_future(call.read())
                await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    break
                message = _message(read)
                if message is None:
                    return False
                self._dispatch(message, outbound, tasks)
            await self._drain(call, read, outbound, tasks)
            return True
        finally:
            if read is not None and not read.done():
                read.cancel()
            for task in tasks:
                task.cancel()
            if writer is not None:
                writer.cancel()
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    def _register(self) -> pb.Register:
        return pb.Register(
            name=self._name,
            entities=[
                pb.EntityRegistration(entity=entity, fetch_mode=spec.fetch_mode.value)
                for entity, spec in self._entities.items()
            ],
            pass_through=self._pass_through is not None,
            max_in_flight=self._max_in_flight,
        )

    def _dispatch(
        self,
        message: pb.NodeMessage,
        outbound: asyncio.Queue[pb.ResolverMessage | None],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Starts the task that answers one node message."""
        kind = message.WhichOneof("kind")
        if kind == "request":
            spec = self._entities.get(message.request.entity)
            request = ResolveRequest._from_proto(message.request)
            coro = self._answer(spec, message.request.request_id, request, outbound)
        elif kind == "pass_through":
            if self._pass_through is None:
                log.debug("pass-through message without a handler, dropped")
                return
            coro = _receive(
                self._pass_through,
                PassThrough(
                    connection_id=message.pass_through.connection_id,
                    payload=message.pass_through.payload,
                    secret=message.pass_through.secret,
                ),
            )
        elif kind == "registered":
            log.warning("a second Registered on one stream, ignored")
            return
        else:
            return  # a message kind of a newer node: nothing to do with it
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

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

    async def _drain(
        self,
        call: Any,
        read: asyncio.Task[Any],
        outbound: asyncio.Queue[pb.ResolverMessage | None],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Shutdown of a live stream: ``Drain``, finish the handlers (bounded),
        end the stream, wait briefly for the node to close its side."""
        await outbound.put(pb.ResolverMessage(drain=pb.Drain()))
        log.info("draining (%d in flight)", len(tasks))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout
        node_open = True
        while tasks:
            waiting: set[asyncio.Future[Any]] = set(tasks)
            if node_open:
                waiting.add(read)
            left = deadline - loop.time()
            done, _ = await asyncio.wait(
                waiting, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                log.warning(
                    "drain timed out with %d unanswered; the node retries them elsewhere",
                    len(tasks),
                )
                for task in tasks:
                    task.cancel()
                break
            if node_open and read in done:
                # Requests the node sent before it read Drain are answered too.
                try:
                    message = _message(read)
                except Error:
                    message = None
                if message is None:
                    node_open = False
                else:
                    self._dispatch(message, outbound, tasks)
                    read = asyncio.ensure_future(call.read())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Ends the request stream: the node deregisters this resolver.
        await outbound.put(None)
        if node_open:
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    while True:
                        await asyncio.wait({read})
                        if _message(read) is None:
                            break
                        read = asyncio.ensure_future(call.read())
            except (TimeoutError, Error):
                pass
            finally:
                read.cancel()
        log.info("drained")


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


async def _write(call: Any, queue: asyncio.Queue[pb.ResolverMessage | None]) -> None:
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


def _message(read: asyncio.Task[Any]) -> pb.NodeMessage | None:
    """The result of a finished read: a message, ``None`` at the stream's end."""
    try:
        message = read.result()
    except TimeoutError:
        raise Error(ErrorKind.UNAVAILABLE, f"no Registered within {REGISTER_TIMEOUT:g}s") from None
    except grpc.RpcError as err:
        raise Error.from_rpc(err) from None
    if message is EOF:
        return None
    assert isinstance(message, pb.NodeMessage)
    return message


def _all(request: ResolveRequest, answer: Answer) -> dict[str, Answer]:
    return {id: answer for id in request.ids}


async def _receive(handler: PassThroughHandler, message: PassThrough) -> None:
    try:
        result = handler(message)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.error("the pass-through handler failed", exc_info=True)
