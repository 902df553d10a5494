//! Generates the gRPC code from `proto/` with `protox` (no system `protoc`),
//! and writes the encoded descriptor set used by server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/entitysync/v1/entitysync.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("entitysync_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .bytes(".entitysync.v1.KeyResult.rows")
        .bytes(".entitysync.v1.PassThrough.payload")
        .compile_fds(fds)?;
    Ok(())
}
