//! How a session ends: the close codes, and the close (code and reason)
//! for a closed queue or a stalled write, counted and logged once.

use crate::websocket::session::context::SessionContext;
use crate::{
    dispatcher::registry::Connection, ops::metrics::Metrics, websocket::outbox::CloseReason,
};

/// Close code sent on node shutdown ("going away": reconnect elsewhere).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a client too slow to keep its outbound queue under the bound.
pub const CLOSE_SLOW_CLIENT: u16 = 1008;
/// Close code for a frame above the hard size cap.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code when the peer stayed silent past the idle timeout.
pub const CLOSE_IDLE: u16 = 1000;

/// The close code and reason for a connection whose socket took no write
/// within `--write-timeout`: a client that stopped reading.
pub(super) fn stalled(ctx: &SessionContext, conn: &Connection) -> (u16, &'static str) {
    Metrics::inc(&ctx.metrics.slow_client_closes_total);
    tracing::info!(
        conn.id = conn.id,
        timeout = ?ctx.config.write_timeout,
        "closing slow client: a write made no way within --write-timeout"
    );
    (CLOSE_SLOW_CLIENT, "write timed out: client not reading")
}

/// The close code and reason for a queue closed with `reason`.
pub(super) fn closed_by(
    reason: CloseReason,
    metrics: &Metrics,
    conn: &Connection,
) -> (u16, &'static str) {
    match reason {
        CloseReason::Overflow => slow_client(metrics, conn),
        CloseReason::Shutdown => (CLOSE_GOING_AWAY, "server shutting down"),
    }
}

/// The close code and reason for a connection whose outbound queue
/// overflowed. The one place a slow client's close is counted: whatever
/// overflowed the queue (a fan-out, a snapshot, an error frame), its
/// session ends here, once.
pub(super) fn slow_client(metrics: &Metrics, conn: &Connection) -> (u16, &'static str) {
    Metrics::inc(&metrics.slow_client_closes_total);
    tracing::info!(
        conn.id = conn.id,
        bound = conn.outbox.max_bytes(),
        "closing slow client: outbound queue over its bound"
    );
    (CLOSE_SLOW_CLIENT, "outbound queue full: client too slow")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::Ordering::Relaxed};

    use bytes::Bytes;

    use super::*;
    use crate::{
        dispatcher::registry::{Audience, Registry},
        key::Key,
        websocket::protocol::PushFrame,
    };

    #[test]
    fn a_slow_client_is_counted_when_its_session_closes_it() {
        let metrics = Metrics::default();
        let registry = Registry::new();
        let conn = Arc::new(Connection::new(1, 1024));
        let key = Key::new("items", "1").unwrap();
        registry.add_pending(&key, &conn, 10);
        registry.activate(&key, 1, 0, None, &PushFrame::build(&key, 1, &[], false));
        let big = Bytes::from(format!("\"{}\"", "x".repeat(2048)));
        let fan = registry.fan_out(
            &key,
            &PushFrame::build(&key, 2, &[big], false),
            Audience::All,
        );
        assert_eq!(fan.delivered, 0, "the queue overflowed");
        assert_eq!(metrics.slow_client_closes_total.load(Relaxed), 0);
        // What the session's loop does when it finds the queue closed.
        let reason = conn.outbox.take_queued(&mut Vec::new());
        assert_eq!(reason, Err(CloseReason::Overflow));
        assert_eq!(slow_client(&metrics, &conn).0, CLOSE_SLOW_CLIENT);
        assert_eq!(metrics.slow_client_closes_total.load(Relaxed), 1);
    }
}
