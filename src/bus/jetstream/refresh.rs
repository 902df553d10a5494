//! Refresh changes on JetStream: one message id per key (see `bus::refresh`).

use std::sync::atomic::Ordering;

use async_nats::{HeaderMap, header::NATS_MESSAGE_ID};

use super::{ACK_WINDOW, JetStreamBus, unacknowledged};
use crate::{
    bus::error::{BusError, PublishError},
    key::Key,
    ops::trace::{BUS_NOTIFIED_HEADER, BUS_TRACE_HEADER, ChangeMeta},
};

impl JetStreamBus {
    /// Publishes each key with its own `Nats-Msg-Id` and awaits every
    /// PubAck (in windows, as `publish` does). Returns how many were stored,
    /// not counting the ones JetStream reported as duplicates.
    pub(in crate::bus) async fn publish_refresh(
        &self,
        changes: Vec<(Key, String)>,
        meta: ChangeMeta,
    ) -> Result<usize, BusError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        if !self.is_connected() {
            return Err(BusError::Unavailable {
                source: PublishError::NotConnected,
            });
        }
        let trace = meta.trace.to_string();
        let notified_at = meta.notified_at_us.to_string();
        let mut stored = 0;
        for window in changes.chunks(ACK_WINDOW) {
            let mut acks = Vec::with_capacity(window.len());
            for (key, message_id) in window {
                let subject = format!("{}.changes.{}.{}", self.inner.prefix, key.entity, key.id);
                let mut headers = HeaderMap::new();
                headers.insert(BUS_TRACE_HEADER, trace.as_str());
                headers.insert(BUS_NOTIFIED_HEADER, notified_at.as_str());
                headers.insert(NATS_MESSAGE_ID, message_id.as_str());
                let ack = self
                    .inner
                    .js
                    .publish_with_headers(subject, headers, bytes::Bytes::new())
                    .await
                    .map_err(unacknowledged)?;
                acks.push(ack);
            }
            for ack in acks {
                let ack = ack.await.map_err(unacknowledged)?;
                if !ack.duplicate {
                    stored += 1;
                }
                self.inner.head.fetch_max(ack.sequence, Ordering::AcqRel);
            }
        }
        Ok(stored)
    }
}
