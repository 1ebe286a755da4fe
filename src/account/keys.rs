//! The SSH keys of an account as the settings page and the API show them.

use serde::Serialize;

use crate::auth::SshPublicKey;
use crate::store::StoredKey;

/// One SSH public key of the account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SshKeyEntry {
    /// For `DELETE /api/v1/account/ssh-keys/{id}`.
    pub id: i64,
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`, ...
    #[schema(example = "ssh-ed25519")]
    pub algorithm: String,
    /// As `ssh-keygen -l` prints it.
    #[schema(example = "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU")]
    pub fingerprint: String,
    /// The text after the key, often `user@host`; may be empty.
    pub comment: String,
    /// The whole OpenSSH line.
    pub public_key: String,
    /// RFC 3339.
    pub created_at: String,
}

impl SshKeyEntry {
    pub fn new(row: StoredKey, key: &SshPublicKey) -> SshKeyEntry {
        SshKeyEntry {
            id: row.id,
            algorithm: key.algorithm().to_owned(),
            fingerprint: key.fingerprint().to_owned(),
            comment: key.comment().to_owned(),
            public_key: row.public_key,
            created_at: row.created_at,
        }
    }

    /// A stored line that no longer parses (a stricter policy than when it
    /// was stored) is still listed, so that it can be seen and removed; it
    /// is never offered to a guest (`HostingService::create` re-parses).
    pub fn unreadable(row: StoredKey) -> SshKeyEntry {
        let algorithm = row.public_key.split_whitespace().next().unwrap_or("").to_owned();
        SshKeyEntry {
            id: row.id,
            algorithm,
            fingerprint: String::new(),
            comment: String::new(),
            public_key: row.public_key,
            created_at: row.created_at,
        }
    }

    pub fn from_row(row: StoredKey) -> SshKeyEntry {
        match SshPublicKey::parse(&row.public_key) {
            Ok(key) => SshKeyEntry::new(row, &key),
            Err(_) => SshKeyEntry::unreadable(row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: &str) -> StoredKey {
        StoredKey {
            id: 7,
            public_key: line.to_owned(),
            created_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_stored_key_is_described() {
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";
        let e = SshKeyEntry::from_row(row(line));
        assert_eq!(e.id, 7);
        assert_eq!(e.algorithm, "ssh-ed25519");
        assert_eq!(
            e.fingerprint,
            "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"
        );
        assert_eq!(e.comment, "test@example");
        assert_eq!(e.public_key, line);
    }

    /// A key stored under an older, looser policy is still listed (so it
    /// can be removed), with no fingerprint claimed for it.
    #[test]
    fn an_unreadable_stored_key_is_still_listed() {
        let line = "ssh-dss AAAAB3NzaC1kc3MAAACBAOgD root@vm";
        let e = SshKeyEntry::from_row(row(line));
        assert_eq!(
            (e.id, e.algorithm.as_str(), e.fingerprint.as_str()),
            (7, "ssh-dss", "")
        );
        assert_eq!(e.public_key, line);
    }
}
