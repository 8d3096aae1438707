//! Compiles the contract in `proto/` into Rust with `protox` (a pure-Rust
//! protobuf compiler, so no system `protoc` is needed) and tonic's code
//! generator. The encoded descriptor set is kept too: server reflection
//! serves it so that grpcurl and friends can discover the services.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/secretsbroker/v1/secret.proto",
    "proto/secretsbroker/v1/secrets_service.proto",
    "proto/secretsbroker/v1/admin_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("secretsbroker_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Binary secrets travel as `Bytes`: cloning a cached value is then a
        // reference-count bump, not a copy.
        .bytes(".secretsbroker.v1.Secret.binary_value")
        .compile_fds(descriptors)?;
    Ok(())
}
