"""Subscribe tokens: signing, the node's JWK, and the claim layout shared
with the Rust SDK."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import entity_sync
from entity_sync import SubscribeTokenSigner, TokenError, jwks
from entity_sync.tokens import ANY_ID, MAX_TOKEN_TTL_SECONDS

# A test-only HS256 secret of exactly 32 bytes.
SECRET = b"0123456789abcdef0123456789abcdef"

# The Rust SDK's test vector (backend/src/tokens/tests.rs): HS256 with SECRET,
# kid "k1", the claims below. Both SDKs must mint exactly this token.
VECTOR_CLAIMS: dict[str, Any] = {
    "entity": "items",
    "ids": ["101", "*"],
    "exp": 2_000_000_000,
    "nbf": 1_700_000_000,
    "iat": 1_700_000_000,
    "aud": "shop",
    "sub": "user-42",
}
VECTOR_TOKEN = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0."
    "eyJlbnRpdHkiOiJpdGVtcyIsImlkcyI6WyIxMDEiLCIqIl0sImV4cCI6MjAwMDAwMDAwMCwibmJmIjoxNzAw"
    "MDAwMDAwLCJpYXQiOjE3MDAwMDAwMDAsImF1ZCI6InNob3AiLCJzdWIiOiJ1c2VyLTQyIn0."
    "kwCO3gQw41re6HoB6GGKytXOQOwmM5ITFbySaLi5YuU"
)
# The same claims signed EdDSA (deterministic) with the Rust SDK's test
# Ed25519 key (backend/tests/keys) and kid "k1": both SDKs mint this token.
VECTOR_TOKEN_EDDSA = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0."
    "eyJlbnRpdHkiOiJpdGVtcyIsImlkcyI6WyIxMDEiLCIqIl0sImV4cCI6MjAwMDAwMDAwMCwibmJmIjoxNzAwMDAwMDAwLCJpYXQiOjE3MDAwMDAwMDAsImF1ZCI6InNob3AiLCJzdWIiOiJ1c2VyLTQyIn0."
    "D5UNhnrCHxYzlB4Z_Jc14zuSNdmNmZ4h4OcVVhyp9S1SmXhmHcrRpIUdR6JQXpiiGM9ydzXYSBqdQ7lSrhBhCw"
)

# The Rust SDK's test keys (public, test-only), when the repository is around.
RUST_TEST_KEYS = Path(__file__).resolve().parents[3] / "backend" / "tests" / "keys"


def _pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def es256_pem() -> bytes:
    return _pem(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def ed25519_pem() -> bytes:
    return _pem(ed25519.Ed25519PrivateKey.generate())


@pytest.fixture
def signers(es256_pem: bytes, ed25519_pem: bytes) -> list[SubscribeTokenSigner]:
    return [
        SubscribeTokenSigner.hs256("k-hs", SECRET),
        SubscribeTokenSigner.es256("k-es", es256_pem),
        SubscribeTokenSigner.eddsa("k-ed", ed25519_pem),
    ]


def verify(jwks_json: str, token: str, audience: str | None = None) -> dict[str, Any]:
    """Verifies ``token`` the way the node does: the key chosen by ``kid``
    from the JWKS, ``exp`` required, the audience checked when given."""
    keys = jwt.PyJWKSet.from_json(jwks_json)
    header = jwt.get_unverified_header(token)
    key = keys[header["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=[key.algorithm_name],
        audience=audience,
        options={"require": ["exp"], "verify_aud": audience is not None},
    )
    return claims


def segment(token: str, index: int) -> bytes:
    part = token.split(".")[index]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_round_trip_each_algorithm_with_exact_claims(
    signers: list[SubscribeTokenSigner],
) -> None:
    for signer in signers:
        before = int(time.time())
        token = signer.sign("items", ["101", "102"], 300, audience="shop", subject="user-42")
        after = int(time.time())
        header = jwt.get_unverified_header(token)
        assert header == {"typ": "JWT", "alg": signer.alg, "kid": signer.kid}

        claims = verify(jwks([signer]), token, audience="shop")
        iat = claims["iat"]
        assert before <= iat <= after
        assert claims == {
            "entity": "items",
            "ids": ["101", "102"],
            "exp": iat + 300,
            "iat": iat,
            "aud": "shop",
            "sub": "user-42",
        }, signer.alg
        # The order the Rust SDK writes them in.
        assert list(json.loads(segment(token, 1))) == ["entity", "ids", "exp", "iat", "aud", "sub"]


def test_without_audience_and_subject_those_claims_are_absent() -> None:
    signer = SubscribeTokenSigner.hs256("k1", SECRET)
    token = signer.sign("items", [ANY_ID], 60)
    payload = json.loads(segment(token, 1))
    assert list(payload) == ["entity", "ids", "exp", "iat"]
    assert payload["ids"] == ["*"]
    assert verify(jwks([signer]), token)["entity"] == "items"


def test_signer_defaults_and_audience_lists() -> None:
    signer = SubscribeTokenSigner.hs256("k1", SECRET, audience=["shop", "admin"], subject="service")
    token = signer.sign("items", ("1",), 60)
    payload = json.loads(segment(token, 1))
    assert payload["aud"] == ["shop", "admin"]
    assert payload["sub"] == "service"
    assert verify(jwks([signer]), token, audience="admin")["sub"] == "service"
    with pytest.raises(jwt.InvalidAudienceError):
        verify(jwks([signer]), token, audience="other")
    # Per call, the arguments win.
    payload = json.loads(segment(signer.sign("items", ["1"], 60, subject="u7"), 1))
    assert payload["sub"] == "u7"


def test_fixed_claims_give_the_rust_sdks_test_vector() -> None:
    signer = SubscribeTokenSigner.hs256("k1", SECRET)
    assert signer.sign_claims(VECTOR_CLAIMS) == VECTOR_TOKEN
    # Whatever order the claims come in, the layout is the same.
    assert signer.sign_claims(dict(reversed(VECTOR_CLAIMS.items()))) == VECTOR_TOKEN
    assert segment(VECTOR_TOKEN, 0) == b'{"typ":"JWT","alg":"HS256","kid":"k1"}'
    assert segment(VECTOR_TOKEN, 1) == (
        b'{"entity":"items","ids":["101","*"],"exp":2000000000,"nbf":1700000000,'
        b'"iat":1700000000,"aud":"shop","sub":"user-42"}'
    )
    assert verify(jwks([signer]), VECTOR_TOKEN, audience="shop") == VECTOR_CLAIMS


def test_the_rust_sdks_test_keys_give_the_same_jwks() -> None:
    if not RUST_TEST_KEYS.is_dir():
        pytest.skip("not in the repository: no backend/tests/keys")
    ed = SubscribeTokenSigner.eddsa(
        "k-ed", (RUST_TEST_KEYS / "ed25519-test-private.pem").read_bytes()
    )
    # The value backend/src/tokens/tests.rs expects of the same key.
    assert ed.jwk() == {
        "kty": "OKP",
        "crv": "Ed25519",
        "kid": "k-ed",
        "alg": "EdDSA",
        "x": "fZlFHCBo3_lSZZWFv4v_E-Xt5g8ovaG1wgyIWCoWbU4",
    }
    assert SubscribeTokenSigner.hs256("k-hs", SECRET).jwk() == {
        "kty": "oct",
        "kid": "k-hs",
        "alg": "HS256",
        "k": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY",
    }
    es = SubscribeTokenSigner.es256("k-es", (RUST_TEST_KEYS / "es256-test-private.pem").read_text())
    assert (es.jwk()["x"], es.jwk()["y"]) == (
        "A-GMSPMn7O6HkFj4w4UJiyPOcFSr3yByMTl3FRUp5h8",
        "7pOrJvwb3Vnst9baGhKK22Rg-_qK9zBkj7xeChATN-A",
    )
    ed_k1 = SubscribeTokenSigner.eddsa(
        "k1", (RUST_TEST_KEYS / "ed25519-test-private.pem").read_bytes()
    )
    assert ed_k1.sign_claims(VECTOR_CLAIMS) == VECTOR_TOKEN_EDDSA
    assert verify(jwks([ed_k1]), VECTOR_TOKEN_EDDSA, audience="shop") == VECTOR_CLAIMS
    public = (RUST_TEST_KEYS / "es256-test-public.pem").read_bytes()
    token = es.sign("items", ["1"], 60)
    # Verifies with the public PEM as well as with the JWK.
    assert jwt.decode(token, public, algorithms=["ES256"])["ids"] == ["1"]
    assert verify(jwks([es]), token)["ids"] == ["1"]


def test_tampered_tokens_fail(signers: list[SubscribeTokenSigner]) -> None:
    for signer in signers:
        keys = jwks([signer])
        token = signer.sign("items", ["101"], 60)
        header, payload, signature = token.split(".")

        other_payload = signer.sign("items", ["*"], 60).split(".")[1]
        assert other_payload != payload
        with pytest.raises(jwt.InvalidSignatureError):
            verify(keys, f"{header}.{other_payload}.{signature}")

        changed = signature[:-1] + ("B" if signature.endswith("A") else "A")
        with pytest.raises(jwt.InvalidTokenError):
            verify(keys, f"{header}.{payload}.{changed}")

        assert verify(keys, token)["ids"] == ["101"]


def test_another_key_under_the_same_kid_fails(es256_pem: bytes) -> None:
    token = SubscribeTokenSigner.es256("k1", es256_pem).sign("items", ["1"], 60)
    other = SubscribeTokenSigner.es256("k1", _pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(jwt.InvalidSignatureError):
        verify(jwks([other]), token)
    token = SubscribeTokenSigner.hs256("k1", SECRET).sign("items", ["1"], 60)
    with pytest.raises(jwt.InvalidSignatureError):
        verify(jwks([SubscribeTokenSigner.hs256("k1", bytes(32))]), token)


def test_expired_token_fails() -> None:
    signer = SubscribeTokenSigner.hs256("k1", SECRET)
    token = signer.sign_claims({**VECTOR_CLAIMS, "exp": 1_000_000_000, "nbf": None})
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(jwks([signer]), token, audience="shop")


def test_short_hs256_secret_is_refused() -> None:
    with pytest.raises(TokenError, match="31 bytes.*at least 32"):
        SubscribeTokenSigner.hs256("k1", SECRET[:31])
    with pytest.raises(TokenError, match="0 bytes"):
        SubscribeTokenSigner.hs256("k1", b"")
    with pytest.raises(TokenError, match="bytes"):
        SubscribeTokenSigner.hs256("k1", SECRET.decode())  # type: ignore[arg-type]
    assert SubscribeTokenSigner.hs256("k1", SECRET).alg == "HS256"


def test_bad_keys_are_refused(es256_pem: bytes, ed25519_pem: bytes) -> None:
    with pytest.raises(TokenError, match="ES256 key"):
        SubscribeTokenSigner.es256("k1", b"not a pem")
    with pytest.raises(TokenError, match="P-256"):
        SubscribeTokenSigner.es256("k1", ed25519_pem)
    with pytest.raises(TokenError, match="P-256"):
        SubscribeTokenSigner.es256("k1", _pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(TokenError, match="Ed25519"):
        SubscribeTokenSigner.eddsa("k1", es256_pem)
    with pytest.raises(TokenError, match="kid"):
        SubscribeTokenSigner.hs256("", SECRET)
    with pytest.raises(TypeError):
        SubscribeTokenSigner()


def test_invalid_claims_and_ttls_are_refused() -> None:
    signer = SubscribeTokenSigner.hs256("k1", SECRET)
    for entity, ids in [("", ["1"]), ("items", []), ("items", ["1", ""]), ("items", "101")]:
        with pytest.raises(TokenError, match="claims"):
            signer.sign(entity, ids, 60)
    for ttl in [0, -1, MAX_TOKEN_TTL_SECONDS + 1, 1.5, True]:
        with pytest.raises(TokenError, match="lifetime"):
            signer.sign("items", ["1"], ttl)  # type: ignore[arg-type]
    assert signer.sign("items", ["1"], MAX_TOKEN_TTL_SECONDS)
    bads: list[dict[str, Any]] = [{"exp": 0}, {"exp": None}, {"extra": 1}, {"sub": ""}, {"aud": []}]
    for bad in bads:
        with pytest.raises(TokenError, match="claims"):
            signer.sign_claims({**VECTOR_CLAIMS, **bad})


def test_jwks_holds_the_verifying_keys_only(
    signers: list[SubscribeTokenSigner], es256_pem: bytes, ed25519_pem: bytes
) -> None:
    document = json.loads(jwks(signers))
    keys = document["keys"]
    assert list(document) == ["keys"]
    assert [k["kid"] for k in keys] == ["k-hs", "k-es", "k-ed"]
    assert keys[0] == {
        "kty": "oct",
        "kid": "k-hs",
        "alg": "HS256",
        "k": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY",
    }
    assert sorted(keys[1]) == ["alg", "crv", "kid", "kty", "x", "y"]
    assert (keys[1]["kty"], keys[1]["crv"], keys[1]["alg"]) == ("EC", "P-256", "ES256")
    assert len(keys[1]["x"]) == len(keys[1]["y"]) == 43
    assert sorted(keys[2]) == ["alg", "crv", "kid", "kty", "x"]
    assert (keys[2]["kty"], keys[2]["crv"], keys[2]["alg"]) == ("OKP", "Ed25519", "EdDSA")
    # No private part ("d") in the asymmetric keys, and each key loads.
    assert "d" not in keys[1] and "d" not in keys[2]
    for key in keys:
        jwt.PyJWK(key)
    # jwk() hands out a copy.
    signers[0].jwk()["k"] = "changed"
    assert signers[0].jwk()["k"] == keys[0]["k"]


def test_repr_and_errors_redact_the_key(es256_pem: bytes, ed25519_pem: bytes) -> None:
    hs = SubscribeTokenSigner.hs256("k1", SECRET, audience="shop")
    text = repr(hs) + str(hs)
    assert "k1" in text and "HS256" in text and "<redacted>" in text and "shop" in text
    assert SECRET.decode() not in text
    assert hs.jwk()["k"] not in text

    for signer, pem in [
        (SubscribeTokenSigner.es256("k2", es256_pem), es256_pem),
        (SubscribeTokenSigner.eddsa("k3", ed25519_pem), ed25519_pem),
    ]:
        body = pem.decode().splitlines()[1]
        assert body[:16] not in repr(signer)
    assert not hasattr(hs, "__dict__")
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(hs)

    with pytest.raises(TokenError) as caught:
        SubscribeTokenSigner.hs256("k1", SECRET[:20])
    assert SECRET[:20].decode() not in str(caught.value)
    lines = es256_pem.decode().splitlines()
    broken = "\n".join([lines[0], lines[1][:20] + "!!" + lines[1][22:], *lines[2:]])
    with pytest.raises(TokenError) as caught:
        SubscribeTokenSigner.es256("k1", broken)
    assert str(caught.value) == "ES256 key: not an unencrypted PEM private key"
    assert lines[1][:16] not in str(caught.value)
    assert caught.value.__cause__ is None


def test_exported_from_the_package() -> None:
    for name in ["SubscribeTokenSigner", "TokenError", "jwks"]:
        assert name in entity_sync.__all__


async def test_a_node_verifies_the_tokens_it_signs_with_the_jwks_it_writes(
    node_bin: Path, tmp_path: Path
) -> None:
    """The node binary, given the signer's JWKS, takes its tokens (the
    subscribe then goes on: no resolver serves the entity here, so
    ``no_resolver``) and refuses another signer's under the same kid."""
    from entity_sync.testing import NodeProcess, WsClient

    signer = SubscribeTokenSigner.hs256("k1", SECRET)
    other = SubscribeTokenSigner.hs256("k1", b"another-secret-another-secret-xx")
    path = tmp_path / "jwks.json"
    path.write_text(jwks([signer]))
    async with NodeProcess(node_bin, ["--subscribe-token-jwks", str(path)]) as node:
        client = await WsClient.connect(node.ws_url)
        codes = []
        for who in (signer, other):
            token = who.sign("items", ["7"], 60)
            body = {"entity": "items", "id": "7", "token": token}
            await client.send({"action": "subscribe", "body": body})
            frame = await client.recv()
            assert frame["action"] == "error", frame
            assert (frame["body"]["entity"], frame["body"]["id"]) == ("items", "7")
            codes.append(frame["body"]["code"])
        await client.close()
        assert codes == ["no_resolver", "token_invalid"]
