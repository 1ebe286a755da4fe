//! web: the pages people use in a browser (home, sign-up, log-in,
//! dashboard, settings), rendered on the server from `templates/web/`.
//!
//! [`routes`] matches only the web paths (`/`, `/signup`, `/login`,
//! `/logout`, `/dashboard…`, `/settings…`, `/assets/…`, `/lang/…`) and
//! rejects every other path untouched, so the app tries it before
//! `api::routes`. Every page works without JavaScript: forms post, the
//! server answers 303 to the next page, or the same form with its errors
//! next to the fields. Pages call the same services as the REST API
//! (`account::Accounts`, `HostingService`) and never validate input
//! themselves. Every page sends a strict CSP, `nosniff`, a referrer policy
//! and `Cache-Control: no-store`.

mod account_pages;
mod assets;
mod dashboard;
mod i18n;
mod keyslot;
mod render;
pub mod session;
mod settings;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use warp::reply::Response;

use crate::api::ApiState;
pub use i18n::Lang;
use keyslot::KeySlots;
use render::Frame;
use session::Session;

/// The policy of every page: own scripts and styles only, no plugins, no
/// framing, forms only to us.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The first path segments that are web pages.
const SECTIONS: &[&str] = &[
    "signup",
    "login",
    "logout",
    "dashboard",
    "settings",
    "assets",
    "lang",
];

/// Whether `path` is one of the pages (the rest goes to the API).
pub fn is_web_path(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    SECTIONS.contains(&first)
}

/// What the pages share.
#[derive(Clone)]
pub(crate) struct WebState {
    pub api: ApiState,
    /// Generated private keys waiting for their one download.
    pub keys: Arc<KeySlots>,
}

/// The web pages as one warp filter; rejects (not found) any other path.
pub fn routes(
    state: ApiState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let state = WebState {
        api: state,
        keys: Arc::default(),
    };
    let state = warp::any().map(move || state.clone());
    let query = warp::query::raw().map(Some).or(warp::any().map(|| None)).unify();
    warp::path::full()
        .and_then(|path: warp::path::FullPath| async move {
            if is_web_path(path.as_str()) {
                Ok(path.as_str().to_owned())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .and(state)
        .and(warp::method())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::addr::remote())
        .and(warp::body::stream())
        .then(
            |path: String,
             state: WebState,
             method: Method,
             query: Option<String>,
             headers: HeaderMap,
             peer: Option<SocketAddr>,
             body| async move {
                let started = Instant::now();
                let id = crate::api::request_id();
                let body = crate::api::read_body(&headers, body).await;
                let mut resp = match body {
                    Err(e) => e.into_response(),
                    Ok(body) => {
                        let ctx = Ctx::new(&state, method.clone(), &path, query, headers, peer, body);
                        dispatch(&ctx).await
                    }
                };
                if let Ok(v) = HeaderValue::from_str(&id) {
                    resp.headers_mut().insert("x-request-id", v);
                }
                tracing::info!(
                    target: "webhoster::access",
                    request_id = %id,
                    method = %method,
                    path = %path,
                    status = resp.status().as_u16(),
                    micros = started.elapsed().as_micros() as u64,
                    "page"
                );
                resp
            },
        )
}

/// The web pages in front of the API: what `api::serve` serves.
pub fn with_api(
    state: ApiState,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    routes(state.clone()).or(crate::api::routes(state)).unify()
}

/// One request, as the page handlers see it.
pub(crate) struct Ctx<'a> {
    pub st: &'a WebState,
    pub method: Method,
    pub path: &'a str,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The visitor (the front's `X-Real-IP` from loopback).
    pub remote: Option<SocketAddr>,
    /// Whether the visitor came over TLS (cookies get `Secure`).
    pub secure: bool,
    pub lang: Lang,
    pub body: Bytes,
}

impl<'a> Ctx<'a> {
    fn new(
        st: &'a WebState,
        method: Method,
        path: &'a str,
        query: Option<String>,
        headers: HeaderMap,
        peer: Option<SocketAddr>,
        body: Bytes,
    ) -> Ctx<'a> {
        let lang = Lang::pick(
            session::cookie(&headers, i18n::COOKIE).as_deref(),
            headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()),
        );
        Ctx {
            st,
            method,
            path,
            query,
            remote: crate::api::client_addr(peer, &headers),
            secure: session::over_tls(peer, &headers),
            lang,
            headers,
            body,
        }
    }

    pub fn t(&self, key: &str) -> &'static str {
        self.lang.t(key)
    }

    /// A query parameter, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.query.as_deref()?;
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The posted form (`application/x-www-form-urlencoded`).
    pub fn form(&self) -> Form {
        Form(serde_urlencoded::from_bytes(&self.body).unwrap_or_default())
    }

    /// The visitor's session, if the cookie names a live one.
    pub async fn session(&self) -> Result<Option<Session>, Page> {
        let Some(token) = session::cookie(&self.headers, session::COOKIE) else {
            return Ok(None);
        };
        let id = session::token_id(&token);
        let row = self
            .st
            .api
            .store
            .live_session(&id, session::unix_now())
            .await
            .map_err(|e| self.server_error(&e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        match self.st.api.accounts.user(row.user_id).await {
            Ok(user) => Ok(Some(Session {
                id,
                user,
                csrf: row.csrf,
            })),
            Err(crate::account::AccountError::NotFound) => Ok(None),
            Err(e) => Err(self.server_error(&e)),
        }
    }

    /// The session, or a redirect to the log-in page (clearing a stale cookie).
    pub async fn require_session(&self) -> Result<Session, Page> {
        match self.session().await? {
            Some(s) => Ok(s),
            None => {
                let stale = session::cookie(&self.headers, session::COOKIE).is_some();
                let to = if stale { "/login?n=session_ended" } else { "/login" };
                let mut page = Page::redirect(to);
                if stale {
                    page.cookies
                        .push(session::clear_cookie(session::COOKIE, self.secure));
                }
                Err(page)
            }
        }
    }

    /// A POST of a logged-in page: same site, and the session's CSRF token.
    pub async fn require_post(&self) -> Result<(Session, Form), Page> {
        let session = self.require_session().await?;
        let form = self.form();
        self.check_origin_and_token(form.get("csrf"), &session.csrf)?;
        Ok((session, form))
    }

    pub fn check_origin_and_token(&self, sent: &str, expected: &str) -> Result<(), Page> {
        if session::from_another_site(&self.headers)
            || expected.is_empty()
            || !session::constant_time_eq(sent, expected)
        {
            tracing::warn!(
                path = self.path,
                "form refused: another site or a wrong CSRF token"
            );
            return Err(self.error_page(
                StatusCode::FORBIDDEN,
                "err_forbidden_title",
                "err_form_expired",
                None,
            ));
        }
        Ok(())
    }

    /// The frame of a page for `session` (or a visitor).
    pub fn frame<'s>(&'s self, title: &'s str, session: Option<&'s Session>, csrf: &'s str) -> Frame<'s> {
        let notice = self
            .query_param("n")
            .filter(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .and_then(|k| self.lang.catalogue().get(&format!("notice_{k}")).cloned());
        let alert = self
            .query_param("e")
            .filter(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .and_then(|k| self.lang.catalogue().get(&format!("err_{k}")).cloned());
        Frame {
            lang: self.lang,
            title,
            user: session.map(|s| s.user.username.as_str()),
            csrf,
            back: self.path,
            notice,
            alert,
        }
    }

    /// Renders page `name` in the layout.
    pub fn render(&self, status: StatusCode, name: &str, frame: &Frame<'_>, data: Value) -> Page {
        match render::page(name, frame, data) {
            Ok(html) => Page::html(status, html),
            Err(e) => self.server_error(&e),
        }
    }

    pub fn error_page(
        &self,
        status: StatusCode,
        heading: &str,
        text: &str,
        session: Option<&Session>,
    ) -> Page {
        let csrf = session.map(|s| s.csrf.as_str()).unwrap_or("");
        let frame = self.frame(self.t(heading), session, csrf);
        let data = serde_json::json!({ "heading": self.t(heading), "text": self.t(text) });
        match render::page("error", &frame, data) {
            Ok(html) => Page::html(status, html),
            Err(e) => {
                tracing::error!(error = %e, "rendering the error page");
                Page::html(status, self.t(text).to_owned())
            }
        }
    }

    /// A 500 page; the error is logged with its chain, never shown.
    pub fn server_error(&self, err: &(dyn std::error::Error + 'static)) -> Page {
        tracing::error!(error = %crate::hosting::chain(err), path = self.path, "page failed");
        let frame = Frame {
            lang: self.lang,
            title: self.t("err_server"),
            user: None,
            csrf: "",
            back: "/",
            notice: None,
            alert: None,
        };
        let data = serde_json::json!({ "heading": self.t("err_server"), "text": self.t("err_server") });
        let html = render::page("error", &frame, data).unwrap_or_else(|_| self.t("err_server").to_owned());
        Page::html(StatusCode::INTERNAL_SERVER_ERROR, html)
    }
}

/// A posted form.
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    /// The field's value; "" when absent.
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
}

/// An answer of the pages, before the common headers.
pub(crate) struct Page {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
    // Boxed: `Page` is the error side of every handler, kept small.
    pub location: Option<Box<str>>,
    pub cookies: Vec<String>,
    /// Long caching (assets); every other answer is `no-store`.
    pub cacheable: bool,
    pub attachment: Option<Box<str>>,
}

impl Page {
    pub fn html(status: StatusCode, html: String) -> Page {
        Page {
            status,
            content_type: "text/html; charset=utf-8",
            body: Bytes::from(html),
            location: None,
            cookies: Vec::new(),
            cacheable: false,
            attachment: None,
        }
    }

    /// 303 to a path of ours.
    pub fn redirect(to: &str) -> Page {
        Page {
            status: StatusCode::SEE_OTHER,
            location: Some(to.into()),
            ..Page::html(StatusCode::SEE_OTHER, String::new())
        }
    }

    pub fn json(status: StatusCode, value: &Value) -> Page {
        Page {
            content_type: "application/json",
            ..Page::html(status, value.to_string())
        }
    }

    pub fn cookie(mut self, c: String) -> Page {
        self.cookies.push(c);
        self
    }

    fn into_response(self) -> Response {
        // Said outright: hyper leaves it out of an empty answer to HEAD.
        let length = HeaderValue::from(self.body.len());
        let mut resp = Response::new(self.body.into());
        resp.headers_mut().insert(header::CONTENT_LENGTH, length);
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("strict-origin-when-cross-origin"),
        );
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(if self.cacheable {
                "public, max-age=31536000, immutable"
            } else {
                "no-store"
            }),
        );
        // Pages differ by language and session.
        h.insert(header::VARY, HeaderValue::from_static("Cookie, Accept-Language"));
        if let Some(loc) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            h.insert(header::LOCATION, loc);
        }
        if let Some(v) = self
            .attachment
            .and_then(|name| HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")).ok())
        {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
        for c in self.cookies {
            if let Ok(v) = HeaderValue::from_str(&c) {
                h.append(header::SET_COOKIE, v);
            }
        }
        resp
    }
}

impl From<Result<Page, Page>> for Page {
    fn from(r: Result<Page, Page>) -> Page {
        r.unwrap_or_else(|p| p)
    }
}

async fn dispatch(ctx: &Ctx<'_>) -> Response {
    let method = if ctx.method == Method::HEAD {
        Method::GET
    } else {
        ctx.method.clone()
    };
    let page: Result<Page, Page> = match (method.as_str(), ctx.path) {
        ("GET", "/") => account_pages::home(ctx).await,
        ("GET", "/signup") => account_pages::signup_form(ctx).await,
        ("POST", "/signup") => account_pages::signup(ctx).await,
        ("GET", "/login") => account_pages::login_form(ctx).await,
        ("POST", "/login") => account_pages::login(ctx).await,
        ("POST", "/logout") => account_pages::logout(ctx).await,
        ("GET", "/dashboard") => dashboard::show(ctx).await,
        ("GET", "/dashboard/status") => dashboard::status(ctx).await,
        ("POST", "/dashboard/create") => dashboard::create(ctx).await,
        ("POST", "/dashboard/action") => dashboard::action(ctx).await,
        ("GET", "/dashboard/delete") => dashboard::confirm_delete(ctx).await,
        ("POST", "/dashboard/key") => dashboard::download_key(ctx).await,
        ("GET", "/settings") => settings::show(ctx).await,
        ("POST", "/settings/keys/add") => settings::add_key(ctx).await,
        ("POST", "/settings/keys/remove") => settings::remove_key(ctx).await,
        ("POST", "/settings/password") => settings::change_password(ctx).await,
        ("POST", "/settings/logout-all") => settings::logout_all(ctx).await,
        ("POST", "/settings/delete") => settings::delete_account(ctx).await,
        ("GET", p) if p.starts_with("/assets/") => Ok(asset(p)),
        ("GET", p) if p.starts_with("/lang/") => Ok(account_pages::switch_lang(ctx, &p["/lang/".len()..])),
        (_, p) if known_page(p) => Ok(ctx.error_page(
            StatusCode::METHOD_NOT_ALLOWED,
            "err_not_found_title",
            "err_not_found_text",
            None,
        )),
        _ => Ok(ctx.error_page(
            StatusCode::NOT_FOUND,
            "err_not_found_title",
            "err_not_found_text",
            None,
        )),
    };
    Page::from(page).into_response()
}

/// A page that exists under another method (405 rather than 404).
fn known_page(path: &str) -> bool {
    matches!(
        path,
        "/" | "/signup"
            | "/login"
            | "/logout"
            | "/dashboard"
            | "/dashboard/status"
            | "/dashboard/create"
            | "/dashboard/action"
            | "/dashboard/delete"
            | "/dashboard/key"
            | "/settings"
            | "/settings/keys/add"
            | "/settings/keys/remove"
            | "/settings/password"
            | "/settings/logout-all"
            | "/settings/delete"
    )
}

fn asset(path: &str) -> Page {
    match assets::get(path) {
        Some((content_type, body)) => Page {
            content_type,
            cacheable: true,
            ..Page::html(StatusCode::OK, body.to_owned())
        },
        None => Page {
            content_type: "text/plain; charset=utf-8",
            ..Page::html(StatusCode::NOT_FOUND, "no such asset".into())
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_pages_paths_are_taken() {
        for p in [
            "/",
            "/signup",
            "/login",
            "/logout",
            "/dashboard",
            "/dashboard/status",
            "/settings",
            "/settings/keys/add",
            "/assets/site.css",
            "/lang/ko",
        ] {
            assert!(super::is_web_path(p), "{p}");
        }
        for p in [
            "/api/v1/health",
            "/docs",
            "/metrics",
            "/1/",
            "/12/dashboard",
            "/dashboards",
            "/signupx",
            "",
        ] {
            assert!(!super::is_web_path(p), "{p}");
        }
    }
}
