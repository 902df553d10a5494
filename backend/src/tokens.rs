//! Subscribe tokens: short-lived signed grants with which a browser subscribes
//! to `(entity, id)` keys without the node asking the backend first.
//!
//! A subscribe token is a compact JWS: header `alg` and `kid` (the node picks
//! its verification key by `kid` from the JWKS file it is started with,
//! `--subscribe-token-jwks PATH`), claims [`SubscribeClaims`] (the crate
//! documentation's "Subscribe tokens" section lists them).
//!
//! [`SubscribeTokenSigner`] mints them with HS256 (a shared secret of at least
//! 32 bytes), ES256 (a P-256 key) or EdDSA (an Ed25519 key), and writes the
//! verifying side for the node: [`SubscribeTokenSigner::jwk`] and [`jwks`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The shortest HS256 secret [`SubscribeTokenSigner::hs256`] accepts, in bytes
/// (RFC 7518 §3.2: a key at least as long as the hash output).
pub const MIN_HS256_SECRET_LEN: usize = 32;

/// The longest lifetime [`SubscribeTokenSigner::sign`] gives a token: 24 hours.
/// Tokens cannot be revoked before they expire, so keep lifetimes short (a few
/// minutes) and mint a new token when the browser reconnects.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The `ids` value that grants every id of the entity.
pub const ANY_ID: &str = "*";

/// Why a signer could not be built or a token not be signed. Messages never
/// contain key material.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// An HS256 secret shorter than [`MIN_HS256_SECRET_LEN`] bytes.
    #[error(
        "HS256 secret is {len} bytes; subscribe tokens need at least {MIN_HS256_SECRET_LEN} random bytes"
    )]
    SecretTooShort {
        /// The length of the secret given.
        len: usize,
    },
    /// A private or public key that could not be read (wrong format, wrong
    /// curve, or a public key not belonging to the private key).
    #[error("{alg} key: {reason}")]
    InvalidKey {
        /// The algorithm the key was given for.
        alg: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An empty `kid`.
    #[error("the key id (kid) must not be empty")]
    EmptyKid,
    /// Claims the node would refuse: an empty entity, no ids or an empty id,
    /// or an `exp` of zero.
    #[error("invalid subscribe token claims: {0}")]
    InvalidClaims(&'static str),
    /// A lifetime of less than a second or more than [`MAX_TOKEN_TTL`].
    #[error("token lifetime {ttl:?} is outside 1 s ..= 24 h")]
    InvalidTtl {
        /// The lifetime given.
        ttl: Duration,
    },
    /// The system clock is before the Unix epoch.
    #[error("system clock is before the Unix epoch")]
    Clock,
    /// Signing failed (the key does not fit the algorithm).
    #[error("signing the token failed: {0}")]
    Signing(String),
}

/// The `aud` claim: one audience or several.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// `"aud": "shop"`
    One(String),
    /// `"aud": ["shop", "admin"]`
    Many(Vec<String>),
}

impl From<&str> for Audience {
    fn from(aud: &str) -> Self {
        Audience::One(aud.to_owned())
    }
}

impl From<String> for Audience {
    fn from(aud: String) -> Self {
        Audience::One(aud)
    }
}

impl From<Vec<String>> for Audience {
    fn from(aud: Vec<String>) -> Self {
        Audience::Many(aud)
    }
}

/// The claims of a subscribe token, serialized in this field order; absent
/// optional claims are left out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeClaims {
    /// The entity granted.
    pub entity: String,
    /// The ids granted; [`ANY_ID`] (`"*"`) grants any id.
    pub ids: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// The audience; the node checks it when started with
    /// `--subscribe-token-audience`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// The application's user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

impl SubscribeClaims {
    fn validate(&self) -> Result<(), TokenError> {
        if self.entity.is_empty() {
            return Err(TokenError::InvalidClaims("entity is empty"));
        }
        if self.ids.is_empty() {
            return Err(TokenError::InvalidClaims("ids is empty"));
        }
        if self.ids.iter().any(String::is_empty) {
            return Err(TokenError::InvalidClaims("an id is empty"));
        }
        if self.exp == 0 {
            return Err(TokenError::InvalidClaims("exp is zero"));
        }
        Ok(())
    }
}

/// The key a signer signs with, and what the node verifies with.
#[derive(Clone)]
enum Key {
    /// The shared secret, base64url (the JWK's `k`) kept for [`SubscribeTokenSigner::jwk`].
    Hs256 { k: String },
    /// The public point, base64url.
    Es256 { x: String, y: String },
    /// The public key, base64url.
    EdDsa { x: String },
}

/// Mints subscribe tokens with one key, and gives the node's verifying JWK.
///
/// The key never appears in `Debug` output or in errors.
#[derive(Clone)]
pub struct SubscribeTokenSigner {
    kid: String,
    encoding: EncodingKey,
    key: Key,
    audience: Option<Audience>,
    subject: Option<String>,
}

impl fmt::Debug for SubscribeTokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscribeTokenSigner")
            .field("kid", &self.kid)
            .field("alg", &self.alg_name())
            .field("key", &"<redacted>")
            .field("audience", &self.audience)
            .field("subject", &self.subject)
            .finish()
    }
}

fn check_kid(kid: &str) -> Result<(), TokenError> {
    if kid.is_empty() {
        Err(TokenError::EmptyKid)
    } else {
        Ok(())
    }
}

/// base64url without padding, through the library's JWK encoding of a secret.
fn base64url(bytes: &[u8]) -> String {
    let jwk = Jwk::from_encoding_key(&EncodingKey::from_secret(bytes), Algorithm::HS256)
        .expect("an HMAC key always has a JWK");
    match jwk.algorithm {
        AlgorithmParameters::OctetKey(oct) => oct.value,
        _ => unreachable!("an HMAC key's JWK is an octet key"),
    }
}

fn unix_now() -> Result<u64, TokenError> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| TokenError::Clock)
}

impl SubscribeTokenSigner {
    /// A signer with a shared HS256 secret of at least [`MIN_HS256_SECRET_LEN`]
    /// bytes (use random bytes, not a password). The node's JWKS gets the
    /// same secret as an `oct` key, so keep that file as secret as this one.
    pub fn hs256(kid: impl Into<String>, secret: &[u8]) -> Result<Self, TokenError> {
        let kid = kid.into();
        check_kid(&kid)?;
        if secret.len() < MIN_HS256_SECRET_LEN {
            return Err(TokenError::SecretTooShort { len: secret.len() });
        }
        Ok(Self::new(
            kid,
            EncodingKey::from_secret(secret),
            Key::Hs256 {
                k: base64url(secret),
            },
        ))
    }

    /// A signer with an ES256 (ECDSA P-256) private key in PKCS#8 PEM
    /// (`-----BEGIN PRIVATE KEY-----`), e.g. from
    /// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`.
    pub fn es256(kid: impl Into<String>, private_key_pem: &[u8]) -> Result<Self, TokenError> {
        const BAD: TokenError = TokenError::InvalidKey {
            alg: "ES256",
            reason: "not a PKCS#8 PEM private key on curve P-256",
        };
        let kid = kid.into();
        check_kid(&kid)?;
        let encoding = EncodingKey::from_ec_pem(private_key_pem).map_err(|_| BAD)?;
        // Deriving the public point also checks the key is on P-256.
        let jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256).map_err(|_| BAD)?;
        let AlgorithmParameters::EllipticCurve(ec) = jwk.algorithm else {
            return Err(BAD);
        };
        Ok(Self::new(kid, encoding, Key::Es256 { x: ec.x, y: ec.y }))
    }

    /// A signer with an Ed25519 private key in PKCS#8 PEM, and its public key
    /// in SPKI PEM (`-----BEGIN PUBLIC KEY-----`) for the node's JWK, e.g. from
    /// `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout`. The
    /// pair is checked by signing and verifying a probe; a public key that is
    /// not the private key's is refused.
    pub fn eddsa(
        kid: impl Into<String>,
        private_key_pem: &[u8],
        public_key_pem: &[u8],
    ) -> Result<Self, TokenError> {
        let kid = kid.into();
        check_kid(&kid)?;
        let encoding =
            EncodingKey::from_ed_pem(private_key_pem).map_err(|_| TokenError::InvalidKey {
                alg: "EdDSA",
                reason: "not a PKCS#8 PEM Ed25519 private key",
            })?;
        let decoding =
            DecodingKey::from_ed_pem(public_key_pem).map_err(|_| TokenError::InvalidKey {
                alg: "EdDSA",
                reason: "not an SPKI PEM Ed25519 public key",
            })?;
        let mismatch = TokenError::InvalidKey {
            alg: "EdDSA",
            reason: "the public key does not belong to the private key",
        };
        let probe = b"entity-sync subscribe token key check";
        let signature =
            jsonwebtoken::crypto::sign(probe, &encoding, Algorithm::EdDSA).map_err(|_| {
                TokenError::InvalidKey {
                    alg: "EdDSA",
                    reason: "not a PKCS#8 PEM Ed25519 private key",
                }
            })?;
        let verified = jsonwebtoken::crypto::verify(&signature, probe, &decoding, Algorithm::EdDSA)
            .map_err(|_| mismatch.clone())?;
        if !verified || decoding.as_bytes().len() != 32 {
            return Err(mismatch);
        }
        let x = base64url(decoding.as_bytes());
        Ok(Self::new(kid, encoding, Key::EdDsa { x }))
    }

    fn new(kid: String, encoding: EncodingKey, key: Key) -> Self {
        Self {
            kid,
            encoding,
            key,
            audience: None,
            subject: None,
        }
    }

    /// Sets the `aud` claim of the tokens [`sign`](Self::sign) mints (one
    /// audience, or several with `Audience::Many`).
    #[must_use]
    pub fn audience(mut self, audience: impl Into<Audience>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// Sets the default `sub` claim of the tokens [`sign`](Self::sign) mints;
    /// [`sign_as`](Self::sign_as) gives one per token.
    #[must_use]
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// The key id, the header's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWS algorithm: `"HS256"`, `"ES256"` or `"EdDSA"`.
    pub fn alg_name(&self) -> &'static str {
        match self.key {
            Key::Hs256 { .. } => "HS256",
            Key::Es256 { .. } => "ES256",
            Key::EdDsa { .. } => "EdDSA",
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self.key {
            Key::Hs256 { .. } => Algorithm::HS256,
            Key::Es256 { .. } => Algorithm::ES256,
            Key::EdDsa { .. } => Algorithm::EdDSA,
        }
    }

    /// The claims [`sign`](Self::sign) would sign now: `iat` now, `exp` now
    /// plus `ttl` (whole seconds), the signer's audience and subject.
    ///
    /// `ttl` must be at least one second and at most [`MAX_TOKEN_TTL`] (24 h).
    pub fn claims(
        &self,
        entity: &str,
        ids: &[impl AsRef<str>],
        ttl: Duration,
    ) -> Result<SubscribeClaims, TokenError> {
        if ttl < Duration::from_secs(1) || ttl > MAX_TOKEN_TTL {
            return Err(TokenError::InvalidTtl { ttl });
        }
        let now = unix_now()?;
        Ok(SubscribeClaims {
            entity: entity.to_owned(),
            ids: ids.iter().map(|id| id.as_ref().to_owned()).collect(),
            exp: now + ttl.as_secs(),
            nbf: None,
            iat: Some(now),
            aud: self.audience.clone(),
            sub: self.subject.clone(),
        })
    }

    /// A token granting `ids` of `entity` (`"*"`: any id) for `ttl`, at least
    /// one second and at most [`MAX_TOKEN_TTL`] (24 h), with the signer's
    /// audience and subject. The entity and the ids must not be empty.
    pub fn sign(
        &self,
        entity: &str,
        ids: &[impl AsRef<str>],
        ttl: Duration,
    ) -> Result<String, TokenError> {
        self.sign_claims(&self.claims(entity, ids, ttl)?)
    }

    /// [`sign`](Self::sign) for the user `subject` (the `sub` claim).
    pub fn sign_as(
        &self,
        subject: &str,
        entity: &str,
        ids: &[impl AsRef<str>],
        ttl: Duration,
    ) -> Result<String, TokenError> {
        let mut claims = self.claims(entity, ids, ttl)?;
        claims.sub = Some(subject.to_owned());
        self.sign_claims(&claims)
    }

    /// Signs `claims` as they are (their `exp` is not compared with the clock
    /// here). The entity and the ids must not be empty, nor `exp` zero.
    pub fn sign_claims(&self, claims: &SubscribeClaims) -> Result<String, TokenError> {
        claims.validate()?;
        let mut header = Header::new(self.algorithm());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            // The error's kind only: it never holds key bytes.
            .map_err(|e| TokenError::Signing(format!("{:?}", e.kind())))
    }

    /// The node's verifying key as a JWK (RFC 7517): for HS256
    /// `{"kty":"oct","kid","alg":"HS256","k"}` (the secret itself), for ES256
    /// the public `{"kty":"EC","crv":"P-256","kid","alg":"ES256","x","y"}`,
    /// for EdDSA the public `{"kty":"OKP","crv":"Ed25519","kid","alg":"EdDSA","x"}`.
    pub fn jwk(&self) -> Value {
        match &self.key {
            Key::Hs256 { k } => json!({"kty": "oct", "kid": self.kid, "alg": "HS256", "k": k}),
            Key::Es256 { x, y } => json!({
                "kty": "EC", "crv": "P-256", "kid": self.kid, "alg": "ES256", "x": x, "y": y,
            }),
            Key::EdDsa { x } => json!({
                "kty": "OKP", "crv": "Ed25519", "kid": self.kid, "alg": "EdDSA", "x": x,
            }),
        }
    }
}

/// The JWKS document (`{"keys":[...]}`) of the signers' verifying keys, the
/// file given to the node with `--subscribe-token-jwks PATH`. Several signers
/// (distinct `kid`s) let keys be rotated: add the new key, deploy, then sign
/// with it, and drop the old one once its tokens expired.
pub fn jwks(signers: &[&SubscribeTokenSigner]) -> String {
    let keys: Vec<Value> = signers.iter().map(|s| s.jwk()).collect();
    serde_json::to_string_pretty(&json!({ "keys": keys })).expect("a JSON value serializes")
}

#[cfg(test)]
mod tests;
