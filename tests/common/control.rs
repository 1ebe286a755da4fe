//! Control-plane test helpers: a fresh database per test (SQLite file or a
//! PostgreSQL database created and dropped by a guard), and the API served on
//! 127.0.0.1:0 over a real store with the VM parts faked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::fakes::FakeWorld;
use serde_json::{Value, json};
use webhoster::api::ratelimit::AuthLimits;
use webhoster::api::{self, ApiConfig, ApiState};
use webhoster::auth::Auth;
use webhoster::hosting::{HostingConfig, HostingService, Readiness};
use webhoster::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub fn pg_admin_url() -> String {
    std::env::var("WEBHOSTER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://webhoster:webhoster@127.0.0.1:5432/webhoster_test".into())
}

/// A database of its own; dropped (PostgreSQL) or deleted (SQLite) on drop.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(kind: Db) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        match kind {
            Db::Sqlite => TestDb {
                url: webhoster::store::default_url(dir.path()),
                pg_name: None,
                _dir: dir,
            },
            Db::Postgres => {
                use sqlx::Connection;
                let admin = pg_admin_url();
                let name = format!("t_{:016x}", rand::random::<u64>());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed (make test starts it): {e}"));
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let _ = conn.close().await;
                let base = admin.rsplit_once('/').unwrap().0;
                TestDb {
                    url: format!("{base}/{name}"),
                    pg_name: Some(name),
                    _dir: dir,
                }
            }
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs inside a tokio runtime: do the async cleanup on a thread of its own.
        let admin = pg_admin_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

pub const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

pub fn fast_hosting_config() -> HostingConfig {
    HostingConfig {
        ready: Readiness {
            timeout: Duration::from_millis(300),
            interval: Duration::from_millis(20),
        },
        ..HostingConfig::default()
    }
}

/// The API with a real store and faked VM parts, on 127.0.0.1:0.
pub struct TestApi {
    pub base: String,
    pub addr: SocketAddr,
    pub world: Arc<FakeWorld>,
    pub hosting: Arc<HostingService>,
    pub store: Store,
    pub auth: Auth,
    /// The usage history the API serves; tests record passes into it.
    pub usage: Arc<webhoster::usage::Usage>,
    pub client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    // Last: dropped after the server is gone.
    pub db: TestDb,
}

impl TestApi {
    pub async fn start(kind: Db) -> TestApi {
        let db = TestDb::new(kind).await;
        Self::start_on(db).await
    }

    /// Rate limits off: tests make many accounts from one address.
    pub async fn start_on(db: TestDb) -> TestApi {
        Self::start_with_limits(db, AuthLimits::OFF).await
    }

    pub async fn start_with_limits(db: TestDb, auth_limits: AuthLimits) -> TestApi {
        let config = ApiConfig {
            public_host: Some("example.test".into()),
            auth_limits,
            ..ApiConfig::default()
        };
        Self::start_with_config(db, config).await
    }

    /// The API with `config` (its state dir set to the test's).
    pub async fn start_with_config(db: TestDb, config: ApiConfig) -> TestApi {
        let store = Store::connect(&db.url).await.unwrap();
        let world = FakeWorld::new(db.dir(), "10.99.0.0/24".parse().unwrap());
        let hosting = HostingService::new(store.clone(), world.ports(), fast_hosting_config());
        hosting.recover().await.unwrap();
        let auth = Auth::new(SECRET, Duration::from_secs(600), 2).unwrap();
        let state = ApiState::new(
            store.clone(),
            auth.clone(),
            hosting.clone(),
            ApiConfig {
                state_dir: Some(db.dir().to_owned()),
                ..config
            },
        );
        let usage = Arc::new(webhoster::usage::Usage::new());
        let state = state.with_usage(usage.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = api::serve("127.0.0.1:0".parse().unwrap(), state, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        let server = tokio::spawn(server);
        TestApi {
            base: format!("http://{addr}"),
            addr,
            world,
            hosting,
            store,
            auth,
            usage,
            client: reqwest::Client::new(),
            shutdown: Some(tx),
            server: Some(server),
            db,
        }
    }

    /// The Prometheus text at `/metrics`.
    pub async fn metrics(&self) -> String {
        let resp = self.client.get(self.url("/metrics")).send().await.unwrap();
        resp.text().await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the server (graceful) and gives back the database.
    pub async fn stop(mut self) -> TestDb {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
        self.hosting.abort_creates();
        self.store.close().await;
        std::mem::replace(
            &mut self.db,
            TestDb {
                url: String::new(),
                pg_name: None,
                _dir: tempfile::tempdir().unwrap(),
            },
        )
    }

    /// Sends a request; returns status and the JSON body (Null when not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn register(&self, username: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            "/api/v1/auth/register",
            None,
            Some(json!({
                "email": format!("{username}@example.com"),
                "username": username,
                "password": "password123",
            })),
        )
        .await
    }

    pub async fn login(&self, username: &str) -> String {
        let resp = self
            .client
            .post(self.url("/api/v1/auth/login"))
            .form(&[("username", username), ("password", "password123")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        v["data"]["access_token"].as_str().unwrap().to_owned()
    }

    /// Registers `username` and returns a token.
    pub async fn user(&self, username: &str) -> String {
        let (s, body) = self.register(username).await;
        assert_eq!(s, 201, "{body}");
        self.login(username).await
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.hosting.abort_creates();
    }
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn(Db)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::control::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::control::Db::Postgres).await
                }
            )*
        }
    };
}
