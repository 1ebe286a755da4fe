//! The account routes over HTTP (SSH keys, password change, log out
//! everywhere, account deletion) and token revocation, against SQLite and
//! PostgreSQL. The VM parts are fakes (tests/common/fakes.rs); the store,
//! auth, accounts, orchestrator and API are the real code.

mod common;

use reqwest::Method;
use serde_json::{Value, json};

use common::control::{Db, TestApi};

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";
/// What `ssh-keygen -lf` prints for ED25519.
const ED25519_FINGERPRINT: &str = "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU";
const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBDwW9IEtBvNEDzrHm+pWJOn7Jj150wlpsXyVRANtEq1msVUVUR1hNSNmREjGDqJaMT08YyccSWm+Ne9fGpiEtJg= root@vm";
const RSA_1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCwiu1b2zbnYHljqNyxj9bsJlUt9Y+QSSaTAvNMiw6BIRqyN0jgXq0ipp3AiTlzC8c/XWxxVGgF389SVHL88l7gHCt93suAooA7rV6ODWlcQh0uovNr6XC2bfqO7HLh7Z54bkIHw7/m9kadQpR43KAjICMu+2BEhFu5D+uaZsNRbw== root@vm";

const KEYS: &str = "/api/v1/account/ssh-keys";
const PASSWORD: &str = "/api/v1/account/password";
const ACCOUNT: &str = "/api/v1/account";
const LOGOUT_ALL: &str = "/api/v1/auth/logout-all";
const ME: &str = "/api/v1/auth/me";

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body.get("data").is_some(), "envelope has data: {body}");
}

/// The `field`s of a 422's `error.fields`, in order.
fn bad_fields(body: &Value) -> Vec<String> {
    body["error"]["fields"]
        .as_array()
        .unwrap_or_else(|| panic!("no error.fields: {body}"))
        .iter()
        .map(|f| {
            assert!(f["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
            f["field"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Logs in with `password`; the status and the token (if any).
async fn login_with(api: &TestApi, user: &str, password: &str) -> (u16, Option<String>) {
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"username": user, "password": password})),
        )
        .await;
    (s, b["data"]["access_token"].as_str().map(str::to_owned))
}

async fn me_status(api: &TestApi, token: &str) -> u16 {
    api.call(Method::GET, ME, Some(token), None).await.0
}

/// Every new route refuses a request without a valid token, before it reads
/// the body.
async fn routes_need_a_token(db: Db) {
    let api = TestApi::start(db).await;
    for (m, p, body) in [
        (Method::GET, KEYS.to_owned(), None),
        (
            Method::POST,
            KEYS.to_owned(),
            Some(json!({"public_key": ED25519})),
        ),
        (Method::DELETE, format!("{KEYS}/1"), None),
        (
            Method::POST,
            PASSWORD.to_owned(),
            Some(json!({"current_password": "password123", "new_password": "password456"})),
        ),
        (Method::POST, LOGOUT_ALL.to_owned(), None),
        (
            Method::DELETE,
            ACCOUNT.to_owned(),
            Some(json!({"password": "password123"})),
        ),
    ] {
        for token in [None, Some("garbage")] {
            let (s, b) = api.call(m.clone(), &p, token, body.clone()).await;
            assert_error(s, &b, 401, "unauthorized");
        }
    }
    // Wrong methods are 405 in the envelope.
    let (s, b) = api.call(Method::PUT, KEYS, None, None).await;
    assert_error(s, &b, 405, "method_not_allowed");
    let (s, b) = api.call(Method::GET, PASSWORD, None, None).await;
    assert_error(s, &b, 405, "method_not_allowed");
    // And the OpenAPI document lists them.
    let (_, doc) = api.call(Method::GET, "/api/v1/openapi.json", None, None).await;
    for (path, method) in [
        (KEYS, "get"),
        (KEYS, "post"),
        ("/api/v1/account/ssh-keys/{id}", "delete"),
        (PASSWORD, "post"),
        (LOGOUT_ALL, "post"),
        (ACCOUNT, "delete"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{path} {method} in {doc}");
    }
}

async fn ssh_keys(db: Db) {
    let api = TestApi::start(db).await;
    let token = api.user("kim").await;
    let t = Some(token.as_str());
    let (s, b) = api.call(Method::GET, KEYS, t, None).await;
    assert_eq!((s, &b["data"]), (200, &json!([])), "{b}");

    // Pasted from a file: the trailing newline is trimmed.
    let (s, b) = api
        .call(
            Method::POST,
            KEYS,
            t,
            Some(json!({"public_key": format!("{ED25519}\n")})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let first = b["data"].clone();
    assert!(first["id"].as_i64().unwrap() > 0, "{b}");
    assert_eq!(first["algorithm"], "ssh-ed25519");
    assert_eq!(first["fingerprint"], ED25519_FINGERPRINT);
    assert_eq!(first["comment"], "test@example");
    assert_eq!(first["public_key"], ED25519);
    assert!(first["created_at"].is_string());

    // The same key again, with another comment too: 409, nothing added.
    let (body, _) = ED25519.rsplit_once(' ').unwrap();
    for again in [ED25519.to_owned(), format!("{body} other@host"), body.to_owned()] {
        let (s, b) = api
            .call(Method::POST, KEYS, t, Some(json!({"public_key": again})))
            .await;
        assert_error(s, &b, 409, "ssh_key_exists");
    }
    // Bad keys: 422 naming the field; nothing added.
    for bad in [
        format!("{ED25519}\n{ED25519}"),
        format!("{ED25519}\nruncmd: [reboot]"),
        RSA_1024.to_owned(),
        "ssh-ed25519 AAAAnotbase64".to_owned(),
        String::new(),
    ] {
        let (s, b) = api
            .call(Method::POST, KEYS, t, Some(json!({"public_key": bad})))
            .await;
        assert_error(s, &b, 422, "validation_failed");
        assert_eq!(bad_fields(&b), ["public_key"], "{b}");
    }
    // Malformed bodies: 400.
    for bad in [
        json!({"public_key": ED25519, "admin": true}),
        json!({}),
        json!({"public_key": 1}),
    ] {
        let (s, b) = api.call(Method::POST, KEYS, t, Some(bad)).await;
        assert_error(s, &b, 400, "bad_request");
    }
    let (s, b) = api
        .call(Method::POST, KEYS, t, Some(json!({"public_key": ECDSA})))
        .await;
    assert_eq!(s, 201, "{b}");
    let second = b["data"].clone();
    assert_eq!(second["algorithm"], "ecdsa-sha2-nistp256");
    assert_eq!(second["comment"], "root@vm");
    let (s, b) = api.call(Method::GET, KEYS, t, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"], json!([first, second]), "oldest first");

    // Another account sees none of them and cannot remove them.
    let other = api.user("lee").await;
    let o = Some(other.as_str());
    let (s, b) = api.call(Method::GET, KEYS, o, None).await;
    assert_eq!((s, &b["data"]), (200, &json!([])), "{b}");
    let first_path = format!("{KEYS}/{}", first["id"]);
    let (s, b) = api.call(Method::DELETE, &first_path, o, None).await;
    assert_error(s, &b, 404, "no_ssh_key");
    // The other account may hold the same key: uniqueness is per account.
    let (s, b) = api
        .call(Method::POST, KEYS, o, Some(json!({"public_key": ED25519})))
        .await;
    assert_eq!(s, 201, "{b}");
    for missing in ["/999999", "/x", "/-1"] {
        let (s, b) = api
            .call(Method::DELETE, &format!("{KEYS}{missing}"), t, None)
            .await;
        assert_error(s, &b, 404, "no_ssh_key");
    }
    assert_eq!(
        api.call(Method::GET, KEYS, t, None).await.1["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let (s, b) = api.call(Method::DELETE, &first_path, t, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["success"], true);
    let (s, b) = api.call(Method::DELETE, &first_path, t, None).await;
    assert_error(s, &b, 404, "no_ssh_key");
    let (_, b) = api.call(Method::GET, KEYS, t, None).await;
    assert_eq!(b["data"], json!([second]));

    // A hosting created without a key gets the account's keys: no key pair
    // is generated, so no private key comes back.
    let (s, b) = api.call(Method::POST, "/api/v1/host", t, None).await;
    assert_eq!(s, 201, "{b}");
    assert!(b["data"].get("private_key").is_none(), "{b}");
}

async fn change_password(db: Db) {
    let api = TestApi::start(db).await;
    let old = api.user("mia").await;
    let other_session = api.login("mia").await;
    let change = |token: String, body: Value| {
        let api = &api;
        async move { api.call(Method::POST, PASSWORD, Some(&token), Some(body)).await }
    };

    // Wrong current password: 403 and nothing changes.
    let (s, b) = change(
        old.clone(),
        json!({"current_password": "not-my-password", "new_password": "password456"}),
    )
    .await;
    assert_error(s, &b, 403, "wrong_password");
    assert_eq!(me_status(&api, &old).await, 200);
    assert_eq!(login_with(&api, "mia", "password123").await.0, 200);
    assert_eq!(login_with(&api, "mia", "password456").await.0, 401);

    // Bad fields: 422 naming each; nothing changes.
    let (s, b) = change(
        old.clone(),
        json!({"current_password": "password123", "new_password": "short"}),
    )
    .await;
    assert_error(s, &b, 422, "validation_failed");
    assert_eq!(bad_fields(&b), ["new_password"]);
    assert_eq!(b["message"], "password must be at least 8 characters");
    let (s, b) = change(
        old.clone(),
        json!({"current_password": "", "new_password": "x".repeat(1025)}),
    )
    .await;
    assert_error(s, &b, 422, "validation_failed");
    assert_eq!(bad_fields(&b), ["current_password", "new_password"]);
    for bad in [
        json!({"current_password": "password123"}),
        json!({"current_password": "password123", "new_password": "password456", "x": 1}),
    ] {
        let (s, b) = change(old.clone(), bad).await;
        assert_error(s, &b, 400, "bad_request");
    }
    assert_eq!(me_status(&api, &old).await, 200);

    // The change: a new token in log-in's shape; every older token is 401 on
    // every route, the new one works.
    let (s, b) = change(
        old.clone(),
        json!({"current_password": "password123", "new_password": "password456"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["token_type"], "bearer");
    assert_eq!(b["data"]["expires_in"], 600);
    let new = b["data"]["access_token"].as_str().unwrap().to_owned();
    for stale in [&old, &other_session] {
        let (s, b) = api.call(Method::GET, ME, Some(stale), None).await;
        assert_error(s, &b, 401, "unauthorized");
        let (s, b) = api.call(Method::GET, "/api/v1/host/my", Some(stale), None).await;
        assert_error(s, &b, 401, "unauthorized");
        let (s, b) = api.call(Method::GET, KEYS, Some(stale), None).await;
        assert_error(s, &b, 401, "unauthorized");
    }
    assert_eq!(me_status(&api, &new).await, 200);
    assert_eq!(login_with(&api, "mia", "password123").await.0, 401);
    let (s, fresh) = login_with(&api, "mia@example.com", "password456").await;
    assert_eq!(s, 200);
    assert_eq!(me_status(&api, &fresh.unwrap()).await, 200);
    // A revoked token cannot change the password back either.
    let (s, b) = change(
        old.clone(),
        json!({"current_password": "password456", "new_password": "password123"}),
    )
    .await;
    assert_error(s, &b, 401, "unauthorized");
}

/// Changes racing with the same current password: exactly one wins; the
/// others see the password changed (403) or their token revoked (401), and
/// only the winner's new password logs in.
async fn concurrent_password_changes(db: Db) {
    let api = TestApi::start(db).await;
    let token = api.user("ned").await;
    let news: Vec<String> = (0..4).map(|i| format!("new-password-{i}")).collect();
    let answers = futures::future::join_all(news.iter().map(|new| {
        api.call(
            Method::POST,
            PASSWORD,
            Some(&token),
            Some(json!({"current_password": "password123", "new_password": new})),
        )
    }))
    .await;
    let winners: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, (s, _))| *s == 200)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    for (s, b) in &answers {
        assert!([200, 401, 403].contains(s), "{s} {b}");
    }
    let winner = winners[0];
    for (i, new) in news.iter().enumerate() {
        let want = if i == winner { 200 } else { 401 };
        assert_eq!(login_with(&api, "ned", new).await.0, want, "{new}");
    }
    assert_eq!(login_with(&api, "ned", "password123").await.0, 401);
    assert_eq!(me_status(&api, &token).await, 401);
    let fresh = answers[winner].1["data"]["access_token"].as_str().unwrap();
    assert_eq!(me_status(&api, fresh).await, 200);
}

async fn logout_all(db: Db) {
    let api = TestApi::start(db).await;
    let a = api.user("oli").await;
    let b = api.login("oli").await;
    let bystander = api.user("pat").await;
    // Unknown fields are refused, and refuse nothing else.
    let (s, body) = api
        .call(
            Method::POST,
            LOGOUT_ALL,
            Some(&a),
            Some(json!({"everywhere": true})),
        )
        .await;
    assert_error(s, &body, 400, "bad_request");
    assert_eq!(me_status(&api, &a).await, 200);

    let (s, body) = api.call(Method::POST, LOGOUT_ALL, Some(&a), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["success"], true);
    for stale in [&a, &b] {
        assert_eq!(me_status(&api, stale).await, 401);
        let (s, body) = api.call(Method::POST, LOGOUT_ALL, Some(stale), None).await;
        assert_error(s, &body, 401, "unauthorized");
    }
    assert_eq!(
        me_status(&api, &bystander).await,
        200,
        "other accounts keep theirs"
    );
    // The password still works; a new token does too, `{}` as a body as well.
    let c = api.login("oli").await;
    assert_eq!(me_status(&api, &c).await, 200);
    let (s, body) = api
        .call(Method::POST, LOGOUT_ALL, Some(&c), Some(json!({})))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(me_status(&api, &c).await, 401);
}

async fn delete_account(db: Db) {
    let api = TestApi::start(db).await;
    let bob = api.user("bob").await;
    let (s, b) = api.call(Method::POST, "/api/v1/host", Some(&bob), None).await;
    assert_eq!(s, 201, "{b}");
    let bob_vm = b["data"]["hosting"]["vm_id"].as_str().unwrap().to_owned();

    let token = api.user("quinn").await;
    let t = Some(token.as_str());
    let user_id = api.call(Method::GET, ME, t, None).await.1["data"]["id"]
        .as_i64()
        .unwrap();
    let (s, b) = api
        .call(Method::POST, KEYS, t, Some(json!({"public_key": ED25519})))
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = api.call(Method::POST, "/api/v1/host", t, None).await;
    assert_eq!(s, 201, "{b}");
    let vm = b["data"]["hosting"]["vm_id"].as_str().unwrap().to_owned();
    assert!(api.world.held().vms.contains_key(&vm));

    // Wrong password: 403, nothing changes. Bad bodies: 400 / 422.
    let (s, b) = api
        .call(
            Method::DELETE,
            ACCOUNT,
            t,
            Some(json!({"password": "wrong-password"})),
        )
        .await;
    assert_error(s, &b, 403, "wrong_password");
    for bad in [json!({}), json!({"password": "password123", "force": true})] {
        let (s, b) = api.call(Method::DELETE, ACCOUNT, t, Some(bad)).await;
        assert_error(s, &b, 400, "bad_request");
    }
    let (s, b) = api.call(Method::DELETE, ACCOUNT, t, None).await;
    assert_error(s, &b, 400, "bad_request");
    let (s, b) = api
        .call(Method::DELETE, ACCOUNT, t, Some(json!({"password": ""})))
        .await;
    assert_error(s, &b, 422, "validation_failed");
    assert_eq!(bad_fields(&b), ["password"]);
    assert_eq!(me_status(&api, &token).await, 200);
    let (s, _) = api.call(Method::GET, "/api/v1/host/my", t, None).await;
    assert_eq!(s, 200);
    assert!(api.world.held().vms.contains_key(&vm));

    let (s, b) = api
        .call(
            Method::DELETE,
            ACCOUNT,
            t,
            Some(json!({"password": "password123"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["success"], true);
    // The hosting is gone from the host: only bob's VM is held.
    let held = api.world.held();
    assert_eq!(held.vms.keys().collect::<Vec<_>>(), [&bob_vm], "{held:?}");
    assert_eq!(held.disks.iter().collect::<Vec<_>>(), [&bob_vm], "{held:?}");
    assert_eq!(held.sites.len(), 1, "{held:?}");
    assert_eq!(held.taps.len(), 1, "{held:?}");
    assert_eq!(held.forwards.len(), 1, "{held:?}");
    // And from the database, with the account and its keys.
    assert!(api.store.user_by_id(user_id).await.unwrap().is_none());
    assert!(api.store.hosting_by_user(user_id).await.unwrap().is_none());
    assert!(api.store.ssh_key_rows(user_id).await.unwrap().is_empty());
    // The token is 401 and the password logs in no more.
    let (s, b) = api.call(Method::GET, ME, t, None).await;
    assert_error(s, &b, 401, "unauthorized");
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "quinn", "password": "password123"})),
        )
        .await;
    assert_error(s, &b, 401, "invalid_credentials");
    // Bob's account and hosting are untouched.
    assert_eq!(me_status(&api, &bob).await, 200);
    let (s, _) = api.call(Method::GET, "/api/v1/host/my", Some(&bob), None).await;
    assert_eq!(s, 200);

    // The names are free again.
    assert_eq!(api.register("quinn").await.0, 201);

    // An account without a hosting goes too; then nothing at all is held.
    let (s, b) = api
        .call(
            Method::DELETE,
            ACCOUNT,
            Some(&bob),
            Some(json!({"password": "password123"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let held = api.world.held();
    assert!(held.is_empty(), "{held:?}");
    let quinn = api.login("quinn").await;
    let (s, b) = api
        .call(
            Method::DELETE,
            ACCOUNT,
            Some(&quinn),
            Some(json!({"password": "password123"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(login_with(&api, "quinn", "password123").await.0, 401);
}

/// A hosting whose teardown fails keeps the account (logged out everywhere,
/// so nothing new starts) and says why; a retry once the fault is gone
/// finishes.
async fn delete_account_when_teardown_fails(db: Db) {
    let api = TestApi::start(db).await;
    let token = api.user("ray").await;
    let t = Some(token.as_str());
    let (s, b) = api.call(Method::POST, "/api/v1/host", t, None).await;
    assert_eq!(s, 201, "{b}");
    api.world.fail_on("engine.destroy");
    let (s, b) = api
        .call(
            Method::DELETE,
            ACCOUNT,
            t,
            Some(json!({"password": "password123"})),
        )
        .await;
    assert!(s >= 500, "{s} {b}");
    assert_eq!(b["success"], false);
    // Revoked, but the account is there: log in and try again.
    assert_eq!(me_status(&api, &token).await, 401);
    api.world.clear_faults();
    let again = api.login("ray").await;
    let (s, b) = api
        .call(
            Method::DELETE,
            ACCOUNT,
            Some(&again),
            Some(json!({"password": "password123"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(api.world.held().is_empty(), "{:?}", api.world.held());
    assert_eq!(login_with(&api, "ray", "password123").await.0, 401);
}

/// Checking a current password costs a hash, so the log-in limits apply:
/// a stolen token cannot be used to guess the password fast.
async fn password_guesses_are_limited(db: Db) {
    use webhoster::api::ratelimit::{AuthLimits, Rate};
    let limits = AuthLimits {
        per_ip: None,
        per_account: Some(Rate {
            burst: 3,
            per_minute: 1,
        }),
    };
    let api = TestApi::start_with_limits(common::control::TestDb::new(db).await, limits).await;
    assert_eq!(api.register("sam").await.0, 201);
    let token = api.login("sam").await; // 1 of 3
    for _ in 0..2 {
        let (s, b) = api
            .call(
                Method::POST,
                PASSWORD,
                Some(&token),
                Some(json!({"current_password": "guess-guess", "new_password": "password456"})),
            )
            .await;
        assert_error(s, &b, 403, "wrong_password");
    }
    let (s, b) = api
        .call(
            Method::POST,
            PASSWORD,
            Some(&token),
            Some(json!({"current_password": "password123", "new_password": "password456"})),
        )
        .await;
    assert_error(s, &b, 429, "rate_limited");
    let (s, b) = api
        .call(
            Method::DELETE,
            ACCOUNT,
            Some(&token),
            Some(json!({"password": "password123"})),
        )
        .await;
    assert_error(s, &b, 429, "rate_limited");
    assert_eq!(me_status(&api, &token).await, 200, "nothing changed");
}

/// Sign-up names every bad field in `error.fields`, and keeps the summary
/// in `message`.
async fn field_errors(db: Db) {
    let api = TestApi::start(db).await;
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/auth/register",
            None,
            Some(json!({"email": "nope", "username": "ok_name", "password": "short"})),
        )
        .await;
    assert_error(s, &b, 422, "validation_failed");
    assert_eq!(bad_fields(&b), ["email", "password"]);
    assert_eq!(
        b["message"],
        "email is not a valid email address; password must be at least 8 characters"
    );
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "", "password": ""})),
        )
        .await;
    assert_error(s, &b, 422, "validation_failed");
    assert_eq!(bad_fields(&b), ["username", "password"]);
    let (s, b) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "x", "password": "y", "grant_type": "client_credentials"})),
        )
        .await;
    assert_error(s, &b, 422, "validation_failed");
    assert_eq!(bad_fields(&b), ["grant_type"]);
    // Errors that are not about fields carry none.
    let (s, b) = api.call(Method::GET, ME, None, None).await;
    assert_error(s, &b, 401, "unauthorized");
    assert!(b["error"].get("fields").is_none(), "{b}");
}

both_backends!(
    routes_need_a_token,
    ssh_keys,
    change_password,
    concurrent_password_changes,
    logout_all,
    delete_account,
    delete_account_when_teardown_fails,
    password_guesses_are_limited,
    field_errors,
);
