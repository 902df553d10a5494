//! Generates `entitysync.v1` from `entitysync/v1/entitysync.proto` with
//! `protox` (no system `protoc`): messages, the client (feature `client`) and
//! the server (feature `server`), and the encoded descriptor set that server
//! reflection offers.

use std::{env, fs, path::PathBuf};

use prost::Message;

const API: &str = "entitysync/v1/entitysync.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    println!("cargo:rerun-if-changed={}", root.join(API).display());
    // For dependents' build scripts: `DEP_ENTITYSYNC_PROTO_INCLUDE`.
    println!("cargo:include={}", root.display());
    let fds = protox::compile([API], [&root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("entitysync_v1_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .client_mod_attribute("entitysync.v1", r#"#[cfg(feature = "client")]"#)
        .server_mod_attribute("entitysync.v1", r#"#[cfg(feature = "server")]"#)
        .bytes(".entitysync.v1.KeyResult.rows")
        .bytes(".entitysync.v1.PassThrough.payload")
        .compile_fds(fds)?;
    Ok(())
}
