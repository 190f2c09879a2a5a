//! Session ids and labels: validated once at the edge, cheap to clone after.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::error::BrokerError;

/// Longest accepted session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 128;
/// Most labels a session may carry.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 256;

/// A session id: 1 to 128 characters of `[A-Za-z0-9._:@/-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(Arc<str>);

impl SessionId {
    /// Validates a caller-supplied id.
    pub fn parse(raw: &str) -> Result<Self, BrokerError> {
        Self::check(raw)?;
        Ok(Self(raw.into()))
    }

    /// Validates without allocating (the hot path looks sessions up by `&str`).
    pub fn check(raw: &str) -> Result<(), BrokerError> {
        if raw.is_empty() {
            return Err(BrokerError::invalid("session_id", "must not be empty"));
        }
        if raw.len() > MAX_SESSION_ID_LEN {
            return Err(BrokerError::invalid(
                "session_id",
                format!("longer than {MAX_SESSION_ID_LEN} bytes"),
            ));
        }
        if let Some(bad) = raw.chars().find(|c| !is_id_char(*c)) {
            return Err(BrokerError::invalid(
                "session_id",
                format!("character {bad:?} is not allowed (use A-Z a-z 0-9 . _ : @ / -)"),
            ));
        }
        Ok(())
    }

    /// A fresh random id, for registrations that leave the id empty.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string().into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '/' | '-')
}

// Hashes and compares exactly as its text, so maps keyed by `SessionId` can
// be queried with a `&str`.
impl std::borrow::Borrow<str> for SessionId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

/// Free-form labels of a session, validated for count and size.
pub type Labels = BTreeMap<String, String>;

/// Checks the label bounds; `field` names the request field in errors.
pub fn validate_labels<'a>(
    field: &'static str,
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), BrokerError> {
    if labels.len() > MAX_LABELS {
        return Err(BrokerError::invalid(
            field,
            format!("more than {MAX_LABELS} labels"),
        ));
    }
    for (key, value) in labels {
        if key.is_empty() || key.len() > MAX_LABEL_KEY_LEN {
            return Err(BrokerError::invalid(
                field,
                format!("label keys must be 1 to {MAX_LABEL_KEY_LEN} bytes"),
            ));
        }
        if !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        {
            return Err(BrokerError::invalid(
                field,
                format!("label key {key:?} may only use A-Z a-z 0-9 . _ - /"),
            ));
        }
        if value.len() > MAX_LABEL_VALUE_LEN {
            return Err(BrokerError::invalid(
                field,
                format!("label {key:?} is longer than {MAX_LABEL_VALUE_LEN} bytes"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_charset() {
        for ok in [
            "a",
            "tenant-1/user@example.com",
            "x:y_z.1",
            &"a".repeat(128),
        ] {
            assert!(SessionId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_empty_long_and_odd_ids() {
        for bad in ["", " ", "a b", "é", "a\n", &"a".repeat(129), "semi;colon"] {
            let err = SessionId::parse(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    BrokerError::InvalidArgument {
                        field: "session_id",
                        ..
                    }
                ),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn maps_keyed_by_id_answer_lookups_by_text() {
        let mut map = std::collections::HashMap::new();
        map.insert(SessionId::parse("tenant/alice").unwrap(), 7);
        assert_eq!(map.get("tenant/alice"), Some(&7));
        assert_eq!(map.get("tenant/bob"), None);
        assert!(SessionId::check("tenant/alice").is_ok());
    }

    #[test]
    fn label_bounds() {
        let mut labels = Labels::new();
        labels.insert("team".into(), "payments".into());
        assert!(validate_labels("labels", labels.iter()).is_ok());
        labels.insert("big".into(), "x".repeat(257));
        assert!(validate_labels("labels", labels.iter()).is_err());
        let many: Labels = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_labels("labels", many.iter()).is_err());
        let bad_key: Labels = [("a b".to_string(), String::new())].into();
        assert!(validate_labels("labels", bad_key.iter()).is_err());
    }
}
