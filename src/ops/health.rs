//! Readiness: whether the node takes new work and receives changes and,
//! when not, why; `/readyz`, gRPC health and the `entity_sync_ready` and
//! `entity_sync_not_ready` gauges all follow it.
//!
//! A node connected to NATS is not ready either when it does not receive
//! changes: its consumer probes the change stream every second (1 s
//! deadline) and watches its own progress (see `bus::jetstream`'s
//! consumer), so readiness turns within about 2 s of the stream becoming
//! unreachable from this node, and back within about 250 ms of it answering.

use std::{fmt, time::Duration};

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    bus::{Bus, Unavailable},
    ops::tasks::Tasks,
};

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
    /// Connected, but the change stream does not answer from this node's
    /// NATS server (no stream leader, or the server is cut off from the rest
    /// of the cluster): `Notify` fails and no changes arrive.
    BusUnavailable,
    /// Connected and the stream answers, but it is ahead of this node and
    /// the node's consumer delivers nothing (it is being recreated).
    BusStalled,
}

impl NotReady {
    /// Every reason, in the order readiness checks them.
    pub(crate) const ALL: [NotReady; 4] = [
        NotReady::Draining,
        NotReady::BusDown,
        NotReady::BusUnavailable,
        NotReady::BusStalled,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NotReady::Draining => "draining",
            NotReady::BusDown => "bus down",
            NotReady::BusUnavailable => "bus unavailable",
            NotReady::BusStalled => "bus stalled",
        }
    }
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ready (`Ok`), or the reason it is not; draining wins over the bus, a
/// lost connection over what the consumer last found.
pub(crate) fn readiness(tasks: &Tasks, bus: &Bus) -> Result<(), NotReady> {
    if tasks.is_cancelled() {
        Err(NotReady::Draining)
    } else if !bus.is_connected() {
        Err(NotReady::BusDown)
    } else {
        bus.availability().map_err(|why| match why {
            Unavailable::StreamUnreachable => NotReady::BusUnavailable,
            Unavailable::Stalled => NotReady::BusStalled,
        })
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
