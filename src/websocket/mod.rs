//! The websocket side: a client's connection from accept to close.
//!
//! A connection goes through `admission` (counted from accept, capped per
//! address, deadlined until it is a websocket), `http` (the upgrade, and the
//! port's `/healthz`, `/readyz` and `/metrics`), then lives as one
//! [`session`] task. The session reads client messages as [`protocol`]
//! defines them and writes what the dispatcher queued in its `outbox`.

pub(crate) mod admission;
pub(crate) mod grants;
pub(crate) mod http;
pub(crate) mod outbox;
pub mod protocol;
pub mod session;
pub mod tokens;
