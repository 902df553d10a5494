//! The backend side of entity-sync, in one call each: serve your entities'
//! rows to the nodes, and tell them when rows change.
//!
//! A backend keeps a `Resolve` stream open to a node. The node asks it for the
//! current rows of `(entity, id)` keys whenever a browser subscribes or a key
//! changes; the backend answers from its database. After it changed data, the
//! backend calls `Notify` with the changed keys, and every subscribed browser
//! is pushed the fresh rows.
//!
//! ```no_run
//! use entity_sync_backend::{Answer, Answers, Backend, FetchMode, Notifier, ResolveRequest};
//!
//! #[derive(serde::Serialize)]
//! struct Item { id: String, name: String }
//!
//! async fn items(req: ResolveRequest) -> Answers {
//!     req.ids()
//!         .iter()
//!         .map(|id| (id.clone(), Answer::row(Item { id: id.clone(), name: "milk".into() })))
//!         .collect()
//! }
//!
//! # async fn run() -> Result<(), entity_sync_backend::Error> {
//! let endpoint = "http://127.0.0.1:50051";
//! // Serves until Ctrl-C; reconnects and registers again whenever the node goes away.
//! let backend = Backend::builder(endpoint)
//!     .name("grocery")
//!     .entity("items", FetchMode::Shared, items)
//!     .max_in_flight(64)
//!     .build()?;
//! tokio::spawn(backend.serve(async { tokio::signal::ctrl_c().await.ok(); }));
//!
//! let notifier = Notifier::connect(endpoint).await?;
//! notifier.notify([("items", "101")]).await?;
//! # Ok(()) }
//! ```
//!
//! # Subscribe tokens
//!
//! With a subscribe token the browser subscribes to `(entity, id)` keys
//! without the node asking the backend first: the backend signs which keys a
//! user may read, for a few minutes, and the node verifies the signature with
//! the JWKS file it was started with (`--subscribe-token-jwks PATH`, keys
//! chosen by `kid`). [`SubscribeTokenSigner`] mints tokens with HS256 (a
//! secret of at least 32 random bytes), ES256 (a P-256 private key in PKCS#8
//! PEM) or EdDSA (an Ed25519 private key in PKCS#8 PEM, with its public key);
//! [`jwks`] writes the node's file: the shared secret for HS256 (keep that
//! file secret), only the public key for ES256 and EdDSA.
//!
//! ```
//! use std::time::Duration;
//! use entity_sync_backend::{SubscribeTokenSigner, jwks};
//!
//! # fn main() -> Result<(), entity_sync_backend::TokenError> {
//! let secret = [7u8; 32]; // in production: 32 random bytes from your secret store
//! let signer = SubscribeTokenSigner::hs256("k1", &secret)?.audience("shop");
//! // The file the node is started with: --subscribe-token-jwks subscribe-keys.json
//! let file = jwks(&[&signer]);
//! assert!(file.contains(r#""kid": "k1""#));
//! // Handed to the browser of user 42: items 101 and 102 for 5 minutes.
//! let token = signer.sign_as("user-42", "items", &["101", "102"], Duration::from_secs(300))?;
//! assert_eq!(token.split('.').count(), 3);
//! # Ok(()) }
//! ```
//!
//! The token's header has `alg` and `kid`; its claims, in this order:
//!
//! | claim    | type                   | meaning                                                   |
//! |----------|------------------------|-----------------------------------------------------------|
//! | `entity` | string                 | the entity granted                                        |
//! | `ids`    | array of strings       | the ids granted; `"*"` ([`ANY_ID`]) stands for any id     |
//! | `exp`    | integer, s since epoch | expiry, required: `sign` sets now + ttl, ttl 1 s ..= 24 h ([`MAX_TOKEN_TTL`]) |
//! | `nbf`    | integer, s since epoch | not before, optional (only through `sign_claims`)         |
//! | `iat`    | integer, s since epoch | issued at: `sign` sets it                                 |
//! | `aud`    | string or array        | [`SubscribeTokenSigner::audience`]; the node checks it when started with `--subscribe-token-audience AUD` |
//! | `sub`    | string                 | the application's user id ([`SubscribeTokenSigner::sign_as`], [`SubscribeTokenSigner::subject`]); the node may log it |
//!
//! `cargo run -p entity-sync-backend --example subscribe_token` writes a JWKS
//! file and prints a token (`backend/examples/subscribe_token.rs`).
//!
//! # Layout
//!
//! - [`Backend`] / [`BackendBuilder`] (module `backend`): registers the
//!   entities, answers requests concurrently, drains and reconnects.
//! - [`Notifier`] (module `notifier`): `Notify` with retries under one idempotency key.
//! - [`ResolveRequest`], [`Answer`], [`Answers`], [`PassThrough`] (module
//!   `request`): what a handler is given and what it gives back.
//! - [`Handler`], [`PassThroughHandler`] (module `handler`): the handler traits
//!   closures and `async fn`s implement.
//! - [`Error`], [`ErrorKind`] (module `error`): failures, with a kind callers match on.
//! - module `connect`: the node endpoint both clients are built from.
//! - [`Tls`] (module `tls`, feature `tls`, on by default): the CA, client
//!   certificate and name of a TLS connection to a node (`https://` URLs).
//! - [`Backoff`] (module `backoff`): jittered exponential delays between attempts,
//!   the SDK's own retries' and a utility for callers' retry loops.
//! - [`SubscribeTokenSigner`], [`jwks`], [`SubscribeClaims`], [`TokenError`]
//!   (module `tokens`): subscribe tokens a browser subscribes with without
//!   the node asking the backend, and the JWKS file the node verifies them with.
//! - [`proto`]: the generated `entitysync.v1` client and messages.

mod backend;
mod backoff;
mod connect;
mod error;
mod handler;
mod notifier;
mod request;
#[cfg(feature = "tls")]
mod tls;
mod tokens;

pub use backend::{
    Backend, BackendBuilder, BackendState, MAX_REFRESH_INTERVAL, MIN_REFRESH_INTERVAL,
};
pub use backoff::Backoff;
pub use error::{Error, ErrorKind};
pub use handler::{BoxError, Handler, IntoAnswers, PassThroughHandler, each_id};
pub use notifier::{Key, Notifier, NotifierBuilder, Receipt};
pub use proto::v1::{FetchMode, Reason};
pub use request::{Answer, Answers, PassThrough, ResolveRequest, Secret};
#[cfg(feature = "tls")]
pub use tls::Tls;
pub use tokens::{
    ANY_ID, Audience, MAX_TOKEN_TTL, MIN_HS256_SECRET_LEN, SubscribeClaims, SubscribeTokenSigner,
    TokenError, jwks,
};

/// Generated gRPC code of the node's public API (the `entity-sync-proto`
/// crate's, the same types the node uses).
pub mod proto {
    pub use entity_sync_proto::v1;
}
