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
    let body = Envelope {
        success,
        message,
        data,
        error,
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| {
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
