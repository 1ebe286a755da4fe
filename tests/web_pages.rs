//! The web pages (src/web) against the real store, accounts, sessions and
//! orchestrator, with the VM parts faked (tests/common/fakes.rs):
//!
//! - over HTTP (reqwest, cookies kept by hand so every flag is seen):
//!   session cookies and their flags, CSRF and Origin checks, expiry,
//!   revocation, rate limits, every page's headers, both languages;
//! - in Debian's chromium (fantoccini, headless): every validation error
//!   inline, a form posted from another origin refused, a revoked session
//!   sent to log-in, both languages, log-out then back shows no dashboard,
//!   and a tenant's page behind the real nginx front that cannot read or
//!   change the dashboard of a visitor who is logged in.
//!
//! Screenshots of the pages a browser test visits are written under
//! `<target>/test-artifacts/<test>/` when it fails; the dashboard's always.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fantoccini::Locator;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::browser::Browser;
use common::control::{Db, TestApi, TestDb};
use webhoster::api::ApiConfig;
use webhoster::api::ratelimit::{AuthLimits, Rate};
use webhoster::proxy::{ApiUpstream, ProxyOptions, Site};

const PASSWORD: &str = "password123";
const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";

// ---------------------------------------------------------------------------
// A visitor over plain HTTP

/// One browser's worth of cookies, with redirects left to the test.
struct Visitor {
    base: String,
    client: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

/// One answer, read whole.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    fn location(&self) -> &str {
        self.header("location")
    }

    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect()
    }

    fn set_cookie(&self, name: &str) -> Option<String> {
        self.set_cookies()
            .into_iter()
            .find(|c| c.starts_with(&format!("{name}=")))
    }

    /// The CSRF token of the page's forms.
    fn csrf(&self) -> String {
        let re = regex::Regex::new(r#"name="csrf" value="([0-9a-f]{64})""#).unwrap();
        re.captures(&self.body)
            .unwrap_or_else(|| panic!("no csrf field in: {}", self.body))[1]
            .to_owned()
    }

    /// The text of the element with `id` (the first tag carrying it).
    fn text_of(&self, id: &str) -> Option<String> {
        let re = regex::Regex::new(&format!(r#"(?s)id="{id}"[^>]*>(.*?)</"#)).unwrap();
        re.captures(&self.body).map(|c| c[1].trim().to_owned())
    }
}

impl Visitor {
    fn new(base: &str) -> Visitor {
        Visitor {
            base: base.to_owned(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> Got {
        let req = if self.cookies.is_empty() {
            req
        } else {
            req.header("cookie", self.cookie_header())
        };
        let resp = req.send().await.unwrap();
        let got = Got {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap(),
        };
        for c in got.set_cookies() {
            let first = c.split(';').next().unwrap();
            let (k, v) = first.split_once('=').unwrap();
            if v.is_empty() || c.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), v.to_owned());
            }
        }
        got
    }

    async fn get(&mut self, path: &str) -> Got {
        let req = self.client.get(format!("{}{path}", self.base));
        self.send(req).await
    }

    async fn get_with(&mut self, path: &str, headers: &[(&str, &str)]) -> Got {
        let mut req = self.client.get(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Got {
        self.post_with(path, form, &[]).await
    }

    async fn post_with(&mut self, path: &str, form: &[(&str, &str)], headers: &[(&str, &str)]) -> Got {
        let mut req = self.client.post(format!("{}{path}", self.base)).form(form);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    /// Signs `username` up through the pages.
    async fn sign_up(&mut self, username: &str) {
        let page = self.get("/signup").await;
        let email = format!("{username}@example.com");
        let got = self
            .post(
                "/signup",
                &[
                    ("csrf", &page.csrf()),
                    ("email", &email),
                    ("username", username),
                    ("password", PASSWORD),
                ],
            )
            .await;
        assert_eq!(got.status, 303, "{got:?}");
        assert!(got.location().starts_with("/login?n=welcome"), "{got:?}");
    }

    /// Logs in through the pages; returns the dashboard's CSRF token.
    async fn log_in(&mut self, login: &str, password: &str) -> String {
        let page = self.get("/login").await;
        let got = self
            .post(
                "/login",
                &[
                    ("csrf", &page.csrf()),
                    ("username", login),
                    ("password", password),
                ],
            )
            .await;
        assert_eq!(got.status, 303, "{got:?}");
        assert_eq!(got.location(), "/dashboard");
        let dash = self.get("/dashboard").await;
        assert_eq!(dash.status, 200, "{dash:?}");
        dash.csrf()
    }
}

async fn signed_up(api: &TestApi, username: &str) -> (Visitor, String) {
    let mut v = Visitor::new(&api.base);
    v.sign_up(username).await;
    let csrf = v.log_in(username, PASSWORD).await;
    (v, csrf)
}

// ---------------------------------------------------------------------------
// HTTP tests

async fn a_session_lives_from_log_in_to_log_out(db: Db) {
    let api = TestApi::start(db).await;
    let mut v = Visitor::new(&api.base);

    // Before log-in: the form cookie that carries the forms' CSRF token.
    let form = v.get("/login").await;
    assert_eq!(form.status, 200);
    let c = form.set_cookie("webhoster_form").expect("a form cookie");
    assert!(
        c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.contains("Path=/"),
        "{c}"
    );
    assert!(!c.contains("Secure"), "plain HTTP: {c}");

    v.sign_up("alice").await;
    let login = v.get("/login?n=welcome&username=alice").await;
    assert_eq!(
        login.text_of("notice").as_deref(),
        Some("Welcome! Your account is ready.")
    );
    assert!(
        login.body.contains(r#"value="alice""#),
        "the username is filled in"
    );
    let got = v
        .post(
            "/login",
            &[
                ("csrf", &login.csrf()),
                ("username", "alice@example.com"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(got.status, 303, "log-in by email: {got:?}");
    let session = got.set_cookie("webhoster_session").expect("a session cookie");
    assert!(
        session.contains("; Path=/")
            && session.contains("; HttpOnly")
            && session.contains("; SameSite=Lax")
            && session.contains("; Max-Age=604800"),
        "{session}"
    );
    assert!(!session.contains("Secure"));
    let token = v.cookies["webhoster_session"].clone();
    assert_eq!(token.len(), 64);

    let dash = v.get("/dashboard").await;
    assert_eq!(dash.status, 200);
    assert_eq!(dash.header("cache-control"), "no-store");
    assert!(dash.body.contains("id=\"create\""), "no hosting yet: one button");
    assert!(dash.body.contains(">alice<") || dash.body.contains("Log out"));

    // Log-out without the token is refused and changes nothing.
    let refused = v.post("/logout", &[("csrf", "0".repeat(64).as_str())]).await;
    assert_eq!(refused.status, 403);
    assert_eq!(v.get("/dashboard").await.status, 200);
    let out = v.post("/logout", &[("csrf", &dash.csrf())]).await;
    assert_eq!(out.status, 303);
    assert_eq!(out.location(), "/?n=logged_out");
    assert!(out.set_cookie("webhoster_session").unwrap().contains("Max-Age=0"));
    // The old token is dead even if a copy of the cookie is replayed.
    v.cookies.insert("webhoster_session".into(), token);
    let after = v.get("/dashboard").await;
    assert_eq!(after.status, 303);
    assert_eq!(after.location(), "/login?n=session_ended");
    api.stop().await;
}

async fn forms_from_another_site_or_without_the_token_change_nothing(db: Db) {
    let api = TestApi::start(db).await;
    let (mut v, csrf) = signed_up(&api, "bob").await;
    let user = api.store.user_by_login("bob").await.unwrap().unwrap().user;
    let version = user.token_version;
    let host = api.base.trim_start_matches("http://").to_owned();
    let ours = format!("http://{host}");
    let cases: [(&str, Vec<(&str, &str)>); 5] = [
        ("no token", vec![]),
        ("a wrong token", vec![]),
        ("another origin", vec![("origin", "http://evil.test")]),
        ("an opaque origin", vec![("origin", "null")]),
        (
            "cross-site fetch metadata",
            vec![("sec-fetch-site", "cross-site")],
        ),
    ];
    for (what, headers) in cases {
        let token = match what {
            "no token" => "",
            "a wrong token" => "ab".repeat(32).leak(),
            _ => csrf.as_str(),
        };
        let got = v
            .post_with("/settings/logout-all", &[("csrf", token)], &headers)
            .await;
        assert_eq!(got.status, 403, "{what}: {got:?}");
        assert!(got.body.contains("came from another site"), "{what}");
        let got = v
            .post_with(
                "/settings/keys/add",
                &[("csrf", token), ("public_key", ED25519)],
                &headers,
            )
            .await;
        assert_eq!(got.status, 403, "{what}");
    }
    let still = api.store.user_by_login("bob").await.unwrap().unwrap().user;
    assert_eq!(still.token_version, version, "nothing was revoked");
    assert!(api.hosting.store().user_by_id(user.id).await.unwrap().is_some());
    let settings = v.get("/settings").await;
    assert_eq!(settings.status, 200, "still logged in");
    assert!(settings.body.contains("id=\"no-keys\""), "no key was added");

    // The same post from our own origin works.
    let ok = v
        .post_with(
            "/settings/keys/add",
            &[("csrf", &csrf), ("public_key", ED25519)],
            &[("origin", &ours), ("sec-fetch-site", "same-origin")],
        )
        .await;
    assert_eq!(ok.status, 303, "{ok:?}");
    assert_eq!(ok.location(), "/settings?n=key_added");

    // Log-in and sign-up forms need their cookie's token too.
    let mut stranger = Visitor::new(&api.base);
    let got = stranger
        .post(
            "/login",
            &[
                ("csrf", &"cd".repeat(32)),
                ("username", "bob"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(got.status, 403);
    assert!(got.set_cookie("webhoster_session").is_none());
    api.stop().await;
}

both_backends!(
    a_session_lives_from_log_in_to_log_out,
    forms_from_another_site_or_without_the_token_change_nothing
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_refused() {
    let db = TestDb::new(Db::Sqlite).await;
    let api = TestApi::start_with_config(
        db,
        ApiConfig {
            public_host: Some("example.test".into()),
            auth_limits: AuthLimits::OFF,
            session_ttl: Duration::from_secs(1),
            ..ApiConfig::default()
        },
    )
    .await;
    let (mut v, _) = signed_up(&api, "carol").await;
    assert_eq!(v.get("/settings").await.status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let got = v.get("/settings").await;
    assert_eq!(got.status, 303);
    assert_eq!(got.location(), "/login?n=session_ended");
    assert!(got.set_cookie("webhoster_session").unwrap().contains("Max-Age=0"));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_out_everywhere_and_a_new_password_end_the_other_sessions() {
    let api = TestApi::start(Db::Sqlite).await;
    let (mut a, csrf_a) = signed_up(&api, "dave").await;
    let mut b = Visitor::new(&api.base);
    let csrf_b = b.log_in("dave", PASSWORD).await;
    let bearer = api.login("dave").await;

    // A new password: the other browser and the API token stop working;
    // this browser gets a new session.
    let wrong = a
        .post(
            "/settings/password",
            &[
                ("csrf", &csrf_a),
                ("current_password", "not it at all"),
                ("new_password", "new password 1"),
            ],
        )
        .await;
    assert_eq!(wrong.status, 403);
    assert_eq!(
        wrong.text_of("current_password-error").as_deref(),
        Some("This password is not right.")
    );
    let short = a
        .post(
            "/settings/password",
            &[
                ("csrf", &csrf_a),
                ("current_password", PASSWORD),
                ("new_password", "short"),
            ],
        )
        .await;
    assert_eq!(short.status, 422);
    assert!(short.text_of("new_password-error").unwrap().contains("8 to 1024"));
    let changed = a
        .post(
            "/settings/password",
            &[
                ("csrf", &csrf_a),
                ("current_password", PASSWORD),
                ("new_password", "new password 1"),
            ],
        )
        .await;
    assert_eq!(changed.status, 303, "{changed:?}");
    assert_eq!(changed.location(), "/settings?n=password_changed");
    assert!(changed.set_cookie("webhoster_session").is_some());
    let settings = a.get("/settings").await;
    assert_eq!(settings.status, 200, "this browser stays in");
    assert_eq!(
        settings.text_of("notice").as_deref(),
        None,
        "the notice is only on the redirect's page"
    );
    let gone = b.get("/dashboard").await;
    assert_eq!(gone.status, 303, "the other browser is out");
    let (s, _) = api
        .call(reqwest::Method::GET, "/api/v1/auth/me", Some(&bearer), None)
        .await;
    assert_eq!(s, 401, "the API token is revoked");
    // Its stale form token cannot do anything either.
    let stale = b.post("/settings/logout-all", &[("csrf", &csrf_b)]).await;
    assert_eq!(stale.status, 303);
    assert!(stale.location().starts_with("/login"));

    // Log out everywhere, from a second session: the first is sent to log-in.
    let mut c = Visitor::new(&api.base);
    let csrf_c = c.log_in("dave", "new password 1").await;
    let settings = a.get("/settings").await;
    let out = c.post("/settings/logout-all", &[("csrf", &csrf_c)]).await;
    assert_eq!(out.status, 303);
    assert_eq!(out.location(), "/login?n=logged_out_all");
    let refused = a.get("/dashboard").await;
    assert_eq!(refused.status, 303);
    assert_eq!(refused.location(), "/login?n=session_ended");
    let refused = a
        .post(
            "/settings/keys/add",
            &[("csrf", &settings.csrf()), ("public_key", ED25519)],
        )
        .await;
    assert_eq!(refused.status, 303);
    assert!(refused.location().starts_with("/login"));
    assert_eq!(c.get("/dashboard").await.status, 303);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_and_sign_up_have_the_apis_rate_limits() {
    let db = TestDb::new(Db::Sqlite).await;
    let api = TestApi::start_with_limits(
        db,
        AuthLimits {
            per_ip: None,
            per_account: Some(Rate {
                burst: 2,
                per_minute: 1,
            }),
        },
    )
    .await;
    let mut v = Visitor::new(&api.base);
    v.sign_up("erin").await;
    let mut last = None;
    for _ in 0..3 {
        let page = v.get("/login").await;
        last = Some(
            v.post(
                "/login",
                &[
                    ("csrf", &page.csrf()),
                    ("username", "erin"),
                    ("password", "wrong password"),
                ],
            )
            .await,
        );
    }
    let got = last.unwrap();
    assert_eq!(got.status, 429, "{got:?}");
    assert_eq!(
        got.text_of("alert").as_deref(),
        Some("Too many attempts. Wait a minute and try again.")
    );
    assert!(got.body.contains(r#"value="erin""#), "the login is kept");
    api.stop().await;

    let db = TestDb::new(Db::Sqlite).await;
    let api = TestApi::start_with_limits(
        db,
        AuthLimits {
            per_ip: Some(Rate {
                burst: 1,
                per_minute: 1,
            }),
            per_account: None,
        },
    )
    .await;
    let mut v = Visitor::new(&api.base);
    v.sign_up("frank").await;
    let page = v.get("/signup").await;
    let got = v
        .post(
            "/signup",
            &[
                ("csrf", &page.csrf()),
                ("email", "g@example.com"),
                ("username", "grace"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(got.status, 429);
    assert!(got.body.contains(r#"value="g@example.com""#));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_has_the_headers_and_the_api_keeps_its_paths() {
    let api = TestApi::start(Db::Sqlite).await;
    let mut v = Visitor::new(&api.base);
    for path in [
        "/",
        "/signup",
        "/login",
        "/no-such-page-is-api",
        "/dashboard/nope",
    ] {
        let got = v.get(path).await;
        if path == "/no-such-page-is-api" {
            // Not a page: the API's 404 envelope.
            assert_eq!(got.status, 404);
            let body: Value = serde_json::from_str(&got.body).unwrap();
            assert_eq!(body["error"]["code"], "not_found");
            continue;
        }
        assert!(got.status == 200 || got.status == 404, "{path}: {got:?}");
        let csp = got.header("content-security-policy");
        assert!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"));
        assert_eq!(got.header("x-content-type-options"), "nosniff");
        assert_eq!(got.header("referrer-policy"), "strict-origin-when-cross-origin");
        assert_eq!(got.header("cache-control"), "no-store", "{path}");
        assert!(!got.body.contains("<script>"), "no inline script: {path}");
    }
    let health = v.get("/api/v1/health").await;
    assert_eq!(health.status, 200);
    assert!(health.header("content-type").starts_with("application/json"));
    let css = v.get("/assets/site.css").await;
    let js = v.get("/assets/site.js").await;
    assert_eq!(css.status, 200);
    assert!(css.header("content-type").starts_with("text/css"));
    assert!(js.header("content-type").starts_with("text/javascript"));
    assert!(css.header("cache-control").contains("immutable"));
    assert!(css.body.len() + js.body.len() < 50_000);
    // Over TLS (as the front says from loopback) cookies are Secure.
    let tls = v.get_with("/login", &[("x-forwarded-proto", "https")]).await;
    let form = tls.set_cookie("webhoster_form");
    assert!(
        form.is_none() || form.as_deref().unwrap().ends_with("; Secure"),
        "{form:?}"
    );
    let mut fresh = Visitor::new(&api.base);
    let tls = fresh.get_with("/login", &[("x-forwarded-proto", "https")]).await;
    assert!(tls.set_cookie("webhoster_form").unwrap().ends_with("; Secure"));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_languages_come_from_the_header_and_the_switch() {
    let api = TestApi::start(Db::Sqlite).await;
    let mut v = Visitor::new(&api.base);
    let ko = v
        .get_with("/", &[("accept-language", "ko-KR,ko;q=0.9,en;q=0.5")])
        .await;
    assert!(ko.body.contains(r#"<html lang="ko">"#));
    assert!(ko.body.contains("나만의 가상 머신에서 돌아가는 웹사이트"));
    let en = v.get_with("/", &[("accept-language", "en-US,en;q=0.9")]).await;
    assert!(en.body.contains(r#"<html lang="en">"#));
    assert!(en.body.contains("Your website, in a VM of its own"));
    let switch = v
        .get_with("/lang/ko?back=/login", &[("accept-language", "en")])
        .await;
    assert_eq!(switch.status, 303);
    assert_eq!(switch.location(), "/login");
    let login = v.get_with("/login", &[("accept-language", "en")]).await;
    assert!(
        login.body.contains(r#"<html lang="ko">"#),
        "the switch beats the header"
    );
    assert!(login.body.contains("이메일 또는 사용자 이름"));
    // The switch never sends anyone off-site.
    let evil = v.get("/lang/en?back=//evil.test/").await;
    assert_eq!(evil.location(), "/");
    assert_eq!(v.get("/lang/xx").await.status, 404);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_creates_watches_and_manages_the_site() {
    let api = TestApi::start(Db::Sqlite).await;
    api.world.delay_on("net.add_forward", Duration::from_millis(1500));
    let (mut v, csrf) = signed_up(&api, "heidi").await;

    let bad = v
        .post(
            "/dashboard/create",
            &[("csrf", &csrf), ("ssh_public_key", "ssh-rsa nope")],
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(
        bad.text_of("ssh_public_key-error")
            .unwrap()
            .contains("not an SSH public key")
    );
    assert!(bad.body.contains("ssh-rsa nope"), "the value is kept");

    let started = Instant::now();
    let created = v.post("/dashboard/create", &[("csrf", &csrf)]).await;
    assert_eq!(created.status, 303, "{created:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "the page does not wait for the guest"
    );
    assert_eq!(created.location(), "/dashboard?n=created");

    // While it is created: the progress bar and the step.
    let dash = v.get("/dashboard?n=created").await;
    assert!(dash.body.contains("id=\"progress\""), "{}", dash.body);
    assert_eq!(dash.text_of("state").as_deref(), Some("Being created"));
    // The step shows once the create task took its first one (the guest
    // is held at `forward` for 1.5 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    let dash = loop {
        let dash = v.get("/dashboard").await;
        let step = dash.text_of("step").unwrap_or_default();
        if step.starts_with("Step 4 of 8") {
            break dash;
        }
        assert!(Instant::now() < deadline, "never at the forward step: {step:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dash.text_of("step").unwrap(), "Step 4 of 8: Opening the SSH port");
    assert!(
        dash.body
            .contains(r#"<progress id="progress" max="8" value="3">"#),
        "{}",
        dash.body
    );
    assert!(
        dash.body.contains("id=\"download-key\""),
        "the generated key is offered"
    );
    assert!(
        dash.body
            .contains(r#"<noscript><meta http-equiv="refresh" content="3"></noscript>"#),
        "without JavaScript the page reloads itself"
    );
    let status: Value = serde_json::from_str(&v.get("/dashboard/status").await.body).unwrap();
    assert_eq!(status["state"], "creating");
    assert_eq!(status["steps_total"], 8);
    assert!(status["step_done"].as_u64().unwrap() < 8);

    // The key, once.
    let key = v.post("/dashboard/key", &[("csrf", &csrf)]).await;
    assert_eq!(key.status, 200);
    assert!(key.header("content-disposition").starts_with("attachment;"));
    assert_eq!(key.header("cache-control"), "no-store");
    assert!(key.body.contains("BEGIN OPENSSH PRIVATE KEY"));
    let again = v.post("/dashboard/key", &[("csrf", &csrf)]).await;
    assert_eq!(again.location(), "/dashboard?n=key_gone");

    // Running: every detail.
    let deadline = Instant::now() + Duration::from_secs(20);
    let dash = loop {
        let dash = v.get("/dashboard").await;
        if dash.text_of("state").as_deref() == Some("Running") {
            break dash;
        }
        assert!(Instant::now() < deadline, "never running: {}", dash.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let user_id = api.store.user_by_login("heidi").await.unwrap().unwrap().user.id;
    let h = api.hosting.get(user_id).await.unwrap();
    assert!(!dash.body.contains("id=\"progress\""));
    assert!(
        !dash.body.contains("http-equiv=\"refresh\""),
        "a settled page stays put"
    );
    assert!(dash.body.contains(&format!(
        r#"id="site-link" href="http://example.test/{user_id}/""#
    )));
    assert_eq!(
        dash.text_of("ssh-command").unwrap(),
        format!("ssh -p {} ubuntu@example.test", h.ssh_port)
    );
    assert_eq!(
        dash.text_of("sftp-command").unwrap(),
        format!("sftp -P {} ubuntu@example.test", h.ssh_port)
    );
    assert_eq!(dash.text_of("ip").unwrap(), h.vm_ip);
    assert_eq!(dash.text_of("port").unwrap(), h.ssh_port.to_string());
    assert!(dash.text_of("uptime").unwrap().ends_with("min"));
    assert!(dash.body.contains("id=\"console\""));
    assert!(dash.body.contains("id=\"usage\""));
    let css = v.get("/assets/site.css").await.body.len();
    let js = v.get("/assets/site.js").await.body.len();
    eprintln!(
        "page weight of the dashboard (running, fake console, no charts): HTML {} + CSS {css} + JS {js} = {} bytes",
        dash.body.len(),
        dash.body.len() + css + js
    );

    // Stop, start, restart.
    for (action, notice, state) in [
        ("stop", "/dashboard?n=stopped", "Stopped"),
        ("start", "/dashboard?n=started", "Running"),
        ("restart", "/dashboard?n=restarted", "Running"),
    ] {
        let got = v
            .post("/dashboard/action", &[("csrf", &csrf), ("action", action)])
            .await;
        assert_eq!(got.location(), notice, "{action}: {got:?}");
        let dash = v.get(notice).await;
        assert_eq!(dash.text_of("state").as_deref(), Some(state), "{action}");
    }

    // Delete: first the confirmation, then gone.
    let ask = v
        .post("/dashboard/action", &[("csrf", &csrf), ("action", "delete")])
        .await;
    assert_eq!(ask.location(), "/dashboard/delete");
    assert!(
        api.hosting.get(user_id).await.is_ok(),
        "not deleted without confirming"
    );
    let confirm = v.get("/dashboard/delete").await;
    assert!(confirm.body.contains("id=\"confirm\""));
    let deleted = v
        .post(
            "/dashboard/action",
            &[
                ("csrf", &confirm.csrf()),
                ("action", "delete"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(deleted.location(), "/dashboard?n=deleted");
    assert!(api.hosting.get(user_id).await.is_err());
    assert!(v.get("/dashboard").await.body.contains("id=\"create\""));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_manage_keys_and_delete_the_account() {
    let api = TestApi::start(Db::Sqlite).await;
    let (mut v, csrf) = signed_up(&api, "ivan").await;
    let bad = v
        .post(
            "/settings/keys/add",
            &[("csrf", &csrf), ("public_key", "not a key")],
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(
        bad.text_of("public_key-error")
            .unwrap()
            .contains("not an SSH public key")
    );
    assert!(bad.body.contains(">not a key</textarea>"));
    let added = v
        .post("/settings/keys/add", &[("csrf", &csrf), ("public_key", ED25519)])
        .await;
    assert_eq!(added.location(), "/settings?n=key_added");
    let again = v
        .post("/settings/keys/add", &[("csrf", &csrf), ("public_key", ED25519)])
        .await;
    assert_eq!(again.status, 409);
    assert!(
        again
            .text_of("public_key-error")
            .unwrap()
            .contains("already on your account")
    );
    let page = v.get("/settings").await;
    assert!(page.body.contains("SHA256:"));
    let id = regex::Regex::new(r#"name="key_id" value="(\d+)""#)
        .unwrap()
        .captures(&page.body)
        .unwrap()[1]
        .to_owned();
    let removed = v
        .post("/settings/keys/remove", &[("csrf", &csrf), ("key_id", &id)])
        .await;
    assert_eq!(removed.location(), "/settings?n=key_removed");
    assert!(v.get("/settings").await.body.contains("id=\"no-keys\""));

    // Delete the account: the box, then the password.
    let unticked = v
        .post("/settings/delete", &[("csrf", &csrf), ("password", PASSWORD)])
        .await;
    assert_eq!(unticked.status, 422);
    assert_eq!(
        unticked.text_of("delete_confirm-error").as_deref(),
        Some("Tick the box to confirm.")
    );
    let wrong = v
        .post(
            "/settings/delete",
            &[("csrf", &csrf), ("password", "wrong one"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(wrong.status, 403);
    assert_eq!(
        wrong.text_of("delete_password-error").as_deref(),
        Some("This password is not right.")
    );
    assert!(api.store.user_by_login("ivan").await.unwrap().is_some());
    let gone = v
        .post(
            "/settings/delete",
            &[("csrf", &csrf), ("password", PASSWORD), ("confirm", "yes")],
        )
        .await;
    assert_eq!(gone.location(), "/?n=account_deleted");
    assert!(api.store.user_by_login("ivan").await.unwrap().is_none());
    assert_eq!(v.get("/dashboard").await.status, 303);
    api.stop().await;
}

// ---------------------------------------------------------------------------
// Browser tests

/// Waits up to 20 s for the element `id`.
async fn element(b: &Browser, id: &str) -> fantoccini::elements::Element {
    b.client()
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("no #{id} on the page: {e}"))
}

/// The text of `id`, once it exists.
async fn text(b: &Browser, id: &str) -> String {
    element(b, id).await.text().await.unwrap()
}

/// Waits until `id`'s text is `want` (20 s).
async fn wait_text(b: &Browser, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = match b.client().find(Locator::Id(id)).await {
            Ok(el) => el.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "#{id} is {got:?}, never {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn value(b: &Browser, id: &str) -> String {
    element(b, id)
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default()
}

async fn fill(b: &Browser, id: &str, text: &str) {
    let el = element(b, id).await;
    el.clear().await.unwrap();
    if !text.is_empty() {
        el.send_keys(text).await.unwrap();
    }
}

/// Clicks `button` and waits for the next page to have `then`.
async fn click_to(b: &mut Browser, button: &str, then: &str, shot: &str) {
    let old = b.client().find(Locator::Css("html")).await.unwrap();
    element(b, button).await.click().await.unwrap();
    // The next page has loaded when the old one's root is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    while old.tag_name().await.is_ok() {
        assert!(Instant::now() < deadline, "clicking #{button} loaded no page");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    element(b, then).await;
    b.shot(shot).await;
}

async fn path_of(b: &Browser) -> String {
    let url = b.client().current_url().await.unwrap();
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    }
}

async fn visit(b: &mut Browser, url: &str, shot: &str) {
    b.client().goto(url).await.unwrap();
    b.shot(shot).await;
}

async fn browser_log_in(b: &mut Browser, base: &str, login: &str) {
    visit(b, &format!("{base}/login"), "login").await;
    fill(b, "username", login).await;
    fill(b, "password", PASSWORD).await;
    click_to(b, "submit", "nav-settings", "logged-in").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_browser_every_validation_error_shows_next_to_its_field() {
    let api = TestApi::start(Db::Sqlite).await;
    api.register("taken").await;
    let mut b = Browser::start("web_pages-validation", Some("en-US,en")).await;
    let base = api.base.clone();

    // Sign-up: empty, then malformed, then taken; values kept, never the password.
    visit(&mut b, &format!("{base}/signup"), "signup").await;
    click_to(&mut b, "submit", "email-error", "signup-empty").await;
    assert_eq!(
        text(&b, "email-error").await,
        "Enter a valid email address, like name@example.com."
    );
    assert_eq!(
        text(&b, "username-error").await,
        "Use 3 to 32 characters: lowercase letters, digits, _ and -."
    );
    assert_eq!(
        text(&b, "password-error").await,
        "The password must be 8 to 1024 characters long."
    );
    fill(&b, "email", "not-an-email").await;
    fill(&b, "username", "Bad Name").await;
    fill(&b, "password", "short").await;
    click_to(&mut b, "submit", "email-error", "signup-malformed").await;
    assert_eq!(value(&b, "email").await, "not-an-email");
    assert_eq!(value(&b, "username").await, "Bad Name");
    assert_eq!(value(&b, "password").await, "", "the password is never sent back");
    assert!(text(&b, "email-error").await.starts_with("Enter a valid email"));
    assert!(text(&b, "username-error").await.starts_with("Use 3 to 32"));
    assert!(
        text(&b, "password-error")
            .await
            .starts_with("The password must be")
    );
    let invalid = element(&b, "email").await.attr("aria-invalid").await.unwrap();
    assert_eq!(invalid.as_deref(), Some("true"));
    fill(&b, "email", "new@example.com").await;
    fill(&b, "username", "taken").await;
    fill(&b, "password", PASSWORD).await;
    click_to(&mut b, "submit", "username-error", "signup-taken").await;
    assert_eq!(text(&b, "username-error").await, "This username is taken.");
    assert_eq!(text(&b, "email-error").await, "");
    assert_eq!(value(&b, "email").await, "new@example.com");
    fill(&b, "email", "taken@example.com").await;
    fill(&b, "username", "fresh").await;
    fill(&b, "password", PASSWORD).await;
    click_to(&mut b, "submit", "email-error", "signup-email-taken").await;
    assert_eq!(
        text(&b, "email-error").await,
        "An account with this email already exists."
    );

    // Log-in: empty, then wrong; the login is kept.
    visit(&mut b, &format!("{base}/login"), "login").await;
    click_to(&mut b, "submit", "username-error", "login-empty").await;
    assert_eq!(text(&b, "username-error").await, "This field is required.");
    assert_eq!(text(&b, "password-error").await, "This field is required.");
    fill(&b, "username", "taken").await;
    fill(&b, "password", "wrong password").await;
    click_to(&mut b, "submit", "password-error", "login-wrong").await;
    assert_eq!(
        text(&b, "password-error").await,
        "Wrong email, username or password."
    );
    assert_eq!(value(&b, "username").await, "taken");
    assert_eq!(value(&b, "password").await, "");

    // The forms behind the log-in.
    fill(&b, "password", PASSWORD).await;
    click_to(&mut b, "submit", "create", "dashboard-empty").await;
    element(&b, "ssh_public_key").await; // inside a closed <details>
    b.client()
        .execute("document.querySelector('details').open = true", vec![])
        .await
        .unwrap();
    fill(&b, "ssh_public_key", "ssh-ed25519 garbage").await;
    click_to(&mut b, "create", "ssh_public_key-error", "create-bad-key").await;
    assert_eq!(
        text(&b, "ssh_public_key-error").await,
        "This is not an SSH public key webhoster accepts."
    );
    assert_eq!(value(&b, "ssh_public_key").await, "ssh-ed25519 garbage");

    visit(&mut b, &format!("{base}/settings"), "settings").await;
    fill(&b, "public_key", "not a key").await;
    click_to(&mut b, "add-key", "public_key-error", "settings-bad-key").await;
    assert_eq!(
        text(&b, "public_key-error").await,
        "This is not an SSH public key webhoster accepts."
    );
    assert_eq!(value(&b, "public_key").await, "not a key");
    fill(&b, "current_password", "wrong password").await;
    fill(&b, "new_password", "a good new password").await;
    click_to(
        &mut b,
        "change-password",
        "current_password-error",
        "settings-wrong-password",
    )
    .await;
    assert_eq!(
        text(&b, "current_password-error").await,
        "This password is not right."
    );
    fill(&b, "current_password", PASSWORD).await;
    fill(&b, "new_password", "short").await;
    click_to(
        &mut b,
        "change-password",
        "new_password-error",
        "settings-short-password",
    )
    .await;
    assert_eq!(
        text(&b, "new_password-error").await,
        "The password must be 8 to 1024 characters long."
    );
    fill(&b, "delete_password", PASSWORD).await;
    click_to(
        &mut b,
        "delete-account-button",
        "delete_confirm-error",
        "settings-delete-unticked",
    )
    .await;
    assert_eq!(text(&b, "delete_confirm-error").await, "Tick the box to confirm.");
    assert!(api.store.user_by_login("taken").await.unwrap().is_some());
    b.close().await;
    api.stop().await;
}

/// A page on another origin (another port) whose form posts to the
/// dashboard's "log out everywhere" as soon as it loads.
async fn evil_site(target: &str) -> SocketAddr {
    let page = format!(
        r#"<!doctype html><meta charset="utf-8"><title>evil</title>
<form id="f" method="post" action="{target}/settings/logout-all">
<input type="hidden" name="csrf" value="">
</form>
<script>document.getElementById('f').submit();</script>"#
    );
    serve_page(page, None).await
}

/// Serves `html` to every request (one per connection), with `csp` if set.
async fn serve_page(html: String, csp: Option<&'static str>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let csp = csp
                    .map(|c| format!("Content-Security-Policy: {c}\r\n"))
                    .unwrap_or_default();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n{csp}Content-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_browser_a_form_from_another_origin_is_refused() {
    let api = TestApi::start(Db::Sqlite).await;
    api.register("judy").await;
    let version = api
        .store
        .user_by_login("judy")
        .await
        .unwrap()
        .unwrap()
        .user
        .token_version;
    let mut b = Browser::start("web_pages-cross-origin", Some("en-US,en")).await;
    browser_log_in(&mut b, &api.base, "judy").await;

    let evil = evil_site(&api.base).await;
    visit(&mut b, &format!("http://{evil}/"), "evil").await;
    // The post reached us and was refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    while path_of(&b).await != "/settings/logout-all" {
        assert!(
            Instant::now() < deadline,
            "the evil form never posted: {}",
            path_of(&b).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.shot("refused").await;
    assert_eq!(text(&b, "error-title").await, "Request refused");
    let user = api.store.user_by_login("judy").await.unwrap().unwrap().user;
    assert_eq!(user.token_version, version, "nothing was revoked");
    visit(&mut b, &format!("{}/dashboard", api.base), "still-in").await;
    assert_eq!(path_of(&b).await, "/dashboard", "still logged in");
    element(&b, "create").await;
    b.close().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_browser_a_revoked_session_is_sent_to_log_in() {
    let api = TestApi::start(Db::Sqlite).await;
    api.register("kim").await;
    let mut b = Browser::start("web_pages-revoked", Some("en-US,en")).await;
    browser_log_in(&mut b, &api.base, "kim").await;
    assert_eq!(path_of(&b).await, "/dashboard");

    // Another session logs out everywhere.
    let mut other = Visitor::new(&api.base);
    let csrf = other.log_in("kim", PASSWORD).await;
    let got = other.post("/settings/logout-all", &[("csrf", &csrf)]).await;
    assert_eq!(got.status, 303);

    visit(&mut b, &format!("{}/settings", api.base), "after-revocation").await;
    assert_eq!(path_of(&b).await, "/login?n=session_ended");
    assert_eq!(text(&b, "notice").await, "Your session has ended. Log in again.");
    let cookies = b.client().get_all_cookies().await.unwrap();
    assert!(
        !cookies.iter().any(|c| c.name() == "webhoster_session"),
        "{cookies:?}"
    );
    b.close().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_browser_both_languages_render() {
    let api = TestApi::start(Db::Sqlite).await;
    api.register("lee").await;
    let mut b = Browser::start("web_pages-languages", Some("ko-KR,ko")).await;
    visit(&mut b, &format!("{}/", api.base), "home-ko").await;
    let lang = b
        .client()
        .execute("return document.documentElement.lang", vec![])
        .await
        .unwrap();
    assert_eq!(lang, "ko", "from Accept-Language");
    assert_eq!(
        text(&b, "home-title").await,
        "나만의 가상 머신에서 돌아가는 웹사이트"
    );
    assert_eq!(text(&b, "go-signup").await, "계정 만들기");
    browser_log_in(&mut b, &api.base, "lee").await;
    assert_eq!(text(&b, "create").await, "내 사이트 만들기");
    b.keep();

    // The switch: English from here on, whatever the header says.
    click_to(&mut b, "lang-en", "create", "dashboard-en").await;
    let lang = b
        .client()
        .execute("return document.documentElement.lang", vec![])
        .await
        .unwrap();
    assert_eq!(lang, "en");
    assert_eq!(text(&b, "create").await, "Create my site");
    visit(&mut b, &format!("{}/settings", api.base), "settings-en").await;
    assert_eq!(text(&b, "keys-title").await, "SSH keys");
    click_to(&mut b, "lang-ko", "keys-title", "settings-ko").await;
    assert_eq!(text(&b, "keys-title").await, "SSH 키");
    assert_eq!(
        path_of(&b).await,
        "/settings",
        "the switch comes back to the page"
    );
    b.close().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_browser_the_dashboard_follows_a_create_and_log_out_leaves_nothing_behind() {
    let api = TestApi::start(Db::Sqlite).await;
    api.register("mia").await;
    // The guest "boots" slowly enough to watch the progress bar.
    api.world.delay_on("net.add_forward", Duration::from_secs(3));
    let mut b = Browser::start("web_pages-dashboard", Some("en-US,en")).await;
    browser_log_in(&mut b, &api.base, "mia").await;
    click_to(&mut b, "create", "progress", "dashboard-creating").await;
    assert_eq!(text(&b, "state").await, "Being created");
    // The script follows the steps without a reload.
    wait_text(&b, "step", "Step 4 of 8: Opening the SSH port").await;
    let value = b
        .client()
        .execute("return document.getElementById('progress').value", vec![])
        .await
        .unwrap();
    assert_eq!(value, 3);
    b.shot("dashboard-mid-create").await;
    element(&b, "download-key").await;
    // ...and reloads when the site is up.
    wait_text(&b, "state", "Running").await;
    element(&b, "site-link").await;
    b.shot("dashboard-running").await;
    let ssh = text(&b, "ssh-command").await;
    assert!(ssh.starts_with("ssh -p "), "{ssh}");
    let copy = element(&b, "ssh-command").await;
    drop(copy);
    let copy_hidden = b
        .client()
        .execute("return document.querySelector('button.copy').hidden", vec![])
        .await
        .unwrap();
    assert_eq!(copy_hidden, false, "the script shows the copy buttons");
    let bytes = b
        .client()
        .execute("return document.documentElement.outerHTML.length", vec![])
        .await
        .unwrap();
    eprintln!("dashboard HTML: {bytes} characters");
    assert!(
        b.client().find(Locator::Id("notice")).await.is_err(),
        "the reload drops the create's notice"
    );
    // At phone width: nothing wider than the screen.
    b.client().set_window_size(375, 900).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.shot("dashboard-phone").await;
    let fits = b
        .client()
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(fits, true, "the dashboard scrolls sideways at 375 px");
    let dir = b.keep();
    eprintln!("dashboard screenshots: {}", dir.display());

    // Log out; the back button shows no dashboard.
    click_to(&mut b, "logout", "notice", "logged-out").await;
    assert_eq!(text(&b, "notice").await, "You are logged out.");
    b.client().back().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.shot("after-back").await;
    let path = path_of(&b).await;
    assert!(path.starts_with("/login"), "back went to {path}");
    let html = b.client().source().await.unwrap();
    assert!(
        !html.contains("id=\"ssh-command\""),
        "the dashboard is not shown again"
    );
    assert!(!html.contains("id=\"nav-settings\""));
    b.close().await;
    api.stop().await;
}

// ---------------------------------------------------------------------------
// The tenant wall: the dashboard and the tenants' sites share the front's
// origin in path mode (`http://<host>/<user_id>/`).

/// The real nginx front in a state dir of its own, with the service's API
/// and pages behind it; stopped before the dir goes, even on panic.
struct Front {
    tmp: tempfile::TempDir,
    port: u16,
}

impl Front {
    async fn start(api: SocketAddr, sites: &[Site]) -> (Front, webhoster::proxy::Proxy) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::Builder::new().prefix("whwebfront-").tempdir().unwrap();
        // nginx workers run unprivileged: they must be able to look below.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let front = Front { tmp, port };
        let mut opts = ProxyOptions::new(
            front.tmp.path().join("nginx"),
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        );
        opts.workers = Some(1);
        opts.api = Some(ApiUpstream {
            addr: api,
            read_timeout: Duration::from_secs(30),
        });
        let proxy = webhoster::proxy::Proxy::start(opts)
            .await
            .expect("the front starts");
        for site in sites {
            proxy.add_site(site).await.expect("the site is published");
        }
        (front, proxy)
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Err(e) = webhoster::proxy::stop(&self.tmp.path().join("nginx"), Duration::from_secs(10)) {
            eprintln!("stopping the test nginx: {e}");
        }
    }
}

/// The tenant's page: it tries to read the dashboard, to call the API with
/// the visitor's credentials, and to post the dashboard's forms (by fetch
/// and by a real form into a hidden frame), then writes what it got into
/// `#results`.
const TENANT_PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>tenant</title>
<body><p>a tenant's site</p>
<iframe name="sink" id="sink"></iframe>
<script>
async function attempt(how) {
  try { const got = String(await how()); return { outcome: 'read: ' + got.slice(0, 200), text: got }; }
  catch (e) { return { outcome: 'failed: ' + e.name + ': ' + e.message, text: '' }; }
}
(async () => {
  const r = { origin: self.origin };
  r.dashboard = await attempt(async () => (await fetch('/dashboard', { credentials: 'include' })).text());
  r.me = await attempt(async () => (await fetch('/api/v1/auth/me', { credentials: 'include' })).text());
  r.post = await attempt(async () => {
    const resp = await fetch('/settings/logout-all', { method: 'POST', credentials: 'include',
      body: new URLSearchParams({ csrf: 'guess' }) });
    return resp.status + ' ' + (await resp.text());
  });
  r.nocors = await attempt(async () => {
    const resp = await fetch('/settings/keys/add', { method: 'POST', mode: 'no-cors', credentials: 'include',
      body: new URLSearchParams({ csrf: '', public_key: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl tenant' }) });
    return resp.type;
  });
  const f = document.createElement('form');
  f.method = 'post'; f.action = '/settings/logout-all'; f.target = 'sink';
  const i = document.createElement('input'); i.name = 'csrf'; i.value = ''; f.appendChild(i);
  document.body.appendChild(f);
  f.submit();
  await new Promise(res => setTimeout(res, 1500));
  const out = document.createElement('pre');
  out.id = 'results';
  out.textContent = JSON.stringify(r);
  document.body.appendChild(out);
})();
</script>
</body>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_page_cannot_read_or_change_the_dashboard_of_a_visitor() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let api = TestApi::start(Db::Sqlite).await;
    api.register("nina").await;
    let user = api.store.user_by_login("nina").await.unwrap().unwrap().user;
    let tenant = match serve_page(TENANT_PAGE.to_owned(), None).await {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };
    let (front, _proxy) = Front::start(
        api.addr,
        &[Site {
            user_id: 77,
            username: "tenant".into(),
            upstream: tenant,
        }],
    )
    .await;
    let base = front.base();
    // Through the front, `/` and the pages are the service's, with one of
    // each security header.
    let mut v = Visitor::new(&base);
    let home = v.get("/").await;
    assert_eq!(home.status, 200);
    assert!(
        home.body.contains("id=\"home-title\""),
        "the web home, not the landing page"
    );
    let login = v.get("/login").await;
    for name in [
        "x-frame-options",
        "x-content-type-options",
        "referrer-policy",
        "content-security-policy",
    ] {
        assert_eq!(
            login.headers.get_all(name).iter().count(),
            1,
            "{name}: {:?}",
            login.headers
        );
    }
    assert_eq!(login.header("x-frame-options"), "DENY");
    assert!(login.set_cookie("webhoster_form").is_some());
    let api_health = v.get("/api/v1/health").await;
    assert_eq!(api_health.status, 200);
    let mut b = Browser::start("web_pages-tenant-wall", Some("en-US,en")).await;
    // The visitor logs in through the front, like everyone.
    browser_log_in(&mut b, &base, "nina").await;
    assert_eq!(path_of(&b).await, "/dashboard");

    visit(&mut b, &format!("{base}/77/"), "tenant").await;
    let results = text(&b, "results").await;
    b.shot("tenant-done").await;
    let r: Value = serde_json::from_str(&results).unwrap();
    eprintln!("the tenant's page saw: {r:#}");
    assert_eq!(r["origin"], "null", "the front sandboxes the tenant's page");
    for name in ["dashboard", "me", "post"] {
        let outcome = r[name]["outcome"].as_str().unwrap();
        assert!(outcome.starts_with("failed: TypeError"), "{name}: {outcome}");
    }
    let leaked =
        results.contains("nina") || results.contains("nav-settings") || results.contains("webhoster_session");
    assert!(!leaked, "{results}");
    // An opaque answer at most: nothing readable.
    assert!(
        r["nocors"]["outcome"] == "read: opaque"
            || r["nocors"]["outcome"].as_str().unwrap().starts_with("failed"),
        "{r}"
    );

    // Nothing changed: the session lives, the version is the same, no key.
    let after = api.store.user_by_login("nina").await.unwrap().unwrap().user;
    assert_eq!(after.token_version, user.token_version, "nothing was revoked");
    let ctl = webhoster::account::Accounts::new(api.store.clone(), api.auth.clone(), api.hosting.clone());
    assert!(
        ctl.ssh_keys(user.id).await.unwrap().is_empty(),
        "no key was added"
    );
    visit(&mut b, &format!("{base}/dashboard"), "dashboard-after").await;
    assert_eq!(path_of(&b).await, "/dashboard", "still logged in");
    element(&b, "create").await;
    b.close().await;
    drop(front);
    api.stop().await;
}
