//! The embedded default store: one SQLite file (WAL, `synchronous=FULL`, so
//! a committed rotation survives a crash or power loss; `secure_delete`, so
//! deleted rows are overwritten), with tokens sealed by the [`KeyRing`].
//!
//! Writes are single statements, each its own transaction: a session row is
//! always one consistent version. The compare-and-swap is `UPDATE … WHERE
//! id = ? AND generation = ?`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions as _, Row as _};
use tracing::info;

use super::row::{self, Columns, backend};
use super::seal::KeyRing;
use super::{InsertMode, SessionStore, StoreError, StoredSession};
use crate::session::SessionId;

/// The database file inside the data directory.
pub const DB_FILE: &str = "tokenbroker.db";

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database could not be opened, created or migrated.
    #[error("cannot open the session database {path}: {cause}")]
    Database {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        cause: String,
    },
    /// The key ring does not open what the database holds.
    #[error(
        "the session database {path} was sealed with key {key_id:?}, which the configured key ring {detail}; \
         configure the key file or TOKENBROKER_KEYS that sealed it (refusing to start rather than lose sessions)"
    )]
    WrongKey {
        /// The file.
        path: PathBuf,
        /// Key that sealed the data.
        key_id: String,
        /// `does not contain` / `opens wrongly`.
        detail: &'static str,
    },
}

/// Sessions in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    keys: RwLock<Arc<KeyRing>>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database at `path`, and
    /// checks that `keys` opens what it holds.
    pub async fn open(path: &Path, keys: KeyRing) -> Result<Self, OpenError> {
        Self::open_with_pragmas(path, keys, &[]).await
    }

    /// Like [`SqliteStore::open`], with extra SQLite pragmas on every
    /// connection (e.g. `max_page_count` or `query_only`, to rehearse a full
    /// disk or a read-only file).
    pub async fn open_with_pragmas(
        path: &Path,
        keys: KeyRing,
        pragmas: &[(&'static str, String)],
    ) -> Result<Self, OpenError> {
        let db_error = |cause: String| OpenError::Database {
            path: path.to_path_buf(),
            cause,
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .pragma("secure_delete", "ON")
            .foreign_keys(true)
            .log_statements(tracing::log::LevelFilter::Trace);
        let options = pragmas.iter().fold(options, |options, (name, value)| {
            options.pragma(*name, value.clone())
        });
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| db_error(e.to_string()))?;
        // Only the broker's user may read the database (the data directory
        // is 0700 too); SQLite gives the -wal and -shm files the same mode.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        MIGRATIONS
            .run(&pool)
            .await
            .map_err(|e| db_error(format!("migration failed: {e}")))?;
        let store = Self {
            pool,
            keys: RwLock::new(Arc::new(keys)),
            path: path.to_path_buf(),
        };
        store.check_keys().await?;
        Ok(store)
    }

    /// Whether a database file exists at `path` (a new data directory has none).
    pub fn exists(path: &Path) -> bool {
        path.exists()
    }

    fn keys(&self) -> Arc<KeyRing> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The sealed known value proves the ring opens this database; a new
    /// database gets one under the primary key.
    async fn check_keys(&self) -> Result<(), OpenError> {
        let keys = self.keys();
        let row = sqlx::query("SELECT sealed, key_id FROM key_check WHERE singleton = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| OpenError::Database {
                path: self.path.clone(),
                cause: e.to_string(),
            })?;
        match row {
            Some(row) => {
                let sealed: Vec<u8> = row.get("sealed");
                let key_id: String = row.get("key_id");
                row::verify_check(&keys, &sealed).map_err(|detail| OpenError::WrongKey {
                    path: self.path.clone(),
                    key_id,
                    detail,
                })
            }
            None => {
                sqlx::query("INSERT INTO key_check (singleton, sealed, key_id) VALUES (1, ?, ?)")
                    .bind(row::seal_check(&keys))
                    .bind(keys.primary().to_string())
                    .execute(&self.pool)
                    .await
                    .map_err(|e| OpenError::Database {
                        path: self.path.clone(),
                        cause: e.to_string(),
                    })?;
                Ok(())
            }
        }
    }

    /// Switches to a new key ring (its primary seals from now on), after
    /// checking that it opens what is stored. Call [`SqliteStore::reseal`]
    /// to move old rows to the new primary before dropping old keys.
    pub async fn set_keys(&self, keys: KeyRing) -> Result<(), OpenError> {
        let previous = std::mem::replace(
            &mut *self.keys.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(keys),
        );
        if let Err(error) = self.check_keys().await {
            *self.keys.write().unwrap_or_else(|p| p.into_inner()) = previous;
            return Err(error);
        }
        Ok(())
    }

    /// Re-seals, in batches, every row (and the key check) not sealed under
    /// the primary key; rows that change meanwhile are simply taken again.
    /// Returns how many rows were re-sealed.
    pub async fn reseal(&self, batch: u32) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let keys = self.keys();
            let primary = keys.primary().to_string();
            let rows = sqlx::query(
                "SELECT id, generation, refresh_token, access_token FROM sessions \
                 WHERE key_id <> ? LIMIT ?",
            )
            .bind(&primary)
            .bind(batch)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let id: String = row.get("id");
                let generation: i64 = row.get("generation");
                let refresh: Vec<u8> = row.get("refresh_token");
                let access: Option<Vec<u8>> = row.get("access_token");
                let (refresh, access) = row::reseal(&keys, &id, &refresh, access.as_deref())?;
                let resealed = sqlx::query(
                    "UPDATE sessions SET refresh_token = ?, access_token = ?, key_id = ? \
                     WHERE id = ? AND generation = ?",
                )
                .bind(refresh)
                .bind(access)
                .bind(&primary)
                .bind(&id)
                .bind(generation)
                .execute(&self.pool)
                .await
                .map_err(backend)?;
                total += resealed.rows_affected();
            }
        }
        let keys = self.keys();
        sqlx::query("UPDATE key_check SET sealed = ?, key_id = ? WHERE singleton = 1")
            .bind(row::seal_check(&keys))
            .bind(keys.primary().to_string())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        if total > 0 {
            info!(rows = total, key_id = %keys.primary(), "sessions re-sealed under the primary key");
        }
        Ok(total)
    }

    /// Rows per sealing key id (for inspection and tests).
    pub async fn rows_by_key(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, COUNT(*) AS n FROM sessions GROUP BY key_id ORDER BY key_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        Ok(rows.iter().map(|r| (r.get("key_id"), r.get("n"))).collect())
    }

    /// Closes the pool (checkpointing the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

static INSERT: LazyLock<String> = LazyLock::new(|| row::insert_sql(|_| "?".into()));
static UPDATE: LazyLock<String> = LazyLock::new(|| row::update_sql(|_| "?".into(), ""));

fn decode(keys: &KeyRing, row: &sqlx::sqlite::SqliteRow) -> Result<StoredSession, StoreError> {
    Columns::read(row)?.decode(keys)
}

#[async_trait]
impl SessionStore for SqliteStore {
    async fn load_all(&self) -> Result<Vec<StoredSession>, StoreError> {
        use futures::StreamExt as _;
        let keys = self.keys();
        // Streamed: one row in memory at a time besides the decoded sessions.
        let mut rows = sqlx::query("SELECT * FROM sessions").fetch(&self.pool);
        let mut sessions = Vec::new();
        while let Some(row) = rows.next().await {
            sessions.push(decode(&keys, &row.map_err(backend)?)?);
        }
        Ok(sessions)
    }

    async fn load_page(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<StoredSession>, StoreError> {
        let keys = self.keys();
        let rows = sqlx::query("SELECT * FROM sessions WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after.map_or("", SessionId::as_str))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        row::decode_page(&keys, rows).await
    }

    async fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        let keys = self.keys();
        let row = sqlx::query("SELECT * FROM sessions WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(|row| decode(&keys, &row)).transpose()
    }

    async fn insert(&self, session: &StoredSession, mode: InsertMode) -> Result<(), StoreError> {
        let columns = Columns::encode(&self.keys(), session);
        match mode {
            InsertMode::New => {
                let result = columns
                    .bind(sqlx::query(INSERT.as_str()))
                    .execute(&self.pool)
                    .await;
                match result {
                    Ok(_) => Ok(()),
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        Err(StoreError::Conflict)
                    }
                    Err(e) => Err(backend(e)),
                }
            }
            InsertMode::Replace {
                expected_generation,
            } => self.cas(session, columns, expected_generation).await,
        }
    }

    async fn update(
        &self,
        session: &StoredSession,
        expected_generation: u64,
    ) -> Result<(), StoreError> {
        let columns = Columns::encode(&self.keys(), session);
        self.cas(session, columns, expected_generation).await
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM sessions WHERE id = ?")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(result.rows_affected() > 0)
    }
}

impl SqliteStore {
    /// Inserts many new sessions in one transaction (imports, benchmarks).
    pub async fn insert_many(&self, sessions: &[StoredSession]) -> Result<(), StoreError> {
        let keys = self.keys();
        let mut tx = self.pool.begin().await.map_err(backend)?;
        for session in sessions {
            Columns::encode(&keys, session)
                .bind(sqlx::query(INSERT.as_str()))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn cas(
        &self,
        session: &StoredSession,
        columns: Columns,
        expected_generation: u64,
    ) -> Result<(), StoreError> {
        let result = columns
            .bind(sqlx::query(UPDATE.as_str()))
            .bind(expected_generation as i64)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        if result.rows_affected() == 1 {
            return Ok(());
        }
        let exists = sqlx::query("SELECT 1 FROM sessions WHERE id = ?")
            .bind(session.id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Err(if exists.is_some() {
            StoreError::Conflict
        } else {
            StoreError::NotFound
        })
    }
}

/// Parses a `sqlite:` URL or plain path (for tests and tools).
pub fn path_of(raw: &str) -> PathBuf {
    PathBuf::from_str(raw.trim_start_matches("sqlite:")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::RefreshExpiry;
    use crate::store::row::{sample as session, to_ms};
    use crate::store::seal::KeyId;

    async fn open(dir: &Path) -> SqliteStore {
        let keys = KeyRing::generate(KeyId::new("k1").unwrap());
        SqliteStore::open(&dir.join(DB_FILE), keys).await.unwrap()
    }

    #[tokio::test]
    async fn round_trip_and_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let a = session("a", "refresh-a-1", 1);
        store.insert(&a, InsertMode::New).await.unwrap();
        assert_eq!(
            store.insert(&a, InsertMode::New).await,
            Err(StoreError::Conflict)
        );
        let back = store.get(&a.id).await.unwrap().unwrap();
        assert_eq!(back.refresh_token.expose_secret(), "refresh-a-1");
        assert_eq!(back.labels, a.labels);
        assert_eq!(back.owner, a.owner);
        assert_eq!(back.generation, 1);
        let (RefreshExpiry::At(stored), RefreshExpiry::At(original)) =
            (back.refresh_expiry, a.refresh_expiry)
        else {
            panic!("the refresh expiry comes back");
        };
        assert_eq!(to_ms(stored), to_ms(original), "kept to the millisecond");

        let next = session("a", "refresh-a-2", 2);
        assert_eq!(store.update(&next, 5).await, Err(StoreError::Conflict));
        store.update(&next, 1).await.unwrap();
        assert_eq!(
            store.update(&next, 1).await,
            Err(StoreError::Conflict),
            "a stale writer loses"
        );
        let ghost = session("ghost", "x", 1);
        assert_eq!(store.update(&ghost, 0).await, Err(StoreError::NotFound));
        let all = store.load_all().await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].refresh_token.expose_secret(), "refresh-a-2");
        assert!(store.delete(&a.id).await.unwrap());
        assert!(!store.delete(&a.id).await.unwrap());
        assert!(store.get(&a.id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_ciphertext_moved_to_another_row_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        store
            .insert(&session("a", "refresh-a", 1), InsertMode::New)
            .await
            .unwrap();
        store
            .insert(&session("b", "refresh-b", 1), InsertMode::New)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE sessions SET refresh_token = (SELECT refresh_token FROM sessions WHERE id = 'a') \
             WHERE id = 'b'",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let error = store.load_all().await.unwrap_err();
        assert!(error.to_string().contains("\"b\""), "{error}");
        assert!(store.get(&SessionId::parse("b").unwrap()).await.is_err());
        assert!(store.get(&SessionId::parse("a").unwrap()).await.is_ok());
    }

    #[tokio::test]
    async fn deleted_sessions_leave_no_ciphertext_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        store
            .insert(&session("gone", "refresh-gone", 1), InsertMode::New)
            .await
            .unwrap();
        let sealed: Vec<u8> = sqlx::query("SELECT refresh_token FROM sessions WHERE id = 'gone'")
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .get(0);
        store
            .delete(&SessionId::parse("gone").unwrap())
            .await
            .unwrap();
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&store.pool)
            .await
            .unwrap();
        store.close().await;
        let mut bytes = std::fs::read(dir.path().join(DB_FILE)).unwrap();
        bytes.extend(std::fs::read(dir.path().join("tokenbroker.db-wal")).unwrap_or_default());
        assert!(
            !bytes.windows(sealed.len()).any(|w| w == sealed.as_slice()),
            "secure_delete overwrote the freed row"
        );
    }

    #[tokio::test]
    async fn pages_cover_every_row_once_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyRing::generate(KeyId::new("k").unwrap());
        let store = SqliteStore::open(&dir.path().join(DB_FILE), keys)
            .await
            .unwrap();
        for i in [7, 3, 11, 0, 5, 9, 1] {
            store
                .insert(
                    &session(&format!("s{i:02}"), &format!("r{i}"), 1),
                    InsertMode::New,
                )
                .await
                .unwrap();
        }
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let page = store.load_page(after.as_ref(), 3).await.unwrap();
            assert!(page.len() <= 3);
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            seen.extend(page.into_iter().map(|s| s.id.to_string()));
        }
        assert_eq!(seen, ["s00", "s01", "s03", "s05", "s07", "s09", "s11"]);
    }

    #[tokio::test]
    async fn rekeying_moves_every_row_to_the_new_primary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let old = KeyRing::generate(KeyId::new("old").unwrap());
        let store = SqliteStore::open(&path, old.clone()).await.unwrap();
        for i in 0..25 {
            store
                .insert(
                    &session(&format!("s{i}"), &format!("r{i}"), 1),
                    InsertMode::New,
                )
                .await
                .unwrap();
        }
        let new = KeyRing::generate(KeyId::new("new").unwrap());
        let both = old.with_primary(new.clone()).unwrap();
        store.set_keys(both).await.unwrap();
        assert_eq!(store.reseal(10).await.unwrap(), 25);
        assert_eq!(
            store.rows_by_key().await.unwrap(),
            vec![("new".to_string(), 25)]
        );
        store.close().await;
        // The new key alone opens everything now, the old one nothing.
        let reopened = SqliteStore::open(&path, new).await.unwrap();
        assert_eq!(reopened.load_all().await.unwrap().len(), 25);
        reopened.close().await;
        let error = SqliteStore::open(&path, old).await.unwrap_err();
        assert!(matches!(error, OpenError::WrongKey { .. }), "{error}");
    }

    #[tokio::test]
    async fn a_full_or_read_only_database_fails_writes_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let keys = KeyRing::generate(KeyId::new("k1").unwrap());
        SqliteStore::open(&path, keys.clone())
            .await
            .unwrap()
            .close()
            .await;

        let read_only =
            SqliteStore::open_with_pragmas(&path, keys.clone(), &[("query_only", "ON".into())])
                .await
                .unwrap();
        let error = read_only
            .insert(&session("a", "r", 1), InsertMode::New)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("readonly"), "{error}");
        read_only.close().await;

        let small = SqliteStore::open_with_pragmas(&path, keys, &[("max_page_count", "12".into())])
            .await
            .unwrap();
        let mut full = None;
        for i in 0..500 {
            let big = format!("{i}-{}", "x".repeat(3000));
            if let Err(error) = small
                .insert(&session(&format!("s{i}"), &big, 1), InsertMode::New)
                .await
            {
                full = Some(error);
                break;
            }
        }
        let error = full.expect("the database fills up");
        assert!(error.to_string().contains("full"), "{error}");
    }

    #[tokio::test]
    async fn a_corrupt_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let keys = KeyRing::generate(KeyId::new("k1").unwrap());
        let error = SqliteStore::open(&path, keys).await.unwrap_err();
        let text = error.to_string();
        assert!(text.contains("cannot open the session database"), "{text}");
        assert!(text.contains("not a database"), "{text}");
    }
}
