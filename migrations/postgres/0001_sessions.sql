-- Sessions shared by the replicas of a high-availability deployment. The
-- columns mirror the embedded store (migrations/sqlite): tokens are sealed
-- (AEAD) by the broker before they reach this table, with the session id and
-- the column name as associated data; times are Unix milliseconds.
--
-- The refresh lease (DESIGN §5): a replica claims `lease_owner` until
-- `lease_until` (database clock) before it presents a session's refresh
-- token; every write of the row (a new generation) clears it.
CREATE TABLE sessions (
    id                          TEXT        NOT NULL PRIMARY KEY,
    provider                    TEXT        NOT NULL,
    labels                      TEXT        NOT NULL,            -- JSON object
    refresh_token               BYTEA       NOT NULL,            -- sealed
    registered_fingerprint      BYTEA       NOT NULL,            -- SHA-256 of the token as registered
    access_token                BYTEA,                           -- sealed
    access_expires_at_ms        BIGINT,
    access_issued_at_ms         BIGINT,
    scope                       TEXT        NOT NULL DEFAULT '',
    refresh_expiry_kind         BIGINT      NOT NULL,            -- 0 unknown, 1 never, 2 at
    refresh_expires_at_ms       BIGINT,
    longest_refresh_lifetime_s  BIGINT,
    generation                  BIGINT      NOT NULL,            -- compare-and-swap key
    state                       TEXT        NOT NULL,            -- active | reauth_required
    last_error_class            TEXT,
    last_error_description      TEXT,
    last_error_at_ms            BIGINT,
    created_at_ms               BIGINT      NOT NULL,
    last_refresh_at_ms          BIGINT,
    reauth_due_at_ms            BIGINT,
    key_id                      TEXT        NOT NULL,            -- key that sealed both tokens
    owner                       TEXT,                            -- caller identity that registered it
    lease_owner                 TEXT,                            -- replica refreshing it, if any
    lease_until                 TIMESTAMPTZ,                     -- database clock
    CONSTRAINT lease_is_whole CHECK ((lease_owner IS NULL) = (lease_until IS NULL))
);

CREATE INDEX sessions_by_key ON sessions (key_id);

-- One sealed known value per key ring, so a wrong or missing key is caught
-- at start even before any session is read.
CREATE TABLE key_check (
    singleton  INTEGER NOT NULL PRIMARY KEY CHECK (singleton = 1),
    sealed     BYTEA   NOT NULL,
    key_id     TEXT    NOT NULL
);

-- Tells every replica (LISTEN tokenbroker_sessions) what changed:
--   w:<generation>:<id>  inserted, or a new generation or state (refresh, end, replace)
--   d:<id>               deleted
--   r:<id>               a lease ended without a new generation (refresh failed)
-- Claims, renewals and re-sealing under a new key notify nobody. Ids may
-- contain ':', so readers split on the first (and for `w`, second) ':' only.
CREATE FUNCTION tokenbroker_notify_session() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tokenbroker_sessions', 'd:' || OLD.id);
    ELSIF TG_OP = 'INSERT'
        OR NEW.generation IS DISTINCT FROM OLD.generation
        OR NEW.state IS DISTINCT FROM OLD.state THEN
        PERFORM pg_notify('tokenbroker_sessions', 'w:' || NEW.generation || ':' || NEW.id);
    ELSIF OLD.lease_owner IS NOT NULL AND NEW.lease_owner IS NULL THEN
        PERFORM pg_notify('tokenbroker_sessions', 'r:' || NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_notify
    AFTER INSERT OR UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION tokenbroker_notify_session();
