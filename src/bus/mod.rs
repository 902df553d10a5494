//! The bus that carries change keys from `Notify` to every node's dispatcher.
//!
//! `Bus` is the seam between the gRPC front and the dispatcher: `publish`
//! answers once the bus has stored the keys, and the dispatcher consumes
//! `BusEvent`s from the receiver the bus hands out when it starts. The
//! in-process bus serves a single node; the JetStream bus a cluster. Both
//! number changes with comparable sequences and honour idempotency keys.

mod head;
mod jetstream;
mod memory;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::{
    config::NatsConfig, key::ChangeKey, ops::metrics::Metrics, ops::tasks::Tasks,
    ops::trace::ChangeMeta,
};

use jetstream::JetStreamBus;
use memory::MemoryBus;

/// Batches buffered between the bus and the dispatcher; producers wait when full.
const EVENT_BUFFER: usize = 1024;

/// One change key with the bus sequence it was stored under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChangeEvent {
    pub(crate) key: ChangeKey,
    pub(crate) seq: u64,
    /// The change's trace id and accept time, as its `Notify` gave them.
    pub(crate) meta: ChangeMeta,
}

/// What the dispatcher consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BusEvent {
    /// Changes, in sequence order.
    Changes(Vec<ChangeEvent>),
    /// Changes were lost (they left the stream's retention while this node
    /// was away): every subscribed key must be resolved again. `seq` is the
    /// sequence just before the first one still available.
    Resync { seq: u64 },
}

/// What `publish` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Receipt {
    /// Sequence of each key, in request order.
    pub(crate) sequences: Vec<u64>,
    /// The idempotency key was seen within the window: nothing was applied.
    pub(crate) duplicate: bool,
}

/// Bus failures. `Notify` maps them to `UNAVAILABLE`.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the bus is shut down")]
    Closed,
    #[error("NATS did not acknowledge the publish: {0}")]
    Unavailable(String),
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(
        "nats-server {version} is too old: entity-sync needs 2.10 or newer (older servers silently ignore consumer and stream options it relies on)"
    )]
    ServerTooOld { version: String },
    #[error("JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
}

/// The bus of a node.
#[derive(Clone)]
pub(crate) enum Bus {
    /// In-process bus: one node, nothing to install.
    InProcess(MemoryBus),
    /// NATS JetStream: a cluster of nodes.
    JetStream(JetStreamBus),
}

/// What [`Bus::start`] hands out: the bus, the receiver of its change keys
/// (for the dispatcher), and on NATS the client (for cluster resolves).
pub(crate) type Started = (Bus, mpsc::Receiver<BusEvent>, Option<async_nats::Client>);

impl Bus {
    /// Starts the bus `config` asks for: JetStream when it names a NATS URL,
    /// else the in-process bus.
    pub(crate) async fn start(
        config: &NatsConfig,
        node_id: &str,
        metrics: Arc<Metrics>,
        tasks: &Tasks,
    ) -> Result<Started, BusError> {
        match &config.url {
            None => {
                let (memory, events) = MemoryBus::new();
                Ok((Bus::InProcess(memory), events, None))
            }
            Some(urls) => {
                let (js, events, client) =
                    JetStreamBus::connect(config, urls, node_id, metrics, tasks).await?;
                Ok((Bus::JetStream(js), events, Some(client)))
            }
        }
    }

    /// Stores `keys` on the bus, each carrying `meta`; returns once every
    /// key is stored.
    pub(crate) async fn publish(
        &self,
        keys: Vec<ChangeKey>,
        idempotency_key: &str,
        meta: ChangeMeta,
    ) -> Result<Receipt, BusError> {
        match self {
            Bus::InProcess(bus) => bus.publish(keys, idempotency_key, meta).await,
            Bus::JetStream(bus) => bus.publish(keys, idempotency_key, meta).await,
        }
    }

    /// A sequence every change up to which is already stored. A snapshot
    /// resolved after reading it reflects all those changes, so it serves as
    /// the snapshot's version.
    pub(crate) fn head(&self) -> u64 {
        match self {
            Bus::InProcess(bus) => bus.head(),
            Bus::JetStream(bus) => bus.head(),
        }
    }

    /// The version of a snapshot about to be resolved: a sequence at or above
    /// every change stored before this call, on any node (so it compares with
    /// pushes from other nodes).
    pub(crate) async fn snapshot_version(&self) -> u64 {
        match self {
            Bus::InProcess(bus) => bus.head(),
            Bus::JetStream(bus) => bus.stream_head().await,
        }
    }

    /// Short name for logs and metrics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Bus::InProcess(_) => "in-process",
            Bus::JetStream(_) => "jetstream",
        }
    }

    /// Whether the bus can take publishes now (for `/readyz`).
    pub(crate) fn is_connected(&self) -> bool {
        match self {
            Bus::InProcess(_) => true,
            Bus::JetStream(bus) => bus.is_connected(),
        }
    }

    /// Stops accepting publishes.
    pub(crate) async fn close(&self) {
        match self {
            Bus::InProcess(bus) => bus.close().await,
            Bus::JetStream(bus) => bus.close().await,
        }
    }
}
