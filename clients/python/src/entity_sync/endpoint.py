"""The node endpoint both clients connect to: URL, TLS and bearer token."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
import grpc.aio

from ._proto.entitysync_pb2_grpc import EntitySyncStub
from .errors import ConfigError

if TYPE_CHECKING:
    # Only in the stubs: what EntitySyncStub makes of a grpc.aio channel.
    from ._proto.entitysync_pb2_grpc import EntitySyncAsyncStub

EOF = grpc.aio.EOF
"""What a stream read returns at the stream's end."""

# Channel settings shared by the backend and the notifier.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # A dead node behind a live load balancer is noticed, not waited on.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # gRPC's own reconnect delays start at 1 s and grow to 2 min; a node that
    # restarts is reached again within our retry delays instead.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclasses.dataclass(frozen=True)
class Tls:
    """TLS settings of a connection to a node (``https://`` URLs).

    ``ca_certificate``: PEM of the CA that signed the node's certificate
    (``None``: the system's roots). ``certificate`` and ``private_key``: PEM
    of this backend's client certificate, for a node that verifies clients
    (mutual TLS). ``server_name``: the name to verify the node's certificate
    against, when it differs from the URL's host.
    """

    ca_certificate: bytes | None = None
    certificate: bytes | None = dataclasses.field(default=None)
    private_key: bytes | None = dataclasses.field(default=None, repr=False)
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> Tls:
        """Reads the PEM files (a file that cannot be read is a CONFIG error naming its path)."""

        def read(path: str | Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as err:
                raise ConfigError(f"cannot read {path}: {err.strerror}") from None

        return cls(read(ca), read(cert), read(key), server_name)


class Endpoint:
    """How to reach a node: ``http://host:port`` (plaintext) or
    ``https://host:port`` (TLS), with an optional bearer token sent as
    ``authorization: Bearer TOKEN`` on every call."""

    def __init__(
        self, url: str, *, bearer_token: str | None = None, tls: Tls | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ConfigError(f"invalid node URL {url!r}: use http(s)://host:port")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ConfigError(f"invalid node URL {url!r}: use http(s)://host:port")
        if tls is not None and parts.scheme == "http":
            raise ConfigError(f"node URL {url!r}: with TLS settings, use https://")
        if (tls is not None) and ((tls.certificate is None) != (tls.private_key is None)):
            raise ConfigError("a client certificate needs its private key, and the reverse")
        self.url = url
        self.secure = parts.scheme == "https"
        host = parts.hostname
        self.target = f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"
        self.tls = tls if tls is not None else (Tls() if self.secure else None)
        self._metadata: tuple[tuple[str, str], ...] = ()
        if bearer_token is not None:
            # Printable ASCII without spaces, like an HTTP token; the message
            # names the rule, never the token.
            if not bearer_token or any(not (0x21 <= ord(c) <= 0x7E) for c in bearer_token):
                raise ConfigError("the bearer token must be printable ASCII without spaces")
            self._metadata = (("authorization", f"Bearer {bearer_token}"),)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata (the credentials). Never log it."""
        return self._metadata

    def channel(self) -> grpc.aio.Channel:
        """A new channel (it connects on first use, and again after a failure)."""
        options = list(_CHANNEL_OPTIONS)
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca_certificate,
            private_key=self.tls.private_key,
            certificate_chain=self.tls.certificate,
        )
        return grpc.aio.secure_channel(self.target, credentials, options=options)

    def stub(self, channel: grpc.aio.Channel) -> EntitySyncAsyncStub:
        """The generated client of ``channel``, its calls typed by the stubs
        mypy-protobuf wrote (``_proto/entitysync_pb2_grpc.pyi``)."""
        return EntitySyncStub(channel)

    def __repr__(self) -> str:
        token = ", bearer_token=<redacted>" if self._metadata else ""
        return f"Endpoint({self.url!r}{token})"
