//! Home, sign-up, log-in, log-out and the language switch.

use serde_json::{Map, Value, json};
use warp::http::StatusCode;

use super::session::{self, FORM_COOKIE};
use super::{Ctx, Page, i18n};
use crate::account::AccountError;

type Answer = Result<Page, Page>;

pub async fn home(ctx: &Ctx<'_>) -> Answer {
    let session = ctx.session().await?;
    let csrf = session.as_ref().map(|s| s.csrf.clone()).unwrap_or_default();
    let frame = ctx.frame(ctx.t("home_page"), session.as_ref(), &csrf);
    Ok(ctx.render(StatusCode::OK, "home", &frame, json!({})))
}

/// The CSRF token of the forms before log-in: the visitor's `webhoster_form`
/// cookie, made when missing.
fn form_token(ctx: &Ctx<'_>) -> (String, Option<String>) {
    match session::cookie(&ctx.headers, FORM_COOKIE).filter(|t| t.len() == 64) {
        Some(t) => (t, None),
        None => {
            let t = session::random_token();
            // A day: a form left open overnight still posts.
            let c = session::set_cookie(
                FORM_COOKIE,
                &t,
                std::time::Duration::from_secs(24 * 3600),
                ctx.secure,
            );
            (t, Some(c))
        }
    }
}

/// Renders sign-up or log-in with `values` kept and `errors` by field.
fn anonymous_form(
    ctx: &Ctx<'_>,
    status: StatusCode,
    name: &str,
    title: &str,
    data: Value,
    alert: Option<String>,
) -> Page {
    let (token, cookie) = form_token(ctx);
    let mut frame = ctx.frame(ctx.t(title), None, &token);
    if alert.is_some() {
        frame.alert = alert;
    }
    let mut page = ctx.render(status, name, &frame, data);
    page.cookies.extend(cookie);
    page
}

/// The forms before log-in: same site, and the token of the form cookie.
fn check_anonymous_post(ctx: &Ctx<'_>, form: &super::Form) -> Result<(), Page> {
    let expected = session::cookie(&ctx.headers, FORM_COOKIE).unwrap_or_default();
    ctx.check_origin_and_token(form.get("csrf"), &expected)
}

/// Field errors of the account service, in the page's language: one per
/// field, named by the field (the service's English text is for the API).
fn field_errors(ctx: &Ctx<'_>, err: &AccountError) -> Option<Map<String, Value>> {
    let mut errors = Map::new();
    match err {
        AccountError::Invalid(fields) => {
            for f in fields {
                let key = match f.field {
                    "email" => "err_email",
                    "username" => "err_username",
                    _ => "err_password",
                };
                let field = if f.field == "email" || f.field == "username" {
                    f.field
                } else {
                    "password"
                };
                errors.insert(field.into(), ctx.t(key).into());
            }
        }
        AccountError::Taken(field) => {
            let key = if *field == "email" {
                "err_email_taken"
            } else {
                "err_username_taken"
            };
            errors.insert((*field).into(), ctx.t(key).into());
        }
        AccountError::WrongCredentials => {
            errors.insert("password".into(), ctx.t("err_credentials").into());
        }
        _ => return None,
    }
    Some(errors)
}

pub async fn signup_form(ctx: &Ctx<'_>) -> Answer {
    if ctx.session().await?.is_some() {
        return Ok(Page::redirect("/dashboard"));
    }
    Ok(anonymous_form(
        ctx,
        StatusCode::OK,
        "signup",
        "signup_title",
        json!({}),
        None,
    ))
}

pub async fn signup(ctx: &Ctx<'_>) -> Answer {
    let form = ctx.form();
    check_anonymous_post(ctx, &form)?;
    let values = json!({ "email": form.get("email"), "username": form.get("username") });
    if ctx.st.api.limits.client(ctx.remote).is_err() {
        return Err(anonymous_form(
            ctx,
            StatusCode::TOO_MANY_REQUESTS,
            "signup",
            "signup_title",
            json!({ "values": values, "errors": { "password": ctx.t("err_rate_limited") } }),
            Some(ctx.t("err_rate_limited").into()),
        ));
    }
    let accounts = &ctx.st.api.accounts;
    match accounts
        .register(form.get("email"), form.get("username"), form.get("password"))
        .await
    {
        Ok(user) => {
            tracing::info!(user_id = user.id, "account registered on the web");
            // Usernames are [a-z0-9_-] (account::rules): safe in a query as they are.
            Ok(Page::redirect(&format!(
                "/login?n=welcome&username={}",
                user.username
            )))
        }
        Err(e) => match field_errors(ctx, &e) {
            Some(errors) => {
                let status = if matches!(e, AccountError::Taken(_)) {
                    StatusCode::CONFLICT
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                Err(anonymous_form(
                    ctx,
                    status,
                    "signup",
                    "signup_title",
                    json!({ "values": values, "errors": errors }),
                    None,
                ))
            }
            None => Err(ctx.server_error(&e)),
        },
    }
}

pub async fn login_form(ctx: &Ctx<'_>) -> Answer {
    if ctx.session().await?.is_some() {
        return Ok(Page::redirect("/dashboard"));
    }
    let values = json!({ "username": ctx.query_param("username").unwrap_or_default() });
    Ok(anonymous_form(
        ctx,
        StatusCode::OK,
        "login",
        "login_title",
        json!({ "values": values }),
        None,
    ))
}

pub async fn login(ctx: &Ctx<'_>) -> Answer {
    let form = ctx.form();
    check_anonymous_post(ctx, &form)?;
    let login = form.get("username").trim();
    let values = json!({ "username": login });
    let again = |status, errors: Value, alert: Option<String>| {
        anonymous_form(
            ctx,
            status,
            "login",
            "login_title",
            json!({ "values": values, "errors": errors }),
            alert,
        )
    };
    let mut missing = Map::new();
    if login.is_empty() {
        missing.insert("username".into(), ctx.t("err_required").into());
    }
    if form.get("password").is_empty() {
        missing.insert("password".into(), ctx.t("err_required").into());
    }
    if !missing.is_empty() {
        return Err(again(
            StatusCode::UNPROCESSABLE_ENTITY,
            Value::Object(missing),
            None,
        ));
    }
    // The API's limits: per client address, then per account name.
    let limits = &ctx.st.api.limits;
    if limits.client(ctx.remote).is_err() || limits.account(login).is_err() {
        return Err(again(
            StatusCode::TOO_MANY_REQUESTS,
            json!({ "password": ctx.t("err_rate_limited") }),
            Some(ctx.t("err_rate_limited").into()),
        ));
    }
    let user = match ctx
        .st
        .api
        .accounts
        .authenticate(login, form.get("password"))
        .await
    {
        Ok(user) => user,
        Err(e) => {
            return match field_errors(ctx, &e) {
                Some(errors) => {
                    let status = if matches!(e, AccountError::WrongCredentials) {
                        StatusCode::UNAUTHORIZED
                    } else {
                        StatusCode::UNPROCESSABLE_ENTITY
                    };
                    Err(again(status, Value::Object(errors), None))
                }
                None => Err(ctx.server_error(&e)),
            };
        }
    };
    let (token, _) = session::open(&ctx.st.api.store, &user, ctx.st.api.config.session_ttl)
        .await
        .map_err(|e| ctx.server_error(&e))?;
    tracing::info!(user_id = user.id, "logged in on the web");
    Ok(Page::redirect("/dashboard")
        .cookie(session::set_cookie(
            session::COOKIE,
            &token,
            ctx.st.api.config.session_ttl,
            ctx.secure,
        ))
        .cookie(session::clear_cookie(FORM_COOKIE, ctx.secure)))
}

pub async fn logout(ctx: &Ctx<'_>) -> Answer {
    let (session, _) = ctx.require_post().await?;
    ctx.st
        .api
        .store
        .delete_session(&session.id)
        .await
        .map_err(|e| ctx.server_error(&e))?;
    ctx.st.keys.forget(&session.id);
    Ok(Page::redirect("/?n=logged_out").cookie(session::clear_cookie(session::COOKIE, ctx.secure)))
}

/// `/lang/<code>?back=<path>`: remembers the language and goes back. A GET
/// link, not a form: it changes a preference cookie only, never the account.
pub fn switch_lang(ctx: &Ctx<'_>, code: &str) -> Page {
    let back = ctx
        .query_param("back")
        .filter(|b| b.starts_with('/') && !b.starts_with("//") && !b.contains('\\'))
        .filter(|b| super::is_web_path(b))
        .unwrap_or_else(|| "/".into());
    match i18n::Lang::parse(code) {
        Some(lang) => Page::redirect(&back).cookie(format!(
            "{}={}; Path=/; Max-Age=31536000; SameSite=Lax{}",
            i18n::COOKIE,
            lang.code(),
            if ctx.secure { "; Secure" } else { "" }
        )),
        None => ctx.error_page(
            StatusCode::NOT_FOUND,
            "err_not_found_title",
            "err_not_found_text",
            None,
        ),
    }
}
