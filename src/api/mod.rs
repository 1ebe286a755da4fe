//! api: the REST API on warp, the only module that knows HTTP.
//!
//! One warp filter takes every request (method, path, query, headers, body
//! read with a 1 MiB cap) and [`dispatch`] routes it by hand from a single
//! table ([`ROUTES`]), so every outcome, including 404, 405, 413 and bad
//! bodies, comes out in the envelope `{"success", "message", "data"}` with
//! `error.code` on failures (and `error.fields` on a 422). Handlers parse,
//! then call `account` (sign-up, log-in, tokens, keys, passwords) or
//! `hosting`. Each request gets an id (`x-request-id`) and one
//! access log line; metrics are counted per route.
//! This module never runs a VM step itself and never writes SQL.

mod account;
mod backups;
mod dto;
mod error;
mod handlers;
mod metrics;
mod openapi;
pub mod ratelimit;
mod system;
mod usage;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use tracing::Instrument;
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use warp::reply::Response;

pub use crate::account::{valid_email, valid_username};
pub(crate) use dto::{Front, HostData};
pub use error::ApiError;
pub(crate) use handlers::public_host_of as public_host;
pub use metrics::Metrics;
pub use usage::UsageData;

use crate::account::Accounts;
use crate::auth::Auth;
use crate::hosting::HostingService;
use crate::store::Store;

/// Request bodies above this get 413.
pub const MAX_BODY: usize = 1024 * 1024;

/// What the API needs besides the services.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Host name for `web_url` and `ssh_command`; default: the request's Host.
    pub public_host: Option<String>,
    /// Port the nginx front listens on (added to `web_url` unless 80).
    pub http_port: u16,
    /// Port of the front's HTTPS, when it serves HTTPS (`https_url`).
    pub https_port: Option<u16>,
    /// With a site domain, `web_url` is `http://<username>.<domain>/`.
    pub site_domain: Option<String>,
    /// The login user in the guests (`ubuntu`).
    pub login_user: String,
    pub version: &'static str,
    /// State dir, for the free-disk health check.
    pub state_dir: Option<std::path::PathBuf>,
    /// Rate limits of register and log-in.
    pub auth_limits: ratelimit::AuthLimits,
    /// The plan of new hostings, shown on the dashboard.
    pub plan: Option<crate::vmm::plan::Plan>,
    /// How long a web session lasts (`web::session`).
    pub session_ttl: std::time::Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            public_host: None,
            http_port: 80,
            https_port: None,
            site_domain: None,
            login_user: "ubuntu".into(),
            version: env!("CARGO_PKG_VERSION"),
            state_dir: None,
            auth_limits: ratelimit::AuthLimits::default(),
            plan: None,
            session_ttl: crate::web::session::DEFAULT_TTL,
        }
    }
}

/// The rate limiters of the auth routes.
pub struct AuthLimiters {
    per_ip: Option<ratelimit::Limiter<std::net::IpAddr>>,
    per_account: Option<ratelimit::Limiter<String>>,
}

impl AuthLimiters {
    fn new(limits: ratelimit::AuthLimits) -> AuthLimiters {
        AuthLimiters {
            per_ip: limits
                .per_ip
                .map(|r| ratelimit::Limiter::new(r, ratelimit::MAX_KEYS)),
            per_account: limits
                .per_account
                .map(|r| ratelimit::Limiter::new(r, ratelimit::MAX_KEYS)),
        }
    }

    /// A hash-costing request from `remote`; 429 when over the limit.
    pub(crate) fn client(&self, remote: Option<SocketAddr>) -> Result<(), ApiError> {
        match (&self.per_ip, remote) {
            (Some(l), Some(addr)) => l.check(&addr.ip()).map_err(ApiError::rate_limited),
            _ => Ok(()),
        }
    }

    /// A log-in attempt for `account`, whatever the IP.
    pub(crate) fn account(&self, account: &str) -> Result<(), ApiError> {
        match &self.per_account {
            Some(l) => l
                .check(&account.to_ascii_lowercase())
                .map_err(ApiError::rate_limited),
            None => Ok(()),
        }
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub auth: Auth,
    pub hosting: Arc<HostingService>,
    /// Sign-up, log-in, tokens, keys, passwords: shared with the web pages.
    pub accounts: Accounts,
    pub config: Arc<ApiConfig>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<AuthLimiters>,
    /// Per-VM usage (empty unless a sampler feeds it: see [`ApiState::with_usage`]).
    pub usage: Arc<crate::usage::Usage>,
    health: Arc<system::HealthCache>,
    started: Instant,
}

impl ApiState {
    pub fn new(store: Store, auth: Auth, hosting: Arc<HostingService>, config: ApiConfig) -> ApiState {
        let mut labels: Vec<&'static str> = ROUTES.iter().map(|r| r.path).collect();
        labels.push("unmatched");
        ApiState {
            accounts: Accounts::new(store.clone(), auth.clone(), hosting.clone()),
            store,
            auth,
            hosting,
            limits: Arc::new(AuthLimiters::new(config.auth_limits)),
            usage: Arc::default(),
            health: Arc::default(),
            config: Arc::new(config),
            metrics: Arc::new(Metrics::new(&labels)),
            started: Instant::now(),
        }
    }

    /// The same state over `usage`, the history a sampler fills.
    pub fn with_usage(mut self, usage: Arc<crate::usage::Usage>) -> ApiState {
        self.usage = usage;
        self
    }
}

/// One route: the table drives dispatch, 405s, metrics labels and the
/// OpenAPI document (its body, parameters and answer types are the schemas).
pub struct RouteDef {
    pub method: Method,
    pub path: &'static str,
    pub summary: &'static str,
    pub auth: bool,
    /// Success status and the error statuses documented for it.
    pub statuses: &'static [u16],
    pub body: Option<Body>,
    pub params: &'static [Param],
    /// What the success statuses carry.
    pub answer: Answer,
    /// Values of the success answer that other operations take.
    pub links: &'static [Link],
}

impl RouteDef {
    /// A route without body or parameters, answering `data: null`.
    const fn new(
        method: Method,
        path: &'static str,
        summary: &'static str,
        auth: bool,
        statuses: &'static [u16],
    ) -> RouteDef {
        RouteDef {
            method,
            path,
            summary,
            auth,
            statuses,
            body: None,
            params: &[],
            answer: Answer::Data(openapi::nothing),
            links: &[],
        }
    }

    const fn links(mut self, links: &'static [Link]) -> RouteDef {
        self.links = links;
        self
    }

    const fn body(mut self, body: Body) -> RouteDef {
        self.body = Some(body);
        self
    }

    const fn params(mut self, params: &'static [Param]) -> RouteDef {
        self.params = params;
        self
    }

    const fn data(mut self, data: SchemaFn) -> RouteDef {
        self.answer = Answer::Data(data);
        self
    }

    const fn answer(mut self, answer: Answer) -> RouteDef {
        self.answer = answer;
        self
    }
}

macro_rules! route {
    ($m:ident, $p:expr, $s:expr, $a:expr, $st:expr) => {
        RouteDef::new(Method::$m, $p, $s, $a, $st)
    };
}

use crate::account::SshKeyEntry;
use backups::{BackupData, RestoredData};
use dto::{ConsoleData, CreateHostRequest, LoginRequest, RegisterRequest, UserData};
use openapi::{Answer, Body, Link, Param, SchemaFn, list, named};
use system::{DetailedHealthData, HealthData, VersionData};

pub static ROUTES: &[RouteDef] = &[
    route!(
        POST,
        "/api/v1/auth/register",
        "Create an account (JSON email, username, password)",
        false,
        &[201, 400, 409, 413, 422, 429]
    )
    .body(Body::Json(named::<RegisterRequest>))
    .data(named::<UserData>),
    route!(
        POST,
        "/api/v1/auth/login",
        "Log in (form-encoded or JSON username + password; OAuth2 password grant); returns a \
         bearer token per RFC 6749 §5.1, with the envelope beside it",
        false,
        &[200, 400, 401, 413, 415, 422, 429]
    )
    .body(Body::FormOrJson(named::<LoginRequest>))
    .answer(Answer::Token),
    route!(
        GET,
        "/api/v1/auth/me",
        "The account of the token",
        true,
        &[200, 401]
    )
    .data(named::<UserData>),
    route!(
        POST,
        "/api/v1/auth/logout-all",
        "Log out everywhere: revoke every token and web session of the account (this one too)",
        true,
        &[200, 400, 401, 413]
    )
    .body(Body::OptionalJson(named::<account::EmptyRequest>)),
    route!(
        GET,
        "/api/v1/account/ssh-keys",
        "The account's SSH public keys (id, algorithm, SHA256 fingerprint, comment), oldest first",
        true,
        &[200, 401]
    )
    .data(list::<SshKeyEntry>),
    route!(
        POST,
        "/api/v1/account/ssh-keys",
        "Add an SSH public key (JSON public_key); the next hosting created without a key gets \
         the account's keys",
        true,
        &[201, 400, 401, 409, 413, 422]
    )
    .body(Body::Json(named::<account::AddSshKeyRequest>))
    .data(named::<SshKeyEntry>)
    .links(openapi::SSH_KEY_LINKS),
    route!(
        DELETE,
        "/api/v1/account/ssh-keys/{id}",
        "Remove one of the account's SSH keys",
        true,
        &[200, 401, 404]
    )
    .params(&[openapi::SSH_KEY_ID]),
    route!(
        POST,
        "/api/v1/account/password",
        "Change the password (JSON current_password, new_password); every older token and \
         session is revoked, and the answer carries a new token",
        true,
        &[200, 400, 401, 403, 413, 422, 429]
    )
    .body(Body::Json(named::<account::ChangePasswordRequest>))
    .answer(Answer::Token),
    route!(
        DELETE,
        "/api/v1/account",
        "Delete the account (JSON password), its hosting, backups and SSH keys",
        true,
        &[200, 400, 401, 403, 413, 422, 429, 500]
    )
    .body(Body::Json(named::<account::DeleteAccountRequest>)),
    route!(
        POST,
        "/api/v1/host",
        "Create the account's hosting (optional JSON ssh_public_key; ?wait=false returns 202)",
        true,
        &[201, 202, 400, 401, 409, 413, 422, 500, 503, 504]
    )
    .body(Body::OptionalJson(named::<CreateHostRequest>))
    .params(&[openapi::WAIT])
    .data(named::<HostData>),
    route!(
        GET,
        "/api/v1/host/my",
        "The account's hosting, with progress while it is created",
        true,
        &[200, 401, 404]
    )
    .data(named::<HostData>),
    route!(
        DELETE,
        "/api/v1/host/my",
        "Delete the hosting and everything it holds, its backups included",
        true,
        &[200, 401, 404, 409, 500]
    ),
    route!(
        POST,
        "/api/v1/host/my/start",
        "Start a stopped VM",
        true,
        &[200, 401, 404, 409, 500, 504]
    )
    .data(named::<HostData>),
    route!(
        POST,
        "/api/v1/host/my/stop",
        "Stop the VM",
        true,
        &[200, 401, 404, 409, 500]
    )
    .data(named::<HostData>),
    route!(
        POST,
        "/api/v1/host/my/restart",
        "Restart the VM",
        true,
        &[200, 401, 404, 409, 500, 504]
    )
    .data(named::<HostData>),
    route!(
        GET,
        "/api/v1/host/my/console",
        "Last lines of the VM's serial console (?lines=N, at most 1000)",
        true,
        &[200, 401, 404, 422]
    )
    .params(&[openapi::LINES])
    .data(named::<ConsoleData>),
    route!(
        GET,
        "/api/v1/host/my/usage",
        "The VM's usage: the latest sample and the last hour of cumulative counters (CPU seconds, \
         resident memory, disk read/write bytes, network bytes received/sent), sampled every \
         sample_every_seconds",
        true,
        &[200, 401, 404]
    )
    .data(named::<UsageData>),
    route!(
        POST,
        "/api/v1/host/my/backups",
        "Start a live backup of the running VM's disk (incremental on the last one when possible); \
         202 with the backup, whose progress GET shows. One at a time; 507 when the host's disk \
         could not hold it",
        true,
        &[202, 401, 404, 409, 507]
    )
    .data(named::<BackupData>)
    .links(openapi::BACKUP_LINKS),
    route!(
        GET,
        "/api/v1/host/my/backups",
        "The hosting's backups, oldest first: id, time, size, full or incremental, consistency \
         (crash, or frozen by the guest agent), progress while running",
        true,
        &[200, 401, 404]
    )
    .data(list::<BackupData>),
    route!(
        POST,
        "/api/v1/host/my/backups/{id}/restore",
        "Stop the VM cleanly, put its disk back to that backup and start it (same address, port, \
         host key and site); the next backup is full",
        true,
        &[200, 401, 404, 409, 500, 504]
    )
    .params(&[openapi::BACKUP_ID])
    .data(named::<RestoredData>),
    route!(
        DELETE,
        "/api/v1/host/my/backups/{id}",
        "Delete a backup; the others stay restorable (the next in its chain takes over its content)",
        true,
        &[200, 401, 404, 409]
    )
    .params(&[openapi::BACKUP_ID]),
    route!(GET, "/api/v1/health", "Liveness", false, &[200]).data(named::<HealthData>),
    route!(
        GET,
        "/api/v1/health/detailed",
        "Database, QEMU, accel, image, namespace, nginx, disk, VMs by state",
        false,
        &[200, 503]
    )
    .answer(Answer::DataOnEveryStatus(named::<DetailedHealthData>)),
    route!(
        GET,
        "/api/v1/version",
        "Version, git commit, QEMU version",
        false,
        &[200]
    )
    .data(named::<VersionData>),
    route!(
        GET,
        "/api/v1/openapi.json",
        "This OpenAPI document",
        false,
        &[200]
    )
    .answer(Answer::Raw(&["application/json"], openapi::any_object)),
    route!(GET, "/docs", "The API explorer (Swagger UI)", false, &[200])
        .answer(Answer::Raw(&["text/html"], openapi::text)),
    route!(
        GET,
        "/docs/{file}",
        "The API explorer's files (vendored Swagger UI)",
        false,
        &[200, 404]
    )
    .params(&[openapi::DOCS_FILE])
    .answer(Answer::Raw(openapi::DOCS_TYPES, openapi::text)),
    route!(GET, "/metrics", "Prometheus metrics", false, &[200])
        .answer(Answer::Raw(&["text/plain"], openapi::text)),
];

/// One parsed request, as handlers see it.
pub(crate) struct Request<'a> {
    pub state: &'a ApiState,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub remote: Option<SocketAddr>,
    pub body: Bytes,
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);

pub(crate) fn request_id() -> String {
    // Unique across restarts (random prefix) and cheap (counter).
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| format!("{:08x}", rand::random::<u32>()));
    format!("{prefix}-{:x}", REQUEST_SEQ.fetch_add(1, Ordering::Relaxed))
}

/// The whole API as one warp filter. Never rejects: every answer is an envelope.
pub fn routes(
    state: ApiState,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let state = warp::any().map(move || state.clone());
    let query = warp::query::raw().map(Some).or(warp::any().map(|| None)).unify();
    state
        .and(warp::method())
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::addr::remote())
        .and(warp::body::stream())
        .then(
            |state: ApiState,
             method: Method,
             path: warp::path::FullPath,
             query: Option<String>,
             headers: HeaderMap,
             remote: Option<SocketAddr>,
             body| async move {
                let id = request_id();
                let span = tracing::info_span!("request", request_id = %id);
                handle(
                    state,
                    method,
                    path.as_str().to_owned(),
                    query,
                    headers,
                    remote,
                    body,
                    id,
                )
                .instrument(span)
                .await
            },
        )
        .or(warp::any().map(|| {
            // Only reached when the body stream cannot be taken.
            ApiError::bad_request("unreadable request").into_response()
        }))
        .unify()
}

#[allow(clippy::too_many_arguments)]
async fn handle<S, B>(
    state: ApiState,
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    remote: Option<SocketAddr>,
    body: S,
    id: String,
) -> Response
where
    S: futures::Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let started = Instant::now();
    let remote = client_addr(remote, &headers);
    // Labelled by the route's pattern: `/docs/{file}`, not each file.
    let route = ROUTES.iter().find(|r| path_matches(r.path, &path));
    let label = route.map(|r| r.path).unwrap_or("unmatched");
    let mut resp = match read_body(&headers, body).await {
        Err(e) => e.into_response(),
        Ok(body) => {
            let req = Request {
                state: &state,
                method: &method,
                headers: &headers,
                query: query.as_deref(),
                remote,
                body,
            };
            dispatch(&req, &path).await
        }
    };
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    state.metrics.record(label, status, elapsed.as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    tracing::info!(
        target: "webhoster::access",
        method = %method,
        path = %path,
        status,
        micros = elapsed.as_micros() as u64,
        remote = %remote.map(|r| r.to_string()).unwrap_or_default(),
        "request"
    );
    resp
}

/// The visitor's address. Through the nginx front (a peer on loopback) it is
/// the front's `X-Real-IP`; otherwise all of the front's visitors would share
/// one rate-limit bucket. A local process may claim any address this way:
/// the per-account log-in limit holds whatever it claims.
pub(crate) fn client_addr(peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<SocketAddr> {
    let peer = peer?;
    if !peer.ip().is_loopback() {
        return Some(peer);
    }
    let forwarded = headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok());
    Some(forwarded.map_or(peer, |ip| SocketAddr::new(ip, 0)))
}

/// Reads the body with the 1 MiB cap (a larger Content-Length is refused
/// before reading anything).
pub(crate) async fn read_body<S, B>(headers: &HeaderMap, body: S) -> Result<Bytes, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request bodies are limited to {MAX_BODY} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let mut buf = BytesMut::new();
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|_| ApiError::bad_request("the request body could not be read"))?;
        if buf.len() + chunk.remaining() > MAX_BODY {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

async fn dispatch(req: &Request<'_>, path: &str) -> Response {
    let matching: Vec<&RouteDef> = ROUTES.iter().filter(|r| path_matches(r.path, path)).collect();
    if matching.is_empty() {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route {path}")).into_response();
    }
    // HEAD is answered like GET by hyper's body handling.
    let method = if *req.method == Method::HEAD {
        &Method::GET
    } else {
        req.method
    };
    if !matching.iter().any(|r| r.method == *method) {
        let allow: Vec<&str> = matching.iter().map(|r| r.method.as_str()).collect();
        let mut resp = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{} is not allowed on {path}; use {}",
                req.method,
                allow.join(", ")
            ),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
        return resp;
    }
    // Every route of one path has the same pattern.
    let result = match (method.as_str(), matching[0].path) {
        ("POST", "/api/v1/auth/register") => handlers::register(req).await,
        ("POST", "/api/v1/auth/login") => handlers::login(req).await,
        ("GET", "/api/v1/auth/me") => handlers::me(req).await,
        ("POST", "/api/v1/auth/logout-all") => account::logout_all(req).await,
        ("GET", "/api/v1/account/ssh-keys") => account::list_keys(req).await,
        ("POST", "/api/v1/account/ssh-keys") => account::add_key(req).await,
        ("DELETE", "/api/v1/account/ssh-keys/{id}") => account::remove_key(req, path).await,
        ("POST", "/api/v1/account/password") => account::change_password(req).await,
        ("DELETE", "/api/v1/account") => account::delete_account(req).await,
        ("POST", "/api/v1/host") => handlers::create_host(req).await,
        ("GET", "/api/v1/host/my") => handlers::get_host(req).await,
        ("DELETE", "/api/v1/host/my") => handlers::delete_host(req).await,
        ("POST", "/api/v1/host/my/start") => handlers::power(req, "start").await,
        ("POST", "/api/v1/host/my/stop") => handlers::power(req, "stop").await,
        ("POST", "/api/v1/host/my/restart") => handlers::power(req, "restart").await,
        ("GET", "/api/v1/host/my/console") => handlers::console(req).await,
        ("GET", "/api/v1/host/my/usage") => usage::usage(req).await,
        ("POST", "/api/v1/host/my/backups") => backups::create(req).await,
        ("GET", "/api/v1/host/my/backups") => backups::list(req).await,
        ("POST", "/api/v1/host/my/backups/{id}/restore") => backups::restore(req, path).await,
        ("DELETE", "/api/v1/host/my/backups/{id}") => backups::delete(req, path).await,
        ("GET", "/api/v1/health") => system::health(req).await,
        ("GET", "/api/v1/health/detailed") => system::health_detailed(req).await,
        ("GET", "/api/v1/version") => system::version(req).await,
        ("GET", "/api/v1/openapi.json") => Ok(openapi::document(req)),
        ("GET", "/docs") => Ok(openapi::docs_page()),
        ("GET", "/docs/{file}") => openapi::docs_file(path),
        ("GET", "/metrics") => system::metrics(req).await,
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")),
    };
    result.unwrap_or_else(ApiError::into_response)
}

/// Whether `path` fits `pattern`, where a `{name}` segment fits any
/// non-empty segment.
fn path_matches(pattern: &str, path: &str) -> bool {
    let (mut p, mut q) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.starts_with('{') && a.ends_with('}') && !b.is_empty() => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Serves `routes(state)` on `listener` until `shutdown` resolves, then lets
/// requests in flight finish.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    // The first health snapshot is taken before the first request is read.
    state.health.refresh(&state).await;
    let refresher = system::spawn_refresher(state.clone());
    // The web pages first: they take only their own paths (web::is_web_path).
    warp::serve(crate::web::with_api(state))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    refresher.abort();
}

/// Binds `addr` and serves; returns the bound address and the server future.
pub async fn serve(
    addr: SocketAddr,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, serve_listener(listener, state, shutdown)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_names_the_client_only_from_loopback() {
        let mut headers = HeaderMap::new();
        headers.insert("x-real-ip", HeaderValue::from_static("192.0.2.7"));
        let front: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let outside: SocketAddr = "198.51.100.1:40000".parse().unwrap();
        assert_eq!(
            client_addr(Some(front), &headers),
            Some("192.0.2.7:0".parse().unwrap())
        );
        assert_eq!(client_addr(Some(outside), &headers), Some(outside));
        assert_eq!(client_addr(Some(front), &HeaderMap::new()), Some(front));
        headers.insert("x-real-ip", HeaderValue::from_static("not an address"));
        assert_eq!(client_addr(Some(front), &headers), Some(front));
        assert_eq!(client_addr(None, &headers), None);
    }

    #[test]
    fn a_brace_segment_fits_any_one_segment() {
        let p = "/api/v1/host/my/backups/{id}/restore";
        assert!(path_matches(p, "/api/v1/host/my/backups/12/restore"));
        assert!(path_matches(p, "/api/v1/host/my/backups/x/restore"));
        assert!(!path_matches(p, "/api/v1/host/my/backups//restore"));
        assert!(!path_matches(p, "/api/v1/host/my/backups/12"));
        assert!(!path_matches(p, "/api/v1/host/my/backups/12/restore/more"));
        assert!(path_matches("/api/v1/host/my", "/api/v1/host/my"));
        assert!(!path_matches("/api/v1/host/my", "/api/v1/host/other"));
    }
}
