//! Compiles the contract in `proto/` into Rust with `protox` (a pure-Rust
//! protobuf compiler, so no system `protoc` is needed) and tonic's code
//! generator: the server side only, over the message types of the client
//! crate. The encoded descriptor set is kept too: server reflection serves
//! it so that grpcurl and friends can discover the services.

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
    // The messages are the client crate's (one definition, with its
    // redacting Debug for the ones that carry secrets): only the services
    // are generated here, pointing at those types.
    let mut services = descriptors;
    for file in &mut services.file {
        file.message_type.clear();
        file.enum_type.clear();
    }
    tonic_prost_build::configure()
        .extern_path(".secretsbroker.v1", "::secrets_broker_client::proto")
        .build_client(false)
        .compile_fds(services)?;
    Ok(())
}
