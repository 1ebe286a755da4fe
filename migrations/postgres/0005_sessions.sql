-- Web sessions (src/web/session.rs). `id` is the hex SHA-256 of the opaque
-- token in the visitor's cookie, so a copy of this table opens no session.
-- A session is valid only while `expires_at` (unix seconds) is in the future
-- AND its `token_version` equals the account's: bumping the account's version
-- (log out everywhere, password change) ends every session at once.
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    token_version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_expiry ON sessions (expires_at);
