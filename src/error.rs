//! The transport-neutral error of the broker's use cases.
//!
//! `grpc::status` maps each variant to a gRPC status in one place; nothing
//! else picks status codes. Messages never contain a token.

use std::time::Duration;

/// What went wrong with a use case, as a caller needs to know it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BrokerError {
    /// The request is malformed; `field` names the offending field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Request field, as named in the proto.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// No such session (or one the caller may not see).
    #[error("session not found")]
    SessionNotFound,
    /// The id is taken by a session with a different refresh token.
    #[error("session id already registered with a different refresh token")]
    SessionExists,
    /// The identity provider rejected the refresh token: the user must log in again.
    #[error("re-authentication required: {description}")]
    ReauthenticationRequired {
        /// The provider's reason, without any token.
        description: String,
    },
    /// The identity provider refused the broker's client configuration.
    #[error("provider {provider} misconfigured: {description}")]
    ProviderMisconfigured {
        /// Provider name.
        provider: String,
        /// The provider's reason.
        description: String,
    },
    /// The identity provider cannot be reached and no token is valid long enough.
    #[error("provider {provider} unavailable: {description}")]
    ProviderUnavailable {
        /// Provider name.
        provider: String,
        /// What failed.
        description: String,
        /// When a retry makes sense.
        retry_after: Duration,
    },
    /// Over a rate or concurrency budget.
    #[error("rate limited: {description}")]
    RateLimited {
        /// Which budget.
        description: String,
        /// When a retry makes sense.
        retry_after: Duration,
    },
    /// The session store failed; nothing was changed that a caller could see.
    #[error("session store unavailable: {description}")]
    StoreUnavailable {
        /// What failed.
        description: String,
    },
    /// The broker is draining.
    #[error("shutting down")]
    ShuttingDown,
    /// No caller identity where one is required (or an unreadable one).
    #[error("caller not authenticated: {description}")]
    CallerUnauthenticated {
        /// What is missing or wrong.
        description: String,
    },
    /// The caller may know the session but not do this with it.
    #[error("caller may not {operation} this session")]
    CallerNotAllowed {
        /// The operation refused.
        operation: &'static str,
    },
}

impl BrokerError {
    /// Shorthand for [`BrokerError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}
