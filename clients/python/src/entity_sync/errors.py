"""Failures of the backend clients, with a kind callers match on."""

from __future__ import annotations

import enum

import grpc


class ErrorKind(enum.Enum):
    """What went wrong, broadly; match on this rather than on messages."""

    CONFIG = "invalid configuration"
    """The settings are unusable (no name, a bad URL, a bad token, ...)."""
    CONNECT = "cannot connect to the node"
    """The node could not be reached."""
    REJECTED = "rejected by the node"
    """The node refused for good: invalid, unauthenticated, not permitted."""
    UNAVAILABLE = "the node is unavailable"
    """The node (or its bus) could not take the call now, and retries ran out."""
    STREAM = "resolve stream failed"
    """A ``Resolve`` stream broke, or the node broke the protocol."""


_REJECTED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.NOT_FOUND,
    }
)
_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class Error(Exception):
    """A failure of :class:`~entity_sync.Backend` or :class:`~entity_sync.Notifier`.

    ``kind`` says what broadly went wrong, ``code`` is the gRPC status the
    node (or the transport) answered with, if any. Messages never carry a
    token or a secret.
    """

    def __init__(self, kind: ErrorKind, message: str, code: grpc.StatusCode | None = None) -> None:
        self.kind = kind
        self.code = code
        self.message = message
        super().__init__(str(self))

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> Error:
        """Classifies a failed call."""
        # grpc.aio's errors are not grpc.Call, but have its methods.
        code_of = getattr(err, "code", None)
        details_of = getattr(err, "details", None)
        code = code_of() if callable(code_of) else None
        details = details_of() if callable(details_of) else None
        if code in _REJECTED:
            kind = ErrorKind.REJECTED
        elif code in _UNAVAILABLE:
            kind = ErrorKind.UNAVAILABLE
        else:
            kind = ErrorKind.STREAM
        return cls(kind, details or "", code)

    @property
    def retryable(self) -> bool:
        """Whether trying the same thing again later can succeed."""
        if self.kind is ErrorKind.REJECTED:
            # A fetch-mode conflict clears once the other registration leaves
            # (a rolling deploy that changes an entity's mode).
            return self.code is grpc.StatusCode.FAILED_PRECONDITION
        return self.kind is not ErrorKind.CONFIG

    def __str__(self) -> str:
        if self.code is not None:
            return f"{self.kind.value} ({self.code.name}): {self.message}"
        return f"{self.kind.value}: {self.message}"
