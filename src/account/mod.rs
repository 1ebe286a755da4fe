//! account: the accounts of webhoster, the one place that decides who may
//! sign up, log in, hold a token, keep SSH keys, change a password, log out
//! everywhere and close the account. Both the REST API and the web pages
//! call it, so both apply the same rules and say the same things.
//!
//! Revocation is a per-account token version: every JWT carries the version
//! it was issued under (`ver`), every web session records it, and a token or
//! session whose version is not the account's current one is refused. A
//! password change and "log out everywhere" bump it; no list of revoked
//! tokens is kept. This module never speaks HTTP and never writes SQL.

mod keys;
pub mod rules;

use std::sync::Arc;

pub use keys::SshKeyEntry;
pub use rules::{FieldError, valid_email, valid_username};

use crate::auth::{Auth, AuthError, SshPublicKey, Token};
use crate::hosting::{HostingError, HostingService};
use crate::store::{Conflict, Store, StoreError, User};

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// One entry per bad field.
    #[error("{}", messages(.0))]
    Invalid(Vec<FieldError>),
    /// The field (`email`, `username` or `public_key`) names something the
    /// account, or another account, already has.
    #[error("this {0} is taken")]
    Taken(&'static str),
    #[error("wrong username or password")]
    WrongCredentials,
    #[error("the password is wrong")]
    WrongPassword,
    #[error("no such account or key")]
    NotFound,
    #[error(transparent)]
    Hosting(#[from] HostingError),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// The messages of `fields`, joined: the one-line summary of a bad form.
pub fn messages(fields: &[FieldError]) -> String {
    fields
        .iter()
        .map(|f| f.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<StoreError> for AccountError {
    fn from(err: StoreError) -> AccountError {
        match err {
            StoreError::Conflict(Conflict::Email) => AccountError::Taken("email"),
            StoreError::Conflict(Conflict::Username) => AccountError::Taken("username"),
            StoreError::Conflict(Conflict::SshKey) => AccountError::Taken("public_key"),
            other => AccountError::Store(other),
        }
    }
}

// AccountError carries HostingError by value, as the interface says; these
// two are cheap synchronous calls, not a hot path worth boxing it for.
#[allow(clippy::result_large_err)]
fn invalid(bad: Vec<FieldError>) -> Result<(), AccountError> {
    if bad.is_empty() {
        Ok(())
    } else {
        Err(AccountError::Invalid(bad))
    }
}

/// How many times account deletion looks again for a hosting: a create that
/// got past its token check just before the tokens were revoked may have
/// allocated one while the first was being deleted.
const DELETE_ROUNDS: usize = 3;

#[derive(Clone)]
pub struct Accounts {
    store: Store,
    auth: Auth,
    hosting: Arc<HostingService>,
}

impl Accounts {
    pub fn new(store: Store, auth: Auth, hosting: Arc<HostingService>) -> Accounts {
        Accounts { store, auth, hosting }
    }

    /// Validates all fields (every bad one is reported), hashes, inserts.
    pub async fn register(&self, email: &str, username: &str, password: &str) -> Result<User, AccountError> {
        let (email, username) =
            rules::check_registration(email, username, password).map_err(AccountError::Invalid)?;
        let hash = self.auth.hash_password(password.to_owned()).await?;
        let user = self.store.create_user(&email, &username, &hash).await?;
        tracing::info!(user_id = user.id, "account registered");
        Ok(user)
    }

    /// `login` is an email or a username. An unknown account costs the same
    /// time as a wrong password, and gets the same answer.
    pub async fn authenticate(&self, login: &str, password: &str) -> Result<User, AccountError> {
        let login = rules::check_login(login, password).map_err(AccountError::Invalid)?;
        let (user, hash) = match self.store.user_by_login(&login).await? {
            Some(u) => (Some(u.user), Some(u.password_hash)),
            None => (None, None),
        };
        let valid = self.auth.verify_password(password.to_owned(), hash).await?;
        match (valid, user) {
            (true, Some(user)) => Ok(user),
            _ => Err(AccountError::WrongCredentials),
        }
    }

    /// A JWT carrying the account's current token version.
    #[allow(clippy::result_large_err)] // see `invalid`
    pub fn issue_token(&self, user: &User) -> Result<Token, AccountError> {
        Ok(self.auth.issue(user.id, user.token_version)?)
    }

    /// The account of a valid, unexpired, unrevoked JWT. A token of a
    /// deleted account, or one issued under an older version, is
    /// `Auth(InvalidToken)`.
    pub async fn user_of_token(&self, token: &str) -> Result<User, AccountError> {
        let subject = self.auth.verify(token)?;
        let user = self
            .store
            .user_by_id(subject.user_id)
            .await?
            .ok_or(AccountError::Auth(AuthError::InvalidToken))?;
        subject.check_version(user.token_version)?;
        Ok(user)
    }

    pub async fn user(&self, user_id: i64) -> Result<User, AccountError> {
        self.store
            .user_by_id(user_id)
            .await?
            .ok_or(AccountError::NotFound)
    }

    /// The account's keys, oldest first.
    pub async fn ssh_keys(&self, user_id: i64) -> Result<Vec<SshKeyEntry>, AccountError> {
        let rows = self.store.ssh_key_rows(user_id).await?;
        Ok(rows.into_iter().map(SshKeyEntry::from_row).collect())
    }

    /// Checks `text` against the key policy and stores it. The same key
    /// (same fingerprint, whatever its comment) twice is `Taken("public_key")`.
    pub async fn add_ssh_key(&self, user_id: i64, text: &str) -> Result<SshKeyEntry, AccountError> {
        let key = SshPublicKey::parse(text)
            .map_err(|e| AccountError::Invalid(vec![FieldError::new("public_key", e.to_string())]))?;
        let have = self.ssh_keys(user_id).await?;
        if have.iter().any(|k| k.fingerprint == key.fingerprint()) {
            return Err(AccountError::Taken("public_key"));
        }
        // The database's unique (user_id, public_key) settles two identical
        // adds racing past the check above.
        let row = self.store.insert_ssh_key(user_id, key.as_str()).await?;
        tracing::info!(user_id, key_id = row.id, fingerprint = %key.fingerprint(), "ssh key added");
        Ok(SshKeyEntry::new(row, &key))
    }

    /// Removes one of the account's keys; another account's key is `NotFound`.
    pub async fn remove_ssh_key(&self, user_id: i64, key_id: i64) -> Result<(), AccountError> {
        if self.store.delete_ssh_key(user_id, key_id).await? {
            tracing::info!(user_id, key_id, "ssh key removed");
            Ok(())
        } else {
            Err(AccountError::NotFound)
        }
    }

    /// Checks `current`, validates `new`, stores the new hash and bumps the
    /// token version: every JWT and every web session of the account stops
    /// working. Of two changes racing with the same current password, one
    /// wins; the other finds the password changed and is `WrongPassword`.
    pub async fn change_password(
        &self,
        user_id: i64,
        current: &str,
        new: &str,
    ) -> Result<User, AccountError> {
        let mut bad = Vec::new();
        bad.extend(rules::check_current_password("current_password", current));
        bad.extend(rules::check_new_password("new_password", new));
        invalid(bad)?;
        let old = self
            .store
            .user_with_hash(user_id)
            .await?
            .ok_or(AccountError::NotFound)?;
        self.check_password(current, &old.password_hash).await?;
        let new_hash = self.auth.hash_password(new.to_owned()).await?;
        match self
            .store
            .replace_password(user_id, &old.password_hash, &new_hash)
            .await?
        {
            Some(user) => {
                tracing::info!(user_id, "password changed; older tokens and sessions revoked");
                Ok(user)
            }
            None if self.store.user_by_id(user_id).await?.is_some() => Err(AccountError::WrongPassword),
            None => Err(AccountError::NotFound),
        }
    }

    /// Bumps the token version ("log out everywhere"): every JWT and web
    /// session issued so far stops working.
    pub async fn revoke_all(&self, user_id: i64) -> Result<User, AccountError> {
        let user = self
            .store
            .bump_token_version(user_id)
            .await?
            .ok_or(AccountError::NotFound)?;
        tracing::info!(user_id, "every token and session revoked");
        Ok(user)
    }

    /// Checks the password, revokes every token (so no new request of the
    /// account starts meanwhile), deletes the hosting if any (the VM, its
    /// network, site and backups), then the account (its keys and sessions
    /// go by ON DELETE CASCADE). If the hosting cannot be deleted, the
    /// account stays, logged out everywhere, and the error says why.
    pub async fn delete(&self, user_id: i64, password: &str) -> Result<(), AccountError> {
        invalid(
            rules::check_current_password("password", password)
                .into_iter()
                .collect(),
        )?;
        let old = self
            .store
            .user_with_hash(user_id)
            .await?
            .ok_or(AccountError::NotFound)?;
        self.check_password(password, &old.password_hash).await?;
        self.revoke_all(user_id).await?;
        for _ in 0..DELETE_ROUNDS {
            match self.hosting.delete(user_id).await {
                Ok(()) => tracing::info!(user_id, "account deletion: hosting deleted"),
                Err(HostingError::NotFound) => break,
                Err(e) => return Err(e.into()),
            }
        }
        if self.store.delete_user(user_id).await? {
            tracing::info!(user_id, "account deleted");
            Ok(())
        } else {
            Err(AccountError::NotFound)
        }
    }

    async fn check_password(&self, password: &str, hash: &str) -> Result<(), AccountError> {
        if self
            .auth
            .verify_password(password.to_owned(), Some(hash.to_owned()))
            .await?
        {
            Ok(())
        } else {
            Err(AccountError::WrongPassword)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&crate::store::default_url(dir.path()))
            .await
            .unwrap();
        (store, dir)
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";

    #[test]
    fn store_conflicts_name_the_taken_field() {
        for (conflict, field) in [
            (Conflict::Email, "email"),
            (Conflict::Username, "username"),
            (Conflict::SshKey, "public_key"),
        ] {
            match AccountError::from(StoreError::Conflict(conflict)) {
                AccountError::Taken(f) => assert_eq!(f, field),
                other => panic!("{conflict:?}: {other:?}"),
            }
        }
        assert!(matches!(
            AccountError::from(StoreError::Conflict(Conflict::VmId)),
            AccountError::Store(_)
        ));
        let bad = vec![FieldError::new("email", "a"), FieldError::new("password", "b")];
        assert_eq!(AccountError::Invalid(bad).to_string(), "a; b");
    }

    /// The store calls the account relies on: a password is replaced only
    /// over the hash it was checked against, and each change or revocation
    /// moves the token version.
    #[tokio::test]
    async fn password_and_version_updates() {
        let (store, _dir) = store().await;
        let u = store.create_user("a@b.io", "abc", "hash-1").await.unwrap();
        assert_eq!(u.token_version, 0);
        assert!(
            store
                .replace_password(u.id, "stale", "hash-2")
                .await
                .unwrap()
                .is_none()
        );
        let same = store.user_with_hash(u.id).await.unwrap().unwrap();
        assert_eq!(
            (same.password_hash.as_str(), same.user.token_version),
            ("hash-1", 0)
        );
        let changed = store
            .replace_password(u.id, "hash-1", "hash-2")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(changed.token_version, 1);
        assert!(
            store
                .replace_password(u.id, "hash-1", "hash-3")
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store
                .bump_token_version(u.id)
                .await
                .unwrap()
                .unwrap()
                .token_version,
            2
        );
        assert_eq!(
            store
                .user_by_login("abc")
                .await
                .unwrap()
                .unwrap()
                .user
                .token_version,
            2
        );
        assert!(store.bump_token_version(u.id + 100).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn keys_belong_to_one_account_and_go_with_it() {
        let (store, _dir) = store().await;
        let a = store.create_user("a@b.io", "abc", "h").await.unwrap();
        let b = store.create_user("b@b.io", "bcd", "h").await.unwrap();
        let k = store.insert_ssh_key(a.id, KEY).await.unwrap();
        assert!(matches!(
            store.insert_ssh_key(a.id, KEY).await.map_err(AccountError::from),
            Err(AccountError::Taken("public_key"))
        ));
        // Uniqueness is per account; the hosting path's add stays idempotent.
        store.insert_ssh_key(b.id, KEY).await.unwrap();
        store.add_ssh_key(a.id, KEY).await.unwrap();
        assert_eq!(store.ssh_key_rows(a.id).await.unwrap(), std::slice::from_ref(&k));
        assert!(!store.delete_ssh_key(b.id, k.id).await.unwrap(), "not b's key");
        assert_eq!(store.ssh_key_rows(a.id).await.unwrap().len(), 1);
        assert!(store.delete_user(a.id).await.unwrap());
        assert!(store.ssh_key_rows(a.id).await.unwrap().is_empty(), "cascade");
        assert!(!store.delete_user(a.id).await.unwrap());
        assert_eq!(store.ssh_key_rows(b.id).await.unwrap().len(), 1);
    }
}
