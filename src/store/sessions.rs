//! Web sessions: one row per logged-in browser (see migration 0005).
//! The row holds the hash of the cookie's token, never the token itself.

use sqlx::Row;

use super::{Store, StoreError, now};

/// A live session, as the web pages need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub user_id: i64,
    /// The CSRF token every form of this session carries.
    pub csrf: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// What a new session is made of.
#[derive(Debug, Clone)]
pub struct NewSession<'a> {
    /// Hex SHA-256 of the cookie's token.
    pub id: &'a str,
    pub user_id: i64,
    pub csrf: &'a str,
    /// The account's token version at log-in.
    pub token_version: i64,
    /// Unix seconds.
    pub expires_at: i64,
}

impl Store {
    pub async fn create_session(&self, s: &NewSession<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sessions (id, user_id, csrf, token_version, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(s.id)
        .bind(s.user_id)
        .bind(s.csrf)
        .bind(s.token_version)
        .bind(now())
        .bind(s.expires_at)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::Query("create session", e))?;
        Ok(())
    }

    /// The session `id` if it has not expired at `now_unix` and the account's
    /// token version is still the one it was opened with (not revoked).
    pub async fn live_session(&self, id: &str, now_unix: i64) -> Result<Option<SessionRow>, StoreError> {
        let row = sqlx::query(
            "SELECT s.user_id, s.csrf, s.expires_at FROM sessions s \
             JOIN users u ON u.id = s.user_id \
             WHERE s.id = $1 AND s.expires_at > $2 AND s.token_version = u.token_version",
        )
        .bind(id)
        .bind(now_unix)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::Query("find session", e))?;
        row.map(|row| {
            Ok(SessionRow {
                user_id: row.try_get("user_id")?,
                csrf: row.try_get("csrf")?,
                expires_at: row.try_get("expires_at")?,
            })
        })
        .transpose()
        .map_err(|e| StoreError::Query("find session", e))
    }

    pub async fn delete_session(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sessions WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Query("delete session", e))?;
        Ok(())
    }

    /// Removes sessions that expired before `now_unix` or were revoked (their
    /// version is behind the account's); returns how many.
    pub async fn prune_sessions(&self, now_unix: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM sessions WHERE expires_at <= $1 OR token_version <> \
             (SELECT u.token_version FROM users u WHERE u.id = sessions.user_id)",
        )
        .bind(now_unix)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::Query("prune sessions", e))?;
        Ok(done.rows_affected())
    }
}
