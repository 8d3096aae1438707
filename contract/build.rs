//! Compiles the contract in `../proto` with `protox` (a pure-Rust protobuf
//! compiler: no system protoc) and tonic's code generator, into:
//! - `client/`: the messages and the client stubs, with the secret-bearing
//!   messages' Debug left to `src/redacted.rs`;
//! - `server/`: the server stubs over those same messages;
//! - the encoded descriptor set, which the broker's reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "secretsbroker/v1/secret.proto",
    "secretsbroker/v1/secrets_service.proto",
    "secretsbroker/v1/admin_service.proto",
];

/// Messages whose fields hold secret values.
const REDACTED: [&str; 4] = [
    ".secretsbroker.v1.Secret",
    ".secretsbroker.v1.JwtConfig",
    ".secretsbroker.v1.DatabaseConfig",
    ".secretsbroker.v1.SecurityConfig",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    let descriptors = protox::compile(PROTOS, ["../proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("secretsbroker_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    let client_dir = out_dir.join("client");
    fs::create_dir_all(&client_dir)?;
    tonic_prost_build::configure()
        .out_dir(&client_dir)
        .build_server(false)
        .bytes(".secretsbroker.v1.Secret.binary_value")
        .skip_debug(REDACTED)
        .compile_fds(descriptors.clone())?;

    // The server stubs only: the messages are the ones above.
    let mut services = descriptors;
    for file in &mut services.file {
        file.message_type.clear();
        file.enum_type.clear();
    }
    let server_dir = out_dir.join("server");
    fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .out_dir(&server_dir)
        .extern_path(".secretsbroker.v1", "crate::proto")
        // GetSecret answers from bytes encoded once per version (encoded.rs).
        .extern_path(
            ".secretsbroker.v1.GetSecretResponse",
            "crate::encoded::EncodedGetSecretResponse",
        )
        .build_client(false)
        .compile_fds(services)?;
    Ok(())
}
