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
