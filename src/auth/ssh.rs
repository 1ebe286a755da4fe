//! SSH public keys, parsed once at the edge (the API body, a stored row) into
//! [`SshPublicKey`], which then travels through the create job into the seed:
//! whoever holds one knows it is a single OpenSSH line of an accepted
//! algorithm (ed25519, ecdsa, rsa of at least 2048 bits) with no control
//! characters, so nothing downstream checks it again. Also the key pair
//! generated when an account has none.

use std::fmt;

use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey, private::Ed25519Keypair};

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

/// One accepted OpenSSH public key line, trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshPublicKey(String);

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
        Ok(SshPublicKey(trimmed.to_owned()))
    }

    /// A new ed25519 pair: the public key and the private key in OpenSSH PEM.
    pub fn generate(comment: &str) -> Result<(SshPublicKey, String), KeyError> {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        let mut private = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        private.set_comment(comment);
        let public = private.public_key().to_openssh().map_err(KeyError::Generate)?;
        let pem = private.to_openssh(LineEnding::LF).map_err(KeyError::Generate)?;
        Ok((SshPublicKey(public), pem.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SshPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        let (public, private) = SshPublicKey::generate("alice@webhoster").unwrap();
        assert!(public.as_str().starts_with("ssh-ed25519 "));
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert_eq!(SshPublicKey::parse(&format!("  {public}\n")).unwrap(), public);
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
