//! Compiles `proto/rpc.proto` with `protox` (a pure-Rust protobuf compiler), so building this
//! crate needs no `protoc` binary, then generates the prost messages and tonic services from
//! the descriptor set. Also writes the encoded descriptor set (without source info) for
//! server reflection.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/rpc.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=build.rs");

    // protox resolves `google/protobuf/empty.proto` from its bundled well-known types.
    let fds = protox::compile([proto], ["proto"])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut bare = fds.clone();
    for file in &mut bare.file {
        file.source_code_info = None;
    }
    std::fs::write(out_dir.join("rpc_descriptor.bin"), bare.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // We provide our own unix-socket connector; skip the generated TCP `connect`.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
