"""Subscribe tokens: short-lived signed grants with which a browser subscribes
to ``(entity, id)`` keys without the node asking the backend first.

A subscribe token is a compact JWS. Its header carries ``alg`` and ``kid``
(the node picks its verification key by ``kid`` from the JWKS file it is
started with, ``--subscribe-token-jwks PATH``); its claims, in this order:

- ``entity`` (string): the entity granted;
- ``ids`` (array of strings): the ids granted, ``"*"`` (:data:`ANY_ID`)
  standing for any id;
- ``exp`` (integer seconds since the epoch): expiry, required;
- ``nbf`` (integer): not before, optional (only through
  :meth:`SubscribeTokenSigner.sign_claims`);
- ``iat`` (integer): issued at, set by :meth:`SubscribeTokenSigner.sign`;
- ``aud`` (string or array of strings): checked by the node when it is
  started with ``--subscribe-token-audience AUD``;
- ``sub`` (string): the application's user id; the node may log it.

The Rust SDK (``entity_sync_backend::SubscribeTokenSigner``) mints the same
layout: with the same HS256 secret, ``kid`` and claims both produce the same
token, byte for byte.

:class:`SubscribeTokenSigner` signs with HS256 (a shared secret of at least
32 bytes), ES256 (a P-256 private key) or EdDSA (an Ed25519 private key);
:meth:`SubscribeTokenSigner.jwk` and :func:`jwks` give the node's verifying
keys: the shared secret for HS256 (keep that file secret), only the public
key for ES256 and EdDSA.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

MIN_HS256_SECRET_LEN = 32
"""The shortest HS256 secret :meth:`SubscribeTokenSigner.hs256` accepts, in
bytes (RFC 7518 section 3.2: at least the hash's output)."""

MAX_TOKEN_TTL_SECONDS = 24 * 60 * 60
"""The longest lifetime :meth:`SubscribeTokenSigner.sign` gives a token:
24 hours. Tokens cannot be revoked before they expire: keep lifetimes short
(minutes) and mint a new token when the browser reconnects."""

ANY_ID = "*"
"""The ``ids`` value that grants every id of the entity."""

Algorithm = Literal["HS256", "ES256", "EdDSA"]
Audience = str | Sequence[str]

# The claims in the order they are serialized (the Rust SDK's order).
CLAIM_ORDER = ("entity", "ids", "exp", "nbf", "iat", "aud", "sub")


class TokenError(ValueError):
    """A signer that cannot be built or claims that cannot be signed. The
    message never contains key material."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _check_kid(kid: str) -> None:
    if not isinstance(kid, str) or not kid:
        raise TokenError("the key id (kid) must be a non-empty string")


def _load_private_key(pem: bytes | str, alg: str) -> Any:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's message is dropped: only say what was expected.
        raise TokenError(f"{alg} key: not an unencrypted PEM private key") from None


def _audience_claim(audience: Audience) -> str | list[str]:
    if isinstance(audience, str):
        if not audience:
            raise TokenError("invalid subscribe token claims: aud is empty")
        return audience
    auds = list(audience)
    if not auds or not all(isinstance(a, str) and a for a in auds):
        raise TokenError("invalid subscribe token claims: aud must be non-empty strings")
    return auds


class SubscribeTokenSigner:
    """Mints subscribe tokens with one key, and gives the node's verifying JWK.

    Build one with :meth:`hs256`, :meth:`es256` or :meth:`eddsa`. The key
    never appears in ``repr`` or in errors.
    """

    __slots__ = ("_alg", "_audience", "_jwk", "_key", "_kid", "_subject")
    _alg: Algorithm
    _audience: str | list[str] | None
    _jwk: dict[str, str]
    _key: Any
    _kid: str
    _subject: str | None

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("use SubscribeTokenSigner.hs256, .es256 or .eddsa")

    @classmethod
    def _new(
        cls,
        kid: str,
        alg: Algorithm,
        key: Any,
        jwk: dict[str, str],
        audience: Audience | None,
        subject: str | None,
    ) -> SubscribeTokenSigner:
        _check_kid(kid)
        self = object.__new__(cls)
        self._kid = kid
        self._alg = alg
        self._key = key
        self._jwk = jwk
        self._audience = None if audience is None else _audience_claim(audience)
        if subject is not None and (not isinstance(subject, str) or not subject):
            raise TokenError("invalid subscribe token claims: sub must be a non-empty string")
        self._subject = subject
        return self

    @classmethod
    def hs256(
        cls,
        kid: str,
        secret: bytes,
        *,
        audience: Audience | None = None,
        subject: str | None = None,
    ) -> SubscribeTokenSigner:
        """A signer with a shared HS256 secret of at least
        :data:`MIN_HS256_SECRET_LEN` random bytes (not a password). The node's
        JWKS gets the same secret as an ``oct`` key. ``audience`` and
        ``subject`` are the defaults of :meth:`sign`."""
        _check_kid(kid)
        if not isinstance(secret, bytes | bytearray):
            raise TokenError("HS256 secret must be bytes")
        if len(secret) < MIN_HS256_SECRET_LEN:
            raise TokenError(
                f"HS256 secret is {len(secret)} bytes; subscribe tokens need at least "
                f"{MIN_HS256_SECRET_LEN} random bytes"
            )
        key = bytes(secret)
        jwk = {"kty": "oct", "kid": kid, "alg": "HS256", "k": _b64url(key)}
        return cls._new(kid, "HS256", key, jwk, audience, subject)

    @classmethod
    def es256(
        cls,
        kid: str,
        private_key_pem: bytes | str,
        *,
        audience: Audience | None = None,
        subject: str | None = None,
    ) -> SubscribeTokenSigner:
        """A signer with an ES256 (ECDSA P-256) private key in PEM (PKCS#8 or
        SEC1, unencrypted), e.g. from ``openssl genpkey -algorithm EC -pkeyopt
        ec_paramgen_curve:P-256``. The node's JWKS gets only the public key."""
        _check_kid(kid)
        key = _load_private_key(private_key_pem, "ES256")
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise TokenError("ES256 key: not a private key on curve P-256")
        numbers = key.public_key().public_numbers()
        jwk = {
            "kty": "EC",
            "crv": "P-256",
            "kid": kid,
            "alg": "ES256",
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
        }
        return cls._new(kid, "ES256", key, jwk, audience, subject)

    @classmethod
    def eddsa(
        cls,
        kid: str,
        private_key_pem: bytes | str,
        *,
        audience: Audience | None = None,
        subject: str | None = None,
    ) -> SubscribeTokenSigner:
        """A signer with an Ed25519 private key in PKCS#8 PEM, e.g. from
        ``openssl genpkey -algorithm ed25519``. The node's JWKS gets only the
        public key (derived here; the Rust SDK takes it as a second PEM)."""
        _check_kid(kid)
        key = _load_private_key(private_key_pem, "EdDSA")
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise TokenError("EdDSA key: not an Ed25519 private key")
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        jwk = {"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "x": _b64url(public)}
        return cls._new(kid, "EdDSA", key, jwk, audience, subject)

    @property
    def kid(self) -> str:
        """The key id, the header's ``kid``."""
        return self._kid

    @property
    def alg(self) -> Algorithm:
        """The JWS algorithm: ``"HS256"``, ``"ES256"`` or ``"EdDSA"``."""
        return self._alg

    def __repr__(self) -> str:
        return (
            f"SubscribeTokenSigner(kid={self._kid!r}, alg={self._alg!r}, key=<redacted>, "
            f"audience={self._audience!r}, subject={self._subject!r})"
        )

    def __reduce__(self) -> Any:
        raise TypeError("a SubscribeTokenSigner holds a private key and is not picklable")

    def claims(
        self,
        entity: str,
        ids: Iterable[str],
        ttl_seconds: int,
        *,
        audience: Audience | None = None,
        subject: str | None = None,
        now: int | None = None,
    ) -> dict[str, Any]:
        """The claims :meth:`sign` would sign: ``iat`` now (or ``now``),
        ``exp`` ``iat + ttl_seconds``, ``audience`` and ``subject`` or else
        the signer's."""
        if (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, int)
            or not 1 <= ttl_seconds <= MAX_TOKEN_TTL_SECONDS
        ):
            raise TokenError(
                f"token lifetime {ttl_seconds!r} s is outside 1 ..= {MAX_TOKEN_TTL_SECONDS} "
                "(whole seconds)"
            )
        iat = int(time.time()) if now is None else now
        claims: dict[str, Any] = {
            "entity": entity,
            "ids": list(ids) if not isinstance(ids, str) else ids,
            "exp": iat + ttl_seconds,
            "iat": iat,
        }
        aud = audience if audience is not None else self._audience
        if aud is not None:
            claims["aud"] = aud
        sub = subject if subject is not None else self._subject
        if sub is not None:
            claims["sub"] = sub
        return claims

    def sign(
        self,
        entity: str,
        ids: Iterable[str],
        ttl_seconds: int,
        *,
        audience: Audience | None = None,
        subject: str | None = None,
    ) -> str:
        """A token granting ``ids`` of ``entity`` (``"*"``: any id) for
        ``ttl_seconds``, a whole number from 1 to
        :data:`MAX_TOKEN_TTL_SECONDS` (24 h). ``audience`` (``aud``) and
        ``subject`` (``sub``, the application's user id) override the
        signer's. The entity and the ids must not be empty."""
        return self.sign_claims(
            self.claims(entity, ids, ttl_seconds, audience=audience, subject=subject)
        )

    def sign_claims(self, claims: Mapping[str, Any]) -> str:
        """Signs ``claims`` as they are (``exp`` is not compared with the
        clock here), serialized in the SDKs' claim order. Only the claims of
        a subscribe token are accepted; ``entity``, ``ids`` and ``exp`` are
        required."""
        payload = _normalize(claims)
        return jwt.encode(
            payload,
            self._key,
            algorithm=self._alg,
            headers={"kid": self._kid},
            # {"typ","alg","kid"} in this order, as the Rust SDK writes them.
            sort_headers=False,
        )

    def jwk(self) -> dict[str, str]:
        """The node's verifying key as a JWK (RFC 7517): for HS256
        ``{"kty":"oct","kid","alg":"HS256","k"}`` (the secret itself), for
        ES256 the public ``{"kty":"EC","crv":"P-256","kid","alg":"ES256","x","y"}``,
        for EdDSA the public ``{"kty":"OKP","crv":"Ed25519","kid","alg":"EdDSA","x"}``."""
        return dict(self._jwk)


def _normalize(claims: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(claims) - set(CLAIM_ORDER)
    if unknown:
        raise TokenError(f"invalid subscribe token claims: unknown {sorted(unknown)}")
    entity = claims.get("entity")
    if not isinstance(entity, str) or not entity:
        raise TokenError("invalid subscribe token claims: entity is empty")
    ids = claims.get("ids")
    if isinstance(ids, str) or not isinstance(ids, Sequence) or not ids:
        raise TokenError("invalid subscribe token claims: ids is empty (or not a list)")
    if not all(isinstance(i, str) and i for i in ids):
        raise TokenError("invalid subscribe token claims: an id is empty (or not a string)")
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        required = name == "exp"
        if value is None and not required:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise TokenError(f"invalid subscribe token claims: {name} must be a positive integer")
    out: dict[str, Any] = {}
    for name in CLAIM_ORDER:
        value = claims.get(name)
        if value is None:
            continue
        if name == "ids":
            value = list(value)
        elif name == "aud":
            value = _audience_claim(value)
        elif name == "sub" and (not isinstance(value, str) or not value):
            raise TokenError("invalid subscribe token claims: sub must be a non-empty string")
        out[name] = value
    return out


def jwks(signers: Iterable[SubscribeTokenSigner]) -> str:
    """The JWKS document (``{"keys":[...]}``) of the signers' verifying keys,
    the file given to the node with ``--subscribe-token-jwks PATH``. Several
    signers (distinct ``kid``) let keys rotate: publish the new key, then sign
    with it, and drop the old one once its tokens expired."""
    return json.dumps({"keys": [s.jwk() for s in signers]}, indent=2)
