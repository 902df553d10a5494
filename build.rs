//! Generates the gRPC code from `proto/` with `protox` (no system `protoc`),
//! and writes the encoded descriptor set used by server reflection.
//!
//! Two packages: `entitysync.v1`, the public API backends speak, and
//! `entitysync.internal.v1`, what nodes say to each other over NATS. Only the
//! public one is offered through reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PUBLIC: &str = "entitysync/v1/entitysync.proto";
const INTERNAL: &str = "entitysync/internal/v1/cluster.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([PUBLIC, INTERNAL], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut public = fds.clone();
    public.file.retain(|file| file.name() != INTERNAL);
    fs::write(
        out_dir.join("entitysync_descriptor.bin"),
        public.encode_to_vec(),
    )?;
    // Clients are the backend SDK's (`entity-sync-backend`); the node only serves.
    tonic_prost_build::configure()
        .build_client(false)
        .bytes(".entitysync.v1.KeyResult.rows")
        .bytes(".entitysync.v1.PassThrough.payload")
        .compile_fds(fds)?;
    Ok(())
}
