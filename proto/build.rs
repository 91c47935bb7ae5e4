//! Compiles the contract with protox (a pure-Rust protobuf compiler), so the
//! build needs no protoc. The encoded descriptor set is kept for gRPC
//! reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/trellis/identity/v1/identity.proto",
    "proto/trellis/discovery/v1/discovery.proto",
    "proto/trellis/policy/v1/policy.proto",
    "proto/trellis/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("trellis_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_protoc_run()
        .file_descriptor_set_path(&descriptor_path)
        .compile_fds(descriptors)?;
    Ok(())
}
