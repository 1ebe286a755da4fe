//! Every endpoint's success and error paths, over HTTP, against SQLite and
//! PostgreSQL (the same tests, one module per backend). The VM parts are
//! fakes here; the store, auth, orchestrator and API are the real code.

mod common;

use base64::Engine;
use reqwest::Method;
use serde_json::{Value, json};

use common::control::{Db, TestApi};

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";
const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBDwW9IEtBvNEDzrHm+pWJOn7Jj150wlpsXyVRANtEq1msVUVUR1hNSNmREjGDqJaMT08YyccSWm+Ne9fGpiEtJg= root@vm";
const RSA_1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCwiu1b2zbnYHljqNyxj9bsJlUt9Y+QSSaTAvNMiw6BIRqyN0jgXq0ipp3AiTlzC8c/XWxxVGgF389SVHL88l7gHCt93suAooA7rV6ODWlcQh0uovNr6XC2bfqO7HLh7Z54bkIHw7/m9kadQpR43KAjICMu+2BEhFu5D+uaZsNRbw== root@vm";
const DSA: &str = "ssh-dss AAAAB3NzaC1kc3MAAACBAOgDPiwiy0GZkqCkT5NEAyChZnXrtPtfD1OfcvXknYKIz+Pbo2945+3/gOH6YEecm2s08D3BBPAxRMsVFAkn5imgfv7BLBxPbNHu53su4w591vRcqB6zYilJFzJ6evtsUqT+fxM7JbJFW1ae9riQSeIHFvFWbLx2+6nRpOMfszTJAAAAFQDT1djKGnXmUREYWmpY8YXB5lJBSQAAAIB1eMwEEpMtBKWMUu6uMlmP0so0/Z9rXRXOR0E0Kss17eEgJNBK1085GtKtHxRY3vmR39EphZdyY9OBayXn6yvH5x+ciYXmJA/J8yV3+mnE8mVSDP/ezAzdL/cHjtCx+MjOcANucE4uFULJMRdLvhCD3UCWqFhwVI86XgWHxUD6wwAAAIEAjd4V52l4F5bIojS71+XGp8RB82tPDrwtOIM/xgxz4+aP+CxMXhMmXwuxcK8QbYfQXi4T8Nsxdqt/1eqr26jKf2t/ysYZu2XWDgQ0JxZDR37OYsZa8UnwuKZrS1lgwLVsQjBcyao7iHMrNPeo7QkDaVQyiw6gGnZCKPSVoMCOgCk= root@vm";

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body.get("data").is_some(), "envelope has data: {body}");
}

async fn accounts(db: Db) {
    let api = TestApi::start(db).await;
    let (s, body) = api.register("alice").await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["data"]["username"], "alice");
    assert_eq!(body["data"]["email"], "alice@example.com");
    assert!(body["data"]["id"].as_i64().unwrap() > 0);
    assert!(body["data"]["created_at"].is_string());
    assert!(body["data"].get("password_hash").is_none());

    // Duplicate email (any case) and duplicate username.
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/auth/register",
            None,
            Some(json!({
            "email": "ALICE@example.com", "username": "alice2", "password": "password123"})),
        )
        .await;
    assert_error(s, &b, 409, "email_taken");
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/auth/register",
            None,
            Some(json!({
            "email": "other@example.com", "username": "alice", "password": "password123"})),
        )
        .await;
    assert_error(s, &b, 409, "username_taken");

    // Form login (OAuth2 password style) by username and by email, and JSON login.
    let token = api.login("alice").await;
    let resp = api
        .client
        .post(api.url("/api/v1/auth/login"))
        .form(&[
            ("grant_type", "password"),
            ("username", "alice@example.com"),
            ("password", "password123"),
            ("scope", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["data"]["token_type"], "bearer");
    assert_eq!(b["data"]["expires_in"], 600);
    // RFC 6749 §5.1: the token at the top level too, never cached.
    assert_eq!(b["access_token"], b["data"]["access_token"]);
    assert_eq!(b["token_type"], "bearer");
    assert_eq!(b["expires_in"], 600);
    assert_eq!(b["success"], true);
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "alice", "password": "password123"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(b["data"]["access_token"].is_string());

    // Wrong password and unknown account look the same.
    for (user, pw) in [("alice", "wrongpassword"), ("nobody", "password123")] {
        let (s, b) = api
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({"username": user, "password": pw})),
            )
            .await;
        assert_error(s, &b, 401, "invalid_credentials");
    }
    // No account name holds a control character; PostgreSQL cannot even
    // compare one with a NUL (found by tests/api_fuzz.rs: a 500 there).
    for user in ["alice\u{0}", "ali\nce", "\u{7}"] {
        let (s, b) = api
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({"username": user, "password": "password123"})),
            )
            .await;
        assert_error(s, &b, 422, "validation_failed");
    }
    let resp = api
        .client
        .post(api.url("/api/v1/auth/login"))
        .header("content-type", "text/plain")
        .body("username=alice&password=password123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);

    let (s, b) = api.call(Method::GET, "/api/v1/auth/me", Some(&token), None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["username"], "alice");
    assert_eq!(b["data"]["email"], "alice@example.com");
    assert!(b["data"]["id"].is_i64() && b["data"]["created_at"].is_string());
}

async fn validation(db: Db) {
    let api = TestApi::start(db).await;
    let reg = |body: Value| api.call(Method::POST, "/api/v1/auth/register", None, Some(body));
    for body in [
        json!({"email": "not-an-email", "username": "bob", "password": "password123"}),
        json!({"email": "bob@example.com\nX-Injected: 1", "username": "bob", "password": "password123"}),
        json!({"email": "bob@example.com", "username": "bob", "password": "short"}),
        json!({"email": "bob@example.com", "username": "Bob", "password": "password123"}),
        json!({"email": "bob@example.com", "username": "bo", "password": "password123"}),
        json!({"email": "bob@example.com", "username": "a'; DROP TABLE users;--", "password": "password123"}),
        json!({"email": "bob@example.com", "username": "../../etc", "password": "password123"}),
        json!({"email": "bob@example.com", "username": "<script>", "password": "password123"}),
        json!({"email": "bob@example.com", "username": "bob\nruncmd", "password": "password123"}),
    ] {
        let (s, b) = reg(body.clone()).await;
        assert_error(s, &b, 422, "validation_failed");
    }
    // Unknown field, missing field, wrong type: parse errors.
    for body in [
        json!({"email": "bob@example.com", "username": "bob", "password": "password123", "admin": true}),
        json!({"email": "bob@example.com", "username": "bob"}),
        json!({"email": 1, "username": "bob", "password": "password123"}),
    ] {
        let (s, b) = reg(body).await;
        assert_error(s, &b, 400, "bad_request");
    }
    // Malformed JSON.
    let resp = api
        .client
        .post(api.url("/api/v1/auth/register"))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .unwrap();
    let s = resp.status().as_u16();
    assert_error(s, &resp.json().await.unwrap(), 400, "bad_request");
    // Huge body: 413, with and without a Content-Length.
    let huge = format!(
        "{{\"email\":\"a@b.io\",\"username\":\"bob\",\"password\":\"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    // Raw TCP, announcing the body but not sending it: the length alone must
    // be refused. (An HTTP client sending the body may see the server answer
    // and close first, and report a broken pipe instead of the answer.)
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(api.addr).await.unwrap();
        let head = format!(
            "POST /api/v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            huge.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = conn.read_to_end(&mut answer);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), read).await;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert_error(
            413,
            &serde_json::from_str(body).unwrap(),
            413,
            "payload_too_large",
        );
    }
    // Chunked, no Content-Length: the cap applies while reading.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(api.addr).await.unwrap();
        let head = "POST /api/v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        conn.write_all(head.as_bytes()).await.unwrap();
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "y".repeat(64 * 1024));
        for _ in 0..32 {
            // The server may answer and close before everything is sent.
            if conn.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        let _ = conn.write_all(b"0\r\n\r\n").await;
        let mut buf = vec![0u8; 64];
        let n = conn.read(&mut buf).await.unwrap();
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    }
    // Nothing was created by any of the above.
    let (s, _) = api.register("bob").await;
    assert_eq!(s, 201);
}

async fn tokens(db: Db) {
    let api = TestApi::start(db).await;
    let token = api.user("carol").await;
    let api = &api;
    let me =
        |t: Option<String>| async move { api.call(Method::GET, "/api/v1/auth/me", t.as_deref(), None).await };
    let (s, _) = me(Some(token.clone())).await;
    assert_eq!(s, 200);

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let alg_none = format!("{}.{}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let mut forged_claims = claims.clone();
    forged_claims["sub"] = json!("999");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(forged_claims.to_string()),
        parts[2]
    );
    let expired = api
        .auth
        .sign(&webhoster::auth::Claims {
            sub: claims["sub"].as_str().unwrap().into(),
            iat: now - 3600,
            exp: now - 10,
            ver: 0,
        })
        .unwrap();
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(common::control::SECRET),
    )
    .unwrap();
    for bad in [
        None,
        Some(alg_none),
        Some(tampered),
        Some(expired),
        Some(hs512),
        Some("garbage".into()),
    ] {
        let (s, b) = me(bad.clone()).await;
        assert_error(s, &b, 401, "unauthorized");
    }
    // Wrong scheme.
    let resp = api
        .client
        .get(api.url("/api/v1/auth/me"))
        .header("authorization", format!("Basic {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    // Every protected route refuses a missing token.
    for (m, p) in [
        (Method::POST, "/api/v1/host"),
        (Method::GET, "/api/v1/host/my"),
        (Method::DELETE, "/api/v1/host/my"),
        (Method::POST, "/api/v1/host/my/start"),
        (Method::POST, "/api/v1/host/my/stop"),
        (Method::POST, "/api/v1/host/my/restart"),
        (Method::GET, "/api/v1/host/my/console"),
        (Method::GET, "/api/v1/host/my/usage"),
        (Method::POST, "/api/v1/host/my/backups"),
        (Method::GET, "/api/v1/host/my/backups"),
        (Method::POST, "/api/v1/host/my/backups/1/restore"),
        (Method::DELETE, "/api/v1/host/my/backups/1"),
    ] {
        let (s, b) = api.call(m, p, None, None).await;
        assert_error(s, &b, 401, "unauthorized");
    }
}

async fn host_lifecycle(db: Db) {
    let api = TestApi::start(db).await;
    let token = api.user("dave").await;
    let t = Some(token.as_str());
    let (s, b) = api.call(Method::GET, "/api/v1/host/my", t, None).await;
    assert_error(s, &b, 404, "no_hosting");
    let (s, b) = api.call(Method::DELETE, "/api/v1/host/my", t, None).await;
    assert_error(s, &b, 404, "no_hosting");
    let (s, b) = api.call(Method::POST, "/api/v1/host/my/start", t, None).await;
    assert_error(s, &b, 404, "no_hosting");

    // No key anywhere: one is generated and its private half returned once.
    let (s, b) = api.call(Method::POST, "/api/v1/host", t, None).await;
    assert_eq!(s, 201, "{b}");
    let d = &b["data"];
    let user_id = api.call(Method::GET, "/api/v1/auth/me", t, None).await.1["data"]["id"]
        .as_i64()
        .unwrap();
    assert_eq!(d["hosting"]["status"], "running");
    let port = d["hosting"]["ssh_port"].as_u64().unwrap();
    assert!((10000..=20000).contains(&port));
    assert!(d["hosting"]["vm_id"].as_str().unwrap().starts_with("vm-"));
    assert!(d["hosting"]["vm_ip"].as_str().unwrap().starts_with("10.99.0."));
    assert!(d["hosting"]["id"].is_i64() && d["hosting"]["created_at"].is_string());
    assert_eq!(d["web_url"], format!("http://example.test/{user_id}/"));
    assert_eq!(d["ssh_command"], format!("ssh -p {port} ubuntu@example.test"));
    let private = d["private_key"].as_str().unwrap();
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    let held = api.world.held();
    assert_eq!(
        (
            held.vms.len(),
            held.taps.len(),
            held.disks.len(),
            held.seeds.len()
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(held.sites[&user_id].username, "dave");
    assert_eq!(held.forwards.values().next().unwrap().0 as u64, port);

    let (s, b2) = api.call(Method::GET, "/api/v1/host/my", t, None).await;
    assert_eq!(s, 200);
    assert_eq!(b2["data"]["hosting"], d["hosting"]);
    assert_eq!(b2["data"]["web_url"], d["web_url"]);
    assert!(
        b2["data"].get("private_key").is_none(),
        "the private key is shown once"
    );

    let (s, b) = api.call(Method::POST, "/api/v1/host", t, None).await;
    assert_error(s, &b, 409, "hosting_exists");

    // Power.
    // Power calls are idempotent: each brings the hosting to what it asks.
    let (s, b) = api.call(Method::POST, "/api/v1/host/my/start", t, None).await;
    assert_eq!(
        (s, b["data"]["hosting"]["status"].as_str()),
        (200, Some("running")),
        "{b}"
    );
    let (s, b) = api.call(Method::POST, "/api/v1/host/my/stop", t, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["hosting"]["status"], "stopped");
    assert_eq!(b["data"]["hosting"]["desired"], "stopped");
    let (s, b) = api.call(Method::POST, "/api/v1/host/my/stop", t, None).await;
    assert_eq!(
        (s, b["data"]["hosting"]["status"].as_str()),
        (200, Some("stopped")),
        "{b}"
    );
    let (s, b) = api.call(Method::POST, "/api/v1/host/my/start", t, None).await;
    assert_eq!(
        (s, b["data"]["hosting"]["status"].as_str()),
        (200, Some("running"))
    );
    let (s, b) = api.call(Method::POST, "/api/v1/host/my/restart", t, None).await;
    assert_eq!(
        (s, b["data"]["hosting"]["status"].as_str()),
        (200, Some("running"))
    );
    let calls = api.world.calls();
    for c in ["engine.stop", "engine.restart"] {
        assert!(
            calls.iter().any(|x| x.starts_with(c)),
            "{c} not called: {calls:?}"
        );
    }

    // Console: the tail of the serial log.
    let vm_id = d["hosting"]["vm_id"].as_str().unwrap();
    let log = api.world.ports().engine.serial_log(vm_id);
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let text: String = (1..=300).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&log, text).unwrap();
    let (s, b) = api
        .call(Method::GET, "/api/v1/host/my/console?lines=5", t, None)
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["data"]["lines"],
        json!(["line 296", "line 297", "line 298", "line 299", "line 300"])
    );
    // Just after a rotation the lines before come from `serial.log.1`.
    std::fs::rename(&log, webhoster::logfile::generation(&log, 1)).unwrap();
    std::fs::write(&log, "line 301\n").unwrap();
    let (s, b) = api
        .call(Method::GET, "/api/v1/host/my/console?lines=3", t, None)
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["lines"], json!(["line 299", "line 300", "line 301"]));
    let (s, b) = api
        .call(Method::GET, "/api/v1/host/my/console?lines=0", t, None)
        .await;
    assert_error(s, &b, 422, "validation_failed");
    assert_eq!(b["error"]["fields"][0]["field"], "lines", "{b}");

    let (s, b) = api.call(Method::DELETE, "/api/v1/host/my", t, None).await;
    assert_eq!(s, 200, "{b}");
    assert!(api.world.held().is_empty(), "{:?}", api.world.held());
    let (s, _) = api.call(Method::GET, "/api/v1/host/my", t, None).await;
    assert_eq!(s, 404);

    // The generated public key was kept: the next create uses it, no new private key.
    let (s, b) = api.call(Method::POST, "/api/v1/host", t, None).await;
    assert_eq!(s, 201, "{b}");
    assert!(b["data"].get("private_key").is_none());
}

async fn host_keys(db: Db) {
    let api = TestApi::start(db).await;
    let token = api.user("erin").await;
    let t = Some(token.as_str());
    for bad in [
        format!("{ED25519}\n{ED25519}"),
        format!("{ED25519}\nruncmd: [reboot]"),
        "#cloud-config\nruncmd: [reboot]".to_owned(),
        RSA_1024.to_owned(),
        DSA.to_owned(),
        "ssh-ed25519 AAAAnotbase64".to_owned(),
        "ssh-ed25519".to_owned(),
    ] {
        let (s, b) = api
            .call(
                Method::POST,
                "/api/v1/host",
                t,
                Some(json!({"ssh_public_key": bad})),
            )
            .await;
        assert_error(s, &b, 422, "invalid_ssh_key");
    }
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/host",
            t,
            Some(json!({"ssh_public_key": ED25519, "extra": 1})),
        )
        .await;
    assert_error(s, &b, 400, "bad_request");
    let (s, _) = api.call(Method::GET, "/api/v1/host/my", t, None).await;
    assert_eq!(s, 404, "no hosting came out of rejected requests");
    assert!(api.world.calls().is_empty());

    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/host",
            t,
            Some(json!({"ssh_public_key": format!("{ECDSA}\n")})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert!(b["data"].get("private_key").is_none());
}

async fn async_create(db: Db) {
    let api = TestApi::start(db).await;
    let token = api.user("frank").await;
    let t = Some(token.as_str());
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/host?wait=false",
            t,
            Some(json!({"ssh_public_key": ED25519})),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["data"]["hosting"]["status"], "creating");
    let mut last = Value::Null;
    for _ in 0..200 {
        let (s, b) = api.call(Method::GET, "/api/v1/host/my", t, None).await;
        assert_eq!(s, 200);
        last = b["data"]["hosting"].clone();
        if last["status"] == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(last["status"], "running", "{last}");
    assert_eq!(last["step"], Value::Null);

    // Progress: a create stuck at a step shows it; a DELETE cancels it.
    let token2 = api.user("grace").await;
    let t2 = Some(token2.as_str());
    api.world.hang_on("probe.guest_site");
    let (s, _) = api.call(Method::POST, "/api/v1/host?wait=false", t2, None).await;
    assert_eq!(s, 202);
    let mut steps_seen = Vec::new();
    for _ in 0..200 {
        let (_, b) = api.call(Method::GET, "/api/v1/host/my", t2, None).await;
        assert_eq!(b["data"]["hosting"]["status"], "creating");
        let step = b["data"]["hosting"]["step"].clone();
        if steps_seen.last() != Some(&step) {
            steps_seen.push(step.clone());
        }
        if step == "ready" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(steps_seen.last(), Some(&json!("ready")), "{steps_seen:?}");
    let (s, b) = api.call(Method::POST, "/api/v1/host?wait=maybe", t2, None).await;
    assert_error(s, &b, 422, "validation_failed");
    assert_eq!(b["error"]["fields"][0]["field"], "wait", "{b}");
    let (s, b) = api.call(Method::DELETE, "/api/v1/host/my", t2, None).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api.call(Method::GET, "/api/v1/host/my", t2, None).await;
    assert_error(s, &b, 404, "no_hosting");

    // A background create that fails is rolled back, and GET says why.
    let token3 = api.user("ivy").await;
    let t3 = Some(token3.as_str());
    api.world.clear_faults();
    api.world.fail_on("engine.spawn");
    let (s, _) = api.call(Method::POST, "/api/v1/host?wait=false", t3, None).await;
    assert_eq!(s, 202);
    // The rollback runs in the background: bounded generously, as the
    // machine may be busy with other tests.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let last = loop {
        let last = api.call(Method::GET, "/api/v1/host/my", t3, None).await;
        if last.0 == 404 || std::time::Instant::now() > deadline {
            break last;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_error(last.0, &last.1, 404, "no_hosting");
    let msg = last.1["message"].as_str().unwrap();
    assert!(msg.contains("failed at step spawn"), "{msg}");
    assert!(
        !msg.contains("injected"),
        "the cause is logged, not echoed: {msg}"
    );
}

async fn system(db: Db) {
    let api = TestApi::start(db).await;
    let (s, b) = api.call(Method::GET, "/api/v1/health", None, None).await;
    assert_eq!((s, b["success"].as_bool()), (200, Some(true)));
    let (s, b) = api.call(Method::GET, "/api/v1/health/detailed", None, None).await;
    assert_eq!(s, 200, "{b}");
    let names: Vec<&str> = b["data"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in ["database", "qemu", "accel", "image", "namespace", "nginx", "disk"] {
        assert!(names.contains(&n), "{n} missing in {names:?}");
    }
    let pool = &b["data"]["pool"];
    assert_eq!(
        (pool["ready"].as_u64(), pool["target"].as_u64()),
        (Some(0), Some(0)),
        "{b}"
    );
    assert_eq!(pool["template"]["state"], "absent", "{b}");
    // Health is a snapshot taken every few seconds: a part going down shows
    // within one period.
    api.world.set_unhealthy("nginx", true);
    let (mut s, mut b) = (0, Value::Null);
    for _ in 0..100 {
        (s, b) = api.call(Method::GET, "/api/v1/health/detailed", None, None).await;
        if s == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_error(s, &b, 503, "unhealthy");
    assert!(b["message"].as_str().unwrap().contains("nginx"));
    assert!(b["data"]["checked_seconds_ago"].as_f64().unwrap() < 10.0, "{b}");
    api.world.set_unhealthy("nginx", false);

    let (s, b) = api.call(Method::GET, "/api/v1/version", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(b["data"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(b["data"]["git_commit"].is_string());
    assert_eq!(b["data"]["qemu_version"], "fake");

    let (s, doc) = api.call(Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/api/v1/auth/login",
        "/api/v1/host",
        "/api/v1/host/my",
        "/metrics",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing");
    }
    assert!(doc["paths"]["/api/v1/host/my"]["delete"].is_object());
    let resp = api.client.get(api.url("/docs")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("/api/v1/openapi.json"));
    // Swagger UI's files come from the binary; a missing one is an enveloped 404.
    let resp = api
        .client
        .get(api.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );
    assert!(resp.bytes().await.unwrap().len() > 100_000);
    let resp = api.client.get(api.url("/docs/nope.js")).send().await.unwrap();
    assert_error(404, &resp.json().await.unwrap(), 404, "not_found");

    // Routing errors come in the envelope, with a request id.
    let resp = api.client.get(api.url("/nope")).send().await.unwrap();
    assert!(resp.headers().contains_key("x-request-id"));
    let s = resp.status().as_u16();
    assert_error(s, &resp.json().await.unwrap(), 404, "not_found");
    let resp = api.client.put(api.url("/api/v1/host/my")).send().await.unwrap();
    assert_eq!(resp.headers()["allow"], "GET, DELETE");
    let s = resp.status().as_u16();
    assert_error(s, &resp.json().await.unwrap(), 405, "method_not_allowed");

    let token = api.user("heidi").await;
    let t = Some(token.as_str());
    let (s, b) = api.call(Method::GET, "/api/v1/host/my/usage", t, None).await;
    assert_error(s, &b, 404, "no_hosting");
    let (s, b) = api.call(Method::POST, "/api/v1/host", t, None).await;
    assert_eq!(s, 201);
    let vm_id = b["data"]["hosting"]["vm_id"].as_str().unwrap().to_owned();
    // No sampler yet: the hosting has no usage, and says so.
    let (s, b) = api.call(Method::GET, "/api/v1/host/my/usage", t, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["data"],
        json!({"vm_id": vm_id, "sample_every_seconds": null, "latest": null, "history": []})
    );
    // Two passes of a sampler (the real one is driven in e2e_hosting).
    for (at, cpu) in [(1000, 1.5), (1015, 3.0)] {
        api.usage.record(webhoster::usage::Pass {
            at,
            samples: vec![(
                vm_id.clone(),
                webhoster::usage::Sample {
                    at,
                    cpu_seconds: cpu,
                    rss_bytes: 200 << 20,
                    disk_read_bytes: 10,
                    disk_write_bytes: 20,
                    net_rx_bytes: 30,
                    net_tx_bytes: 40,
                },
            )],
            known: [vm_id.clone()].into(),
        });
    }
    let (s, b) = api.call(Method::GET, "/api/v1/host/my/usage", t, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["history"].as_array().unwrap().len(), 2, "{b}");
    assert_eq!(b["data"]["history"][0]["at"], 1000);
    assert_eq!(
        b["data"]["latest"],
        json!({"at": 1015, "cpu_seconds": 3.0, "rss_bytes": 200 << 20, "disk_read_bytes": 10,
               "disk_write_bytes": 20, "net_rx_bytes": 30, "net_tx_bytes": 40})
    );
    let text = api.metrics().await;
    for needle in [
        "webhoster_http_requests_total{route=\"/api/v1/auth/register\",status=\"2xx\"} 1",
        "webhoster_http_requests_total{route=\"unmatched\",status=\"4xx\"} 1",
        "webhoster_http_request_duration_seconds_bucket{route=\"/api/v1/host\",le=\"+Inf\"} 1",
        "webhoster_hostings{status=\"running\"} 1",
        "webhoster_create_duration_seconds_count{path=\"cold\"} 1",
        "webhoster_create_duration_seconds_count{path=\"warm\"} 0",
        "webhoster_create_step_duration_seconds_count{path=\"cold\",step=\"spawn\"} 1",
        "webhoster_create_fallbacks_total 0",
        "webhoster_pool_ready 0",
        "webhoster_pool_target 0",
        "# TYPE webhoster_vm_cpu_seconds_total counter",
        &format!("webhoster_vm_cpu_seconds_total{{vm_id=\"{vm_id}\"}} 3"),
        &format!("webhoster_vm_memory_rss_bytes{{vm_id=\"{vm_id}\"}} 209715200"),
        &format!("webhoster_vm_network_transmit_bytes_total{{vm_id=\"{vm_id}\"}} 40"),
    ] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
    // Deleted: its usage goes with it at the next pass, and from /metrics.
    let (s, _) = api.call(Method::DELETE, "/api/v1/host/my", t, None).await;
    assert_eq!(s, 200);
    api.usage.record(webhoster::usage::Pass {
        at: 1030,
        ..Default::default()
    });
    assert!(!api.metrics().await.contains(&vm_id));
    let (s, b) = api.call(Method::GET, "/api/v1/host/my/usage", t, None).await;
    assert_error(s, &b, 404, "no_hosting");
}

/// `/health/detailed` and `/version` serve the snapshot a background task
/// takes every few seconds: a burst of them probes the system (for real: the
/// doctor's checks and `qemu --version`, which run programs) no more often.
async fn health_snapshot(db: Db) {
    let api = TestApi::start(db).await;
    let before = api.world.system_probes();
    let calls = (0..400).map(|i| {
        let path = if i % 2 == 0 {
            "/api/v1/health/detailed"
        } else {
            "/api/v1/version"
        };
        api.call(Method::GET, path, None, None)
    });
    for (s, b) in futures::future::join_all(calls).await {
        assert_eq!(s, 200, "{b}");
    }
    // Two probes per refresh, one refresh per 5 s; per request it would be 400.
    let probes = api.world.system_probes() - before;
    assert!(probes < 40, "{probes} system probes for 400 requests");
}

async fn graceful_shutdown(db: Db) {
    let api = TestApi::start(db).await;
    let token = api.user("olga").await;
    api.world
        .delay_on("proxy.add_site", std::time::Duration::from_millis(400));
    let client = api.client.clone();
    let url = api.url("/api/v1/host");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(token)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // Let the request get in, then stop the server while it runs.
    for _ in 0..200 {
        if api.world.calls().iter().any(|c| c.starts_with("proxy.add_site")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let addr = api.addr;
    let store = api.store.clone();
    let _db = api.stop().await;
    // The request in flight finished; new connections are refused.
    assert_eq!(in_flight.await.unwrap().unwrap(), 201);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let all = store.all_hostings().await;
    assert!(
        all.is_err()
            || all
                .unwrap()
                .iter()
                .all(|h| h.state == webhoster::hosting::HostingState::Running)
    );
}

/// Register and log-in are limited per client address and log-in per
/// account: the 429 is in the envelope, with Retry-After.
async fn rate_limits(db: Db) {
    use webhoster::api::ratelimit::{AuthLimits, Rate};
    let limits = AuthLimits {
        per_ip: Some(Rate {
            burst: 6,
            per_minute: 1,
        }),
        per_account: Some(Rate {
            burst: 2,
            per_minute: 1,
        }),
    };
    let api = TestApi::start_with_limits(common::control::TestDb::new(db).await, limits).await;
    let login = |user: &'static str, password: &'static str| {
        let client = api.client.clone();
        let url = api.url("/api/v1/auth/login");
        async move {
            let resp = client
                .post(url)
                .form(&[("username", user), ("password", password)])
                .send()
                .await
                .unwrap();
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (resp.status().as_u16(), retry, resp.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(api.register("rlone").await.0, 201);
    assert_eq!(api.register("rltwo").await.0, 201);
    // Per account: two guesses, then 429, whoever asks.
    assert_eq!(login("rlone", "wrong-password").await.0, 401);
    assert_eq!(login("rlone", "wrong-password").await.0, 401);
    let (s, retry, b) = login("rlone", "password123").await;
    assert_error(s, &b, 429, "rate_limited");
    let secs: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    // Another account from the same address still logs in.
    assert_eq!(login("rltwo", "password123").await.0, 200);
    // Per address: that was the 6th hash-costing call (2 registers, 4
    // logins, the refused one counted); now every register and login is 429.
    let (s, b) = api.register("rlthree").await;
    assert_error(s, &b, 429, "rate_limited");
    assert_eq!(login("rltwo", "password123").await.0, 429);
    // Routes that cost no hash are not limited.
    let (s, _) = api.call(Method::GET, "/api/v1/health", None, None).await;
    assert_eq!(s, 200);
}

/// Backups are reached only through one's own hosting: another user's id is
/// a 404 like one that never existed. (Taking and restoring backups needs
/// real QEMU: `tests/e2e_backup.rs`.)
async fn backup_access(db: Db) {
    use webhoster::store::Consistency;
    let api = TestApi::start(db).await;
    let erin = api.user("erin").await;
    let frank = api.user("frank").await;
    let (e, f) = (Some(erin.as_str()), Some(frank.as_str()));
    let (s, b) = api.call(Method::GET, "/api/v1/host/my/backups", e, None).await;
    assert_error(s, &b, 404, "no_hosting");
    for t in [e, f] {
        let (s, b) = api.call(Method::POST, "/api/v1/host", t, None).await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = api.call(Method::GET, "/api/v1/host/my/backups", e, None).await;
    assert_eq!((s, &b["data"]), (200, &json!([])), "{b}");
    let hosting = api
        .hosting
        .get(
            api.call(Method::GET, "/api/v1/auth/me", e, None).await.1["data"]["id"]
                .as_i64()
                .unwrap(),
        )
        .await
        .unwrap();
    let done = api.store.insert_backup(hosting.id, None).await.unwrap();
    api.store
        .complete_backup(done.id, None, Consistency::Frozen, 4096)
        .await
        .unwrap();
    let running = api.store.insert_backup(hosting.id, Some(done.id)).await.unwrap();

    let (s, b) = api.call(Method::GET, "/api/v1/host/my/backups", e, None).await;
    assert_eq!(s, 200, "{b}");
    let rows = b["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{b}");
    assert_eq!(rows[0]["id"], done.id);
    assert_eq!(rows[0]["status"], "complete");
    assert_eq!(rows[0]["kind"], "full");
    assert_eq!(rows[0]["consistency"], "frozen");
    assert_eq!(rows[0]["size_bytes"], 4096);
    assert!(
        rows[0]["completed_at"].is_string() && rows[0]["progress"].is_null(),
        "{b}"
    );
    assert_eq!(rows[1]["status"], "running");
    assert_eq!(rows[1]["parent_id"], done.id);

    // Frank sees none of them and cannot touch them.
    let (s, b) = api.call(Method::GET, "/api/v1/host/my/backups", f, None).await;
    assert_eq!((s, &b["data"]), (200, &json!([])), "{b}");
    let path = format!("/api/v1/host/my/backups/{}", done.id);
    let (s, b) = api.call(Method::DELETE, &path, f, None).await;
    assert_error(s, &b, 404, "no_backup");
    let (s, b) = api.call(Method::POST, &format!("{path}/restore"), f, None).await;
    assert_error(s, &b, 404, "no_backup");
    for bad in ["/api/v1/host/my/backups/x", "/api/v1/host/my/backups/999999"] {
        let (s, b) = api.call(Method::DELETE, bad, e, None).await;
        assert_error(s, &b, 404, "no_backup");
    }
    // A backup still being taken is neither restored nor deleted.
    let path = format!("/api/v1/host/my/backups/{}", running.id);
    let (s, b) = api.call(Method::POST, &format!("{path}/restore"), e, None).await;
    assert_error(s, &b, 409, "hosting_busy");
    let (s, b) = api.call(Method::GET, &format!("{path}/restore"), e, None).await;
    assert_error(s, &b, 405, "method_not_allowed");

    // Deleting the hosting deletes its backups' rows (the files go with the
    // VM directory).
    let (s, b) = api.call(Method::DELETE, "/api/v1/host/my", e, None).await;
    assert_eq!(s, 200, "{b}");
    assert!(api.store.backups(hosting.id).await.unwrap().is_empty());
}

both_backends!(
    backup_access,
    rate_limits,
    accounts,
    validation,
    tokens,
    host_lifecycle,
    host_keys,
    async_create,
    system,
    health_snapshot,
    graceful_shutdown,
);
