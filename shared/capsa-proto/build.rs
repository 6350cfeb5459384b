//! Generates Rust for every contract under `proto/` (the one place code generation happens)
//! and writes the descriptor set that the servers publish through gRPC reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "capsa/common/v1/execution.proto",
    "capsa/common/v1/files.proto",
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
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("capsa_descriptor.bin"))
        // Output and file chunks are forwarded hop to hop; `Bytes` moves them without copying.
        .bytes(".")
        .compile_protos(&files, &[root])?;
    Ok(())
}
