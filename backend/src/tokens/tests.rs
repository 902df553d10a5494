use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
use serde_json::{Value, json};

use super::*;

// Test-only keys, generated with openssl for these tests; never use them elsewhere.
const ES256_PRIVATE: &str = include_str!("../../tests/keys/es256-test-private.pem");
const ES256_OTHER_PRIVATE: &str = include_str!("../../tests/keys/es256-other-test-private.pem");
const ED25519_PRIVATE: &str = include_str!("../../tests/keys/ed25519-test-private.pem");
const ED25519_PUBLIC: &str = include_str!("../../tests/keys/ed25519-test-public.pem");

/// A test-only HS256 secret of exactly 32 bytes.
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

/// Fixed claims and the token HS256 with [`SECRET`] and kid `k1` makes of
/// them: the Python SDK's tests (clients/python/tests/test_tokens.py) expect
/// the very same token, so both SDKs lay out header and claims alike.
const VECTOR_TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.eyJlbnRpdHkiOiJpdGVtcyIsImlkcyI6WyIxMDEiLCIqIl0sImV4cCI6MjAwMDAwMDAwMCwibmJmIjoxNzAwMDAwMDAwLCJpYXQiOjE3MDAwMDAwMDAsImF1ZCI6InNob3AiLCJzdWIiOiJ1c2VyLTQyIn0.kwCO3gQw41re6HoB6GGKytXOQOwmM5ITFbySaLi5YuU";

/// The same claims signed EdDSA (deterministic) with the test Ed25519 key and
/// kid `k1`; the Python SDK's tests expect this token too.
const VECTOR_TOKEN_EDDSA: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJlbnRpdHkiOiJpdGVtcyIsImlkcyI6WyIxMDEiLCIqIl0sImV4cCI6MjAwMDAwMDAwMCwibmJmIjoxNzAwMDAwMDAwLCJpYXQiOjE3MDAwMDAwMDAsImF1ZCI6InNob3AiLCJzdWIiOiJ1c2VyLTQyIn0.D5UNhnrCHxYzlB4Z_Jc14zuSNdmNmZ4h4OcVVhyp9S1SmXhmHcrRpIUdR6JQXpiiGM9ydzXYSBqdQ7lSrhBhCw";

fn vector_claims() -> SubscribeClaims {
    SubscribeClaims {
        entity: "items".into(),
        ids: vec!["101".into(), "*".into()],
        exp: 2_000_000_000,
        nbf: Some(1_700_000_000),
        iat: Some(1_700_000_000),
        aud: Some("shop".into()),
        sub: Some("user-42".into()),
    }
}

fn signers() -> Vec<SubscribeTokenSigner> {
    vec![
        SubscribeTokenSigner::hs256("k-hs", SECRET).unwrap(),
        SubscribeTokenSigner::es256("k-es", ES256_PRIVATE.as_bytes()).unwrap(),
        SubscribeTokenSigner::eddsa(
            "k-ed",
            ED25519_PRIVATE.as_bytes(),
            ED25519_PUBLIC.as_bytes(),
        )
        .unwrap(),
    ]
}

/// Verifies `token` the way the node does: the key chosen by `kid` from the
/// JWKS, with `exp` required and the audience checked.
fn verify(
    jwks_json: &str,
    token: &str,
    audience: Option<&str>,
) -> jsonwebtoken::errors::Result<SubscribeClaims> {
    let set: JwkSet = serde_json::from_str(jwks_json).expect("JWKS parses");
    let header = decode_header(token)?;
    let jwk = set
        .find(header.kid.as_deref().expect("kid set"))
        .expect("kid in JWKS");
    let key = DecodingKey::from_jwk(jwk)?;
    let mut validation = Validation::new(header.alg);
    validation.set_required_spec_claims(&["exp"]);
    match audience {
        Some(aud) => validation.set_audience(&[aud]),
        None => validation.validate_aud = false,
    }
    Ok(decode::<SubscribeClaims>(token, &key, &validation)?.claims)
}

fn payload_json(token: &str) -> Value {
    assert_eq!(token.split('.').count(), 3);
    jsonwebtoken::dangerous::insecure_decode::<Value>(token)
        .unwrap()
        .claims
}

#[test]
fn round_trip_each_algorithm_with_exact_claims() {
    for signer in signers() {
        let signer = signer.audience("shop");
        let before = unix_now().unwrap();
        let token = signer
            .sign_as(
                "user-42",
                "items",
                &["101", "102"],
                Duration::from_secs(300),
            )
            .unwrap();
        let after = unix_now().unwrap();

        let header = decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(signer.kid()));
        assert_eq!(header.alg, signer.algorithm());

        let file = jwks(&[&signer]);
        let claims = verify(&file, &token, Some("shop")).unwrap();
        let iat = claims.iat.expect("iat set");
        assert!((before..=after).contains(&iat), "{}", signer.alg_name());
        assert_eq!(
            claims,
            SubscribeClaims {
                entity: "items".into(),
                ids: vec!["101".into(), "102".into()],
                exp: iat + 300,
                nbf: None,
                iat: Some(iat),
                aud: Some(Audience::One("shop".into())),
                sub: Some("user-42".into()),
            },
            "{}",
            signer.alg_name()
        );
        // Exactly these claims, nothing else.
        assert_eq!(
            payload_json(&token),
            json!({
                "entity": "items", "ids": ["101", "102"], "exp": iat + 300, "iat": iat,
                "aud": "shop", "sub": "user-42",
            })
        );
    }
}

#[test]
fn without_audience_and_subject_those_claims_are_absent() {
    let signer = SubscribeTokenSigner::hs256("k1", SECRET).unwrap();
    let token = signer
        .sign("items", &[ANY_ID], Duration::from_secs(60))
        .unwrap();
    let payload = payload_json(&token);
    let keys: Vec<&str> = payload
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec!["entity", "ids", "exp", "iat"];
    expected.sort_unstable();
    assert_eq!(keys, expected);
    assert_eq!(payload["ids"], json!(["*"]));
    let claims = verify(&jwks(&[&signer]), &token, None).unwrap();
    assert_eq!(claims.aud, None);
    assert_eq!(claims.sub, None);
}

#[test]
fn default_subject_and_audience_list() {
    let signer = SubscribeTokenSigner::hs256("k1", SECRET)
        .unwrap()
        .audience(vec!["shop".to_owned(), "admin".to_owned()])
        .subject("service");
    let token = signer
        .sign("items", &["1"], Duration::from_secs(60))
        .unwrap();
    let payload = payload_json(&token);
    assert_eq!(payload["aud"], json!(["shop", "admin"]));
    assert_eq!(payload["sub"], json!("service"));
    assert!(verify(&jwks(&[&signer]), &token, Some("admin")).is_ok());
    assert!(verify(&jwks(&[&signer]), &token, Some("other")).is_err());
}

#[test]
fn fixed_claims_give_the_shared_test_vector() {
    let signer = SubscribeTokenSigner::hs256("k1", SECRET).unwrap();
    let token = signer.sign_claims(&vector_claims()).unwrap();
    assert_eq!(token, VECTOR_TOKEN);
    // The layout, in order: header then claims.
    let mut parts = token.split('.');
    let header = parts.next().unwrap();
    let header: Value = serde_json::from_slice(&base64url_decode(header)).unwrap();
    assert_eq!(header, json!({"typ": "JWT", "alg": "HS256", "kid": "k1"}));
    let claims = String::from_utf8(base64url_decode(parts.next().unwrap())).unwrap();
    assert_eq!(
        claims,
        r#"{"entity":"items","ids":["101","*"],"exp":2000000000,"nbf":1700000000,"iat":1700000000,"aud":"shop","sub":"user-42"}"#
    );
    let decoded = verify(&jwks(&[&signer]), &token, Some("shop")).unwrap();
    assert_eq!(decoded, vector_claims());

    let ed =
        SubscribeTokenSigner::eddsa("k1", ED25519_PRIVATE.as_bytes(), ED25519_PUBLIC.as_bytes())
            .unwrap();
    assert_eq!(
        ed.sign_claims(&vector_claims()).unwrap(),
        VECTOR_TOKEN_EDDSA
    );
    assert_eq!(
        verify(&jwks(&[&ed]), VECTOR_TOKEN_EDDSA, Some("shop")).unwrap(),
        vector_claims()
    );
}

/// Decodes base64url through the library (an octet JWK's `k`).
fn base64url_decode(text: &str) -> Vec<u8> {
    let jwk: Jwk =
        serde_json::from_value(json!({"kty": "oct", "alg": "HS256", "k": text})).unwrap();
    DecodingKey::from_jwk(&jwk)
        .unwrap()
        .try_get_hmac_secret()
        .unwrap()
        .to_vec()
}

#[test]
fn tampered_tokens_fail() {
    for signer in signers() {
        let file = jwks(&[&signer]);
        let token = signer
            .sign("items", &["101"], Duration::from_secs(60))
            .unwrap();
        let [header, payload, signature]: [&str; 3] =
            token.split('.').collect::<Vec<_>>().try_into().unwrap();

        // Other claims under the original signature.
        let other = signer
            .sign("items", &["*"], Duration::from_secs(60))
            .unwrap();
        let other_payload = other.split('.').nth(1).unwrap();
        assert_ne!(other_payload, payload);
        let forged = format!("{header}.{other_payload}.{signature}");
        assert!(
            verify(&file, &forged, None).is_err(),
            "{}",
            signer.alg_name()
        );

        // A changed signature.
        let mut sig = signature.to_owned();
        let last = if sig.ends_with('A') { "B" } else { "A" };
        sig.replace_range(sig.len() - 1.., last);
        let forged = format!("{header}.{payload}.{sig}");
        assert!(
            verify(&file, &forged, None).is_err(),
            "{}",
            signer.alg_name()
        );

        assert!(verify(&file, &token, None).is_ok());
    }
}

#[test]
fn another_key_with_the_same_kid_fails() {
    let signer = SubscribeTokenSigner::es256("k1", ES256_PRIVATE.as_bytes()).unwrap();
    let other = SubscribeTokenSigner::es256("k1", ES256_OTHER_PRIVATE.as_bytes()).unwrap();
    let token = signer
        .sign("items", &["1"], Duration::from_secs(60))
        .unwrap();
    assert!(verify(&jwks(&[&other]), &token, None).is_err());
    let hs = SubscribeTokenSigner::hs256("k1", &[9u8; 32]).unwrap();
    let token = SubscribeTokenSigner::hs256("k1", SECRET)
        .unwrap()
        .sign("items", &["1"], Duration::from_secs(60))
        .unwrap();
    assert!(verify(&jwks(&[&hs]), &token, None).is_err());
}

#[test]
fn expired_token_fails() {
    let signer = SubscribeTokenSigner::hs256("k1", SECRET).unwrap();
    let mut claims = vector_claims();
    claims.exp = 1_000_000_000;
    claims.nbf = None;
    let token = signer.sign_claims(&claims).unwrap();
    assert!(verify(&jwks(&[&signer]), &token, Some("shop")).is_err());
}

#[test]
fn short_hs256_secret_is_refused() {
    let err = SubscribeTokenSigner::hs256("k1", &SECRET[..31]).unwrap_err();
    assert_eq!(err, TokenError::SecretTooShort { len: 31 });
    assert!(err.to_string().contains("at least 32"), "{err}");
    assert_eq!(
        SubscribeTokenSigner::hs256("k1", b"").unwrap_err(),
        TokenError::SecretTooShort { len: 0 }
    );
    assert!(SubscribeTokenSigner::hs256("k1", SECRET).is_ok());
}

#[test]
fn bad_keys_are_refused() {
    assert!(matches!(
        SubscribeTokenSigner::es256("k1", b"not a pem").unwrap_err(),
        TokenError::InvalidKey { alg: "ES256", .. }
    ));
    // An Ed25519 key is not a P-256 key.
    assert!(matches!(
        SubscribeTokenSigner::es256("k1", ED25519_PRIVATE.as_bytes()).unwrap_err(),
        TokenError::InvalidKey { alg: "ES256", .. }
    ));
    assert!(matches!(
        SubscribeTokenSigner::eddsa("k1", ES256_PRIVATE.as_bytes(), ED25519_PUBLIC.as_bytes())
            .unwrap_err(),
        TokenError::InvalidKey { alg: "EdDSA", .. }
    ));
    // The public key of another (test-only) pair.
    let other_public = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEAX/AQ+9KxbGk5RLqiNO7LVDGrjX5ABN0J85VBhYlZWXM=\n\
        -----END PUBLIC KEY-----\n";
    assert_eq!(
        SubscribeTokenSigner::eddsa("k1", ED25519_PRIVATE.as_bytes(), other_public.as_bytes())
            .unwrap_err(),
        TokenError::InvalidKey {
            alg: "EdDSA",
            reason: "the public key does not belong to the private key"
        }
    );
    assert_eq!(
        SubscribeTokenSigner::hs256("", SECRET).unwrap_err(),
        TokenError::EmptyKid
    );
}

#[test]
fn invalid_claims_and_ttls_are_refused() {
    let signer = SubscribeTokenSigner::hs256("k1", SECRET).unwrap();
    let ttl = Duration::from_secs(60);
    let none: [&str; 0] = [];
    assert!(matches!(
        signer.sign("", &["1"], ttl),
        Err(TokenError::InvalidClaims(_))
    ));
    assert!(matches!(
        signer.sign("items", &none, ttl),
        Err(TokenError::InvalidClaims(_))
    ));
    assert!(matches!(
        signer.sign("items", &["1", ""], ttl),
        Err(TokenError::InvalidClaims(_))
    ));
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(999),
        MAX_TOKEN_TTL + Duration::from_secs(1),
    ] {
        assert_eq!(
            signer.sign("items", &["1"], ttl),
            Err(TokenError::InvalidTtl { ttl })
        );
    }
    assert!(signer.sign("items", &["1"], MAX_TOKEN_TTL).is_ok());
    let mut claims = vector_claims();
    claims.exp = 0;
    assert!(matches!(
        signer.sign_claims(&claims),
        Err(TokenError::InvalidClaims(_))
    ));
    // ids as owned strings work too.
    let ids = vec!["1".to_owned(), "2".to_owned()];
    assert!(signer.sign("items", &ids, ttl).is_ok());
}

#[test]
fn jwks_holds_the_verifying_keys_only() {
    let all = signers();
    let refs: Vec<&SubscribeTokenSigner> = all.iter().collect();
    let file: Value = serde_json::from_str(&jwks(&refs)).unwrap();
    let keys = file["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);

    assert_eq!(
        keys[0],
        json!({"kty": "oct", "kid": "k-hs", "alg": "HS256",
               "k": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"})
    );

    let ec = keys[1].as_object().unwrap();
    let mut names: Vec<&str> = ec.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["alg", "crv", "kid", "kty", "x", "y"]);
    assert_eq!(ec["kty"], "EC");
    assert_eq!(ec["crv"], "P-256");
    assert_eq!(ec["alg"], "ES256");
    // The test key's public point (the Python SDK's tests expect it too).
    assert_eq!(ec["x"], "A-GMSPMn7O6HkFj4w4UJiyPOcFSr3yByMTl3FRUp5h8");
    assert_eq!(ec["y"], "7pOrJvwb3Vnst9baGhKK22Rg-_qK9zBkj7xeChATN-A");

    // The public key of the test pair.
    assert_eq!(
        keys[2],
        json!({"kty": "OKP", "crv": "Ed25519", "kid": "k-ed", "alg": "EdDSA",
               "x": "fZlFHCBo3_lSZZWFv4v_E-Xt5g8ovaG1wgyIWCoWbU4"})
    );
    // Every key parses as a JWK the library verifies with.
    for key in keys {
        let jwk: Jwk = serde_json::from_value(key.clone()).unwrap();
        DecodingKey::from_jwk(&jwk).unwrap();
    }
}

#[test]
fn debug_and_errors_redact_the_key() {
    let hs = SubscribeTokenSigner::hs256("k1", SECRET).unwrap();
    let debug = format!("{hs:?}");
    assert!(debug.contains("k1") && debug.contains("HS256") && debug.contains("<redacted>"));
    let k = hs.jwk()["k"].as_str().unwrap().to_owned();
    assert!(!debug.contains("0123456789abcdef"), "{debug}");
    assert!(!debug.contains(&k), "{debug}");
    assert!(!debug.contains("48, 49"), "{debug}"); // the secret's bytes

    let es = SubscribeTokenSigner::es256("k2", ES256_PRIVATE.as_bytes()).unwrap();
    let debug = format!("{es:?} {es:#?}");
    let pem_body = ES256_PRIVATE.lines().nth(1).unwrap();
    assert!(!debug.contains(pem_body), "{debug}");
    assert!(!debug.contains(&pem_body[..16]), "{debug}");

    let ed =
        SubscribeTokenSigner::eddsa("k3", ED25519_PRIVATE.as_bytes(), ED25519_PUBLIC.as_bytes())
            .unwrap();
    let debug = format!("{ed:#?}");
    assert!(!debug.contains(&ED25519_PRIVATE.lines().nth(1).unwrap()[..16]));

    // Errors name the problem, not the key.
    let err = SubscribeTokenSigner::hs256("k1", &SECRET[..20]).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("0123456789"));
    let err = SubscribeTokenSigner::es256("k1", ED25519_PRIVATE.as_bytes()).unwrap_err();
    assert!(!format!("{err} {err:?}").contains(&ED25519_PRIVATE.lines().nth(1).unwrap()[..16]));
}
