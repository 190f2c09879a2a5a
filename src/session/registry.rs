//! The in-memory registry of sessions, keyed by id.

use std::sync::Arc;

use dashmap::DashMap;

use super::{Session, SessionId};

/// All sessions of this node. Lookups clone the `Arc` and drop the shard
/// guard at once, so no guard ever lives across an `.await`.
#[derive(Debug, Default)]
pub struct Registry {
    /// foldhash, keyed per process: ids are caller-chosen, and SipHash was
    /// a visible part of every lookup.
    sessions: DashMap<SessionId, Arc<Session>, foldhash::fast::RandomState>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The session with this id (a `&SessionId` or a `&str`).
    pub fn get<Q>(&self, id: &Q) -> Option<Arc<Session>>
    where
        SessionId: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.sessions.get(id).map(|entry| entry.value().clone())
    }

    /// Inserts or replaces.
    pub fn insert(&self, session: Arc<Session>) {
        self.sessions.insert(session.id().clone(), session);
    }

    /// Inserts unless a session with this id is there already; returns the
    /// one that is there now.
    pub fn insert_if_absent(&self, session: Arc<Session>) -> Arc<Session> {
        self.sessions
            .entry(session.id().clone())
            .or_insert(session)
            .value()
            .clone()
    }

    /// Removes the session if it is still this very one.
    pub fn remove_exact(&self, session: &Arc<Session>) -> bool {
        self.sessions
            .remove_if(session.id(), |_, current| Arc::ptr_eq(current, session))
            .is_some()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Calls `f` for every session, without collecting them (shard guards
    /// are held only while `f` runs, which must not block).
    pub fn for_each(&self, mut f: impl FnMut(&Session)) {
        for entry in self.sessions.iter() {
            f(entry.value());
        }
    }

    /// A snapshot of all sessions (for listing and loading); clones `Arc`s only.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.sessions
            .iter()
            .map(|entry| entry.value().clone())
            .collect()
    }
}
