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
    /// Tokens and sessions issued under another version are revoked
    /// (bumped by a password change and by "log out everywhere").
    #[serde(skip)]
    pub token_version: i64,
}

/// One stored SSH public key of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub id: i64,
    pub public_key: String,
    pub created_at: String,
}

/// The columns `user_from` reads, for `concat!` (sqlx takes only static SQL).
macro_rules! user_columns {
    () => {
        "id, email, username, created_at, token_version"
    };
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
        token_version: row.try_get("token_version")?,
    })
}

fn key_from(row: &AnyRow) -> Result<StoredKey, sqlx::Error> {
    Ok(StoredKey {
        id: row.try_get("id")?,
        public_key: row.try_get("public_key")?,
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
        let row = sqlx::query(concat!(
            "INSERT INTO users (email, username, password_hash, created_at) \
             VALUES ($1, $2, $3, $4) RETURNING ",
            user_columns!()
        ))
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
        let row = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            ", password_hash FROM users WHERE email = $1 OR username = $1"
        ))
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
        let row = sqlx::query(concat!("SELECT ", user_columns!(), " FROM users WHERE id = $1"))
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

    /// The account with its password hash.
    pub async fn user_with_hash(&self, id: i64) -> Result<Option<UserWithHash>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            ", password_hash FROM users WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::Query("find user with hash", e))?;
        row.map(|row| {
            Ok(UserWithHash {
                user: user_from(&row)?,
                password_hash: row.try_get("password_hash")?,
            })
        })
        .transpose()
        .map_err(|e| StoreError::Query("find user with hash", e))
    }

    /// Replaces the password hash, only if it is still `old_hash` (a
    /// concurrent change that got there first wins), and bumps the token
    /// version. `None`: the account is gone or its hash changed meanwhile.
    pub async fn replace_password(
        &self,
        id: i64,
        old_hash: &str,
        new_hash: &str,
    ) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE users SET password_hash = $1, token_version = token_version + 1 \
             WHERE id = $2 AND password_hash = $3 RETURNING ",
            user_columns!()
        ))
        .bind(new_hash)
        .bind(id)
        .bind(old_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::Query("replace password", e))?;
        row.as_ref()
            .map(user_from)
            .transpose()
            .map_err(|e| StoreError::Query("replace password", e))
    }

    /// Moves the account to a new token version, revoking every token and
    /// session issued before. `None`: no such account.
    pub async fn bump_token_version(&self, id: i64) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE users SET token_version = token_version + 1 WHERE id = $1 RETURNING ",
            user_columns!()
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::Query("bump token version", e))?;
        row.as_ref()
            .map(user_from)
            .transpose()
            .map_err(|e| StoreError::Query("bump token version", e))
    }

    /// Deletes the account; its keys (and sessions) go with it by ON DELETE
    /// CASCADE. Whether there was one.
    pub async fn delete_user(&self, id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| classify("delete user", e))?;
        Ok(done.rows_affected() > 0)
    }

    /// The account's keys with their ids, oldest first.
    pub async fn ssh_key_rows(&self, user_id: i64) -> Result<Vec<StoredKey>, StoreError> {
        let rows =
            sqlx::query("SELECT id, public_key, created_at FROM ssh_keys WHERE user_id = $1 ORDER BY id")
                .bind(user_id)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| StoreError::Query("list ssh key rows", e))?;
        rows.iter()
            .map(key_from)
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Query("list ssh key rows", e))
    }

    /// Adds a key; one the account already has is `Conflict(SshKey)`.
    pub async fn insert_ssh_key(&self, user_id: i64, public_key: &str) -> Result<StoredKey, StoreError> {
        // ON CONFLICT DO NOTHING + RETURNING: no row back means a duplicate,
        // the same on both backends and without parsing error messages.
        let row = sqlx::query(
            "INSERT INTO ssh_keys (user_id, public_key, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, public_key) DO NOTHING RETURNING id, public_key, created_at",
        )
        .bind(user_id)
        .bind(public_key)
        .bind(now())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| classify("insert ssh key", e))?;
        match row {
            Some(row) => key_from(&row).map_err(|e| StoreError::Query("insert ssh key", e)),
            None => Err(StoreError::Conflict(super::Conflict::SshKey)),
        }
    }

    /// Deletes one of the account's keys; false when the account has no key
    /// of that id (another account's key included).
    pub async fn delete_ssh_key(&self, user_id: i64, key_id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM ssh_keys WHERE id = $1 AND user_id = $2")
            .bind(key_id)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Query("delete ssh key", e))?;
        Ok(done.rows_affected() > 0)
    }
}
