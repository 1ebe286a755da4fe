//! SSH public keys: the policy (ed25519, ecdsa, rsa >= 2048 bits, one line)
//! and the key pair generated when an account has none.

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

/// Checks one public key line against webhoster's policy and returns it trimmed.
pub fn check(line: &str) -> Result<String, KeyError> {
    // A key pasted from a file ends with a newline; any other line break is refused.
    let trimmed = line.trim();
    crate::seed::check_ssh_key(trimmed).map_err(|e| KeyError::Invalid(error_reason(&e)))?;
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
    Ok(trimmed.to_owned())
}

fn error_reason(err: &crate::seed::SeedError) -> String {
    match err {
        crate::seed::SeedError::Invalid { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// A new ed25519 pair: (public key line, private key in OpenSSH PEM).
pub fn generate(comment: &str) -> Result<(String, String), KeyError> {
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let mut private = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    private.set_comment(comment);
    let public = private.public_key().to_openssh().map_err(KeyError::Generate)?;
    let pem = private.to_openssh(LineEnding::LF).map_err(KeyError::Generate)?;
    Ok((public, pem.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        let (public, private) = generate("alice@webhoster").unwrap();
        assert!(public.starts_with("ssh-ed25519 "));
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert_eq!(check(&format!("  {public}\n")).unwrap(), public);
        assert!(check(&format!("{public}\n{public}")).is_err());
        assert!(check(&format!("{public}\nruncmd: [reboot]")).is_err());
        assert!(check("ssh-ed25519 AAAA").is_err());
        assert!(check("#cloud-config").is_err());
        assert!(check("").is_err());
    }
}
