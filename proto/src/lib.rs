//! The gRPC protocol of x402d, `x402.engine.v1`.
//!
//! Generated from `proto/x402/engine/v1/engine.proto` at build time by
//! `protox` + `tonic-prost-build`; no system `protoc` is needed. Both the
//! server traits and the clients are generated, so tests, benches and
//! gateways written in Rust share one definition.

#![warn(missing_docs)]
#![allow(missing_debug_implementations, unreachable_pub, clippy::use_self)]

/// `x402.engine.v1`.
#[allow(missing_docs, reason = "generated; the .proto documents its messages")]
pub mod v1 {
    tonic::include_proto!("x402.engine.v1");
}

/// Encoded `FileDescriptorSet` of every proto in this crate, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/x402_descriptor.bin"));

pub mod encode;
