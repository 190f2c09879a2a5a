//! The high-availability store: one PostgreSQL database shared by several
//! replicas (DESIGN §5), with tokens sealed by the [`KeyRing`] exactly as in
//! the embedded store (the row format lives in `store/row.rs`).
//!
//! Writes are single statements. The compare-and-swap is `UPDATE … WHERE id
//! = $ AND generation = $`, and it also ends the row's refresh lease: the new
//! generation is the lease's outcome. As a [`Coordinator`], the store hands
//! out those leases (`FOR UPDATE SKIP LOCKED`, so a claimer never waits on a
//! row another replica is claiming; concurrent claims share one statement)
//! and follows the changes other replicas make (`LISTEN tokenbroker_sessions`,
//! fed by a trigger). Lease times come from the database clock, never from a
//! replica's.
//!
//! The database URL may carry a password: it is never logged, and errors
//! name the database by the URL without its credentials.

use std::collections::{HashSet, VecDeque};
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, Postgres};
use sqlx::{ConnectOptions as _, Connection as _, Row as _};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::row::{self, Columns, backend};
use super::seal::KeyRing;
use super::{Change, Claim, Coordinator, InsertMode, SessionStore, StoreError, StoredSession};
use crate::session::SessionId;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The notification channel the `sessions` trigger writes to.
pub const CHANNEL: &str = "tokenbroker_sessions";

/// Most claims answered by one statement.
const MAX_BATCH: usize = 512;
/// Claims waiting for the batcher before callers wait to queue.
const CLAIM_QUEUE: usize = 4096;
/// How long a claim statement may take before its claims fail.
const CLAIM_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// What a claim reports for a row another transaction has locked (a claim
/// or a write in progress): held, for about this long.
const LOCKED_RETRY: Duration = Duration::from_millis(250);
/// How long [`PostgresStore::close`] waits for the claim in progress.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long migrations may take (they wait for another replica's migrator).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// A listening connection silent for this long is pinged, so that a dead
/// connection that no error reported (a half-open socket) is noticed.
const LISTEN_PING_EVERY: Duration = Duration::from_secs(15);
/// First and longest waits between reconnection attempts of `follow`.
const RECONNECT_BASE: Duration = Duration::from_millis(100);
const RECONNECT_CAP: Duration = Duration::from_secs(5);

/// Connection and lease settings.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Pool size, including the connection the claim batcher keeps and the
    /// listening one of [`Coordinator::follow`] (at least 3 are used).
    pub max_connections: u32,
    /// How long a refresh lease lasts without renewal.
    pub lease: Duration,
    /// How long connecting (or waiting for a pooled connection) may take
    /// before a call fails with [`StoreError::Backend`].
    pub connect_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            lease: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database could not be reached or migrated.
    #[error("cannot open the session database {database}: {cause}")]
    Database {
        /// The database URL without credentials.
        database: String,
        /// What failed.
        cause: String,
    },
    /// The key ring does not open what the database holds.
    #[error(
        "the session database {database} was sealed with key {key_id:?}, which the configured key ring {detail}; \
         configure the key file or TOKENBROKER_KEYS that sealed it (refusing to start rather than lose sessions)"
    )]
    WrongKey {
        /// The database URL without credentials.
        database: String,
        /// Key that sealed the data.
        key_id: String,
        /// `does not contain` / `holds with different key material`.
        detail: &'static str,
    },
}

/// Sessions in a PostgreSQL database shared by several replicas.
pub struct PostgresStore {
    pool: PgPool,
    keys: RwLock<Arc<KeyRing>>,
    database: String,
    replica: String,
    lease: Duration,
    claims: mpsc::Sender<ClaimRequest>,
    batcher: Batcher,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.database)
            .field("replica", &self.replica)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// The owned claim-batching task: stopped by [`PostgresStore::close`],
/// aborted when the store is dropped.
struct Batcher {
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    statements: Arc<AtomicU64>,
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

struct ClaimRequest {
    id: SessionId,
    generation: u64,
    reply: oneshot::Sender<Result<Claim, StoreError>>,
}

impl PostgresStore {
    /// Connects to `url`, migrates the schema (safe with several replicas
    /// starting together: the migrator holds an advisory lock), and checks
    /// that `keys` opens what the database holds.
    pub async fn open(
        url: &str,
        keys: KeyRing,
        options: PostgresOptions,
    ) -> Result<Self, OpenError> {
        let database = redact_url(url);
        let db_error = |cause: String| OpenError::Database {
            database: database.clone(),
            cause,
        };
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| db_error(format!("invalid database URL: {e}")))?
            .application_name("tokenbroker")
            .log_statements(tracing::log::LevelFilter::Trace);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(3))
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect.clone())
            .await
            .map_err(|e| db_error(describe(&e)))?;
        migrate(&connect, options.connect_timeout)
            .await
            .map_err(db_error)?;
        let (claims, requests) = mpsc::channel(CLAIM_QUEUE);
        let replica = replica_name();
        let stop = CancellationToken::new();
        let statements = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run_batcher(
            BatchContext {
                pool: pool.clone(),
                replica: replica.clone(),
                lease_ms: millis(options.lease),
                statements: statements.clone(),
            },
            requests,
            stop.clone(),
        ));
        let store = Self {
            pool,
            keys: RwLock::new(Arc::new(keys)),
            database,
            replica,
            lease: options.lease,
            claims,
            batcher: Batcher {
                stop,
                task: Mutex::new(Some(task)),
                statements,
            },
        };
        if let Err(error) = store.check_keys().await {
            store.close().await;
            return Err(error);
        }
        info!(database = %store.database, replica = %store.replica, "session store open");
        Ok(store)
    }

    fn keys(&self) -> Arc<KeyRing> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The sealed known value proves the ring opens this database; a new
    /// database gets one under the primary key (the first replica to start
    /// writes it, the others read it back).
    async fn check_keys(&self) -> Result<(), OpenError> {
        let keys = self.keys();
        let db_error = |e: sqlx::Error| OpenError::Database {
            database: self.database.clone(),
            cause: describe(&e),
        };
        sqlx::query(
            "INSERT INTO key_check (singleton, sealed, key_id) VALUES (1, $1, $2) \
             ON CONFLICT (singleton) DO NOTHING",
        )
        .bind(row::seal_check(&keys))
        .bind(keys.primary().to_string())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        let check = sqlx::query("SELECT sealed, key_id FROM key_check WHERE singleton = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        let sealed: Vec<u8> = check.try_get("sealed").map_err(db_error)?;
        let key_id: String = check.try_get("key_id").map_err(db_error)?;
        row::verify_check(&keys, &sealed).map_err(|detail| OpenError::WrongKey {
            database: self.database.clone(),
            key_id,
            detail,
        })
    }

    /// Switches to a new key ring (its primary seals from now on), after
    /// checking that it opens what is stored. Call [`PostgresStore::reseal`]
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
    /// Keeps the generation and the lease, so nobody is notified. Returns
    /// how many rows were re-sealed.
    pub async fn reseal(&self, batch: u32) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let keys = self.keys();
            let primary = keys.primary().to_string();
            let rows = sqlx::query(
                "SELECT id, generation, refresh_token, access_token FROM sessions \
                 WHERE key_id <> $1 LIMIT $2",
            )
            .bind(&primary)
            .bind(i64::from(batch.max(1)))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
            if rows.is_empty() {
                break;
            }
            for found in rows {
                let id: String = found.try_get("id").map_err(backend)?;
                let generation: i64 = found.try_get("generation").map_err(backend)?;
                let refresh: Vec<u8> = found.try_get("refresh_token").map_err(backend)?;
                let access: Option<Vec<u8>> = found.try_get("access_token").map_err(backend)?;
                let (refresh, access) = row::reseal(&keys, &id, &refresh, access.as_deref())?;
                let resealed = sqlx::query(
                    "UPDATE sessions SET refresh_token = $1, access_token = $2, key_id = $3 \
                     WHERE id = $4 AND generation = $5",
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
        sqlx::query("UPDATE key_check SET sealed = $1, key_id = $2 WHERE singleton = 1")
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
        rows.iter()
            .map(|r| Ok((r.try_get("key_id")?, r.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(backend)
    }

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

    /// Stops the claim batcher (claims fail with [`StoreError::Backend`]
    /// from now on) and closes the pool, which also ends
    /// [`Coordinator::follow`].
    pub async fn close(&self) {
        self.batcher.stop.cancel();
        let task = self
            .batcher
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut task) = task
            && tokio::time::timeout(CLOSE_GRACE, &mut task).await.is_err()
        {
            warn!("the claim batcher did not stop in time; aborting it");
            task.abort();
        }
        self.pool.close().await;
    }

    /// The database URL without credentials.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// How many claim statements the batcher has run (tests).
    #[doc(hidden)]
    pub fn claim_statements(&self) -> u64 {
        self.batcher.statements.load(Ordering::Relaxed)
    }

    async fn cas(&self, columns: Columns, expected_generation: u64) -> Result<(), StoreError> {
        let id = columns.id().to_string();
        let result = columns
            .bind(sqlx::query(UPDATE.as_str()))
            .bind(expected_generation.min(i64::MAX as u64) as i64)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        if result.rows_affected() == 1 {
            return Ok(());
        }
        let exists = sqlx::query("SELECT 1 FROM sessions WHERE id = $1")
            .bind(&id)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Err(if exists.is_some() {
            StoreError::Conflict
        } else {
            StoreError::NotFound
        })
    }

    /// A listening connection on [`CHANNEL`]; its loss is reported by
    /// `try_recv` (`Ok(None)` or an error), not repaired behind our back.
    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.eager_reconnect(false);
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }
}

static INSERT: LazyLock<String> = LazyLock::new(|| row::insert_sql(|n| format!("${n}")));
static UPDATE: LazyLock<String> = LazyLock::new(|| {
    row::update_sql(
        |n| format!("${n}"),
        "lease_owner = NULL, lease_until = NULL",
    )
});

/// Runs the migrations on a connection of their own, closed afterwards, so
/// that the migrator's advisory lock never outlives it (even when a
/// migration fails half-way).
async fn migrate(connect: &PgConnectOptions, connect_timeout: Duration) -> Result<(), String> {
    let mut conn = tokio::time::timeout(connect_timeout, connect.connect())
        .await
        .map_err(|_| format!("no connection within {connect_timeout:?}"))?
        .map_err(|e| describe(&e))?;
    let migrated = tokio::time::timeout(MIGRATION_TIMEOUT, MIGRATIONS.run(&mut conn))
        .await
        .map_err(|_| {
            format!(
                "migration did not finish within {MIGRATION_TIMEOUT:?} \
                 (another replica may hold the migration lock)"
            )
        })?
        .map_err(|e| format!("migration failed: {e}"));
    if migrated.is_ok() {
        conn.close().await.ok();
    }
    migrated
}

#[async_trait]
impl SessionStore for PostgresStore {
    async fn load_all(&self) -> Result<Vec<StoredSession>, StoreError> {
        use futures::StreamExt as _;
        let keys = self.keys();
        // Streamed: one row in memory at a time besides the decoded sessions.
        let mut rows = sqlx::query("SELECT * FROM sessions").fetch(&self.pool);
        let mut sessions = Vec::new();
        while let Some(found) = rows.next().await {
            sessions.push(Columns::read(&found.map_err(backend)?)?.decode(&keys)?);
        }
        Ok(sessions)
    }

    async fn load_page(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<StoredSession>, StoreError> {
        let keys = self.keys();
        let rows = match after {
            Some(after) => {
                sqlx::query("SELECT * FROM sessions WHERE id > $1 ORDER BY id LIMIT $2")
                    .bind(after.as_str())
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .fetch_all(&self.pool)
                    .await
            }
            None => {
                sqlx::query("SELECT * FROM sessions ORDER BY id LIMIT $1")
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(backend)?;
        row::decode_page(&keys, rows).await
    }

    async fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        let keys = self.keys();
        let found = sqlx::query("SELECT * FROM sessions WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found
            .map(|found| Columns::read(&found)?.decode(&keys))
            .transpose()
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
            } => self.cas(columns, expected_generation).await,
        }
    }

    async fn update(
        &self,
        session: &StoredSession,
        expected_generation: u64,
    ) -> Result<(), StoreError> {
        let columns = Columns::encode(&self.keys(), session);
        self.cas(columns, expected_generation).await
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM sessions WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(result.rows_affected() > 0)
    }
}

#[async_trait]
impl Coordinator for PostgresStore {
    fn replica(&self) -> &str {
        &self.replica
    }

    fn lease(&self) -> Duration {
        self.lease
    }

    async fn claim(&self, id: &SessionId, generation: u64) -> Result<Claim, StoreError> {
        let stopped = || StoreError::Backend("the session store is closed".into());
        let (reply, answer) = oneshot::channel();
        self.claims
            .send(ClaimRequest {
                id: id.clone(),
                generation,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn renew(&self, id: &SessionId) -> Result<bool, StoreError> {
        let renewed = sqlx::query(
            "UPDATE sessions SET lease_until = now() + $3 * interval '1 millisecond' \
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id.as_str())
        .bind(&self.replica)
        .bind(millis(self.lease))
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn release(&self, id: &SessionId) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sessions SET lease_owner = NULL, lease_until = NULL \
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id.as_str())
        .bind(&self.replica)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn generations(&self) -> Result<Vec<(SessionId, u64)>, StoreError> {
        let rows = sqlx::query("SELECT id, generation FROM sessions")
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|found| {
                let id: String = found.try_get("id").map_err(backend)?;
                let generation: i64 = found.try_get("generation").map_err(backend)?;
                let id = SessionId::parse(&id).map_err(|_| {
                    StoreError::Backend(format!("stored session id {id:?} is invalid"))
                })?;
                Ok((id, generation.max(0) as u64))
            })
            .collect()
    }

    /// Listens on [`CHANNEL`] with a connection of the pool. A lost
    /// connection is noticed when `PgListener::try_recv` reports it
    /// (`Ok(None)` on end of stream, e.g. the backend was terminated, or an
    /// error), or when a ping after 15 s of silence fails;
    /// then [`Change::Lost`] is sent, a new connection is made with capped,
    /// jittered backoff, and [`Change::Resync`] follows once it listens.
    /// When the very first connection fails, [`Change::Lost`] comes first.
    /// Ends on `shutdown`, when the receiver is gone, or when the store is
    /// closed.
    async fn follow(&self, changes: mpsc::Sender<Change>, shutdown: CancellationToken) {
        // A send waits for room, but never past shutdown or close (which
        // waits for the listening connection to come back to the pool).
        let send = |change: Change| {
            let changes = &changes;
            let shutdown = &shutdown;
            let closed = self.pool.close_event();
            async move {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => false,
                    () = closed => false,
                    sent = changes.send(change) => sent.is_ok(),
                }
            }
        };
        let mut failures: u32 = 0;
        // Whether `Lost` was sent and no `Resync` since.
        let mut lost = false;
        loop {
            let listening = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                listening = self.listen() => listening,
            };
            let mut listener = match listening {
                Ok(listener) => listener,
                Err(error) => {
                    if self.pool.is_closed() {
                        return;
                    }
                    warn!(error = %describe(&error), "cannot listen for session changes");
                    if !lost {
                        lost = true;
                        if !send(Change::Lost).await {
                            return;
                        }
                    }
                    failures = failures.saturating_add(1);
                    let delay = crate::refresh::timing::backoff(
                        failures,
                        RECONNECT_BASE,
                        RECONNECT_CAP,
                        rand::random(),
                    );
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if failures > 0 || lost {
                info!("listening for session changes again");
            }
            failures = 0;
            if !send(Change::Resync).await {
                return;
            }
            let why = loop {
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    () = changes.closed() => return,
                    next = tokio::time::timeout(LISTEN_PING_EVERY, listener.try_recv()) => next,
                };
                match next {
                    Ok(Ok(Some(notification))) => match parse_change(notification.payload()) {
                        Some(change) => {
                            if !send(change).await {
                                return;
                            }
                        }
                        None => debug!(
                            payload = notification.payload(),
                            "ignoring a malformed session notification"
                        ),
                    },
                    Ok(Ok(None)) => break "the connection ended".to_string(),
                    Ok(Err(error)) => break describe(&error),
                    Err(_silent) => {
                        let ping = tokio::time::timeout(
                            RECONNECT_CAP,
                            sqlx::query("SELECT 1").execute(&mut listener),
                        )
                        .await;
                        match ping {
                            Ok(Ok(_)) => {}
                            Ok(Err(error)) => break describe(&error),
                            Err(_) => break "the connection stopped answering".to_string(),
                        }
                    }
                }
            };
            drop(listener);
            if self.pool.is_closed() {
                return;
            }
            warn!(reason = %why, "lost the session change feed; reconnecting");
            lost = true;
            if !send(Change::Lost).await {
                return;
            }
        }
    }
}

/// Reads a trigger payload: `w:<generation>:<id>`, `d:<id>` or `r:<id>`
/// (ids may contain ':', so only the first separators count).
fn parse_change(payload: &str) -> Option<Change> {
    let (kind, rest) = payload.split_once(':')?;
    match kind {
        "w" => {
            let (generation, id) = rest.split_once(':')?;
            Some(Change::Written {
                id: SessionId::parse(id).ok()?,
                generation: generation.parse().ok()?,
            })
        }
        "d" => Some(Change::Deleted {
            id: SessionId::parse(rest).ok()?,
        }),
        "r" => Some(Change::Released {
            id: SessionId::parse(rest).ok()?,
        }),
        _ => None,
    }
}

/// What the batcher needs of the store.
struct BatchContext {
    pool: PgPool,
    replica: String,
    lease_ms: i64,
    statements: Arc<AtomicU64>,
}

/// Claims the rows of `ids` at `generations` (parallel arrays, distinct ids)
/// for `$3` until `now() + $4 ms`, in one statement. Rows another
/// transaction holds locked are skipped, never waited for. Per claim (by
/// position `n`): the stored generation (NULL: gone), whether it was granted
/// and, for a live lease, the milliseconds it has left.
const CLAIM: &str = "\
WITH wanted AS (
    SELECT w.id, w.generation, w.n
    FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS w(id, generation, n)
), free AS (
    SELECT s.id
    FROM sessions s JOIN wanted w ON s.id = w.id
    WHERE s.generation = w.generation
      AND (s.lease_until IS NULL OR s.lease_until < now())
    FOR UPDATE OF s SKIP LOCKED
), granted AS (
    UPDATE sessions s
    SET lease_owner = $3, lease_until = now() + $4 * interval '1 millisecond'
    FROM free f
    WHERE s.id = f.id
    RETURNING s.id
)
SELECT w.n,
       s.generation AS stored_generation,
       g.id IS NOT NULL AS granted,
       CASE WHEN s.lease_until > now()
            THEN ceil(extract(epoch FROM s.lease_until - now()) * 1000)::bigint
       END AS remaining_ms
FROM wanted w
LEFT JOIN sessions s ON s.id = w.id
LEFT JOIN granted g ON g.id = w.id";

/// Groups queued claims into one statement at a time: everything queued
/// (up to [`MAX_BATCH`]) goes into the next statement. A second claim on an
/// id already in the batch waits for the next one, so two claims never both
/// see the same free lease.
async fn run_batcher(
    context: BatchContext,
    mut requests: mpsc::Receiver<ClaimRequest>,
    stop: CancellationToken,
) {
    let mut pending: VecDeque<ClaimRequest> = VecDeque::new();
    let mut conn = None;
    loop {
        if pending.is_empty() {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                first = requests.recv() => first,
            };
            match first {
                Some(first) => pending.push_back(first),
                None => break,
            }
        }
        while pending.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(next) => pending.push_back(next),
                Err(_) => break,
            }
        }
        let mut batch = Vec::with_capacity(pending.len());
        let mut later = VecDeque::new();
        let mut ids = HashSet::new();
        for request in pending.drain(..) {
            if request.reply.is_closed() {
                continue;
            }
            if batch.len() < MAX_BATCH && ids.insert(request.id.clone()) {
                batch.push(request);
            } else {
                later.push_back(request);
            }
        }
        pending = later;
        if !batch.is_empty() {
            claim_batch(&context, &mut conn, batch).await;
        }
    }
}

/// Answers every claim of `batch` from one statement, on the batcher's own
/// connection `conn`: acquired from the pool (and so tested) only when the
/// batcher has none, so a batch costs one round trip. A connection that
/// failed or timed out is closed, not reused.
async fn claim_batch(
    context: &BatchContext,
    conn: &mut Option<PoolConnection<Postgres>>,
    batch: Vec<ClaimRequest>,
) {
    let ids: Vec<String> = batch.iter().map(|r| r.id.as_str().to_string()).collect();
    let generations: Vec<i64> = batch
        .iter()
        .map(|r| r.generation.min(i64::MAX as u64) as i64)
        .collect();
    context.statements.fetch_add(1, Ordering::Relaxed);
    // A kept connection may have died while the database was away: then the
    // statement fails before it is sent, and runs once more on a new one.
    let kept = conn.is_some();
    let mut outcome = run_claim(context, conn, &ids, &generations).await;
    if kept && matches!(outcome, Ok(Err(ref e)) if !matches!(e, sqlx::Error::Database(_))) {
        discard(conn);
        outcome = run_claim(context, conn, &ids, &generations).await;
    }
    let error = match outcome {
        Ok(Ok(rows)) => {
            answer(context, conn, batch, rows).await;
            return;
        }
        Ok(Err(error)) => {
            if !matches!(error, sqlx::Error::Database(_)) {
                discard(conn);
            }
            backend(error)
        }
        Err(_) => {
            discard(conn);
            let error = StoreError::Backend(format!(
                "claim statement took longer than {CLAIM_STATEMENT_TIMEOUT:?}"
            ));
            warn!(%error, "session store failed");
            error
        }
    };
    for request in batch {
        request.reply.send(Err(error.clone())).ok();
    }
}

/// One claim statement on the batcher's connection (a new one if it has none).
async fn run_claim(
    context: &BatchContext,
    conn: &mut Option<PoolConnection<Postgres>>,
    ids: &[String],
    generations: &[i64],
) -> Result<Result<Vec<sqlx::postgres::PgRow>, sqlx::Error>, tokio::time::error::Elapsed> {
    let statement = async {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(context.pool.acquire().await?),
        };
        sqlx::query(CLAIM)
            .bind(ids)
            .bind(generations)
            .bind(&context.replica)
            .bind(context.lease_ms)
            .fetch_all(&mut **c)
            .await
    };
    tokio::time::timeout(CLAIM_STATEMENT_TIMEOUT, statement).await
}

/// Closes the batcher's connection (its state is unknown).
fn discard(conn: &mut Option<PoolConnection<Postgres>>) {
    if let Some(mut c) = conn.take() {
        c.close_on_drop();
    }
}

/// Sends each claimer its outcome; gives back leases granted to claimers
/// that left meanwhile.
async fn answer(
    context: &BatchContext,
    conn: &mut Option<PoolConnection<Postgres>>,
    batch: Vec<ClaimRequest>,
    rows: Vec<sqlx::postgres::PgRow>,
) {
    let mut seen: Vec<Option<Seen>> = vec![None; batch.len()];
    for found in rows {
        match read_claim(&found) {
            Ok((n, row)) => {
                if let Some(slot) = n.checked_sub(1).and_then(|i| seen.get_mut(i)) {
                    *slot = Some(row);
                }
            }
            Err(error) => warn!(error = %error, "unreadable claim row"),
        }
    }
    let mut abandoned = Vec::new();
    for (request, seen) in batch.into_iter().zip(seen) {
        let answer = seen
            .map(|seen| classify(request.generation, seen))
            .ok_or_else(|| StoreError::Backend("the claim statement returned no row".into()));
        let granted = matches!(answer, Ok(Claim::Granted));
        if request.reply.send(answer).is_err() && granted {
            abandoned.push(request.id.as_str().to_string());
        }
    }
    if !abandoned.is_empty() {
        // The claimers left before the answer: give their leases back rather
        // than let other replicas wait for them to lapse.
        let release = sqlx::query(
            "UPDATE sessions SET lease_owner = NULL, lease_until = NULL \
             WHERE id = ANY($1) AND lease_owner = $2",
        )
        .bind(abandoned)
        .bind(&context.replica);
        let released = match conn.as_mut() {
            Some(c) => {
                tokio::time::timeout(CLAIM_STATEMENT_TIMEOUT, release.execute(&mut **c)).await
            }
            None => {
                tokio::time::timeout(CLAIM_STATEMENT_TIMEOUT, release.execute(&context.pool)).await
            }
        };
        match released {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                if !matches!(error, sqlx::Error::Database(_)) {
                    discard(conn);
                }
                backend(error);
            }
            Err(_) => {
                discard(conn);
                warn!("giving back abandoned leases timed out; they will lapse");
            }
        }
    }
}

/// What the claim statement saw of one claimed row.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The stored generation; `None`: no such row.
    stored: Option<i64>,
    /// Whether this claim got the lease.
    granted: bool,
    /// Time left on a live lease, in ms.
    remaining_ms: Option<i64>,
}

fn read_claim(found: &sqlx::postgres::PgRow) -> Result<(usize, Seen), sqlx::Error> {
    let n: i64 = found.try_get("n")?;
    let seen = Seen {
        stored: found.try_get("stored_generation")?,
        granted: found.try_get("granted")?,
        remaining_ms: found.try_get("remaining_ms")?,
    };
    Ok((usize::try_from(n).unwrap_or(0), seen))
}

/// The outcome of a claim at `generation`. A row at that generation with no
/// live lease that was not granted was skipped: another transaction held it
/// locked (a claim or a write in progress), so it counts as held briefly.
fn classify(generation: u64, seen: Seen) -> Claim {
    match seen {
        Seen { stored: None, .. } => Claim::Gone,
        Seen { granted: true, .. } => Claim::Granted,
        Seen {
            stored: Some(stored),
            ..
        } if stored.max(0) as u64 != generation => Claim::Moved,
        Seen {
            remaining_ms: Some(ms),
            ..
        } if ms > 0 => Claim::Held {
            remaining: Duration::from_millis(ms as u64),
        },
        Seen { .. } => Claim::Held {
            remaining: LOCKED_RETRY,
        },
    }
}

fn millis(duration: Duration) -> i64 {
    duration.as_millis().min(i64::MAX as u128) as i64
}

/// This process's lease owner name: the host name (the pod name in
/// Kubernetes) and a random suffix, so that two stores never share one.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(63)
        .collect();
    let host = if host.is_empty() { "replica" } else { &host };
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// A driver error for a message: the database's own text when it has one
/// (it names no bound value, and never the password).
fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(e) => e.message().to_string(),
        other => other.to_string(),
    }
}

/// `url` without its password or query (which may carry one), to name the
/// database in messages and logs: `postgres://user@host:5432/db`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(a database URL that is not shown)".into();
    };
    // The last '@' ends the user info even when the password holds '@',
    // '/', '?' or '#' unescaped; cutting more than needed is fine here.
    let rest = match rest.rfind('@') {
        Some(at) => {
            let user = rest[..at].split([':', '/', '?', '#']).next().unwrap_or("");
            format!("{user}@{}", &rest[at + 1..])
        }
        None => rest.to_string(),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    format!("{scheme}://{rest}")
}

/// A fresh PostgreSQL database per test, for the store's own tests and the
/// integration tests: created on the server named by [`testing::URL_VAR`],
/// dropped when the handle is.
#[doc(hidden)]
pub mod testing {
    use std::time::Duration;

    use sqlx::Connection as _;
    use sqlx::postgres::PgConnection;

    use super::redact_url;

    /// The variable naming the server the tests may create databases on
    /// (never `TOKENBROKER_*`: the config loader reads those).
    pub const URL_VAR: &str = "TB_TEST_PG_URL";
    /// The server used when [`URL_VAR`] is unset.
    pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    /// A database of its own for one test; dropped (best effort, `WITH
    /// (FORCE)`) with the handle.
    #[derive(Debug)]
    pub struct FreshDatabase {
        admin: String,
        name: String,
        url: String,
    }

    impl FreshDatabase {
        /// Creates `tb_<random>` on the test server. The error says how to
        /// point the tests at a server: they fail rather than skip without one.
        pub async fn create() -> Result<Self, String> {
            let admin = std::env::var(URL_VAR).unwrap_or_else(|_| DEFAULT_URL.into());
            let fail = |cause: String| {
                format!(
                    "the PostgreSQL store tests need a server they may create databases on; \
                     {} failed: {cause}. Start PostgreSQL or set {URL_VAR} (default {DEFAULT_URL}), \
                     then run ./scripts/test",
                    redact_url(&admin)
                )
            };
            let mut conn =
                tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&admin))
                    .await
                    .map_err(|_| fail("no connection within 10 s".into()))?
                    .map_err(|e| fail(e.to_string()))?;
            let name = format!("tb_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .map_err(|e| fail(e.to_string()))?;
            conn.close().await.ok();
            Ok(Self {
                url: with_database(&admin, &name),
                admin,
                name,
            })
        }

        /// The URL of the new database.
        pub fn url(&self) -> &str {
            &self.url
        }

        /// Its name.
        pub fn name(&self) -> &str {
            &self.name
        }
    }

    impl Drop for FreshDatabase {
        fn drop(&mut self) {
            let admin = self.admin.clone();
            let drop_sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            // Drop runs inside the test's runtime: use a thread of our own.
            let dropped = std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async {
                    if let Ok(Ok(mut conn)) =
                        tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&admin))
                            .await
                    {
                        sqlx::query(&drop_sql).execute(&mut conn).await.ok();
                        conn.close().await.ok();
                    }
                });
            });
            dropped.join().ok();
        }
    }

    /// `url` with its host and port replaced by `host` (e.g. a proxy's
    /// `127.0.0.1:PORT`).
    pub fn with_host(url: &str, host: &str) -> String {
        let (prefix, _, rest) = split(url);
        format!("{prefix}{host}{rest}")
    }

    /// `url` naming database `name` instead (query parameters kept).
    pub fn with_database(url: &str, name: &str) -> String {
        let (prefix, host, rest) = split(url);
        let query = rest.find('?').map_or("", |at| &rest[at..]);
        format!("{prefix}{host}/{name}{query}")
    }

    /// `(scheme and user info, host and port, path and query)`.
    fn split(url: &str) -> (&str, &str, &str) {
        let start = url.find("://").map_or(0, |at| at + 3);
        let host_start = url[start..].rfind('@').map_or(start, |at| start + at + 1);
        let host_end = url[host_start..]
            .find(['/', '?'])
            .map_or(url.len(), |at| host_start + at);
        (
            &url[..host_start],
            &url[host_start..host_end],
            &url[host_end..],
        )
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use futures::future::join_all;
    use tokio::time::{Instant, timeout};

    use super::testing::{FreshDatabase, with_database, with_host};
    use super::*;
    use crate::oidc::RefreshExpiry;
    use crate::session::SessionState;
    use crate::store::row::sample as session;
    use crate::store::seal::KeyId;

    const BOUND: Duration = Duration::from_secs(5);

    async fn fresh() -> FreshDatabase {
        FreshDatabase::create()
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn ring(id: &str) -> KeyRing {
        KeyRing::generate(KeyId::new(id).unwrap())
    }

    fn lease(lease: Duration) -> PostgresOptions {
        PostgresOptions {
            lease,
            ..PostgresOptions::default()
        }
    }

    async fn open(db: &FreshDatabase, keys: &KeyRing) -> PostgresStore {
        PostgresStore::open(db.url(), keys.clone(), PostgresOptions::default())
            .await
            .unwrap()
    }

    fn sid(id: &str) -> SessionId {
        SessionId::parse(id).unwrap()
    }

    /// The lease columns of a row.
    async fn lease_of(store: &PostgresStore, id: &str) -> Option<String> {
        sqlx::query("SELECT lease_owner FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .get("lease_owner")
    }

    async fn next(changes: &mut mpsc::Receiver<Change>) -> Change {
        timeout(BOUND, changes.recv())
            .await
            .expect("a change within the bound")
            .expect("the feed is open")
    }

    #[tokio::test]
    async fn round_trip_and_compare_and_swap() {
        let db = fresh().await;
        let store = open(&db, &ring("k1")).await;
        let a = session("a", "refresh-a-1", 1);
        store.insert(&a, InsertMode::New).await.unwrap();
        assert_eq!(
            store.insert(&a, InsertMode::New).await,
            Err(StoreError::Conflict)
        );
        let back = store.get(&a.id).await.unwrap().unwrap();
        assert_eq!(back.refresh_token.expose_secret(), "refresh-a-1");
        assert_eq!(
            back.access_token.as_ref().unwrap().token.expose_secret(),
            "access-of-refresh-a-1"
        );
        assert_eq!(back.labels, a.labels);
        assert_eq!(back.owner, a.owner);
        assert_eq!(back.generation, 1);
        assert_eq!(back.registered_fingerprint, a.registered_fingerprint);
        let (RefreshExpiry::At(stored), RefreshExpiry::At(original)) =
            (back.refresh_expiry, a.refresh_expiry)
        else {
            panic!("the refresh expiry comes back");
        };
        assert_eq!(row::to_ms(stored), row::to_ms(original));

        let next = session("a", "refresh-a-2", 2);
        assert_eq!(store.update(&next, 5).await, Err(StoreError::Conflict));
        store.update(&next, 1).await.unwrap();
        assert_eq!(
            store.update(&next, 1).await,
            Err(StoreError::Conflict),
            "a stale writer loses"
        );
        let replacement = session("a", "refresh-a-3", 3);
        assert_eq!(
            store
                .insert(
                    &replacement,
                    InsertMode::Replace {
                        expected_generation: 1
                    }
                )
                .await,
            Err(StoreError::Conflict)
        );
        store
            .insert(
                &replacement,
                InsertMode::Replace {
                    expected_generation: 2,
                },
            )
            .await
            .unwrap();
        let ghost = session("ghost", "x", 1);
        assert_eq!(store.update(&ghost, 0).await, Err(StoreError::NotFound));
        assert_eq!(
            store
                .insert(
                    &ghost,
                    InsertMode::Replace {
                        expected_generation: 0
                    }
                )
                .await,
            Err(StoreError::NotFound)
        );
        let all = store.load_all().await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].refresh_token.expose_secret(), "refresh-a-3");
        assert_eq!(all[0].generation, 3);
        assert!(crate::store::holds(&store, &replacement).await);
        assert_eq!(store.generations().await.unwrap(), vec![(sid("a"), 3)]);
        assert!(store.delete(&a.id).await.unwrap());
        assert!(!store.delete(&a.id).await.unwrap());
        assert!(store.get(&a.id).await.unwrap().is_none());
        store.close().await;
    }

    #[tokio::test]
    async fn the_table_holds_no_plaintext_token() {
        let db = fresh().await;
        let store = open(&db, &ring("k1")).await;
        let mut s = session("sealed", "refresh-plaintext-canary", 1);
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjYW5hcnkifQ.c2lnbmF0dXJl";
        s.access_token.as_mut().unwrap().token = crate::secret::AccessToken::from(jwt);
        store.insert(&s, InsertMode::New).await.unwrap();
        let raw =
            sqlx::query("SELECT s::text AS line, refresh_token, access_token FROM sessions s")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        let line: String = raw.get("line");
        let refresh: Vec<u8> = raw.get("refresh_token");
        let access: Vec<u8> = raw.get("access_token");
        for (needle, name) in [("refresh-plaintext-canary", "refresh"), ("eyJ", "jwt")] {
            assert!(!line.contains(needle), "{name} token in the row: {line}");
            for column in [&refresh, &access] {
                assert!(
                    !column.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{name} token in a sealed column"
                );
            }
        }
        assert_eq!(
            store
                .get(&s.id)
                .await
                .unwrap()
                .unwrap()
                .access_token
                .unwrap()
                .token
                .expose_secret(),
            jwt
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_wrong_key_is_a_startup_error_naming_the_key_id() {
        let db = fresh().await;
        let keys = ring("sealer-1");
        let store = open(&db, &keys).await;
        store
            .insert(&session("a", "r", 1), InsertMode::New)
            .await
            .unwrap();
        store.close().await;

        let other = PostgresStore::open(db.url(), ring("other"), PostgresOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&other, OpenError::WrongKey { key_id, detail: "does not contain", .. } if key_id == "sealer-1"),
            "{other}"
        );
        assert!(other.to_string().contains("\"sealer-1\""), "{other}");
        let same_id = PostgresStore::open(db.url(), ring("sealer-1"), PostgresOptions::default())
            .await
            .unwrap_err();
        assert!(
            same_id
                .to_string()
                .contains("holds with different key material"),
            "{same_id}"
        );
        let right = open(&db, &keys).await;
        assert_eq!(right.load_all().await.unwrap().len(), 1);
        right.close().await;
    }

    #[tokio::test]
    async fn replicas_starting_together_on_a_fresh_database() {
        let db = fresh().await;
        let keys = ring("k1");
        let (a, b, c) = tokio::join!(open(&db, &keys), open(&db, &keys), open(&db, &keys));
        let migrations: i64 = sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&a.pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(migrations, MIGRATIONS.iter().count() as i64);
        a.insert(&session("a", "r", 1), InsertMode::New)
            .await
            .unwrap();
        assert!(b.get(&sid("a")).await.unwrap().is_some());
        assert!(c.get(&sid("a")).await.unwrap().is_some());
        let names: HashSet<&str> = [a.replica(), b.replica(), c.replica()].into();
        assert_eq!(names.len(), 3, "every store is its own lease owner");
        for store in [a, b, c] {
            store.close().await;
        }

        // Three replicas with three different rings: the first key check
        // written wins, and the other two refuse to start.
        let db = fresh().await;
        let options = PostgresOptions::default;
        let opened = join_all(["x", "y", "z"].map(|id| {
            let url = db.url().to_string();
            async move { PostgresStore::open(&url, ring(id), options()).await }
        }))
        .await;
        let (open, refused): (Vec<_>, Vec<_>) = opened.into_iter().partition(Result::is_ok);
        assert_eq!(open.len(), 1);
        assert!(
            refused
                .iter()
                .all(|r| matches!(r, Err(OpenError::WrongKey { .. })))
        );
        for store in open.into_iter().flatten() {
            store.close().await;
        }
    }

    #[tokio::test]
    async fn claims_are_fenced_by_generation_and_lease() {
        let db = fresh().await;
        let keys = ring("k1");
        let a = open(&db, &keys).await;
        let b = open(&db, &keys).await;
        assert_ne!(a.replica(), b.replica());
        assert_eq!(a.lease(), Duration::from_secs(30));
        let s = session("s", "r1", 1);
        a.insert(&s, InsertMode::New).await.unwrap();

        assert_eq!(a.claim(&s.id, 1).await.unwrap(), Claim::Granted);
        assert_eq!(lease_of(&a, "s").await.as_deref(), Some(a.replica()));
        let Claim::Held { remaining } = b.claim(&s.id, 1).await.unwrap() else {
            panic!("another replica's lease is held");
        };
        assert!(
            remaining > Duration::from_secs(28) && remaining <= Duration::from_secs(30),
            "{remaining:?}"
        );
        assert!(
            matches!(a.claim(&s.id, 1).await.unwrap(), Claim::Held { .. }),
            "a live lease is never granted twice, even to its owner"
        );

        b.release(&s.id).await.unwrap();
        assert_eq!(lease_of(&a, "s").await.as_deref(), Some(a.replica()));
        assert!(matches!(
            b.claim(&s.id, 1).await.unwrap(),
            Claim::Held { .. }
        ));
        assert!(!b.renew(&s.id).await.unwrap(), "not b's lease");
        assert!(a.renew(&s.id).await.unwrap());

        // The refresh's write ends the lease; the old generation has moved.
        a.update(&session("s", "r2", 2), 1).await.unwrap();
        assert_eq!(lease_of(&a, "s").await, None);
        assert_eq!(b.claim(&s.id, 1).await.unwrap(), Claim::Moved);
        assert_eq!(b.claim(&s.id, 3).await.unwrap(), Claim::Moved);
        assert_eq!(b.claim(&s.id, 2).await.unwrap(), Claim::Granted);
        assert!(!a.renew(&s.id).await.unwrap());

        // A failed refresh gives the lease back without a new generation.
        b.release(&s.id).await.unwrap();
        assert_eq!(lease_of(&a, "s").await, None);
        assert_eq!(a.claim(&s.id, 2).await.unwrap(), Claim::Granted);

        // A replacing insert ends the lease too.
        a.insert(
            &session("s", "r3", 3),
            InsertMode::Replace {
                expected_generation: 2,
            },
        )
        .await
        .unwrap();
        assert_eq!(lease_of(&a, "s").await, None);
        assert_eq!(b.claim(&s.id, 3).await.unwrap(), Claim::Granted);

        assert_eq!(a.claim(&sid("ghost"), 1).await.unwrap(), Claim::Gone);
        a.delete(&s.id).await.unwrap();
        assert_eq!(b.claim(&s.id, 3).await.unwrap(), Claim::Gone);
        assert!(!b.renew(&s.id).await.unwrap());
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn a_lapsed_lease_passes_to_another_replica() {
        let db = fresh().await;
        let keys = ring("k1");
        let short = Duration::from_secs(1);
        let a = PostgresStore::open(db.url(), keys.clone(), lease(short))
            .await
            .unwrap();
        let b = PostgresStore::open(db.url(), keys, lease(short))
            .await
            .unwrap();
        let s = session("s", "r1", 1);
        a.insert(&s, InsertMode::New).await.unwrap();

        assert_eq!(a.claim(&s.id, 1).await.unwrap(), Claim::Granted);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(
            a.renew(&s.id).await.unwrap(),
            "a lapsed lease nobody took may still be renewed"
        );
        assert!(
            matches!(b.claim(&s.id, 1).await.unwrap(), Claim::Held { remaining } if remaining <= short)
        );

        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(b.claim(&s.id, 1).await.unwrap(), Claim::Granted);
        assert_eq!(lease_of(&a, "s").await.as_deref(), Some(b.replica()));
        assert!(!a.renew(&s.id).await.unwrap(), "a's lease is gone");
        a.release(&s.id).await.unwrap();
        assert_eq!(
            lease_of(&a, "s").await.as_deref(),
            Some(b.replica()),
            "a cannot release b's lease"
        );
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn a_locked_row_is_held_not_waited_for() {
        let db = fresh().await;
        let keys = ring("k1");
        let a = open(&db, &keys).await;
        let b = open(&db, &keys).await;
        a.insert(&session("s", "r1", 1), InsertMode::New)
            .await
            .unwrap();
        a.insert(&session("t", "r1", 1), InsertMode::New)
            .await
            .unwrap();
        let mut tx = a.pool.begin().await.unwrap();
        sqlx::query("SELECT id FROM sessions WHERE id = 's' FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let started = Instant::now();
        let claim = timeout(Duration::from_secs(2), b.claim(&sid("s"), 1))
            .await
            .expect("a claim never waits for a locked row")
            .unwrap();
        assert_eq!(
            claim,
            Claim::Held {
                remaining: LOCKED_RETRY
            }
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            b.claim(&sid("t"), 1).await.unwrap(),
            Claim::Granted,
            "other rows are claimable meanwhile"
        );
        tx.rollback().await.unwrap();
        assert_eq!(b.claim(&sid("s"), 1).await.unwrap(), Claim::Granted);
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn concurrent_claims_share_few_statements() {
        let db = fresh().await;
        let keys = ring("k1");
        let a = open(&db, &keys).await;
        let b = open(&db, &keys).await;
        let sessions: Vec<_> = (0..200)
            .map(|i| session(&format!("due-{i}"), &format!("r{i}"), 1))
            .collect();
        a.insert_many(&sessions).await.unwrap();

        let before = a.claim_statements();
        let claims = join_all(sessions.iter().map(|s| a.claim(&s.id, 1))).await;
        assert!(
            claims.iter().all(|c| c == &Ok(Claim::Granted)),
            "{claims:?}"
        );
        let statements = a.claim_statements() - before;
        assert!(
            (1..=3).contains(&statements),
            "200 claims took {statements} statements"
        );
        let leased: i64 = sqlx::query("SELECT COUNT(*) FROM sessions WHERE lease_owner = $1")
            .bind(a.replica())
            .fetch_one(&a.pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(leased, 200);
        let claims = join_all(sessions.iter().map(|s| b.claim(&s.id, 1))).await;
        assert!(
            claims.iter().all(|c| matches!(c, Ok(Claim::Held { .. }))),
            "{claims:?}"
        );

        // Two claims on one free lease in the same batch: one wins.
        let s = &sessions[0].id;
        b.update(&session("due-0", "r0b", 2), 1).await.unwrap();
        let both = join_all([b.claim(s, 2), b.claim(s, 2), b.claim(s, 2)]).await;
        let granted = both.iter().filter(|c| c == &&Ok(Claim::Granted)).count();
        assert_eq!(granted, 1, "{both:?}");
        assert!(both.iter().all(|c| c.is_ok()));
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn a_claim_abandoned_before_its_answer_gives_the_lease_back() {
        let db = fresh().await;
        let store = open(&db, &ring("k1")).await;
        store
            .insert(&session("s", "r1", 1), InsertMode::New)
            .await
            .unwrap();
        // Hold the claim statement up with a table lock, and leave meanwhile.
        let mut tx = store.pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .unwrap();
        let before = store.claim_statements();
        assert!(
            timeout(Duration::from_millis(300), store.claim(&sid("s"), 1))
                .await
                .is_err()
        );
        assert_eq!(store.claim_statements(), before + 1, "the claim was sent");
        tx.commit().await.unwrap();
        let deadline = Instant::now() + BOUND;
        let mut owners = Vec::new();
        loop {
            let owner = lease_of(&store, "s").await;
            let settled = owner.is_none() && owners.contains(&Some(store.replica().to_string()));
            owners.push(owner);
            if settled || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(owners.last(), Some(&None), "the lease was given back");
        assert_eq!(store.claim(&sid("s"), 1).await.unwrap(), Claim::Granted);
        store.close().await;
    }

    #[tokio::test]
    async fn follow_reports_changes_and_recovers_a_lost_connection() {
        let db = fresh().await;
        let keys = ring("k1");
        let a = Arc::new(open(&db, &keys).await);
        let b = open(&db, &keys).await;
        let (tx, mut changes) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let following = tokio::spawn({
            let a = a.clone();
            let shutdown = shutdown.clone();
            async move { a.follow(tx, shutdown).await }
        });
        assert_eq!(next(&mut changes).await, Change::Resync);

        let id = sid("tenant:7:main");
        b.insert(&session(id.as_str(), "r1", 1), InsertMode::New)
            .await
            .unwrap();
        b.update(&session(id.as_str(), "r2", 2), 1).await.unwrap();
        assert_eq!(b.claim(&id, 2).await.unwrap(), Claim::Granted);
        assert!(b.renew(&id).await.unwrap());
        b.release(&id).await.unwrap();
        assert_eq!(b.claim(&id, 2).await.unwrap(), Claim::Granted);
        let mut ended = session(id.as_str(), "r2", 2);
        ended.state = SessionState::ReauthRequired;
        b.update(&ended, 2).await.unwrap();
        b.delete(&id).await.unwrap();
        let expected = [
            Change::Written {
                id: id.clone(),
                generation: 1,
            },
            Change::Written {
                id: id.clone(),
                generation: 2,
            },
            Change::Released { id: id.clone() },
            Change::Written {
                id: id.clone(),
                generation: 2,
            },
            Change::Deleted { id: id.clone() },
        ];
        for want in expected {
            assert_eq!(next(&mut changes).await, want);
        }

        // Kill the listening connection; write while it is down.
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_all(&b.pool)
        .await
        .unwrap();
        assert_eq!(killed, vec![true]);
        b.insert(&session("meanwhile", "r1", 1), InsertMode::New)
            .await
            .unwrap();
        // The dying backend may still pass on the write before it goes.
        let meanwhile = Change::Written {
            id: sid("meanwhile"),
            generation: 1,
        };
        let mut change = next(&mut changes).await;
        if change == meanwhile {
            change = next(&mut changes).await;
        }
        assert_eq!(change, Change::Lost);
        assert_eq!(next(&mut changes).await, Change::Resync);
        assert!(
            a.generations()
                .await
                .unwrap()
                .contains(&(sid("meanwhile"), 1))
        );
        b.insert(&session("after", "r1", 1), InsertMode::New)
            .await
            .unwrap();
        loop {
            match next(&mut changes).await {
                Change::Written { id, .. } if id.as_str() == "meanwhile" => continue,
                change => {
                    assert_eq!(
                        change,
                        Change::Written {
                            id: sid("after"),
                            generation: 1
                        }
                    );
                    break;
                }
            }
        }

        shutdown.cancel();
        timeout(Duration::from_secs(1), following)
            .await
            .expect("follow stops promptly on shutdown")
            .unwrap();
        b.close().await;
        a.close().await;
    }

    #[tokio::test]
    async fn reseal_moves_every_row_without_a_notification() {
        let db = fresh().await;
        let old = ring("old");
        let store = open(&db, &old).await;
        let sessions: Vec<_> = (0..25)
            .map(|i| session(&format!("s{i}"), &format!("r{i}"), 1))
            .collect();
        store.insert_many(&sessions).await.unwrap();
        assert_eq!(store.claim(&sid("s3"), 1).await.unwrap(), Claim::Granted);
        let mut listener = PgListener::connect(db.url()).await.unwrap();
        listener.listen(CHANNEL).await.unwrap();

        let new = ring("new");
        store
            .set_keys(old.with_primary(new.clone()).unwrap())
            .await
            .unwrap();
        assert_eq!(store.reseal(10).await.unwrap(), 25);
        assert_eq!(
            store.rows_by_key().await.unwrap(),
            vec![("new".to_string(), 25)]
        );
        assert_eq!(
            lease_of(&store, "s3").await.as_deref(),
            Some(store.replica()),
            "re-sealing keeps the lease"
        );
        store
            .insert(&session("marker", "m", 1), InsertMode::New)
            .await
            .unwrap();
        let first = timeout(BOUND, listener.recv()).await.unwrap().unwrap();
        assert_eq!(first.payload(), "w:1:marker", "re-sealing notified nobody");
        store.close().await;

        let reopened = open(&db, &new).await;
        assert_eq!(reopened.load_all().await.unwrap().len(), 26);
        reopened.close().await;
        let error = PostgresStore::open(db.url(), old, PostgresOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(error, OpenError::WrongKey { .. }), "{error}");
        assert!(
            store.set_keys(ring("stranger")).await.is_err(),
            "a ring that does not open the database is refused"
        );
    }

    /// A TCP forwarder to the test server that can be cut (every
    /// connection reset, new ones refused) and restored on the same port.
    struct Proxy {
        addr: SocketAddr,
        cut: CancellationToken,
        task: JoinHandle<()>,
    }

    impl Proxy {
        async fn start(addr: SocketAddr, target: SocketAddr) -> Self {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let cut = CancellationToken::new();
            let task = tokio::spawn({
                let cut = cut.clone();
                async move {
                    let mut links = tokio::task::JoinSet::new();
                    loop {
                        tokio::select! {
                            () = cut.cancelled() => break,
                            accepted = listener.accept() => {
                                let Ok((mut inbound, _)) = accepted else { break };
                                links.spawn(async move {
                                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await.ok();
                                    }
                                });
                            }
                        }
                    }
                    links.shutdown().await;
                }
            });
            Self { addr, cut, task }
        }

        async fn cut(self) -> SocketAddr {
            self.cut.cancel();
            self.task.await.unwrap();
            self.addr
        }
    }

    async fn server_addr(url: &str) -> SocketAddr {
        let options = PgConnectOptions::from_str(url).unwrap();
        tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await
            .unwrap()
            .next()
            .unwrap()
    }

    #[tokio::test]
    async fn an_unreachable_database_fails_calls_fast() {
        let db = fresh().await;
        let target = server_addr(db.url()).await;
        let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), target).await;
        let url = with_host(db.url(), &proxy.addr.to_string());
        let options = PostgresOptions {
            connect_timeout: Duration::from_secs(1),
            ..PostgresOptions::default()
        };
        let store = Arc::new(
            PostgresStore::open(&url, ring("k1"), options)
                .await
                .unwrap(),
        );
        let s = session("s", "r1", 1);
        store.insert(&s, InsertMode::New).await.unwrap();
        let (tx, mut changes) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let following = tokio::spawn({
            let store = store.clone();
            let shutdown = shutdown.clone();
            async move { store.follow(tx, shutdown).await }
        });
        assert_eq!(next(&mut changes).await, Change::Resync);

        let addr = proxy.cut().await;
        assert_eq!(next(&mut changes).await, Change::Lost);
        let bound = Duration::from_secs(3);
        let started = Instant::now();
        let outcomes = [
            timeout(bound, store.get(&s.id))
                .await
                .map(|r| r.map(|_| ())),
            timeout(bound, store.update(&session("s", "r2", 2), 1)).await,
            timeout(bound, store.claim(&s.id, 1))
                .await
                .map(|r| r.map(|_| ())),
            timeout(bound, store.renew(&s.id))
                .await
                .map(|r| r.map(|_| ())),
            timeout(bound, store.release(&s.id)).await,
            timeout(bound, store.generations())
                .await
                .map(|r| r.map(|_| ())),
        ];
        for outcome in outcomes {
            let result = outcome.expect("a call on an unreachable database fails fast");
            assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(12));

        // The database is back: the feed resyncs and calls work again.
        let proxy = Proxy::start(addr, target).await;
        // Within a reconnection backoff (at most 5 s) and a connection attempt.
        let resync = timeout(Duration::from_secs(15), changes.recv()).await;
        assert_eq!(resync.unwrap(), Some(Change::Resync));
        assert_eq!(store.claim(&s.id, 1).await.unwrap(), Claim::Granted);
        shutdown.cancel();
        following.await.unwrap();
        store.close().await;
        proxy.cut().await;
    }

    #[tokio::test]
    async fn a_closed_port_fails_open_fast_and_never_shows_the_password() {
        let options = PostgresOptions {
            connect_timeout: Duration::from_secs(1),
            ..PostgresOptions::default()
        };
        let started = Instant::now();
        let error = PostgresStore::open(
            "postgres://tb:s3cret-pw@127.0.0.1:1/tokens?password=s3cret-pw",
            ring("k1"),
            options,
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = error.to_string();
        assert!(text.contains("postgres://tb@127.0.0.1:1/tokens"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(!format!("{error:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn a_closed_store_refuses_claims_and_ends_its_feed() {
        let db = fresh().await;
        let store = Arc::new(open(&db, &ring("k1")).await);
        // A consumer that stopped reading: the feed is stuck on a full channel.
        let (tx, mut changes) = mpsc::channel(1);
        let following = tokio::spawn({
            let store = store.clone();
            async move { store.follow(tx, CancellationToken::new()).await }
        });
        assert_eq!(next(&mut changes).await, Change::Resync);
        for id in ["s", "t"] {
            store
                .insert(&session(id, "r1", 1), InsertMode::New)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        timeout(BOUND, store.close())
            .await
            .expect("close does not wait for a stuck feed");
        assert!(matches!(
            timeout(BOUND, store.claim(&sid("s"), 1)).await.unwrap(),
            Err(StoreError::Backend(_))
        ));
        timeout(BOUND, following).await.unwrap().unwrap();
    }

    #[test]
    fn payloads_split_on_the_first_separators_only() {
        assert_eq!(
            parse_change("w:12:tenant:7:main"),
            Some(Change::Written {
                id: sid("tenant:7:main"),
                generation: 12
            })
        );
        assert_eq!(
            parse_change("d:a:b"),
            Some(Change::Deleted { id: sid("a:b") })
        );
        assert_eq!(parse_change("r:x"), Some(Change::Released { id: sid("x") }));
        for bad in [
            "", "w", "w:", "w:1", "w:x:id", "w:-1:id", "d:", "d:bad id", "x:id", "r",
        ] {
            assert_eq!(parse_change(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn database_names_in_messages_carry_no_credentials() {
        for (url, shown) in [
            (
                "postgres://tb:s3cret@db.internal:5432/tokens?sslmode=require",
                "postgres://tb@db.internal:5432/tokens",
            ),
            (
                "postgresql://tb:p@ss/w?rd#s3cret@db/tokens",
                "postgresql://tb@db/tokens",
            ),
            (
                "postgres://db/tokens?password=s3cret",
                "postgres://db/tokens",
            ),
            ("postgres://tb@db/tokens", "postgres://tb@db/tokens"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        assert!(!redact_url("host=db password=s3cret").contains("s3cret"));
    }

    #[test]
    fn test_urls_swap_database_and_host() {
        let url = "postgres://u:pw@127.0.0.1:5432/test?sslmode=disable";
        assert_eq!(
            with_database(url, "tb_1"),
            "postgres://u:pw@127.0.0.1:5432/tb_1?sslmode=disable"
        );
        assert_eq!(
            with_host(url, "127.0.0.1:9"),
            "postgres://u:pw@127.0.0.1:9/test?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://localhost", "tb_2"),
            "postgres://localhost/tb_2"
        );
    }

    #[test]
    fn claim_outcomes() {
        let seen = |stored, granted, remaining_ms| Seen {
            stored,
            granted,
            remaining_ms,
        };
        assert_eq!(classify(1, seen(None, false, None)), Claim::Gone);
        assert_eq!(classify(1, seen(Some(1), true, None)), Claim::Granted);
        assert_eq!(classify(1, seen(Some(2), false, Some(500))), Claim::Moved);
        assert_eq!(
            classify(1, seen(Some(1), false, Some(1500))),
            Claim::Held {
                remaining: Duration::from_millis(1500)
            }
        );
        assert_eq!(
            classify(1, seen(Some(1), false, None)),
            Claim::Held {
                remaining: LOCKED_RETRY
            }
        );
    }
}
