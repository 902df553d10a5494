"""The backend side of entity-sync, in one call each: serve your entities'
rows to the nodes, and tell them when rows change.

A backend keeps a ``Resolve`` stream open to a node. The node asks it for the
current rows of ``(entity, id)`` keys whenever a browser subscribes or a key
changes; the backend answers from its database. After it changed data, the
backend calls ``Notify`` with the changed keys, and every subscribed browser
is pushed the fresh rows.

Layout:

- ``backend``: :func:`serve` and :class:`Backend` register the entities,
  answer requests concurrently, drain and reconnect; :class:`Entity`,
  :func:`each_id`.
- ``notifier``: :class:`Notifier`, ``Notify`` with retries under one
  idempotency key; :class:`Receipt`.
- ``request``: :class:`ResolveRequest`, :class:`Answer`,
  :class:`PassThrough`, :class:`FetchMode`, :class:`Reason`: what a handler
  is given and what it gives back.
- ``endpoint``: the node URL, bearer token and :class:`Tls` settings both
  clients connect with.
- ``errors``: :class:`Error` with an :class:`ErrorKind` callers match on,
  raised as a subclass per kind (:class:`ConfigError`,
  :class:`RejectedError`, :class:`UnavailableError`, ...) and per status
  code under them (:class:`UnauthenticatedError`, ...).
- ``tokens``: :class:`SubscribeTokenSigner` mints subscribe tokens (HS256,
  ES256, EdDSA) with which browsers subscribe without the node asking the
  backend; :func:`jwks` writes the node's ``--subscribe-token-jwks`` file.
- ``testing``: a node process (asyncio) and a websocket client (needs the
  ``test`` extra) for integration tests; ``pytest_plugin``: the
  ``entity_sync_node`` fixture, loaded by pytest once the package is
  installed.
- ``_proto``: the generated ``entitysync.v1`` messages and stub
  (``scripts/generate_stubs.py``).
"""

from .backend import Backend, BackendState, Entity, Phase, each_id, serve
from .endpoint import Tls
from .errors import (
    ConfigError,
    ConnectError,
    DeadlineExceededError,
    Error,
    ErrorKind,
    InvalidArgumentError,
    PermissionDeniedError,
    RejectedError,
    StreamError,
    UnauthenticatedError,
    UnavailableError,
)
from .notifier import Key, Notifier, Receipt
from .request import Answer, Answers, FetchMode, PassThrough, Reason, ResolveRequest
from .tokens import SubscribeTokenSigner, TokenError, jwks

__all__ = [
    "Answer",
    "Answers",
    "Backend",
    "BackendState",
    "ConfigError",
    "ConnectError",
    "DeadlineExceededError",
    "Entity",
    "Error",
    "ErrorKind",
    "FetchMode",
    "InvalidArgumentError",
    "Key",
    "Notifier",
    "PassThrough",
    "PermissionDeniedError",
    "Phase",
    "Reason",
    "Receipt",
    "RejectedError",
    "ResolveRequest",
    "StreamError",
    "SubscribeTokenSigner",
    "Tls",
    "TokenError",
    "UnauthenticatedError",
    "UnavailableError",
    "each_id",
    "jwks",
    "serve",
]
