//! tokenbroker: holds the OAuth 2.0 sessions of many users and hands valid
//! access tokens to internal services over gRPC.
//!
//! # Layout
//! - [`auth`]: caller identity (mTLS, XFCC, Linkerd) and the reloadable session access policy.
//! - [`app`]: wiring and task ownership: builds the parts from config, serves, shuts down.
//! - [`cli`]: the command line: `serve`, `dev-idp` and the client commands.
//! - [`config`]: typed config from defaults, TOML file, `TOKENBROKER_*` env and flags; validation.
//! - [`grpc`]: the tonic adapter: the auth gate (identity, policy, stream bounds), validation,
//!   conversion, the one error-to-status mapping, the RPC metrics layer.
//! - [`broker`]: the use cases: register, get, watch, inspect, list, delete.
//! - [`session`]: session state, the published view (lock-free, with a watch channel made on
//!   the first subscription), the registry (DashMap), labels in one buffer and shared strings
//!   (`labels.rs`), failure bookkeeping out of line (`Trouble`).
//! - [`refresh`]: single-flight refreshes, persist-before-use, backoff, IdP budget, the timer queue;
//!   [`refresh::timing`] holds the pure timing functions.
//! - [`oidc`]: the token-endpoint client (the only reqwest user): refresh, logout, classify answers.
//! - [`store`]: the `SessionStore` trait (compare-and-swap on the generation) and its backends
//!   (SQLite, PostgreSQL); the `Coordinator` of HA replicas (leases, change feed).
//! - [`devidp`]: Keycloak-faithful dev IdP with fault injection (tests, `serve --dev`, `dev-idp`).
//! - [`secret`]: typed secrets (refresh/access tokens, client secrets), redacted and zeroized.
//! - [`error`]: the transport-neutral error of the use cases.
//! - [`telemetry`]: logging and optional OTLP trace export, W3C trace context, the signals.
//! - [`metrics`]: the Prometheus metric names (one list) and the recorder behind `/metrics`.
//! - `client` (cargo feature `client`): the calling services' side: a live `TokenSource` per
//!   session (watch, reconnect, poll fallback, never an expired token) and bearer adapters for
//!   tonic and reqwest (the one reqwest user besides `oidc`, for the caller's own requests).
//! - [`pb`]: the generated `tokenbroker.v1` contract (from `proto/`).

#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod app;
pub mod auth;
pub mod broker;
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
pub mod config;
pub mod devidp;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod oidc;
pub mod refresh;
pub mod secret;
pub mod session;
pub mod store;
pub mod telemetry;

/// The `tokenbroker.v1` contract, generated from `proto/tokenbroker/v1/broker.proto`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod pb {
    tonic::include_proto!("tokenbroker.v1");

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenbroker_descriptor");
}
