//! The token-endpoint client: the only module that speaks HTTP to the IdP.
//!
//! - [`Endpoint`]: one provider's token endpoint, credentials and limits, checked up front by
//!   [`Endpoint::validate`].
//! - [`TokenClient`]: posts the refresh grant, logout and revocation requests (reqwest, rustls,
//!   no redirects, timeouts, size-capped bodies).
//! - [`parse_token_response`]: the pure parser and classifier of one answer. Everything the IdP
//!   says goes through it, so the fixture file and the property tests cover the real path.
//! - [`RefreshError`]: three classes never mixed — the IdP said no ([`RefreshError::Rejected`]),
//!   the transport failed ([`RefreshError::Transient`]), the answer could not be read
//!   ([`RefreshError::Unreadable`]) — plus an [`Outcome`] saying whether the IdP may have acted on
//!   (and rotated) the presented refresh token.
//!
//! Secrets: tokens enter and leave this module only inside the [`crate::secret`] newtypes and are
//! exposed only to be put on the wire. Error strings carry at most the IdP's `error` and
//! `error_description` (sanitised, truncated, scrubbed of any token seen in the exchange) and the
//! transport's own messages; never a request body, a token or a raw response body.

mod client;
mod endpoint;
mod error;
mod response;

pub use client::{TokenClient, USER_AGENT};
pub use endpoint::{
    DEFAULT_ACCESS_LIFETIME, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_REQUEST_TIMEOUT, Endpoint, EndpointError, MAX_BODY_BYTES_LIMIT,
};
pub use error::{ErrorClass, Outcome, RefreshError, RejectedTarget};
pub use response::{
    EPOCH_MILLIS_THRESHOLD, EPOCH_SECONDS_THRESHOLD, MAX_ACCESS_LIFETIME, MAX_RETRY_AFTER,
    RefreshExpiry, TokenGrant, jwt_exp, parse_token_response,
};

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod http_tests;
#[cfg(test)]
mod prop_tests;
