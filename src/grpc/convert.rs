//! Request validation and conversions between `pb` messages and domain types.

use std::time::{Duration, SystemTime};

use crate::broker::{InitialToken, ListQuery, Registration, SessionInfo, WatchEvent};
use crate::error::BrokerError;
use crate::oidc::RefreshExpiry;
use crate::pb;
use crate::secret::{AccessToken, RefreshToken};
use crate::session::{
    EndReason, ErrorClass, IssuedToken, Labels, SessionId, SessionState, validate_labels,
};

/// Longest accepted `min_ttl`.
pub const MAX_MIN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted `refresh_expires_in` (offline tokens say 0 for "never").
pub const MAX_REFRESH_LIFETIME: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
/// Longest accepted scope string.
pub const MAX_SCOPE_LEN: usize = 4096;
/// Largest page of `ListSessions`.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Page size when the request sets none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// A required, valid session id.
pub fn session_id(raw: &str) -> Result<SessionId, BrokerError> {
    SessionId::parse(raw)
}

/// A caller's `google.protobuf.Duration`, read exactly (seconds and nanos
/// of any sign, nanos out of range included). Not through prost's
/// `TryFrom`, which negates `seconds` and so overflows on `i64::MIN`.
fn duration(
    field: &'static str,
    value: Option<prost_types::Duration>,
) -> Result<Option<Duration>, BrokerError> {
    const NANOS_PER_SECOND: i128 = 1_000_000_000;
    value
        .map(|d| {
            let total = i128::from(d.seconds) * NANOS_PER_SECOND + i128::from(d.nanos);
            if total < 0 {
                return Err(BrokerError::invalid(field, "must not be negative"));
            }
            // At most i64::MAX seconds plus two: fits a u64; the remainder fits a u32.
            let seconds = u64::try_from(total / NANOS_PER_SECOND).unwrap_or(u64::MAX);
            let nanos = u32::try_from(total % NANOS_PER_SECOND).unwrap_or(0);
            Ok(Duration::new(seconds, nanos))
        })
        .transpose()
}

fn token_text(field: &'static str, value: &str, max_bytes: usize) -> Result<(), BrokerError> {
    if value.len() > max_bytes {
        return Err(BrokerError::invalid(
            field,
            format!("longer than {max_bytes} bytes"),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BrokerError::invalid(
            field,
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// Validates a registration request.
pub fn registration(
    request: pb::RegisterSessionRequest,
    max_token_bytes: usize,
) -> Result<Registration, BrokerError> {
    let session_id = if request.session_id.is_empty() {
        None
    } else {
        Some(session_id(&request.session_id)?)
    };
    if request.refresh_token.is_empty() {
        return Err(BrokerError::invalid("refresh_token", "must not be empty"));
    }
    token_text("refresh_token", &request.refresh_token, max_token_bytes)?;
    token_text("access_token", &request.access_token, max_token_bytes)?;
    let expires_in = duration("expires_in", request.expires_in)?;
    let refresh_expires_in = duration("refresh_expires_in", request.refresh_expires_in)?;
    if request.access_token.is_empty() && (expires_in.is_some() || !request.scope.is_empty()) {
        return Err(BrokerError::invalid(
            "access_token",
            "expires_in and scope need an access_token",
        ));
    }
    if expires_in.is_some_and(|d| d > Duration::from_secs(366 * 24 * 3600)) {
        return Err(BrokerError::invalid("expires_in", "longer than a year"));
    }
    if refresh_expires_in.is_some_and(|d| d > MAX_REFRESH_LIFETIME) {
        return Err(BrokerError::invalid(
            "refresh_expires_in",
            "longer than ten years",
        ));
    }
    if request.scope.len() > MAX_SCOPE_LEN {
        return Err(BrokerError::invalid(
            "scope",
            format!("longer than {MAX_SCOPE_LEN} bytes"),
        ));
    }
    if request.provider.len() > 64 {
        return Err(BrokerError::invalid("provider", "longer than 64 bytes"));
    }
    validate_labels("labels", request.labels.iter())?;
    let initial = (!request.access_token.is_empty()).then(|| InitialToken {
        access_token: AccessToken::new(request.access_token),
        expires_in,
        scope: request.scope,
    });
    Ok(Registration {
        trace: None,
        session_id,
        refresh_token: RefreshToken::new(request.refresh_token),
        provider: request.provider,
        initial,
        refresh_expires_in,
        labels: request.labels.into_iter().collect(),
        replace: request.replace,
        owner: None,
    })
}

/// Validates `min_ttl`.
pub fn min_ttl(value: Option<prost_types::Duration>) -> Result<Option<Duration>, BrokerError> {
    let ttl = duration("min_ttl", value)?;
    if ttl.is_some_and(|d| d > MAX_MIN_TTL) {
        return Err(BrokerError::invalid("min_ttl", "longer than 24 hours"));
    }
    Ok(ttl)
}

/// Validates a listing request.
pub fn list_query(request: pb::ListSessionsRequest) -> Result<ListQuery, BrokerError> {
    if request.page_size > MAX_PAGE_SIZE {
        return Err(BrokerError::invalid(
            "page_size",
            format!("at most {MAX_PAGE_SIZE}"),
        ));
    }
    let after = if request.page_token.is_empty() {
        None
    } else {
        Some(
            SessionId::parse(&request.page_token)
                .map_err(|_| BrokerError::invalid("page_token", "not a token from this service"))?,
        )
    };
    let state = match pb::SessionState::try_from(request.state) {
        Ok(pb::SessionState::Unspecified) => None,
        Ok(pb::SessionState::Active) => Some(SessionState::Active),
        Ok(pb::SessionState::ReauthRequired) => Some(SessionState::ReauthRequired),
        Err(_) => return Err(BrokerError::invalid("state", "unknown state")),
    };
    validate_labels("label_selector", request.label_selector.iter())?;
    Ok(ListQuery {
        state,
        labels: request.label_selector.into_iter().collect::<Labels>(),
        page_size: if request.page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            request.page_size
        } as usize,
        after,
    })
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// A token as sent to callers.
pub fn access_token(token: &IssuedToken) -> pb::AccessToken {
    pb::AccessToken {
        access_token: token.access_token.expose_secret().to_owned(),
        token_type: "Bearer".to_owned(),
        expires_at: Some(timestamp(token.expires_at)),
        scope: token.scope.to_string(),
        generation: token.generation,
    }
}

/// Session metadata as sent to callers.
pub fn session(info: SessionInfo) -> pb::Session {
    pb::Session {
        session_id: info.id.to_string(),
        provider: info.provider,
        state: match info.state {
            SessionState::Active => pb::SessionState::Active,
            SessionState::ReauthRequired => pb::SessionState::ReauthRequired,
        } as i32,
        access_expires_at: info.access_expires_at.map(timestamp),
        refresh_expires_at: match info.refresh_expiry {
            RefreshExpiry::At(at) => Some(timestamp(at)),
            RefreshExpiry::Never | RefreshExpiry::Unknown => None,
        },
        generation: info.generation,
        last_refresh_at: info.last_refresh_at.map(timestamp),
        next_refresh_at: info.next_refresh_at.map(timestamp),
        consecutive_failures: info.consecutive_failures,
        last_error: info.last_error.map(|e| pb::SessionError {
            class: match e.class {
                ErrorClass::RejectedSession => pb::ErrorClass::RejectedSession,
                ErrorClass::RejectedConfig => pb::ErrorClass::RejectedConfig,
                ErrorClass::Transient => pb::ErrorClass::Transient,
                ErrorClass::Unreadable => pb::ErrorClass::Unreadable,
                ErrorClass::Store => pb::ErrorClass::Store,
            } as i32,
            description: e.description,
            at: Some(timestamp(e.at)),
        }),
        labels: info.labels.into_iter().collect(),
        created_at: Some(timestamp(info.created_at)),
        reauth_due_at: info.reauth_due_at.map(timestamp),
    }
}

/// A watch event as sent to callers; `None` for shutdown, which ends the
/// stream with a status instead.
pub fn watch_event(event: WatchEvent) -> Option<pb::WatchTokenResponse> {
    use pb::watch_token_response::Event;
    let event = match event {
        WatchEvent::Token(token) => Event::Token(access_token(&token)),
        WatchEvent::ReauthWarning(due) => Event::ReauthWarning(pb::ReauthWarning {
            reauth_due_at: Some(timestamp(due)),
        }),
        WatchEvent::Ended(reason) => Event::Ended(match reason {
            EndReason::ReauthenticationRequired(description) => pb::SessionEnded {
                reason: pb::session_ended::Reason::ReauthenticationRequired as i32,
                description,
            },
            EndReason::Deleted => pb::SessionEnded {
                reason: pb::session_ended::Reason::Deleted as i32,
                description: "session deleted".into(),
            },
        }),
        WatchEvent::ShuttingDown => return None,
    };
    Some(pb::WatchTokenResponse { event: Some(event) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos })
    }

    #[test]
    fn durations_of_any_shape_are_read_exactly() {
        assert_eq!(min_ttl(None).unwrap(), None);
        assert_eq!(min_ttl(pb(5, 0)).unwrap(), Some(Duration::from_secs(5)));
        // Out-of-range nanos are carried, as in protobuf's normalisation.
        assert_eq!(
            min_ttl(pb(-1, 1_500_000_000)).unwrap(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            min_ttl(pb(1, -500_000_000)).unwrap(),
            Some(Duration::from_millis(500))
        );
        // Regression: the most negative durations overflowed in prost's
        // conversion (a panic in debug builds) instead of being refused.
        for (seconds, nanos) in [
            (i64::MIN, 0),
            (i64::MIN, -1),
            (i64::MIN, i32::MIN),
            (i64::MIN, i32::MAX),
            (0, -1),
            (-1, 999_999_999),
        ] {
            let err = min_ttl(pb(seconds, nanos)).unwrap_err();
            assert_eq!(
                err,
                BrokerError::invalid("min_ttl", "must not be negative"),
                "{seconds} s {nanos} ns"
            );
        }
        // The largest ones are too long, not a panic either.
        assert!(min_ttl(pb(i64::MAX, i32::MAX)).is_err());
        assert_eq!(
            duration("expires_in", pb(i64::MAX, i32::MAX)).unwrap(),
            Some(Duration::new(i64::MAX as u64 + 2, 147_483_647))
        );
    }
}
