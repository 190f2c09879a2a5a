//! The row format shared by the SQL stores ([`super::SqliteStore`] and
//! [`super::PostgresStore`]): which columns a session has, how tokens are
//! sealed into them (the associated data binds the session id and the column
//! name, so a ciphertext moved to another row or column does not open), and
//! how plain metadata is written (labels as JSON, times as Unix milliseconds,
//! the refresh expiry as a kind and a time, error classes as names).
//!
//! Both stores bind and read the same [`Columns`]; only their SQL dialect
//! (placeholders, extra lease columns) differs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{ColumnIndex, Database, Decode, Encode, Row, Type};
use tracing::warn;
use zeroize::Zeroizing;

use super::seal::{KeyRing, SealError};
use super::{StoreError, StoredAccessToken, StoredSession};
use crate::oidc::RefreshExpiry;
use crate::secret::{AccessToken, RefreshToken};
use crate::session::{ErrorClass, Labels, SessionError, SessionId, SessionState};

/// The written columns of a session row, in bind order: every column but
/// `id` (the statements' `SET` list), then `id`.
pub(super) const COLUMNS: [&str; 22] = [
    "provider",
    "labels",
    "refresh_token",
    "registered_fingerprint",
    "access_token",
    "access_expires_at_ms",
    "access_issued_at_ms",
    "scope",
    "refresh_expiry_kind",
    "refresh_expires_at_ms",
    "longest_refresh_lifetime_s",
    "generation",
    "state",
    "last_error_class",
    "last_error_description",
    "last_error_at_ms",
    "created_at_ms",
    "last_refresh_at_ms",
    "reauth_due_at_ms",
    "key_id",
    "owner",
    "id",
];

/// `INSERT INTO sessions (…) VALUES (…)` binding [`COLUMNS`] in order;
/// `param(n)` spells the n-th placeholder (1-based).
pub(super) fn insert_sql(param: impl Fn(usize) -> String) -> String {
    let values: Vec<String> = (1..=COLUMNS.len()).map(&param).collect();
    format!(
        "INSERT INTO sessions ({}) VALUES ({})",
        COLUMNS.join(", "),
        values.join(", ")
    )
}

/// The compare-and-swap: `UPDATE sessions SET …, {extra} WHERE id = … AND
/// generation = …`, binding [`COLUMNS`] in order, then the expected generation.
pub(super) fn update_sql(param: impl Fn(usize) -> String, extra: &str) -> String {
    let (id, set) = COLUMNS.split_last().unwrap_or((&"id", &[]));
    let mut assignments: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, column)| format!("{column} = {}", param(i + 1)))
        .collect();
    if !extra.is_empty() {
        assignments.push(extra.to_string());
    }
    format!(
        "UPDATE sessions SET {} WHERE {id} = {} AND generation = {}",
        assignments.join(", "),
        param(COLUMNS.len()),
        param(COLUMNS.len() + 1)
    )
}

/// One session row as stored: tokens sealed, metadata plain.
pub(super) struct Columns {
    provider: String,
    labels: String,
    refresh_token: Vec<u8>,
    registered_fingerprint: Vec<u8>,
    access_token: Option<Vec<u8>>,
    access_expires_at_ms: Option<i64>,
    access_issued_at_ms: Option<i64>,
    scope: String,
    refresh_expiry_kind: i64,
    refresh_expires_at_ms: Option<i64>,
    longest_refresh_lifetime_s: Option<i64>,
    generation: i64,
    state: String,
    last_error_class: Option<String>,
    last_error_description: Option<String>,
    last_error_at_ms: Option<i64>,
    created_at_ms: i64,
    last_refresh_at_ms: Option<i64>,
    reauth_due_at_ms: Option<i64>,
    key_id: String,
    owner: Option<String>,
    id: String,
}

impl Columns {
    /// Seals `session`'s tokens under the primary key of `keys`.
    pub(super) fn encode(keys: &KeyRing, session: &StoredSession) -> Self {
        let id = session.id.as_str();
        let (refresh_expiry_kind, refresh_expires_at_ms) = match session.refresh_expiry {
            RefreshExpiry::Unknown => (0, None),
            RefreshExpiry::Never => (1, None),
            RefreshExpiry::At(t) => (2, Some(to_ms(t))),
        };
        let access = session.access_token.as_ref();
        let error = session.last_error.as_ref();
        Self {
            provider: session.provider.clone(),
            labels: serde_json::to_string(&session.labels).unwrap_or_else(|_| "{}".into()),
            refresh_token: keys.seal(
                session.refresh_token.expose_secret().as_bytes(),
                &aad(id, "refresh_token"),
            ),
            registered_fingerprint: session.registered_fingerprint.to_vec(),
            access_token: access
                .map(|t| keys.seal(t.token.expose_secret().as_bytes(), &aad(id, "access_token"))),
            access_expires_at_ms: access.map(|t| to_ms(t.expires_at)),
            access_issued_at_ms: access.map(|t| to_ms(t.issued_at)),
            scope: access.map_or_else(String::new, |t| t.scope.clone()),
            refresh_expiry_kind,
            refresh_expires_at_ms,
            longest_refresh_lifetime_s: session
                .longest_refresh_lifetime_secs
                .map(|s| s.min(i64::MAX as u64) as i64),
            generation: session.generation.min(i64::MAX as u64) as i64,
            state: session.state.as_str().to_string(),
            last_error_class: error.map(|e| class_str(e.class).to_string()),
            last_error_description: error.map(|e| e.description.clone()),
            last_error_at_ms: error.map(|e| to_ms(e.at)),
            created_at_ms: to_ms(session.created_at),
            last_refresh_at_ms: session.last_refresh_at.map(to_ms),
            reauth_due_at_ms: session.reauth_due_at.map(to_ms),
            key_id: keys.primary().to_string(),
            owner: session.owner.clone(),
            id: id.to_string(),
        }
    }

    /// The session id.
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// Binds every column, in the order of [`COLUMNS`].
    pub(super) fn bind<'q, DB>(
        self,
        query: sqlx::query::Query<'q, DB, <DB as Database>::Arguments<'q>>,
    ) -> sqlx::query::Query<'q, DB, <DB as Database>::Arguments<'q>>
    where
        DB: Database,
        String: Encode<'q, DB> + Type<DB>,
        Vec<u8>: Encode<'q, DB> + Type<DB>,
        i64: Encode<'q, DB> + Type<DB>,
        Option<String>: Encode<'q, DB>,
        Option<Vec<u8>>: Encode<'q, DB>,
        Option<i64>: Encode<'q, DB>,
    {
        query
            .bind(self.provider)
            .bind(self.labels)
            .bind(self.refresh_token)
            .bind(self.registered_fingerprint)
            .bind(self.access_token)
            .bind(self.access_expires_at_ms)
            .bind(self.access_issued_at_ms)
            .bind(self.scope)
            .bind(self.refresh_expiry_kind)
            .bind(self.refresh_expires_at_ms)
            .bind(self.longest_refresh_lifetime_s)
            .bind(self.generation)
            .bind(self.state)
            .bind(self.last_error_class)
            .bind(self.last_error_description)
            .bind(self.last_error_at_ms)
            .bind(self.created_at_ms)
            .bind(self.last_refresh_at_ms)
            .bind(self.reauth_due_at_ms)
            .bind(self.key_id)
            .bind(self.owner)
            .bind(self.id)
    }

    /// Reads the columns of a `SELECT *` row.
    pub(super) fn read<R>(row: &R) -> Result<Self, StoreError>
    where
        R: Row,
        &'static str: ColumnIndex<R>,
        for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    {
        Ok(Self {
            provider: row.try_get("provider").map_err(unreadable)?,
            labels: row.try_get("labels").map_err(unreadable)?,
            refresh_token: row.try_get("refresh_token").map_err(unreadable)?,
            registered_fingerprint: row.try_get("registered_fingerprint").map_err(unreadable)?,
            access_token: row.try_get("access_token").map_err(unreadable)?,
            access_expires_at_ms: row.try_get("access_expires_at_ms").map_err(unreadable)?,
            access_issued_at_ms: row.try_get("access_issued_at_ms").map_err(unreadable)?,
            scope: row.try_get("scope").map_err(unreadable)?,
            refresh_expiry_kind: row.try_get("refresh_expiry_kind").map_err(unreadable)?,
            refresh_expires_at_ms: row.try_get("refresh_expires_at_ms").map_err(unreadable)?,
            longest_refresh_lifetime_s: row
                .try_get("longest_refresh_lifetime_s")
                .map_err(unreadable)?,
            generation: row.try_get("generation").map_err(unreadable)?,
            state: row.try_get("state").map_err(unreadable)?,
            last_error_class: row.try_get("last_error_class").map_err(unreadable)?,
            last_error_description: row.try_get("last_error_description").map_err(unreadable)?,
            last_error_at_ms: row.try_get("last_error_at_ms").map_err(unreadable)?,
            created_at_ms: row.try_get("created_at_ms").map_err(unreadable)?,
            last_refresh_at_ms: row.try_get("last_refresh_at_ms").map_err(unreadable)?,
            reauth_due_at_ms: row.try_get("reauth_due_at_ms").map_err(unreadable)?,
            key_id: row.try_get("key_id").map_err(unreadable)?,
            owner: row.try_get("owner").map_err(unreadable)?,
            id: row.try_get("id").map_err(unreadable)?,
        })
    }

    /// Opens the sealed tokens and rebuilds the session.
    pub(super) fn decode(self, keys: &KeyRing) -> Result<StoredSession, StoreError> {
        let id = self.id;
        let session_id = SessionId::parse(&id)
            .map_err(|_| StoreError::Backend(format!("stored session id {id:?} is invalid")))?;
        let refresh = open_column(keys, &id, "refresh_token", &self.refresh_token)?;
        let refresh_token = RefreshToken::new(utf8(&id, &refresh)?);
        let access_token = match self.access_token {
            Some(sealed) => {
                let plain = open_column(keys, &id, "access_token", &sealed)?;
                Some(StoredAccessToken {
                    token: AccessToken::new(utf8(&id, &plain)?),
                    expires_at: from_ms(self.access_expires_at_ms.unwrap_or(0)),
                    issued_at: from_ms(self.access_issued_at_ms.unwrap_or(0)),
                    scope: self.scope,
                })
            }
            None => None,
        };
        let labels: Labels = serde_json::from_str(&self.labels)
            .map_err(|e| StoreError::Backend(format!("labels of {id:?}: {e}")))?;
        let registered_fingerprint: [u8; 32] = self
            .registered_fingerprint
            .try_into()
            .map_err(|_| StoreError::Backend(format!("fingerprint of {id:?} is not 32 bytes")))?;
        let refresh_expiry = match (self.refresh_expiry_kind, self.refresh_expires_at_ms) {
            (1, _) => RefreshExpiry::Never,
            (2, Some(ms)) => RefreshExpiry::At(from_ms(ms)),
            _ => RefreshExpiry::Unknown,
        };
        let state = match self.state.as_str() {
            "reauth_required" => SessionState::ReauthRequired,
            _ => SessionState::Active,
        };
        let last_error = match (
            self.last_error_class,
            self.last_error_description,
            self.last_error_at_ms,
        ) {
            (Some(class), Some(description), Some(at)) => Some(SessionError {
                class: class_from_str(&class),
                description,
                at: from_ms(at),
            }),
            _ => None,
        };
        Ok(StoredSession {
            id: session_id,
            provider: self.provider,
            labels,
            owner: self.owner,
            refresh_token,
            registered_fingerprint,
            access_token,
            refresh_expiry,
            longest_refresh_lifetime_secs: self.longest_refresh_lifetime_s.map(|s| s.max(0) as u64),
            generation: self.generation.max(0) as u64,
            state,
            last_error,
            created_at: from_ms(self.created_at_ms),
            last_refresh_at: self.last_refresh_at_ms.map(from_ms),
            reauth_due_at: self.reauth_due_at_ms.map(from_ms),
        })
    }
}

/// Reads and unseals a page of rows off the async threads, in two halves
/// at once (unsealing two tokens a row is most of a restart's CPU).
pub(super) async fn decode_page<R>(
    keys: &KeyRing,
    mut rows: Vec<R>,
) -> Result<Vec<StoredSession>, StoreError>
where
    R: Row + Send + 'static,
    &'static str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let decode = |keys: KeyRing, rows: Vec<R>| {
        tokio::task::spawn_blocking(move || {
            rows.iter()
                .map(|row| Columns::read(row)?.decode(&keys))
                .collect::<Result<Vec<_>, _>>()
        })
    };
    let second = rows.split_off(rows.len() / 2);
    let (first, second) = tokio::join!(decode(keys.clone(), rows), decode(keys.clone(), second));
    let joined = |r: Result<_, tokio::task::JoinError>| {
        r.map_err(|e| StoreError::Backend(format!("decoding stored sessions: {e}")))?
    };
    let mut sessions: Vec<StoredSession> = joined(first)?;
    sessions.extend(joined(second)?);
    Ok(sessions)
}

/// A row's tokens sealed again under the primary key of `keys` (key
/// rotation): `(refresh_token, access_token)`.
pub(super) fn reseal(
    keys: &KeyRing,
    id: &str,
    refresh_token: &[u8],
    access_token: Option<&[u8]>,
) -> Result<(Vec<u8>, Option<Vec<u8>>), StoreError> {
    let refresh = open_column(keys, id, "refresh_token", refresh_token)?;
    let access = access_token
        .map(|sealed| open_column(keys, id, "access_token", sealed))
        .transpose()?;
    Ok((
        keys.seal(&refresh, &aad(id, "refresh_token")),
        access.map(|a| keys.seal(&a, &aad(id, "access_token"))),
    ))
}

/// Associated data of the key-check value.
const CHECK_AAD: &[u8] = b"tokenbroker key check";
/// The known plaintext of the key-check value.
const CHECK_VALUE: &[u8] = b"tokenbroker";

/// The key-check value sealed under the primary key of `keys`: stored once
/// per database, it proves at start that the configured ring opens it.
pub(super) fn seal_check(keys: &KeyRing) -> Vec<u8> {
    keys.seal(CHECK_VALUE, CHECK_AAD)
}

/// Whether `keys` opens the stored key-check value; the error says how the
/// ring fails (`does not contain` the key that sealed it, or holds it with
/// different material).
pub(super) fn verify_check(keys: &KeyRing, sealed: &[u8]) -> Result<(), &'static str> {
    match keys.open(sealed, CHECK_AAD) {
        Ok(value) if value.as_slice() == CHECK_VALUE => Ok(()),
        Err(SealError::UnknownKey(_)) => Err("does not contain"),
        _ => Err("holds with different key material"),
    }
}

fn aad(id: &str, column: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(id.len() + column.len() + 1);
    aad.extend_from_slice(id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(column.as_bytes());
    aad
}

fn open_column(
    keys: &KeyRing,
    id: &str,
    column: &str,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    keys.open(sealed, &aad(id, column)).map_err(|e| {
        StoreError::Backend(format!(
            "cannot open the sealed {column} of session {id:?}: {e}"
        ))
    })
}

fn utf8(id: &str, bytes: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| StoreError::Backend(format!("a token of session {id:?} is not UTF-8")))
}

fn unreadable(error: sqlx::Error) -> StoreError {
    StoreError::Backend(format!("unreadable session row: {error}"))
}

/// A driver error as a store failure (logged; the database's own message
/// when it has one: it names no bound value).
pub(super) fn backend(error: sqlx::Error) -> StoreError {
    let message = match &error {
        sqlx::Error::Database(e) => e.message().to_string(),
        other => other.to_string(),
    };
    warn!(error = %message, "session store failed");
    StoreError::Backend(message)
}

/// Unix milliseconds, as the stores keep times.
pub(super) fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn class_str(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::RejectedSession => "rejected_session",
        ErrorClass::RejectedConfig => "rejected_config",
        ErrorClass::Transient => "transient",
        ErrorClass::Unreadable => "unreadable",
        ErrorClass::Store => "store",
    }
}

fn class_from_str(raw: &str) -> ErrorClass {
    match raw {
        "rejected_session" => ErrorClass::RejectedSession,
        "rejected_config" => ErrorClass::RejectedConfig,
        "unreadable" => ErrorClass::Unreadable,
        "store" => ErrorClass::Store,
        _ => ErrorClass::Transient,
    }
}

/// A session as the store tests write it: `access-of-<refresh>` as its
/// access token, times now.
#[cfg(test)]
pub(crate) fn sample(id: &str, refresh: &str, generation: u64) -> StoredSession {
    let now = SystemTime::now();
    StoredSession {
        id: SessionId::parse(id).unwrap(),
        provider: "apiax".into(),
        labels: [("team".to_string(), "a".to_string())].into(),
        owner: Some("spiffe://test/ns/a/sa/b".into()),
        refresh_token: RefreshToken::from(refresh),
        registered_fingerprint: RefreshToken::from(refresh).fingerprint(),
        access_token: Some(StoredAccessToken {
            token: AccessToken::from(format!("access-of-{refresh}").as_str()),
            expires_at: now + Duration::from_secs(1800),
            issued_at: now,
            scope: "profile".into(),
        }),
        refresh_expiry: RefreshExpiry::At(now + Duration::from_secs(3600)),
        longest_refresh_lifetime_secs: Some(3600),
        generation,
        state: SessionState::Active,
        last_error: None,
        created_at: now,
        last_refresh_at: Some(now),
        reauth_due_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_bind_every_column_once_in_order() {
        let insert = insert_sql(|_| "?".into());
        assert_eq!(insert.matches('?').count(), COLUMNS.len());
        let update = update_sql(|n| format!("${n}"), "lease_owner = NULL");
        assert!(
            update.starts_with("UPDATE sessions SET provider = $1, labels = $2,"),
            "{update}"
        );
        assert!(
            update.ends_with("owner = $21, lease_owner = NULL WHERE id = $22 AND generation = $23"),
            "{update}"
        );
    }

    #[test]
    fn error_classes_round_trip() {
        for class in [
            ErrorClass::RejectedSession,
            ErrorClass::RejectedConfig,
            ErrorClass::Transient,
            ErrorClass::Unreadable,
            ErrorClass::Store,
        ] {
            assert_eq!(class_from_str(class_str(class)), class);
        }
    }
}
