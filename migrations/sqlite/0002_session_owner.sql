-- The caller identity that registered a session (policy `owner_only`);
-- NULL when registered without authentication.
ALTER TABLE sessions ADD COLUMN owner TEXT;
