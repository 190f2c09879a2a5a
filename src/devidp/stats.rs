//! Counters the tests judge the broker by: global ([`IdpStats`]) and per session ([`FamilyStats`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Global counters, as returned by [`DevIdp::stats`](super::DevIdp::stats) and
/// `GET /admin/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IdpStats {
    /// Requests to the token endpoint, whatever their fate (faults included).
    pub token_requests: u64,
    /// Logins (`login()`, `POST /admin/login`).
    pub logins: u64,
    /// Refresh grants answered 200 (including those whose answer a fault then dropped).
    pub refreshes_succeeded: u64,
    /// Token requests answered with an OAuth error (before any fault mangled the answer).
    pub refreshes_rejected: u64,
    /// `refreshes_rejected` by `error_description` (`"Stale token"`, `"Session not active"`,
    /// `"Invalid client or Invalid client credentials"` …).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Refresh tokens presented after a newer token of their session had been issued,
    /// whatever the outcome: replays and allowed reuses alike.
    pub stale_presentations: u64,
    /// Presentations rejected as a replay (`"Stale token"`); each ends its session.
    pub replays_rejected: u64,
    /// Presentations accepted as a reuse within `refresh_token_max_reuse`.
    pub reuses_allowed: u64,
    /// Sessions ended by the rotation discipline (replay or reuse over budget).
    pub sessions_killed: u64,
    /// Accepted logout requests.
    pub logouts: u64,
    /// Accepted revocation requests (whether or not the token was live).
    pub revocations: u64,
    /// Token requests a fault was applied to.
    pub faults_injected: u64,
    /// `faults_injected` by fault type (`"delay"`, `"drop_after_processing"` …).
    pub faults_by_kind: BTreeMap<String, u64>,
    /// Token requests in flight now (from arrival until answered), over all sessions.
    pub in_flight: u64,
    /// The most token requests of one session ever in flight at once. More than 1 means a
    /// client presented refresh tokens of a session concurrently.
    pub max_in_flight_per_family: u64,
    /// Sessions currently active.
    pub active_sessions: u64,
}

/// Where a session (token family) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FamilyState {
    /// Live: its newest refresh token works.
    Active,
    /// Ended by the logout endpoint.
    LoggedOut,
    /// Ended by revoking one of its refresh tokens.
    Revoked,
    /// Ended through `end_session` / `POST /admin/sessions/{id}/end`.
    EndedByAdmin,
    /// Ended because a stale refresh token was replayed.
    ReplayDetected,
    /// Ended because a refresh token was reused over `refresh_token_max_reuse`.
    ReuseExceeded,
    /// Not refreshed within SSO Session Idle.
    IdleExpired,
    /// Older than SSO Session Max.
    MaxExpired,
}

/// Counters of one session ("token family", keyed by `session_state`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyStats {
    /// The session id (`session_state`, `sid` claim).
    pub session_state: String,
    /// The user who logged in.
    pub username: String,
    /// Where the session stands.
    pub state: FamilyState,
    /// Refresh tokens issued after the login's: the newest token's sequence number.
    pub generation: u64,
    /// Refresh requests that carried a valid refresh token of this session.
    pub presentations: u64,
    /// Refreshes answered 200.
    pub refreshes_succeeded: u64,
    /// Refreshes answered with an OAuth error.
    pub refreshes_rejected: u64,
    /// `refreshes_rejected` by `error_description`.
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Presentations of a token older than the newest (replays and allowed reuses).
    pub stale_presentations: u64,
    /// Presentations rejected as a replay.
    pub replays_rejected: u64,
    /// Presentations accepted as a reuse.
    pub reuses_allowed: u64,
    /// Token requests of this session in flight now.
    pub in_flight: u64,
    /// The most token requests of this session ever in flight at once.
    pub max_in_flight: u64,
    /// Login time, Unix seconds on the IdP's clock.
    pub started_at: u64,
    /// Last successful refresh (or the login), Unix seconds on the IdP's clock.
    pub last_refresh_at: u64,
}
