//! Subscribe tokens: writes the JWKS file a node verifies them with and prints
//! a token for a browser.
//!
//! ```sh
//! cargo run -p entity-sync-backend --example subscribe_token -- [PRIVATE_KEY_PEM [JWKS_PATH]]
//! ```
//!
//! `PRIVATE_KEY_PEM` is an ES256 (P-256) private key in PKCS#8 PEM, e.g. from
//! `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem`;
//! without it the example signs with the crate's public TEST key
//! (`backend/tests/keys/`), fit for trying things out only. The JWKS (public
//! key only) goes to `JWKS_PATH`, by default `subscribe-token-jwks.json` in
//! the system's temporary directory. Then start the node with
//! `--subscribe-token-jwks JWKS_PATH --subscribe-token-audience shop`.

use std::time::Duration;

use entity_sync_backend::{SubscribeTokenSigner, jwks};

/// A test-only key: public, in the repository; never sign real tokens with it.
const TEST_KEY: &str = include_str!("../tests/keys/es256-test-private.pem");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let key = match args.next() {
        Some(path) => std::fs::read(path)?,
        None => {
            eprintln!("no key given: signing with the public TEST key");
            TEST_KEY.as_bytes().to_vec()
        }
    };
    let jwks_path = args
        .next()
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join("subscribe-token-jwks.json"));

    // The kid names the key in the node's JWKS; a new key gets a new kid.
    let signer = SubscribeTokenSigner::es256("2026-12-es256", &key)?.audience("shop");
    std::fs::write(&jwks_path, jwks(&[&signer]))?;
    eprintln!("JWKS written to {}", jwks_path.display());
    eprintln!(
        "start the node with --subscribe-token-jwks {} --subscribe-token-audience shop",
        jwks_path.display()
    );

    // After the application authenticated user 42 and decided what it may read:
    let token = signer.sign_as(
        "user-42",
        "items",
        &["101", "102"],
        Duration::from_secs(300),
    )?;
    println!("{token}");
    Ok(())
}
