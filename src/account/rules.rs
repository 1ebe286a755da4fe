//! What a valid account field is: email, username, password, log-in name.
//! Pure functions, one message per bad field, shared by the REST API and the
//! web pages so both say the same thing about the same input.

use serde::Serialize;

pub const MIN_PASSWORD: usize = 8;
/// Longer passwords only cost hashing time.
pub const MAX_PASSWORD: usize = 1024;
/// A log-in name longer than any email cannot name an account.
const MAX_LOGIN: usize = 254;

/// One bad field of a form or request body, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's name in the request body (and the web form).
    #[schema(value_type = String, example = "email")]
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> FieldError {
        FieldError {
            field,
            message: message.into(),
        }
    }
}

pub fn valid_username(u: &str) -> bool {
    (3..=32).contains(&u.len())
        && u.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A practical email check: one `@`, a non-empty local part, a dotted domain
/// of letters, digits, `-` and `.`, no spaces or control characters.
pub fn valid_email(e: &str) -> bool {
    if e.len() > 254 || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()));
    local_ok && domain_ok
}

/// The email as stored: trimmed and lowercased (emails are unique whatever
/// their case).
pub fn normalize_email(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

/// The log-in name as looked up (and rate-limited): an email or a username,
/// both of which are stored lowercase.
pub fn normalize_login(login: &str) -> String {
    login.trim().to_ascii_lowercase()
}

/// What is wrong with `password` as a new password of field `field`.
pub fn check_new_password(field: &'static str, password: &str) -> Option<FieldError> {
    let n = password.chars().count();
    if n < MIN_PASSWORD {
        Some(FieldError::new(
            field,
            format!("password must be at least {MIN_PASSWORD} characters"),
        ))
    } else if n > MAX_PASSWORD {
        Some(FieldError::new(
            field,
            format!("password must be at most {MAX_PASSWORD} characters"),
        ))
    } else {
        None
    }
}

/// A sign-up's fields, normalized, or every bad one.
pub fn check_registration(
    email: &str,
    username: &str,
    password: &str,
) -> Result<(String, String), Vec<FieldError>> {
    let email = normalize_email(email);
    let mut bad = Vec::new();
    if !valid_email(&email) {
        bad.push(FieldError::new("email", "email is not a valid email address"));
    }
    if !valid_username(username) {
        bad.push(FieldError::new(
            "username",
            "username must be 3 to 32 characters of a-z, 0-9, '_' and '-'",
        ));
    }
    bad.extend(check_new_password("password", password));
    if bad.is_empty() {
        Ok((email, username.to_owned()))
    } else {
        Err(bad)
    }
}

/// A log-in's fields: the normalized log-in name, or every bad field. The
/// name's field is `username`, as in the OAuth2 password grant.
pub fn check_login(login: &str, password: &str) -> Result<String, Vec<FieldError>> {
    let login = normalize_login(login);
    let mut bad = Vec::new();
    if login.is_empty() {
        bad.push(FieldError::new("username", "username is required"));
    } else if login.chars().any(char::is_control) {
        // No account name holds one (valid_username, valid_email), and
        // PostgreSQL cannot compare a text holding a NUL: it would be a 500.
        bad.push(FieldError::new(
            "username",
            "username must not hold control characters",
        ));
    } else if login.len() > MAX_LOGIN {
        bad.push(FieldError::new("username", "username is too long"));
    }
    if password.is_empty() {
        bad.push(FieldError::new("password", "password is required"));
    } else if password.len() > 4 * MAX_PASSWORD {
        bad.push(FieldError::new("password", "password is too long"));
    }
    if bad.is_empty() { Ok(login) } else { Err(bad) }
}

/// A password typed to prove who you are (current password, account
/// deletion): only its presence and size are checked, since an old account
/// may predate today's rules.
pub fn check_current_password(field: &'static str, password: &str) -> Option<FieldError> {
    if password.is_empty() {
        Some(FieldError::new(field, "password is required"))
    } else if password.len() > 4 * MAX_PASSWORD {
        Some(FieldError::new(field, "password is too long"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_usernames() {
        for good in ["a@b.co", "first.last+tag@example.org", "x_y@sub.domain.io"] {
            assert!(valid_email(good), "{good}");
        }
        for bad in [
            "", "plain", "@x.io", "a@", "a@b", "a@b.c", "a b@c.io", "a@b..io", "a@-b.io", "a\n@b.io",
            "a@b.io\n", ".a@b.io", "a@b.12",
        ] {
            assert!(!valid_email(bad), "{bad:?}");
        }
        for good in ["abc", "a_b-c", "user123", &"x".repeat(32)] {
            assert!(valid_username(good), "{good}");
        }
        for bad in [
            "ab",
            "Abc",
            "a b",
            "a.b",
            "ü-user",
            "x;drop",
            &"x".repeat(33),
            "a\nb",
        ] {
            assert!(!valid_username(bad), "{bad:?}");
        }
    }

    #[test]
    fn registration_names_every_bad_field() {
        assert_eq!(
            check_registration(" Alice@Example.COM ", "alice", "password123"),
            Ok(("alice@example.com".into(), "alice".into()))
        );
        let bad = check_registration("nope", "A", "short").unwrap_err();
        let fields: Vec<&str> = bad.iter().map(|f| f.field).collect();
        assert_eq!(fields, ["email", "username", "password"]);
        assert_eq!(bad[2].message, "password must be at least 8 characters");
        let bad = check_registration("a@b.io", "abc", &"p".repeat(MAX_PASSWORD + 1)).unwrap_err();
        assert_eq!(
            bad,
            [FieldError::new(
                "password",
                "password must be at most 1024 characters"
            )]
        );
        // Characters, not bytes: eight Hangul syllables are a long enough password.
        assert!(check_registration("a@b.io", "abc", "비밀번호비밀번호").is_ok());
    }

    #[test]
    fn log_in_names() {
        assert_eq!(check_login(" Alice ", "x").unwrap(), "alice");
        assert_eq!(check_login("A@B.io", "x").unwrap(), "a@b.io");
        let fields = |l: &str, p: &str| -> Vec<&'static str> {
            check_login(l, p).unwrap_err().iter().map(|f| f.field).collect()
        };
        assert_eq!(fields("", ""), ["username", "password"]);
        assert_eq!(fields("alice\0", "x"), ["username"]);
        assert_eq!(fields(&"a".repeat(255), "x"), ["username"]);
        assert_eq!(fields("alice", &"p".repeat(4097)), ["password"]);
        assert!(check_current_password("current_password", "").is_some());
        assert!(check_current_password("current_password", "short").is_none());
    }
}
