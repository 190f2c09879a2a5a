//! What can go wrong at the token endpoint, in three classes that are never mixed, and the
//! sanitising of the few IdP-provided strings that errors may carry.

use std::fmt;
use std::time::Duration;

/// Whom a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectedTarget {
    /// The refresh token or its session is dead (`invalid_grant`, `invalid_scope`): the user
    /// must log in again. Terminal for the session.
    Session,
    /// The broker's client setup is wrong (`invalid_client`, `unauthorized_client`, …): the
    /// session is kept, an operator must act.
    Config,
}

/// Whether the IdP may have acted on (and rotated) the presented refresh token.
///
/// This decides whether the broker may present the same refresh token again: after
/// `NotProcessed` it may, freely; after `Unknown` it may at most once more (DESIGN §3, rotation
/// discipline), since the IdP may already have replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The IdP certainly did not rotate: nothing reached it (connect failure), or it answered
    /// with an error status.
    NotProcessed,
    /// The request may have been processed and the answer lost: a timeout or a dropped
    /// connection after sending, or a success status whose body could not be read.
    Unknown,
}

/// The class of a [`RefreshError`], for metrics, logs and the broker's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// [`RefreshError::Rejected`] with [`RejectedTarget::Session`].
    RejectedSession,
    /// [`RefreshError::Rejected`] with [`RejectedTarget::Config`].
    RejectedConfig,
    /// [`RefreshError::Transient`].
    Transient,
    /// [`RefreshError::Unreadable`].
    Unreadable,
}

impl ErrorClass {
    /// A stable snake_case name (as in the fixture file), for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RejectedSession => "rejected_session",
            Self::RejectedConfig => "rejected_config",
            Self::Transient => "transient",
            Self::Unreadable => "unreadable",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed exchange with the token endpoint (refresh, logout or revocation).
///
/// Every string in it is ours, a transport library's message, or the IdP's `error` /
/// `error_description` sanitised (control characters, length, tokens): never a token, a request
/// body or a raw response body. The provider is not repeated here; the caller knows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The IdP said no: terminal for the session (`target: Session`) or the provider config
    /// (`Config`). The IdP did not rotate the token.
    #[error(
        "token endpoint refused (HTTP {status}): {error}{}",
        description_suffix(description)
    )]
    Rejected {
        /// Whom the refusal is about.
        target: RejectedTarget,
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code, sanitised.
        error: String,
        /// The OAuth `error_description`, sanitised and truncated; may be empty.
        description: String,
    },
    /// Transport failed, timeout, 5xx, 429: retry with backoff.
    #[error("token endpoint unavailable: {cause}")]
    Transient {
        /// What failed.
        cause: String,
        /// The server's `Retry-After`, capped at [`MAX_RETRY_AFTER`](super::MAX_RETRY_AFTER).
        retry_after: Option<Duration>,
        /// Whether the IdP may have rotated the token.
        outcome: Outcome,
    },
    /// The answer could not be read: alert, retry.
    #[error("token endpoint answer unreadable (HTTP {status}): {cause}")]
    Unreadable {
        /// What is wrong with the answer.
        cause: String,
        /// The HTTP status of the answer.
        status: u16,
        /// `Unknown` for a success status (the IdP may have rotated), else `NotProcessed`.
        outcome: Outcome,
    },
}

fn description_suffix(description: &str) -> String {
    if description.is_empty() {
        String::new()
    } else {
        format!(" ({description})")
    }
}

impl RefreshError {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Rejected {
                target: RejectedTarget::Session,
                ..
            } => ErrorClass::RejectedSession,
            Self::Rejected {
                target: RejectedTarget::Config,
                ..
            } => ErrorClass::RejectedConfig,
            Self::Transient { .. } => ErrorClass::Transient,
            Self::Unreadable { .. } => ErrorClass::Unreadable,
        }
    }

    /// Whether the IdP may have acted on the presented token. A refusal is `NotProcessed`: the
    /// IdP looked at the token and did not rotate it.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Rejected { .. } => Outcome::NotProcessed,
            Self::Transient { outcome, .. } | Self::Unreadable { outcome, .. } => *outcome,
        }
    }

    /// Shorthand for `outcome() == Outcome::Unknown`.
    pub fn outcome_unknown(&self) -> bool {
        self.outcome() == Outcome::Unknown
    }

    /// The server's requested wait before retrying, if it gave one (transient errors only).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            Self::Rejected { .. } | Self::Unreadable { .. } => None,
        }
    }

    /// The HTTP status, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Rejected { status, .. } | Self::Unreadable { status, .. } => Some(*status),
            Self::Transient { .. } => None,
        }
    }
}

/// Longest IdP-provided string kept in an error, in characters.
pub(crate) const MAX_TEXT_CHARS: usize = 200;

/// Secrets shorter than this are not scrubbed from text: real tokens are far longer, and
/// scrubbing a two-letter placeholder would mangle every message.
pub(crate) const MIN_SCRUBBED_SECRET_LEN: usize = 8;

/// Makes an IdP-provided string fit for an error message: control characters turned into spaces
/// (or dropped, where that reveals a secret split by one), every
/// occurrence of a secret (tokens seen in the exchange) replaced, truncated to
/// [`MAX_TEXT_CHARS`]. If a secret still shows after that (it could only be built from the
/// replacement marker itself), the whole text is withheld.
pub(crate) fn sanitize(text: &str, secrets: &[&str]) -> String {
    let secrets: Vec<&str> = secrets
        .iter()
        .copied()
        .filter(|s| s.len() >= MIN_SCRUBBED_SECRET_LEN)
        .collect();
    // Control characters become spaces ("Token is\nnot active" stays readable), unless dropping
    // them reveals a secret split by one: then they are dropped, so the secret is scrubbed whole.
    let joined: String = text.chars().filter(|c| !c.is_control()).collect();
    let mut text: String = if secrets.iter().any(|s| joined.contains(s)) {
        joined
    } else {
        let spaced: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        spaced.trim().to_owned()
    };
    for secret in &secrets {
        if text.contains(secret) {
            text = text.replace(secret, "[redacted]");
        }
    }
    if let Some((cut, _)) = text.char_indices().nth(MAX_TEXT_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    if secrets.iter().any(|s| text.contains(s)) {
        return "[withheld]".to_owned();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_strips_controls_scrubs_and_truncates() {
        assert_eq!(
            sanitize("Token is\nnot active\u{7}", &[]),
            "Token is not active"
        );
        assert_eq!(
            sanitize("bad token abcdefgh1234 here", &["abcdefgh1234"]),
            "bad token [redacted] here"
        );
        // A control character inside the secret does not hide it.
        assert_eq!(
            sanitize("x abcd\u{0}efgh1234 y", &["abcdefgh1234"]),
            "x [redacted] y"
        );
        // Short placeholders are left alone.
        assert_eq!(sanitize("AT is fine", &["AT"]), "AT is fine");

        let long = "é".repeat(500);
        let cut = sanitize(&long, &[]);
        assert_eq!(cut.chars().count(), MAX_TEXT_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn sanitize_withholds_text_that_cannot_be_scrubbed() {
        // The replacement marker itself contains this "secret".
        assert_eq!(sanitize("[redacted]", &["redacted"]), "[withheld]");
    }

    #[test]
    fn classes_and_outcomes() {
        let rejected = RefreshError::Rejected {
            target: RejectedTarget::Session,
            status: 400,
            error: "invalid_grant".into(),
            description: "Token is not active".into(),
        };
        assert_eq!(rejected.class(), ErrorClass::RejectedSession);
        assert!(!rejected.outcome_unknown());
        assert_eq!(
            rejected.to_string(),
            "token endpoint refused (HTTP 400): invalid_grant (Token is not active)"
        );

        let lost = RefreshError::Transient {
            cause: "timed out".into(),
            retry_after: Some(Duration::from_secs(3)),
            outcome: Outcome::Unknown,
        };
        assert_eq!(lost.class(), ErrorClass::Transient);
        assert!(lost.outcome_unknown());
        assert_eq!(lost.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(lost.class().to_string(), "transient");
    }
}
