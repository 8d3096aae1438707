//! The `secretsbroker.v1` contract, generated from `proto/`: the one
//! definition of its messages and gRPC stubs that the broker and its Rust
//! client both use. The messages that carry secret values (`Secret` and the
//! typed configs) print `<redacted>` for them in `Debug`, so neither side
//! can log a value by accident.

#![deny(missing_docs)]

mod redacted;

#[cfg(feature = "server")]
pub mod encoded;

/// The messages and client stubs (and, with the `server` feature, the
/// server stubs).
#[allow(missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/client/secretsbroker.v1.rs"));

    #[cfg(feature = "server")]
    include!(concat!(env!("OUT_DIR"), "/server/secretsbroker.v1.rs"));

    /// The encoded descriptors of the contract, for server reflection.
    #[cfg(feature = "server")]
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/secretsbroker_descriptor.bin"));
}
