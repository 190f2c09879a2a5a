//! Compact in-memory forms for the per-session data that is mostly alike:
//! a session's labels in one allocation, and shared strings (provider names,
//! scopes) that a million sessions would otherwise each carry a copy of.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};

use super::Labels;

/// A session's labels in one exact-size buffer (no allocation when empty).
///
/// A `BTreeMap<String, String>` with one label costs a tree node of about
/// half a kilobyte plus two strings; held by every session of a large
/// broker that adds up. Each entry is stored as `[key length: u8][key]
/// [value length: u16 LE][value]`, in key order. Keys and values are
/// validated at the edge ([`super::validate_labels`]: keys ≤ 63 bytes,
/// values ≤ 256 bytes), so the lengths always fit.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LabelSet(Option<Box<[u8]>>);

impl LabelSet {
    /// The labels of `map` (in its key order).
    pub fn from_map(map: &Labels) -> Self {
        if map.is_empty() {
            return Self(None);
        }
        let size = map.iter().map(|(k, v)| 3 + k.len() + v.len()).sum();
        let mut buf = Vec::with_capacity(size);
        for (key, value) in map {
            // Longer keys or values than validation allows are cut at a
            // character boundary rather than corrupting the encoding.
            let key = truncate(key, usize::from(u8::MAX));
            let value = truncate(value, usize::from(u16::MAX));
            buf.push(key.len() as u8);
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(&(value.len() as u16).to_le_bytes());
            buf.extend_from_slice(value.as_bytes());
        }
        Self(Some(buf.into_boxed_slice()))
    }

    /// The labels as a map (for answers and storage).
    pub fn to_map(&self) -> Labels {
        self.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The labels in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut rest: &[u8] = self.0.as_deref().unwrap_or_default();
        std::iter::from_fn(move || {
            let (&key_len, tail) = rest.split_first()?;
            let (key, tail) = tail.split_at_checked(usize::from(key_len))?;
            let (len, tail) = tail.split_first_chunk::<2>()?;
            let (value, tail) = tail.split_at_checked(usize::from(u16::from_le_bytes(*len)))?;
            rest = tail;
            // Both were written from `&str`s at character boundaries.
            Some((
                std::str::from_utf8(key).unwrap_or_default(),
                std::str::from_utf8(value).unwrap_or_default(),
            ))
        })
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Whether every label of `selector` is set here with the same value.
    pub fn matches(&self, selector: &Labels) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.get(k) == Some(v.as_str()))
    }
}

impl From<&Labels> for LabelSet {
    fn from(map: &Labels) -> Self {
        Self::from_map(map)
    }
}

impl fmt::Debug for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Most distinct strings [`intern`] keeps; past it, strings are allocated
/// per caller (scopes come from the identity provider, so their number is
/// not ours to bound).
const INTERN_CAPACITY: usize = 4096;

static INTERNED: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Default::default);

/// A shared copy of `s`: provider names and granted scopes repeat across
/// sessions, so they are kept once rather than once per session.
pub fn intern(s: &str) -> Arc<str> {
    let mut set = INTERNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(shared) = set.get(s) {
        return shared.clone();
    }
    let shared: Arc<str> = s.into();
    if set.len() < INTERN_CAPACITY {
        set.insert(shared.clone());
    }
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn round_trips_in_key_order() {
        let labels = map(&[("tier", "gold"), ("a/b", ""), ("team", "payments ✓")]);
        let set = LabelSet::from_map(&labels);
        assert_eq!(set.to_map(), labels);
        let keys: Vec<_> = set.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a/b", "team", "tier"]);
        assert_eq!(set.get("team"), Some("payments ✓"));
        assert_eq!(set.get("a/b"), Some(""));
        assert_eq!(set.get("missing"), None);
        assert!(!set.is_empty());
    }

    #[test]
    fn empty_labels_take_no_buffer() {
        let set = LabelSet::from_map(&Labels::new());
        assert!(set.is_empty());
        assert_eq!(set.iter().count(), 0);
        assert_eq!(set, LabelSet::default());
        assert!(set.matches(&Labels::new()));
    }

    #[test]
    fn holds_the_largest_valid_labels() {
        let labels: Labels = (0..crate::session::MAX_LABELS)
            .map(|i| {
                (
                    format!("{i:0>63}"),
                    "é".repeat(crate::session::MAX_LABEL_VALUE_LEN / 2),
                )
            })
            .collect();
        assert_eq!(LabelSet::from_map(&labels).to_map(), labels);
    }

    #[test]
    fn selectors_match_on_every_label() {
        let set = LabelSet::from_map(&map(&[("tier", "gold"), ("team", "a")]));
        assert!(set.matches(&map(&[("tier", "gold")])));
        assert!(set.matches(&map(&[("tier", "gold"), ("team", "a")])));
        assert!(!set.matches(&map(&[("tier", "silver")])));
        assert!(!set.matches(&map(&[("tier", "gold"), ("region", "eu")])));
    }

    #[test]
    fn oversized_entries_are_cut_at_a_character_boundary() {
        let long = "é".repeat(40_000);
        let set = LabelSet::from_map(&map(&[("k", &long)]));
        let value = set.get("k").unwrap();
        assert!(value.len() <= usize::from(u16::MAX));
        assert!(long.starts_with(value));
    }

    #[test]
    fn interned_strings_are_shared() {
        let a = intern("profile email (labels test)");
        let b = intern("profile email (labels test)");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*intern("other (labels test)"), "other (labels test)");
    }
}
