//! The one place that turns a [`BrokerError`] into a gRPC status: canonical
//! code, a `google.rpc.ErrorInfo` (domain `tokenbroker.v1`, UPPER_SNAKE
//! reason), `RetryInfo` on retryable errors, `BadRequest` on invalid ones.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::BrokerError;

/// The `ErrorInfo` domain of every error.
pub const ERROR_DOMAIN: &str = "tokenbroker.v1";

/// Maps a broker error to its status.
pub fn to_status(error: &BrokerError) -> Status {
    let (code, reason) = match error {
        BrokerError::InvalidArgument { .. } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        BrokerError::SessionNotFound => (Code::NotFound, "SESSION_NOT_FOUND"),
        BrokerError::SessionExists => (Code::AlreadyExists, "SESSION_EXISTS"),
        BrokerError::ReauthenticationRequired { .. } => {
            (Code::FailedPrecondition, "REAUTHENTICATION_REQUIRED")
        }
        BrokerError::ProviderMisconfigured { .. } => {
            (Code::FailedPrecondition, "PROVIDER_MISCONFIGURED")
        }
        BrokerError::ProviderUnavailable { .. } => (Code::Unavailable, "PROVIDER_UNAVAILABLE"),
        BrokerError::RateLimited { .. } => (Code::ResourceExhausted, "RATE_LIMITED"),
        BrokerError::StoreUnavailable { .. } => (Code::Unavailable, "STORE_UNAVAILABLE"),
        BrokerError::ShuttingDown => (Code::Unavailable, "SHUTTING_DOWN"),
        BrokerError::CallerUnauthenticated { .. } => {
            (Code::Unauthenticated, "CALLER_UNAUTHENTICATED")
        }
        BrokerError::CallerNotAllowed { .. } => (Code::PermissionDenied, "CALLER_NOT_ALLOWED"),
    };
    let mut metadata = HashMap::new();
    if let BrokerError::ProviderMisconfigured { provider, .. }
    | BrokerError::ProviderUnavailable { provider, .. } = error
    {
        metadata.insert("provider".to_string(), provider.clone());
    }
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    match error {
        BrokerError::InvalidArgument { field, reason } => {
            details.add_bad_request_violation(*field, reason.clone());
        }
        BrokerError::ProviderUnavailable { retry_after, .. }
        | BrokerError::RateLimited { retry_after, .. } => {
            details.set_retry_info(Some(*retry_after));
        }
        BrokerError::StoreUnavailable { .. } | BrokerError::ShuttingDown => {
            details.set_retry_info(Some(std::time::Duration::from_secs(1)));
        }
        _ => {}
    }
    Status::with_error_details(code, error.to_string(), details)
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        to_status(&error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_error_has_its_code_reason_and_retry_info() {
        let unavailable = BrokerError::ProviderUnavailable {
            provider: "apiax".into(),
            description: "HTTP 503".into(),
            retry_after: Duration::from_secs(7),
        };
        let cases = [
            (
                BrokerError::invalid("session_id", "empty"),
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
                false,
            ),
            (
                BrokerError::SessionNotFound,
                Code::NotFound,
                "SESSION_NOT_FOUND",
                false,
            ),
            (
                BrokerError::SessionExists,
                Code::AlreadyExists,
                "SESSION_EXISTS",
                false,
            ),
            (
                BrokerError::ReauthenticationRequired {
                    description: "Token is not active".into(),
                },
                Code::FailedPrecondition,
                "REAUTHENTICATION_REQUIRED",
                false,
            ),
            (
                BrokerError::ProviderMisconfigured {
                    provider: "apiax".into(),
                    description: "invalid_client".into(),
                },
                Code::FailedPrecondition,
                "PROVIDER_MISCONFIGURED",
                false,
            ),
            (unavailable, Code::Unavailable, "PROVIDER_UNAVAILABLE", true),
            (
                BrokerError::RateLimited {
                    description: "budget".into(),
                    retry_after: Duration::from_secs(1),
                },
                Code::ResourceExhausted,
                "RATE_LIMITED",
                true,
            ),
            (
                BrokerError::StoreUnavailable {
                    description: "disk".into(),
                },
                Code::Unavailable,
                "STORE_UNAVAILABLE",
                true,
            ),
            (
                BrokerError::ShuttingDown,
                Code::Unavailable,
                "SHUTTING_DOWN",
                true,
            ),
            (
                BrokerError::CallerUnauthenticated {
                    description: "no identity".into(),
                },
                Code::Unauthenticated,
                "CALLER_UNAUTHENTICATED",
                false,
            ),
            (
                BrokerError::CallerNotAllowed { operation: "get" },
                Code::PermissionDenied,
                "CALLER_NOT_ALLOWED",
                false,
            ),
        ];
        for (error, code, reason, retryable) in cases {
            let status = to_status(&error);
            assert_eq!(status.code(), code, "{error:?}");
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert_eq!(
                status.get_details_retry_info().is_some(),
                retryable,
                "{error:?}"
            );
        }
        let status = to_status(&BrokerError::ProviderUnavailable {
            provider: "apiax".into(),
            description: String::new(),
            retry_after: Duration::from_secs(7),
        });
        assert_eq!(
            status.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(7))
        );
        let bad = to_status(&BrokerError::invalid("session_id", "empty"));
        assert_eq!(
            bad.get_details_bad_request().unwrap().field_violations[0].field,
            "session_id"
        );
    }
}
