//! The bus that carries change keys from `Notify` to every node's dispatcher.
//!
//! `Bus` is the seam between the gRPC front and the dispatcher: `publish`
//! answers once the bus has stored the keys, and the dispatcher consumes
//! `BusEvent`s from the receiver the bus hands out when it starts. The
//! in-process bus serves a single node; the JetStream bus a cluster. Both
//! number changes with comparable sequences and honour idempotency keys.

mod error;
mod event;
mod head;
mod jetstream;
mod memory;
mod refresh;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::{
    config::NatsConfig, key::Key, ops::metrics::Metrics, ops::tasks::Tasks, ops::trace::ChangeMeta,
};

pub use error::{BusError, BusErrorKind, ConnectError, PublishError, StreamError};
pub(crate) use event::{BusEvent, LastChange, Receipt};
use jetstream::JetStreamBus;
pub(crate) use jetstream::Unavailable;
pub(crate) use jetstream::relay_feed::{Claim, PROGRESS_EVERY as RELAY_PROGRESS_EVERY, RelayFeed};
use memory::MemoryBus;
pub(crate) use refresh::REFRESH_BATCH;

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
        keys: Vec<Key>,
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

    /// The version of `key`'s last stored change, for a subscribe that
    /// resumes: a client holding the key at a version at or after it holds
    /// its latest state. Asked of NATS on JetStream (within a short
    /// deadline, else `Unknown`).
    pub(crate) async fn last_change(&self, key: &Key) -> LastChange {
        match self {
            Bus::InProcess(bus) => bus.last_change(key),
            Bus::JetStream(bus) => bus.last_change(key).await,
        }
    }

    /// On JetStream, starts pulling the relay feed: each change to exactly
    /// one node of the cluster, which resolves it for all of them. `None`
    /// in process (one node resolves for itself).
    pub(crate) fn relay_feed(&self, tasks: &Tasks) -> Option<RelayFeed> {
        match self {
            Bus::InProcess(_) => None,
            Bus::JetStream(bus) => Some(bus.relay_feed(tasks)),
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

    /// Whether this node receives changes while connected (for `/readyz`):
    /// always on the in-process bus.
    pub(crate) fn availability(&self) -> Result<(), Unavailable> {
        match self {
            Bus::InProcess(_) => Ok(()),
            Bus::JetStream(bus) => bus.availability(),
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
