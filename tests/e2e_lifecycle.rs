//! Acceptance test of the hosting lifecycle, end to end: the real `webhoster
//! serve` binary, a real guest (TCG here), the real namespace, nftables and
//! nginx. One hosting is shared by every check, in order, because a booted
//! guest costs tens of seconds:
//!
//! 1. the quickstart pasted with no pauses: SFTP, SSH and the site work the
//!    moment the create answers 201, and new SSH connections keep working for
//!    the 15 s after it;
//! 2. a file acknowledged over SFTP survives `kill -9` of QEMU, and while the
//!    VM restarts the API never says `running` unless the site answers;
//! 3. `teardown` (what a host reboot does) and a new `serve` bring the same
//!    guest back: same page, files, SSH host key, IP and port;
//! 4. a flushed host nft table and a deleted tap are repaired while serve runs;
//! 5. stop / start through the API keep what was written before the stop;
//! 6. DELETE leaves nothing on the host.
//!
//! A failed check is recorded and the test goes on, so one run lists every
//! broken promise; it fails at the end with all of them and the tail of
//! serve's log. Before each step the test waits (bounded) for a usable guest,
//! so a step tests its own promise even when an earlier one failed; only
//! what makes the rest meaningless (no hosting, a guest that never comes
//! back, the time budget spent) stops it at once. Timings are printed, never
//! asserted: every wait is only bounded, generously for a loaded 2-core
//! machine running guests under TCG.
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
/// takes 5 to 8 minutes on a loaded 2-core machine.
const BUDGET: Duration = Duration::from_secs(15 * 60);
/// How often a watch polls the API and the site.
const POLL: Duration = Duration::from_secs(1);
/// How long after the create's 201 new SSH connections must keep working:
/// cloud-init's late modules (which restarted sshd at ~7 s) are over by then.
const SSH_WINDOW: Duration = Duration::from_secs(15);
/// After `kill -9`, how long the API may still say `running` before it has
/// noticed: QEMU's exit is seen at once (QMP socket closed, child exited), so
/// this only covers one poll in flight.
const CRASH_NOTICE: Duration = Duration::from_secs(2);
/// Generous bounds for a guest boot under TCG on a loaded 2-core machine.
const BACK_AFTER_CRASH: Duration = Duration::from_secs(240);
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

    quickstart(&mut lc).await;
    crash(&mut lc).await;
    lc.settle("the teardown").await;
    teardown_and_back(&mut lc).await;
    lc.settle("the nft flush").await;
    repair_nft(&mut lc).await;
    lc.settle("the tap deletion").await;
    repair_tap(&mut lc).await;
    lc.settle("stop / start").await;
    stop_start(&mut lc).await;
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
        let mut tries = 0;
        while Instant::now() < window_end {
            tries += 1;
            if let Err(e) = ssh_banner(addr, Duration::from_secs(3)) {
                failed.push(format!(
                    "{:.1} s after the 201: {e}",
                    created_at.elapsed().as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        (tries, failed)
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
    let (tries, failed) = prober.join().expect("banner prober");
    lc.check(failed.is_empty(), || {
        format!(
            "quickstart: {} of {tries} new connections to the SSH port got no banner within \
             {SSH_WINDOW:?} of the 201: {failed:?}",
            failed.len()
        )
    });
    lc.note(format!(
        "quickstart: {n} SSH/SFTP sessions and {tries} banner probes in the {SSH_WINDOW:?} after the 201"
    ));
}

/// Step 2: A file acknowledged over SFTP 3 s before `kill -9` of QEMU is served
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

/// Step 3: Stop serve and `teardown` (a host reboot), start serve again: the same
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

/// Step 4a: The host nft table, flushed, is noticed and repaired: the SSH forward
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

/// Step 4b: The VM's tap, deleted inside the namespace, is noticed and repaired
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

/// Step 5: Stop and start through the API: `stopped`, then `running`, and a file
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

/// Step 6: DELETE, stop serve and tear down: nothing of the run is left.
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
