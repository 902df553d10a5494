//! Readiness: whether the node takes new work and, when not, why; `/readyz`, gRPC health and the `entity_sync_ready` gauge all follow it.

use std::{fmt, time::Duration};

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{bus::Bus, ops::tasks::Tasks};

/// How often the gRPC health status is brought in line with readiness.
/// (The bus state is an atomic read; `/readyz` reads it on every request.)
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(200);

/// Why a node is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotReady {
    /// Shutdown started: the node is draining its connections.
    Draining,
    /// The node cannot reach its bus (NATS): `Notify` would fail and no
    /// changes arrive. Clients already connected are still served.
    BusDown,
}

impl NotReady {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NotReady::Draining => "draining",
            NotReady::BusDown => "bus down",
        }
    }
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ready (`Ok`), or the reason it is not; draining wins over the bus.
pub(crate) fn readiness(tasks: &Tasks, bus: &Bus) -> Result<(), NotReady> {
    if tasks.is_cancelled() {
        Err(NotReady::Draining)
    } else if !bus.is_connected() {
        Err(NotReady::BusDown)
    } else {
        Ok(())
    }
}

/// Keeps the gRPC health of `services` (and of the whole server, `""`)
/// SERVING while the node is ready and NOT_SERVING otherwise, until the
/// node stops. gRPC health carries no reason, so each change is logged with
/// it (and `/readyz` says it).
pub(crate) fn follow_readiness(
    reporter: HealthReporter,
    services: &'static [&'static str],
    bus: Bus,
    tasks: &Tasks,
) {
    let watch = tasks.clone();
    tasks.spawn(async move {
        let mut last: Option<Result<(), NotReady>> = None;
        loop {
            let now = readiness(&watch, &bus);
            if last != Some(now) {
                let status = match now {
                    Ok(()) => ServingStatus::Serving,
                    Err(_) => ServingStatus::NotServing,
                };
                for service in std::iter::once(&"").chain(services) {
                    reporter.set_service_status(*service, status).await;
                }
                match (now, last) {
                    (Ok(()), None) => {}
                    (Ok(()), Some(_)) => tracing::info!("ready again: gRPC health SERVING"),
                    // Draining is the normal way out; a lost bus is not.
                    (Err(reason @ NotReady::Draining), _) => {
                        tracing::info!(reason = %reason, "not ready: gRPC health NOT_SERVING")
                    }
                    (Err(reason), _) => {
                        tracing::warn!(reason = %reason, "not ready: gRPC health NOT_SERVING")
                    }
                }
                last = Some(now);
            }
            if now == Err(NotReady::Draining) {
                return;
            }
            tokio::select! {
                _ = watch.cancelled() => {}
                _ = tokio::time::sleep(HEALTH_CHECK_EVERY) => {}
            }
        }
    });
}
