//! SSH public keys, parsed once at the edge (the API body, a stored row) into
//! [`SshPublicKey`], which then travels through the create job into the seed:
//! whoever holds one knows it is a single OpenSSH line of an accepted
//! algorithm (ed25519, ecdsa, rsa of at least 2048 bits) with no control
//! characters, so nothing downstream checks it again. Also the key pair
//! generated when an account has none.

use std::fmt;

use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, private::Ed25519Keypair};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the SSH key must be one OpenSSH public key line: {0}")]
    Invalid(String),
    #[error("SSH key type {0} is not accepted (use ed25519, ecdsa or rsa of at least 2048 bits)")]
    Algorithm(String),
    #[error("RSA keys must have at least 2048 bits, this one has {0}")]
    RsaTooShort(u32),
    #[error("generating an SSH key pair")]
    Generate(#[source] ssh_key::Error),
}

/// One accepted OpenSSH public key line, trimmed, with what the settings
/// page shows of it (read once, when parsed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshPublicKey {
    line: String,
    algorithm: String,
    fingerprint: String,
    comment: String,
}

impl SshPublicKey {
    fn from_parsed(line: String, key: &PublicKey) -> SshPublicKey {
        SshPublicKey {
            line,
            algorithm: key.algorithm().as_str().to_owned(),
            fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
            comment: key.comment().as_str_lossy().to_owned(),
        }
    }
}

impl SshPublicKey {
    /// Checks `line` against the policy. A key pasted from a file ends with
    /// a newline, which is trimmed; any other line break is refused (it
    /// could open a new key in cloud-config).
    pub fn parse(line: &str) -> Result<SshPublicKey, KeyError> {
        let trimmed = line.trim();
        if trimmed.chars().any(char::is_control) {
            return Err(KeyError::Invalid(
                "must be a single line without control characters".into(),
            ));
        }
        let key = PublicKey::from_openssh(trimmed).map_err(|e| KeyError::Invalid(e.to_string()))?;
        match key.algorithm() {
            Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => {}
            Algorithm::Rsa { .. } => {
                let bits = key.key_data().rsa().map(|k| k.key_size()).unwrap_or(0);
                if bits < 2048 {
                    return Err(KeyError::RsaTooShort(bits));
                }
            }
            other => return Err(KeyError::Algorithm(other.as_str().to_owned())),
        }
        Ok(SshPublicKey::from_parsed(trimmed.to_owned(), &key))
    }

    /// A new ed25519 pair: the public key and the private key in OpenSSH PEM.
    pub fn generate(comment: &str) -> Result<(SshPublicKey, String), KeyError> {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        let mut private = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        private.set_comment(comment);
        let line = private.public_key().to_openssh().map_err(KeyError::Generate)?;
        let pem = private.to_openssh(LineEnding::LF).map_err(KeyError::Generate)?;
        Ok((
            SshPublicKey::from_parsed(line, private.public_key()),
            pem.to_string(),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.line
    }

    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`, ...
    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    /// `SHA256:<base64>`, as `ssh-keygen -l` prints it. Two lines of the
    /// same key with different comments have the same fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The free text after the key (often `user@host`); may be empty.
    pub fn comment(&self) -> &str {
        &self.comment
    }
}

impl fmt::Display for SshPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ssh-keygen -lf` prints for the key below.
    const FINGERPRINT: &str = "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU";

    /// The fingerprint is the one `ssh-keygen -lf` prints for this key.
    #[test]
    fn fingerprint_as_ssh_keygen_prints_it() {
        let key = SshPublicKey::parse(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example",
        )
        .unwrap();
        assert_eq!(key.fingerprint(), FINGERPRINT);
        assert_eq!(key.comment(), "test@example");
        let bare = SshPublicKey::parse(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
        )
        .unwrap();
        assert_eq!(bare.fingerprint(), FINGERPRINT);
        assert_eq!(bare.comment(), "");
    }

    #[test]
    fn policy() {
        let (public, private) = SshPublicKey::generate("alice@webhoster").unwrap();
        assert!(public.as_str().starts_with("ssh-ed25519 "));
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert_eq!(SshPublicKey::parse(&format!("  {public}\n")).unwrap(), public);
        assert_eq!(public.algorithm(), "ssh-ed25519");
        assert_eq!(public.comment(), "alice@webhoster");
        assert!(
            public.fingerprint().starts_with("SHA256:"),
            "{}",
            public.fingerprint()
        );
        for bad in [
            format!("{public}\n{public}"),
            format!("{public}\nruncmd: [reboot]"),
            "ssh-ed25519 AAAA".into(),
            "ssh-ed25519 notbase64 x".into(),
            "#cloud-config".into(),
            String::new(),
        ] {
            assert!(SshPublicKey::parse(&bad).is_err(), "{bad:?}");
        }
    }
}
