//! The gRPC API of entity-sync, package `entitysync.v1`, generated once from
//! `entitysync/v1/entitysync.proto` for the node, the backend SDK
//! (`entity-sync-backend`), the testkit and the bench: one `FetchMode`, one
//! `KeyResult`, whoever uses them.
//!
//! # Layout
//!
//! - [`v1`]: messages and enums; `entity_sync_client` (feature `client`, on by
//!   default) and `entity_sync_server` (feature `server`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.

/// Package `entitysync.v1`: the public API backends speak.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("entitysync.v1");
}

/// Encoded `FileDescriptorSet` of `entitysync.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/entitysync_v1_descriptor.bin"));
