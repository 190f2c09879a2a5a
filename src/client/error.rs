//! What a calling service gets instead of a token, typed from the broker's
//! gRPC status (`ErrorInfo` reason first, canonical code second).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// Why there is no token to hand out. Messages never contain a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The identity provider rejected the session's refresh token (or it
    /// lapsed): the user must log in again and the session be registered
    /// anew. Final for a [`TokenSource`](super::TokenSource).
    #[error("re-authentication required: {description}")]
    Reauthentication {
        /// The provider's reason (e.g. `Session not active`).
        description: String,
    },
    /// No such session: it was deleted, never registered, or this caller may
    /// not know it. Final for a [`TokenSource`](super::TokenSource).
    #[error("session not found: {description}")]
    SessionNotFound {
        /// What the broker said.
        description: String,
    },
    /// The broker knows the caller (or not: `CALLER_UNAUTHENTICATED`) and
    /// refuses it this session. A policy reload may change that, so a source
    /// keeps retrying in the background; reads fail at once meanwhile.
    #[error("permission denied ({reason}): {message}")]
    PermissionDenied {
        /// The `ErrorInfo` reason (`CALLER_NOT_ALLOWED`, `CALLER_UNAUTHENTICATED`).
        reason: String,
        /// What the broker said.
        message: String,
    },
    /// The broker refused the request as malformed (e.g. a session id with a
    /// character it does not accept). Final.
    #[error("invalid request: {message}")]
    InvalidArgument {
        /// What the broker said.
        message: String,
    },
    /// No token could be had: the broker, the identity provider or the
    /// network failed (`reason` tells which), and no token was held.
    #[error("token broker unavailable ({reason}): {message}")]
    Unavailable {
        /// The `ErrorInfo` reason (`PROVIDER_UNAVAILABLE`, `SHUTTING_DOWN`,
        /// `RATE_LIMITED`, …), or `CONNECT` / `TRANSPORT` / `STREAM_ENDED` /
        /// `NO_TOKEN_YET` for failures on this side of the wire.
        reason: String,
        /// What failed.
        message: String,
        /// The broker's `RetryInfo`, when it gave one.
        retry_after: Option<Duration>,
    },
    /// The held token is expired, or within the safety margin of its expiry,
    /// and no newer one arrived in time.
    #[error(
        "the access token of generation {generation} is expired or about to expire and no newer one arrived{}",
        cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default()
    )]
    Expired {
        /// Generation of the last token held.
        generation: u64,
        /// The last failure seen while waiting for a newer one.
        cause: Option<Box<ClientError>>,
    },
    /// The source was built with a configuration it cannot run with.
    #[error("invalid token source configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// The source was closed ([`TokenSource::close`](super::TokenSource::close)).
    #[error("token source closed")]
    Closed,
}

impl ClientError {
    /// Types a status from the broker. The `ErrorInfo` reason decides where
    /// it has one; the canonical code otherwise (a status from a proxy or
    /// from tonic itself carries none).
    pub fn from_status(status: &Status) -> Self {
        let info = status.get_details_error_info();
        let reason = info.as_ref().map(|i| i.reason.as_str());
        let message = status.message().to_string();
        match (reason, status.code()) {
            (Some("REAUTHENTICATION_REQUIRED"), _) => Self::Reauthentication {
                description: message
                    .strip_prefix("re-authentication required: ")
                    .map_or_else(|| message.clone(), str::to_string),
            },
            (Some("SESSION_NOT_FOUND"), _) | (None, Code::NotFound) => Self::SessionNotFound {
                description: message,
            },
            (Some(reason @ ("CALLER_NOT_ALLOWED" | "CALLER_UNAUTHENTICATED")), _) => {
                Self::PermissionDenied {
                    reason: reason.to_string(),
                    message,
                }
            }
            (None, code @ (Code::PermissionDenied | Code::Unauthenticated)) => {
                Self::PermissionDenied {
                    reason: code_name(code).to_string(),
                    message,
                }
            }
            (Some("INVALID_ARGUMENT"), _) | (None, Code::InvalidArgument) => {
                Self::InvalidArgument { message }
            }
            (reason, code) => Self::Unavailable {
                reason: reason.unwrap_or_else(|| code_name(code)).to_string(),
                message,
                retry_after: status.get_details_retry_info().and_then(|r| r.retry_delay),
            },
        }
    }

    /// Whether this ends a [`TokenSource`](super::TokenSource): retrying
    /// cannot help, so its background task stops and every read returns it.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Reauthentication { .. }
                | Self::SessionNotFound { .. }
                | Self::InvalidArgument { .. }
                | Self::Config { .. }
                | Self::Closed
        )
    }

    /// Whether a read fails with this at once instead of waiting for a
    /// token: the final errors, and a refusal of the caller.
    pub(crate) fn fails_fast(&self) -> bool {
        self.is_final() || matches!(self, Self::PermissionDenied { .. })
    }

    /// The delay the broker asked for before a retry, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The status an outgoing call fails with when no token can be put on
    /// it: `UNAVAILABLE` while a token may still come (retry later),
    /// `UNAUTHENTICATED` when none will.
    pub fn to_status(&self) -> Status {
        let message = format!("no bearer token for this call: {self}");
        match self {
            Self::Unavailable { .. } | Self::Expired { .. } => Status::unavailable(message),
            _ => Status::unauthenticated(message),
        }
    }

    /// A failure to reach the broker (connect, TLS, HTTP/2).
    pub(crate) fn transport(reason: &str, error: &dyn std::error::Error) -> Self {
        // The source chain says what failed (refused, reset, TLS); the top
        // level is tonic's generic "transport error".
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::Unavailable {
            reason: reason.to_string(),
            message,
            retry_after: None,
        }
    }
}

/// The canonical name of a code (`UNAVAILABLE`), as gRPC documents it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BrokerError;
    use crate::grpc::status::to_status;

    #[test]
    fn every_broker_error_is_typed_by_its_reason() {
        let cases = [
            (
                BrokerError::ReauthenticationRequired {
                    description: "Session not active".into(),
                },
                ClientError::Reauthentication {
                    description: "Session not active".into(),
                },
            ),
            (
                BrokerError::SessionNotFound,
                ClientError::SessionNotFound {
                    description: "session not found".into(),
                },
            ),
            (
                BrokerError::CallerNotAllowed { operation: "watch" },
                ClientError::PermissionDenied {
                    reason: "CALLER_NOT_ALLOWED".into(),
                    message: "caller may not watch this session".into(),
                },
            ),
            (
                BrokerError::CallerUnauthenticated {
                    description: "no identity".into(),
                },
                ClientError::PermissionDenied {
                    reason: "CALLER_UNAUTHENTICATED".into(),
                    message: "caller not authenticated: no identity".into(),
                },
            ),
            (
                BrokerError::invalid("session_id", "must not be empty"),
                ClientError::InvalidArgument {
                    message: "invalid session_id: must not be empty".into(),
                },
            ),
            (
                BrokerError::ProviderUnavailable {
                    provider: "apiax".into(),
                    description: "HTTP 503".into(),
                    retry_after: Duration::from_secs(7),
                },
                ClientError::Unavailable {
                    reason: "PROVIDER_UNAVAILABLE".into(),
                    message: "provider apiax unavailable: HTTP 503".into(),
                    retry_after: Some(Duration::from_secs(7)),
                },
            ),
            (
                BrokerError::ProviderMisconfigured {
                    provider: "apiax".into(),
                    description: "invalid_client".into(),
                },
                ClientError::Unavailable {
                    reason: "PROVIDER_MISCONFIGURED".into(),
                    message: "provider apiax misconfigured: invalid_client".into(),
                    retry_after: None,
                },
            ),
            (
                BrokerError::ShuttingDown,
                ClientError::Unavailable {
                    reason: "SHUTTING_DOWN".into(),
                    message: "shutting down".into(),
                    retry_after: Some(Duration::from_secs(1)),
                },
            ),
            (
                BrokerError::RateLimited {
                    description: "too many watch streams".into(),
                    retry_after: Duration::from_secs(2),
                },
                ClientError::Unavailable {
                    reason: "RATE_LIMITED".into(),
                    message: "rate limited: too many watch streams".into(),
                    retry_after: Some(Duration::from_secs(2)),
                },
            ),
        ];
        for (broker, expected) in cases {
            assert_eq!(ClientError::from_status(&to_status(&broker)), expected);
        }
    }

    #[test]
    fn a_status_without_error_info_is_typed_by_its_code() {
        let cases = [
            (
                Status::not_found("gone"),
                ClientError::SessionNotFound {
                    description: "gone".into(),
                },
            ),
            (
                Status::permission_denied("mesh policy"),
                ClientError::PermissionDenied {
                    reason: "PERMISSION_DENIED".into(),
                    message: "mesh policy".into(),
                },
            ),
            (
                Status::unimplemented("no such method"),
                ClientError::Unavailable {
                    reason: "UNIMPLEMENTED".into(),
                    message: "no such method".into(),
                    retry_after: None,
                },
            ),
            (
                Status::unavailable("upstream connect error"),
                ClientError::Unavailable {
                    reason: "UNAVAILABLE".into(),
                    message: "upstream connect error".into(),
                    retry_after: None,
                },
            ),
        ];
        for (status, expected) in cases {
            assert_eq!(ClientError::from_status(&status), expected);
        }
    }

    #[test]
    fn final_errors_and_the_status_an_outgoing_call_gets() {
        let reauth = ClientError::Reauthentication {
            description: "Token is not active".into(),
        };
        assert!(reauth.is_final());
        assert_eq!(reauth.to_status().code(), Code::Unauthenticated);
        assert!(reauth.to_status().message().contains("Token is not active"));
        let expired = ClientError::Expired {
            generation: 4,
            cause: Some(Box::new(ClientError::Unavailable {
                reason: "PROVIDER_UNAVAILABLE".into(),
                message: "HTTP 503".into(),
                retry_after: None,
            })),
        };
        assert!(!expired.is_final());
        assert_eq!(expired.to_status().code(), Code::Unavailable);
        assert!(
            expired.to_string().contains("PROVIDER_UNAVAILABLE"),
            "{expired}"
        );
        let denied = ClientError::PermissionDenied {
            reason: "CALLER_NOT_ALLOWED".into(),
            message: String::new(),
        };
        assert!(!denied.is_final() && denied.fails_fast());
    }
}
