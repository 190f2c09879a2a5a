//! Durable session storage behind one trait.
//!
//! The refresh engine writes a rotated refresh token through
//! [`SessionStore::update`] — a compare-and-swap on the generation — before the
//! new access token is published (persist before use). Implementations:
//! [`SqliteStore`] (the embedded default, tokens sealed by a [`seal::KeyRing`])
//! [`MemoryStore`] (tests and demos), and [`PostgresStore`] (several replicas
//! on one database, which also implements [`Coordinator`]).

mod memory;
pub mod postgres;
pub(crate) mod row;
pub mod seal;
pub mod sqlite;

pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use std::time::SystemTime;

use async_trait::async_trait;

use crate::oidc::RefreshExpiry;
use crate::secret::{AccessToken, RefreshToken};
use crate::session::{Labels, SessionError, SessionId, SessionState};

/// Everything needed to bring a session back after a restart.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// Session id.
    pub id: SessionId,
    /// Provider name.
    pub provider: String,
    /// Caller labels.
    pub labels: Labels,
    /// The caller identity that registered it, when authentication was on.
    pub owner: Option<String>,
    /// The newest refresh token.
    pub refresh_token: RefreshToken,
    /// Fingerprint of the refresh token as registered.
    pub registered_fingerprint: [u8; 32],
    /// The current access token, if any.
    pub access_token: Option<StoredAccessToken>,
    /// When the refresh token lapses.
    pub refresh_expiry: RefreshExpiry,
    /// Longest refresh lifetime granted so far (seconds).
    pub longest_refresh_lifetime_secs: Option<u64>,
    /// Compare-and-swap key; bumped by every refresh.
    pub generation: u64,
    /// Lifecycle state.
    pub state: SessionState,
    /// The last failure, if it ended the session.
    pub last_error: Option<SessionError>,
    /// Registration time.
    pub created_at: SystemTime,
    /// When the last successful refresh was sent.
    pub last_refresh_at: Option<SystemTime>,
    /// When the user must log in again, if known.
    pub reauth_due_at: Option<SystemTime>,
}

/// An access token as stored.
#[derive(Debug, Clone)]
pub struct StoredAccessToken {
    /// The token.
    pub token: AccessToken,
    /// Expiry.
    pub expires_at: SystemTime,
    /// When the request that obtained it was sent.
    pub issued_at: SystemTime,
    /// Granted scope.
    pub scope: String,
}

/// How an insert treats an existing row with the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertMode {
    /// Fail with [`StoreError::Conflict`] if the id exists.
    New,
    /// Overwrite the row if its generation is still this one.
    Replace {
        /// Generation of the row being replaced.
        expected_generation: u64,
    },
}

/// Store failures.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The id exists (insert) or its generation moved on (update).
    #[error("conflict: the session changed concurrently")]
    Conflict,
    /// No row with this id.
    #[error("session not found in store")]
    NotFound,
    /// The backend failed; the write may not have happened.
    #[error("store backend: {0}")]
    Backend(String),
}

/// Whether the store already holds exactly `record` (its generation and
/// refresh token): a write reported as failed may have landed all the same,
/// e.g. when the commit's acknowledgement was lost.
pub async fn holds(store: &dyn SessionStore, record: &StoredSession) -> bool {
    match store.get(&record.id).await {
        Ok(Some(row)) => {
            row.generation == record.generation
                && row.refresh_token.fingerprint() == record.refresh_token.fingerprint()
        }
        _ => false,
    }
}

/// Where sessions live durably. All methods are atomic per session.
#[async_trait]
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// Every stored session.
    async fn load_all(&self) -> Result<Vec<StoredSession>, StoreError>;
    /// Up to `limit` sessions with ids after `after`, in id order (at start,
    /// page by page, so a million sessions never sit in memory twice). The
    /// default pages through [`SessionStore::load_all`].
    async fn load_page(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<StoredSession>, StoreError> {
        let mut all = self.load_all().await?;
        all.retain(|s| after.is_none_or(|after| s.id > *after));
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.truncate(limit);
        Ok(all)
    }
    /// One stored session.
    async fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError>;
    /// Stores a new session, or replaces one whose generation is unchanged.
    async fn insert(&self, session: &StoredSession, mode: InsertMode) -> Result<(), StoreError>;
    /// Writes `session` if the stored generation is still `expected_generation`;
    /// durable when it returns `Ok`.
    async fn update(
        &self,
        session: &StoredSession,
        expected_generation: u64,
    ) -> Result<(), StoreError>;
    /// Deletes; `false` if there was nothing to delete.
    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError>;
}

/// What a claim on a session's refresh lease found (HA mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This replica holds the lease until it writes a new generation,
    /// releases it, or lets it lapse: it alone may present the refresh token.
    Granted,
    /// Another replica holds the lease, for about this much longer.
    Held {
        /// Time left on the other replica's lease.
        remaining: std::time::Duration,
    },
    /// The stored generation is not the one claimed at: another replica
    /// refreshed, ended or replaced the session. Reload it.
    Moved,
    /// The session is no longer stored.
    Gone,
}

/// A change another replica (or this one) made to the shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Inserted, refreshed, ended or replaced: stored now at `generation`.
    Written {
        /// Session id.
        id: SessionId,
        /// Stored generation.
        generation: u64,
    },
    /// Deleted.
    Deleted {
        /// Session id.
        id: SessionId,
    },
    /// A lease was released without a new generation (the refresh failed).
    Released {
        /// Session id.
        id: SessionId,
    },
    /// The listening connection was lost: changes may be missed until it is back.
    Lost,
    /// The listening connection is back (or new): changes may have been
    /// missed, so compare every session with the store.
    Resync,
}

/// Cross-replica coordination of refreshes over a shared store (DESIGN §5):
/// a lease per session, fenced by the generation, so that one replica at a
/// time presents a session's refresh token; and a feed of changes, so that
/// every replica serves the newest generation.
///
/// A store write ([`SessionStore::update`], a replacing insert) also ends
/// the lease on that row: the new generation is the lease's outcome.
#[async_trait]
pub trait Coordinator: Send + Sync + std::fmt::Debug {
    /// This replica's lease owner name (unique per process).
    fn replica(&self) -> &str;
    /// How long a lease lasts without renewal.
    fn lease(&self) -> std::time::Duration;
    /// Claims the lease of `id` at `generation` (free or lapsed leases only;
    /// never blocks on a row another replica is claiming).
    async fn claim(&self, id: &SessionId, generation: u64) -> Result<Claim, StoreError>;
    /// Extends this replica's lease; `false` if it no longer holds it.
    async fn renew(&self, id: &SessionId) -> Result<bool, StoreError>;
    /// Ends this replica's lease without a new generation.
    async fn release(&self, id: &SessionId) -> Result<(), StoreError>;
    /// Every stored session's id and generation (to resync after missed changes).
    async fn generations(&self) -> Result<Vec<(SessionId, u64)>, StoreError>;
    /// Sends every change to `changes` until `shutdown`; reconnects when the
    /// listening connection drops (sending [`Change::Lost`], then
    /// [`Change::Resync`] once back). Starts with [`Change::Resync`].
    async fn follow(
        &self,
        changes: tokio::sync::mpsc::Sender<Change>,
        shutdown: tokio_util::sync::CancellationToken,
    );
}

/// A store that reports whether its last write succeeded, for health: a
/// backend failure flips it to unhealthy, the next success back.
#[derive(Debug)]
pub struct Monitored {
    inner: std::sync::Arc<dyn SessionStore>,
    healthy: tokio::sync::watch::Sender<bool>,
}

impl Monitored {
    /// Wraps `inner`; healthy until a write fails.
    pub fn new(inner: std::sync::Arc<dyn SessionStore>) -> Self {
        Self {
            inner,
            healthy: tokio::sync::watch::Sender::new(true),
        }
    }

    /// Follows the store's health.
    pub fn health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.healthy.subscribe()
    }

    /// Reports the store's health from outside a write (e.g. a lost
    /// listening connection).
    pub fn report(&self, healthy: bool) {
        self.observe(if healthy {
            Ok(())
        } else {
            Err(StoreError::Backend("connection lost".into()))
        })
        .ok();
    }

    fn observe<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        let healthy = !matches!(result, Err(StoreError::Backend(_)));
        self.healthy.send_if_modified(|current| {
            let changed = *current != healthy;
            *current = healthy;
            changed
        });
        result
    }
}

#[async_trait]
impl SessionStore for Monitored {
    async fn load_all(&self) -> Result<Vec<StoredSession>, StoreError> {
        self.inner.load_all().await
    }
    async fn load_page(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<StoredSession>, StoreError> {
        self.inner.load_page(after, limit).await
    }
    async fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.inner.get(id).await
    }
    async fn insert(&self, session: &StoredSession, mode: InsertMode) -> Result<(), StoreError> {
        self.observe(self.inner.insert(session, mode).await)
    }
    async fn update(
        &self,
        session: &StoredSession,
        expected_generation: u64,
    ) -> Result<(), StoreError> {
        self.observe(self.inner.update(session, expected_generation).await)
    }
    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.observe(self.inner.delete(id).await)
    }
}
