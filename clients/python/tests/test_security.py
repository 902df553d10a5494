"""Credentials against the real node: bearer tokens of its tokens file
accepted and refused, and TLS (mutual) with certificates made here. No token
or secret reaches a log or an error message."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
import pytest
from certs import make_tls_files
from conftest import PUSH_EACH_NOTIFY, Running, quick

from entity_sync import (
    Answer,
    Answers,
    ConfigError,
    Entity,
    Error,
    ErrorKind,
    FetchMode,
    Notifier,
    PermissionDeniedError,
    RejectedError,
    ResolveRequest,
    Tls,
    UnauthenticatedError,
    UnavailableError,
)
from entity_sync.testing import DEADLINE, NodeProcess, WsClient

NOTIFIER_TOKEN = "notifier-tok-5f0c1e2d3a4b"
RESOLVER_TOKEN = "resolver-tok-9a8b7c6d5e4f"
SECRET = "subscriber-secret-31337"
# The subclass each refusal is raised as.
REFUSED_AS = {
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


async def item(req: ResolveRequest) -> Answers:
    return {id: Answer.row({"id": id, "authorized": req.secret == SECRET}) for id in req.ids}


async def test_tokens_are_sent_as_bearer_metadata_and_refused_when_wrong(
    node_bin: Path, tmp_path: Path, running: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = tmp_path / "tokens"
    tokens.write_text(
        f"# the API servers\nnotifier {NOTIFIER_TOKEN}\nresolver {RESOLVER_TOKEN} items\n"
    )
    async with NodeProcess(
        node_bin, [*PUSH_EACH_NOTIFY, "--grpc-tokens-file", str(tokens)]
    ) as node:
        errors: list[Error] = []

        async def refused(backend_token: str | None, entity: str) -> Error:
            backend = quick(
                node.grpc_url, {entity: Entity(item, FetchMode.SHARED)}, bearer_token=backend_token
            )
            with pytest.raises(RejectedError) as err:
                async with asyncio.timeout(DEADLINE):
                    await backend.serve()
            errors.append(err.value)
            return err.value

        # Resolve: no token, a token of the other role, an entity outside the list.
        for token, entity, code in [
            (None, "items", grpc.StatusCode.UNAUTHENTICATED),
            ("unknown-token-0123456789", "items", grpc.StatusCode.UNAUTHENTICATED),
            (NOTIFIER_TOKEN, "items", grpc.StatusCode.PERMISSION_DENIED),
            (RESOLVER_TOKEN, "docs", grpc.StatusCode.PERMISSION_DENIED),
        ]:
            err = await refused(token, entity)
            assert (err.kind, err.code) == (ErrorKind.REJECTED, code), (token, entity, err)
            assert type(err) is REFUSED_AS[code], (token, entity, err)

        # Notify: the same rules, never retried.
        for token, code in [
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ("unknown-token-0123456789", grpc.StatusCode.UNAUTHENTICATED),
            (RESOLVER_TOKEN, grpc.StatusCode.PERMISSION_DENIED),
        ]:
            async with Notifier(node.grpc_url, bearer_token=token) as notifier:
                with pytest.raises(Error) as err:
                    await notifier.notify([("items", 1)])
            assert (err.value.kind, err.value.code) == (ErrorKind.REJECTED, code), token
            assert type(err.value) is REFUSED_AS[code], token
            errors.append(err.value)

        # The right tokens: served and notified.
        backend = Running(
            quick(
                node.grpc_url,
                {"items": Entity(item, FetchMode.PER_SUBSCRIBER)},
                bearer_token=RESOLVER_TOKEN,
            )
        )
        running.append(backend)
        await backend.registered()
        async with await WsClient.connect(node.ws_url) as client:
            await client.send_secret(SECRET)
            _, rows = await client.subscribe("items", "5")
            assert rows == [{"id": "5", "authorized": True}]
            async with Notifier(node.grpc_url, bearer_token=NOTIFIER_TOKEN) as notifier:
                receipt = await notifier.notify([("items", 5)])
            assert receipt.accepted == 1
            assert await client.expect_push("items", "5") == (
                receipt.sequences[0],
                [{"id": "5", "authorized": True}],
            )
        # The resolver token is removed and the node re-reads the file: the
        # stream ends with PERMISSION_DENIED, and serve with it, for good.
        tokens.write_text(f"notifier {NOTIFIER_TOKEN}\n")
        node.send_signal(signal.SIGHUP)
        with pytest.raises(PermissionDeniedError) as err:
            async with asyncio.timeout(DEADLINE):
                await backend.task
        assert (err.value.kind, err.value.code) == (
            ErrorKind.REJECTED,
            grpc.StatusCode.PERMISSION_DENIED,
        )
        errors.append(err.value)
        node_log = node.log_text()

    # Our own logs and grpc's, at debug (the test's websocket client logs
    # its frames, the secret message included: not ours).
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if not r.name.startswith("websockets")
    )
    assert "entity_sync" in {r.name for r in caplog.records}
    for secret in (NOTIFIER_TOKEN, RESOLVER_TOKEN, SECRET):
        assert secret not in logged
        assert secret not in node_log
        for err in errors:
            assert secret not in str(err)


def test_bad_settings_are_config_errors_that_never_show_the_token() -> None:
    with pytest.raises(ConfigError) as err:
        Notifier("http://127.0.0.1:1", bearer_token="has space-0123456789")
    assert err.value.kind is ErrorKind.CONFIG
    assert "0123456789" not in str(err.value)
    notifier = Notifier("http://127.0.0.1:1", bearer_token=NOTIFIER_TOKEN)
    assert NOTIFIER_TOKEN not in repr(notifier._endpoint)
    for url in ["127.0.0.1:50051", "grpc://127.0.0.1:1", "http://127.0.0.1", "http://h:1/path"]:
        with pytest.raises(ConfigError) as err:
            Notifier(url)
        assert err.value.kind is ErrorKind.CONFIG, url
    with pytest.raises(ConfigError) as err:
        Notifier("http://127.0.0.1:1", tls=Tls(ca_certificate=b"x"))
    assert err.value.kind is ErrorKind.CONFIG
    with pytest.raises(ConfigError) as err:
        Tls.from_files(ca="/nonexistent/ca.pem")
    assert err.value.kind is ErrorKind.CONFIG
    assert "/nonexistent/ca.pem" in str(err.value)


async def test_mutual_tls_with_a_certificate_made_here(
    node_bin: Path, tmp_path: Path, running: list[Running]
) -> None:
    files = make_tls_files(tmp_path)
    (tmp_path / "other").mkdir()
    other_ca = make_tls_files(tmp_path / "other", "another-ca")
    args = [
        "--grpc-tls-cert", str(files.server_cert),
        "--grpc-tls-key", str(files.server_key),
        "--grpc-tls-client-ca", str(files.ca),
    ]  # fmt: skip
    async with NodeProcess(node_bin, [*PUSH_EACH_NOTIFY, *args], grpc_tls=True) as node:
        assert node.grpc_url.startswith("https://")
        tls = Tls.from_files(ca=files.ca, cert=files.client_cert, key=files.client_key)
        backend = Running(quick(node.grpc_url, {"items": Entity(item, FetchMode.SHARED)}, tls=tls))
        running.append(backend)
        await backend.registered()
        async with await WsClient.connect(node.ws_url) as client:
            _, rows = await client.subscribe("items", "9")
            assert rows == [{"id": "9", "authorized": False}]
            async with Notifier(node.grpc_url, tls=tls) as notifier:
                receipt = await notifier.notify([("items", 9)])
            assert await client.expect_push("items", "9") == (
                receipt.sequences[0],
                [{"id": "9", "authorized": False}],
            )

        # No client certificate, or a node certificate this CA did not sign:
        # the handshake fails, which is UNAVAILABLE once retries run out.
        for settings in [Tls.from_files(ca=files.ca), Tls.from_files(ca=other_ca.ca)]:
            async with Notifier(node.grpc_url, tls=settings, retry_for=0.3) as notifier:
                with pytest.raises(UnavailableError) as err:
                    await notifier.notify([("items", 9)])
            assert (err.value.kind, err.value.code) == (
                ErrorKind.UNAVAILABLE,
                grpc.StatusCode.UNAVAILABLE,
            )
        # Plaintext on the TLS port fails too.
        async with Notifier(f"http://127.0.0.1:{node.grpc_port}", retry_for=0.3) as notifier:
            with pytest.raises(UnavailableError) as err:
                await notifier.notify([("items", 9)])
        assert err.value.kind is ErrorKind.UNAVAILABLE
