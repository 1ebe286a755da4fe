//! Acceptance test of the hosting lifecycle, end to end: the real `webhoster
//! serve` binary, a real guest (TCG here), the real namespace, nftables and
//! nginx. The deployment keeps a warm pool of [`WARM_POOL`] clones, so the
//! hosting under test is a **warm clone** (restored from the template and
//! personalised), and every promise of a cold VM is checked on a clone. One
//! hosting is shared by every check, in order, because a booted guest costs
//! tens of seconds:
//!
//! 0. the pool fills (template built, clones restored) before anything else;
//! 1. the quickstart pasted with no pauses: SFTP, SSH and the site work the
//!    moment the create answers 201, and new SSH connections keep working for
//!    the 15 s after it; `/metrics` counts that create on the warm path;
//! 2. every clone is unique: two more users create at once (warm too), and
//!    the three guests differ in SSH host keys, machine-id, hostname, MAC, IP
//!    and `/dev/urandom` bytes; each has its hosting's IP and the MAC the
//!    network guard allows, and a clock within a second of the host's; the
//!    two extra hostings are deleted and leave nothing;
//! 3. a file acknowledged over SFTP survives `kill -9` of QEMU, and while the
//!    VM restarts the API never says `running` unless the site answers;
//! 4. `teardown` (what a host reboot does) and a new `serve` bring the same
//!    guest back: same page, files, SSH host key, IP and port;
//! 5. a flushed host nft table and a deleted tap are repaired while serve runs;
//! 6. stop / start through the API keep what was written before the stop;
//! 7. a reboot from inside the guest (`sudo systemctl reboot`) comes back
//!    with the same SSH host key, the user's files and SSH login;
//! 8. DELETE leaves nothing on the host.
//!
//! Steps 3 to 7 restart the clone from its own disk (a cold boot with the
//! cold command line), which is what a clone promises to survive.
//!
//! A failed check is recorded and the test goes on, so one run lists every
//! broken promise; it fails at the end with all of them and the tail of
//! serve's log. Before each step the test waits (bounded) for a usable guest,
//! so a step tests its own promise even when an earlier one failed; only
//! what makes the rest meaningless (no pool, no hosting, a guest that never
//! comes back, the time budget spent) stops it at once. Timings are printed,
//! never asserted: every wait is only bounded, generously for a loaded
//! 2-core machine running guests under TCG.
//!
//! The API contract checked: the `data` of `GET /api/v1/host/my` (and of the
//! create's 201) is `{"hosting":{...},"web_url":...,"ssh_command":...}` with
//! `hosting.status` one of [`STATUSES`], `hosting.desired` `running` or
//! `stopped`, `hosting.last_error` a string or null and `hosting.state_since`
//! an RFC 3339 time; and `running` means the site answers and SSH logs in.

mod common;

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::deploy::{Deployment, User, sign_up};
use common::guest::{sftp_put, ssh, ssh_banner, ssh_host_keys, ssh_opts};
use common::host::{pid_gone, unique_name};
use serde_json::Value;

/// Every status `GET /host/my` may show.
const STATUSES: [&str; 9] = [
    "creating",
    "starting",
    "running",
    "stopping",
    "stopped",
    "restarting",
    "paused",
    "failed",
    "deleting",
];

/// The whole test, failed checks included, ends within this; a normal run
/// takes 8 to 14 minutes on a loaded 2-core machine (the template's boot
/// and the pool's fill included).
const BUDGET: Duration = Duration::from_secs(25 * 60);
/// Warm clones the deployment keeps ready: the quickstart takes one, the
/// uniqueness step two more at once.
const WARM_POOL: u64 = 3;
/// From serve's start until the pool has [`WARM_POOL`] clones ready: the
/// template's cold boot and save, then one clone after another.
const POOL_FILLED: Duration = Duration::from_secs(420);
/// How long the uniqueness step waits for the pool to hold the two clones
/// it takes (the pool refills after the quickstart's claim).
const POOL_REFILL: Duration = Duration::from_secs(180);
/// How far a guest's clock may be from the host's, on top of half the SSH
/// round trip that read it.
const CLOCK_SLACK: f64 = 1.0;
/// How often a watch polls the API and the site.
const POLL: Duration = Duration::from_secs(1);
/// How long after the create's 201 new SSH connections must keep working:
/// cloud-init's late modules (which restarted sshd at ~7 s) are over by then.
const SSH_WINDOW: Duration = Duration::from_secs(15);
/// How long a banner probe in that window waits. A restart of sshd refuses
/// or resets at once; a late banner is a guest busy with the quickstart's
/// own logins (each costs a second of TCG guest CPU), which a user's `ssh`
/// waits out (it has no banner timeout by default). 3 s failed once in CI
/// while the guest's one vCPU served the upload and the host refilled the
/// pool; the slowest banner is reported.
const BANNER_PATIENCE: Duration = Duration::from_secs(10);
/// After `kill -9`, how long the API may still say `running` before it has
/// noticed: QEMU's exit is seen at once (QMP socket closed, child exited), so
/// this only covers one poll in flight.
const CRASH_NOTICE: Duration = Duration::from_secs(2);
/// Generous bounds for a guest boot under TCG on a loaded 2-core machine.
const BACK_AFTER_CRASH: Duration = Duration::from_secs(240);
const BACK_AFTER_REBOOT: Duration = Duration::from_secs(240);
const BACK_AFTER_TEARDOWN: Duration = Duration::from_secs(300);
const TAP_REPAIR: Duration = Duration::from_secs(120);
const NFT_REPAIR: Duration = Duration::from_secs(30);
const STOPPED: Duration = Duration::from_secs(90);
const STARTED: Duration = Duration::from_secs(180);
/// How long a step waits for a usable guest left by an earlier step that
/// failed (a lying `running`, a repair that never came).
const SETTLE: Duration = Duration::from_secs(180);
/// New SSH/SFTP sessions in the quickstart window, at least.
const QUICKSTART_SESSIONS: usize = 3;

/// One poll: the API first, then the site, so a `running` status was already
/// shown when the site was asked.
struct Obs {
    /// When the API answered, since the watch began (the site may take a few
    /// seconds more to answer or time out).
    at: Duration,
    /// `hosting.status`, or `<http N>` / `<error ...>` when there is none.
    status: String,
    /// The `data` of `GET /host/my` (Null when it failed).
    data: Value,
    site: u16,
    body: String,
}

/// What a watch saw.
struct Watch {
    /// How long until the condition held; None when the bound ran out.
    took: Option<Duration>,
    /// Polls where the API said `running` but the site did not answer 200.
    lies: Vec<String>,
    /// Every change of (status, site answer), with its time.
    trail: Vec<String>,
    last: Obs,
}

/// The shared state of the test: the deployment, its one user and hosting,
/// and the failed checks so far.
struct Lifecycle {
    dep: Deployment,
    /// For calls that may take minutes (the create).
    client: reqwest::Client,
    /// For polling: a stuck API must not stall a watch.
    poll: reqwest::Client,
    api: String,
    user: User,
    run: String,
    started: Instant,
    /// Failed checks so far (cells: a check may be recorded from inside a
    /// closure that reads the rest of the state).
    failures: RefCell<Vec<String>>,
    /// Contract problems already recorded (each is reported once).
    contract_seen: RefCell<HashSet<String>>,
    timings: RefCell<Vec<(String, f64)>>,
    vm_id: String,
    vm_ip: String,
    ssh_port: u16,
    /// What index.html holds since the quickstart uploaded it.
    index: String,
}

fn snippet(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(100).collect()
}

/// The value of one series (`name{labels}` exactly as rendered) in a
/// Prometheus text exposition.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// What is wrong with `data` (a `GET /host/my` or create answer) against
/// the API contract.
fn contract_problems(data: &Value) -> Vec<String> {
    let h = &data["hosting"];
    let mut problems = Vec::new();
    match h["status"].as_str() {
        Some(s) if STATUSES.contains(&s) => {}
        _ => problems.push(format!(
            "hosting.status is {} (want one of {STATUSES:?})",
            h["status"]
        )),
    }
    match h["desired"].as_str() {
        Some("running" | "stopped") => {}
        _ => problems.push(format!(
            "hosting.desired is {} (want \"running\" or \"stopped\")",
            h["desired"]
        )),
    }
    match h.get("last_error") {
        Some(Value::String(_) | Value::Null) => {}
        None => problems.push("hosting.last_error is missing (want a string or null)".into()),
        Some(other) => problems.push(format!("hosting.last_error is {other} (want a string or null)")),
    }
    let since = h["state_since"]
        .as_str()
        .map(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339));
    if !matches!(since, Some(Ok(_))) {
        problems.push(format!(
            "hosting.state_since is {} (want an RFC 3339 time)",
            h["state_since"]
        ));
    }
    for key in ["web_url", "ssh_command"] {
        if !data[key].is_string() {
            problems.push(format!("{key} is {} (want a string)", data[key]));
        }
    }
    problems
}

impl Lifecycle {
    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn note(&self, msg: impl AsRef<str>) {
        eprintln!("[{:6.1} s] {}", self.elapsed(), msg.as_ref());
    }

    fn fail(&self, msg: impl Into<String>) {
        let msg = msg.into();
        eprintln!("[{:6.1} s] CHECK FAILED: {msg}", self.elapsed());
        self.failures.borrow_mut().push(msg);
    }

    /// Records a failed check unless `ok`; returns `ok`.
    fn check(&self, ok: bool, msg: impl FnOnce() -> String) -> bool {
        if !ok {
            self.fail(msg());
        }
        ok
    }

    /// Stops the test now: what follows would tell nothing.
    fn fatal(&self, msg: impl AsRef<str>) -> ! {
        panic!(
            "{}\n\nchecks failed before this:\n{}\n\n--- serve log (tail) ---\n{}",
            msg.as_ref(),
            self.failure_list(),
            self.dep.log_tail()
        );
    }

    fn failure_list(&self) -> String {
        let failures = self.failures.borrow();
        if failures.is_empty() {
            return "  (none)".into();
        }
        failures
            .iter()
            .enumerate()
            .map(|(i, f)| format!("  {}. {f}", i + 1))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn timing(&self, what: &str, took: Duration) {
        self.note(format!("TIMING {what}: {:.1} s", took.as_secs_f64()));
        self.timings
            .borrow_mut()
            .push((what.to_owned(), took.as_secs_f64()));
    }

    /// `wanted`, cut to what is left of the test's budget.
    fn bounded(&self, wanted: Duration) -> Duration {
        let left = BUDGET.saturating_sub(self.started.elapsed());
        if left.is_zero() {
            self.fatal(format!("the test's budget of {BUDGET:?} is spent"));
        }
        wanted.min(left)
    }

    /// Checks `data` against the API contract; each problem is recorded once,
    /// at the first place it was seen.
    fn contract(&self, at: &str, data: &Value) {
        for problem in contract_problems(data) {
            if self.contract_seen.borrow_mut().insert(problem.clone()) {
                self.fail(format!("API contract, {at}: {problem}"));
            }
        }
    }

    fn ssh(&self, cmd: &str) -> Result<String, String> {
        let out = ssh("127.0.0.1", self.ssh_port, "ubuntu", &self.user.key, cmd);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "ssh {cmd:?} exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Puts `content` at /var/www/html/`name` in the guest over SFTP.
    fn sftp(&self, name: &str, content: &str) -> Result<(), String> {
        let local = self.dep.state_dir().join(format!("upload-{name}"));
        std::fs::write(&local, content).expect("write the local upload");
        let remote = format!("/var/www/html/{name}");
        let out = sftp_put(
            "127.0.0.1",
            self.ssh_port,
            "ubuntu",
            &self.user.key,
            &local,
            &remote,
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "sftp put {remote} exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Uploads at once; a failure is recorded as `what`, then the upload is
    /// retried (the checks after this need the file) until `bound`.
    async fn upload(&self, what: &str, name: &str, content: &str, bound: Duration) {
        let Err(first) = self.sftp(name, content) else {
            return;
        };
        self.fail(format!("{what}: {first}"));
        let bound = self.bounded(bound);
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            match self.sftp(name, content) {
                Ok(()) => {
                    self.note(format!(
                        "{name} uploaded {:.1} s after the first try failed",
                        started.elapsed().as_secs_f64()
                    ));
                    return;
                }
                Err(e) if started.elapsed() > bound => {
                    self.fatal(format!("cannot upload {name} within {bound:?}: {e}"))
                }
                Err(_) => {}
            }
        }
    }

    /// The pid in the VM's pidfile, if there is one.
    fn qemu_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dep.vm_dir(&self.vm_id).join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn ssh_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ssh_port))
    }

    async fn observe(&self, since: Instant) -> Obs {
        let answer = self.user.try_host(&self.poll, &self.api).await;
        let at = since.elapsed();
        let (status, data) = match answer {
            Ok((200, body)) => match body["data"]["hosting"]["status"].as_str() {
                Some(s) => (s.to_owned(), body["data"].clone()),
                None => ("<no status>".to_owned(), body["data"].clone()),
            },
            Ok((code, body)) => (
                format!("<http {code}: {}>", snippet(&body.to_string())),
                Value::Null,
            ),
            Err(e) => (format!("<error {}>", snippet(&e)), Value::Null),
        };
        let (site, body) = self.dep.get_site(self.user.id);
        Obs {
            at,
            status,
            data,
            site,
            body,
        }
    }

    /// Polls the API and the site every [`POLL`] until `until` holds or
    /// `bound` runs out. Every poll after `grace` where the API says
    /// `running` but the site does not answer 200 is kept as a lie.
    async fn watch(
        &self,
        what: &str,
        bound: Duration,
        grace: Duration,
        mut until: impl FnMut(&Obs) -> bool,
    ) -> Watch {
        let bound = self.bounded(bound);
        let since = Instant::now();
        let mut lies = Vec::new();
        let mut trail = Vec::new();
        let mut previous: Option<(String, u16)> = None;
        loop {
            let obs = self.observe(since).await;
            let now = (obs.status.clone(), obs.site);
            if previous.as_ref() != Some(&now) {
                trail.push(format!(
                    "{:.1} s: status {}, site {}",
                    obs.at.as_secs_f64(),
                    obs.status,
                    obs.site
                ));
                previous = Some(now);
            }
            if obs.status == "running" && obs.site != 200 && obs.at >= grace {
                lies.push(format!(
                    "{:.1} s: status running but the site answered {} {:?}",
                    obs.at.as_secs_f64(),
                    obs.site,
                    snippet(&obs.body)
                ));
            }
            let done = until(&obs);
            if done || since.elapsed() >= bound {
                self.note(format!("{what}: {}", trail.join("; ")));
                return Watch {
                    took: done.then_some(obs.at),
                    lies,
                    trail,
                    last: obs,
                };
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Records the lies a watch saw as one failed check.
    fn no_lies(&self, what: &str, watch: &Watch) {
        let shown: Vec<&String> = watch.lies.iter().take(5).collect();
        self.check(watch.lies.is_empty(), || {
            format!(
                "{what}: the API said running while the site was down in {} polls, e.g. {shown:?}",
                watch.lies.len()
            )
        });
    }

    /// Records a watch that ran out as a failed check; true when it did not.
    fn came_back(&self, what: &str, bound: Duration, watch: &Watch) -> bool {
        self.check(watch.took.is_some(), || {
            format!(
                "{what}: not back within {bound:?}; last poll: status {}, site {} {:?}; trail: {}",
                watch.last.status,
                watch.last.site,
                snippet(&watch.last.body),
                watch.trail.join("; ")
            )
        })
    }

    fn site_file(&self, name: &str) -> (u16, String) {
        self.dep.get_site_path(self.user.id, name)
    }

    /// The guest serves `name` with exactly `content`.
    fn check_file(&self, what: &str, name: &str, content: &str) {
        let (code, body) = self.site_file(name);
        self.check(code == 200 && body.trim() == content.trim(), || {
            format!(
                "{what}: /{name} answered {code} {:?}, want 200 {:?}",
                snippet(&body),
                content.trim()
            )
        });
    }

    /// Waits up to `bound` until the site answers 200 and SSH logs in.
    /// On timeout: what the last try saw.
    async fn wait_usable(&self, bound: Duration) -> Result<(), String> {
        let bound = self.bounded(bound);
        let since = Instant::now();
        loop {
            let (site, body) = self.dep.get_site(self.user.id);
            let login = if site == 200 {
                self.ssh("true").map(drop)
            } else {
                Err("not tried".into())
            };
            if login.is_ok() {
                return Ok(());
            }
            if since.elapsed() > bound {
                return Err(format!("site {site} {:?}, SSH login {login:?}", snippet(&body)));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// `running` means ready: the site answers 200 and SSH logs in, checked
    /// at once (no retry) after the poll `last` that saw `running`. When they
    /// do not, that is recorded, and the guest is waited for anyway (until
    /// `bound` after `asked`) so the checks after this still learn what came
    /// back. False when it never became usable.
    async fn ready_at_running(&self, what: &str, last: &Obs, asked: Instant, bound: Duration) -> bool {
        let login = self.ssh("id -un");
        let ready = last.site == 200 && login.as_deref().is_ok_and(|out| out.trim() == "ubuntu");
        self.check(ready, || {
            format!(
                "{what}: status running, but the site answered {} {:?} and SSH login gave {login:?}",
                last.site,
                snippet(&last.body)
            )
        });
        if ready {
            return true;
        }
        if let Err(last) = self.wait_usable(bound.saturating_sub(asked.elapsed())).await {
            self.fail(format!(
                "{what}: site and SSH not usable within {bound:?}: {last}"
            ));
            return false;
        }
        self.timing(&format!("{what}: to site and SSH usable"), asked.elapsed());
        true
    }

    /// Before a step: a usable guest (site and SSH), so the step tests its
    /// own promise even when an earlier step failed and left the guest still
    /// booting. Records nothing (what broke it was recorded where it broke);
    /// stops the test when the guest never becomes usable.
    async fn settle(&self, step: &str) {
        let since = Instant::now();
        if let Err(last) = self.wait_usable(SETTLE).await {
            self.fatal(format!(
                "before {step}: the site and SSH are not usable after {SETTLE:?} ({last}); \
                 the remaining steps would tell nothing"
            ));
        }
        if since.elapsed() > Duration::from_secs(5) {
            self.note(format!(
                "before {step}: waited {:.1} s for a usable guest",
                since.elapsed().as_secs_f64()
            ));
        }
    }

    /// `data.pool` of `GET /health/detailed` (its `data` comes with a 503
    /// too); Null when there is none.
    async fn pool_status(&self) -> Value {
        let url = format!("{}/health/detailed", self.api);
        let Ok(resp) = self.poll.get(&url).send().await else {
            return Value::Null;
        };
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        body["data"]["pool"].clone()
    }

    /// The text of `/metrics` (served next to the API, not under it).
    async fn metrics(&self) -> Result<String, String> {
        let url = format!("{}/metrics", self.api.trim_end_matches("/api/v1"));
        let resp = self
            .poll
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET /metrics: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| format!("GET /metrics body: {e}"))?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("GET /metrics answered {status}: {}", snippet(&text)))
        }
    }

    /// Checks that `/metrics` counts `want` creates on the warm path.
    async fn check_warm_creates(&self, what: &str, want: u64) {
        let series = "webhoster_create_duration_seconds_count{path=\"warm\"}";
        let got = self.metrics().await.map(|text| metric(&text, series));
        self.check(got == Ok(Some(want as f64)), || {
            format!(
                "{what}: /metrics shows {series} {got:?}, want {want} (a create that fell back \
                 to the cold path is not a warm clone); fallbacks: {:?}",
                self.fallbacks_hint()
            )
        });
    }

    /// The serve log's lines about warm clones that failed (for a failed
    /// warm check).
    fn fallbacks_hint(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dep.state_dir().join("serve.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("warm clone failed") || l.contains("discarding the warm clone"))
            .map(|l| l.chars().take(400).collect())
            .take(5)
            .collect()
    }

    /// Waits (bounded) until the pool holds at least `want` ready clones;
    /// the last pool status when it does not.
    async fn wait_pool(&self, want: u64, bound: Duration) -> Result<Duration, Value> {
        let bound = self.bounded(bound);
        let since = Instant::now();
        loop {
            let pool = self.pool_status().await;
            if pool["ready"].as_u64().is_some_and(|n| n >= want) {
                return Ok(since.elapsed());
            }
            // A pool that cannot exist here will not fill by waiting.
            if pool["template"]["state"] == "unsupported" || since.elapsed() > bound {
                return Err(pool);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    fn check_ssh_login(&self, what: &str) {
        let result = self.ssh("id -un");
        self.check(result.as_deref().is_ok_and(|out| out.trim() == "ubuntu"), || {
            format!("{what}: SSH login: {result:?}")
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosting_lifecycle() {
    let started = Instant::now();
    let mut dep = Deployment::new();
    dep.env.insert("WEBHOSTER_WARM_POOL", WARM_POOL.to_string());
    dep.start().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let poll = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let api = dep.api.clone();
    let run = unique_name("lc");
    let user = sign_up(&client, &api, &format!("life-{run}")).await;
    let mut lc = Lifecycle {
        dep,
        client,
        poll,
        api,
        user,
        run,
        started,
        failures: RefCell::default(),
        contract_seen: RefCell::default(),
        timings: RefCell::default(),
        vm_id: String::new(),
        vm_ip: String::new(),
        ssh_port: 0,
        index: String::new(),
    };

    match lc.wait_pool(WARM_POOL, POOL_FILLED).await {
        Ok(took) => lc.timing("serve start to a full warm pool", took),
        Err(pool) => lc.fatal(format!(
            "the warm pool has not {WARM_POOL} clones ready within {POOL_FILLED:?} of serve's \
             start; pool status: {pool}"
        )),
    }
    quickstart(&mut lc).await;
    lc.check_warm_creates("after the quickstart's create", 1).await;
    unique_clones(&mut lc).await;
    lc.settle("kill -9").await;
    crash(&mut lc).await;
    lc.settle("the teardown").await;
    teardown_and_back(&mut lc).await;
    lc.settle("the nft flush").await;
    repair_nft(&mut lc).await;
    lc.settle("the tap deletion").await;
    repair_tap(&mut lc).await;
    lc.settle("stop / start").await;
    stop_start(&mut lc).await;
    lc.settle("the guest reboot").await;
    guest_reboot(&mut lc).await;
    delete(&mut lc).await;

    lc.note(format!(
        "timings: {}",
        lc.timings
            .borrow()
            .iter()
            .map(|(what, secs)| format!("{what} {secs:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let failed = lc.failures.borrow().len();
    if failed > 0 {
        panic!(
            "{failed} lifecycle checks failed:\n{}\n\n--- serve log (tail) ---\n{}",
            lc.failure_list(),
            lc.dep.log_tail()
        );
    }
}

/// Step 1: Register, log in, create, then at once SFTP a page, run `uptime` over
/// SSH and see the page through nginx; SSH keeps working for [`SSH_WINDOW`].
async fn quickstart(lc: &mut Lifecycle) {
    let asked = Instant::now();
    let (code, created) = lc.user.create(&lc.client, &lc.api).await;
    let created_at = Instant::now();
    if code != 201 {
        lc.fatal(format!("POST /host answered {code}: {created}"));
    }
    lc.timing("create (POST /host to its 201)", asked.elapsed());
    let data = created["data"].clone();
    let hosting = &data["hosting"];
    let (Some(vm_id), Some(vm_ip), Some(port)) = (
        hosting["vm_id"].as_str(),
        hosting["vm_ip"].as_str(),
        hosting["ssh_port"].as_u64(),
    ) else {
        lc.fatal(format!("the 201 lacks vm_id, vm_ip or ssh_port: {created}"));
    };
    (lc.vm_id, lc.vm_ip, lc.ssh_port) = (vm_id.to_owned(), vm_ip.to_owned(), port as u16);
    lc.check(hosting["status"] == "running", || {
        format!(
            "the create's 201 says status {} instead of running",
            hosting["status"]
        )
    });
    lc.contract("the create's 201", &data);

    // From the 201 on, every new connection must get sshd's banner: a
    // restart of sshd refuses or resets the ones that come in meanwhile.
    // (OpenSSH 9.2 has no PerSourcePenalties, so these banner-only
    // connections do not count against our real logins.)
    let window_end = created_at + SSH_WINDOW;
    let addr = lc.ssh_addr();
    let prober = std::thread::spawn(move || {
        let mut failed = Vec::new();
        let (mut tries, mut slowest) = (0, Duration::ZERO);
        while Instant::now() < window_end {
            tries += 1;
            let knocked = Instant::now();
            match ssh_banner(addr, BANNER_PATIENCE) {
                Ok(_) => slowest = slowest.max(knocked.elapsed()),
                Err(e) => failed.push(format!(
                    "{:.1} s after the 201: {e}",
                    created_at.elapsed().as_secs_f64()
                )),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        (tries, slowest, failed)
    });

    // What a user pastes: no pause, no retry.
    lc.index = format!("<h1>lifecycle {}: uploaded by the quickstart</h1>", lc.run);
    let index = lc.index.clone();
    lc.upload(
        "quickstart: the SFTP upload right after the 201",
        "index.html",
        &index,
        Duration::from_secs(120),
    )
    .await;
    let uptime = lc.ssh("uptime");
    lc.check(
        uptime.as_deref().is_ok_and(|out| out.contains("load average")),
        || format!("quickstart: `ssh uptime` right after the 201: {uptime:?}"),
    );
    let (code, body) = lc.dep.get_site(lc.user.id);
    lc.check(code == 200 && body.trim() == index, || {
        format!(
            "quickstart: the site right after the upload answered {code} {:?}, want 200 {index:?}",
            snippet(&body)
        )
    });
    lc.timing(
        "quickstart (201 to upload, uptime and page seen)",
        created_at.elapsed(),
    );

    // An open session across the rest of the window must not be cut either.
    let left = window_end
        .saturating_duration_since(Instant::now())
        .as_secs()
        .max(1);
    let session = Command::new("ssh")
        .args(ssh_opts(&lc.user.key))
        .args(["-p", &lc.ssh_port.to_string(), "ubuntu@127.0.0.1"])
        .arg(format!("sleep {left}; echo still-here"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");

    // New SSH and SFTP sessions, 2 s apart, until the window is over (and a
    // few at least: under load the quickstart alone may fill most of it).
    let mut n = 0;
    while Instant::now() < window_end || n < QUICKSTART_SESSIONS {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let at = created_at.elapsed().as_secs_f64();
        let probe = format!("probe {n} of {}", lc.run);
        let result = if n % 2 == 0 {
            lc.sftp(&format!("probe-{n}.html"), &probe)
        } else {
            lc.ssh(&format!("cat /var/www/html/probe-{}.html", n - 1))
                .and_then(|out| {
                    let want = format!("probe {} of {}", n - 1, lc.run);
                    if out.trim() == want {
                        Ok(())
                    } else {
                        Err(format!("read back {out:?}, want {want:?}"))
                    }
                })
        };
        if let Err(e) = result {
            lc.fail(format!(
                "quickstart: SSH/SFTP session {at:.1} s after the 201 failed: {e}"
            ));
        }
        n += 1;
    }
    let out = session.wait_with_output().expect("ssh session");
    lc.check(
        String::from_utf8_lossy(&out.stdout).trim() == "still-here",
        || {
            format!(
                "quickstart: an SSH session open during the first {SSH_WINDOW:?} was cut ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        },
    );
    let (tries, slowest, failed) = prober.join().expect("banner prober");
    lc.check(failed.is_empty(), || {
        format!(
            "quickstart: {} of {tries} new connections to the SSH port in the {SSH_WINDOW:?} \
             after the 201 got no banner within {BANNER_PATIENCE:?}: {failed:?}",
            failed.len()
        )
    });
    lc.note(format!(
        "quickstart: {n} SSH/SFTP sessions and {tries} banner probes in the {SSH_WINDOW:?} after \
         the 201; the slowest banner came after {:.1} s",
        slowest.as_secs_f64()
    ));
}

/// What the uniqueness step reads from one guest, over SSH as its user.
const IDENTITY_SCRIPT: &str = r#"printf 'hostname %s\n' "$(hostname)"
printf 'machine_id %s\n' "$(cat /etc/machine-id)"
printf 'boot_id %s\n' "$(cat /proc/sys/kernel/random/boot_id)"
printf 'urandom %s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
for d in /sys/class/net/*; do
  n=${d##*/}; [ "$n" = lo ] && continue
  printf 'nic %s %s %s\n' "$n" "$(cat "$d/address")" "$(ip -o -4 addr show dev "$n" | awk '{print $4}' | tr '\n' ' ')"
done
printf 'date %s\n' "$(date +%s.%N)""#;

/// One guest as the uniqueness step sees it.
#[derive(Debug, Default)]
struct Identity {
    /// Which hosting, for the messages.
    who: String,
    vm_id: String,
    vm_ip: String,
    hostname: String,
    machine_id: String,
    /// Informative: clones of one template share it until their next boot.
    boot_id: String,
    /// 16 bytes of `/dev/urandom`, hex.
    urandom: String,
    /// Every NIC but `lo`: (name, MAC, IPv4 addresses without prefix).
    nics: Vec<(String, String, Vec<String>)>,
    /// Guest clock minus the host's at the midpoint of the SSH call.
    clock_skew: f64,
    /// How long the SSH call that read the clock took.
    rtt: f64,
    host_keys: Vec<String>,
}

impl Identity {
    /// The NIC carrying an IPv4 address: (name, MAC, addresses).
    fn nic(&self) -> Option<&(String, String, Vec<String>)> {
        self.nics.iter().find(|(_, _, ips)| !ips.is_empty())
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// Reads `who`'s identity over SSH (port `port`, `key`).
fn read_identity(
    who: &str,
    vm_id: &str,
    vm_ip: &str,
    port: u16,
    key: &common::guest::TestKey,
) -> Result<Identity, String> {
    let before = unix_now();
    let out = ssh("127.0.0.1", port, "ubuntu", key, IDENTITY_SCRIPT);
    let after = unix_now();
    if !out.status.success() {
        return Err(format!(
            "{who}: reading its identity over SSH exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut id = Identity {
        who: who.to_owned(),
        vm_id: vm_id.to_owned(),
        vm_ip: vm_ip.to_owned(),
        rtt: after - before,
        clock_skew: f64::NAN,
        ..Identity::default()
    };
    for line in text.lines() {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let value = value.trim().to_owned();
        match key {
            "hostname" => id.hostname = value,
            "machine_id" => id.machine_id = value,
            "boot_id" => id.boot_id = value,
            "urandom" => id.urandom = value,
            "nic" => {
                let mut fields = value.split_whitespace();
                let name = fields.next().unwrap_or("").to_owned();
                let mac = fields.next().unwrap_or("").to_ascii_lowercase();
                let ips = fields
                    .map(|cidr| cidr.split('/').next().unwrap_or(cidr).to_owned())
                    .collect();
                id.nics.push((name, mac, ips));
            }
            "date" => {
                let guest: f64 = value
                    .parse()
                    .map_err(|e| format!("{who}: `date +%s.%N` gave {value:?}: {e}"))?;
                id.clock_skew = guest - (before + after) / 2.0;
            }
            _ => {}
        }
    }
    id.host_keys = ssh_host_keys("127.0.0.1", port);
    Ok(id)
}

/// The guard's (port, MAC, IPv4) triples: `nft -j list set bridge
/// webhoster_guard guests` in the deployment's namespace. An element is
/// either a bare concatenation or one wrapped with its options.
fn guard_set(dep: &Deployment) -> Result<Vec<(String, String, String)>, String> {
    let out = dep.netns_exec(
        "nft",
        &["-j", "list", "set", "bridge", "webhoster_guard", "guests"],
    );
    if !out.status.success() {
        return Err(format!(
            "nft -j list set bridge webhoster_guard guests: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("the guard set's JSON: {e}"))?;
    let mut triples = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for elem in item["set"]["elem"].as_array().into_iter().flatten() {
            let concat = if elem["concat"].is_array() {
                &elem["concat"]
            } else {
                &elem["elem"]["val"]["concat"]
            };
            if let [port, mac, ip] = concat.as_array().map(Vec::as_slice).unwrap_or_default()
                && let (Some(port), Some(mac), Some(ip)) = (port.as_str(), mac.as_str(), ip.as_str())
            {
                triples.push((port.to_owned(), mac.to_ascii_lowercase(), ip.to_owned()));
            }
        }
    }
    Ok(triples)
}

/// Step 2: Every clone is unique. Two more users create at once (warm
/// clones of the same template); across the three guests: SSH host keys,
/// machine-id, hostname, MAC, IP and `/dev/urandom` bytes all differ, each
/// has its hosting's IP and the MAC the network guard lets through, and
/// each clock is within [`CLOCK_SLACK`] of the host's. The two extra
/// hostings are then deleted and leave nothing behind.
async fn unique_clones(lc: &mut Lifecycle) {
    match lc.wait_pool(2, POOL_REFILL).await {
        Ok(took) if took > Duration::from_secs(5) => lc.note(format!(
            "uniqueness: waited {:.1} s for the pool to hold 2 clones",
            took.as_secs_f64()
        )),
        Ok(_) => {}
        Err(pool) => lc.fail(format!(
            "uniqueness: the pool has not 2 clones ready {POOL_REFILL:?} after the quickstart; \
             pool status: {pool}"
        )),
    }
    let mut users = Vec::new();
    for n in 1..=2 {
        users.push(sign_up(&lc.client, &lc.api, &format!("twin{n}-{}", lc.run)).await);
    }
    let asked = Instant::now();
    let created = futures::future::join_all(users.iter().map(|u| u.create(&lc.client, &lc.api))).await;
    lc.timing("two concurrent creates (POST to both 201)", asked.elapsed());
    let mut extras = Vec::new();
    for (n, (user, (code, body))) in users.iter().zip(&created).enumerate() {
        let who = format!("extra hosting {}", n + 1);
        let h = &body["data"]["hosting"];
        if !lc.check(*code == 201 && h["status"] == "running", || {
            format!("uniqueness: the create of {who} answered {code} {body}, want 201 running")
        }) {
            continue;
        }
        let (Some(vm_id), Some(vm_ip), Some(port)) =
            (h["vm_id"].as_str(), h["vm_ip"].as_str(), h["ssh_port"].as_u64())
        else {
            lc.fail(format!(
                "uniqueness: the 201 of {who} lacks vm_id, vm_ip or ssh_port: {body}"
            ));
            continue;
        };
        extras.push((who, user, vm_id.to_owned(), vm_ip.to_owned(), port as u16));
    }
    lc.check_warm_creates("after the two concurrent creates", 1 + extras.len() as u64)
        .await;

    let mut ids = Vec::new();
    let first = read_identity(
        "the quickstart's hosting",
        &lc.vm_id,
        &lc.vm_ip,
        lc.ssh_port,
        &lc.user.key,
    );
    for result in std::iter::once(first).chain(
        extras
            .iter()
            .map(|(who, user, vm_id, vm_ip, port)| read_identity(who, vm_id, vm_ip, *port, &user.key)),
    ) {
        match result {
            Ok(id) => ids.push(id),
            Err(e) => lc.fail(format!("uniqueness: {e}")),
        }
    }
    let guard = guard_set(&lc.dep);
    if let Err(e) = &guard {
        lc.fail(format!("uniqueness: {e}"));
    }
    for id in &ids {
        lc.note(format!(
            "uniqueness: {}: hostname {:?}, machine-id {}, boot_id {}, urandom {}, nics {:?}, \
             clock {:+.3} s (SSH call {:.2} s), host keys {:?}",
            id.who,
            id.hostname,
            id.machine_id,
            id.boot_id,
            id.urandom,
            id.nics,
            id.clock_skew,
            id.rtt,
            id.host_keys
        ));
        let who = &id.who;
        lc.check(!id.host_keys.is_empty(), || {
            format!("uniqueness: {who}: ssh-keyscan got no host key")
        });
        lc.check(id.machine_id.len() == 32, || {
            format!("uniqueness: {who}: /etc/machine-id is {:?}", id.machine_id)
        });
        lc.check(!id.hostname.is_empty(), || {
            format!("uniqueness: {who}: no hostname")
        });
        lc.check(id.urandom.len() == 32, || {
            format!(
                "uniqueness: {who}: 16 bytes of /dev/urandom read as {:?}",
                id.urandom
            )
        });
        let nic = id.nic();
        lc.check(
            nic.is_some_and(|(_, _, ips)| ips == std::slice::from_ref(&id.vm_ip)),
            || {
                format!(
                    "uniqueness: {who}: the guest's IPv4 addresses are {:?}, want exactly its hosting's vm_ip {}",
                    id.nics, id.vm_ip
                )
            },
        );
        let allowed = guard
            .as_ref()
            .ok()
            .and_then(|set| set.iter().find(|(_, _, ip)| *ip == id.vm_ip));
        let tap = webhoster::net::tap_name(&id.vm_id);
        lc.check(
            allowed.is_some_and(|(port, mac, _)| *port == tap && nic.is_some_and(|(_, m, _)| m == mac)),
            || {
                format!(
                    "uniqueness: {who}: the guard allows {allowed:?} for {}, the guest's NIC is {nic:?} \
                     (want the guest's MAC on tap {tap})",
                    id.vm_ip
                )
            },
        );
        let slack = CLOCK_SLACK + id.rtt / 2.0;
        lc.check(id.clock_skew.abs() <= slack, || {
            format!(
                "uniqueness: {who}: the guest's clock is {:+.3} s off the host's (allowed {slack:.2} s: \
                 {CLOCK_SLACK} s plus half the SSH call's {:.2} s)",
                id.clock_skew, id.rtt
            )
        });
    }
    type Field = fn(&Identity) -> Vec<String>;
    let fields: [(&str, Field); 6] = [
        ("SSH host key", |i| i.host_keys.clone()),
        ("machine-id", |i| vec![i.machine_id.clone()]),
        ("hostname", |i| vec![i.hostname.clone()]),
        ("MAC", |i| {
            i.nic().map(|(_, mac, _)| mac.clone()).into_iter().collect()
        }),
        ("IP", |i| {
            i.nic().map(|(_, _, ips)| ips.clone()).unwrap_or_default()
        }),
        ("/dev/urandom bytes", |i| vec![i.urandom.clone()]),
    ];
    for (a, i) in ids.iter().enumerate() {
        for j in &ids[a + 1..] {
            for (what, field) in &fields {
                let (x, y) = (field(i), field(j));
                let shared: Vec<&String> = x.iter().filter(|v| y.contains(v)).collect();
                lc.check(shared.is_empty(), || {
                    format!("uniqueness: {} and {} share the {what} {shared:?}", i.who, j.who)
                });
            }
        }
    }
    let boot_ids: HashSet<&str> = ids.iter().map(|i| i.boot_id.as_str()).collect();
    lc.note(format!(
        "uniqueness: {} distinct boot_id(s) across {} guests (informative: clones keep the template's)",
        boot_ids.len(),
        ids.len()
    ));

    for (who, user, vm_id, vm_ip, port) in &extras {
        delete_extra(lc, who, user, vm_id, vm_ip, *port).await;
    }
}

/// DELETE of an extra hosting: its QEMU, VM dir, tap, guard element, SSH
/// forward and site are gone.
async fn delete_extra(lc: &Lifecycle, who: &str, user: &User, vm_id: &str, vm_ip: &str, port: u16) {
    let pid: Option<i32> = std::fs::read_to_string(lc.dep.vm_dir(vm_id).join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    let (code, body) = user.delete_host(&lc.client, &lc.api).await;
    lc.check(code == 200, || {
        format!("{who}: DELETE /host/my answered {code}: {body}")
    });
    let (code, _) = user.host(&lc.client, &lc.api).await;
    lc.check(code == 404, || {
        format!("{who}: GET /host/my after DELETE answered {code}")
    });
    lc.check(pid.is_some_and(pid_gone), || {
        format!("{who}: after DELETE, QEMU {pid:?} (from its pidfile before) still runs or was never seen")
    });
    let dir = lc.dep.vm_dir(vm_id);
    lc.check(!dir.exists(), || {
        format!("{who}: after DELETE, {} is left", dir.display())
    });
    let tap = webhoster::net::tap_name(vm_id);
    let tap_left = lc.dep.netns_exec("ip", &["link", "show", &tap]).status.success();
    lc.check(!tap_left, || format!("{who}: after DELETE, tap {tap} is left"));
    let guard = guard_set(&lc.dep);
    lc.check(
        guard
            .as_ref()
            .is_ok_and(|set| set.iter().all(|(p, _, ip)| *p != tap && ip != vm_ip)),
        || format!("{who}: after DELETE, the guard set still names {tap} or {vm_ip}: {guard:?}"),
    );
    let banner = ssh_banner(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(3),
    );
    lc.check(banner.is_err(), || {
        format!("{who}: after DELETE, its SSH port {port} still answers {banner:?}")
    });
    let (code, _) = lc.dep.get_site(user.id);
    lc.check(code != 200, || {
        format!("{who}: after DELETE, its site still answers 200")
    });
}

/// Step 3: A file acknowledged over SFTP 3 s before `kill -9` of QEMU is served
/// once the VM is back; meanwhile `running` always means the site answers.
async fn crash(lc: &mut Lifecycle) {
    let content = format!(
        "<p>crash {} {}</p>",
        lc.run,
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    lc.upload(
        "before kill -9: the SFTP upload",
        "crash.html",
        &content,
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let Some(pid) = lc.qemu_pid() else {
        lc.fatal(format!("no pidfile for {}", lc.vm_id));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
        .unwrap_or_else(|e| lc.fatal(format!("kill -9 {pid}: {e}")));
    lc.note(format!("kill -9 of QEMU {pid}"));
    let index = lc.index.clone();
    let watch = lc
        .watch("after kill -9", BACK_AFTER_CRASH, CRASH_NOTICE, |o| {
            o.status == "running" && o.site == 200 && o.body.trim() == index
        })
        .await;
    lc.no_lies("while the VM restarted after kill -9", &watch);
    if !lc.came_back("after kill -9 of QEMU", BACK_AFTER_CRASH, &watch) {
        return;
    }
    lc.timing("kill -9 to running with the page again", watch.took.unwrap());
    lc.contract("after the restart", &watch.last.data);
    let new_pid = lc.qemu_pid();
    lc.check(new_pid.is_some_and(|p| p != pid && !pid_gone(p)), || {
        format!("after kill -9 of {pid}: the pidfile names {new_pid:?}, want a new live QEMU")
    });
    lc.check_file("acknowledged upload after kill -9", "crash.html", &content);
    lc.check_ssh_login("after kill -9");
}

/// Step 4: Stop serve and `teardown` (a host reboot), start serve again: the same
/// guest comes back with its page, files, host key, IP and port.
async fn teardown_and_back(lc: &mut Lifecycle) {
    let keys = ssh_host_keys("127.0.0.1", lc.ssh_port);
    lc.check(!keys.is_empty(), || {
        "before teardown: ssh-keyscan got no host key".into()
    });
    let (code, page) = lc.dep.get_site(lc.user.id);
    lc.check(code == 200, || {
        format!("before teardown: the site answered {code}")
    });
    let marker = format!("before-teardown {}", lc.run);
    let written = lc.ssh(&format!("echo '{marker}' > /var/www/html/before-teardown.html"));
    lc.check(written.is_ok(), || format!("before teardown: {written:?}"));
    let pid = lc.qemu_pid();

    lc.dep.stop();
    let asked = Instant::now();
    let out = lc
        .dep
        .command(&["teardown"])
        .output()
        .expect("webhoster teardown");
    lc.timing("teardown", asked.elapsed());
    lc.check(out.status.success(), || {
        format!(
            "teardown exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    });
    let (code, _) = lc.dep.get_site(lc.user.id);
    lc.check(code != 200, || {
        "after teardown: the site still answers 200".into()
    });
    lc.check(pid.is_none_or(pid_gone), || {
        format!("after teardown: QEMU {pid:?} still runs")
    });
    let left = lc.dep.leftovers();
    lc.check(left.is_empty(), || {
        format!("after teardown (like a reboot) the host still holds: {left:?}")
    });

    let asked = Instant::now();
    lc.dep.start().await;
    lc.note(format!(
        "serve answers again {:.1} s after its start",
        asked.elapsed().as_secs_f64()
    ));
    let watch = lc
        .watch(
            "after teardown and a new serve",
            BACK_AFTER_TEARDOWN,
            Duration::ZERO,
            |o| o.status == "running",
        )
        .await;
    lc.no_lies("while the hosting came back after teardown", &watch);
    if !lc.came_back("after teardown and a new serve", BACK_AFTER_TEARDOWN, &watch) {
        lc.fatal("the hosting is not running again after teardown; the remaining steps would tell nothing");
    }
    lc.timing("serve start after teardown to running", asked.elapsed());
    let last = &watch.last;
    let data = last.data.clone();
    lc.contract("after teardown", &data);
    let (ip, port) = (&data["hosting"]["vm_ip"], &data["hosting"]["ssh_port"]);
    lc.check(*ip == lc.vm_ip.as_str() && *port == lc.ssh_port, || {
        format!(
            "after teardown: vm_ip {ip} and ssh_port {port}, want {} and {}",
            lc.vm_ip, lc.ssh_port
        )
    });
    if !lc
        .ready_at_running("after teardown", last, asked, BACK_AFTER_TEARDOWN)
        .await
    {
        lc.fatal("the guest is not back after teardown; the remaining steps would tell nothing");
    }
    let (site, body) = lc.dep.get_site(lc.user.id);
    lc.check(site == 200 && body.trim() == page.trim(), || {
        format!(
            "after teardown: the site answered {site} {:?}, want the page from before {:?}",
            snippet(&body),
            snippet(&page)
        )
    });
    let keys_after = ssh_host_keys("127.0.0.1", lc.ssh_port);
    lc.check(keys_after == keys, || {
        format!("after teardown: SSH host keys {keys_after:?}, want the same as before {keys:?}")
    });
    lc.check_file(
        "a file written (no sync) just before teardown",
        "before-teardown.html",
        &marker,
    );
}

/// `nft list table ip <table>`: the listing, empty when there is no such table.
fn nft_listing(table: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "table", "ip", table])
        .output()
        .expect("nft (Debian package nftables)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Step 5a: The host nft table, flushed, is noticed and repaired: the SSH forward
/// (a DNAT rule in that table) works again.
async fn repair_nft(lc: &mut Lifecycle) {
    let table = format!("webhoster_{}", lc.dep.netns);
    let before = nft_listing(&table);
    if !lc.check(before.contains("dnat"), || {
        format!("host nft table ip {table} has no DNAT rule before the flush: {before:?}")
    }) {
        return;
    }
    let out = Command::new("nft")
        .args(["flush", "table", "ip", &table])
        .output()
        .expect("nft");
    if !lc.check(out.status.success(), || {
        format!(
            "nft flush table ip {table}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }) {
        return;
    }
    let addr = lc.ssh_addr();
    let broken = ssh_banner(addr, Duration::from_secs(3));
    lc.note(format!("flushed {table}; the SSH port now gives {broken:?}"));
    let index = lc.index.clone();
    let watch = lc
        .watch(
            "after the nft table was flushed",
            NFT_REPAIR,
            Duration::ZERO,
            |o| {
                o.status == "running"
                    && o.site == 200
                    && o.body.trim() == index
                    && nft_listing(&table).contains("dnat")
                    && ssh_banner(addr, Duration::from_secs(3)).is_ok()
            },
        )
        .await;
    let what = if watch.took.is_some() {
        String::new()
    } else {
        format!(
            "after the host nft table was flushed (DNAT rule back: {}, SSH port: {:?})",
            nft_listing(&table).contains("dnat"),
            ssh_banner(addr, Duration::from_secs(3))
        )
    };
    if !lc.came_back(&what, NFT_REPAIR, &watch) {
        // Put the table back as it was, so the steps after this one test
        // their own promises rather than this failure.
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &table])
            .output();
        let mut restore = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        {
            use std::io::Write;
            let mut stdin = restore.stdin.take().expect("nft stdin");
            let _ = stdin.write_all(before.as_bytes());
        }
        let out = restore.wait_with_output().expect("nft -f");
        lc.note(format!(
            "the test restored {table} from its listing ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        return;
    }
    lc.timing("nft table flushed to repaired", watch.took.unwrap());
    lc.check_ssh_login("after the nft table was repaired");
}

/// Step 5b: The VM's tap, deleted inside the namespace, is noticed and repaired
/// (the VM may be restarted on a new one): site, SSH and status come back.
async fn repair_tap(lc: &mut Lifecycle) {
    let tap = webhoster::net::tap_name(&lc.vm_id);
    let exists = |dep: &Deployment| dep.netns_exec("ip", &["link", "show", &tap]).status.success();
    if !lc.check(exists(&lc.dep), || {
        format!("tap {tap} of {} is not in namespace {}", lc.vm_id, lc.dep.netns)
    }) {
        return;
    }
    let out = lc.dep.netns_exec("ip", &["link", "del", &tap]);
    if !lc.check(out.status.success(), || {
        format!(
            "ip link del {tap}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }) {
        return;
    }
    lc.note(format!("deleted tap {tap}"));
    let index = lc.index.clone();
    let addr = lc.ssh_addr();
    let watch = lc
        .watch("after the tap was deleted", TAP_REPAIR, Duration::ZERO, |o| {
            o.status == "running"
                && o.site == 200
                && o.body.trim() == index
                && exists(&lc.dep)
                && ssh_banner(addr, Duration::from_secs(3)).is_ok()
        })
        .await;
    if !watch.lies.is_empty() {
        // Reported, not failed: a repair is promised within a bound, and
        // until it is noticed the status may still say running.
        lc.note(format!(
            "after the tap was deleted, {} polls said running while the site was down",
            watch.lies.len()
        ));
    }
    let what = format!("after the tap was deleted (tap back: {})", exists(&lc.dep));
    if !lc.came_back(&what, TAP_REPAIR, &watch) {
        return;
    }
    lc.timing("tap deleted to repaired", watch.took.unwrap());
    lc.check_ssh_login("after the tap was repaired");
}

/// Step 6: Stop and start through the API: `stopped`, then `running`, and a file
/// written just before the stop is still there.
async fn stop_start(lc: &mut Lifecycle) {
    let marker = format!("before-stop {}", lc.run);
    let written = lc.ssh(&format!("echo '{marker}' > /var/www/html/before-stop.html"));
    lc.check(written.is_ok(), || format!("before stop: {written:?}"));
    let pid = lc.qemu_pid();

    let asked = Instant::now();
    let (code, body) = lc.user.power(&lc.client, &lc.api, "stop").await;
    if !lc.check(code == 200, || {
        format!("POST /host/my/stop answered {code}: {body}")
    }) {
        return;
    }
    let watch = lc
        .watch("after POST stop", STOPPED, Duration::ZERO, |o| {
            o.status == "stopped"
        })
        .await;
    lc.no_lies("while the hosting stopped", &watch);
    if lc.came_back("stopped after POST stop", STOPPED, &watch) {
        lc.timing("POST stop to stopped", asked.elapsed());
    }
    let data = watch.last.data.clone();
    lc.check(data["hosting"]["desired"] == "stopped", || {
        format!("after POST stop: desired is {}", data["hosting"]["desired"])
    });
    lc.contract("after stop", &data);
    let (code, _) = lc.dep.get_site(lc.user.id);
    lc.check(code != 200, || "while stopped: the site answers 200".into());
    lc.check(pid.is_none_or(pid_gone), || {
        format!("while stopped: QEMU {pid:?} still runs")
    });

    let asked = Instant::now();
    let (code, body) = lc.user.power(&lc.client, &lc.api, "start").await;
    if !lc.check(code == 200, || {
        format!("POST /host/my/start answered {code}: {body}")
    }) {
        return;
    }
    let watch = lc
        .watch("after POST start", STARTED, Duration::ZERO, |o| {
            o.status == "running"
        })
        .await;
    lc.no_lies("while the hosting started", &watch);
    if !lc.came_back("running after POST start", STARTED, &watch) {
        return;
    }
    lc.timing("POST start to running", asked.elapsed());
    let data = watch.last.data.clone();
    lc.check(data["hosting"]["desired"] == "running", || {
        format!("after POST start: desired is {}", data["hosting"]["desired"])
    });
    lc.contract("after start", &data);
    if !lc
        .ready_at_running("after POST start", &watch.last, asked, STARTED)
        .await
    {
        return;
    }
    let index = lc.index.clone();
    lc.check_file("after stop and start", "", &index);
    lc.check_file(
        "a file written (no sync) just before stop",
        "before-stop.html",
        &marker,
    );
}

/// Step 7: `sudo systemctl reboot` inside the guest: the same QEMU resets and
/// the guest boots from its own disk, with the same SSH host key, the user's
/// files and SSH login.
async fn guest_reboot(lc: &mut Lifecycle) {
    let keys = ssh_host_keys("127.0.0.1", lc.ssh_port);
    lc.check(!keys.is_empty(), || {
        "before the guest reboot: ssh-keyscan got no host key".into()
    });
    let boot_id = match lc.ssh("cat /proc/sys/kernel/random/boot_id") {
        Ok(id) => id.trim().to_owned(),
        Err(e) => {
            lc.fail(format!("before the guest reboot: {e}"));
            return;
        }
    };
    let content = format!(
        "<p>reboot {} {}</p>",
        lc.run,
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    lc.upload(
        "before the guest reboot: the SFTP upload",
        "reboot.html",
        &content,
        Duration::from_secs(60),
    )
    .await;
    let asked = Instant::now();
    // The session ends with the connection cut by the reboot, so its exit
    // status says nothing; the watch below tells whether it rebooted.
    let said = lc.ssh("sudo systemctl reboot");
    lc.note(format!("sudo systemctl reboot over SSH: {said:?}"));
    let index = lc.index.clone();
    let watch = lc
        .watch(
            "after a reboot inside the guest",
            BACK_AFTER_REBOOT,
            Duration::ZERO,
            |o| {
                o.status == "running"
                    && o.site == 200
                    && o.body.trim() == index
                    && lc
                        .ssh("cat /proc/sys/kernel/random/boot_id")
                        .is_ok_and(|id| id.trim() != boot_id)
            },
        )
        .await;
    if !watch.lies.is_empty() {
        // Reported, not failed: the API follows the reboot from the guest's
        // reset on (the same QEMU goes on), and the guest's shutdown before
        // it is seen only by looks.
        lc.note(format!(
            "during the guest reboot, {} polls said running while the site was down",
            watch.lies.len()
        ));
    }
    if !lc.came_back(
        "after a reboot inside the guest (a new boot_id, the site with the page)",
        BACK_AFTER_REBOOT,
        &watch,
    ) {
        return;
    }
    lc.timing("guest reboot to running with the page again", asked.elapsed());
    lc.contract("after the guest reboot", &watch.last.data);
    let keys_after = ssh_host_keys("127.0.0.1", lc.ssh_port);
    lc.check(keys_after == keys, || {
        format!("after the guest reboot: SSH host keys {keys_after:?}, want the same as before {keys:?}")
    });
    let index = lc.index.clone();
    lc.check_file("after the guest reboot", "", &index);
    lc.check_file(
        "a file uploaded just before the guest reboot",
        "reboot.html",
        &content,
    );
    lc.check_ssh_login("after the guest reboot");
}

/// Step 8: DELETE, stop serve and tear down: nothing of the run is left.
async fn delete(lc: &mut Lifecycle) {
    let pid = lc.qemu_pid();
    let (code, body) = lc.user.delete_host(&lc.client, &lc.api).await;
    lc.check(code == 200, || format!("DELETE /host/my answered {code}: {body}"));
    let (code, _) = lc.user.host(&lc.client, &lc.api).await;
    lc.check(code == 404, || {
        format!("GET /host/my after DELETE answered {code}")
    });
    lc.check(pid.is_none_or(pid_gone), || {
        format!("after DELETE: QEMU {pid:?} still runs")
    });
    let dir = lc.dep.vm_dir(&lc.vm_id);
    lc.check(!dir.exists(), || {
        format!("after DELETE: {} is left", dir.display())
    });
    let (code, _) = lc.dep.get_site(lc.user.id);
    lc.check(code != 200, || "after DELETE: the site still answers 200".into());

    lc.dep.stop();
    let out = lc
        .dep
        .command(&["teardown"])
        .output()
        .expect("webhoster teardown");
    lc.check(out.status.success(), || {
        format!(
            "final teardown exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    });
    let left = lc.dep.leftovers();
    lc.check(left.is_empty(), || format!("left on the host: {left:?}"));
}
