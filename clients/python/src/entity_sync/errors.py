"""Failures of the backend clients, with a kind callers match on."""

from __future__ import annotations

import enum
from typing import ClassVar

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
    token or a secret. What the library raises is always one of the
    subclasses (one per :class:`ErrorKind`, and a few per status code under
    them), so ``except UnavailableError`` and ``except Error`` with a look at
    ``kind`` both work.
    """

    def __init__(self, kind: ErrorKind, message: str, code: grpc.StatusCode | None = None) -> None:
        self.kind = kind
        self.code = code
        self.message = message
        super().__init__(str(self))

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> Error:
        """Classifies a failed call: an instance of the subclass of its status
        code (:class:`InvalidArgumentError`, :class:`DeadlineExceededError`,
        ...) or else of its kind (:class:`RejectedError`, ...)."""
        # grpc.aio's errors are not grpc.Call, but have its methods.
        code_of = getattr(err, "code", None)
        details_of = getattr(err, "details", None)
        code = code_of() if callable(code_of) else None
        details = details_of() if callable(details_of) else None
        if not isinstance(code, grpc.StatusCode):
            code = None
        return error_of(code, details or "")

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


class _KindError(Error):
    """An error whose kind its class fixes: built from a message (and the
    status code, if a call failed)."""

    KIND: ClassVar[ErrorKind]

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(self.KIND, message, code)


class ConfigError(_KindError):
    """:attr:`ErrorKind.CONFIG`: the settings are unusable; never retryable."""

    KIND = ErrorKind.CONFIG


class ConnectError(_KindError):
    """:attr:`ErrorKind.CONNECT`: the node could not be reached."""

    KIND = ErrorKind.CONNECT


class RejectedError(_KindError):
    """:attr:`ErrorKind.REJECTED`: the node refused for good."""

    KIND = ErrorKind.REJECTED


class UnavailableError(_KindError):
    """:attr:`ErrorKind.UNAVAILABLE`: the node could not take the call now,
    and retries ran out."""

    KIND = ErrorKind.UNAVAILABLE


class StreamError(_KindError):
    """:attr:`ErrorKind.STREAM`: a ``Resolve`` stream broke, or the node
    broke the protocol."""

    KIND = ErrorKind.STREAM


class _CodeError(_KindError):
    """An error of one status code: ``code`` defaults to it."""

    CODE: ClassVar[grpc.StatusCode]

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message, self.CODE if code is None else code)


class InvalidArgumentError(_CodeError, RejectedError):
    """``INVALID_ARGUMENT``: a malformed key, entity name or registration."""

    CODE = grpc.StatusCode.INVALID_ARGUMENT


class UnauthenticatedError(_CodeError, RejectedError):
    """``UNAUTHENTICATED``: no bearer token, or one the node does not know."""

    CODE = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(_CodeError, RejectedError):
    """``PERMISSION_DENIED``: the token is valid but not for this call (a
    notifier token on ``Resolve``, a resolver token on ``Notify``)."""

    CODE = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceededError(_CodeError, UnavailableError):
    """``DEADLINE_EXCEEDED``: the node did not answer in time."""

    CODE = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[_KindError]] = {
    cls.CODE: cls
    for cls in (
        InvalidArgumentError,
        UnauthenticatedError,
        PermissionDeniedError,
        DeadlineExceededError,
    )
}


def error_of(code: grpc.StatusCode | None, message: str) -> Error:
    """The error of a call that failed with ``code``: the most specific subclass."""
    specific = _BY_CODE.get(code) if code is not None else None
    if specific is not None:
        return specific(message, code)
    if code in _REJECTED:
        return RejectedError(message, code)
    if code in _UNAVAILABLE:
        return UnavailableError(message, code)
    return StreamError(message, code)
