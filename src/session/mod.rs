//! Session state: what one registered login is, what callers may see of it,
//! and the registry that holds them all.
//!
//! A [`Session`] keeps two things apart:
//! - the **published** view ([`Published`], lock-free behind an `ArcSwap`,
//!   plus a `watch` channel made on the first subscription): the current
//!   access token, the phase, warnings. The hot path and the watch streams read
//!   only this, without taking the session's mutex;
//! - the **inner** state ([`SessionInner`], a `std::sync::Mutex`): the refresh
//!   token, generation, failure bookkeeping and the in-flight refresh marker.
//!   It is locked for short, synchronous sections only — never across `.await`.

mod id;
mod labels;
mod registry;

pub use id::{
    Labels, MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS, MAX_SESSION_ID_LEN, SessionId,
    validate_labels,
};
pub use labels::{LabelSet, intern};
pub use registry::Registry;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::oidc::RefreshExpiry;
use crate::refresh::{Flight, PendingCommit};
use crate::secret::{AccessToken, RefreshToken};

/// An access token as handed to callers, with its generation.
#[derive(Debug)]
pub struct IssuedToken {
    /// The bearer token.
    pub access_token: AccessToken,
    /// When it stops being valid.
    pub expires_at: SystemTime,
    /// When the request that obtained it was sent (its lifetime starts here).
    pub issued_at: SystemTime,
    /// Granted scope (may be empty).
    pub scope: Arc<str>,
    /// The session generation this token belongs to.
    pub generation: u64,
}

impl IssuedToken {
    /// Time left at `now` (zero when expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }

    /// Whether it stays valid for at least `ttl` after `now`.
    pub fn valid_for(&self, now: SystemTime, ttl: Duration) -> bool {
        self.expires_at > now && self.remaining(now) >= ttl
    }

    /// The lifetime the identity provider granted.
    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO)
    }
}

/// Lifecycle state (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Usable.
    Active,
    /// The identity provider rejected the refresh token; terminal until re-registered.
    ReauthRequired,
}

impl SessionState {
    /// Stable lowercase name, for storage and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::ReauthRequired => "reauth_required",
        }
    }
}

/// The class of the last failure, as shown in session metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The provider refused the refresh token.
    RejectedSession,
    /// The provider refused the broker's client configuration.
    RejectedConfig,
    /// Network, timeout, 5xx, 429.
    Transient,
    /// The answer could not be read.
    Unreadable,
    /// The refresh succeeded but could not be stored.
    Store,
}

/// The last failure of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionError {
    /// What kind of failure.
    pub class: ErrorClass,
    /// Human-readable reason (never a token).
    pub description: String,
    /// When it happened.
    pub at: SystemTime,
}

/// Why a session ended, as told to its watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The user must log in again.
    ReauthenticationRequired(String),
    /// The session was deleted.
    Deleted,
}

/// What callers may see of a session: read lock-free, streamed to watchers.
#[derive(Debug, Clone)]
pub struct Published {
    /// The current access token, if any.
    pub token: Option<Arc<IssuedToken>>,
    /// Set once the session has ended; no token follows.
    pub ended: Option<EndReason>,
    /// Set when the refresh token's hard maximum is near: the user must log in again by then.
    pub reauth_due_at: Option<SystemTime>,
    /// The caller that registered the session (mirrors the inner state, so
    /// authorization on the hot path never takes the session's mutex).
    pub owner: Option<Arc<str>>,
}

/// The mutable state of a session; locked only for short synchronous sections.
#[derive(Debug)]
pub struct SessionInner {
    /// Provider name (a key of the configured providers).
    pub provider: Arc<str>,
    /// Caller labels (compact: one buffer).
    pub labels: LabelSet,
    /// The caller identity that registered it (policy `owner_only`).
    pub owner: Option<Arc<str>>,
    /// The newest refresh token received; the only one that may be presented.
    pub refresh_token: RefreshToken,
    /// Fingerprint of the refresh token the caller registered (idempotent re-registration).
    pub registered_fingerprint: [u8; 32],
    /// When the refresh token lapses.
    pub refresh_expiry: RefreshExpiry,
    /// The longest refresh lifetime the provider has granted this session; a
    /// shorter one later means the hard maximum caps it.
    pub longest_refresh_lifetime: Option<Duration>,
    /// Bumped by every successful refresh; the compare-and-swap key in the store.
    pub generation: u64,
    /// Lifecycle state.
    pub state: SessionState,
    /// When the session was registered.
    pub created_at: SystemTime,
    /// When the last successful refresh was sent.
    pub last_refresh_at: Option<SystemTime>,
    /// The next planned refresh (for inspection).
    pub next_refresh_at: Option<SystemTime>,
    /// Failure bookkeeping, out of line: most sessions never fail, so
    /// most carry only an empty pointer here.
    pub trouble: Option<Box<Trouble>>,
    /// The refresh in flight, if any (single-flight marker).
    pub flight: Option<Flight>,
    /// Refreshes started so far (sequence numbers of flights).
    pub flights_started: u64,
    /// Set by delete: no refresh may start any more.
    pub deleting: bool,
}

/// What a session remembers of failed refreshes until one succeeds.
#[derive(Debug, Default)]
pub struct Trouble {
    /// Failed refreshes since the last success.
    pub consecutive_failures: u32,
    /// The last failure.
    pub last_error: Option<SessionError>,
    /// No on-demand refresh before this (provider `Retry-After` or backoff).
    pub retry_not_before: Option<SystemTime>,
    /// No background retry before this (backoff after a failure).
    pub retry_at: Option<SystemTime>,
    /// A rotation received but not yet stored: written first on the next attempt.
    pub pending: Option<Box<PendingCommit>>,
}

static NO_TROUBLE: Trouble = Trouble {
    consecutive_failures: 0,
    last_error: None,
    retry_not_before: None,
    retry_at: None,
    pending: None,
};

impl SessionInner {
    /// The failure bookkeeping (all clear when there is none).
    pub fn trouble(&self) -> &Trouble {
        self.trouble.as_deref().unwrap_or(&NO_TROUBLE)
    }

    /// The failure bookkeeping, made on first use.
    pub fn trouble_mut(&mut self) -> &mut Trouble {
        self.trouble.get_or_insert_with(Box::default)
    }

    /// Forgets every failure (after a success).
    pub fn clear_trouble(&mut self) {
        self.trouble = None;
    }

    /// Drops a held rotation, if any.
    pub fn drop_pending(&mut self) {
        if let Some(trouble) = self.trouble.as_mut() {
            trouble.pending = None;
        }
    }
}

/// One registered login.
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    /// The current view, read lock-free on the hot path.
    published: ArcSwap<Published>,
    /// Wakes watch streams; made on the first subscription, so a session
    /// nobody watches does not carry a channel (hundreds of bytes).
    watchers: Mutex<Option<watch::Sender<Arc<Published>>>>,
    inner: Mutex<SessionInner>,
    /// Unix seconds of the last `GetAccessToken`, so idle sessions cost no refreshes.
    last_used: AtomicU64,
}

impl Session {
    /// A session with its initial state and published view.
    pub fn new(id: SessionId, inner: SessionInner, published: Published) -> Self {
        Self {
            id,
            published: ArcSwap::from_pointee(published),
            watchers: Mutex::new(None),
            inner: Mutex::new(inner),
            last_used: AtomicU64::new(0),
        }
    }

    /// Consumes the session, returning its inner state.
    pub fn into_inner(self) -> SessionInner {
        self.inner
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The session id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// The published view (lock-free: an `Arc` clone).
    pub fn published(&self) -> Arc<Published> {
        self.published.load_full()
    }

    /// Replaces the published view and wakes every watcher.
    pub fn publish(&self, published: Published) {
        let next = Arc::new(published);
        // Stored and sent under one lock, so that concurrent publishers
        // leave watchers on the same (last) view as readers.
        let watchers = self.watch_lock();
        self.published.store(next.clone());
        if let Some(sender) = watchers.as_ref() {
            sender.send_replace(next);
        }
    }

    /// Changes the published view in place and wakes every watcher.
    pub fn publish_with(&self, change: impl FnOnce(&mut Published)) {
        let watchers = self.watch_lock();
        let mut next = Published::clone(&self.published.load());
        change(&mut next);
        let next = Arc::new(next);
        self.published.store(next.clone());
        if let Some(sender) = watchers.as_ref() {
            sender.send_replace(next);
        }
    }

    /// A receiver for watch streams (its current view counts as seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        let mut watchers = self.watch_lock();
        match watchers.as_ref() {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(self.published.load_full());
                *watchers = Some(sender);
                receiver
            }
        }
    }

    /// Number of open watch streams.
    pub fn watchers(&self) -> usize {
        self.watch_lock()
            .as_ref()
            .map_or(0, watch::Sender::receiver_count)
    }

    fn watch_lock(&self) -> MutexGuard<'_, Option<watch::Sender<Arc<Published>>>> {
        self.watchers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Locks the inner state. Callers must not hold the guard across `.await`.
    pub fn lock(&self) -> MutexGuard<'_, SessionInner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a use at `now` (unix seconds).
    pub fn touch(&self, now_unix: u64) {
        // Skip the store when the second has not changed: keeps the hot path's
        // cache line shared among readers.
        if self.last_used.load(Ordering::Relaxed) != now_unix {
            self.last_used.store(now_unix, Ordering::Relaxed);
        }
    }

    /// Unix seconds of the last use (0: never).
    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Every session carries these bytes (a million sessions: a million
    /// times); BENCHMARKS.md has the per-session budget this is part of.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_fixed_part_of_a_session_stays_small() {
        use std::mem::size_of;
        assert!(
            size_of::<Session>() <= 296,
            "Session is {} bytes (SessionInner {}): keep rarely used state out of line",
            size_of::<Session>(),
            size_of::<SessionInner>()
        );
        assert!(
            size_of::<Published>() <= 64,
            "Published is {}",
            size_of::<Published>()
        );
        assert!(
            size_of::<IssuedToken>() <= 72,
            "IssuedToken is {}",
            size_of::<IssuedToken>()
        );
    }

    #[test]
    fn trouble_is_made_on_first_failure_and_cleared_by_success() {
        let mut inner = crate::refresh::state_of(crate::store::row::sample("tenant/a", "rt", 1)).1;
        assert!(
            inner.trouble.is_none(),
            "a stored active session has no trouble"
        );
        assert_eq!(inner.trouble().consecutive_failures, 0);
        inner.trouble_mut().consecutive_failures += 1;
        assert!(inner.trouble.is_some());
        inner.drop_pending();
        assert_eq!(inner.trouble().consecutive_failures, 1);
        inner.clear_trouble();
        assert!(inner.trouble.is_none());
    }
}
