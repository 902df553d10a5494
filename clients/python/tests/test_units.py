"""The pieces that need no node: backoff, answers, requests, errors."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

import entity_sync
from entity_sync import (
    Answer,
    ConfigError,
    ConnectError,
    DeadlineExceededError,
    Error,
    ErrorKind,
    InvalidArgumentError,
    PermissionDeniedError,
    RejectedError,
    ResolveRequest,
    StreamError,
    UnauthenticatedError,
    UnavailableError,
    each_id,
)
from entity_sync._backoff import Backoff
from entity_sync._proto import entitysync_pb2 as pb
from entity_sync.request import Reason, _results


def test_backoff_doubles_up_to_the_ceiling_with_jitter_and_resets() -> None:
    backoff = Backoff(0.1, 0.7)
    for step in [0.1, 0.2, 0.4, 0.7, 0.7]:
        delay = backoff.next_delay()
        assert step / 2 <= delay <= step, (delay, step)
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_results_follow_the_request_order_and_unanswered_ids_are_errors() -> None:
    answers = {"1": Answer.rows([{"id": 1}, {"id": 7}], version=3)}
    results = _results("items", ["1", "2"], answers)
    assert [r.id for r in results] == ["1", "2"]
    assert results[0].status == pb.STATUS_OK
    assert list(results[0].rows) == [b'{"id":1}', b'{"id":7}']
    assert results[0].version == 3
    assert (results[1].status, results[1].message) == (
        pb.STATUS_ERROR,
        "the backend gave no answer for this id",
    )
    assert Answer.not_found().with_version(5).version == 5
    assert Answer.row(float("nan")).status == pb.STATUS_ERROR


def test_a_request_hides_its_secret_in_repr() -> None:
    request = ResolveRequest("items", ("1",), "hunter2-secret", Reason.SUBSCRIBE)
    assert "hunter2-secret" not in repr(request)
    assert request.secret == "hunter2-secret"
    assert request.is_subscribe and not request.shared


async def test_each_id_answers_every_id() -> None:
    async def one(id: str, request: ResolveRequest) -> Answer:
        return Answer.row({"id": id})

    handler = each_id(one)
    answers = await handler(ResolveRequest("items", ("a", "b")))  # type: ignore[misc]
    assert answers == {"a": Answer.row({"id": "a"}), "b": Answer.row({"id": "b"})}


def test_the_readme_shows_the_quickstart_as_it_is() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = (root / "examples" / "quickstart.py").read_text()
    body = code[code.index("import asyncio") :]
    assert f"```python\n{body}```" in (root / "README.md").read_text()


KIND_CLASSES = {
    ErrorKind.CONFIG: ConfigError,
    ErrorKind.CONNECT: ConnectError,
    ErrorKind.REJECTED: RejectedError,
    ErrorKind.UNAVAILABLE: UnavailableError,
    ErrorKind.STREAM: StreamError,
}


def test_every_kind_has_its_exported_subclass_of_error() -> None:
    assert set(KIND_CLASSES) == set(ErrorKind)
    for kind, cls in KIND_CLASSES.items():
        err = cls("what happened")
        assert isinstance(err, Error) and err.kind is kind and err.code is None
        assert str(err) == f"{kind.value}: what happened"
        assert cls.__name__ in entity_sync.__all__
        assert getattr(entity_sync, cls.__name__) is cls


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """What a failed grpc.aio call raises."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "cls", "kind", "retryable"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError, ErrorKind.REJECTED, False),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError, ErrorKind.REJECTED, False),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError, ErrorKind.REJECTED, False),
        (grpc.StatusCode.FAILED_PRECONDITION, RejectedError, ErrorKind.REJECTED, True),
        (grpc.StatusCode.NOT_FOUND, RejectedError, ErrorKind.REJECTED, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError, ErrorKind.UNAVAILABLE, True),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError, ErrorKind.UNAVAILABLE, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, UnavailableError, ErrorKind.UNAVAILABLE, True),
        (grpc.StatusCode.CANCELLED, StreamError, ErrorKind.STREAM, True),
        (grpc.StatusCode.INTERNAL, StreamError, ErrorKind.STREAM, True),
    ],
)
def test_a_failed_call_is_raised_as_the_subclass_of_its_code(
    code: grpc.StatusCode, cls: type[Error], kind: ErrorKind, retryable: bool
) -> None:
    err = Error.from_rpc(_rpc_error(code, "the details"))
    assert type(err) is cls
    assert (err.kind, err.code, err.message, err.retryable) == (
        kind,
        code,
        "the details",
        retryable,
    )
    assert str(err) == f"{kind.value} ({code.name}): the details"
    assert isinstance(err, KIND_CLASSES[kind])


def test_the_subclasses_of_a_code_default_to_it_and_the_old_constructor_works() -> None:
    assert UnauthenticatedError("no token").code is grpc.StatusCode.UNAUTHENTICATED
    assert DeadlineExceededError("slow").retryable
    assert not ConfigError("bad").retryable
    # Error(kind, message, code) as before: still an Error of that kind.
    err = Error(ErrorKind.STREAM, "broke", grpc.StatusCode.INTERNAL)
    assert (err.kind, err.code, str(err)) == (
        ErrorKind.STREAM,
        grpc.StatusCode.INTERNAL,
        "resolve stream failed (INTERNAL): broke",
    )


def test_refresh_every_is_sent_in_milliseconds_and_bounded_like_the_node() -> None:
    async def rows(req: ResolveRequest) -> dict[str, Answer]:
        return {}

    backend = entity_sync.Backend(
        "http://127.0.0.1:1",
        {
            "items": entity_sync.Entity(rows, entity_sync.FetchMode.SHARED, refresh_every=1.5),
            "docs": entity_sync.Entity(rows, entity_sync.FetchMode.SHARED),
        },
        name="svc",
    )
    register = backend._register()
    assert [(e.entity, e.refresh_interval_ms) for e in register.entities] == [
        ("items", 1500),
        ("docs", 0),
    ]
    for bad in (0.5, 0.0, 86_400.5):
        with pytest.raises(ConfigError) as refused:
            entity_sync.Backend(
                "http://127.0.0.1:1",
                {"items": entity_sync.Entity(rows, refresh_every=bad)},
                name="svc",
            )
        assert "entity 'items': refresh_every must be 1 to 86400 seconds" in str(refused.value)
