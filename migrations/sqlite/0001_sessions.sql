-- Sessions of the embedded store. Tokens are sealed (AEAD) by the broker
-- before they reach this table: `refresh_token` and `access_token` hold
-- ciphertext whose associated data is the session id and the column name.
-- Times are Unix milliseconds. The PostgreSQL store mirrors this schema.
CREATE TABLE sessions (
    id                          TEXT    NOT NULL PRIMARY KEY,
    provider                    TEXT    NOT NULL,
    labels                      TEXT    NOT NULL,            -- JSON object
    refresh_token               BLOB    NOT NULL,            -- sealed
    registered_fingerprint      BLOB    NOT NULL,            -- SHA-256 of the token as registered
    access_token                BLOB,                        -- sealed
    access_expires_at_ms        INTEGER,
    access_issued_at_ms         INTEGER,
    scope                       TEXT    NOT NULL DEFAULT '',
    refresh_expiry_kind         INTEGER NOT NULL,            -- 0 unknown, 1 never, 2 at
    refresh_expires_at_ms       INTEGER,
    longest_refresh_lifetime_s  INTEGER,
    generation                  INTEGER NOT NULL,            -- compare-and-swap key
    state                       TEXT    NOT NULL,            -- active | reauth_required
    last_error_class            TEXT,
    last_error_description      TEXT,
    last_error_at_ms            INTEGER,
    created_at_ms               INTEGER NOT NULL,
    last_refresh_at_ms          INTEGER,
    reauth_due_at_ms            INTEGER,
    key_id                      TEXT    NOT NULL             -- key that sealed both tokens
) STRICT;

CREATE INDEX sessions_by_key ON sessions (key_id);

-- One sealed known value per key ring, so a wrong or missing key is caught
-- at start even before any session is read.
CREATE TABLE key_check (
    singleton  INTEGER NOT NULL PRIMARY KEY CHECK (singleton = 1),
    sealed     BLOB    NOT NULL,
    key_id     TEXT    NOT NULL
) STRICT;
