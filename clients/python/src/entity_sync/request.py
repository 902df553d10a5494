"""What a handler is given (a resolve request, a pass-through message) and what it answers."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ._proto import entitysync_pb2 as pb

log = logging.getLogger("entity_sync")


class FetchMode(enum.IntEnum):
    """How the node resolves an entity's changes."""

    SHARED = pb.FETCH_MODE_SHARED
    """One resolve per node per change, rows fanned out to every subscriber
    (authorize at subscribe)."""
    PER_SUBSCRIBER = pb.FETCH_MODE_PER_SUBSCRIBER
    """One resolve per distinct secret among a key's subscribers."""


class Reason(enum.IntEnum):
    """Why the node asks."""

    UNSPECIFIED = pb.REASON_UNSPECIFIED
    SUBSCRIBE = pb.REASON_SUBSCRIBE
    """A client subscribes (or sent a new secret): authorize it now."""
    CHANGE = pb.REASON_CHANGE
    """The key changed."""


@dataclasses.dataclass(frozen=True)
class ResolveRequest:
    """The node asks for the current rows of some ids of one entity.

    ``secret`` is the subscriber's: empty for a client that sent none, and
    for a shared resolve of a SHARED entity (``shared`` true): a change,
    whose subscribers were authorized when they subscribed, or a subscribe
    whose signed subscribe token the node verified. It is left out of
    ``repr``, so a request can be logged whole.
    """

    entity: str
    ids: tuple[str, ...]
    secret: str = dataclasses.field(default="", repr=False)
    reason: Reason = Reason.UNSPECIFIED
    shared: bool = False

    @property
    def is_subscribe(self) -> bool:
        """Whether a client is subscribing (authorize it now, unless ``shared``:
        the node verified its subscribe token)."""
        return self.reason is Reason.SUBSCRIBE

    @classmethod
    def _from_proto(cls, request: pb.ResolveRequest) -> ResolveRequest:
        try:
            reason = Reason(request.reason)
        except ValueError:
            reason = Reason.UNSPECIFIED
        return cls(
            entity=request.entity,
            ids=tuple(request.ids),
            secret=request.secret,
            reason=reason,
            shared=request.shared,
        )


@dataclasses.dataclass(frozen=True)
class PassThrough:
    """A client's websocket message without an ``action``, forwarded by the node."""

    connection_id: str
    """Which connection sent it (unique across the cluster's nodes)."""
    payload: bytes
    """The message as the client sent it (a JSON text)."""
    secret: str = dataclasses.field(default="", repr=False)
    """The connection's secret when it sent the message."""

    def json(self) -> Any:
        """The message parsed."""
        return json.loads(self.payload)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclasses.dataclass(frozen=True)
class Answer:
    """How one id is answered. Build it with :meth:`rows`, :meth:`row`,
    :meth:`json_rows`, :meth:`not_found`, :meth:`forbidden` or :meth:`error`."""

    status: int
    rows_json: tuple[bytes, ...] = ()
    message: str = ""
    version: int = 0

    @classmethod
    def rows(cls, rows: Iterable[Any], *, version: int = 0) -> Answer:
        """The key's rows, each serialized to JSON, in order (a row and the
        rows it refers to, say). A row that cannot be serialized makes the
        whole answer an error (logged here; the client sees ``resolver_error``)."""
        try:
            encoded = tuple(_dumps(row) for row in rows)
        except (TypeError, ValueError) as err:
            log.warning("a row could not be serialized to JSON: %s", type(err).__name__)
            return cls.error("the backend could not serialize a row")
        return cls(pb.STATUS_OK, encoded, version=version)

    @classmethod
    def row(cls, row: Any, *, version: int = 0) -> Answer:
        """A key with one row."""
        return cls.rows([row], version=version)

    @classmethod
    def json_rows(cls, rows: Iterable[bytes | str], *, version: int = 0) -> Answer:
        """Rows that already are JSON texts (from the database, say). The node
        checks each is one JSON value; an invalid one fails the key."""
        encoded = tuple(r.encode() if isinstance(r, str) else bytes(r) for r in rows)
        return cls(pb.STATUS_OK, encoded, version=version)

    @classmethod
    def not_found(cls) -> Answer:
        """No such key: subscribing fails with ``not_found``; a subscriber of a
        key that is gone gets a push with no rows."""
        return cls(pb.STATUS_NOT_FOUND)

    @classmethod
    def forbidden(cls, message: str = "") -> Answer:
        """This secret may not read the key: subscribing fails with
        ``forbidden``, and on a change the subscription ends. ``message``
        reaches the client."""
        return cls(pb.STATUS_FORBIDDEN, message=message)

    @classmethod
    def error(cls, message: str = "") -> Answer:
        """The backend could not answer now; the node retries changes with
        backoff. ``message`` reaches a subscribing client: keep internals out."""
        return cls(pb.STATUS_ERROR, message=message)

    def with_version(self, version: int) -> Answer:
        """The backend's own version of the rows: pushes carry it instead of
        the bus sequence; it must grow with every change of the key."""
        return dataclasses.replace(self, version=version)

    @property
    def is_ok(self) -> bool:
        """Whether this answer carries rows."""
        return self.status == pb.STATUS_OK

    def _result(self, id: str) -> pb.KeyResult:
        return pb.KeyResult(
            id=id,
            status=self.status,  # type: ignore[arg-type]
            rows=list(self.rows_json),
            version=self.version,
            message=self.message,
        )


Answers = Mapping[str, Answer] | Iterable[tuple[str, Answer]]
"""What a handler returns: an answer per id, as a mapping or as pairs."""

_UNANSWERED = Answer.error("the backend gave no answer for this id")


def _results(entity: str, ids: Iterable[str], answers: Answers) -> list[pb.KeyResult]:
    """One result per requested id, in the request's order."""
    by_id = dict(answers.items() if isinstance(answers, Mapping) else answers)
    results = []
    for id in ids:
        answer = by_id.get(id)
        if not isinstance(answer, Answer):
            log.warning("the handler gave no answer for an id (entity %s, id %s)", entity, id)
            answer = _UNANSWERED
        results.append(answer._result(id))
    return results
