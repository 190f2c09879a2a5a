//! tokenbroker: holds the OAuth 2.0 sessions of many users and hands valid
//! access tokens to internal services over gRPC.
//!
//! # Layout
//! - [`pb`]: the generated `tokenbroker.v1` contract (from `proto/`).
//! - [`secret`]: typed secrets (refresh/access tokens, client secrets), redacted and zeroized.

#![deny(rustdoc::broken_intra_doc_links)]

pub mod secret;

/// The `tokenbroker.v1` contract, generated from `proto/tokenbroker/v1/broker.proto`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod pb {
    tonic::include_proto!("tokenbroker.v1");

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenbroker_descriptor");
}
