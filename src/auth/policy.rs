//! The access policy: which callers may do what with which session ids.
//!
//! The file format, pattern semantics and decision rule are documented on the
//! [`auth`](super) module.

use std::fmt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};
use sha2::{Digest, Sha256};

use super::CallerId;

/// What a call does to a session, as the policy names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// RegisterSession.
    Register,
    /// GetToken.
    Get,
    /// WatchToken.
    Watch,
    /// GetSession and ListSessions.
    Inspect,
    /// DeleteSession.
    Delete,
}

impl Operation {
    /// Every operation, in policy-file order.
    pub const ALL: [Operation; 5] = [
        Operation::Register,
        Operation::Get,
        Operation::Watch,
        Operation::Inspect,
        Operation::Delete,
    ];

    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Get => "get",
            Self::Watch => "watch",
            Self::Inspect => "inspect",
            Self::Delete => "delete",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::Register => 1,
            Self::Get => 1 << 1,
            Self::Watch => 1 << 2,
            Self::Inspect => 1 << 3,
            Self::Delete => 1 << 4,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy's answer for one call; the adapter maps it to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Answer `NOT_FOUND`, exactly as for a session that does not exist: the
    /// caller may not learn that this one does.
    NotFound,
    /// Answer `PERMISSION_DENIED`: the caller may know the session exists (or
    /// is registering), but may not do this.
    PermissionDenied,
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {}: {source}", path.display())]
    Read {
        /// The policy file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML (or not UTF-8).
    #[error("policy is not valid TOML: {0}")]
    Syntax(String),
    /// The TOML does not describe a valid policy.
    #[error("policy {location}: {reason}")]
    Invalid {
        /// Where: a top-level key, or `rules[i].field` (rule index counted from 0).
        location: String,
        /// What is wrong there.
        reason: String,
    },
    /// [`PolicyHandle::reload`](super::PolicyHandle::reload) was asked to
    /// re-read a policy that did not come from a file.
    #[error("the policy was not loaded from a file; nothing to reload")]
    NoFile,
}

fn invalid(location: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        location: location.into(),
        reason: reason.into(),
    }
}

/// An immutable, validated policy. Share it behind an `Arc`
/// ([`PolicyHandle`](super::PolicyHandle)).
#[derive(Debug)]
pub struct Policy {
    owner_only: bool,
    rules: Vec<Rule>,
    /// SHA-256 of the text it was parsed from (`None`: built in code), so a
    /// watcher can tell whether a file holds the policy already in force.
    digest: Option<[u8; 32]>,
}

#[derive(Debug)]
struct Rule {
    callers: Vec<Pattern>,
    sessions: Vec<Pattern>,
    allow: OpSet,
    any_owner: bool,
}

/// A set of operations, one bit each.
#[derive(Clone, Copy, PartialEq, Eq)]
struct OpSet(u8);

impl OpSet {
    const ALL: OpSet = OpSet(0b1_1111);

    fn contains(self, op: Operation) -> bool {
        self.0 & op.bit() != 0
    }
}

impl fmt::Debug for OpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(
                Operation::ALL
                    .iter()
                    .filter(|op| self.contains(**op))
                    .map(|op| op.as_str()),
            )
            .finish()
    }
}

/// One `callers` or `sessions` entry: `*` matches any run of characters,
/// including `/`; nothing else is special.
enum Pattern {
    /// `*`: everything.
    Any,
    /// No `*`: the whole value.
    Exact(Box<str>),
    /// Some `*`, compiled by globset with every other glob metacharacter
    /// escaped.
    Glob {
        source: Box<str>,
        matcher: GlobMatcher,
    },
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("\"*\""),
            Self::Exact(text) | Self::Glob { source: text, .. } => write!(f, "{text:?}"),
        }
    }
}

impl Pattern {
    fn compile(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty pattern".into());
        }
        if let Some(bad) = text.chars().find(|c| c.is_control()) {
            return Err(format!("pattern contains {bad:?}"));
        }
        if text != text.trim() {
            return Err("pattern starts or ends with whitespace".into());
        }
        if !text.contains('*') {
            return Ok(Self::Exact(text.into()));
        }
        // `**` would mean something else to globset; to us it is just `*`.
        let mut glob = String::with_capacity(text.len() + 8);
        for (i, piece) in text.split('*').enumerate() {
            if i > 0 && !glob.ends_with('*') {
                glob.push('*');
            }
            glob.push_str(&globset::escape(piece));
        }
        if glob == "*" {
            return Ok(Self::Any);
        }
        let matcher = GlobBuilder::new(&glob)
            .literal_separator(false)
            .backslash_escape(false)
            .build()
            .map_err(|e| format!("bad pattern: {e}"))?
            .compile_matcher();
        Ok(Self::Glob {
            source: text.into(),
            matcher,
        })
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(text) => **text == *value,
            Self::Glob { matcher, .. } => matcher.is_match(value),
        }
    }
}

impl Policy {
    /// Parses and validates a policy file's text. Errors name the top-level
    /// key, or the rule index and field (`rules[1].allow[0]`).
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        let mut policy = Self::from_table(table)?;
        policy.digest = Some(digest(text.as_bytes()));
        Ok(policy)
    }

    /// Parses raw file contents (must be UTF-8).
    pub(super) fn parse_bytes(bytes: &[u8]) -> Result<Self, PolicyError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| PolicyError::Syntax(format!("not UTF-8: {e}")))?;
        Self::parse(text)
    }

    /// Reads and parses a policy file (blocking; the file is small).
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let bytes = std::fs::read(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_bytes(&bytes)
    }

    /// Allows every caller every operation on every session, whoever owns it
    /// (`--insecure-no-auth`, `--dev`).
    pub fn allow_all() -> Self {
        Self {
            owner_only: false,
            rules: vec![Rule {
                callers: vec![Pattern::Any],
                sessions: vec![Pattern::Any],
                allow: OpSet::ALL,
                any_owner: true,
            }],
            digest: None,
        }
    }

    /// Whether sessions belong to the caller that registered them.
    pub fn owner_only(&self) -> bool {
        self.owner_only
    }

    /// How many rules the policy has (for logs).
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub(super) fn digest(&self) -> Option<[u8; 32]> {
        self.digest
    }

    /// The decision for `caller` doing `op` on `session_id` (see the
    /// [module docs](super#decision-rule)).
    ///
    /// `owner`: the caller that registered the session, if known (None:
    /// unknown/none recorded; for `register`, a new id).
    pub fn decide(
        &self,
        caller: &CallerId,
        op: Operation,
        session_id: &str,
        owner: Option<&CallerId>,
    ) -> Decision {
        let mut may_know = false;
        for rule in self.matching_rules(caller, session_id) {
            if rule.allow.contains(op) && self.owns_enough(rule, caller, op, owner) {
                return Decision::Allow;
            }
            may_know = may_know || self.grants_any(rule, caller, owner);
        }
        if op == Operation::Register || may_know {
            Decision::PermissionDenied
        } else {
            Decision::NotFound
        }
    }

    /// Whether some rule grants `caller` some operation (register included) on
    /// `session_id`, considering ownership: if not, a denied call must look
    /// exactly like a missing session.
    pub fn may_know(&self, caller: &CallerId, session_id: &str, owner: Option<&CallerId>) -> bool {
        self.matching_rules(caller, session_id)
            .any(|rule| self.grants_any(rule, caller, owner))
    }

    fn matching_rules<'a>(
        &'a self,
        caller: &'a CallerId,
        session_id: &'a str,
    ) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |rule| {
            rule.sessions.iter().any(|p| p.matches(session_id))
                && rule.callers.iter().any(|p| p.matches(caller.as_str()))
        })
    }

    fn grants_any(&self, rule: &Rule, caller: &CallerId, owner: Option<&CallerId>) -> bool {
        Operation::ALL
            .iter()
            .any(|&op| rule.allow.contains(op) && self.owns_enough(rule, caller, op, owner))
    }

    /// The ownership condition of `rule` for `op`.
    fn owns_enough(
        &self,
        rule: &Rule,
        caller: &CallerId,
        op: Operation,
        owner: Option<&CallerId>,
    ) -> bool {
        if !self.owner_only || rule.any_owner {
            return true;
        }
        match owner {
            Some(owner) => owner == caller,
            None => op == Operation::Register,
        }
    }

    fn from_table(table: toml::Table) -> Result<Self, PolicyError> {
        let mut owner_only = false;
        let mut rules = Vec::new();
        for (key, value) in table {
            match key.as_str() {
                "owner_only" => owner_only = expect_bool(value, "owner_only")?,
                "rules" => {
                    let toml::Value::Array(items) = value else {
                        return Err(invalid("rules", "must be an array of tables ([[rules]])"));
                    };
                    for (index, item) in items.into_iter().enumerate() {
                        rules.push(parse_rule(index, item)?);
                    }
                }
                other => {
                    return Err(invalid(other, "unknown key (expected owner_only or rules)"));
                }
            }
        }
        Ok(Self {
            owner_only,
            rules,
            digest: None,
        })
    }
}

pub(super) fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_rule(index: usize, value: toml::Value) -> Result<Rule, PolicyError> {
    let here = |field: &str| format!("rules[{index}].{field}");
    let toml::Value::Table(table) = value else {
        return Err(invalid(format!("rules[{index}]"), "must be a table"));
    };
    let mut callers = None;
    let mut sessions = None;
    let mut allow = None;
    let mut any_owner = false;
    for (key, value) in table {
        match key.as_str() {
            "callers" => callers = Some(patterns(value, &here("callers"))?),
            "sessions" => sessions = Some(patterns(value, &here("sessions"))?),
            "allow" => allow = Some(operations(value, &here("allow"))?),
            "any_owner" => any_owner = expect_bool(value, &here("any_owner"))?,
            other => {
                return Err(invalid(
                    here(other),
                    "unknown key (expected callers, sessions, allow or any_owner)",
                ));
            }
        }
    }
    let missing = |field: &str| invalid(here(field), "missing");
    Ok(Rule {
        callers: callers.ok_or_else(|| missing("callers"))?,
        sessions: sessions.ok_or_else(|| missing("sessions"))?,
        allow: allow.ok_or_else(|| missing("allow"))?,
        any_owner,
    })
}

fn expect_bool(value: toml::Value, location: &str) -> Result<bool, PolicyError> {
    match value {
        toml::Value::Boolean(b) => Ok(b),
        other => Err(invalid(
            location,
            format!("must be true or false, not a {}", other.type_str()),
        )),
    }
}

/// A non-empty array of strings.
fn strings(value: toml::Value, location: &str) -> Result<Vec<(String, String)>, PolicyError> {
    let toml::Value::Array(items) = value else {
        return Err(invalid(
            location,
            format!("must be an array of strings, not a {}", value.type_str()),
        ));
    };
    if items.is_empty() {
        return Err(invalid(location, "must not be empty"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{location}[{i}]");
            match item {
                toml::Value::String(s) => Ok((at, s)),
                other => Err(invalid(
                    at,
                    format!("must be a string, not a {}", other.type_str()),
                )),
            }
        })
        .collect()
}

fn patterns(value: toml::Value, location: &str) -> Result<Vec<Pattern>, PolicyError> {
    strings(value, location)?
        .into_iter()
        .map(|(at, text)| Pattern::compile(&text).map_err(|reason| invalid(at, reason)))
        .collect()
}

fn operations(value: toml::Value, location: &str) -> Result<OpSet, PolicyError> {
    let mut set = OpSet(0);
    for (at, name) in strings(value, location)? {
        if name == "*" {
            set = OpSet::ALL;
            continue;
        }
        let Some(op) = Operation::ALL.iter().find(|op| op.as_str() == name) else {
            return Err(invalid(
                at,
                format!(
                    "unknown operation {name:?} (expected register, get, watch, inspect, delete or *)"
                ),
            ));
        };
        set.0 |= op.bit();
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Allow, NotFound, PermissionDenied};
    use Operation::{Delete, Get, Inspect, Register, Watch};

    /// The example from the module docs.
    const EXAMPLE: &str = r#"
# Sessions belong to the caller that registered them, except for admin rules.
owner_only = true

[[rules]]
callers = ["spiffe://cluster.local/ns/payments/sa/*"]
sessions = ["payments/*"]
allow = ["register", "get", "watch", "inspect", "delete"]

[[rules]]
callers = ["spiffe://cluster.local/ns/ops/sa/support"]
sessions = ["*"]
allow = ["inspect"]
any_owner = true
"#;

    const API: &str = "spiffe://cluster.local/ns/payments/sa/api";
    const WORKER: &str = "spiffe://cluster.local/ns/payments/sa/worker";
    const SUPPORT: &str = "spiffe://cluster.local/ns/ops/sa/support";

    fn c(s: &str) -> CallerId {
        CallerId::new(s)
    }

    fn parse(text: &str) -> Policy {
        Policy::parse(text).unwrap()
    }

    fn parse_err(text: &str) -> String {
        Policy::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn every_decision_outcome() {
        let p = parse(
            r#"
            [[rules]]
            callers = ["reader"]
            sessions = ["t/*"]
            allow = ["get", "inspect"]
            "#,
        );
        let reader = c("reader");
        assert_eq!(p.decide(&reader, Get, "t/1", None), Allow);
        assert_eq!(p.decide(&reader, Inspect, "t/1", None), Allow);
        // Another operation is allowed on the id: the caller may know it.
        assert_eq!(p.decide(&reader, Watch, "t/1", None), PermissionDenied);
        assert_eq!(p.decide(&reader, Delete, "t/1", None), PermissionDenied);
        assert!(p.may_know(&reader, "t/1", None));
        // No rule mentions the id: indistinguishable from a missing session.
        assert_eq!(p.decide(&reader, Get, "u/1", None), NotFound);
        assert_eq!(p.decide(&reader, Delete, "u/1", None), NotFound);
        assert!(!p.may_know(&reader, "u/1", None));
        // Nor the caller.
        assert_eq!(p.decide(&c("other"), Get, "t/1", None), NotFound);
        // Register denials are always PERMISSION_DENIED.
        assert_eq!(p.decide(&reader, Register, "t/1", None), PermissionDenied);
        assert_eq!(p.decide(&reader, Register, "u/1", None), PermissionDenied);
    }

    #[test]
    fn empty_policy_denies_everything() {
        for text in ["", "owner_only = true", "rules = []"] {
            let p = parse(text);
            assert_eq!(p.decide(&c("a"), Get, "s", None), NotFound);
            assert_eq!(p.decide(&c("a"), Register, "s", None), PermissionDenied);
        }
    }

    #[test]
    fn exact_and_glob_callers() {
        let p = parse(
            r#"
            [[rules]]
            callers = ["spiffe://cluster.local/ns/payments/sa/*", "web.default.serviceaccount.identity.linkerd.cluster.local"]
            sessions = ["*"]
            allow = ["get"]
            "#,
        );
        for ok in [
            API,
            WORKER,
            // `*` crosses `/`.
            "spiffe://cluster.local/ns/payments/sa/a/b",
            "web.default.serviceaccount.identity.linkerd.cluster.local",
        ] {
            assert_eq!(p.decide(&c(ok), Get, "s", None), Allow, "{ok}");
        }
        for denied in [
            "spiffe://cluster.local/ns/payments/sa",
            "spiffe://cluster.local/ns/payments-evil/sa/api",
            "spiffe://evil/spiffe://cluster.local/ns/payments/sa/api",
            "SPIFFE://cluster.local/ns/payments/sa/api",
            "web.default.serviceaccount.identity.linkerd.cluster.local.evil",
            "x.web.default.serviceaccount.identity.linkerd.cluster.local",
        ] {
            assert_eq!(p.decide(&c(denied), Get, "s", None), NotFound, "{denied}");
        }
    }

    #[test]
    fn exact_and_glob_sessions() {
        let p = parse(
            r#"
            [[rules]]
            callers = ["a"]
            sessions = ["payments/*", "exact-id", "*-eu/*/x", "lit?[a]{b}*"]
            allow = ["get"]
            "#,
        );
        let a = c("a");
        for ok in [
            "payments/1",
            "payments/a/b",
            "payments/",
            "exact-id",
            "t-eu/a/x",
            "t-eu/a/b/x",
            "lit?[a]{b}",
            "lit?[a]{b}more",
        ] {
            assert_eq!(p.decide(&a, Get, ok, None), Allow, "{ok}");
        }
        for denied in [
            "payments",
            "other/payments/1",
            "Payments/1",
            "exact-id2",
            "xexact-id",
            "t-eu/a/x/y",
            "litX[a]{b}",
            "lit?a{b}",
        ] {
            assert_eq!(p.decide(&a, Get, denied, None), NotFound, "{denied}");
        }
    }

    #[test]
    fn star_allows_every_operation() {
        let p = parse(
            r#"
            [[rules]]
            callers = ["a"]
            sessions = ["s"]
            allow = ["*"]
            "#,
        );
        for op in Operation::ALL {
            assert_eq!(p.decide(&c("a"), op, "s", None), Allow, "{op}");
        }
    }

    #[test]
    fn ownership_with_the_example_policy() {
        let p = parse(EXAMPLE);
        assert!(p.owner_only());
        let (api, worker, support) = (c(API), c(WORKER), c(SUPPORT));

        // A new id: register is allowed (the caller becomes the owner).
        assert_eq!(p.decide(&api, Register, "payments/1", None), Allow);
        // The owner may do everything.
        for op in Operation::ALL {
            assert_eq!(p.decide(&api, op, "payments/1", Some(&api)), Allow, "{op}");
        }
        // Another payments caller: as if the session did not exist...
        for op in [Get, Watch, Inspect, Delete] {
            assert_eq!(
                p.decide(&worker, op, "payments/1", Some(&api)),
                NotFound,
                "{op}"
            );
        }
        assert!(!p.may_know(&worker, "payments/1", Some(&api)));
        // ...and it may not take the id over.
        assert_eq!(
            p.decide(&worker, Register, "payments/1", Some(&api)),
            PermissionDenied
        );
        // The admin rule ignores ownership, for what it allows.
        assert_eq!(p.decide(&support, Inspect, "payments/1", Some(&api)), Allow);
        assert_eq!(
            p.decide(&support, Get, "payments/1", Some(&api)),
            PermissionDenied
        );
        assert_eq!(
            p.decide(&support, Register, "payments/2", None),
            PermissionDenied
        );
        assert_eq!(
            p.decide(&support, Delete, "other/1", None),
            PermissionDenied
        );
        // Outside payments/*, the payments callers know nothing.
        assert_eq!(p.decide(&api, Get, "other/1", Some(&api)), NotFound);
        assert_eq!(p.decide(&api, Register, "other/1", None), PermissionDenied);
    }

    #[test]
    fn any_owner_rule_grants_despite_owner_mismatch() {
        let p = parse(
            r#"
            owner_only = true
            [[rules]]
            callers = ["*"]
            sessions = ["*"]
            allow = ["*"]
            [[rules]]
            callers = ["auditor"]
            sessions = ["*"]
            allow = ["inspect"]
            any_owner = true
            "#,
        );
        let (alice, auditor) = (c("alice"), c("auditor"));
        assert_eq!(p.decide(&auditor, Get, "s", Some(&alice)), PermissionDenied);
        assert_eq!(p.decide(&auditor, Inspect, "s", Some(&alice)), Allow);
        assert_eq!(p.decide(&c("bob"), Get, "s", Some(&alice)), NotFound);
    }

    #[test]
    fn unknown_owner_under_owner_only() {
        let p = parse(
            r#"
            owner_only = true
            [[rules]]
            callers = ["writer"]
            sessions = ["*"]
            allow = ["register", "get"]
            [[rules]]
            callers = ["reader"]
            sessions = ["*"]
            allow = ["get"]
            [[rules]]
            callers = ["admin"]
            sessions = ["*"]
            allow = ["get"]
            any_owner = true
            "#,
        );
        // No recorded owner: owner-only rules grant only register.
        assert_eq!(p.decide(&c("writer"), Register, "s", None), Allow);
        assert_eq!(p.decide(&c("writer"), Get, "s", None), PermissionDenied);
        assert_eq!(p.decide(&c("reader"), Get, "s", None), NotFound);
        assert!(!p.may_know(&c("reader"), "s", None));
        assert_eq!(p.decide(&c("admin"), Get, "s", None), Allow);
    }

    #[test]
    fn owner_is_ignored_without_owner_only() {
        let p = parse(
            r#"
            [[rules]]
            callers = ["*"]
            sessions = ["*"]
            allow = ["get"]
            "#,
        );
        assert!(!p.owner_only());
        assert_eq!(p.decide(&c("bob"), Get, "s", Some(&c("alice"))), Allow);
    }

    #[test]
    fn allow_all_allows_everything() {
        let p = Policy::allow_all();
        assert!(!p.owner_only());
        for op in Operation::ALL {
            for caller in ["", "anyone", API] {
                assert_eq!(
                    p.decide(&c(caller), op, "any/id", Some(&c("someone-else"))),
                    Allow
                );
                assert_eq!(p.decide(&c(caller), op, "x", None), Allow);
            }
        }
    }

    #[test]
    fn parse_errors_name_the_rule_and_field() {
        let rule = |body: &str| {
            format!(
                "[[rules]]\ncallers=[\"a\"]\nsessions=[\"s\"]\nallow=[\"get\"]\n[[rules]]\n{body}"
            )
        };
        let cases = [
            (
                rule("callers=[\"a\"]\nsessions=[\"s\"]\nallow=[\"get\", \"reed\"]"),
                "rules[1].allow[1]",
                "unknown operation \"reed\"",
            ),
            (
                rule("callers=[\"a\"]\nsessions=[\"s\"]\nallow=[\"get\"]\nalow=[\"get\"]"),
                "rules[1].alow",
                "unknown key",
            ),
            (
                rule("callers=[\"a\"]\nallow=[\"get\"]"),
                "rules[1].sessions",
                "missing",
            ),
            (
                rule("callers=[]\nsessions=[\"s\"]\nallow=[\"get\"]"),
                "rules[1].callers",
                "must not be empty",
            ),
            (
                rule("callers=\"a\"\nsessions=[\"s\"]\nallow=[\"get\"]"),
                "rules[1].callers",
                "array of strings",
            ),
            (
                rule("callers=[\"a\", 3]\nsessions=[\"s\"]\nallow=[\"get\"]"),
                "rules[1].callers[1]",
                "must be a string",
            ),
            (
                rule("callers=[\"a\"]\nsessions=[\"\"]\nallow=[\"get\"]"),
                "rules[1].sessions[0]",
                "empty pattern",
            ),
            (
                rule("callers=[\" a\"]\nsessions=[\"s\"]\nallow=[\"get\"]"),
                "rules[1].callers[0]",
                "whitespace",
            ),
            (
                rule("callers=[\"a\"]\nsessions=[\"s\"]\nallow=[\"get\"]\nany_owner=\"yes\""),
                "rules[1].any_owner",
                "true or false",
            ),
            ("owner_only = 1".to_owned(), "owner_only", "true or false"),
            ("onwer_only = true".to_owned(), "onwer_only", "unknown key"),
            ("rules = 3".to_owned(), "rules", "array of tables"),
            ("rules = [3]".to_owned(), "rules[0]", "must be a table"),
        ];
        for (text, location, reason) in cases {
            let err = parse_err(&text);
            assert!(
                err.contains(&format!("{location}:")) && err.contains(reason),
                "{text:?} gave {err:?}"
            );
        }
        assert!(parse_err("[[rules]\n").contains("not valid TOML"));
        assert!(matches!(
            Policy::parse_bytes(b"owner_only = \xff"),
            Err(PolicyError::Syntax(_))
        ));
    }

    #[test]
    fn digest_identifies_the_text() {
        let a = parse(EXAMPLE);
        let b = parse(EXAMPLE);
        assert_eq!(a.digest(), Some(digest(EXAMPLE.as_bytes())));
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), parse("").digest());
        assert_eq!(Policy::allow_all().digest(), None);
        assert_eq!(a.rule_count(), 2);
    }

    #[test]
    fn debug_shows_patterns_not_regexes() {
        let text = format!("{:?}", parse(EXAMPLE));
        assert!(text.contains("\"payments/*\""), "{text}");
        assert!(text.contains("\"inspect\""), "{text}");
        assert!(!text.contains("regex"), "{text}");
    }
}
