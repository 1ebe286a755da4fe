//! The envelope and the one error type that maps every module's errors to an
//! HTTP status and a stable `error.code`. A 500 is logged with its chain and
//! never echoed: the client gets a generic message.

use serde::Serialize;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use crate::account::{AccountError, FieldError};
use crate::auth::AuthError;
use crate::hosting::{HostingError, chain};
use crate::store::{Conflict, StoreError};

/// Every `error.code` the API answers with, and the status it comes with.
/// The OpenAPI document lists each status's codes; a unit test checks that
/// every code in the sources is here with its status, and debug builds
/// assert it on every error answer.
pub const ERROR_CODES: &[(&str, u16)] = &[
    ("bad_request", 400),
    ("validation_failed", 422),
    ("unauthorized", 401),
    ("invalid_credentials", 401),
    ("rate_limited", 429),
    ("not_found", 404),
    ("method_not_allowed", 405),
    ("payload_too_large", 413),
    ("unsupported_media_type", 415),
    ("internal", 500),
    ("email_taken", 409),
    ("username_taken", 409),
    ("hosting_exists", 409),
    ("no_hosting", 404),
    ("hosting_busy", 409),
    ("create_cancelled", 409),
    ("capacity", 503),
    ("no_capacity", 503),
    ("invalid_ssh_key", 422),
    ("create_timeout", 504),
    ("create_failed", 500),
    ("cleanup_failed", 500),
    ("not_ready", 504),
    ("vm_failed", 500),
    ("not_running", 409),
    ("no_backup", 404),
    ("no_room", 507),
    ("unhealthy", 503),
    ("ssh_key_exists", 409),
    ("wrong_password", 403),
    ("no_ssh_key", 404),
];

/// The codes that come with `status`.
pub fn codes_of(status: u16) -> impl Iterator<Item = &'static str> {
    ERROR_CODES
        .iter()
        .filter(move |(_, s)| *s == status)
        .map(|(c, _)| *c)
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
    /// With `validation_failed`: each bad field and what is wrong with it.
    pub fields: Vec<FieldError>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            fields: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 422 naming each bad field; the message is theirs, joined.
    pub fn validation_fields(fields: Vec<FieldError>) -> ApiError {
        ApiError {
            message: crate::account::messages(&fields),
            fields,
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", "")
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
    }

    /// 429: too many requests; `retry_after` goes into `Retry-After`.
    pub fn rate_limited(retry_after: std::time::Duration) -> ApiError {
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        ApiError {
            retry_after: Some(secs),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many attempts; try again in {secs} s"),
            )
        }
    }

    /// Logs `err` with its chain and hides it behind a generic 500.
    pub fn internal(err: &(dyn std::error::Error + 'static)) -> ApiError {
        tracing::error!(error = %chain(err), "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; it has been logged",
        )
    }

    pub fn into_response(self) -> Response {
        let mut resp = envelope_with(
            self.status,
            false,
            &self.message,
            &serde_json::Value::Null,
            Some(ErrorBody {
                code: self.code,
                fields: self.fields,
            }),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    success: bool,
    message: &'a str,
    data: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    /// Only on `validation_failed`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    fields: Vec<FieldError>,
}

/// `{"success", "message", "data"[, "error": {"code"}]}` as a JSON response.
pub fn envelope<T: Serialize>(
    status: StatusCode,
    success: bool,
    message: &str,
    data: &T,
    code: Option<&'static str>,
) -> Response {
    let error = code.map(|code| ErrorBody {
        code,
        fields: Vec::new(),
    });
    envelope_with(status, success, message, data, error)
}

fn envelope_with<T: Serialize>(
    status: StatusCode,
    success: bool,
    message: &str,
    data: &T,
    error: Option<ErrorBody>,
) -> Response {
    debug_assert!(
        error
            .as_ref()
            .is_none_or(|e| ERROR_CODES.contains(&(e.code, status.as_u16()))),
        "error code {:?} with {status} is missing from ERROR_CODES (and so from the OpenAPI document)",
        error.as_ref().map(|e| e.code)
    );
    let body = Envelope {
        success,
        message,
        data,
        error,
    };
    json_response(status, &body)
}

/// `body` as a JSON response with `status`.
pub fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| {
        br#"{"success":false,"message":"unserializable response","data":null,"error":{"code":"internal"}}"#.to_vec()
    });
    let mut resp = Response::new(bytes.into());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn ok<T: Serialize>(status: StatusCode, message: &str, data: &T) -> Response {
    envelope(status, true, message, data, None)
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        match err {
            StoreError::Conflict(Conflict::Email) => ApiError::new(
                StatusCode::CONFLICT,
                "email_taken",
                "an account with this email already exists",
            ),
            StoreError::Conflict(Conflict::Username) => {
                ApiError::new(StatusCode::CONFLICT, "username_taken", "this username is taken")
            }
            StoreError::Conflict(Conflict::SshKey) => ApiError::new(
                StatusCode::CONFLICT,
                "ssh_key_exists",
                "this account already has this SSH key",
            ),
            StoreError::Conflict(Conflict::HostingForUser) => ApiError::new(
                StatusCode::CONFLICT,
                "hosting_exists",
                "this account already has a hosting",
            ),
            other => ApiError::internal(&other),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> ApiError {
        match err {
            AuthError::InvalidToken => ApiError::unauthorized(),
            other => ApiError::internal(&other),
        }
    }
}

impl From<HostingError> for ApiError {
    fn from(err: HostingError) -> ApiError {
        use HostingError as H;
        let msg = err.to_string();
        match err {
            H::Exists => ApiError::new(StatusCode::CONFLICT, "hosting_exists", msg),
            H::NotFound => ApiError::new(StatusCode::NOT_FOUND, "no_hosting", msg),
            H::Busy(_) => ApiError::new(StatusCode::CONFLICT, "hosting_busy", msg),
            H::Cancelled => ApiError::new(StatusCode::CONFLICT, "create_cancelled", msg),
            H::Capacity(_) => ApiError {
                retry_after: Some(60),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "capacity", msg)
            },
            H::SubnetFull | H::PortsFull | H::AllocContention(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_capacity", msg)
            }
            H::Key(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_ssh_key", msg),
            H::Store(e) => e.into(),
            ref e @ H::StepFailed { .. } if e.is_timeout() => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "create_timeout", msg)
            }
            H::StepFailed { .. } => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "create_failed", msg),
            H::RollbackFailed { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cleanup_failed", msg)
            }
            ref e @ H::Vm { .. } if e.is_timeout() => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "not_ready", msg)
            }
            H::Vm { .. } => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "vm_failed", msg),
            H::Transition(_) => ApiError::new(StatusCode::CONFLICT, "hosting_busy", msg),
            H::NotRunning(_) => ApiError::new(StatusCode::CONFLICT, "not_running", msg),
            H::NoBackup => ApiError::new(StatusCode::NOT_FOUND, "no_backup", msg),
            H::NoRoom(_) => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "no_room", msg),
            ref other @ H::TaskLost => ApiError::internal(other),
        }
    }
}

impl From<AccountError> for ApiError {
    fn from(err: AccountError) -> ApiError {
        use AccountError as A;
        match err {
            A::Invalid(fields) => ApiError::validation_fields(fields),
            A::Taken("email") => StoreError::Conflict(Conflict::Email).into(),
            A::Taken("username") => StoreError::Conflict(Conflict::Username).into(),
            A::Taken(_) => StoreError::Conflict(Conflict::SshKey).into(),
            A::WrongCredentials => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "wrong username or password",
            ),
            A::WrongPassword => ApiError::new(
                StatusCode::FORBIDDEN,
                "wrong_password",
                "the password is wrong; nothing was changed",
            ),
            A::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such account or key"),
            A::Hosting(e) => e.into(),
            A::Store(e) => e.into(),
            A::Auth(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code the API's sources answer with is listed with its status
    /// (and so documented).
    #[test]
    fn every_error_code_in_the_sources_is_listed() {
        let sources = [
            include_str!("error.rs"),
            include_str!("mod.rs"),
            include_str!("handlers.rs"),
            include_str!("backups.rs"),
            include_str!("system.rs"),
            include_str!("account.rs"),
            include_str!("usage.rs"),
        ];
        // `ApiError::new(<a StatusCode>, <code>, ..)` and `envelope(.., Some(<code>))`.
        let re = regex::Regex::new(
            r#"ApiError::new\(\s*StatusCode::([A-Z_]+),\s*"([a-z_]+)"|Some\("([a-z_]+)"\),\s*\)"#,
        )
        .unwrap();
        // `CONFLICT` -> 409, from the reasons the http crate knows.
        let status_named = |name: &str| {
            (100..600)
                .filter_map(|n| StatusCode::from_u16(n).ok())
                .find(|s| {
                    s.canonical_reason()
                        .is_some_and(|r| r.to_ascii_uppercase().replace([' ', '-'], "_") == name)
                })
                .unwrap_or_else(|| panic!("no status named {name}"))
                .as_u16()
        };
        let mut found = 0;
        for src in sources {
            for cap in re.captures_iter(src) {
                found += 1;
                match (cap.get(1), cap.get(2), cap.get(3)) {
                    (Some(name), Some(code), _) => {
                        let pair = (code.as_str(), status_named(name.as_str()));
                        assert!(
                            ERROR_CODES.contains(&pair),
                            "{pair:?} is missing from ERROR_CODES"
                        );
                    }
                    (_, _, Some(code)) => assert!(
                        ERROR_CODES.iter().any(|(c, _)| *c == code.as_str()),
                        "{} is missing from ERROR_CODES",
                        code.as_str()
                    ),
                    _ => unreachable!(),
                }
            }
        }
        assert!(
            found > 20,
            "the scan found only {found} codes; is the pattern stale?"
        );
        let mut sorted: Vec<&str> = ERROR_CODES.iter().map(|(c, _)| *c).collect();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ERROR_CODES.len(), "a code is listed twice");
    }
}
