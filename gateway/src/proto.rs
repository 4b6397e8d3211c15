//! The one schema, generated from proto/citygw/v1 at build time.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("citygw.v1");

/// Encoded file descriptors of proto/, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/citygw_descriptor.bin"));
