//! A non-durable store: for tests and demos only (`--store memory`).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{InsertMode, SessionStore, StoreError, StoredSession};
use crate::session::SessionId;

/// Keeps sessions in process memory; everything is lost on exit.
#[derive(Debug, Default)]
pub struct MemoryStore {
    rows: Mutex<HashMap<SessionId, StoredSession>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, StoredSession>> {
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn load_all(&self) -> Result<Vec<StoredSession>, StoreError> {
        Ok(self.rows().values().cloned().collect())
    }

    async fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        Ok(self.rows().get(id).cloned())
    }

    async fn insert(&self, session: &StoredSession, mode: InsertMode) -> Result<(), StoreError> {
        let mut rows = self.rows();
        match (mode, rows.get(&session.id)) {
            (InsertMode::New, Some(_)) => return Err(StoreError::Conflict),
            (InsertMode::Replace { .. }, None) => return Err(StoreError::NotFound),
            (
                InsertMode::Replace {
                    expected_generation,
                },
                Some(row),
            ) if row.generation != expected_generation => return Err(StoreError::Conflict),
            _ => {}
        }
        rows.insert(session.id.clone(), session.clone());
        Ok(())
    }

    async fn update(
        &self,
        session: &StoredSession,
        expected_generation: u64,
    ) -> Result<(), StoreError> {
        let mut rows = self.rows();
        let row = rows.get_mut(&session.id).ok_or(StoreError::NotFound)?;
        if row.generation != expected_generation {
            return Err(StoreError::Conflict);
        }
        *row = session.clone();
        Ok(())
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        Ok(self.rows().remove(id).is_some())
    }
}
