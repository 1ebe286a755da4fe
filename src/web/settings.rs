//! Settings: SSH keys, password, log out everywhere, delete the account.
//! Every action goes through `account::Accounts`, like the REST API's.

use serde_json::{Value, json};
use warp::http::StatusCode;

use super::session::{self, Session};
use super::{Ctx, Page};
use crate::account::AccountError;

type Answer = Result<Page, Page>;

async fn render(ctx: &Ctx<'_>, session: &Session, status: StatusCode, extra: Value) -> Answer {
    let keys = ctx
        .st
        .api
        .accounts
        .ssh_keys(session.user.id)
        .await
        .map_err(|e| ctx.server_error(&e))?;
    let mut data = json!({
        "keys": keys.iter().map(|k| json!({
            "id": k.id,
            "algorithm": k.algorithm,
            "fingerprint": k.fingerprint,
            "comment": k.comment,
            "created_at": k.created_at,
        })).collect::<Vec<_>>(),
        "key_ready": ctx.st.keys.has(&session.id),
    });
    if let (Value::Object(d), Value::Object(e)) = (&mut data, extra) {
        d.extend(e);
    }
    let frame = ctx.frame(ctx.t("settings_title"), Some(session), &session.csrf);
    Ok(ctx.render(status, "settings", &frame, data))
}

pub async fn show(ctx: &Ctx<'_>) -> Answer {
    let session = ctx.require_session().await?;
    render(ctx, &session, StatusCode::OK, json!({})).await
}

/// The settings page again with one field's error (status by the error).
async fn field_error(ctx: &Ctx<'_>, session: &Session, field: &str, key: &str, values: Value) -> Answer {
    let status = match key {
        "err_key_taken" => StatusCode::CONFLICT,
        "err_wrong_password" => StatusCode::FORBIDDEN,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    Err(render(
        ctx,
        session,
        status,
        json!({ "errors": { field: ctx.t(key) }, "values": values }),
    )
    .await
    .unwrap_or_else(|p| p))
}

pub async fn add_key(ctx: &Ctx<'_>) -> Answer {
    let (session, form) = ctx.require_post().await?;
    let text = form.get("public_key");
    match ctx.st.api.accounts.add_ssh_key(session.user.id, text).await {
        Ok(_) => Ok(Page::redirect("/settings?n=key_added")),
        Err(AccountError::Invalid(_)) => {
            field_error(
                ctx,
                &session,
                "public_key",
                "err_key_invalid",
                json!({ "public_key": text }),
            )
            .await
        }
        Err(AccountError::Taken(_)) => {
            field_error(
                ctx,
                &session,
                "public_key",
                "err_key_taken",
                json!({ "public_key": text }),
            )
            .await
        }
        Err(e) => Err(ctx.server_error(&e)),
    }
}

pub async fn remove_key(ctx: &Ctx<'_>) -> Answer {
    let (session, form) = ctx.require_post().await?;
    let Ok(key_id) = form.get("key_id").parse::<i64>() else {
        return Ok(Page::redirect("/settings?e=key_not_found"));
    };
    match ctx.st.api.accounts.remove_ssh_key(session.user.id, key_id).await {
        Ok(()) => Ok(Page::redirect("/settings?n=key_removed")),
        Err(AccountError::NotFound) => Ok(Page::redirect("/settings?e=key_not_found")),
        Err(e) => Err(ctx.server_error(&e)),
    }
}

/// A new password ends every session and token of the account, this one
/// too; the browser that changed it gets a fresh session at once.
pub async fn change_password(ctx: &Ctx<'_>) -> Answer {
    let (session, form) = ctx.require_post().await?;
    let accounts = &ctx.st.api.accounts;
    let user = match accounts
        .change_password(
            session.user.id,
            form.get("current_password"),
            form.get("new_password"),
        )
        .await
    {
        Ok(user) => user,
        Err(AccountError::WrongPassword) => {
            return field_error(ctx, &session, "current_password", "err_wrong_password", json!({})).await;
        }
        Err(AccountError::Invalid(_)) => {
            return field_error(ctx, &session, "new_password", "err_password", json!({})).await;
        }
        Err(e) => return Err(ctx.server_error(&e)),
    };
    let store = &ctx.st.api.store;
    store
        .delete_session(&session.id)
        .await
        .map_err(|e| ctx.server_error(&e))?;
    ctx.st.keys.forget(&session.id);
    let ttl = ctx.st.api.config.session_ttl;
    let (token, _) = session::open(store, &user, ttl)
        .await
        .map_err(|e| ctx.server_error(&e))?;
    Ok(
        Page::redirect("/settings?n=password_changed").cookie(session::set_cookie(
            session::COOKIE,
            &token,
            ttl,
            ctx.secure,
        )),
    )
}

pub async fn logout_all(ctx: &Ctx<'_>) -> Answer {
    let (session, _) = ctx.require_post().await?;
    ctx.st
        .api
        .accounts
        .revoke_all(session.user.id)
        .await
        .map_err(|e| ctx.server_error(&e))?;
    // The version moved on, so every session is dead already; the row goes too.
    let _ = ctx.st.api.store.delete_session(&session.id).await;
    ctx.st.keys.forget(&session.id);
    Ok(Page::redirect("/login?n=logged_out_all").cookie(session::clear_cookie(session::COOKIE, ctx.secure)))
}

pub async fn delete_account(ctx: &Ctx<'_>) -> Answer {
    let (session, form) = ctx.require_post().await?;
    if form.get("confirm") != "yes" {
        return field_error(ctx, &session, "confirm", "err_confirm", json!({})).await;
    }
    match ctx
        .st
        .api
        .accounts
        .delete(session.user.id, form.get("password"))
        .await
    {
        Ok(()) => {
            ctx.st.keys.forget(&session.id);
            tracing::info!(user_id = session.user.id, "account deleted on the web");
            Ok(Page::redirect("/?n=account_deleted")
                .cookie(session::clear_cookie(session::COOKIE, ctx.secure)))
        }
        Err(AccountError::WrongPassword) => {
            field_error(ctx, &session, "delete_password", "err_wrong_password", json!({})).await
        }
        Err(e) => Err(ctx.server_error(&e)),
    }
}
