//! Accounts and their SSH public keys.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, classify, now};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub username: String,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct UserWithHash {
    pub user: User,
    pub password_hash: String,
}

fn user_from(row: &AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        username: row.try_get("username")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Inserts an account; a taken email or username is a `Conflict`.
    pub async fn create_user(
        &self,
        email: &str,
        username: &str,
        password_hash: &str,
    ) -> Result<User, StoreError> {
        let row = sqlx::query(
            "INSERT INTO users (email, username, password_hash, created_at) \
             VALUES ($1, $2, $3, $4) RETURNING id, email, username, created_at",
        )
        .bind(email)
        .bind(username)
        .bind(password_hash)
        .bind(now())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| classify("create user", e))?;
        user_from(&row).map_err(|e| StoreError::Query("create user", e))
    }

    /// Finds an account by email or username (the login form accepts both).
    pub async fn user_by_login(&self, login: &str) -> Result<Option<UserWithHash>, StoreError> {
        let row = sqlx::query(
            "SELECT id, email, username, created_at, password_hash FROM users \
             WHERE email = $1 OR username = $1",
        )
        .bind(login)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::Query("find user by login", e))?;
        row.map(|row| {
            Ok(UserWithHash {
                user: user_from(&row)?,
                password_hash: row.try_get("password_hash")?,
            })
        })
        .transpose()
        .map_err(|e| StoreError::Query("find user by login", e))
    }

    pub async fn user_by_id(&self, id: i64) -> Result<Option<User>, StoreError> {
        let row = sqlx::query("SELECT id, email, username, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::Query("find user by id", e))?;
        row.as_ref()
            .map(user_from)
            .transpose()
            .map_err(|e| StoreError::Query("find user by id", e))
    }

    /// Remembers a public key on the account; a key it already has is kept once.
    pub async fn add_ssh_key(&self, user_id: i64, public_key: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ssh_keys (user_id, public_key, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, public_key) DO NOTHING",
        )
        .bind(user_id)
        .bind(public_key)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::Query("add ssh key", e))?;
        Ok(())
    }

    pub async fn ssh_keys(&self, user_id: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT public_key FROM ssh_keys WHERE user_id = $1 ORDER BY id")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StoreError::Query("list ssh keys", e))?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("public_key"))
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Query("list ssh keys", e))
    }
}
