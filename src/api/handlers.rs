//! Account and hosting handlers: parse, validate, call the service, answer.

use serde::de::DeserializeOwned;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::Request;
use super::dto::*;
use super::error::{ApiError, ok};
use crate::account::FieldError;
use crate::store::User;

type Reply = Result<Response, ApiError>;

pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        // serde's message names the field or position, never a secret value.
        ApiError::bad_request(format!("invalid JSON body: {e}"))
    })
}

fn content_type(req: &Request<'_>) -> String {
    req.headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The token of the `Authorization: Bearer` header.
fn bearer_token<'a>(req: &'a Request<'_>) -> Result<&'a str, ApiError> {
    let value = req
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(ApiError::unauthorized)?;
    let (scheme, token) = value.split_once(' ').ok_or_else(ApiError::unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::unauthorized());
    }
    Ok(token.trim())
}

/// The account of a valid bearer token: unexpired, of an account that
/// still exists, and issued under its current token version (a password
/// change or "log out everywhere" revokes the older ones). Otherwise 401.
pub(super) async fn current_user(req: &Request<'_>) -> Result<User, ApiError> {
    let token = bearer_token(req)?;
    Ok(req.state.accounts.user_of_token(token).await?)
}

/// The id of [`current_user`].
pub(super) async fn bearer(req: &Request<'_>) -> Result<i64, ApiError> {
    Ok(current_user(req).await?.id)
}

fn query_param<'a>(req: &'a Request<'_>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let q = req.query?;
    url_pairs(q).find(|(k, _)| k == name).map(|(_, v)| v)
}

fn url_pairs(q: &str) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
    q.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (std::borrow::Cow::Borrowed(k), std::borrow::Cow::Borrowed(v))
    })
}

fn public_host(req: &Request<'_>) -> String {
    public_host_of(&req.state.config, req.headers)
}

/// The host name users reach webhoster by: config, else the Host header.
pub(crate) fn public_host_of(config: &super::ApiConfig, headers: &warp::http::HeaderMap) -> String {
    if let Some(h) = &config.public_host {
        return h.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    // Strip the API port; bracketed IPv6 keeps its brackets.
    let name = if host.starts_with('[') {
        host.split_once(']')
            .map(|(h, _)| format!("{h}]"))
            .unwrap_or_else(|| host.to_owned())
    } else {
        host.split(':').next().unwrap_or(host).to_owned()
    };
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(c));
    if valid { name } else { "localhost".into() }
}

pub async fn register(req: &Request<'_>) -> Reply {
    req.state.limits.client(req.remote)?;
    let body: RegisterRequest = parse_json(&req.body)?;
    let user = req
        .state
        .accounts
        .register(&body.email, &body.username, &body.password)
        .await?;
    Ok(ok(StatusCode::CREATED, "account created", &UserData::from(&user)))
}

pub async fn login(req: &Request<'_>) -> Reply {
    req.state.limits.client(req.remote)?;
    let body: LoginRequest = match content_type(req).as_str() {
        "application/json" => parse_json(&req.body)?,
        "application/x-www-form-urlencoded" | "" => serde_urlencoded::from_bytes(&req.body)
            .map_err(|e| ApiError::bad_request(format!("invalid form body: {e}")))?,
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("login takes application/x-www-form-urlencoded or application/json, not {other}"),
            ));
        }
    };
    body.check_grant()?;
    // Bad fields are refused before they count against the account.
    let login = crate::account::rules::check_login(&body.username, &body.password)
        .map_err(ApiError::validation_fields)?;
    req.state.limits.account(&login)?;
    let accounts = &req.state.accounts;
    let user = accounts.authenticate(&login, &body.password).await?;
    token_reply(req, "logged in", &user)
}

/// A new token for `user`, in log-in's shape: per RFC 6749 §5.1 (the
/// token's fields at the top level, `Cache-Control: no-store`) with the
/// envelope beside it.
pub(super) fn token_reply(req: &Request<'_>, message: &str, user: &User) -> Reply {
    let token = req.state.accounts.issue_token(user)?;
    Ok(token_response(
        message,
        &TokenData {
            access_token: token.access_token,
            token_type: "bearer",
            expires_in: token.expires_in,
        },
    ))
}

/// 200 with the token per RFC 6749 §5.1 (top level, `Cache-Control:
/// no-store`) and the envelope beside it.
fn token_response(message: &str, token: &TokenData) -> Response {
    let body = TokenReply {
        token,
        success: true,
        message,
        data: token,
    };
    let mut resp = super::error::json_response(StatusCode::OK, &body);
    // RFC 6749 §5.1: a response with a token must not be cached.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

pub async fn me(req: &Request<'_>) -> Reply {
    let user = current_user(req).await?;
    Ok(ok(StatusCode::OK, "your account", &UserData::from(&user)))
}

/// The hosting's reply. With a site domain its URLs name the owner, read
/// here unless the caller has the account at hand.
async fn host_reply(
    req: &Request<'_>,
    status: StatusCode,
    message: &str,
    h: &crate::store::Hosting,
    owner: Option<&User>,
    private_key: Option<&str>,
) -> Reply {
    let cfg = &req.state.config;
    let looked_up = match (&cfg.site_domain, owner) {
        (Some(_), None) => Some(
            req.state
                .store
                .user_by_id(h.user_id)
                .await?
                .ok_or_else(ApiError::unauthorized)?,
        ),
        _ => None,
    };
    let username = owner.or(looked_up.as_ref()).map(|u| u.username.as_str());
    let host = public_host(req);
    let front = Front {
        host: &host,
        http_port: cfg.http_port,
        https_port: cfg.https_port,
        site_domain: cfg.site_domain.as_deref(),
    };
    let mut data = HostData::new(h, username, &front, &cfg.login_user, private_key);
    data.hosting.queue_position = req.state.hosting.queue_position(h.id);
    Ok(ok(status, message, &data))
}

pub async fn create_host(req: &Request<'_>) -> Reply {
    let user = current_user(req).await?;
    let body: CreateHostRequest = if req.body.iter().all(|b| b.is_ascii_whitespace()) {
        CreateHostRequest::default()
    } else {
        parse_json(&req.body)?
    };
    let ssh_key = body.validate()?;
    let wait = match query_param(req, "wait").as_deref() {
        None | Some("true") | Some("1") | Some("") => true,
        Some("false") | Some("0") => false,
        Some(_) => {
            return Err(ApiError::validation_fields(vec![FieldError::new(
                "wait",
                "wait must be true or false",
            )]));
        }
    };
    let created = req.state.hosting.create(&user, ssh_key, wait).await?;
    let (status, message) = if wait {
        (StatusCode::CREATED, "hosting created")
    } else {
        (
            StatusCode::ACCEPTED,
            "hosting is being created; GET /api/v1/host/my shows progress",
        )
    };
    host_reply(
        req,
        status,
        message,
        &created.hosting,
        Some(&user),
        created.private_key.as_deref(),
    )
    .await
}

pub async fn get_host(req: &Request<'_>) -> Reply {
    let user_id = bearer(req).await?;
    let h = match req.state.hosting.get(user_id).await {
        Ok(h) => h,
        Err(crate::hosting::HostingError::NotFound) => {
            let message = match req.state.hosting.last_failure(user_id) {
                Some(why) => format!("this account has no hosting; the last create failed: {why}"),
                None => "this account has no hosting".to_owned(),
            };
            return Err(ApiError::new(StatusCode::NOT_FOUND, "no_hosting", message));
        }
        Err(e) => return Err(e.into()),
    };
    host_reply(req, StatusCode::OK, "your hosting", &h, None, None).await
}

pub async fn delete_host(req: &Request<'_>) -> Reply {
    let user_id = bearer(req).await?;
    req.state.hosting.delete(user_id).await?;
    Ok(ok(StatusCode::OK, "hosting deleted", &serde_json::Value::Null))
}

pub async fn power(req: &Request<'_>, action: &str) -> Reply {
    let user_id = bearer(req).await?;
    let hosting = &req.state.hosting;
    let (h, message) = match action {
        "start" => (hosting.start(user_id).await?, "VM started"),
        "stop" => (hosting.stop(user_id).await?, "VM stopped"),
        _ => (hosting.restart(user_id).await?, "VM restarted"),
    };
    host_reply(req, StatusCode::OK, message, &h, None, None).await
}

pub async fn console(req: &Request<'_>) -> Reply {
    let user_id = bearer(req).await?;
    let lines = match query_param(req, "lines") {
        None => 100,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::validation_fields(vec![FieldError::new(
                    "lines",
                    "lines must be a number from 1 to 1000",
                )])
            })?,
    };
    let text = req.state.hosting.console(user_id, lines).await?;
    Ok(ok(
        StatusCode::OK,
        "serial console",
        &ConsoleData {
            lines: text.lines().collect(),
        },
    ))
}
