//! Property test of the real router over real HTTP. Random methods, paths,
//! headers and bodies go as raw HTTP/1.1 bytes over TCP to the API served on
//! 127.0.0.1:0, with the real store (SQLite and PostgreSQL), auth and
//! orchestrator; the VM parts are the fakes, since the property is about the
//! API layer.
//!
//! - Well-formed HTTP: the router answers every request, below 500, with a
//!   request id, a Content-Length that matches, and the JSON envelope
//!   (`application/json`; `success` iff 2xx, `error.code` iff not). The 2xx of
//!   `/docs`, `/metrics` and the OpenAPI document carry their own type; a
//!   log-in's token is also at the top level (RFC 6749 §5.1).
//! - Malformed HTTP (bad bytes in the head, conflicting framing, oversized
//!   heads, a request cut short): hyper may refuse it itself with a bare 400,
//!   414 or 431, or close; whatever the router answers obeys the rules above.
//!   Never a 5xx, never a hang.
//!
//! Afterwards the server still answers, no server thread panicked, no 5xx
//! was counted in `/metrics`, and nothing was lost: an account the fuzzer
//! holds no token of still logs in and its hosting is untouched, and every VM
//! the fakes hold belongs to a hosting.
//!
//! `PROPTEST_CASES` sets the cases of each run (default: 3000 well-formed, 500
//! malformed, per backend); `PROPTEST_RNG_SEED` picks other cases (default: a
//! fixed seed, so a failure replays). A failing case is shrunk and printed.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{Value, json};

use common::control::{Db, SECRET, TestApi, TestDb};
use webhoster::api::ratelimit::AuthLimits;
use webhoster::api::{ApiConfig, MAX_BODY, ROUTES};

const SEED: u64 = 0x00c0_ffee_5eed;
const WELLFORMED_CASES: u32 = 3000;
const MALFORMED_CASES: u32 = 500;
/// Generous: a hash under load on 2 shared cores can take seconds.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a malformed request may wait for an answer before the client
/// closes its side (hyper may be waiting for the rest of the request).
const MALFORMED_GRACE: Duration = Duration::from_millis(150);
/// Names of the threads of the server's runtime (counted by the panic hook).
const SERVER_THREADS: &str = "fuzz-server";
const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";

static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn sqlite() {
    fuzz(Db::Sqlite);
}

#[test]
fn postgres() {
    fuzz(Db::Postgres);
}

fn fuzz(db: Db) {
    count_server_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()
        .unwrap();
    // No public host: the Host header goes into `web_url`, so it is fuzzed
    // too. No rate limits: they would turn most log-ins into 429s before
    // the handler is reached.
    let api_config = ApiConfig {
        auth_limits: AuthLimits::OFF,
        ..ApiConfig::default()
    };
    let api = rt.block_on(async { TestApi::start_with_config(TestDb::new(db).await, api_config).await });
    let (victim, creds) = rt.block_on(setup(&api));
    let creds = Arc::new(creds);
    let addr = api.addr;
    let started = Instant::now();

    // Statuses seen (shrinking included), to show what the run reached.
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let tally = |a: &Answer| *seen.lock().unwrap().entry(a.status).or_default() += 1;
    let mut runner = TestRunner::new(config(WELLFORMED_CASES));
    let seed = runner.config().rng_seed;
    // The fuzzer's own token as it is now: a case that logs it out
    // everywhere, changes its password or deletes its account revokes the
    // token baked into the strategies, so later cases send this one instead
    // (else every later case would stop at 401).
    let live = std::sync::Mutex::new(creds.own.clone());
    let with_live = |bytes: Vec<u8>| live_token(bytes, &creds.own, &live.lock().unwrap());
    let result = runner.run(&wellformed(creds.clone()), |req| {
        let bytes = with_live(req.to_raw().bytes());
        let answer = send(addr, &bytes, false).map_err(TestCaseError::fail)?;
        let answer = answer.ok_or_else(|| TestCaseError::fail("closed without an answer"))?;
        tally(&answer);
        let path = route_path(&req.target);
        if (200..300).contains(&answer.status) && REVOKING.contains(&path.as_str()) {
            *live.lock().unwrap() = rt.block_on(fuzzer_again(&api, &answer));
        }
        check(&answer, req.is_head(), Some(&path))
    });
    if let Err(e) = result {
        panic!("{db:?}, well-formed requests ({seed:?}): {e}");
    }
    let wellformed_took = started.elapsed();

    let mut runner = TestRunner::new(config(MALFORMED_CASES));
    let result = runner.run(&malformed(creds.clone()), |raw| {
        let answer = send(addr, &with_live(raw.bytes()), true).map_err(TestCaseError::fail)?;
        if let Some(a) = &answer {
            tally(a);
        }
        match answer {
            None => Ok(()),
            Some(answer) if answer.header("x-request-id").is_some() => check(&answer, raw.is_head(), None),
            Some(answer) => {
                prop_assert!(
                    [400, 414, 431].contains(&answer.status),
                    "hyper's own answer to a malformed request: {}",
                    answer.status
                );
                Ok(())
            }
        }
    });
    if let Err(e) = result {
        panic!("{db:?}, malformed requests ({seed:?}): {e}");
    }
    eprintln!(
        "{db:?}: fuzzed the router with {seed:?}: well-formed {:.1} s, malformed {:.1} s; statuses {:?}",
        wellformed_took.as_secs_f64(),
        (started.elapsed() - wellformed_took).as_secs_f64(),
        seen.lock().unwrap()
    );
    rt.block_on(nothing_lost(&api, &victim));
    assert_eq!(
        SERVER_PANICS.load(Ordering::SeqCst),
        0,
        "a server thread panicked"
    );
    drop(api);
}

/// Counts panics on the server's threads (a handler that panics takes its
/// connection down: tokio catches it, so only the hook sees it).
fn count_server_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if name.starts_with(SERVER_THREADS) {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

fn config(cases: u32) -> Config {
    // Config::default() reads PROPTEST_CASES and PROPTEST_RNG_SEED.
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    config.failure_persistence = None;
    // Each step of shrinking is a request: bound it, the first failure is
    // already a finding.
    config.max_shrink_iters = 300;
    config.max_shrink_time = 60_000;
    config
}

/// The account the fuzzer must not be able to touch.
struct Victim {
    username: &'static str,
    hosting: webhoster::store::Hosting,
}

/// Routes whose success revokes the caller's token.
const REVOKING: &[&str] = &[
    "/api/v1/auth/logout-all",
    "/api/v1/account/password",
    "/api/v1/account",
];

/// `bytes` with the baked token replaced by the live one.
fn live_token(bytes: Vec<u8>, baked: &str, live: &str) -> Vec<u8> {
    if baked == live {
        return bytes;
    }
    let (baked, live) = (baked.as_bytes(), live.as_bytes());
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = &bytes[..];
    while let Some(at) = rest.windows(baked.len()).position(|w| w == baked) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(live);
        rest = &rest[at + baked.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// A valid token of the fuzzer after a case revoked its own: the one a
/// password change answered with, else one under the account's new token
/// version (signed here: a log-in would cost a hash per revocation), else
/// (the account was deleted) a new account with a hosting, as at setup.
async fn fuzzer_again(api: &TestApi, answer: &Answer) -> String {
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    if let Some(token) = body["data"]["access_token"].as_str() {
        return token.to_owned();
    }
    if let Some(u) = api.store.user_by_login("fuzzer").await.unwrap() {
        return api
            .auth
            .issue(u.user.id, u.user.token_version)
            .unwrap()
            .access_token;
    }
    let own = api.user("fuzzer").await;
    let (s, b) = api
        .call(reqwest::Method::POST, "/api/v1/host", Some(&own), None)
        .await;
    assert_eq!(s, 201, "{b}");
    own
}

/// Tokens the fuzzer sends: its own valid one, and forgeries of the victim's.
struct Creds {
    own: String,
    forged: Vec<String>,
}

async fn setup(api: &TestApi) -> (Victim, Creds) {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let victim_token = api.user("victim").await;
    let (s, b) = api
        .call(reqwest::Method::POST, "/api/v1/host", Some(&victim_token), None)
        .await;
    assert_eq!(s, 201, "{b}");
    let victim_id = b["data"]["hosting"]["id"].as_i64().unwrap();
    let hosting = api.store.hosting_by_id(victim_id).await.unwrap().unwrap();
    // The fuzzer has a hosting too, so the power and console routes reach
    // their handlers; its own token may delete and re-create it.
    let own = api.user("fuzzer").await;
    let (s, b) = api
        .call(reqwest::Method::POST, "/api/v1/host", Some(&own), None)
        .await;
    assert_eq!(s, 201, "{b}");

    let sub = hosting.user_id.to_string();
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({"sub": sub, "iat": now, "exp": now + 3600});
    let encode = |header: Value, claims: &Value| {
        format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        )
    };
    let other = webhoster::auth::Auth::new(
        b"another-secret-another-secret-another!!",
        Duration::from_secs(60),
        1,
    )
    .unwrap();
    let signed = |claims: webhoster::auth::Claims, auth: &webhoster::auth::Auth| auth.sign(&claims).unwrap();
    let own_parts: Vec<&str> = own.split('.').collect();
    let forged = vec![
        format!("{}.", encode(json!({"alg": "none", "typ": "JWT"}), &claims)),
        format!("{}.", encode(json!({"alg": "None"}), &claims)),
        format!("{}.", encode(json!({"alg": "NONE"}), &claims)),
        format!("{}.{}", encode(json!({"alg": "none"}), &claims), own_parts[2]),
        // The fuzzer's own token with the victim's id, keeping its signature.
        format!(
            "{}.{}.{}",
            own_parts[0],
            b64.encode(claims.to_string()),
            own_parts[2]
        ),
        // Expired, correctly signed.
        signed(
            webhoster::auth::Claims {
                sub: sub.clone(),
                iat: now - 7200,
                exp: now - 3600,
                ver: 0,
            },
            &api.auth,
        ),
        // Another key, another algorithm.
        signed(
            webhoster::auth::Claims {
                sub: sub.clone(),
                iat: now,
                exp: now + 3600,
                ver: 0,
            },
            &other,
        ),
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap(),
        format!(
            "{}.{}",
            encode(json!({"alg": "HS256", "kid": "../../../dev/null"}), &claims),
            own_parts[2]
        ),
        // The victim's claims under the public part of nothing: an empty key.
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b""),
        )
        .unwrap(),
    ];
    (
        Victim {
            username: "victim",
            hosting,
        },
        Creds { own, forged },
    )
}

async fn nothing_lost(api: &TestApi, victim: &Victim) {
    use reqwest::Method;
    let (s, b) = api.call(Method::GET, "/api/v1/health", None, None).await;
    assert_eq!(s, 200, "{b}");
    let token = api.login(victim.username).await;
    let (s, b) = api.call(Method::GET, "/api/v1/host/my", Some(&token), None).await;
    assert_eq!(s, 200, "{b}");
    let h = &b["data"]["hosting"];
    assert_eq!(h["id"], victim.hosting.id, "{b}");
    assert_eq!(h["vm_id"], victim.hosting.vm_id.as_str(), "{b}");
    assert_eq!(h["ssh_port"], victim.hosting.ssh_port, "{b}");
    assert_eq!(h["status"], "running", "{b}");
    // Every VM the fakes run belongs to a hosting, and every hosting has its VM.
    let hostings = api.store.all_hostings().await.unwrap();
    let held = api.world.held();
    let vms: std::collections::BTreeSet<&String> = held.vms.keys().collect();
    let owned: std::collections::BTreeSet<&String> = hostings.iter().map(|h| &h.vm_id).collect();
    assert_eq!(vms, owned, "VMs held vs hostings");
    // No 5xx slipped by unseen (a malformed request answered by the router).
    let metrics = api.metrics().await;
    let server_errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("status=\"5xx\"") && !l.ends_with(" 0"))
        .collect();
    assert!(server_errors.is_empty(), "{server_errors:?}");
}

// ---- The requests ----

/// A well-formed HTTP/1.1 request.
#[derive(Clone)]
struct Req {
    method: String,
    target: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    framing: Framing,
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    Length,
    /// `Transfer-Encoding: chunked`, in chunks of this size.
    Chunked(usize),
    /// A Content-Length this much below the body's: the rest follows as
    /// bytes the server never reads (`Connection: close`).
    Short(usize),
    /// No length: the request has no body, and the bytes follow unread.
    Unframed,
}

impl Req {
    fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    fn to_raw(&self) -> RawReq {
        let mut lines: Vec<Vec<u8>> = self
            .headers
            .iter()
            .map(|(name, value)| [name.as_bytes(), b": ", value].concat())
            .collect();
        lines.push(b"Connection: close".to_vec());
        let (framing, body) = match self.framing {
            Framing::Length => (
                vec![format!("Content-Length: {}", self.body.len()).into_bytes()],
                self.body.clone(),
            ),
            Framing::Short(n) => (
                vec![format!("Content-Length: {}", self.body.len().saturating_sub(n)).into_bytes()],
                self.body.clone(),
            ),
            Framing::Unframed => (Vec::new(), self.body.clone()),
            Framing::Chunked(size) => {
                let mut body = Vec::new();
                for chunk in self.body.chunks(size.max(1)) {
                    body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    body.extend_from_slice(chunk);
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\n\r\n");
                (vec![b"Transfer-Encoding: chunked".to_vec()], body)
            }
        };
        RawReq {
            method: self.method.clone().into_bytes(),
            target: self.target.clone(),
            version: b"HTTP/1.1".to_vec(),
            lines,
            framing,
            body,
            eol: b"\r\n",
            inserts: Vec::new(),
            cut: None,
            garbage: None,
        }
    }
}

/// The path the router sees in `target`: no absolute-form authority, no query.
fn route_path(target: &[u8]) -> String {
    let t = String::from_utf8_lossy(target);
    let path = match t.split_once("://") {
        Some((_, rest)) if !t.starts_with('/') => rest.find('/').map_or("/", |i| &rest[i..]),
        _ => &t,
    };
    path.split('?').next().unwrap_or("").to_owned()
}

fn lossy(bytes: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned();
    if bytes.len() > max {
        format!("{s:?}... ({} bytes)", bytes.len())
    } else {
        format!("{s:?}")
    }
}

impl std::fmt::Debug for Req {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} {}", self.method, lossy(&self.target, 200))?;
        for (name, value) in &self.headers {
            writeln!(f, "  {name}: {}", lossy(value, 120))?;
        }
        write!(f, "  {:?}, body {}", self.framing, lossy(&self.body, 300))
    }
}

/// A request as bytes, with what makes it malformed.
#[derive(Clone)]
struct RawReq {
    method: Vec<u8>,
    target: Vec<u8>,
    version: Vec<u8>,
    lines: Vec<Vec<u8>>,
    /// Content-Length or Transfer-Encoding lines.
    framing: Vec<Vec<u8>>,
    /// The body as sent (already chunked when it is).
    body: Vec<u8>,
    eol: &'static [u8],
    /// Bytes put into the head at these places.
    inserts: Vec<(u8, Index)>,
    /// The request stops here (the client then closes its side).
    cut: Option<Index>,
    /// Sent instead of everything else.
    garbage: Option<Vec<u8>>,
}

impl RawReq {
    fn is_head(&self) -> bool {
        self.method == b"HEAD"
    }

    fn bytes(&self) -> Vec<u8> {
        if let Some(g) = &self.garbage {
            return g.clone();
        }
        let mut head = [
            &self.method[..],
            b" ",
            &self.target,
            b" ",
            &self.version,
            self.eol,
        ]
        .concat();
        for line in self.lines.iter().chain(&self.framing) {
            head.extend_from_slice(line);
            head.extend_from_slice(self.eol);
        }
        head.extend_from_slice(self.eol);
        for (byte, at) in &self.inserts {
            head.insert(at.index(head.len()), *byte);
        }
        let mut out = [head, self.body.clone()].concat();
        if let Some(at) = self.cut {
            out.truncate(at.index(out.len()));
        }
        out
    }
}

impl std::fmt::Debug for RawReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", lossy(&self.bytes(), 600))
    }
}

// ---- Strategies ----

fn pct(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

fn strs(list: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    select(list).prop_map(String::from)
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => strs(&["GET", "POST", "DELETE"]),
        2 => strs(&["PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "get", "Post"]),
        1 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}",
    ]
}

/// A route's own method and path (most of the time, the routes that take a
/// body more often), or any method and a known path.
fn route() -> impl Strategy<Value = (String, &'static str)> {
    let mut paths: Vec<&'static str> = ROUTES.iter().map(|r| r.path).collect();
    paths.extend([
        "/",
        // The web pages (src/web), served before the API.
        "/login",
        "/signup",
        "/logout",
        "/dashboard",
        "/dashboard/action",
        "/settings/keys/add",
        "/lang/ko",
        "/assets/site.css",
        "/api",
        "/api/v1",
        "/api/v1/",
        "/api/v2/health",
        "/api/v1/host/my/",
    ]);
    let own: Vec<(String, &'static str)> = ROUTES.iter().map(|r| (r.method.to_string(), r.path)).collect();
    let post = |path| ("POST".to_owned(), path);
    let with_body = vec![
        post("/api/v1/auth/register"),
        post("/api/v1/auth/login"),
        post("/api/v1/host"),
    ];
    prop_oneof![
        3 => select(own),
        1 => select(with_body),
        1 => (method(), select(paths)),
    ]
}

/// A path segment made only of bytes a request target may hold.
fn segment() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => "[A-Za-z0-9._~-]{0,12}",
        2 => strs(&[
            "..", ".", "%2e%2e", "%2E.", "%2F", "%2f..%2f", "%00", "%ff", "%", "%zz", "%%", "~root",
            "{}", "\"", "@", ":", ";x=1", "my", "health", "api", "v1",
        ]),
        1 => ".{1,6}".prop_map(|s: String| pct(s.as_bytes())),
        1 => "[!$&'()*+,;=:@]{1,6}",
    ]
}

/// How a route's path is bent.
#[derive(Debug, Clone)]
enum PathShape {
    /// Segments added, replaced, inserted, emptied or upper-cased (often none).
    Edited(Vec<(Index, u8, String)>),
    /// `/api/v1/aaa...`, this long.
    Long(usize),
    /// Many random segments.
    Segments(Vec<String>),
    /// `*` (the asterisk-form of OPTIONS).
    Asterisk,
}

fn path_shape() -> impl Strategy<Value = PathShape> {
    prop_oneof![
        18 => Just(PathShape::Edited(Vec::new())),
        6 => vec((any::<Index>(), 0u8..6, segment()), 1..4).prop_map(PathShape::Edited),
        1 => (1000usize..60_000).prop_map(PathShape::Long),
        1 => vec(segment(), 100..400).prop_map(PathShape::Segments),
        1 => Just(PathShape::Asterisk),
    ]
}

fn shape_path(path: &str, shape: PathShape) -> String {
    match shape {
        PathShape::Long(n) => format!("/api/v1/{}", "a".repeat(n)),
        PathShape::Segments(segs) => format!("/{}", segs.join("/")),
        PathShape::Asterisk => "*".to_owned(),
        PathShape::Edited(edits) => {
            let mut segs: Vec<String> = path.split('/').map(String::from).collect();
            for (at, op, seg) in edits {
                let at = at.index(segs.len());
                match op {
                    0 | 1 => segs.push(seg),
                    2 => segs[at] = seg,
                    3 => segs.insert(at, seg),
                    4 => segs.insert(at, String::new()),
                    _ => segs[at] = segs[at].to_ascii_uppercase(),
                }
            }
            let out = segs.join("/");
            if out.starts_with('/') {
                out
            } else {
                format!("/{out}")
            }
        }
    }
}

fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![strs(&["wait", "lines", "", "x", "wait[]", "WAIT"]), "[a-z]{1,8}"];
    let value = prop_oneof![
        strs(&[
            "true",
            "false",
            "1",
            "0",
            "",
            "maybe",
            "-1",
            "1000",
            "1001",
            "+5",
            "00005",
            "99999999999999999999",
            "%74rue",
            "true%00",
            "a=b",
        ]),
        "[0-9]{1,6}",
        "[A-Za-z0-9._~-]{0,12}",
        ".{0,8}".prop_map(|s: String| pct(s.as_bytes())),
    ];
    prop_oneof![
        8 => vec((key, value), 0..5).prop_map(|kv| {
            kv.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
        }),
        1 => "[A-Za-z0-9=&%+._~-]{0,40}",
        1 => (100usize..2000).prop_map(|n| format!("lines={}", "9".repeat(n))),
    ]
}

/// The method and the request target.
fn request_line() -> impl Strategy<Value = (String, Vec<u8>)> {
    let absolute = proptest::option::weighted(
        0.1,
        strs(&["http://example.test", "http://[::1]:8000", "http://127.0.0.1"]),
    );
    (
        route(),
        path_shape(),
        proptest::option::weighted(0.3, query()),
        absolute,
    )
        .prop_map(|((method, path), shape, query, absolute)| {
            let path = shape_path(path, shape);
            if path == "*" {
                return (method, path.into_bytes());
            }
            let query = query.map(|q| format!("?{q}")).unwrap_or_default();
            (
                method,
                format!("{}{path}{query}", absolute.unwrap_or_default()).into_bytes(),
            )
        })
}

/// Bytes a header value may hold: visible ASCII, space, tab and obs-text.
fn value_bytes(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> + Clone {
    vec(
        prop_oneof![8 => 0x20u8..0x7f, 1 => 0x80u8..=0xff, 1 => Just(b'\t')],
        len,
    )
}

fn host() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        6 => Just(Some(b"127.0.0.1".to_vec())),
        1 => Just(None),
        2 => select(&[
            "example.test", "example.test:8080", "[::1]:8000", "[::1", "a:b:c", "", "évil.test",
            "x/y", "<script>", "a b", "localhost:99999",
        ][..])
        .prop_map(|s| Some(s.as_bytes().to_vec())),
        1 => value_bytes(0..64).prop_map(Some),
    ]
}

fn content_type() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        3 => Just(None),
        4 => Just(Some(b"application/json".to_vec())),
        2 => Just(Some(b"application/x-www-form-urlencoded".to_vec())),
        2 => select(&[
            "application/json; charset=utf-8", "APPLICATION/JSON", "application/json;",
            " application/json ", "application/jsonx", "text/plain", "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded; charset=latin1", ";", "", "*/*",
            "application/json, text/plain",
        ][..])
        .prop_map(|s| Some(s.as_bytes().to_vec())),
        1 => value_bytes(0..40).prop_map(Some),
    ]
}

/// A JWT of random JSON parts, signed with the service's own secret: claims
/// that parse badly must still be refused. `sub` is never the decimal id of
/// an account, so no such token is one the fuzzer could not have.
fn self_signed_jwt() -> impl Strategy<Value = String> {
    let sub = prop_oneof![
        json().prop_filter("not a string", |v| !v.is_string()),
        "[a-z ]{0,8}".prop_map(Value::from),
        strs(&["0", "-1", "99999999999999999999", "1.0", " 1", "0x1"]).prop_map(Value::from),
    ];
    let exp = prop_oneof![
        any::<i64>().prop_map(Value::from),
        json(),
        Just(Value::from(u64::MAX)),
    ];
    (proptest::option::of(sub), proptest::option::of(exp), json()).prop_map(|(sub, exp, extra)| {
        let mut claims = serde_json::Map::new();
        claims.insert("extra".into(), extra);
        if let Some(sub) = sub {
            claims.insert("sub".into(), sub);
        }
        if let Some(exp) = exp {
            claims.insert("exp".into(), exp);
        }
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &Value::Object(claims),
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    })
}

/// Three base64url parts of random JSON and bytes.
fn jwt_shaped() -> impl Strategy<Value = String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    (json(), json(), vec(any::<u8>(), 0..48)).prop_map(move |(h, c, sig)| {
        format!(
            "{}.{}.{}",
            b64.encode(h.to_string()),
            b64.encode(c.to_string()),
            b64.encode(sig)
        )
    })
}

fn authorization(creds: Arc<Creds>) -> impl Strategy<Value = Option<Vec<u8>>> {
    let own = creds.own.clone();
    let own2 = creds.own.clone();
    let scheme = strs(&[
        "Bearer ", "bearer ", "BEARER ", "Bearer  ", "Basic ", "Token ", "Bearer", "",
    ]);
    prop_oneof![
        2 => Just(None),
        4 => scheme.prop_map(move |s| Some(format!("{s}{own}").into_bytes())),
        3 => select(creds.forged.clone()).prop_map(|t| Some(format!("Bearer {t}").into_bytes())),
        2 => self_signed_jwt().prop_map(|t| Some(format!("Bearer {t}").into_bytes())),
        1 => jwt_shaped().prop_map(|t| Some(format!("Bearer {t}").into_bytes())),
        1 => (any::<Index>(), value_bytes(1..8)).prop_map(move |(at, junk)| {
            let mut t = format!("Bearer {own2}").into_bytes();
            let at = at.index(t.len());
            t.splice(at..at, junk);
            Some(t)
        }),
        1 => value_bytes(0..64).prop_map(Some),
        1 => (20_000usize..40_000).prop_map(|n| Some([&b"Bearer "[..], &vec![b'A'; n]].concat())),
    ]
}

/// Framing headers, and what would make a well-formed request ambiguous.
const RESERVED: &[&str] = &[
    "connection",
    "content-length",
    "transfer-encoding",
    "host",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "proxy-connection",
];

fn extra_headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = prop_oneof![
        strs(&[
            "x-request-id",
            "x-forwarded-for",
            "x-real-ip",
            "forwarded",
            "cookie",
            "accept",
            "accept-encoding",
            "content-encoding",
            "origin",
            "referer",
            "user-agent",
            "range",
            "expect",
            "authorization",
            "content-type",
            "x-http-method-override",
        ]),
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}".prop_filter("framing is the framing's", |n: &String| {
            !RESERVED.contains(&n.to_ascii_lowercase().as_str())
        }),
    ];
    let value = prop_oneof![
        8 => value_bytes(0..64),
        1 => select(&["100-continue", "gzip", "chunked", "close"][..]).prop_map(|s| s.as_bytes().to_vec()),
    ];
    prop_oneof![
        10 => vec((name.clone(), value.clone()), 0..6),
        1 => vec((name.clone(), value), 60..90),
        1 => (name, 20_000usize..60_000).prop_map(|(n, len)| vec![(n, vec![b'h'; len])]),
    ]
}

fn json() -> impl Strategy<Value = Value> + Clone {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        strs(&[
            "",
            "password123",
            "fuzzer",
            "victim",
            "a@b.io",
            ED25519,
            "\u{0}",
            "../../etc/passwd",
            "' OR 1=1 --",
            "ssh-ed25519 AAAA",
            "\u{202e}",
            "password",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((key(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        3 => strs(&[
            "email", "username", "password", "grant_type", "scope", "client_id", "client_secret",
            "ssh_public_key", "admin", "id", "user_id",
        ]),
        1 => ".{0,10}",
    ]
}

/// A string a handler will validate: plausible, or not at all.
fn field() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        "[a-z][a-z0-9_-]{2,10}",
        "[a-z]{1,8}@[a-z]{1,8}\\.(io|com)",
        ".{0,20}",
        strs(&["", " ", "password", "fuzzer", "FUZZER", "victim", "a@b", ED25519]),
        Just("x".repeat(1100)),
    ]
    .prop_map(Value::from)
}

/// `template` with fields removed, replaced (by a string or any JSON) or added.
fn shaped(template: Value) -> impl Strategy<Value = Value> {
    let own: Vec<String> = template
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys().cloned())
        .collect();
    let key = prop_oneof![2 => select(own), 1 => key()];
    let edit = prop_oneof![
        2 => field().prop_map(Some),
        1 => json().prop_map(Some),
        1 => Just(None),
    ];
    vec((key, edit), 0..3).prop_map(move |edits| {
        let mut t = template.clone();
        if let Value::Object(map) = &mut t {
            for (k, v) in edits {
                match v {
                    Some(v) => map.insert(k, v),
                    None => map.remove(&k),
                };
            }
        }
        t
    })
}

/// Content-Type and body.
type Payload = (Option<Vec<u8>>, Vec<u8>);

/// Any payload, and one that each body-taking handler expects, edited.
#[derive(Debug, Clone)]
struct Payloads {
    any: Payload,
    register: Payload,
    login: Payload,
    host: Payload,
    /// Whether a handler that takes a body gets the payload it expects.
    fitting: bool,
}

impl Payloads {
    fn pick(self, path: &str) -> Payload {
        match path {
            "/api/v1/auth/register" if self.fitting => self.register,
            "/api/v1/auth/login" if self.fitting => self.login,
            "/api/v1/host" if self.fitting => self.host,
            _ => self.any,
        }
    }
}

fn payloads() -> impl Strategy<Value = Payloads> {
    let ct = |t: &str| Just(Some(t.as_bytes().to_vec()));
    let register = (
        ct("application/json"),
        shaped(json!({"email": "shape@example.com", "username": "shape", "password": "password123"}))
            .prop_map(to_vec),
    );
    let login = prop_oneof![
        (
            ct("application/json"),
            shaped(json!({"username": "fuzzer", "password": "password123", "grant_type": "password"}))
                .prop_map(to_vec)
        ),
        (ct("application/x-www-form-urlencoded"), form()),
        (Just(None), form()),
    ];
    let host = (
        ct("application/json"),
        shaped(json!({"ssh_public_key": ED25519})).prop_map(to_vec),
    );
    ((content_type(), body()), register, login, host, any::<bool>()).prop_map(
        |(any, register, login, host, fitting)| Payloads {
            any,
            register,
            login,
            host,
            fitting,
        },
    )
}

fn form() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        strs(&[
            "username",
            "password",
            "grant_type",
            "scope",
            "client_id",
            "client_secret",
            "admin",
            ""
        ]),
        "[a-z%]{1,8}",
    ];
    let value = prop_oneof![
        strs(&[
            "fuzzer",
            "password123",
            "password",
            "%ff%fe",
            "%",
            "%zz",
            "+",
            "a+b",
            "%00",
            "victim"
        ]),
        "[ -~]{0,20}",
    ];
    vec((key, value), 0..5).prop_map(|kv| {
        kv.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
            .into_bytes()
    })
}

fn to_vec(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(Vec::new()),
        6 => json().prop_map(to_vec),
        3 => form(),
        // Deep nesting, balanced or not.
        1 => (1usize..20_000, select(&["[", "{\"a\":"][..]), any::<bool>()).prop_map(|(n, open, close)| {
            let mut b = open.repeat(n);
            if close {
                b.push('1');
                b.push_str(&(if open == "[" { "]" } else { "}" }).repeat(n));
            }
            b.into_bytes()
        }),
        // Around and above the 1 MiB cap.
        1 => prop_oneof![
            select(vec![MAX_BODY - 1, MAX_BODY, MAX_BODY + 1]),
            100_000usize..1_200_000,
        ]
        .prop_map(|n| {
            let mut b = b"{\"ssh_public_key\":\"".to_vec();
            b.resize(n.saturating_sub(2), b'x');
            b.extend_from_slice(b"\"}");
            b
        }),
        // Not UTF-8.
        2 => vec(any::<u8>(), 0..256),
        1 => (vec(0x80u8..=0xff, 1..8), any::<bool>()).prop_map(|(bad, login)| {
            let field: &[u8] = if login { b"{\"username\":\"fuzzer\",\"password\":\"" } else { b"{\"ssh_public_key\":\"" };
            [field, &bad, b"\"}"].concat()
        }),
        1 => select(&[
            r#"{"username":"fuzzer","username":"victim","password":"password123"}"#,
            "1e400", r#"{"ssh_public_key":"\ud800"}"#, "[]", "null", "\"\"", "{", "}",
            r#"{"a":1}garbage"#, "\u{feff}{}", " {} ", r#"{"ssh_public_key":null}"#,
            r#"{"email":"a@b.io","username":"abc","password":"12345678"} "#,
            r#"{"username":"fuzzer\u0000","password":"password123"}"#,
            r#"{"username":"victim","password":"password123\u0000"}"#,
        ][..])
        .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        6 => Just(Framing::Length),
        2 => (1usize..5000).prop_map(Framing::Chunked),
        1 => (1usize..64).prop_map(Framing::Short),
        1 => Just(Framing::Unframed),
    ]
}

fn wellformed(creds: Arc<Creds>) -> impl Strategy<Value = Req> {
    (
        request_line(),
        host(),
        payloads(),
        authorization(creds),
        extra_headers(),
        framing(),
    )
        .prop_map(|((method, target), host, payloads, auth, extra, framing)| {
            let (ct, body) = payloads.pick(&route_path(&target));
            let mut headers = Vec::new();
            let named = [("Host", host), ("Content-Type", ct), ("Authorization", auth)];
            for (name, value) in named {
                if let Some(v) = value {
                    headers.push((name.to_owned(), v));
                }
            }
            headers.extend(extra);
            Req {
                method,
                target,
                headers,
                body,
                framing,
            }
        })
}

/// What makes a request malformed.
#[derive(Debug, Clone)]
enum Corrupt {
    Method(Vec<u8>),
    Target(Vec<u8>),
    Version(Vec<u8>),
    /// A byte no head may hold there, somewhere in the head.
    Byte(u8, Index),
    /// A raw header line.
    Line(Vec<u8>),
    /// Framing lines instead of the request's.
    Framing(Vec<&'static str>),
    /// More headers than hyper takes (100).
    TooMany,
    /// A head above hyper's buffer (about 400 KiB).
    TooBig,
    Cut(Index),
    BareLf,
    Garbage(Vec<u8>),
}

fn corrupt() -> impl Strategy<Value = Corrupt> {
    let head_bytes = || {
        prop_oneof![
            Just(0u8),
            Just(b'\r'),
            Just(b'\n'),
            Just(0x7f),
            1u8..0x20,
            0x80u8..=0xff,
            Just(b' ')
        ]
    };
    prop_oneof![
        1 => prop_oneof![
            vec(any::<u8>(), 0..16),
            Just(b"CONNECT".to_vec()),
            (1000usize..20_000).prop_map(|n| vec![b'G'; n]),
        ].prop_map(Corrupt::Method),
        2 => prop_oneof![
            ".{1,8}".prop_map(|s: String| format!("/api/v1/{s}").into_bytes()),
            vec(any::<u8>(), 0..32).prop_map(|b| [&b"/api/v1/health"[..], &b].concat()),
            select(&["", "/a b", "/#frag", "api/v1/health", "//", "http://", "http://x:99999/", "/\0"][..])
                .prop_map(|s| s.as_bytes().to_vec()),
            (65_535usize..100_000).prop_map(|n| [&b"/"[..], &vec![b'a'; n]].concat()),
        ].prop_map(Corrupt::Target),
        1 => select(&["HTTP/1.2", "HTTP/2.0", "HTTP/0.9", "http/1.1", "", "HTTP/1.1 x", "HTTP/11", "HTTP/1.1\0"][..])
            .prop_map(|s| Corrupt::Version(s.as_bytes().to_vec())),
        3 => (head_bytes(), any::<Index>()).prop_map(|(b, at)| Corrupt::Byte(b, at)),
        2 => prop_oneof![
            select(&["no colon", "bad name: x", ": empty", " folded: x", "\tfolded", "x-nul: a\0b", "x-cr: a\rb", "é: x"][..])
                .prop_map(|s| s.as_bytes().to_vec()),
            vec(any::<u8>(), 0..40),
        ].prop_map(Corrupt::Line),
        2 => select(vec![
            vec!["Content-Length: 5", "Transfer-Encoding: chunked"],
            vec!["Content-Length: 5", "Content-Length: 6"],
            vec!["Content-Length: -1"],
            vec!["Content-Length: abc"],
            vec!["Content-Length: 1e3"],
            vec!["Content-Length: +5"],
            vec!["Content-Length: 99999999999999999999999"],
            vec!["Content-Length: 100000"],
            vec!["Transfer-Encoding: gzip"],
            vec!["Transfer-Encoding: chunked, chunked"],
            vec!["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
        ]).prop_map(Corrupt::Framing),
        1 => Just(Corrupt::TooMany),
        1 => Just(Corrupt::TooBig),
        1 => any::<Index>().prop_map(Corrupt::Cut),
        1 => Just(Corrupt::BareLf),
        1 => vec(any::<u8>(), 0..512).prop_map(Corrupt::Garbage),
    ]
}

fn malformed(creds: Arc<Creds>) -> impl Strategy<Value = RawReq> {
    (wellformed(creds), vec(corrupt(), 1..3)).prop_map(|(req, corruptions)| {
        let mut raw = req.to_raw();
        for c in corruptions {
            match c {
                Corrupt::Method(m) => raw.method = m,
                Corrupt::Target(t) => raw.target = t,
                Corrupt::Version(v) => raw.version = v,
                Corrupt::Byte(b, at) => raw.inserts.push((b, at)),
                Corrupt::Line(l) => raw.lines.push(l),
                Corrupt::Framing(f) => raw.framing = f.iter().map(|l| l.as_bytes().to_vec()).collect(),
                Corrupt::TooMany => raw
                    .lines
                    .extend((0..120).map(|i| format!("x-h{i}: v").into_bytes())),
                Corrupt::TooBig => raw.lines.push([&b"x-big: "[..], &vec![b'a'; 450_000]].concat()),
                Corrupt::Cut(at) => raw.cut = Some(at),
                Corrupt::BareLf => raw.eol = b"\n",
                Corrupt::Garbage(g) => raw.garbage = Some(g),
            }
        }
        raw
    })
}

// ---- The client ----

struct Answer {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} {}",
            self.status,
            self.header("content-type"),
            lossy(&self.body, 300)
        )
    }
}

/// Sends `bytes` on a new connection and reads one answer. `Ok(None)`: the
/// server closed (or reset) without answering. A malformed request that got
/// no answer within [`MALFORMED_GRACE`] has the client's side closed, since
/// the server may be waiting for the rest of it.
fn send(addr: SocketAddr, bytes: &[u8], malformed: bool) -> Result<Option<Answer>, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            // The server may answer and close before it reads everything.
            let _ = writer.write_all(bytes);
            if malformed
                && finished.recv_timeout(MALFORMED_GRACE) == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            {
                let _ = writer.shutdown(Shutdown::Write);
            }
        });
        let answer = read_answer(&mut stream, bytes.starts_with(b"HEAD "));
        drop(done);
        answer
    })
}

fn read_answer(stream: &mut TcpStream, head: bool) -> Result<Option<Answer>, String> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(answer) = parse_answer(&mut buf, head)? {
            return Ok(Some(answer));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no whole answer in {ANSWER_TIMEOUT:?}: {}",
                lossy(&buf, 300)
            ));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(format!("closed mid-answer: {}", lossy(&buf, 300))),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset && buf.is_empty() => return Ok(None),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(format!("reading the answer: {e} after {}", lossy(&buf, 300))),
        }
    }
}

/// One whole answer from the front of `buf`, skipping 1xx (`100 Continue`);
/// `None` while incomplete. An answer must carry a Content-Length.
fn parse_answer(buf: &mut Vec<u8>, head: bool) -> Result<Option<Answer>, String> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("unparsable answer ({e}): {}", lossy(buf, 300))),
        };
        let status = resp.code.unwrap_or(0);
        if (100..200).contains(&status) {
            buf.drain(..len);
            continue;
        }
        let headers: Vec<(String, Vec<u8>)> = resp
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<usize>().ok())
            .ok_or_else(|| format!("an answer without Content-Length: {}", lossy(buf, 300)))?;
        let body_len = if head { 0 } else { length };
        if buf.len() < len + body_len {
            return Ok(None);
        }
        let body = buf[len..len + body_len].to_vec();
        return Ok(Some(Answer {
            status,
            headers,
            body,
        }));
    }
}

// ---- The property ----

/// The rules of every answer of the router. `path`: the route asked for,
/// when known (a malformed request's may have been rewritten by hyper).
fn check(a: &Answer, head: bool, path: Option<&str>) -> Result<(), TestCaseError> {
    prop_assert!(a.status < 500, "a server error: {a:?}");
    prop_assert!(a.header("x-request-id").is_some(), "no request id: {a:?}");
    // The web pages answer as pages (their body-read errors are envelopes).
    let page = path.is_none_or(webhoster::web::is_web_path);
    if page && a.header("content-security-policy").is_some() {
        return check_page(a);
    }
    let ct = a.header("content-type");
    let success = (200..300).contains(&a.status);
    const HTML: &str = "text/html; charset=utf-8";
    const PROMETHEUS: &str = "text/plain; version=0.0.4";
    if success {
        match path {
            Some("/docs") => return check_type(ct, HTML, a),
            Some("/metrics") => return check_type(ct, PROMETHEUS, a),
            Some("/api/v1/openapi.json") => {
                check_type(ct, "application/json", a)?;
                let doc: Value = serde_json::from_slice(&a.body).unwrap_or_default();
                prop_assert!(
                    head || doc["openapi"].is_string(),
                    "not the OpenAPI document: {a:?}"
                );
                return Ok(());
            }
            None if ct == Some(HTML) || ct == Some(PROMETHEUS) => return Ok(()),
            _ => {}
        }
    }
    prop_assert_eq!(ct, Some("application/json"), "{:?}", a);
    if a.status == 401 {
        prop_assert_eq!(a.header("www-authenticate"), Some("Bearer"), "{:?}", a);
    }
    if a.status == 405 {
        prop_assert!(
            a.header("allow").is_some_and(|v| !v.is_empty()),
            "405 without Allow: {a:?}"
        );
    }
    if head {
        return Ok(());
    }
    let v: Value =
        serde_json::from_slice(&a.body).map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {a:?}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| TestCaseError::fail(format!("not an object: {a:?}")))?;
    if path.is_none() && success && obj.contains_key("openapi") {
        // The OpenAPI document, asked for by a target hyper read its own way.
        return Ok(());
    }
    // A log-in's token is at the top level too (RFC 6749 §5.1).
    let token_keys: &[&str] = if success && path == Some("/api/v1/auth/login") {
        prop_assert!(
            v["access_token"].is_string() && v["token_type"] == "bearer" && v["expires_in"].is_u64(),
            "a log-in answer without the token at the top level: {a:?}"
        );
        &["access_token", "token_type", "expires_in"]
    } else {
        &[]
    };
    prop_assert!(
        obj.keys()
            .all(|k| ["success", "message", "data", "error"].contains(&k.as_str())
                || token_keys.contains(&k.as_str())),
        "keys beyond the envelope: {a:?}"
    );
    prop_assert_eq!(obj.get("success"), Some(&Value::Bool(success)), "{:?}", a);
    prop_assert!(
        obj.get("message")
            .and_then(Value::as_str)
            .is_some_and(|m| !m.is_empty()),
        "no message: {a:?}"
    );
    prop_assert!(obj.contains_key("data"), "no data: {a:?}");
    let code = v["error"]["code"].as_str();
    if success {
        prop_assert!(!obj.contains_key("error"), "an error on a success: {a:?}");
    } else {
        prop_assert!(
            code.is_some_and(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')),
            "no error.code: {a:?}"
        );
    }
    Ok(())
}

/// The rules of a web page's answer: its security headers, a known type,
/// and redirects only to our own paths.
fn check_page(a: &Answer) -> Result<(), TestCaseError> {
    let csp = a.header("content-security-policy").unwrap_or("");
    prop_assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{a:?}"
    );
    prop_assert_eq!(a.header("x-content-type-options"), Some("nosniff"), "{:?}", a);
    let ct = a.header("content-type").unwrap_or("");
    prop_assert!(
        [
            "text/html; charset=utf-8",
            "text/css; charset=utf-8",
            "text/javascript; charset=utf-8",
            "application/json",
            "application/octet-stream",
            "text/plain; charset=utf-8",
        ]
        .contains(&ct),
        "{a:?}"
    );
    if a.status == 303 {
        let to = a.header("location").unwrap_or("");
        prop_assert!(to.starts_with('/') && !to.starts_with("//"), "{a:?}");
    }
    Ok(())
}

fn check_type(ct: Option<&str>, want: &str, a: &Answer) -> Result<(), TestCaseError> {
    prop_assert_eq!(ct, Some(want), "{:?}", a);
    Ok(())
}
