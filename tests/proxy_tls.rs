//! HTTPS on the nginx front, against real nginx, real openssl and a real TLS
//! client (curl, verifying against the certificate webhoster made). Each
//! test runs its own master on its own loopback ports and state dir, with
//! small warp servers standing in for guests and the real API (over fakes
//! for the VM parts) behind `/api/`, and stops the master even on panic.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::control::{Db, TestApi};
use common::https::curl;
use warp::Filter;
use webhoster::proxy::{ApiUpstream, Https, Proxy, ProxyOptions, Site, tls};

/// A state dir and two ports for one test; stops the master it may have
/// started before the dir goes away, even when the test panics.
struct Fixture {
    tmp: tempfile::TempDir,
    http: u16,
    https: u16,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix("whtls-")
            .tempdir()
            .expect("a temp dir");
        // nginx workers run unprivileged; let them look up paths below.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Fixture {
            tmp,
            http: free_port(),
            https: free_port(),
        }
    }

    fn nginx_dir(&self) -> PathBuf {
        self.tmp.path().join("nginx")
    }

    fn tls_dir(&self) -> PathBuf {
        self.tmp.path().join("tls")
    }

    fn opts(&self, cert: PathBuf, key: PathBuf) -> ProxyOptions {
        let mut opts = ProxyOptions::new(
            self.nginx_dir(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.http)),
        );
        opts.workers = Some(1);
        opts.https = Some(Https {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, self.https)),
            cert,
            key,
        });
        opts
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "tail -n 30 {}/logs/error.log",
                    self.nginx_dir().display()
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

/// A guest stand-in: JSON naming itself, with the headers it got.
async fn backend(name: &'static str) -> SocketAddrV4 {
    let route = warp::any()
        .and(warp::header::headers_cloned())
        .map(move |headers: warp::http::HeaderMap| {
            let headers: BTreeMap<String, String> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
                .collect();
            warp::reply::json(&serde_json::json!({ "backend": name, "headers": headers }))
        });
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    tokio::spawn(warp::serve(route).incoming(listener).run());
    addr
}

/// `openssl s_client` to `port` with `args`; Ok(stdout) when the handshake
/// succeeded.
async fn s_client(port: u16, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
        ])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_sites_and_the_api_and_http_keeps_working() {
    let fx = Fixture::new();
    let (cert, key) = tls::self_signed(&fx.tls_dir(), &names(&["localhost", "*.example.test"])).unwrap();
    assert_eq!(mode(&fx.tls_dir()), 0o700);
    assert_eq!(mode(&key), 0o600);
    let ca = cert.to_str().unwrap().to_owned();

    let api = TestApi::start(Db::Sqlite).await;
    let mut opts = fx.opts(cert.clone(), key);
    opts.site_domain = Some("example.test".into());
    opts.api = Some(ApiUpstream {
        addr: api.addr,
        read_timeout: Duration::from_secs(60),
    });
    let proxy = Proxy::start(opts).await.unwrap();
    proxy
        .add_site(&Site {
            user_id: 1,
            username: "alice".into(),
            upstream: backend("alice").await,
        })
        .await
        .unwrap();
    let https = |path: &str| format!("https://localhost:{}{path}", fx.https);

    // A path-mode site over HTTPS: the certificate verifies against the one
    // made above, the isolation headers are those of HTTP, no HSTS, and
    // the guest learns the visitor's scheme.
    let site = curl(&["--cacert", &ca, &https("/1/")]).await.unwrap();
    assert_eq!(site.status, 200, "{site:?}");
    assert_eq!(site.json()["backend"], "alice");
    assert_eq!(site.json()["headers"]["x-forwarded-proto"], "https");
    let over_http = curl(&[&format!("http://127.0.0.1:{}/1/", fx.http)])
        .await
        .unwrap();
    assert_eq!(over_http.status, 200);
    assert_eq!(over_http.json()["headers"]["x-forwarded-proto"], "http");
    for head in [&site.head, &over_http.head] {
        assert!(
            head.contains("content-security-policy: sandbox allow-scripts"),
            "{head}"
        );
        assert!(head.contains("x-frame-options: deny"), "{head}");
        assert!(!head.contains("strict-transport-security"), "{head}");
    }

    // The certificate is what is checked: without it curl refuses.
    let unverified = curl(&[&https("/1/")]).await.unwrap_err();
    assert!(unverified.contains("certificate"), "{unverified}");

    // The host-name site, by SNI and Host, with the wildcard name.
    let resolve = format!("alice.example.test:{}:127.0.0.1", fx.https);
    let by_name = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        &format!("https://alice.example.test:{}/", fx.https),
    ])
    .await
    .unwrap();
    assert_eq!(by_name.status, 200, "{by_name:?}");
    assert_eq!(by_name.json()["backend"], "alice");
    assert!(
        !by_name.head.contains("content-security-policy"),
        "{}",
        by_name.head
    );

    // The API and its docs through the front, over HTTPS and HTTP: the
    // real API's envelope, and none of the site isolation.
    let health = curl(&["--cacert", &ca, &https("/api/v1/health")]).await.unwrap();
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.json()["success"], true);
    assert!(
        !health.head.contains("content-security-policy"),
        "{}",
        health.head
    );
    let register = curl(&[
        "--cacert",
        &ca,
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"email":"bob@example.test","username":"bob","password":"correct horse"}"#,
        &https("/api/v1/auth/register"),
    ])
    .await
    .unwrap();
    assert_eq!(register.status, 201, "{register:?}");
    assert_eq!(register.json()["data"]["username"], "bob");
    let docs = curl(&["--cacert", &ca, &https("/docs")]).await.unwrap();
    assert_eq!(docs.status, 200);
    assert!(docs.body.contains("/api/v1/openapi.json"));
    // The web pages over HTTPS set Secure cookies (the front says the
    // scheme); over HTTP they cannot.
    let page = curl(&["--cacert", &ca, &https("/login")]).await.unwrap();
    assert_eq!(page.status, 200, "{page:?}");
    let cookie = page
        .head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: webhoster_form="))
        .unwrap_or_else(|| panic!("no form cookie: {}", page.head));
    assert!(
        cookie.trim_end().to_ascii_lowercase().ends_with("; secure"),
        "{cookie}"
    );
    let plain_page = curl(&[&format!("http://127.0.0.1:{}/login", fx.http)])
        .await
        .unwrap();
    assert_eq!(plain_page.status, 200);
    assert!(
        !plain_page.head.to_ascii_lowercase().contains("; secure"),
        "{}",
        plain_page.head
    );
    // The explorer's files come through the front too.
    let ui = curl(&["--cacert", &ca, &https("/docs/swagger-initializer.js")])
        .await
        .unwrap();
    assert_eq!(ui.status, 200, "{ui:?}");
    assert!(ui.body.contains("/api/v1/openapi.json"), "{ui:?}");
    let plain_api = curl(&[&format!("http://127.0.0.1:{}/api/v1/health", fx.http)])
        .await
        .unwrap();
    assert_eq!(plain_api.status, 200);

    // TLS 1.2 and 1.3 only, and a TLS 1.2 session is resumed from the cache.
    let modern = s_client(fx.https, &["-CAfile", &ca]).await.unwrap();
    assert!(modern.contains("TLSv1.3"), "{modern}");
    let sess = fx.tmp.path().join("tls12.session");
    let sess = sess.to_str().unwrap();
    s_client(fx.https, &["-tls1_2", "-sess_out", sess]).await.unwrap();
    let again = s_client(fx.https, &["-tls1_2", "-sess_in", sess]).await.unwrap();
    assert!(again.contains("Reused, TLSv1.2"), "{again}");
    let old = s_client(fx.https, &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]).await;
    assert!(old.is_err(), "a TLS 1.1 handshake succeeded: {old:?}");

    // The API down: nginx's 502 in the API's envelope, not a site's page.
    api.stop().await;
    let down = curl(&["--cacert", &ca, &https("/api/v1/health")]).await.unwrap();
    assert_eq!(down.status, 502, "{down:?}");
    assert_eq!(down.json()["error"]["code"], "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_and_key_that_do_not_match_are_refused_at_start() {
    let fx = Fixture::new();
    let (cert, _) = tls::self_signed(&fx.tls_dir(), &names(&["localhost"])).unwrap();
    let (_, other_key) = tls::self_signed(&fx.tmp.path().join("other"), &names(&["localhost"])).unwrap();

    let err = Proxy::start(fx.opts(cert.clone(), other_key.clone()))
        .await
        .err()
        .expect("a mismatched pair must not start");
    let text = err.to_string();
    assert!(text.contains("key values mismatch"), "{text}");
    assert!(text.contains(other_key.to_str().unwrap()), "{text}");
    assert!(webhoster::proxy::stop(&fx.nginx_dir(), Duration::from_secs(5)).is_ok_and(|ran| !ran));

    let missing = fx.tmp.path().join("missing.key");
    let err = Proxy::start(fx.opts(cert.clone(), missing.clone()))
        .await
        .err()
        .expect("a missing key must not start");
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(
        text.contains("opening the TLS file") && text.contains("missing.key"),
        "{text}"
    );

    let not_pem = fx.tmp.path().join("not-a-cert.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let key = fx.tls_dir().join("self-signed.key");
    let err = Proxy::start(fx.opts(not_pem, key))
        .await
        .err()
        .expect("garbage must not start");
    assert!(err.to_string().contains("not-a-cert.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_signed_pair_is_kept_and_made_again_for_new_names() {
    let fx = Fixture::new();
    let read = |p: &Path| std::fs::read(p).unwrap();
    let first = names(&["localhost"]);
    let (cert, key) = tls::self_signed(&fx.tls_dir(), &first).unwrap();
    let (c1, k1) = (read(&cert), read(&key));
    let again = tls::self_signed(&fx.tls_dir(), &first).unwrap();
    assert_eq!(again, (cert.clone(), key.clone()));
    assert_eq!(
        (read(&cert), read(&key)),
        (c1.clone(), k1.clone()),
        "kept across starts"
    );

    let wider = names(&["example.test", "*.sites.test", "192.0.2.1"]);
    tls::self_signed(&fx.tls_dir(), &wider).unwrap();
    assert_ne!(read(&cert), c1);
    assert_ne!(read(&key), k1);
    assert_eq!(mode(&key), 0o600);
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let san = String::from_utf8_lossy(&out.stdout);
    assert!(
        san.contains("DNS:example.test, DNS:*.sites.test, IP Address:192.0.2.1"),
        "{san}"
    );
    // Nothing but the pair and its record is left in the dir.
    let mut left: Vec<String> = std::fs::read_dir(fx.tls_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["self-signed.crt", "self-signed.key", "self-signed.names"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_renewed_in_place_is_checked_and_loaded_at_the_next_start() {
    let fx = Fixture::new();
    let (cert, key) = tls::self_signed(&fx.tls_dir(), &names(&["localhost"])).unwrap();
    let old_ca = fx.tmp.path().join("old-ca.crt");
    std::fs::copy(&cert, &old_ca).unwrap();
    let old_ca = old_ca.to_str().unwrap().to_owned();
    let ca = cert.to_str().unwrap().to_owned();
    let url = format!("https://localhost:{}/", fx.https);
    Proxy::start(fx.opts(cert.clone(), key.clone())).await.unwrap();
    assert_eq!(curl(&["--cacert", &ca, &url]).await.unwrap().status, 200);

    // New names make a new pair at the same paths; the master keeps the
    // old one until webhoster starts again.
    tls::self_signed(&fx.tls_dir(), &names(&["localhost", "*.example.test"])).unwrap();
    assert!(curl(&["--cacert", &old_ca, &url]).await.is_ok());
    Proxy::start(fx.opts(cert.clone(), key.clone())).await.unwrap();
    assert_eq!(curl(&["--cacert", &ca, &url]).await.unwrap().status, 200);
    assert!(
        curl(&["--cacert", &old_ca, &url]).await.is_err(),
        "the old certificate is still served"
    );

    // A renewal that broke the pair: the start fails, the pair in force keeps serving.
    let (_, other_key) = tls::self_signed(&fx.tmp.path().join("other"), &names(&["localhost"])).unwrap();
    std::fs::copy(&other_key, &key).unwrap();
    let err = Proxy::start(fx.opts(cert.clone(), key.clone()))
        .await
        .err()
        .expect("a mismatched renewal must not load");
    assert!(err.to_string().contains("key values mismatch"), "{err}");
    assert_eq!(curl(&["--cacert", &ca, &url]).await.unwrap().status, 200);
}
