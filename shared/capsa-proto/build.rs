//! Generates Rust for every contract under `proto/` (the one place code generation happens)
//! and writes the descriptor set that the servers publish through gRPC reflection.
//!
//! The protos are compiled by `protox`, a protobuf compiler in Rust that carries the
//! well-known types (`google/protobuf/*.proto`): the build needs no `protoc` and no system
//! protobuf files, so it works the same on a fresh machine as on one that happens to have them.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "capsa/common/v1/egress.proto",
    "capsa/common/v1/execution.proto",
    "capsa/common/v1/files.proto",
    "capsa/common/v1/process.proto",
    "capsa/common/v1/usage.proto",
    "capsa/session/v1/session.proto",
    "capsa/vmpool/v1/vmpool.proto",
    "capsa/executor/v1/executor.proto",
    "capsa/metering/v1/metering.proto",
    "capsa/agent/v1/agent.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", root.display());
    for p in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    // Imports too (the well-known types), so reflection clients can resolve every type.
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;
    std::fs::write(
        out.join("capsa_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        // Output and file chunks are forwarded hop to hop; `Bytes` moves them without copying.
        .bytes(".")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
