//! What every room shares to be run and watched: the task tracker and its
//! shutdown path (`tasks`), readiness (`health`), Prometheus metrics
//! ([`metrics`]), trace ids ([`trace`]) and the TLS of both ports (`tls`).

pub(crate) mod health;
pub mod metrics;
pub(crate) mod tasks;
pub(crate) mod tls;
pub mod trace;
