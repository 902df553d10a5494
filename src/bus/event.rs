//! What the bus hands the dispatcher, and what `publish` reports.

use crate::{key::Key, ops::trace::ChangeMeta};

/// Batches buffered between the bus and the dispatcher; producers wait when full.
pub(crate) const EVENT_BUFFER: usize = 1024;

/// One change key with the bus sequence it was stored under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) key: Key,
    pub(crate) version: u64,
    /// The change's trace id and accept time, as its `Notify` gave them.
    pub(crate) meta: ChangeMeta,
}

/// What the dispatcher consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BusEvent {
    /// Changes, in sequence order.
    Changes(Vec<Change>),
    /// Changes were lost (they left the stream's retention while this node
    /// was away): every subscribed key must be resolved again. `version` is the
    /// sequence just before the first one still available.
    Resync { version: u64 },
}

/// What `publish` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Receipt {
    /// Sequence of each key, in request order.
    pub(crate) sequences: Vec<u64>,
    /// The idempotency key was seen within the window: nothing was applied.
    pub(crate) duplicate: bool,
}

/// What the bus can tell of a key's last change (see `Bus::last_change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LastChange {
    /// The key's last stored change has this version.
    At(u64),
    /// The bus keeps no change of the key; it keeps every change after this
    /// version (older ones left its retention, or it never saw any).
    NoneAfter(u64),
    /// The bus could not answer (unreachable, or not in time).
    Unknown,
}

impl LastChange {
    /// Whether a client that holds the key at `version` holds its latest
    /// state: no change of the key is stored after `version`.
    pub(crate) fn unchanged_since(self, version: u64) -> bool {
        match self {
            LastChange::At(last) => last <= version,
            LastChange::NoneAfter(floor) => floor <= version,
            LastChange::Unknown => false,
        }
    }
}
