//! Signed subscribe tokens: the keys that verify them (a JWKS file, re-read
//! on SIGHUP) and the verification of one token for one key.
//!
//! A token is a compact JWS the application signs. Its header names the key
//! (`kid`) and the algorithm, which must be the one of that key's type (so a
//! public key is never used as an HMAC secret, and `none` never verifies).
//! Its claims say which `entity` and `ids` it opens (`"*"`: any id), until
//! when (`exp`, required), from when (`nbf`, optional) and, when the node is
//! given an audience, for whom (`aud`). The token itself never reaches a log,
//! a metric or an error message; `sub` (the application's user id) may be
//! logged at debug level.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm},
};
use serde::Deserialize;

use crate::key::Key;

/// Largest token accepted, in bytes: an RS256 token with a long `ids` list
/// fits; verifying is never asked of more.
pub(crate) const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Seconds of leeway for `exp` and `nbf` (clocks of the signer and the node
/// disagree a little).
pub(crate) const LEEWAY_SECS: u64 = 5;
/// Most keys a JWKS file may hold.
const MAX_KEYS: usize = 64;
/// Largest JWKS file read.
const MAX_JWKS_BYTES: u64 = 1024 * 1024;
/// Shortest HS256 secret accepted (the hash's size).
const MIN_HMAC_BYTES: usize = 32;
/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted, in bits: verification work grows with it.
const MAX_RSA_BITS: usize = 8192;

/// Why a JWKS file was not loaded. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read the subscribe-token JWKS {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the subscribe-token JWKS {path} is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("the subscribe-token JWKS {path} is not a JWK set: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("the subscribe-token JWKS {path}: key {index}: {reason}")]
    Key {
        path: PathBuf,
        index: usize,
        reason: String,
    },
}

/// A token refused: `token_invalid` or `token_expired`, with a fixed
/// message safe to show the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Invalid(&'static str),
    Expired,
}

impl Refused {
    /// The message of the error frame.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Refused::Invalid(why) => why,
            Refused::Expired => "the subscribe token expired; subscribe again with a fresh one",
        }
    }
}

/// What a valid token grants: the key until `exp` (seconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) exp: u64,
    /// The application's user id, for debug logs.
    pub(crate) sub: Option<Box<str>>,
}

/// One verification key.
struct VerifyingKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The keys of one read of the file, by `kid`.
struct KeySet {
    keys: HashMap<String, VerifyingKey>,
}

/// The node's subscribe-token verifier: cheap to clone, reloadable.
#[derive(Clone)]
pub(crate) struct SubscribeTokens {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    audience: Option<String>,
    keys: RwLock<Arc<KeySet>>,
    /// Goes up with every reload: what a connection remembers of a token
    /// verified with older keys is stale.
    generation: AtomicU64,
}

/// The claims the node reads. `exp` is read here too (besides the library's
/// own check) to know when a held key's token runs out.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    exp: Option<f64>,
    entity: String,
    ids: Vec<String>,
    #[serde(default)]
    sub: Option<String>,
}

impl SubscribeTokens {
    /// Loads the keys of `path`; `audience`: what `aud` must contain.
    pub(crate) fn load(path: &Path, audience: Option<String>) -> Result<Self, JwksError> {
        let keys = read_jwks(path)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                audience,
                keys: RwLock::new(Arc::new(keys)),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// Reads the file again (SIGHUP): new keys verify at once, removed ones
    /// no longer do. A file that does not load leaves the keys in force.
    /// Returns how many keys are in force.
    pub(crate) fn reload(&self) -> Result<usize, JwksError> {
        let keys = read_jwks(&self.inner.path)?;
        let count = keys.keys.len();
        *self.inner.keys.write().unwrap() = Arc::new(keys);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!(path = %self.inner.path.display(), keys = count, "subscribe-token keys reloaded");
        Ok(count)
    }

    /// Which read of the file the keys in force come from.
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Verifies `token`'s signature and time claims now; what it opens is
    /// checked per key by [`Verified::grant`].
    pub(crate) fn verify(&self, token: &str) -> Result<Verified, Refused> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refused::Invalid(
                "the subscribe token is larger than 8192 bytes",
            ));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Refused::Invalid("the subscribe token is not a compact JWS"))?;
        let keys = self.inner.keys.read().unwrap().clone();
        let verifying = match &header.kid {
            Some(kid) => keys.keys.get(kid),
            // Without a kid, the one key of a single-key set.
            None if keys.keys.len() == 1 => keys.keys.values().next(),
            None => None,
        }
        .ok_or(Refused::Invalid(
            "the subscribe token names no key this node knows (kid)",
        ))?;
        if header.alg != verifying.algorithm {
            return Err(Refused::Invalid(ALG_MISMATCH));
        }
        let mut validation = Validation::new(verifying.algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &self.inner.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.set_required_spec_claims(&["exp", "aud"]);
            }
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, &verifying.key, &validation)
            .map_err(|err| refusal(err.kind()))?;
        let claims = data.claims;
        let exp = claims.exp.ok_or(Refused::Invalid(NO_EXP))?;
        if !exp.is_finite() || exp < 0.0 {
            return Err(Refused::Invalid("the subscribe token's exp is not a time"));
        }
        Ok(Verified {
            exp: exp as u64,
            entity: claims.entity,
            ids: claims.ids,
            sub: claims.sub.map(String::into_boxed_str),
        })
    }
}

/// A token whose signature verified: what it opens, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    exp: u64,
    entity: String,
    ids: Vec<String>,
    sub: Option<Box<str>>,
}

impl Verified {
    /// What it grants for `key` at `now` (seconds since the epoch).
    pub(crate) fn grant(&self, key: &Key, now: u64) -> Result<Grant, Refused> {
        if self.entity != *key.entity {
            return Err(Refused::Invalid(
                "the subscribe token is for another entity",
            ));
        }
        if !self.ids.iter().any(|id| id == "*" || *id == *key.id) {
            return Err(Refused::Invalid("the subscribe token is for other ids"));
        }
        if now > self.exp.saturating_add(LEEWAY_SECS) {
            return Err(Refused::Expired);
        }
        Ok(Grant {
            exp: self.exp,
            sub: self.sub.clone(),
        })
    }
}

/// A time claim's refusal may not hold a moment later: not remembered.
impl Refused {
    pub(crate) fn depends_on_time(self) -> bool {
        matches!(self, Refused::Expired | Refused::Invalid(NOT_YET_VALID))
    }
}

const ALG_MISMATCH: &str = "the subscribe token's alg is not the one of its key";
const NO_EXP: &str = "the subscribe token has no exp";
const NOT_YET_VALID: &str = "the subscribe token is not valid yet (nbf)";

/// The refusal for a library error (its text may quote the token: never shown).
fn refusal(kind: &ErrorKind) -> Refused {
    match kind {
        ErrorKind::ExpiredSignature => Refused::Expired,
        ErrorKind::ImmatureSignature => Refused::Invalid(NOT_YET_VALID),
        ErrorKind::InvalidAudience => {
            Refused::Invalid("the subscribe token is for another audience")
        }
        ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => Refused::Invalid(NO_EXP),
        ErrorKind::MissingRequiredClaim(_) => {
            Refused::Invalid("the subscribe token names no audience (aud)")
        }
        ErrorKind::InvalidSignature => {
            Refused::Invalid("the subscribe token's signature does not verify")
        }
        ErrorKind::InvalidAlgorithm => Refused::Invalid(ALG_MISMATCH),
        ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => Refused::Invalid(
            "the subscribe token's claims are not entity (string), ids (strings), exp (number)",
        ),
        _ => Refused::Invalid("the subscribe token is not a valid compact JWS"),
    }
}

/// Seconds since the epoch, now.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_jwks(path: &Path) -> Result<KeySet, JwksError> {
    let read = |source| JwksError::Read {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = std::fs::read(path).map_err(read)?;
    parse_jwks(&text).map_err(|(index, reason)| match index {
        None => JwksError::Parse {
            path: path.to_owned(),
            reason,
        },
        Some(index) => JwksError::Key {
            path: path.to_owned(),
            index,
            reason,
        },
    })
}

/// Parses a JWK set; an error names the key (by index) when it is one key's.
fn parse_jwks(text: &[u8]) -> Result<KeySet, (Option<usize>, String)> {
    // Errors say where, never what: serde's messages can quote the input.
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|err| {
        (
            None,
            format!("not JSON (line {}, column {})", err.line(), err.column()),
        )
    })?;
    let raw_keys = value
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .ok_or((None, "no \"keys\" array".to_owned()))?;
    if raw_keys.is_empty() {
        return Err((None, "no keys".to_owned()));
    }
    if raw_keys.len() > MAX_KEYS {
        return Err((None, format!("more than {MAX_KEYS} keys")));
    }
    let mut keys = HashMap::new();
    let mut seen = HashSet::new();
    for (index, raw) in raw_keys.iter().enumerate() {
        let fail = |reason: String| (Some(index), reason);
        let kty = raw.get("kty").and_then(serde_json::Value::as_str);
        if kty != Some("oct") && raw.get("d").is_some() {
            return Err(fail(
                "holds a private key (\"d\"): give the node the public key only".to_owned(),
            ));
        }
        let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|_| {
            fail("not a JWK of a supported type (oct, EC P-256, RSA, OKP Ed25519)".to_owned())
        })?;
        let kid = jwk
            .common
            .key_id
            .clone()
            .filter(|kid| !kid.is_empty())
            .ok_or_else(|| fail("has no \"kid\"".to_owned()))?;
        if !seen.insert(kid.clone()) {
            return Err(fail(format!("kid {kid:?} appears twice")));
        }
        let algorithm =
            algorithm_of(&jwk).map_err(|reason| fail(format!("kid {kid:?}: {reason}")))?;
        if let Some(named) = jwk.common.key_algorithm
            && key_algorithm(algorithm) != Some(named)
        {
            return Err(fail(format!(
                "kid {kid:?}: \"alg\" is not the algorithm of its key type ({algorithm:?})"
            )));
        }
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|_| fail(format!("kid {kid:?}: the key material does not decode")))?;
        if algorithm == Algorithm::HS256 && key.as_bytes().len() < MIN_HMAC_BYTES {
            return Err(fail(format!(
                "kid {kid:?}: an HS256 secret needs at least {MIN_HMAC_BYTES} bytes"
            )));
        }
        keys.insert(kid, VerifyingKey { algorithm, key });
    }
    Ok(KeySet { keys })
}

/// The one algorithm a key of this type verifies.
fn algorithm_of(jwk: &Jwk) -> Result<Algorithm, String> {
    match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => Ok(Algorithm::HS256),
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Ok(Algorithm::ES256)
        }
        AlgorithmParameters::EllipticCurve(_) => Err("EC keys must be on P-256 (ES256)".into()),
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Ok(Algorithm::EdDSA)
        }
        AlgorithmParameters::OctetKeyPair(_) => Err("OKP keys must be Ed25519 (EdDSA)".into()),
        AlgorithmParameters::RSA(rsa) => {
            // base64url without padding: 4 characters per 3 bytes.
            let bits = rsa.n.trim_end_matches('=').len() * 6;
            if bits < MIN_RSA_BITS - 8 {
                Err(format!("RSA keys need at least {MIN_RSA_BITS} bits"))
            } else if bits > MAX_RSA_BITS + 8 {
                Err(format!("RSA keys may have at most {MAX_RSA_BITS} bits"))
            } else {
                Ok(Algorithm::RS256)
            }
        }
    }
}

fn key_algorithm(algorithm: Algorithm) -> Option<KeyAlgorithm> {
    match algorithm {
        Algorithm::HS256 => Some(KeyAlgorithm::HS256),
        Algorithm::ES256 => Some(KeyAlgorithm::ES256),
        Algorithm::RS256 => Some(KeyAlgorithm::RS256),
        Algorithm::EdDSA => Some(KeyAlgorithm::EdDSA),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn tokens(jwks: serde_json::Value, audience: Option<&str>) -> SubscribeTokens {
        let dir = std::env::temp_dir().join(format!(
            "es-jwks-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&dir, jwks.to_string()).unwrap();
        let tokens = SubscribeTokens::load(&dir, audience.map(str::to_owned)).unwrap();
        std::fs::remove_file(&dir).unwrap();
        tokens
    }

    fn hs_set() -> serde_json::Value {
        json!({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": b64(SECRET)}]})
    }

    fn sign(kid: Option<&str>, secret: &[u8], claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn key(id: &str) -> Key {
        Key::new("items", id).unwrap()
    }

    /// Verifies `token` and grants `key` now.
    fn check(tokens: &SubscribeTokens, token: &str, key: &Key) -> Result<Grant, Refused> {
        tokens.verify(token).and_then(|v| v.grant(key, unix_now()))
    }

    #[test]
    fn a_valid_token_grants_its_keys_until_exp() {
        let tokens = tokens(hs_set(), None);
        let exp = unix_now() + 60;
        let token = sign(
            Some("k1"),
            SECRET,
            json!({"exp": exp, "entity": "items", "ids": ["1", "2"], "sub": "u7"}),
        );
        let grant = check(&tokens, &token, &key("2")).unwrap();
        assert_eq!(grant.exp, exp);
        assert_eq!(grant.sub.as_deref(), Some("u7"));
        assert_eq!(
            check(&tokens, &token, &key("3")),
            Err(Refused::Invalid("the subscribe token is for other ids"))
        );
        assert_eq!(
            check(&tokens, &token, &Key::new("lists", "1").unwrap()),
            Err(Refused::Invalid(
                "the subscribe token is for another entity"
            ))
        );
        let any = sign(
            Some("k1"),
            SECRET,
            json!({"exp": exp, "entity": "items", "ids": ["*"]}),
        );
        assert!(check(&tokens, &any, &key("whatever")).is_ok());
    }

    #[test]
    fn time_claims_have_a_few_seconds_of_leeway() {
        let tokens = tokens(hs_set(), None);
        let now = unix_now();
        let claims = |extra: serde_json::Value| {
            let mut c = json!({"entity": "items", "ids": ["1"]});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            sign(Some("k1"), SECRET, c)
        };
        assert_eq!(
            check(&tokens, &claims(json!({"exp": now - 30})), &key("1")),
            Err(Refused::Expired)
        );
        assert!(check(&tokens, &claims(json!({"exp": now - 2})), &key("1")).is_ok());
        assert_eq!(
            check(
                &tokens,
                &claims(json!({"exp": now + 60, "nbf": now + 30})),
                &key("1")
            ),
            Err(Refused::Invalid(
                "the subscribe token is not valid yet (nbf)"
            ))
        );
        assert!(
            check(
                &tokens,
                &claims(json!({"exp": now + 60, "nbf": now + 2})),
                &key("1")
            )
            .is_ok()
        );
        assert_eq!(
            check(&tokens, &claims(json!({})), &key("1")),
            Err(Refused::Invalid("the subscribe token has no exp"))
        );
        assert!(matches!(
            check(&tokens, &claims(json!({"exp": "soon"})), &key("1")),
            Err(Refused::Invalid(_))
        ));
    }

    #[test]
    fn tampered_unknown_kid_wrong_alg_and_wrong_audience_are_invalid() {
        let tokens = tokens(hs_set(), Some("app"));
        let exp = unix_now() + 60;
        let good = sign(
            Some("k1"),
            SECRET,
            json!({"exp": exp, "entity": "items", "ids": ["1"], "aud": "app"}),
        );
        assert!(check(&tokens, &good, &key("1")).is_ok());
        // Another payload under the same signature.
        let forged_payload = sign(
            Some("k1"),
            SECRET,
            json!({"exp": exp, "entity": "items", "ids": ["*"], "aud": "app"}),
        );
        let parts: Vec<&str> = good.split('.').collect();
        let other: Vec<&str> = forged_payload.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], other[1], parts[2]);
        assert_eq!(
            check(&tokens, &tampered, &key("9")),
            Err(Refused::Invalid(
                "the subscribe token's signature does not verify"
            ))
        );
        let wrong_secret = sign(
            Some("k1"),
            b"another-secret-another-secret-xx",
            json!({"exp": exp, "entity": "items", "ids": ["1"], "aud": "app"}),
        );
        assert_eq!(
            check(&tokens, &wrong_secret, &key("1")),
            Err(Refused::Invalid(
                "the subscribe token's signature does not verify"
            ))
        );
        let unknown = sign(
            Some("k2"),
            SECRET,
            json!({"exp": exp, "entity": "items", "ids": ["1"], "aud": "app"}),
        );
        assert_eq!(
            check(&tokens, &unknown, &key("1")),
            Err(Refused::Invalid(
                "the subscribe token names no key this node knows (kid)"
            ))
        );
        let other_aud = sign(
            Some("k1"),
            SECRET,
            json!({"exp": exp, "entity": "items", "ids": ["1"], "aud": "other"}),
        );
        assert_eq!(
            check(&tokens, &other_aud, &key("1")),
            Err(Refused::Invalid(
                "the subscribe token is for another audience"
            ))
        );
        // alg none: header {"alg":"none"}, no signature.
        let none = format!("eyJhbGciOiJub25lIiwia2lkIjoiazEifQ.{}.", parts[1]);
        assert!(matches!(
            check(&tokens, &none, &key("1")),
            Err(Refused::Invalid(_))
        ));
        assert!(matches!(
            check(&tokens, "x.y.z", &key("1")),
            Err(Refused::Invalid(_))
        ));
        assert!(matches!(
            check(&tokens, "", &key("1")),
            Err(Refused::Invalid(_))
        ));
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            check(&tokens, &huge, &key("1")),
            Err(Refused::Invalid(
                "the subscribe token is larger than 8192 bytes"
            ))
        );
    }

    #[test]
    fn a_jwks_is_refused_with_a_reason_that_quotes_no_key() {
        let refused = |set: serde_json::Value| match parse_jwks(set.to_string().as_bytes()) {
            Ok(_) => panic!("accepted {set}"),
            Err((_, reason)) => reason,
        };
        assert_eq!(refused(json!({})), "no \"keys\" array");
        assert_eq!(refused(json!({"keys": []})), "no keys");
        assert_eq!(
            refused(json!({"keys": [{"kty": "oct", "k": b64(SECRET)}]})),
            "has no \"kid\""
        );
        let short = refused(json!({"keys": [{"kty": "oct", "kid": "a", "k": b64(b"short")}]}));
        assert_eq!(short, "kid \"a\": an HS256 secret needs at least 32 bytes");
        let twice = json!({"kty": "oct", "kid": "a", "k": b64(SECRET)});
        assert_eq!(
            refused(json!({"keys": [twice, twice]})),
            "kid \"a\" appears twice"
        );
        let wrong_alg =
            json!({"keys": [{"kty": "oct", "kid": "a", "alg": "RS256", "k": b64(SECRET)}]});
        assert!(refused(wrong_alg).contains("\"alg\" is not the algorithm"));
        let private = json!({"keys": [{"kty": "EC", "kid": "e", "crv": "P-256", "x": "AA", "y": "AA", "d": "AA"}]});
        assert!(refused(private).contains("private key"));
        let not_json = parse_jwks(b"{\"keys\": [sec").err().unwrap().1;
        assert!(not_json.starts_with("not JSON"), "{not_json}");
        assert!(!not_json.contains("sec"));
    }
}
