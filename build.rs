//! Generates the node's internal messages (`entitysync.internal.v1`, what
//! nodes say to each other over NATS) from `src/cluster.proto` with `protox`
//! (no system `protoc`). The public API they import, `entitysync.v1`, is the
//! `entity-sync-proto` crate's: its `.proto` files come from that crate
//! (`DEP_ENTITYSYNC_PROTO_INCLUDE`), its types are used, not generated again.

use std::{env, path::PathBuf};

const INTERNAL: &str = "cluster.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=src/{INTERNAL}");
    let api = PathBuf::from(env::var("DEP_ENTITYSYNC_PROTO_INCLUDE")?);
    let mut fds = protox::compile([INTERNAL], [PathBuf::from("src"), api])?;
    fds.file.retain(|file| file.name() == INTERNAL);
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .extern_path(".entitysync.v1", "::entity_sync_proto::v1")
        // Rows as `Bytes`, like the public API's, so relayed rows are not copied.
        .bytes(".entitysync.internal.v1.RelayedRows.rows")
        .compile_fds(fds)?;
    Ok(())
}
