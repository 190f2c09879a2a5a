//! Who is calling, and what they may do with which session.
//!
//! This module is transport-neutral: the gRPC adapter reads the peer
//! certificate or one header, hands it to one of the `caller_from_*`
//! functions, and asks the current [`Policy`] for a [`Decision`]. Nothing here
//! knows tonic; header values arrive as `&str`.
//!
//! # Identity sources
//!
//! Config picks one [`IdentitySource`]; the others are never consulted, since a
//! caller that bypasses the sidecar can forge the mesh headers.
//!
//! - `mtls`: the broker terminates TLS and requires a client certificate.
//!   [`caller_from_certificate`] takes the leaf certificate (DER, already
//!   verified by the TLS layer) and returns its `spiffe://` URI SAN, or, when it
//!   has none, its subject DN as x509-parser prints it: attributes in
//!   certificate order, `, `-separated, e.g. `O=Example, CN=client`.
//! - `xfcc`: an Istio/Envoy sidecar terminates mTLS and sets
//!   `x-forwarded-client-cert`. [`caller_from_xfcc`] reads only the **last**
//!   element (the one the local sidecar appended; earlier ones can come from
//!   the client) and returns its `URI=` field. If the request carries several
//!   header lines, join them in order with `,` as HTTP does.
//! - `linkerd`: the Linkerd proxy sets `l5d-client-id` to a DNS-like identity
//!   such as `web.default.serviceaccount.identity.linkerd.cluster.local`;
//!   [`caller_from_l5d`] trims and checks it.
//! - `none`: no identity at all. Only sensible with [`Policy::allow_all`]
//!   (`--insecure-no-auth`, `--dev`).
//!
//! When a source is configured and yields no identity ([`IdentityError::Missing`])
//! or an unreadable one ([`IdentityError::Malformed`]), the call is
//! `UNAUTHENTICATED` and the policy is not consulted.
//!
//! # Policy file
//!
//! A TOML file of rules; anything no rule allows is denied.
//!
//! ```toml
//! # Sessions belong to the caller that registered them, except for admin rules.
//! owner_only = true
//!
//! [[rules]]
//! callers = ["spiffe://cluster.local/ns/payments/sa/*"]
//! sessions = ["payments/*"]
//! allow = ["register", "get", "watch", "inspect", "delete"]
//!
//! [[rules]]
//! callers = ["spiffe://cluster.local/ns/ops/sa/support"]
//! sessions = ["*"]
//! allow = ["inspect"]
//! any_owner = true
//! ```
//!
//! Top-level keys: `owner_only` (bool, default `false`) and `rules` (array of
//! tables, default none: everything denied). Each rule has:
//!
//! - `callers`: caller identity patterns (non-empty list);
//! - `sessions`: session id patterns (non-empty list);
//! - `allow`: operations (non-empty list) out of `register`, `get`, `watch`,
//!   `inspect` (GetSession and ListSessions), `delete`, or `*` for all five;
//! - `any_owner` (bool, default `false`): the rule ignores ownership (an admin
//!   rule).
//!
//! Unknown keys and unknown operations are errors; errors name the rule (its
//! index counted from 0 in file order, e.g. `rules[1].allow[0]`) and field.
//!
//! ## Patterns
//!
//! The only special character is `*`, which matches any run of characters,
//! possibly empty, **including `/`** (and `.`, `:`). A pattern without `*` must
//! equal the whole value. Matching is case-sensitive and anchored at both ends.
//! So `payments/*` matches `payments/a` and `payments/a/b` but not `payments`
//! or `other/payments/a`; `*` alone matches every value;
//! `spiffe://cluster.local/ns/payments/sa/*` matches every service account of
//! namespace `payments` (Istio never puts a `/` in a service account name).
//! Anchor patterns on a separator: `spiffe://cluster.local/ns/pay*` also
//! matches namespace `payroll`.
//!
//! ## Ownership
//!
//! The broker records the caller that registered a session (its *owner*). With
//! `owner_only = true`, a rule without `any_owner = true` applies only when the
//! caller is the session's owner, or, for `register` only, when no owner is
//! known (a new id). A session without a recorded owner (registered before
//! auth was on) is reachable only through `any_owner` rules.
//!
//! ## Decision rule
//!
//! For a call by `caller` doing operation `op` on session id `id` whose
//! recorded owner is `owner` ([`Policy::decide`]):
//!
//! - A rule *grants* an operation when one of its `callers` patterns matches
//!   the caller, one of its `sessions` patterns matches `id`, its `allow` list
//!   names the operation (or `*`), and its ownership condition (above) holds.
//!
//! 1. If some rule grants `op`: **Allow**.
//! 2. Else, if `op` is `register`: **PERMISSION_DENIED**.
//! 3. Else, if some rule grants the caller *any* operation on `id` (register
//!    included: it reveals a taken id anyway) — the caller may know the
//!    session exists ([`Policy::may_know`]): **PERMISSION_DENIED**.
//! 4. Else: **NOT_FOUND**, the same answer as for a session that does not
//!    exist, so a denied call is no oracle of whether a session exists.
//!
//! The adapter looks the session up first: a session that does not exist is
//! `NOT_FOUND` whatever the policy says; for one that exists, it passes the
//! recorded owner. For `register`, it passes the owner of the existing session
//! with that id, or `None` for a new id. ListSessions lists only the sessions
//! for which `decide(.., Operation::Inspect, ..)` is `Allow`.
//!
//! # Reload
//!
//! [`PolicyHandle`] holds the current policy behind an `Arc`; a call takes
//! [`PolicyHandle::current`] once and decides against that snapshot. A reload
//! ([`PolicyHandle::reload`] on SIGHUP, or [`PolicyHandle::watch_file`]
//! polling) swaps in a new policy only if it parses; otherwise the old one
//! stays and the reason is logged. Streams already open are not re-checked or
//! dropped: a policy applies to calls that start after it is installed.

use std::fmt;
use std::sync::Arc;

mod identity;
mod policy;
mod reload;

pub use identity::{
    IdentityError, MAX_IDENTITY_LEN, caller_from_certificate, caller_from_l5d, caller_from_xfcc,
};
pub use policy::{Decision, Operation, Policy, PolicyError};
pub use reload::PolicyHandle;

/// The authenticated identity of a caller: a SPIFFE id, a certificate subject
/// DN or a Linkerd identity. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct CallerId(Arc<str>);

impl CallerId {
    /// Wraps an identity already extracted and checked by its source.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The identity as policy patterns see it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CallerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the caller identity comes from (config key; `snake_case` in files).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// No identity: every caller is anonymous (insecure; dev only).
    None,
    /// The client certificate of the broker's own TLS listener.
    Mtls,
    /// The last element of Envoy's `x-forwarded-client-cert` header.
    Xfcc,
    /// Linkerd's `l5d-client-id` header.
    Linkerd,
}

impl IdentitySource {
    /// The request header this source reads, if it reads one (lowercase).
    pub fn header_name(self) -> Option<&'static str> {
        match self {
            Self::Xfcc => Some("x-forwarded-client-cert"),
            Self::Linkerd => Some("l5d-client-id"),
            Self::None | Self::Mtls => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_source_names_in_config() {
        for (source, name) in [
            (IdentitySource::None, "none"),
            (IdentitySource::Mtls, "mtls"),
            (IdentitySource::Xfcc, "xfcc"),
            (IdentitySource::Linkerd, "linkerd"),
        ] {
            let json = serde_json::to_string(&source).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            let back: IdentitySource = serde_json::from_str(&json).unwrap();
            assert_eq!(back, source);
        }
        assert!(serde_json::from_str::<IdentitySource>("\"spiffe\"").is_err());
    }

    #[test]
    fn header_names() {
        assert_eq!(
            IdentitySource::Xfcc.header_name(),
            Some("x-forwarded-client-cert")
        );
        assert_eq!(IdentitySource::Linkerd.header_name(), Some("l5d-client-id"));
        assert_eq!(IdentitySource::Mtls.header_name(), None);
    }

    #[test]
    fn caller_id_displays_as_itself() {
        let id = CallerId::new("spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(id, CallerId::new(String::from(id.as_str())));
    }
}
