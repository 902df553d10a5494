"""The library against the real node binary with real websocket clients:
rows and pushes, answers of every status, concurrency, reconnects, drain,
refusals, pass-through, notify retries."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Running, quick

from entity_sync import (
    Answer,
    Answers,
    Entity,
    ErrorKind,
    FetchMode,
    InvalidArgumentError,
    Notifier,
    PassThrough,
    Phase,
    Reason,
    ResolveRequest,
    each_id,
)
from entity_sync.testing import DEADLINE, NodeProcess, WsClient


async def item(req: ResolveRequest) -> Answers:
    return {id: Answer.row({"id": id, "secret": req.secret}) for id in req.ids}


async def test_serves_rows_and_pushes_after_notify(
    node: NodeProcess, running: list[Running]
) -> None:
    backend = Running(quick(node.grpc_url, {"items": Entity(item, FetchMode.PER_SUBSCRIBER)}))
    running.append(backend)
    node_id = await backend.registered()
    assert node_id.startswith("node-"), node_id

    async with await WsClient.connect(node.ws_url) as client:
        await client.send_secret("s1")
        _, rows = await client.subscribe("items", "7")
        assert rows == [{"id": "7", "secret": "s1"}]

        async with Notifier(node.grpc_url) as notifier:
            receipt = await notifier.notify([("items", 7)])
        assert (receipt.accepted, receipt.attempts, receipt.duplicate) == (1, 1, False)
        assert len(receipt.sequences) == 1
        version, rows = await client.expect_push("items", "7")
        assert version == receipt.sequences[0]
        assert rows == [{"id": "7", "secret": "s1"}]

    await backend.stop()
    assert backend.backend.state.phase is Phase.STOPPED


async def test_several_rows_per_key_keep_their_order(
    node: NodeProcess, running: list[Running]
) -> None:
    async def lists(req: ResolveRequest) -> Answers:
        return [
            (
                id,
                Answer.rows(
                    [
                        {"list": id, "name": "groceries"},
                        {"item": 1, "name": "milk"},
                        {"item": 2, "name": "eggs"},
                    ]
                ),
            )
            for id in req.ids
        ]

    # Rows that already are JSON texts go through verbatim, and a version of
    # the backend's own replaces the bus sequence.
    async def raw(req: ResolveRequest) -> Answers:
        return {id: Answer.json_rows(['{"a":1}', b"[2,3]", "null"], version=42) for id in req.ids}

    backend = Running(
        quick(
            node.grpc_url,
            {"lists": Entity(lists, FetchMode.SHARED), "raw": Entity(raw, FetchMode.SHARED)},
        )
    )
    running.append(backend)
    await backend.registered()
    async with await WsClient.connect(node.ws_url) as client:
        _, rows = await client.subscribe("lists", "1")
        assert rows == [
            {"list": "1", "name": "groceries"},
            {"item": 1, "name": "milk"},
            {"item": 2, "name": "eggs"},
        ]
        version, rows = await client.subscribe("raw", "x")
        assert (version, rows) == (42, [{"a": 1}, [2, 3], None])


async def test_not_found_forbidden_and_error_answers_reach_the_client_as_frames(
    node: NodeProcess, running: list[Running]
) -> None:
    gone: set[str] = set()

    async def answer(id: str, req: ResolveRequest) -> Answer:
        if id == "missing" or id in gone:
            return Answer.not_found()
        if id == "private":
            return Answer.forbidden("not yours")
        if id == "down":
            return Answer.error("database down")
        if id == "raises":
            raise RuntimeError("connection refused: password=hunter2")
        if id == "bad-row":
            return Answer.row({"not json": {1, 2}})
        return Answer.row({"id": id})

    async def docs(req: ResolveRequest) -> Answers:
        raise OSError("docs store unreachable")

    async def partial(req: ResolveRequest) -> Answers:
        return {}  # answers none of the ids

    backend = Running(
        quick(
            node.grpc_url,
            {
                "items": Entity(each_id(answer), FetchMode.SHARED),
                "docs": Entity(docs, FetchMode.SHARED),
                "partial": Entity(partial, FetchMode.SHARED),
            },
        )
    )
    running.append(backend)
    await backend.registered()
    async with await WsClient.connect(node.ws_url) as client:
        await client.send_subscribe("items", "missing")
        assert await client.expect_error("not_found", "items", "missing") == NOT_FOUND_MESSAGE
        await client.send_subscribe("items", "private")
        assert await client.expect_error("forbidden", "items", "private") == "not yours"
        await client.send_subscribe("items", "down")
        assert await client.expect_error("resolver_error", "items", "down") == "database down"
        # A handler that raises: a fixed message, its exception stays here.
        await client.send_subscribe("items", "raises")
        assert (
            await client.expect_error("resolver_error", "items", "raises")
            == "the backend failed to resolve this key"
        )
        await client.send_subscribe("docs", "1")
        assert (
            await client.expect_error("resolver_error", "docs", "1")
            == "the backend failed to resolve this key"
        )
        await client.send_subscribe("items", "bad-row")
        assert (
            await client.expect_error("resolver_error", "items", "bad-row")
            == "the backend could not serialize a row"
        )
        await client.send_subscribe("partial", "1")
        assert (
            await client.expect_error("resolver_error", "partial", "1")
            == "the backend gave no answer for this id"
        )

        # The same stream still serves; a key gone on a change is pushed empty.
        _, rows = await client.subscribe("items", "ok")
        assert rows == [{"id": "ok"}]
        gone.add("ok")
        async with Notifier(node.grpc_url) as notifier:
            receipt = await notifier.notify([("items", "ok")])
        assert await client.expect_push("items", "ok") == (receipt.sequences[0], [])
    assert backend.backend.state.phase is Phase.REGISTERED


NOT_FOUND_MESSAGE = "no such key"


async def test_requests_are_answered_concurrently_up_to_max_in_flight(
    node: NodeProcess, running: list[Running]
) -> None:
    in_flight = 4
    now = 0
    peak = 0
    all_in = asyncio.Event()

    async def wide(req: ResolveRequest) -> Answers:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        if now >= in_flight:
            all_in.set()
        # Answered one at a time, none of the first ones would ever finish.
        async with asyncio.timeout(DEADLINE):
            await all_in.wait()
        now -= 1
        return {id: Answer.row({"ok": id}) for id in req.ids}

    backend = Running(
        quick(node.grpc_url, {"items": Entity(wide, FetchMode.SHARED)}, max_in_flight=in_flight)
    )
    running.append(backend)
    await backend.registered()
    clients = [await WsClient.connect(node.ws_url) for _ in range(in_flight + 2)]
    for i, client in enumerate(clients):
        await client.send_subscribe("items", str(i))
    for i, client in enumerate(clients):
        await client.expect_subscribed("items", str(i))
        _, rows = await client.expect_push("items", str(i))
        assert rows == [{"ok": str(i)}]
        await client.close()
    assert peak == in_flight


async def test_a_restarted_node_is_registered_with_again(
    node: NodeProcess, running: list[Running]
) -> None:
    backend = Running(quick(node.grpc_url, {"items": Entity(item, FetchMode.SHARED)}))
    running.append(backend)
    first = await backend.registered()
    client = await WsClient.connect(node.ws_url)
    await client.subscribe("items", "1")

    await node.stop()
    with pytest.raises(Exception) as closed:
        await client.recv()
    assert getattr(closed.value, "rcvd", None) is not None
    assert closed.value.rcvd.code == 1001  # type: ignore[attr-defined]
    await node.start()  # the same ports
    second = await backend.registered(other_than=first)
    assert second != first

    async with await WsClient.connect(node.ws_url) as client:
        _, rows = await client.subscribe("items", "1")
        assert rows == [{"id": "1", "secret": ""}]


async def test_shutdown_drains_what_is_in_flight_and_new_work_goes_elsewhere(
    node: NodeProcess, running: list[Running]
) -> None:
    gate = asyncio.Event()
    served_by_a = 0

    async def a_handler(req: ResolveRequest) -> Answers:
        nonlocal served_by_a
        served_by_a += 1
        async with asyncio.timeout(DEADLINE * 2):
            await gate.wait()
        return {id: Answer.row({"by": "a"}) for id in req.ids}

    async def b_handler(req: ResolveRequest) -> Answers:
        return {id: Answer.row({"by": "b"}) for id in req.ids}

    a = Running(quick(node.grpc_url, {"items": Entity(a_handler, FetchMode.SHARED)}, name="svc"))
    running.append(a)
    await a.registered()
    # A holds a subscribe resolve...
    held = await WsClient.connect(node.ws_url)
    await held.send_subscribe("items", "1")
    await _until(lambda: served_by_a == 1, "A got the request")
    # ...then B comes, and A is told to stop.
    b = Running(quick(node.grpc_url, {"items": Entity(b_handler, FetchMode.SHARED)}, name="svc"))
    running.append(b)
    await b.registered()
    a.shutdown.set()
    await _until(lambda: "resolver draining" in node.log_text(), "the node read Drain")
    for id in ["2", "3", "4"]:
        async with await WsClient.connect(node.ws_url) as client:
            _, rows = await client.subscribe("items", id)
            assert rows == [{"by": "b"}], id
    assert served_by_a == 1
    assert not a.task.done(), "A waits for its handler"

    # A answers what it held, then ends its stream and serve returns.
    gate.set()
    await held.expect_subscribed("items", "1")
    _, rows = await held.expect_push("items", "1")
    assert rows == [{"by": "a"}]
    async with asyncio.timeout(DEADLINE):
        await a.task
    await held.close()


async def test_a_drain_that_times_out_leaves_the_request_to_another_resolver(
    node: NodeProcess, running: list[Running]
) -> None:
    never = asyncio.Event()
    held_by_a = 0

    async def stuck(req: ResolveRequest) -> Answers:
        nonlocal held_by_a
        held_by_a += 1
        await never.wait()
        return {}

    async def b_handler(req: ResolveRequest) -> Answers:
        return {id: Answer.row({"by": "b"}) for id in req.ids}

    a = Running(
        quick(
            node.grpc_url,
            {"items": Entity(stuck, FetchMode.SHARED)},
            name="svc",
            drain_timeout=0.3,
        )
    )
    running.append(a)
    await a.registered()
    held = await WsClient.connect(node.ws_url)
    await held.send_subscribe("items", "1")
    await _until(lambda: held_by_a == 1, "A holds the request")
    b = Running(quick(node.grpc_url, {"items": Entity(b_handler, FetchMode.SHARED)}, name="svc"))
    running.append(b)
    await b.registered()
    # A gives up on its handler after the drain timeout and ends its stream;
    # the node sends the request it held to B.
    await a.stop()
    await held.expect_subscribed("items", "1")
    _, rows = await held.expect_push("items", "1")
    assert rows == [{"by": "b"}]
    await held.close()


async def test_a_registration_refused_for_good_ends_serve_with_the_error(
    node: NodeProcess,
) -> None:
    backend = quick(node.grpc_url, {"not.an.entity": Entity(item, FetchMode.SHARED)})
    with pytest.raises(InvalidArgumentError) as refused:
        async with asyncio.timeout(DEADLINE):
            await backend.serve()
    assert refused.value.kind is ErrorKind.REJECTED
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "entity" in refused.value.message
    assert backend.state.phase is Phase.STOPPED


async def test_pass_through_messages_reach_the_handler_with_connection_and_secret(
    node: NodeProcess, running: list[Running]
) -> None:
    received: asyncio.Queue[PassThrough] = asyncio.Queue()

    async def receive(message: PassThrough) -> None:
        await received.put(message)

    backend = Running(quick(node.grpc_url, {}, name="chat", pass_through=receive))
    running.append(backend)
    node_id = await backend.registered()
    async with await WsClient.connect(node.ws_url) as client:
        await client.send_secret("s3")
        await client.send({"type": "chat", "text": "hi"})
        async with asyncio.timeout(DEADLINE):
            message = await received.get()
    assert message.connection_id.startswith(f"{node_id}-"), message.connection_id
    assert message.secret == "s3"
    assert message.json() == {"type": "chat", "text": "hi"}
    assert "s3" not in repr(message)


async def test_notify_retries_until_the_node_is_up_and_refusals_are_not_retried(
    node_bin: Path,
) -> None:
    # A first start tells the ports the node binds; it comes back on them.
    node = NodeProcess(node_bin)
    async with node:
        pass
    notifier = Notifier(node.grpc_url, retry_for=20)
    # Nothing listens yet: the first attempts fail, then the node comes up.
    call = asyncio.create_task(notifier.notify([("items", "1")]))
    await asyncio.sleep(0.3)
    assert not call.done()
    async with NodeProcess(node_bin, ws_port=node.ws_port, grpc_port=node.grpc_port):
        async with asyncio.timeout(DEADLINE * 3):
            receipt = await call
        assert receipt.attempts > 1, receipt
        assert (receipt.accepted, receipt.duplicate) == (1, False)

        with pytest.raises(InvalidArgumentError) as refused:
            await notifier.notify([("items", "bad.id")])
        assert refused.value.kind is ErrorKind.REJECTED
        assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT

        # One idempotency key: the second call is a duplicate, applied once.
        first = await notifier.notify_with_key([("items", "2")], "change-17")
        again = await notifier.notify_with_key([("items", "2")], "change-17")
        assert (first.duplicate, again.duplicate) == (False, True)
        assert again.sequences == first.sequences
    await notifier.close()


async def test_notify_retries_a_call_the_node_cancelled_at_its_deadline() -> None:
    """Regression: a node ends a call at the deadline the caller sent with
    CANCELLED "Timeout expired" (what its gRPC server does while its bus hangs),
    and that answer can beat the caller's own deadline. It was a final error;
    it is retried under the same idempotency key."""
    from entity_sync._proto import entitysync_pb2 as pb
    from entity_sync._proto import entitysync_pb2_grpc as pb_grpc

    keys: list[str] = []

    class CancellingNode(pb_grpc.EntitySyncServicer):
        async def Notify(self, request: Any, context: Any) -> Any:  # noqa: N802
            keys.append(request.idempotency_key)
            if len(keys) <= 2:
                await context.abort(grpc.StatusCode.CANCELLED, "Timeout expired")
            return pb.NotifyResponse(accepted=1, sequences=[7], duplicate=True)

    server = grpc.aio.server()
    pb_grpc.add_EntitySyncServicer_to_server(CancellingNode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    notifier = Notifier(f"http://127.0.0.1:{port}", retry_for=10)
    try:
        async with asyncio.timeout(DEADLINE):
            receipt = await notifier.notify([("items", "1")])
        assert receipt.attempts == 3, receipt
        assert len(keys) == 3 and len(set(keys)) == 1, keys
    finally:
        await notifier.close()
        await server.stop(None)


async def _until(check: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not check():
        if loop.time() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


async def test_the_quickstart_serves_notifies_and_stops_on_sigint(node: NodeProcess) -> None:
    quickstart = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(quickstart), node.grpc_url, stdout=asyncio.subprocess.PIPE
    )
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=DEADLINE)  # type: ignore[union-attr]
        assert line.startswith(b"notified, bus sequence "), line
        async with await WsClient.connect(node.ws_url) as client:
            # The notify can be answered before the serve task registered:
            # until it has, the node has no resolver for items.
            async with asyncio.timeout(DEADLINE):
                while True:
                    await client.send_subscribe("items", "101")
                    frame = await client.recv()
                    if frame["action"] != "error":
                        break
                    assert frame["body"]["code"] == "no_resolver", frame
                    await asyncio.sleep(0.05)
            assert frame == {"action": "subscribed", "body": {"entity": "items", "id": "101"}}
            _, rows = await client.expect_push("items", "101")
            assert rows == [{"id": 101, "name": "milk", "qty": 2}]
            await client.send_subscribe("items", "102")
            assert await client.expect_error("not_found", "items", "102") == NOT_FOUND_MESSAGE
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), timeout=DEADLINE) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_receipt_carries_the_trace_id_the_node_logs_the_change_under(
    node_bin: Path,
) -> None:
    # The node logs each accepted notify with its trace id at debug level.
    env = {**os.environ, "RUST_LOG": "entity_sync=debug"}
    async with NodeProcess(node_bin, env=env) as node, Notifier(node.grpc_url) as notifier:
        # No trace id given: the node makes one, and answers with it.
        made = await notifier.notify([("items", "1")])
        other = await notifier.notify([("items", "1")])
        assert re.fullmatch("[0-9a-f]{32}", made.trace_id), made
        assert other.trace_id != made.trace_id

        # The caller's (a W3C trace-id): the node follows the change under it.
        given = "4bf92f3577b34da6a3ce929d0e0e4736"
        traced = await notifier.notify([("items", "2")], trace_id=given)
        assert traced.trace_id == given
        keyed = await notifier.notify_with_key([("items", "3")], "change-9", trace_id=given)
        assert (keyed.trace_id, keyed.duplicate) == (given, False)

        # One the node cannot use is replaced by one of its own.
        junk = await notifier.notify([("items", "4")], trace_id="not-a-trace-id")
        assert re.fullmatch("[0-9a-f]{32}", junk.trace_id), junk

        log = node.log_text()
    accepted = [line for line in log.splitlines() if "notify accepted" in line]
    for receipt in [made, other, traced, keyed, junk]:
        assert any(receipt.trace_id in line for line in accepted), (receipt, accepted)


def _stream_tasks() -> list[asyncio.Task[Any]]:
    """The tasks of Resolve streams still around (reader and writer)."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") in ("_read_all", "_write")
    ]


async def test_serve_stops_on_an_awaitable_or_at_once_when_cancelled(
    node: NodeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="entity_sync")
    # Shutdown as a coroutine (not an Event): serve drains and returns.
    release = asyncio.Event()
    backend = quick(node.grpc_url, {"items": Entity(item, FetchMode.SHARED)})
    serving = asyncio.create_task(backend.serve(release.wait()))
    async with asyncio.timeout(DEADLINE):
        await backend.wait_registered()
    assert _stream_tasks()
    release.set()
    async with asyncio.timeout(DEADLINE):
        await serving
    assert backend.state.phase is Phase.STOPPED
    assert "drained" in caplog.messages
    assert not _stream_tasks()

    # Cancelled: no drain, and nothing of the stream is left running.
    caplog.clear()
    backend = quick(node.grpc_url, {"items": Entity(item, FetchMode.SHARED)})
    serving = asyncio.create_task(backend.serve())
    async with asyncio.timeout(DEADLINE):
        await backend.wait_registered()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert backend.state.phase is Phase.STOPPED
    assert not any(m.startswith("draining") for m in caplog.messages)
    assert not _stream_tasks()


async def test_refresh_every_reaches_the_node_and_a_change_without_notify_is_pushed(
    node: NodeProcess, running: list[Running]
) -> None:
    rows: dict[str, Any] = {"1": {"n": 1}}
    reasons: list[Reason] = []

    async def items(req: ResolveRequest) -> Answers:
        reasons.append(req.reason)
        return {id: Answer.row(rows[id]) for id in req.ids}

    backend = Running(
        quick(node.grpc_url, {"items": Entity(items, FetchMode.SHARED, refresh_every=1.0)})
    )
    running.append(backend)
    await backend.registered()
    async with await WsClient.connect(node.ws_url) as client:
        snapshot, got = await client.subscribe("items", "1")
        assert got == [{"n": 1}]
        # The row changes; nobody notifies. The node's refresh finds it
        # within about two intervals.
        rows["1"] = {"n": 2}
        async with asyncio.timeout(2.5):
            version, got = await client.expect_push("items", "1")
        assert got == [{"n": 2}]
        assert version > snapshot
    assert reasons[0] is Reason.SUBSCRIBE
    assert Reason.CHANGE in reasons
