//! Generates the client stubs from the broker's contract in `../proto`
//! with `protox` (no system protoc).

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
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".secretsbroker.v1.Secret.binary_value")
        // These carry secret values: their Debug is written by hand
        // (src/redacted.rs) and prints <redacted> instead.
        .skip_debug(REDACTED)
        .compile_fds(descriptors)?;
    Ok(())
}
