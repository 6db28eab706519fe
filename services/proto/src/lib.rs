//! Generated gRPC types and services of the `licensesync.v1` package, and their conversions to and from the
//! domain types of `license-sync-core` ([`convert`]), shared so that the agent and the aggregator agree on them.

pub mod convert;

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("licensesync.v1");

    /// Encoded `FileDescriptorSet` of the package, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/licensesync_descriptor.bin"));
}

pub use prost_types;
