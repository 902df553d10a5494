"""The pieces that need no node: backoff, answers, requests."""

from __future__ import annotations

from entity_sync import Answer, ResolveRequest, each_id
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
