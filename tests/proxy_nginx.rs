//! The nginx front against real nginx: each test runs its own master on its
//! own port and state dir, in front of small local backends (warp servers on
//! 127.0.0.1 ephemeral ports), and stops it at the end even on panic.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warp::Filter;
use webhoster::logfile::{LogCap, generation};
use webhoster::proxy::{Proxy, ProxyError, ProxyOptions, Site, SiteLimits};

/// A state dir and port for one test; stops the master it may have started
/// before the dir goes away, even when the test panics.
struct Fixture {
    tmp: tempfile::TempDir,
    port: u16,
}

impl Fixture {
    fn new() -> Fixture {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let tmp = tempfile::Builder::new()
            .prefix("whproxy-")
            .tempdir()
            .expect("a temp dir");
        // nginx workers run unprivileged; let them look up paths below.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Fixture {
            tmp,
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
        opts.docs_url = "http://127.0.0.1:8000/docs".into();
        opts
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What nginx saw, for the failure report.
            let dir = self.nginx_dir();
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cd {} && ls -l . current/sites; tail -n 30 logs/error.log logs/access.log logs/sites/*.log",
                    dir.display()
                ))
                .status();
        }
        if let Err(e) = webhoster::proxy::stop(&self.nginx_dir(), Duration::from_secs(10)) {
            eprintln!("stopping the test nginx: {e}");
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A new connection per request: a change applies to connections opened
/// after it returns, while a connection already open to an old worker (a
/// pooled one, or one the client opened ahead of need) finishes on the old
/// config, as nginx's graceful reload intends.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A backend that answers every request with JSON naming itself and echoing
/// the path and headers it got; `/slow` answers after two seconds.
async fn backend(name: &str) -> SocketAddrV4 {
    let name = name.to_string();
    let route = warp::any()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .then(
            move |path: warp::path::FullPath, headers: warp::http::HeaderMap| {
                let name = name.clone();
                async move {
                    if path.as_str().ends_with("/slow") {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    let headers: BTreeMap<String, String> = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
                        .collect();
                    warp::reply::json(&serde_json::json!({
                        "backend": name,
                        "path": path.as_str(),
                        "headers": headers,
                    }))
                }
            },
        );
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = match listener.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };
    tokio::spawn(warp::serve(route).incoming(listener).run());
    addr
}

fn site(user_id: i64, username: &str, upstream: SocketAddrV4) -> Site {
    Site {
        user_id,
        username: username.to_string(),
        upstream,
    }
}

async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    let resp = c.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {url}");
    resp.json().await.unwrap()
}

async fn status(c: &reqwest::Client, url: &str) -> u16 {
    c.get(url).send().await.unwrap().status().as_u16()
}

async fn status_and_body(c: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = c.get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

fn session_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_prefix_reaches_only_its_own_backend() {
    let fx = Fixture::new();
    let proxy = Proxy::start(fx.opts()).await.unwrap();
    let pid = proxy.master_pid().expect("a master runs");
    assert_eq!(session_of(pid), pid, "the master leads its own session");

    let (b1, b10, b100) = (
        backend("one").await,
        backend("ten").await,
        backend("hundred").await,
    );
    proxy.add_site(&site(1, "alice", b1)).await.unwrap();
    proxy.add_site(&site(10, "bob", b10)).await.unwrap();
    proxy.add_site(&site(100, "carol", b100)).await.unwrap();
    assert_eq!(
        proxy.sites().await.unwrap(),
        vec![
            site(1, "alice", b1),
            site(10, "bob", b10),
            site(100, "carol", b100)
        ]
    );

    let c = client();
    for (id, name) in [(1, "one"), (10, "ten"), (100, "hundred")] {
        let got = get_json(&c, &fx.url(&format!("/{id}/page?q=1"))).await;
        assert_eq!(got["backend"], name, "/{id}/ reached {got}");
        assert_eq!(got["path"], "/page", "the prefix is stripped");
        let h = &got["headers"];
        assert_eq!(h["host"], "127.0.0.1");
        assert_eq!(h["x-real-ip"], "127.0.0.1");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-prefix"], format!("/{id}"));
        assert!(h.get("upgrade").is_none());
        let root = get_json(&c, &fx.url(&format!("/{id}/"))).await;
        assert_eq!(root["path"], "/");
    }
    // Neither 10 nor 100 is captured by 1, in either direction.
    assert_eq!(get_json(&c, &fx.url("/10/x")).await["backend"], "ten");
    assert_eq!(status(&c, &fx.url("/1000/")).await, 404);
    assert_eq!(status(&c, &fx.url("/11/")).await, 404);
    assert_eq!(status(&c, &fx.url("/1x/")).await, 404);

    let resp = c.get(fx.url("/1?a=b")).send().await.unwrap();
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "/1/?a=b");
    assert_eq!(
        c.get(fx.url("/100")).send().await.unwrap().headers()["location"],
        "/100/"
    );

    let resp = c.get(fx.url("/no/such/thing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let resp = c.get(fx.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-frame-options"], "SAMEORIGIN");
    assert!(resp.headers().get("server").is_none_or(|s| s == "nginx"));
    let landing = resp.text().await.unwrap();
    assert!(
        landing.contains("href=\"http://127.0.0.1:8000/docs\""),
        "{landing}"
    );

    // Each site has its own access log (written by the sink within moments).
    let log_file = fx.nginx_dir().join("logs/sites/10.access.log");
    let started = Instant::now();
    let mut log = String::new();
    while !log.contains("GET /10/x") && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = std::fs::read_to_string(&log_file).unwrap_or_default();
    }
    assert!(log.contains("GET /10/x"), "{log}");
    assert!(!log.contains("GET /1/"), "{log}");

    // Remove one: the others still serve, the removed one is a 404.
    proxy.remove_site(10).await.unwrap();
    assert_eq!(status(&c, &fx.url("/10/")).await, 404);
    assert_eq!(get_json(&c, &fx.url("/1/")).await["backend"], "one");
    assert_eq!(get_json(&c, &fx.url("/100/")).await["backend"], "hundred");
    assert_eq!(proxy.sites().await.unwrap().len(), 2);
    // Removing it again changes nothing.
    let generation = proxy.generation().unwrap();
    proxy.remove_site(10).await.unwrap();
    assert_eq!(proxy.generation().unwrap(), generation);
    assert_eq!(proxy.master_pid(), Some(pid), "changes reload, never restart");

    proxy.shutdown().await.unwrap();
    assert_eq!(proxy.master_pid(), None);
    assert!(
        c.get(fx.url("/1/")).send().await.is_err(),
        "nothing listens any more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_during_a_reload_completes() {
    let fx = Fixture::new();
    let proxy = Proxy::start(fx.opts()).await.unwrap();
    let b1 = backend("one").await;
    proxy.add_site(&site(1, "alice", b1)).await.unwrap();
    let before = proxy.generation().unwrap().unwrap();

    let c = client();
    let url = fx.url("/1/slow");
    let started = Instant::now();
    let slow = tokio::spawn(async move { c.get(url).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy
        .add_site(&site(10, "bob", backend("ten").await))
        .await
        .unwrap();
    let reloaded_at = started.elapsed();
    assert!(proxy.generation().unwrap().unwrap() > before);
    assert!(
        reloaded_at < Duration::from_secs(2),
        "the reload finished while the request was in flight ({reloaded_at:?})"
    );
    let status = slow.await.unwrap().expect("the slow request completes");
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_candidate_fails_the_test_and_the_old_config_keeps_serving() {
    let fx = Fixture::new();
    let proxy = Proxy::start(fx.opts()).await.unwrap();
    let b1 = backend("one").await;
    proxy.add_site(&site(1, "alice", b1)).await.unwrap();
    let generation = proxy.generation().unwrap();
    let pid = proxy.master_pid();

    // A file where nginx's temp dirs must go: a candidate config then names
    // paths nginx cannot create, which only `nginx -t` (not rendering) finds.
    // The running workers never use them (nothing is spooled).
    let tmp = fx.nginx_dir().join("tmp");
    let moved = fx.nginx_dir().join("tmp.moved");
    std::fs::rename(&tmp, &moved).unwrap();
    std::fs::write(&tmp, b"").unwrap();
    let err = proxy
        .add_site(&site(100, "carol", backend("hundred").await))
        .await
        .expect_err("the candidate must fail nginx -t");
    match &err {
        ProxyError::ConfigTest { output, .. } => {
            assert!(output.contains("client_body"), "{output}")
        }
        other => panic!("expected a config test failure, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("previous config stays in force"), "{message}");

    assert_eq!(proxy.generation().unwrap(), generation, "current did not move");
    assert_eq!(proxy.master_pid(), pid);
    assert_eq!(proxy.sites().await.unwrap(), vec![site(1, "alice", b1)]);
    let c = client();
    assert_eq!(get_json(&c, &fx.url("/1/")).await["backend"], "one");
    assert_eq!(status(&c, &fx.url("/100/")).await, 404);
    let gens: Vec<_> = std::fs::read_dir(fx.nginx_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert!(gens.len() <= 2, "the failed candidate was removed: {gens:?}");

    // Once the cause is gone the same change goes through.
    std::fs::remove_file(&tmp).unwrap();
    std::fs::rename(&moved, &tmp).unwrap();
    proxy
        .add_site(&site(100, "carol", backend("hundred").await))
        .await
        .unwrap();
    assert_eq!(get_json(&c, &fx.url("/100/")).await["backend"], "hundred");
    assert_eq!(get_json(&c, &fx.url("/1/")).await["backend"], "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_all_land() {
    let fx = Fixture::new();
    let proxy = Proxy::start(fx.opts()).await.unwrap();
    let first = proxy.generation().unwrap().unwrap();
    let mut wanted = Vec::new();
    for id in 1..=8 {
        wanted.push(site(id, &format!("user{id}"), backend(&format!("b{id}")).await));
    }
    let tasks: Vec<_> = wanted
        .iter()
        .cloned()
        .map(|s| {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.add_site(&s).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(proxy.sites().await.unwrap(), wanted);
    let c = client();
    for s in &wanted {
        let got = get_json(&c, &fx.url(&format!("/{}/", s.user_id))).await;
        assert_eq!(got["backend"], format!("b{}", s.user_id));
    }
    let reloads = proxy.generation().unwrap().unwrap() - first;
    eprintln!("8 concurrent adds took {reloads} reload(s)");
    assert!((1..=8).contains(&reloads));

    // A second handle on the same dir (as another process would) also waits
    // its turn: its adds and ours all land.
    let other = Proxy::start(fx.opts()).await.unwrap();
    let (b9, b10) = (backend("b9").await, backend("b10").await);
    let s9 = site(9, "user9", b9);
    let s10 = site(10, "user10", b10);
    let (r9, r10) = tokio::join!(proxy.add_site(&s9), other.add_site(&s10));
    r9.unwrap();
    r10.unwrap();
    assert_eq!(proxy.sites().await.unwrap().len(), 10);
    assert_eq!(get_json(&c, &fx.url("/9/")).await["backend"], "b9");
    assert_eq!(get_json(&c, &fx.url("/10/")).await["backend"], "b10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_finds_the_running_master() {
    let fx = Fixture::new();
    let b1 = backend("one").await;
    let (pid, generation) = {
        let proxy = Proxy::start(fx.opts()).await.unwrap();
        proxy.add_site(&site(1, "alice", b1)).await.unwrap();
        (proxy.master_pid().unwrap(), proxy.generation().unwrap())
    };
    // webhoster is "down": the site still serves.
    let c = client();
    assert_eq!(get_json(&c, &fx.url("/1/")).await["backend"], "one");

    let proxy = Proxy::start(fx.opts()).await.unwrap();
    assert_eq!(proxy.master_pid(), Some(pid), "the same master, not a second one");
    assert_eq!(
        proxy.generation().unwrap(),
        generation,
        "nothing changed, no reload"
    );
    assert_eq!(proxy.sites().await.unwrap(), vec![site(1, "alice", b1)]);

    // Started with other options, it reloads the same master.
    let mut opts = fx.opts();
    opts.site_domain = Some("example.test".into());
    let proxy = Proxy::start(opts).await.unwrap();
    assert_eq!(proxy.master_pid(), Some(pid));
    assert!(proxy.generation().unwrap() > generation);
    let got: Value = c
        .get(fx.url("/anything"))
        .header("Host", "alice.example.test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["backend"], "one");
    assert_eq!(got["path"], "/anything");
    assert_eq!(got["headers"]["host"], "alice.example.test");
    assert!(got["headers"].get("x-forwarded-prefix").is_none());

    // A stale pidfile (the master is gone, the pid names another process) is
    // not trusted: a new master starts.
    proxy.shutdown().await.unwrap();
    let pidfile = fx.nginx_dir().join("run/nginx.pid");
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
    let proxy = Proxy::start(fx.opts()).await.unwrap();
    let new_pid = proxy.master_pid().unwrap();
    assert_ne!(new_pid, std::process::id() as i32);
    assert_ne!(new_pid, pid);
    assert_eq!(get_json(&c, &fx.url("/1/")).await["backend"], "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_guest_gets_the_friendly_page() {
    let fx = Fixture::new();
    let proxy = Proxy::start(fx.opts()).await.unwrap();
    // Nothing listens there.
    let closed = SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port());
    proxy.add_site(&site(7, "dora", closed)).await.unwrap();
    let resp = client().get(fx.url("/7/")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let body = resp.text().await.unwrap();
    assert!(body.contains("starting or stopped"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_body_limits_apply_per_site() {
    let fx = Fixture::new();
    let mut opts = fx.opts();
    opts.limits = SiteLimits {
        rate_per_sec: 1,
        burst: 3,
        body_max_mib: 1,
    };
    let proxy = Proxy::start(opts).await.unwrap();
    let (b1, b2) = (backend("one").await, backend("two").await);
    proxy.add_site(&site(1, "alice", b1)).await.unwrap();
    proxy.add_site(&site(2, "bobby", b2)).await.unwrap();
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(status(&c, &fx.url("/1/")).await);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(statuses[0], 200);
    // Site 2 has its own budget.
    assert_eq!(status(&c, &fx.url("/2/")).await, 200);

    let big = vec![b'x'; 2 * 1024 * 1024];
    let resp = c.post(fx.url("/2/upload")).body(big).send().await.unwrap();
    assert_eq!(resp.status(), 413);
}

/// A backend that accepts one WebSocket-style upgrade per connection and then
/// echoes bytes back.
async fn upgrade_backend() -> SocketAddrV4 {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = match listener.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut conn).await.to_ascii_lowercase();
                if !(head.contains("\r\nupgrade: websocket\r\n")
                    && head.contains("\r\nconnection: upgrade\r\n"))
                {
                    let _ = conn
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                conn.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                )
                .await
                .unwrap();
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
        if conn.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through() {
    let fx = Fixture::new();
    let proxy = Proxy::start(fx.opts()).await.unwrap();
    proxy
        .add_site(&site(3, "erin", upgrade_backend().await))
        .await
        .unwrap();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", fx.port))
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
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [&b"hello"[..], b"through nginx"] {
        conn.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_never_reach_the_config() {
    let fx = Fixture::new();
    let proxy = Proxy::start(fx.opts()).await.unwrap();
    let generation = proxy.generation().unwrap();
    let up = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080);
    for bad in [
        site(0, "alice", up),
        site(-1, "alice", up),
        site(1, "al", up),
        site(1, "alice; return 200", up),
        site(1, "alice", SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80)),
    ] {
        let err = proxy.add_site(&bad).await.unwrap_err();
        assert!(matches!(err, ProxyError::Invalid { .. }), "{err:?}");
    }
    proxy.add_site(&site(1, "alice", up)).await.unwrap();
    let err = proxy.add_site(&site(2, "alice", up)).await.unwrap_err();
    assert!(err.to_string().contains("already published"), "{err}");
    assert_eq!(proxy.sites().await.unwrap().len(), 1);
    assert!(proxy.generation().unwrap() > generation);

    // A site file edited by hand is refused, not rendered.
    let file = fx.nginx_dir().join("current/sites/1.conf");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replacen("alice", "al ice", 1)).unwrap();
    assert!(matches!(
        proxy.sites().await.unwrap_err(),
        ProxyError::CorruptSite { .. }
    ));
    // A restart refuses to render it too, and leaves the running master be.
    assert!(matches!(
        Proxy::start(fx.opts()).await,
        Err(ProxyError::CorruptSite { .. })
    ));
    assert!(proxy.master_pid().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_request_after_a_change_sees_it() {
    let fx = Fixture::new();
    let mut opts = fx.opts();
    opts.workers = Some(2);
    let proxy = Proxy::start(opts).await.unwrap();
    let b1 = backend("one").await;
    let c = client();
    for round in 0..10 {
        proxy.add_site(&site(1, "alice", b1)).await.unwrap();
        let (st, text) = status_and_body(&c, &fx.url("/1/")).await;
        assert_eq!(st, 200, "round {round}: after add: {text}");
        proxy.remove_site(1).await.unwrap();
        let (st, text) = status_and_body(&c, &fx.url("/1/")).await;
        assert_eq!(st, 404, "round {round}: after remove: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_hard_is_replaced_on_the_next_change() {
    let fx = Fixture::new();
    let proxy = Proxy::start(fx.opts()).await.unwrap();
    let b1 = backend("one").await;
    proxy.add_site(&site(1, "alice", b1)).await.unwrap();
    let pid = proxy.master_pid().unwrap();
    // As the OOM killer would: the master goes, its worker stays behind,
    // still serving and holding the port.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let started = Instant::now();
    while proxy.master_pid().is_some() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(proxy.master_pid(), None);

    let b2 = backend("two").await;
    proxy.add_site(&site(2, "bobby", b2)).await.unwrap();
    let new_pid = proxy.master_pid().expect("a new master");
    assert_ne!(new_pid, pid);
    let c = client();
    for _ in 0..5 {
        assert_eq!(get_json(&c, &fx.url("/2/")).await["backend"], "two");
    }
    assert_eq!(get_json(&c, &fx.url("/1/")).await["backend"], "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_a_clear_start_error() {
    let fx = Fixture::new();
    let holder = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let mut opts = fx.opts();
    opts.listen = holder.local_addr().unwrap();
    let err = Proxy::start(opts).await.err().expect("the port is taken");
    match &err {
        ProxyError::StartFailed { output, .. } => {
            assert!(output.contains("Address already in use"), "{output}")
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    assert!(!webhoster::proxy::stop(&fx.nginx_dir(), Duration::from_secs(5)).unwrap());
}

/// Every file under `dir` (recursively) with its size and modification
/// time, sorted.
fn files_under(dir: &std::path::Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            out.extend(files_under(&entry.path()));
        } else {
            out.push((entry.path(), meta.len(), meta.modified().unwrap()));
        }
    }
    out.sort();
    out
}

/// nginx's logs (error, front, per site) are capped and rotated by the
/// sink in webhoster; with no webhoster running nginx serves on and nothing
/// in its directory grows; the next webhoster collects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_capped_and_nothing_grows_without_webhoster() {
    let fx = Fixture::new();
    let cap = LogCap {
        max_bytes: 16 * 1024,
        keep: 1,
    };
    let mut opts = fx.opts();
    opts.log_cap = cap;
    opts.limits.rate_per_sec = 0;
    let proxy = Proxy::start(opts.clone()).await.unwrap();
    proxy
        .add_site(&site(1, "alice", backend("one").await))
        .await
        .unwrap();
    // A site whose guest is down: each request is an error log line.
    let dead = match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
    {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };
    proxy.add_site(&site(2, "bob", dead)).await.unwrap();
    let logs = fx.nginx_dir().join("logs");
    let (site1, front, errors) = (
        logs.join("sites/1.access.log"),
        logs.join("access.log"),
        logs.join("error.log"),
    );

    let c = client();
    let started = Instant::now();
    let mut requests = 0;
    while !(generation(&site1, 1).exists()
        && generation(&front, 1).exists()
        && generation(&errors, 1).exists())
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no rotation after {requests} requests"
        );
        assert_eq!(status(&c, &fx.url("/1/x")).await, 200);
        assert_eq!(status(&c, &fx.url("/nowhere")).await, 404);
        assert_eq!(status(&c, &fx.url("/2/")).await, 502);
        requests += 1;
    }
    eprintln!(
        "every log rotated after {requests} rounds of 3 requests, {:?}",
        started.elapsed()
    );
    for (path, len, _) in files_under(&logs) {
        assert!(len <= cap.max_bytes, "{} is {len} bytes", path.display());
        assert!(
            !path.to_string_lossy().ends_with(".2"),
            "keep 1: {}",
            path.display()
        );
    }
    // A file may have just rotated (its last line is in `.1`, and the sink
    // writes datagrams as they come): one more round lands in each.
    assert_eq!(status(&c, &fx.url("/1/x")).await, 200);
    assert_eq!(status(&c, &fx.url("/nowhere")).await, 404);
    assert_eq!(status(&c, &fx.url("/2/")).await, 502);
    for (path, line) in [
        (&site1, "GET /1/x"),
        (&front, "GET /nowhere"),
        (&errors, "connect() failed"),
    ] {
        let started = Instant::now();
        while !std::fs::read_to_string(path).unwrap_or_default().contains(line) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{line:?} never reached {}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let pid = proxy.master_pid().unwrap();

    // webhoster goes away: its sink with it. nginx serves on, and nothing
    // in its directory grows.
    drop(proxy);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = files_under(&fx.nginx_dir());
    let quiet = Instant::now();
    for _ in 0..300 {
        assert_eq!(status(&c, &fx.url("/1/x")).await, 200);
        assert_eq!(status(&c, &fx.url("/2/")).await, 502);
    }
    eprintln!("600 requests without a sink in {:?}", quiet.elapsed());
    assert_eq!(
        files_under(&fx.nginx_dir()),
        before,
        "nothing grew without webhoster"
    );

    // The next webhoster finds the same master and collects again.
    let proxy = Proxy::start(opts).await.unwrap();
    assert_eq!(proxy.master_pid(), Some(pid));
    let mark = format!("/1/after-{}", std::process::id());
    assert_eq!(status(&c, &fx.url(&mark)).await, 200);
    let started = Instant::now();
    while !std::fs::read_to_string(&site1)
        .unwrap_or_default()
        .contains(&mark)
    {
        assert!(started.elapsed() < Duration::from_secs(10), "the new sink writes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Anyone may send to the socket, but only a published site gets a file.
    let spoof = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let socket = fx.nginx_dir().join("run/log.sock");
    spoof
        .send_to(b"<190>Dec  1 18:20:00 site_999: spoofed", &socket)
        .unwrap();
    spoof
        .send_to(b"<190>Dec  1 18:20:00 front: after-the-spoof", &socket)
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(&front)
        .unwrap_or_default()
        .contains("after-the-spoof")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the sink reads the socket"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!logs.join("sites/999.access.log").exists());
}
