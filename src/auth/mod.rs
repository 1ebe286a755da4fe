//! auth: argon2id password hashes and HS256 JWT issue/verify.
//!
//! Hashing is deliberately slow, so it runs on tokio's blocking pool behind a
//! semaphore: a login flood queues here instead of taking every blocking
//! thread and every core from the other routes. Tokens carry the user id
//! (`sub`), the account's token version (`ver`), `iat` and `exp`; only HS256
//! is accepted, so `alg: none` and any other algorithm fail. Whether `ver` is
//! still the account's is for the caller that reads the account to decide
//! (`account::Accounts::user_of_token`). This module knows nothing of HTTP
//! or SQL.

pub mod ssh;

pub use ssh::{KeyError, SshPublicKey};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the token is missing, malformed, expired or not signed by this service")]
    InvalidToken,
    #[error("hashing the password")]
    Hash(String),
    #[error("signing a token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("the password hashing pool is gone")]
    PoolClosed,
    #[error("JWT secret file {}", path.display())]
    Secret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the JWT secret must be at least 32 bytes")]
    WeakSecret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, as a string (RFC 7519 says `sub` is a string).
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    /// The account's token version when issued. A token from before
    /// versions existed has none and counts as version 0, the version every
    /// account starts at, so it is revoked by the first bump like any other.
    #[serde(default)]
    pub ver: i64,
}

/// Who a valid token speaks for, and under which token version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject {
    pub user_id: i64,
    pub version: i64,
}

impl Subject {
    /// Refuses a token issued under another version than the account's
    /// `current` one (revoked by a password change or "log out everywhere").
    pub fn check_version(self, current: i64) -> Result<i64, AuthError> {
        if self.version == current {
            Ok(self.user_id)
        } else {
            Err(AuthError::InvalidToken)
        }
    }
}

#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
    hashing: Arc<Semaphore>,
    /// Verified against when the login names no account, so an unknown user
    /// costs the same time as a wrong password.
    dummy_hash: String,
}

/// An issued token.
#[derive(Debug, Clone)]
pub struct Token {
    pub access_token: String,
    pub expires_in: u64,
}

fn hasher() -> Argon2<'static> {
    // argon2id, v19, m=19 MiB, t=2, p=1: the crate's (OWASP's) defaults.
    Argon2::default()
}

impl Auth {
    /// `hash_workers` bounds how many hashes run at once (the number of cores
    /// is a good value: more only queues inside the CPU).
    pub fn new(secret: &[u8], ttl: Duration, hash_workers: usize) -> Result<Auth, AuthError> {
        if secret.len() < 32 {
            return Err(AuthError::WeakSecret);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        let dummy_hash = hasher()
            .hash_password(b"not a password of anyone")
            .map_err(|e| AuthError::Hash(e.to_string()))?
            .to_string();
        Ok(Auth {
            inner: Arc::new(Inner {
                encoding: EncodingKey::from_secret(secret),
                decoding: DecodingKey::from_secret(secret),
                validation,
                ttl,
                hashing: Arc::new(Semaphore::new(hash_workers.max(1))),
                dummy_hash,
            }),
        })
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Hashes free to start now (for tests and health).
    pub fn free_hash_slots(&self) -> usize {
        self.inner.hashing.available_permits()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        // The permit moves into the blocking job: a client that disconnects
        // drops this future, but the hash already running keeps its permit
        // until it is done, so the limit holds for hashes, not for requests.
        let permit = self
            .inner
            .hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AuthError::PoolClosed)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|_| AuthError::PoolClosed)
    }

    /// argon2id PHC string of `password`.
    pub async fn hash_password(&self, password: String) -> Result<String, AuthError> {
        self.blocking(move || {
            hasher()
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| AuthError::Hash(e.to_string()))
        })
        .await?
    }

    /// Whether `password` matches `hash`; with no hash (unknown account) a
    /// dummy is checked so the answer takes the same time, and is false.
    pub async fn verify_password(&self, password: String, hash: Option<String>) -> Result<bool, AuthError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.inner.dummy_hash.clone());
        let ok = self
            .blocking(move || {
                PasswordHash::new(&hash)
                    .map(|parsed| hasher().verify_password(password.as_bytes(), &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        Ok(known && ok)
    }

    /// A token for `user_id` under the account's token `version`.
    pub fn issue(&self, user_id: i64, version: i64) -> Result<Token, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let ttl = self.inner.ttl.as_secs();
        let claims = Claims {
            sub: user_id.to_string(),
            iat: now,
            exp: now + ttl,
            ver: version,
        };
        let access_token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.inner.encoding)
                .map_err(AuthError::Sign)?;
        Ok(Token {
            access_token,
            expires_in: ttl,
        })
    }

    /// Signs arbitrary claims; tests use it to make expired tokens.
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.inner.encoding)
            .map_err(AuthError::Sign)
    }

    /// The subject of a valid, unexpired HS256 token signed with our secret.
    /// Its version still has to be checked against the account's
    /// ([`Subject::check_version`]).
    pub fn verify(&self, token: &str) -> Result<Subject, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.inner.decoding, &self.inner.validation)
            .map_err(|_| AuthError::InvalidToken)?;
        Ok(Subject {
            user_id: data.claims.sub.parse().map_err(|_| AuthError::InvalidToken)?,
            version: data.claims.ver,
        })
    }
}

/// The secret from `<state>/jwt.secret`, created (64 random bytes, mode 0600)
/// the first time.
pub fn load_or_create_secret(state_dir: &Path) -> Result<Vec<u8>, AuthError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("jwt.secret");
    let err = |source| AuthError::Secret {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(secret) => return Ok(secret),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::create_dir_all(state_dir).map_err(err)?;
    let mut secret = vec![0u8; 64];
    rand::fill(&mut secret[..]);
    let encoded = hex::encode(&secret).into_bytes();
    // create_new: if two processes race, one wins and the other reads its file.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut file) => {
            file.write_all(&encoded).map_err(err)?;
            file.sync_all().map_err(err)?;
            Ok(encoded)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read(&path).map_err(err),
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn auth() -> Auth {
        Auth::new(&[7u8; 32], Duration::from_secs(60), 2).unwrap()
    }

    /// A caller that goes away (a client disconnecting mid-login) does not
    /// free its slot while its hash still runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hash_limit_holds_when_callers_give_up() {
        let a = Auth::new(&[7u8; 32], Duration::from_secs(60), 1).unwrap();
        let caller = {
            let a = a.clone();
            tokio::spawn(async move { a.hash_password("correct horse".into()).await })
        };
        while a.free_hash_slots() != 0 {
            tokio::task::yield_now().await;
        }
        caller.abort();
        let _ = caller.await;
        assert_eq!(a.free_hash_slots(), 0, "the running hash keeps its slot");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while a.free_hash_slots() == 0 {
            assert!(std::time::Instant::now() < deadline, "the slot never came back");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn hashes_and_verifies() {
        let a = auth();
        let hash = a.hash_password("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(
            a.verify_password("correct horse".into(), Some(hash.clone()))
                .await
                .unwrap()
        );
        assert!(!a.verify_password("wrong horse".into(), Some(hash)).await.unwrap());
        assert!(
            !a.verify_password("not a password of anyone".into(), None)
                .await
                .unwrap()
        );
    }

    #[test]
    fn tokens_round_trip_and_reject_forgeries() {
        let a = auth();
        let t = a.issue(42, 3).unwrap();
        let subject = a.verify(&t.access_token).unwrap();
        assert_eq!(
            subject,
            Subject {
                user_id: 42,
                version: 3
            }
        );
        assert_eq!(subject.check_version(3).unwrap(), 42);
        assert!(subject.check_version(4).is_err(), "a revoked version");
        assert!(subject.check_version(2).is_err());

        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = t.access_token.split('.').collect();
        // alg: none, no signature.
        let none = format!("{}.{}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        assert!(a.verify(&none).is_err());
        // Tampered payload.
        let now = jsonwebtoken::get_current_timestamp();
        let forged = b64.encode(format!(r#"{{"sub":"1","iat":{now},"exp":{}}}"#, now + 60));
        assert!(a.verify(&format!("{}.{forged}.{}", parts[0], parts[2])).is_err());
        // Other secret.
        let other = Auth::new(&[8u8; 32], Duration::from_secs(60), 1).unwrap();
        assert!(a.verify(&other.issue(42, 0).unwrap().access_token).is_err());
        // Expired.
        let expired = a
            .sign(&Claims {
                sub: "42".into(),
                iat: now - 120,
                exp: now - 60,
                ver: 0,
            })
            .unwrap();
        assert!(a.verify(&expired).is_err());
        assert!(a.verify("garbage").is_err());
        // A token from before versions existed counts as version 0.
        #[derive(Serialize)]
        struct Unversioned {
            sub: String,
            iat: u64,
            exp: u64,
        }
        let old = Unversioned {
            sub: "5".into(),
            iat: now,
            exp: now + 60,
        };
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &old,
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap();
        let legacy = a.verify(&old).unwrap();
        assert_eq!(legacy.version, 0);
        assert!(legacy.check_version(1).is_err());
    }

    #[test]
    fn secret_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s1 = load_or_create_secret(dir.path()).unwrap();
        let s2 = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(s1, s2);
        assert!(s1.len() >= 64);
        let mode = std::fs::metadata(dir.path().join("jwt.secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
