//! Calling services' side of the broker (cargo feature `client`): a live
//! [`TokenSource`] for one session, and adapters that put
//! `Authorization: Bearer …` on outgoing calls.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tokenbroker::client::ClientError> {
//! use tokenbroker::client::{BearerInterceptor, RequestBuilderExt as _, TokenSource};
//!
//! // One background task per source: it watches the session's tokens over
//! // `WatchToken`, reconnects with backoff, and polls `GetAccessToken` when no
//! // stream can be had. Clones share it; dropping the last clone stops it.
//! let source = TokenSource::builder("payments/alice")
//!     .endpoint("http://tokenbroker:50051")
//!     .build()?;
//!
//! // Waits (bounded) for a token that is not within the safety margin of its
//! // expiry, or says why there is none.
//! let token = source.token().await?;
//! println!("generation {}", token.generation());
//!
//! // reqwest: one call, one `token()`.
//! let http = reqwest::Client::new();
//! let _answer = http
//!     .get("http://ledger:8080/v1/balance")
//!     .bearer_from(&source)
//!     .await?
//!     .send()
//!     .await;
//!
//! // tonic: the interceptor reads the cached token (no RPC, no wait).
//! let channel = tonic::transport::Endpoint::from_static("http://ledger:50051").connect_lazy();
//! let _health = tonic_health::pb::health_client::HealthClient::with_interceptor(
//!     channel,
//!     BearerInterceptor::new(source.clone()),
//! );
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Never an expired token.** [`TokenSource::token`] and
//!   [`TokenSource::current`] hand out a token only while more than the
//!   [expiry margin](TokenSourceBuilder::expiry_margin) of its life is left
//!   (on this machine's clock); otherwise `token()` waits, at most
//!   [`wait_timeout`](TokenSourceBuilder::wait_timeout), and then fails with
//!   [`ClientError::Expired`] or [`ClientError::Unavailable`], naming the last
//!   failure.
//! - **Reads are cheap.** The latest token sits behind an `ArcSwap`; a read
//!   is an atomic load, a clock read and an `Arc` clone. No read makes an RPC.
//! - **Re-authentication is typed and sticky.** When the broker says the
//!   user must log in again (a `SessionEnded` event or
//!   `REAUTHENTICATION_REQUIRED`), every read from then on fails with
//!   [`ClientError::Reauthentication`] and the background task ends; a new
//!   login means a new registration and a new source. A deleted or unknown
//!   session is final the same way ([`ClientError::SessionNotFound`]).
//! - **Owned task.** The task ends when the last clone is dropped or on
//!   [`TokenSource::close`], and its connection closes with it.
//!
//! # Connections
//!
//! Each (re)connection is a new HTTP/2 connection to the next endpoint of the
//! list, round robin; with one endpoint behind a mesh or a Kubernetes
//! Service, the mesh picks a replica for each new connection. Reconnection
//! waits follow capped exponential backoff with full jitter
//! ([`crate::refresh::timing::backoff`], the broker's own), never shorter
//! than the broker's `RetryInfo` (up to the backoff cap). HTTP/2 keep-alive pings detect a peer that
//! vanished without closing the connection.
//!
//! `WatchToken` is the normal mode. The source falls back to polling
//! `GetAccessToken` (with [`min_ttl`](TokenSourceBuilder::min_ttl), timed so
//! that the broker refreshes before the held token runs low) when a stream is
//! refused (`UNIMPLEMENTED`, `PERMISSION_DENIED` — a policy may allow `get`
//! but not `watch` — or `RESOURCE_EXHAUSTED`), or when three streams in a row
//! failed before delivering a token; it tries a stream again after
//! [`watch_retry`](TokenSourceBuilder::watch_retry). While watching, a token
//! about to reach its margin with no successor makes the source ask
//! `GetAccessToken` directly, so a stalled refresh surfaces its reason
//! (`PROVIDER_UNAVAILABLE`, …) in the error a caller gets.

mod bearer;
mod error;
mod source;

pub use bearer::{BearerInterceptor, RequestBuilderExt};
pub use error::ClientError;
pub use source::{Mode, SourceStatus, Token, TokenSource, TokenSourceBuilder};
