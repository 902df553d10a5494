//! Refresh changes: keys stored on the bus each under a message id of its own.
//!
//! `publish` gives every key of a call the call's idempotency key (with an
//! index); a refresh instead names each key's change itself
//! (`refresh:{entity}:{id}:{slot}`, the same on every node), so however many
//! nodes hold a key, the bus stores one change of it per slot.

use crate::{bus::Bus, bus::BusError, key::Key, ops::trace::ChangeMeta};

/// Most keys one [`Bus::publish_refresh`] call should carry.
pub(crate) const REFRESH_BATCH: usize = 1000;

impl Bus {
    /// Stores each key under its own message id, every one carrying `meta`;
    /// a key whose id the bus already stored within its duplicate window is
    /// not stored again. Returns, once every key is acknowledged, how many
    /// this call stored (the others were duplicates).
    pub(crate) async fn publish_refresh(
        &self,
        changes: Vec<(Key, String)>,
        meta: ChangeMeta,
    ) -> Result<usize, BusError> {
        match self {
            Bus::InProcess(bus) => bus.publish_refresh(changes, meta).await,
            Bus::JetStream(bus) => bus.publish_refresh(changes, meta).await,
        }
    }
}
