//! Account handlers: SSH keys, password change, log out everywhere, account
//! deletion. They parse the body, call `account::Accounts` (the same calls
//! the web pages make) and answer; the rules live there.

use serde::Deserialize;
use warp::http::StatusCode;
use warp::reply::Response;

use super::Request;
use super::error::{ApiError, ok};
use super::handlers::{current_user, parse_json, token_reply};

type Reply = Result<Response, ApiError>;

/// `POST /api/v1/account/ssh-keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddSshKeyRequest {
    /// One OpenSSH public key line: ed25519, ecdsa, or rsa of at least 2048 bits.
    #[schema(
        example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop",
        pattern = "^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+=*( [^\\n]*)?$",
        max_length = 16384
    )]
    pub public_key: String,
}

/// `POST /api/v1/account/password`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    #[schema(min_length = 1, max_length = 4096)]
    pub current_password: String,
    /// 8 to 1024 characters.
    #[schema(min_length = 8, max_length = 1024)]
    pub new_password: String,
}

/// `DELETE /api/v1/account`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteAccountRequest {
    /// The account's password, to confirm.
    #[schema(min_length = 1, max_length = 4096)]
    pub password: String,
}

/// `POST /api/v1/auth/logout-all` takes no body, or `{}`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

fn no_key() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_ssh_key",
        "this account has no such SSH key",
    )
}

/// The `{id}` of `/api/v1/account/ssh-keys/{id}`; anything but a number
/// is a key that does not exist.
fn key_id(path: &str) -> Result<i64, ApiError> {
    path.rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(no_key)
}

/// A body that may be absent: empty (or blank) means the default.
fn optional_json<T: serde::de::DeserializeOwned + Default>(req: &Request<'_>) -> Result<T, ApiError> {
    if req.body.iter().all(|b| b.is_ascii_whitespace()) {
        Ok(T::default())
    } else {
        parse_json(&req.body)
    }
}

pub async fn list_keys(req: &Request<'_>) -> Reply {
    let user = current_user(req).await?;
    let keys = req.state.accounts.ssh_keys(user.id).await?;
    Ok(ok(StatusCode::OK, "your SSH keys", &keys))
}

pub async fn add_key(req: &Request<'_>) -> Reply {
    let user = current_user(req).await?;
    let body: AddSshKeyRequest = parse_json(&req.body)?;
    let key = req.state.accounts.add_ssh_key(user.id, &body.public_key).await?;
    Ok(ok(StatusCode::CREATED, "SSH key added", &key))
}

pub async fn remove_key(req: &Request<'_>, path: &str) -> Reply {
    let user = current_user(req).await?;
    let id = key_id(path)?;
    match req.state.accounts.remove_ssh_key(user.id, id).await {
        Err(crate::account::AccountError::NotFound) => return Err(no_key()),
        other => other?,
    }
    Ok(ok(StatusCode::OK, "SSH key removed", &serde_json::Value::Null))
}

/// Answers with a new token, since every older one (this request's too) is
/// revoked by the change.
pub async fn change_password(req: &Request<'_>) -> Reply {
    let user = current_user(req).await?;
    let body: ChangePasswordRequest = parse_json(&req.body)?;
    // Checking the current password costs a hash: the log-in limits apply,
    // so a stolen token cannot be used to guess the password fast.
    req.state.limits.client(req.remote)?;
    req.state.limits.account(&user.username)?;
    let user = req
        .state
        .accounts
        .change_password(user.id, &body.current_password, &body.new_password)
        .await?;
    token_reply(
        req,
        "password changed; every other token and session is revoked",
        &user,
    )
}

pub async fn logout_all(req: &Request<'_>) -> Reply {
    let user = current_user(req).await?;
    let _: EmptyRequest = optional_json(req)?;
    req.state.accounts.revoke_all(user.id).await?;
    Ok(ok(
        StatusCode::OK,
        "every token and session of this account is revoked",
        &serde_json::Value::Null,
    ))
}

pub async fn delete_account(req: &Request<'_>) -> Reply {
    let user = current_user(req).await?;
    let body: DeleteAccountRequest = parse_json(&req.body)?;
    req.state.limits.client(req.remote)?;
    req.state.limits.account(&user.username)?;
    req.state.accounts.delete(user.id, &body.password).await?;
    Ok(ok(
        StatusCode::OK,
        "account deleted, with its hosting",
        &serde_json::Value::Null,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_numbers() {
        assert_eq!(key_id("/api/v1/account/ssh-keys/12").unwrap(), 12);
        for bad in [
            "/api/v1/account/ssh-keys/x",
            "/api/v1/account/ssh-keys/1.5",
            "/api/v1/account/ssh-keys/99999999999999999999",
        ] {
            assert_eq!(key_id(bad).unwrap_err().status, StatusCode::NOT_FOUND, "{bad}");
        }
    }
}
