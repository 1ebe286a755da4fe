//! A whole webhoster deployment for end-to-end tests and benches: the real
//! `webhoster serve` binary under names unique to this run (state dir,
//! namespace, subnet, ports). Dropping it tears everything down.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::guest::{TestKey, http_get};
use super::host::{Reservation, free_port, unique_name, unique_port_range, unique_subnet};

pub const BIN: &str = env!("CARGO_BIN_EXE_webhoster");

/// One isolated deployment: its own state dir, API and HTTP ports, namespace,
/// subnet and SSH port range. Dropping it tears everything down.
pub struct Deployment {
    pub state: tempfile::TempDir,
    pub env: HashMap<&'static str, String>,
    pub api: String,
    pub http_port: u16,
    pub netns: String,
    pub serve: Option<Child>,
    _reserved: (Reservation, Reservation),
}

impl Deployment {
    pub fn new() -> Self {
        Self::with_ssh_ports(20)
    }

    /// A deployment whose SSH port range holds `ports` (one per hosting).
    pub fn with_ssh_ports(ports: u16) -> Self {
        let state = tempfile::Builder::new().prefix("wh-e2e-").tempdir().unwrap();
        let netns = unique_name("whe");
        let api_port = free_port();
        let http_port = free_port();
        let (subnet, subnet_reservation) = unique_subnet();
        let (ports, ports_reservation) = unique_port_range(ports);
        let mut env = HashMap::new();
        env.insert("WEBHOSTER_STATE_DIR", state.path().display().to_string());
        env.insert("WEBHOSTER_API_ADDR", format!("127.0.0.1:{api_port}"));
        env.insert("WEBHOSTER_HTTP_ADDR", format!("127.0.0.1:{http_port}"));
        env.insert("WEBHOSTER_PUBLIC_HOST", "127.0.0.1".into());
        env.insert("WEBHOSTER_NETNS", netns.clone());
        env.insert("WEBHOSTER_SUBNET", subnet.to_string());
        env.insert("WEBHOSTER_SSH_BIND", "127.0.0.1".into());
        env.insert(
            "WEBHOSTER_SSH_PORTS",
            format!("{}-{}", ports.start(), ports.end()),
        );
        env.insert("WEBHOSTER_ACCEL", "tcg".into());
        env.insert("WEBHOSTER_PLAN", "small".into());
        // No template build in the background of tests that do not want it
        // (it boots a guest); the warm tests set their pool.
        env.insert("WEBHOSTER_WARM_POOL", "0".into());
        env.insert("RUST_LOG", "webhoster=debug,info".into());
        Deployment {
            state,
            env,
            api: format!("http://127.0.0.1:{api_port}/api/v1"),
            http_port,
            netns,
            serve: None,
            _reserved: (subnet_reservation, ports_reservation),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        // WEBHOSTER_TEST_BIN: a copy of the binary under test, for a run that
        // shares its target dir with other builds (they replace BIN).
        let bin = std::env::var("WEBHOSTER_TEST_BIN").unwrap_or_else(|_| BIN.to_owned());
        let mut cmd = Command::new(bin);
        cmd.args(args).envs(&self.env).env_remove("DATABASE_URL");
        cmd
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Starts `webhoster serve` and waits until the API answers.
    pub async fn start(&mut self) {
        assert!(self.serve.is_none(), "serve is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir().join("serve.log"))
            .unwrap();
        let child = self
            .command(&["serve"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn webhoster serve");
        self.serve = Some(child);
        let health = format!("{}/health", self.api);
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(resp) = client.get(&health).send().await
                && resp.status().is_success()
            {
                return;
            }
            if let Some(status) = self.serve.as_mut().unwrap().try_wait().unwrap() {
                panic!("webhoster serve exited with {status}; log:\n{}", self.log_tail());
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "API not up; log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: what a crash of the service does.
    pub fn kill(&mut self) {
        let mut child = self.serve.take().expect("serve is not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        let mut child = self.serve.take().expect("serve is not running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::SIGTERM,
        )
        .unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "serve exited with {status} on SIGTERM; log:\n{}",
                    self.log_tail()
                );
                return;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("serve did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.state_dir().join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    pub fn site(&self, user_id: i64) -> String {
        format!("http://127.0.0.1:{}/{user_id}/", self.http_port)
    }

    /// GET `/<user_id>/` through our nginx: (status, body); (0, error) when
    /// nothing answers.
    pub fn get_site(&self, user_id: i64) -> (u16, String) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port));
        http_get(addr, &format!("/{user_id}/")).unwrap_or_else(|e| (0, e.to_string()))
    }

    /// GET `/<user_id>/<path>` through our nginx (`path` without its leading
    /// slash): (status, body); (0, error) when nothing answers.
    pub fn get_site_path(&self, user_id: i64, path: &str) -> (u16, String) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port));
        http_get(addr, &format!("/{user_id}/{path}")).unwrap_or_else(|e| (0, e.to_string()))
    }

    /// Runs `cmd args` inside the deployment's network namespace.
    pub fn netns_exec(&self, cmd: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns, cmd])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {cmd}: {e}", self.netns))
    }

    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.state_dir().join("vms").join(vm_id)
    }

    pub fn qemu_pid(&self, vm_id: &str) -> i32 {
        std::fs::read_to_string(self.vm_dir(vm_id).join("qemu.pid"))
            .unwrap_or_else(|e| panic!("pidfile of {vm_id}: {e}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Every process whose command line names our state dir or namespace.
    pub fn our_processes(&self) -> Vec<String> {
        let marks = [self.state_dir().display().to_string(), self.netns.clone()];
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if marks.iter().any(|m| cmdline.contains(m.as_str())) {
                found.push(format!("{pid}: {cmdline}"));
            }
        }
        found
    }

    /// What the host still holds under this run's names.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = self.our_processes();
        let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        if String::from_utf8_lossy(&netns.stdout)
            .split_whitespace()
            .any(|n| n == self.netns)
        {
            left.push(format!("namespace {}", self.netns));
        }
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        for line in String::from_utf8_lossy(&links.stdout).lines() {
            if line.contains(&self.netns) {
                left.push(format!("link {line}"));
            }
        }
        let nft = Command::new("nft").args(["list", "tables"]).output().unwrap();
        for line in String::from_utf8_lossy(&nft.stdout).lines() {
            if line.contains(&self.netns) {
                left.push(format!("nftables {line}"));
            }
        }
        left
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.command(&["teardown"]).output();
        // Last resort for anything teardown missed: nothing of a failed run may stay.
        for line in self.our_processes() {
            if let Some(pid) = line.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
        }
        let _ = Command::new("ip").args(["netns", "delete", &self.netns]).output();
        if std::thread::panicking() {
            eprintln!("--- serve log ---\n{}", self.log_tail());
        }
    }
}

pub struct User {
    pub id: i64,
    pub username: String,
    pub token: String,
    pub key: TestKey,
}

pub async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client.request(method, url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{url} answered {status} non-JSON {text:?}: {e}"));
    (status, value)
}

pub async fn sign_up(client: &reqwest::Client, api: &str, username: &str) -> User {
    let password = "a long enough password";
    // Sign-ups and log-ins from one address are rate limited: a caller
    // making many (a bench) waits as a client should, a bounded number of
    // times.
    let mut tries = 0;
    let (status, body) = loop {
        let (status, body) = call(
            client,
            reqwest::Method::POST,
            &format!("{api}/auth/register"),
            None,
            Some(json!({"email": format!("{username}@example.com"), "username": username, "password": password})),
        )
        .await;
        tries += 1;
        if status != 429 || tries == 60 {
            break (status, body);
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    assert_eq!(status, 201, "{body}");
    let mut tries = 0;
    let resp = loop {
        let resp = client
            .post(format!("{api}/auth/login"))
            .form(&[("username", username), ("password", password)])
            .send()
            .await
            .unwrap();
        tries += 1;
        if resp.status() != 429 || tries == 60 {
            break resp;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let token = body["data"]["access_token"].as_str().unwrap().to_owned();
    assert_eq!(body["data"]["token_type"], "bearer");
    let (status, me) = call(
        client,
        reqwest::Method::GET,
        &format!("{api}/auth/me"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{me}");
    User {
        id: me["data"]["id"].as_i64().unwrap(),
        username: username.into(),
        token,
        key: TestKey::new(),
    }
}

impl User {
    pub async fn create(&self, client: &reqwest::Client, api: &str) -> (u16, Value) {
        let body = json!({"ssh_public_key": self.key.public_line()});
        call(
            client,
            reqwest::Method::POST,
            &format!("{api}/host"),
            Some(&self.token),
            Some(body),
        )
        .await
    }

    pub async fn host(&self, client: &reqwest::Client, api: &str) -> (u16, Value) {
        call(
            client,
            reqwest::Method::GET,
            &format!("{api}/host/my"),
            Some(&self.token),
            None,
        )
        .await
    }

    /// `POST /host/my/<action>`: start, stop or restart.
    pub async fn power(&self, client: &reqwest::Client, api: &str, action: &str) -> (u16, Value) {
        call(
            client,
            reqwest::Method::POST,
            &format!("{api}/host/my/{action}"),
            Some(&self.token),
            None,
        )
        .await
    }

    /// `GET /host/my` for polling: a transport error or a non-JSON answer is
    /// returned, not a panic.
    pub async fn try_host(&self, client: &reqwest::Client, api: &str) -> Result<(u16, Value), String> {
        let resp = client
            .get(format!("{api}/host/my"))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("GET /host/my: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| format!("GET /host/my body: {e}"))?;
        serde_json::from_str(&text)
            .map(|v| (status, v))
            .map_err(|e| format!("GET /host/my answered {status} non-JSON {text:?}: {e}"))
    }

    pub async fn delete_host(&self, client: &reqwest::Client, api: &str) -> (u16, Value) {
        call(
            client,
            reqwest::Method::DELETE,
            &format!("{api}/host/my"),
            Some(&self.token),
            None,
        )
        .await
    }
}

impl Deployment {
    /// Seconds each create step of `vm_id` took, from its `create: running`
    /// log line (a warm create runs two steps at once, so the journal's end
    /// times alone do not tell).
    pub fn step_timings(&self, vm_id: &str) -> Vec<(String, f64)> {
        let log = std::fs::read_to_string(self.state_dir().join("serve.log")).unwrap_or_default();
        let id = format!("vm_id={vm_id}");
        let Some(steps) = log
            .lines()
            .rev()
            .find(|l| l.contains(&id) && l.contains("create: running"))
            .and_then(|l| l.split_once("steps=").map(|(_, steps)| steps))
        else {
            return Vec::new();
        };
        steps
            .split(", ")
            .filter_map(|s| {
                let (name, secs) = s.trim().rsplit_once(' ')?;
                Some((name.to_owned(), secs.parse().ok()?))
            })
            .collect()
    }
}
