//! `webhoster serve` as a real process (this test binary re-executed, running
//! `hosting::serve::run_with` over fake VM parts): killed with SIGKILL in the
//! middle of a create, then started again, it undoes the unfinished create
//! from the journal before it answers; SIGTERM stops it gracefully.
//! The same test with the real engine, network and nginx is the
//! coordinator's end-to-end test.

mod common;

use common::host::free_port;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::control::{Db, TestDb};
use common::fakes::FakeWorld;
use webhoster::app::{Backends, run_with};
use webhoster::hosting::{CreatePath, Step};
use webhoster::store::{StepState, Store};

/// Not a test: the entry of the child process (does nothing unless the
/// parent set `WH_CHILD_STATE`).
#[test]
fn zz_child_process_entry() {
    let Ok(state) = std::env::var("WH_CHILD_STATE") else {
        return;
    };
    let api = std::env::var("WH_CHILD_API").unwrap();
    let db = std::env::var("WH_CHILD_DB").unwrap();
    use clap::Parser;
    let cli = webhoster::cli::Cli::try_parse_from([
        "webhoster",
        "serve",
        "--state-dir",
        &state,
        "--api-addr",
        &api,
        "--database-url",
        &db,
        "--jwt-secret",
        "child-secret-child-secret-child-secret",
    ])
    .unwrap();
    let webhoster::cli::Command::Serve(args) = cli.command else {
        unreachable!()
    };
    webhoster::cli::init_logging();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let world = FakeWorld::new(&cli.paths.state_dir, "10.94.0.0/24".parse().unwrap());
        if let Ok(m) = std::env::var("WH_CHILD_HANG") {
            world.hang_on(&m);
        }
        let code = run_with(
            cli.paths,
            *args,
            Backends {
                ports: world.ports(),
                engine: None,
                budget: webhoster::hosting::admission::Budget::UNLIMITED,
                meter: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(code, std::process::ExitCode::SUCCESS);
    });
    // Reaching here means a clean, graceful exit.
    std::process::exit(0);
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(state: &std::path::Path, api: &str, db: &str, hang: Option<&str>) -> ChildGuard {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "zz_child_process_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("WH_CHILD_STATE", state)
    .env("WH_CHILD_API", api)
    .env("WH_CHILD_DB", db)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if let Some(h) = hang {
        cmd.env("WH_CHILD_HANG", h);
    }
    ChildGuard(cmd.spawn().unwrap())
}

async fn wait_healthy(client: &reqwest::Client, base: &str) {
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/api/v1/health")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the child never answered");
}

async fn kill9_mid_create_then_restart(kind: Db) {
    let db = TestDb::new(kind).await;
    let state = db.dir().join("state");
    let api = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{api}");
    let client = reqwest::Client::new();

    let mut child = spawn_child(&state, &api, &db.url, Some("probe.guest_site"));
    wait_healthy(&client, &base).await;
    let reg = serde_json::json!({"email": "pat@example.com", "username": "pat", "password": "password123"});
    let r = client
        .post(format!("{base}/api/v1/auth/register"))
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = client
        .post(format!("{base}/api/v1/auth/login"))
        .form(&[("username", "pat"), ("password", "password123")])
        .send()
        .await
        .unwrap();
    let token = r.json::<serde_json::Value>().await.unwrap()["data"]["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = client
        .post(format!("{base}/api/v1/host?wait=false"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // The parent watches the journal in the database the child writes.
    let store = Store::connect(&db.url).await.unwrap();
    let mut hosting = None;
    for _ in 0..300 {
        if let Some(h) = store.all_hostings().await.unwrap().into_iter().next() {
            let journal = store.steps(h.id).await.unwrap();
            if journal
                .iter()
                .any(|r| r.step == "ready" && r.state == StepState::Pending)
            {
                // Every step before `ready` done, and no other.
                let before_ready: Vec<&str> = CreatePath::Cold
                    .steps()
                    .into_iter()
                    .take_while(|s| *s != Step::Ready)
                    .map(Step::name)
                    .collect();
                let done: Vec<&str> = journal
                    .iter()
                    .filter(|r| r.state == StepState::Done)
                    .map(|r| r.step.as_str())
                    .collect();
                assert_eq!(done, before_ready, "{journal:?}");
                hosting = Some(h);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hosting = hosting.expect("the create never reached the ready step");
    assert_eq!(hosting.state, webhoster::hosting::HostingState::Creating);

    // kill -9: no cleanup of any kind runs in the child.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.0.wait();
    assert_eq!(
        store.all_hostings().await.unwrap().len(),
        1,
        "the row outlived the process"
    );

    // Restart: recovery runs before the API answers.
    let mut child = spawn_child(&state, &api, &db.url, None);
    wait_healthy(&client, &base).await;
    assert!(
        store.all_hostings().await.unwrap().is_empty(),
        "recovery left the row"
    );
    let r = client
        .get(format!("{base}/api/v1/host/my"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The token survives the restart (same secret) and a new create works.
    let r = client
        .post(format!("{base}/api/v1/host"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // SIGTERM: graceful stop, exit status 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = child.0.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("the child did not stop on SIGTERM");
    assert!(status.success(), "{status:?}");
    store.close().await;
}

both_backends!(kill9_mid_create_then_restart);
