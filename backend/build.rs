//! Generates the gRPC client of `entitysync.v1` from the workspace's
//! `proto/` with `protox` (no system `protoc`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let fds = protox::compile(["entitysync/v1/entitysync.proto"], [&proto])?;
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".entitysync.v1.KeyResult.rows")
        .bytes(".entitysync.v1.PassThrough.payload")
        .compile_fds(fds)?;
    Ok(())
}
