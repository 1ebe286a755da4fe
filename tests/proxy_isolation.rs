//! Tenant isolation in the visitor's browser, path mode (`http://<host>/<id>/`).
//!
//! Every site shares one origin there, so the nginx front must keep one
//! site's script away from another site's responses, cookies, storage and
//! windows, and must not let a guest's response headers act beyond its own
//! responses. Two kinds of tests, both against the real `proxy::Proxy` and
//! real nginx, with small HTTP servers on loopback standing in for guests:
//!
//! - header tests, on the wire (raw HTTP/1.1, so nothing is hidden by a
//!   client library): what the front strips, adds and refuses;
//! - browser tests: Debian's chromium, driven through chromedriver with
//!   fantoccini, loads site 2 and then site 1, whose script tries to read
//!   site 2's response, cookie, localStorage and iframe, and writes what it
//!   got into its DOM. Through the front every attempt fails; through a
//!   plain nginx front without the isolation (the control) the same script
//!   reads all four, so the browser test can fail.
//!
//! Every process a test starts (nginx, chromedriver and its chromium) is
//! stopped in a Drop guard, even when the test panics.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::browser::{Browser, wait_for_port};
use common::host::free_port;
use fantoccini::{Client, Locator};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use webhoster::proxy::{Proxy, ProxyOptions, Site};

// ---------------------------------------------------------------------------
// The front under test

/// A state dir and port for one real front; stops its master before the dir
/// goes away, even when the test panics.
struct Front {
    tmp: tempfile::TempDir,
    port: u16,
}

impl Front {
    fn new() -> Front {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        Front {
            tmp: world_readable_tempdir("whiso-"),
            port: free_port(),
        }
    }

    fn nginx_dir(&self) -> PathBuf {
        self.tmp.path().join("nginx")
    }

    fn opts(&self) -> ProxyOptions {
        let mut opts = ProxyOptions::new(
            self.nginx_dir(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
        );
        opts.workers = Some(1);
        opts
    }

    /// The real front serving `sites`.
    async fn start(&self, sites: &[Site]) -> Proxy {
        let proxy = Proxy::start(self.opts()).await.expect("the front starts");
        for site in sites {
            proxy.add_site(site).await.expect("the site is published");
        }
        proxy
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cd {} && tail -n 30 logs/error.log logs/sites/*.log",
                    self.nginx_dir().display()
                ))
                .status();
        }
        if let Err(e) = webhoster::proxy::stop(&self.nginx_dir(), Duration::from_secs(10)) {
            eprintln!("stopping the test nginx: {e}");
        }
    }
}

/// nginx workers run unprivileged; they must be able to look up paths below.
fn world_readable_tempdir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temp dir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

fn site(user_id: i64, username: &str, upstream: SocketAddrV4) -> Site {
    Site {
        user_id,
        username: username.to_string(),
        upstream,
    }
}

// ---------------------------------------------------------------------------
// Guests: raw HTTP/1.1 servers on loopback, so that every header a guest
// sends (hop-by-hop ones included) is exactly what the test wrote.

/// What a guest answers to one request.
struct Reply {
    status: &'static str,
    headers: Vec<(&'static str, String)>,
    body: String,
    /// After a 101, echo bytes back (a WebSocket stand-in).
    echo: bool,
}

impl Reply {
    fn new(content_type: &str, body: impl Into<String>) -> Reply {
        Reply {
            status: "200 OK",
            headers: vec![("Content-Type", content_type.to_string())],
            body: body.into(),
            echo: false,
        }
    }

    fn html(body: impl Into<String>) -> Reply {
        Reply::new("text/html; charset=utf-8", body)
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

/// A request as the guest saw it: the path and the head, lowercased.
struct Request {
    path: String,
    head: String,
}

type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// Serves one request per connection with `handler`; unless the reply names
/// its own `Connection`, it closes after answering.
async fn guest(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> SocketAddrV4 {
    let handler: Handler = Arc::new(handler);
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = match listener.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let head = read_head(&mut conn).await;
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let reply = handler(&Request {
                    path,
                    head: head.to_ascii_lowercase(),
                });
                let mut out = format!("HTTP/1.1 {}\r\n", reply.status);
                for (name, value) in &reply.headers {
                    out.push_str(&format!("{name}: {value}\r\n"));
                }
                if !reply
                    .headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case("connection"))
                {
                    out.push_str("Connection: close\r\n");
                }
                if !reply.echo {
                    out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
                }
                out.push_str("\r\n");
                out.push_str(&reply.body);
                if conn.write_all(out.as_bytes()).await.is_err() || !reply.echo {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A response as it came off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    /// Lowercased names, values as sent, in order (repeats kept).
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of `name`; fails if it is missing or repeated.
    fn one(&self, name: &str) -> &str {
        match self.all(name).as_slice() {
            [v] => v,
            other => panic!("want one {name}, got {other:?} in {:?}", self.headers),
        }
    }

    fn lacks(&self, name: &str) -> bool {
        self.all(name).is_empty()
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`), read
/// to the end: what nginx really sends, hop-by-hop headers included.
async fn raw_get(port: u16, path: &str, extra: &[(&str, &str)]) -> Raw {
    raw_get_host(port, "127.0.0.1", path, extra).await
}

async fn raw_get_host(port: u16, host: &str, path: &str, extra: &[(&str, &str)]) -> Raw {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in extra {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut all))
        .await
        .expect("nginx answers within 30 s")
        .unwrap();
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Raw {
        status: status.parse().unwrap(),
        headers,
        body,
    }
}

fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        text = &rest[size + 2..];
    }
    out
}

// ---------------------------------------------------------------------------
// Header tests

const SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups allow-popups-to-escape-sandbox \
                       allow-modals allow-downloads; frame-ancestors 'none'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_accel_redirect_from_a_guest_never_serves_another_site() {
    let front = Front::new();
    let site2_hits = Arc::new(AtomicUsize::new(0));
    let hits = site2_hits.clone();
    let evil = guest(|req| {
        let reply = Reply::new("text/plain", format!("site1-own-body for {}", req.path));
        if req.path == "/others" {
            // The X-Accel headers that act on this response only.
            reply
                .header("X-Accel-Expires", "3600")
                .header("X-Accel-Limit-Rate", "1")
                .header("X-Accel-Buffering", "no")
                .header("X-Accel-Charset", "koi8-r")
        } else {
            // An internal redirect into site 2's location.
            reply.header("X-Accel-Redirect", "/2/secret")
        }
    })
    .await;
    let victim = guest(move |req| {
        hits.fetch_add(1, Ordering::SeqCst);
        Reply::new("text/plain", format!("site2-secret at {}", req.path))
    })
    .await;
    let _proxy = front
        .start(&[site(1, "mallory", evil), site(2, "victim", victim)])
        .await;

    // The redirect's target is real: site 2 serves its secret there.
    let direct = raw_get(front.port, "/2/secret", &[]).await;
    assert_eq!(direct.body, "site2-secret at /secret");
    let before = site2_hits.load(Ordering::SeqCst);

    let got = raw_get(front.port, "/1/anything", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "site1-own-body for /anything", "{got:?}");
    assert!(got.lacks("x-accel-redirect"), "{got:?}");
    assert_eq!(
        site2_hits.load(Ordering::SeqCst),
        before,
        "site 2's guest was never asked"
    );

    let started = Instant::now();
    let got = raw_get(front.port, "/1/others", &[]).await;
    assert_eq!(got.body, "site1-own-body for /others", "{got:?}");
    for name in [
        "x-accel-expires",
        "x-accel-limit-rate",
        "x-accel-buffering",
        "x-accel-charset",
    ] {
        assert!(got.lacks(name), "{name} reached the client: {got:?}");
    }
    // X-Accel-Limit-Rate: 1 (byte per second) was not obeyed: 26 bytes
    // would take 26 s.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(got.one("content-type"), "text/plain", "no charset added");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_headers_that_reach_past_its_own_responses_are_stripped() {
    let front = Front::new();
    let evil = guest(|req| {
        if req.path == "/echo" {
            // What the guest got from the visitor, to check the request side.
            return Reply::new("text/plain", req.head.clone());
        }
        Reply::html("<p>site one</p>")
            .header("Set-Cookie", "sid=site1; Path=/")
            .header("Set-Cookie", "other=x; Path=/2/")
            .header("Service-Worker-Allowed", "/")
            .header("Clear-Site-Data", "\"*\"")
            .header("Strict-Transport-Security", "max-age=31536000")
            .header("Alt-Svc", "h2=\":8443\"")
            .header("NEL", "{\"report_to\":\"x\",\"max_age\":86400}")
            .header(
                "Report-To",
                "{\"group\":\"x\",\"max_age\":86400,\"endpoints\":[]}",
            )
            .header("WWW-Authenticate", "Basic realm=\"site two\"")
            // Trying to undo the front's own headers.
            .header("X-Frame-Options", "ALLOWALL")
            .header("Cross-Origin-Opener-Policy", "unsafe-none")
            .header("X-Content-Type-Options", "sniff")
            // Its own CSP is kept: it can only restrict itself further.
            .header("Content-Security-Policy", "img-src 'self'")
            // Hop-by-hop tricks: headers named in Connection would be
            // dropped by the next hop, and an Upgrade nobody asked for.
            .header(
                "Connection",
                "close, X-Content-Type-Options, Content-Security-Policy, X-Frame-Options",
            )
            .header("Upgrade", "h2c")
    })
    .await;
    let _proxy = front.start(&[site(1, "mallory", evil)]).await;

    let got = raw_get(front.port, "/1/", &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    for name in [
        "set-cookie",
        "service-worker-allowed",
        "clear-site-data",
        "strict-transport-security",
        "alt-svc",
        "nel",
        "report-to",
        "www-authenticate",
        "upgrade",
    ] {
        assert!(got.lacks(name), "{name} reached the client: {:?}", got.headers);
    }
    assert_eq!(got.one("x-frame-options"), "DENY");
    assert_eq!(got.one("cross-origin-opener-policy"), "same-origin");
    assert_eq!(got.one("x-content-type-options"), "nosniff");
    let csp = got.all("content-security-policy");
    assert!(csp.contains(&SANDBOX), "{csp:?}");
    assert!(
        csp.contains(&"img-src 'self'"),
        "the guest's own policy is kept: {csp:?}"
    );
    assert!(!got.headers.iter().any(|(_, v)| v.contains("allow-same-origin")));
    // nginx's own Connection, naming none of the guest's headers.
    assert_eq!(got.one("connection"), "close");

    // The same holds for errors and for pages nginx makes for the site.
    let missing = raw_get(front.port, "/1/", &[("Service-Worker", "script")]).await;
    assert_eq!(missing.status, 403, "a service worker script is refused");
    assert_eq!(missing.all("content-security-policy"), vec![SANDBOX]);

    // The request side: the host's cookies never reach a guest, whoever set them.
    let echo = raw_get(
        front.port,
        "/1/echo",
        &[("Cookie", "admin_session=for-another-port")],
    )
    .await;
    assert!(!echo.body.contains("admin_session"), "{}", echo.body);
    assert!(!echo.body.contains("\r\ncookie:"), "{}", echo.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_passes_only_on_the_101_the_visitor_asked_for() {
    let front = Front::new();
    let ws = guest(|req| {
        if req.head.contains("\r\nupgrade: websocket\r\n") {
            let mut reply = Reply::new("text/plain", "")
                .header("Upgrade", "websocket")
                .header("Connection", "Upgrade");
            reply.status = "101 Switching Protocols";
            reply.headers.retain(|(n, _)| *n != "Content-Type");
            reply.echo = true;
            reply
        } else {
            Reply::new("text/plain", "no upgrade asked").header("Upgrade", "websocket")
        }
    })
    .await;
    let _proxy = front.start(&[site(3, "erin", ws)]).await;

    let plain = raw_get(front.port, "/3/ws", &[]).await;
    assert_eq!(plain.status, 200);
    assert!(plain.lacks("upgrade"), "{:?}", plain.headers);

    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", front.port))
        .await
        .unwrap();
    conn.write_all(
        b"GET /3/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut conn))
        .await
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    conn.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_site_keeps_its_cookies_pinned_to_its_own_name() {
    let front = Front::new();
    let g = guest(|_| {
        Reply::html("<p>alice</p>")
            .header("Set-Cookie", "sid=a; Path=/; Domain=example.test")
            .header("Set-Cookie", "pref=b; Path=/")
            .header("Clear-Site-Data", "\"cookies\"")
            .header("X-Accel-Redirect", "/2/")
    })
    .await;
    let mut opts = front.opts();
    opts.site_domain = Some("example.test".into());
    let proxy = Proxy::start(opts).await.unwrap();
    proxy.add_site(&site(1, "alice", g)).await.unwrap();

    let got = raw_get_host(front.port, "alice.example.test", "/", &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, "<p>alice</p>");
    assert_eq!(
        got.all("set-cookie"),
        vec!["sid=a; Path=/; Domain=alice.example.test", "pref=b; Path=/"],
        "its own origin keeps its cookies, but not a sibling's domain"
    );
    assert!(got.lacks("clear-site-data"));
    assert!(got.lacks("x-accel-redirect"));
    assert!(
        got.all("content-security-policy").is_empty(),
        "no sandbox on its own origin"
    );
    assert_eq!(got.one("x-frame-options"), "SAMEORIGIN");
    assert_eq!(got.one("x-content-type-options"), "nosniff");

    // The same guest in path mode: no cookie at all.
    let path = raw_get(front.port, "/1/", &[]).await;
    assert!(path.lacks("set-cookie"), "{:?}", path.headers);
    assert_eq!(path.all("content-security-policy"), vec![SANDBOX]);
}

// ---------------------------------------------------------------------------
// Browser tests

/// Site 2's secrets, one per way in.
const FETCH_SECRET: &str = "site2-fetch-secret";
const COOKIE_SECRET: &str = "site2-cookie-secret";
const STORAGE_SECRET: &str = "site2-storage-secret";
const FRAME_SECRET: &str = "site2-frame-secret";

/// Site 2: its page stores a value in localStorage (and says whether it
/// could), its backend sets a cookie for the whole host, and two URLs hold
/// secrets for a fetch and an iframe.
async fn site_two() -> SocketAddrV4 {
    guest(|req| match req.path.as_str() {
        "/" => Reply::html(format!(
            r#"<!doctype html><meta charset="utf-8"><title>site two</title>
<script>
const r = {{ origin: self.origin }};
try {{ localStorage.setItem('site2', '{STORAGE_SECRET}'); r.storage = 'written'; }}
catch (e) {{ r.storage = 'blocked: ' + e.name; }}
addEventListener('DOMContentLoaded', () => {{
  const out = document.createElement('pre');
  out.id = 'site2';
  out.textContent = JSON.stringify(r);
  document.body.appendChild(out);
}});
</script>
<body><p>site two</p></body>"#
        ))
        .header("Set-Cookie", format!("site2sid={COOKIE_SECRET}; Path=/")),
        "/secret" => Reply::new("text/plain", FETCH_SECRET),
        "/frame" => Reply::html(format!("<!doctype html><p id=\"s\">{FRAME_SECRET}</p>")),
        _ => {
            let mut r = Reply::new("text/plain", "not found");
            r.status = "404 Not Found";
            r
        }
    })
    .await
}

/// Site 1: the attacker. Its page tries each way into site 2 and writes what
/// it got into `#results` as JSON. Its backend also sends its own CSP that
/// tries to lift the front's sandbox (`allow-same-origin`).
async fn site_one() -> SocketAddrV4 {
    const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>site one</title>
<body><p>site one</p>
<script>
const SECRETS = { fetch: 'site2-fetch-secret', cookie: 'site2-cookie-secret',
                  storage: 'site2-storage-secret', iframe: 'site2-frame-secret' };
async function attempt(name, how) {
  try {
    const got = String(await how());
    return { attempted: true, outcome: 'read: ' + got.slice(0, 300), leaked: got.includes(SECRETS[name]) };
  } catch (e) {
    return { attempted: true, outcome: 'failed: ' + e.name + ': ' + e.message, leaked: false };
  }
}
function frameText() {
  return new Promise((resolve, reject) => {
    const f = document.createElement('iframe');
    const timer = setTimeout(() => reject(new Error('no load event within 5 s')), 5000);
    f.onload = () => {
      clearTimeout(timer);
      try { resolve(f.contentWindow.document.body.textContent); } catch (e) { reject(e); }
    };
    f.src = '/2/frame';
    document.body.appendChild(f);
  });
}
(async () => {
  const results = { origin: self.origin };
  results.fetch = await attempt('fetch', async () =>
    (await fetch('/2/secret', { credentials: 'include' })).text());
  results.cookie = await attempt('cookie', () => document.cookie);
  results.storage = await attempt('storage', () => localStorage.getItem('site2'));
  results.iframe = await attempt('iframe', frameText);
  const out = document.createElement('pre');
  out.id = 'results';
  out.textContent = JSON.stringify(results);
  document.body.appendChild(out);
})();
</script>
</body>"#;
    guest(|_| {
        Reply::html(PAGE).header(
            "Content-Security-Policy",
            "sandbox allow-scripts allow-same-origin allow-popups allow-modals allow-forms",
        )
    })
    .await
}

const ATTACKS: [&str; 4] = ["fetch", "cookie", "storage", "iframe"];

/// What the browser saw in one run of the scenario.
#[derive(Debug)]
struct Seen {
    /// Site 2's page: its origin and whether it could write its storage.
    site2: Value,
    /// Site 1's page: its origin and each attempt's outcome.
    site1: Value,
    /// Cookies the browser holds for the host afterwards.
    cookies: BTreeMap<String, String>,
}

/// Visit site 2 (`<base>/2/`), then site 1 (`<base>/1/`), in a fresh
/// browser profile, and read what both pages wrote.
async fn visit_both(base: &str) -> Seen {
    let browser = Browser::start("proxy_isolation", None).await;
    let c = browser.client();
    c.goto(&format!("{base}/2/")).await.unwrap();
    let site2 = read_json(c, "site2").await;
    c.goto(&format!("{base}/1/")).await.unwrap();
    let site1 = read_json(c, "results").await;
    // Cookies of the host, read from a page of the host that is not a site.
    c.goto(&format!("{base}/")).await.unwrap();
    let cookies = c
        .get_all_cookies()
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.name().to_string(), k.value().to_string()))
        .collect();
    browser.close().await;
    Seen {
        site2,
        site1,
        cookies,
    }
}

async fn read_json(c: &Client, id: &str) -> Value {
    let el = c
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("the page never wrote #{id}: {e}"));
    let text = el.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("#{id} is not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_one_site_cannot_read_another_through_the_front() {
    let started = Instant::now();
    let front = Front::new();
    let _proxy = front
        .start(&[
            site(1, "mallory", site_one().await),
            site(2, "victim", site_two().await),
        ])
        .await;
    let seen = visit_both(&front.base()).await;
    eprintln!("through the front: {seen:#?}");

    // Both pages ran their script, each in an opaque origin of its own.
    assert_eq!(seen.site2["origin"], "null", "{seen:?}");
    assert_eq!(seen.site1["origin"], "null", "{seen:?}");
    // Site 2 itself cannot use storage: that is the price of the sandbox.
    assert!(
        seen.site2["storage"]
            .as_str()
            .unwrap()
            .starts_with("blocked: SecurityError"),
        "{seen:?}"
    );
    for attack in ATTACKS {
        let r = &seen.site1[attack];
        assert_eq!(r["attempted"], true, "{attack} was tried: {seen:?}");
        assert_eq!(r["leaked"], false, "{attack} read site 2's secret: {r}");
        let outcome = r["outcome"].as_str().unwrap();
        assert!(
            outcome.starts_with("failed: "),
            "{attack} did not fail: {outcome}"
        );
    }
    let outcome = |a: &str| seen.site1[a]["outcome"].as_str().unwrap().to_string();
    assert!(
        outcome("fetch").contains("TypeError"),
        "a CORS failure: {}",
        outcome("fetch")
    );
    assert!(
        outcome("cookie").contains("SecurityError"),
        "{}",
        outcome("cookie")
    );
    assert!(
        outcome("storage").contains("SecurityError"),
        "{}",
        outcome("storage")
    );
    assert!(
        outcome("iframe").contains("SecurityError"),
        "{}",
        outcome("iframe")
    );
    // Site 2's Set-Cookie never reached the browser.
    assert!(seen.cookies.is_empty(), "{:?}", seen.cookies);
    eprintln!("isolated run took {:?}", started.elapsed());
}

/// The control: the same two guests and the same script behind a plain
/// nginx that only proxies `/1/` and `/2/` (the shape of the front before
/// the isolation). Every attempt reads site 2's secret, so the test above
/// would fail if the front stopped isolating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_isolation_the_same_attacks_succeed() {
    let started = Instant::now();
    let plain = PlainNginx::start(&[(1, site_one().await), (2, site_two().await)]);
    let seen = visit_both(&plain.base()).await;
    eprintln!("through a plain front: {seen:#?}");

    let origin = plain.base();
    assert_eq!(seen.site2["origin"], origin.as_str(), "{seen:?}");
    assert_eq!(seen.site2["storage"], "written", "{seen:?}");
    // Site 1's own CSP sandbox kept allow-same-origin: no protection.
    assert_eq!(seen.site1["origin"], origin.as_str(), "{seen:?}");
    for attack in ATTACKS {
        let r = &seen.site1[attack];
        assert_eq!(r["attempted"], true, "{attack}: {seen:?}");
        assert_eq!(
            r["leaked"], true,
            "{attack} should read site 2's secret here: {r}"
        );
    }
    assert_eq!(
        seen.cookies.get("site2sid").map(String::as_str),
        Some(COOKIE_SECRET)
    );
    eprintln!("control run took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// The control front: plain nginx, no isolation

/// An nginx in the foreground, a child of the test, proxying `/<id>/` to
/// each backend and nothing else; killed (and reaped) on drop.
struct PlainNginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PlainNginx {
    fn start(sites: &[(i64, SocketAddrV4)]) -> PlainNginx {
        let dir = world_readable_tempdir("whplain-");
        let root = dir.path();
        for sub in ["tmp", "logs"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let port = free_port();
        let locations: String = sites
            .iter()
            .map(|(id, up)| format!("location ^~ /{id}/ {{ proxy_pass http://{up}/; }}\n"))
            .collect();
        let r = root.display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {r}/nginx.pid;\nerror_log {r}/logs/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n access_log off;\n client_body_temp_path {r}/tmp/body;\n proxy_temp_path {r}/tmp/proxy;\n\
             fastcgi_temp_path {r}/tmp/fastcgi;\n uwsgi_temp_path {r}/tmp/uwsgi;\n scgi_temp_path {r}/tmp/scgi;\n\
             server {{\n listen 127.0.0.1:{port};\n {locations} }}\n}}\n"
        );
        let conf_path = root.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(root)
            .arg("-e")
            .arg(root.join("logs/error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .spawn()
            .expect("nginx runs (Debian package nginx-light)");
        let plain = PlainNginx {
            child,
            port,
            _dir: dir,
        };
        wait_for_port(port, "the plain nginx");
        plain
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PlainNginx {
    fn drop(&mut self) {
        // SIGTERM: a fast shutdown of the master and its workers.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
        let _ = self.child.wait();
    }
}
