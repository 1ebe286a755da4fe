//! The orchestrator on fakes over a real store (SQLite and PostgreSQL):
//! a failure injected at every step rolls everything back in reverse; a
//! crash at every step is undone by recovery from the journal alone; a delete
//! cut short is finished; concurrent creates never share an allocation;
//! convergence puts back what a reboot or an operator removed; a DELETE
//! cancels a create in flight; a panicking create is rolled back; the reaper
//! removes what belongs to no hosting.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;

use common::control::{Db, TestApi, TestDb, fast_hosting_config};
use common::fakes::{FakeWorld, step_method};
use webhoster::hosting::pool::TemplateState;
use webhoster::hosting::ports::{GuestBoot, VmNetwork, VmRunState};
use webhoster::hosting::{
    CreatePath, Desired, HostingConfig, HostingError, HostingService, HostingState, Step,
};
use webhoster::store::{StepState, Store, User};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";

/// The test key, parsed as the API would.
fn key() -> Option<webhoster::auth::SshPublicKey> {
    Some(webhoster::auth::SshPublicKey::parse(KEY).unwrap())
}

struct Rig {
    store: Store,
    world: Arc<FakeWorld>,
    svc: Arc<HostingService>,
    db: TestDb,
}

impl Rig {
    async fn new(kind: Db) -> Rig {
        let db = TestDb::new(kind).await;
        let store = Store::connect(&db.url).await.unwrap();
        let world = FakeWorld::new(db.dir(), "10.98.0.0/24".parse().unwrap());
        let svc = HostingService::new(store.clone(), world.ports(), fast_hosting_config());
        Rig {
            store,
            world,
            svc,
            db,
        }
    }

    /// A new service on the same database and fakes: a restarted webhoster.
    fn restart(&mut self) {
        self.svc.abort_creates();
        self.svc = HostingService::new(self.store.clone(), self.world.ports(), fast_hosting_config());
    }

    async fn user(&self, name: &str) -> User {
        self.store
            .create_user(&format!("{name}@example.com"), name, "x")
            .await
            .unwrap()
    }
}

/// The steps of a create without a warm clone.
const COLD: [Step; Step::PER_CREATE] = [
    Step::Seed,
    Step::Disk,
    Step::Tap,
    Step::Forward,
    Step::Proxy,
    Step::Spawn,
    Step::Ready,
    Step::Publish,
];

/// The "do" method of each step that ran, from the call log, in order.
fn done_steps(calls: &[String]) -> Vec<Step> {
    COLD.into_iter()
        .filter(|s| calls.iter().any(|c| c.starts_with(step_method(*s))))
        .collect()
}

/// The undo calls, in order, mapped back to their step.
fn undo_order(calls: &[String]) -> Vec<Step> {
    let undo = |c: &str| match c.split(' ').next().unwrap() {
        "seed.remove" => Some(Step::Seed),
        "engine.remove_disk" => Some(Step::Disk),
        "net.delete_tap" => Some(Step::Tap),
        "engine.kill" => Some(Step::Spawn),
        "net.remove_forward" => Some(Step::Forward),
        "proxy.remove_site" => Some(Step::Proxy),
        _ => None,
    };
    calls.iter().filter_map(|c| undo(c)).collect()
}

fn undoable(steps: &[Step]) -> Vec<Step> {
    steps
        .iter()
        .copied()
        .filter(|s| !matches!(s, Step::Ready | Step::Publish))
        .collect()
}

async fn rollback_at_every_step(db: Db) {
    let rig = Rig::new(db).await;
    for (i, step) in COLD.into_iter().enumerate() {
        let user = rig.user(&format!("user{i}")).await;
        rig.world.clear_faults();
        rig.world.fail_on(step_method(step));
        let before = rig.world.calls().len();
        let err = rig.svc.create(&user, key(), true).await.unwrap_err();
        match &err {
            HostingError::StepFailed { step: s, .. } => assert_eq!(*s, step.name()),
            other => panic!("step {step:?}: unexpected {other:?}"),
        }
        assert_eq!(err.is_timeout(), matches!(step, Step::Ready | Step::Publish));
        let calls = rig.world.calls()[before..].to_vec();
        // Every step up to the failed one ran, in order; none after it.
        let ran = done_steps(&calls);
        assert_eq!(ran, COLD[..=i].to_vec(), "step {step:?}: {calls:?}");
        // The touched steps (the failed one included: it may have half-run)
        // are undone in exact reverse order, then the VM leftovers destroyed.
        let mut want = undoable(&ran);
        want.reverse();
        assert_eq!(undo_order(&calls), want, "step {step:?}: {calls:?}");
        assert!(calls.last().unwrap().starts_with("engine.destroy"), "{calls:?}");
        // Nothing held, no row, no allocation.
        assert!(
            rig.world.held().is_empty(),
            "step {step:?}: {:?}",
            rig.world.held()
        );
        assert!(rig.store.hosting_by_user(user.id).await.unwrap().is_none());
        assert!(rig.store.used_allocations().await.unwrap().ips.is_empty());
        assert!(
            rig.store.ssh_keys(user.id).await.unwrap().is_empty(),
            "keys kept only on success"
        );
    }
    // With the fault gone, the same user gets a hosting.
    rig.world.clear_faults();
    let user = rig.store.user_by_login("user0").await.unwrap().unwrap().user;
    let created = rig.svc.create(&user, key(), true).await.unwrap();
    assert_eq!(created.hosting.state, HostingState::Running);
    let journal = rig.store.steps(created.hosting.id).await.unwrap();
    assert_eq!(journal.len(), Step::PER_CREATE);
    assert!(journal.iter().all(|r| r.state == StepState::Done), "{journal:?}");
    drop(rig.db);
}

async fn failed_undo_keeps_the_row_until_delete(db: Db) {
    let rig = Rig::new(db).await;
    let user = rig.user("ivan").await;
    rig.world.fail_on(step_method(Step::Forward));
    rig.world.fail_on("engine.remove_disk");
    let err = rig.svc.create(&user, key(), true).await.unwrap_err();
    assert!(matches!(err, HostingError::RollbackFailed { .. }), "{err:?}");
    let h = rig.store.hosting_by_user(user.id).await.unwrap().unwrap();
    assert_eq!(h.state, HostingState::Deleting);
    let why = h.last_error.unwrap_or_default();
    assert!(why.contains("disk"), "the error names what is left: {why}");
    // The other undos went on past the one that failed.
    let held = rig.world.held();
    assert!(
        held.taps.is_empty() && held.vms.is_empty() && held.seeds.is_empty(),
        "{held:?}"
    );
    assert!(held.forwards.is_empty() && held.sites.is_empty(), "{held:?}");
    // A second create is refused while the failed one holds the slot.
    assert!(matches!(
        rig.svc.create(&user, None, true).await.unwrap_err(),
        HostingError::Exists
    ));
    rig.world.clear_faults();
    rig.svc.delete(user.id).await.unwrap();
    assert!(rig.world.held().is_empty(), "{:?}", rig.world.held());
    assert!(rig.store.hosting_by_user(user.id).await.unwrap().is_none());
    drop(rig.db);
}

async fn crash_at_every_step_is_undone_on_restart(db: Db) {
    let mut rig = Rig::new(db).await;
    for (i, step) in COLD.into_iter().enumerate() {
        let user = rig.user(&format!("crash{i}")).await;
        rig.world.clear_faults();
        rig.world.hang_on(step_method(step));
        let created = rig.svc.create(&user, key(), false).await.unwrap();
        let id = created.hosting.id;
        // Wait until the journal shows the step under way, then "kill -9".
        let mut seen = false;
        for _ in 0..500 {
            let journal = rig.store.steps(id).await.unwrap();
            if journal
                .iter()
                .any(|r| r.step == step.name() && r.state == StepState::Pending)
            {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(seen, "step {step:?} never started");
        rig.restart();
        rig.world.clear_faults();
        let report = rig.svc.recover().await.unwrap();
        assert_eq!(report.undone, vec![created.hosting.vm_id.clone()], "{report:?}");
        assert!(report.failed.is_empty());
        assert!(rig.store.hosting_by_user(user.id).await.unwrap().is_none());
        assert!(
            rig.world.held().is_empty(),
            "step {step:?}: {:?}",
            rig.world.held()
        );
    }
    // Recovery is idempotent, and the service works after it.
    let report = rig.svc.recover().await.unwrap();
    assert!(report.undone.is_empty() && report.deleted.is_empty());
    let user = rig.store.user_by_login("crash0").await.unwrap().unwrap().user;
    rig.svc.create(&user, key(), true).await.unwrap();
    drop(rig.db);
}

async fn crash_during_delete_is_finished_on_restart(db: Db) {
    let mut rig = Rig::new(db).await;
    let user = rig.user("judy").await;
    rig.svc.create(&user, key(), true).await.unwrap();
    rig.world.hang_on("net.delete_tap");
    let svc = rig.svc.clone();
    let uid = user.id;
    let delete = tokio::spawn(async move { svc.delete(uid).await });
    for _ in 0..500 {
        if rig.world.calls().iter().any(|c| c.starts_with("net.delete_tap")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    delete.abort();
    let h = rig.store.hosting_by_user(user.id).await.unwrap().unwrap();
    assert_eq!(h.state, HostingState::Deleting);
    rig.restart();
    rig.world.clear_faults();
    let report = rig.svc.recover().await.unwrap();
    assert_eq!(report.deleted, vec![h.vm_id]);
    assert!(rig.world.held().is_empty(), "{:?}", rig.world.held());
    assert!(rig.store.hosting_by_user(user.id).await.unwrap().is_none());
    drop(rig.db);
}

async fn concurrent_creates_by_one_user(db: Db) {
    let api = TestApi::start(db).await;
    let token = api.user("kate").await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let client = api.client.clone();
        let url = api.url("/api/v1/host");
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 201 || *s == 409), "{statuses:?}");
    let held = api.world.held();
    assert_eq!(
        (
            held.vms.len(),
            held.taps.len(),
            held.disks.len(),
            held.forwards.len(),
            held.sites.len(),
            held.seeds.len()
        ),
        (1, 1, 1, 1, 1, 1),
        "{held:?}"
    );
    let (s, _) = api.call(Method::GET, "/api/v1/host/my", Some(&token), None).await;
    assert_eq!(s, 200);
}

async fn concurrent_creates_by_many_users(db: Db) {
    let api = TestApi::start(db).await;
    let mut tokens = Vec::new();
    for i in 0..16 {
        tokens.push(api.user(&format!("many{i}")).await);
    }
    let mut tasks = Vec::new();
    for token in tokens {
        let client = api.client.clone();
        let url = api.url("/api/v1/host");
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).bearer_auth(token).send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }));
    }
    let (mut ips, mut ports, mut vms) = (HashSet::new(), HashSet::new(), HashSet::new());
    for t in tasks {
        let (s, b) = t.await.unwrap();
        assert_eq!(s, 201, "{b}");
        let h = &b["data"]["hosting"];
        assert!(
            ips.insert(h["vm_ip"].as_str().unwrap().to_owned()),
            "duplicate ip"
        );
        assert!(ports.insert(h["ssh_port"].as_u64().unwrap()), "duplicate port");
        assert!(
            vms.insert(h["vm_id"].as_str().unwrap().to_owned()),
            "duplicate vm_id"
        );
    }
    let all = api.store.all_hostings().await.unwrap();
    let macs: HashSet<_> = all.iter().map(|h| h.mac.clone()).collect();
    assert_eq!((all.len(), macs.len()), (16, 16));
    assert_eq!(api.world.held().vms.len(), 16);
}

async fn subnet_full_is_503(db: Db) {
    let db = TestDb::new(db).await;
    let store = Store::connect(&db.url).await.unwrap();
    // A /30 holds one guest next to the gateway.
    let world = FakeWorld::new(db.dir(), "10.97.0.0/30".parse().unwrap());
    let svc = HostingService::new(store.clone(), world.ports(), fast_hosting_config());
    let a = store.create_user("a@example.com", "aaa", "x").await.unwrap();
    let b = store.create_user("b@example.com", "bbb", "x").await.unwrap();
    svc.create(&a, key(), true).await.unwrap();
    let err = svc.create(&b, key(), true).await.unwrap_err();
    assert!(matches!(err, HostingError::SubnetFull), "{err:?}");
    assert!(store.hosting_by_user(b.id).await.unwrap().is_none());
    // Deleting releases the address.
    svc.delete(a.id).await.unwrap();
    svc.create(&b, key(), true).await.unwrap();
}

async fn status_follows_engine_events(db: Db) {
    let rig = Rig::new(db).await;
    let follower = rig.svc.follow_engine().expect("the fakes publish events");
    let user = rig.user("mia").await;
    let vm_id = rig.svc.create(&user, key(), true).await.unwrap().hosting.vm_id;
    let row = || async { rig.store.hosting_by_user(user.id).await.unwrap().unwrap() };
    async fn until(f: impl AsyncFn() -> webhoster::store::Hosting, want: HostingState) {
        for _ in 0..200 {
            if f().await.state == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("state never became {want}");
    }
    // A crash shows at once; the restarted QEMU is "starting" until a
    // convergence pass sees the site and SSH answer.
    rig.world.emit(&vm_id, VmRunState::Crashed);
    until(row, HostingState::Restarting).await;
    rig.world.emit(&vm_id, VmRunState::Running);
    until(row, HostingState::Starting).await;
    rig.svc.converge_all().await.unwrap();
    assert_eq!(row().await.state, HostingState::Running);
    // A guest that powered itself off stays off: its user turned it off.
    rig.world.emit(&vm_id, VmRunState::Stopped);
    until(row, HostingState::Stopped).await;
    assert_eq!(row().await.desired, Desired::Stopped);
    rig.svc.converge_all().await.unwrap();
    assert_eq!(row().await.state, HostingState::Stopped);
    // Other VMs' events change nothing.
    rig.world.emit("vm-unknown", VmRunState::Crashed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(row().await.state, HostingState::Stopped);
    // Start brings it back.
    let h = rig.svc.start(user.id).await.unwrap();
    assert_eq!((h.state, h.desired), (HostingState::Running, Desired::Running));
    follower.abort();
    drop(rig.db);
}

/// What a host reboot (or `teardown`) leaves: rows that say running, and
/// no QEMU, tap, forward or nginx. One pass puts everything back.
async fn convergence_brings_back_a_rebooted_host(db: Db) {
    let rig = Rig::new(db).await;
    let (a, b) = (rig.user("nina").await, rig.user("oscar").await);
    let ha = rig.svc.create(&a, key(), true).await.unwrap().hosting;
    let hb = rig.svc.create(&b, key(), true).await.unwrap().hosting;
    rig.svc.stop(b.id).await.unwrap();
    let before = rig.world.held();
    rig.world.reboot();
    rig.world.set_guest_boot(GuestBoot::InProgress);
    let report = rig.svc.converge_all().await.unwrap();
    assert!(report.proxy_restarted, "{report:?}");
    let repaired = &report.repaired[&ha.vm_id];
    for part in ["tap", "ssh forward", "qemu"] {
        assert!(repaired.contains(&part), "{part} in {repaired:?}");
    }
    // The site answers but the guest is still booting: not running yet.
    let row = rig.store.hosting_by_user(a.id).await.unwrap().unwrap();
    assert_eq!(row.state, HostingState::Starting, "{row:?}");
    rig.world.set_guest_boot(GuestBoot::Done);
    rig.svc.converge_all().await.unwrap();
    let row = rig.store.hosting_by_user(a.id).await.unwrap().unwrap();
    assert_eq!(row.state, HostingState::Running, "{row:?}");
    // The stopped one stays stopped (its tap and forward come back with
    // its next start).
    let row = rig.store.hosting_by_user(b.id).await.unwrap().unwrap();
    assert_eq!(row.state, HostingState::Stopped);
    let after = rig.world.held();
    assert_eq!(after.vms.get(&ha.vm_id), Some(&true));
    assert_ne!(after.vms.get(&hb.vm_id), Some(&true));
    rig.svc.start(b.id).await.unwrap();
    let after = rig.world.held();
    assert_eq!(after.taps, before.taps);
    assert_eq!(after.forwards, before.forwards);
    // A second pass changes nothing.
    let again = rig.svc.converge_all().await.unwrap();
    assert!(again.repaired.is_empty(), "{again:?}");
    drop(rig.db);
}

/// A tap deleted under a running VM: the tap comes back and QEMU restarts
/// (its fd pointed at the old device).
async fn a_vanished_tap_is_repaired(db: Db) {
    let rig = Rig::new(db).await;
    let user = rig.user("pia").await;
    let h = rig.svc.create(&user, key(), true).await.unwrap().hosting;
    rig.world.remove_tap(&h.vm_id);
    let report = rig.svc.converge_all().await.unwrap();
    assert_eq!(report.repaired[&h.vm_id], vec!["tap", "qemu"], "{report:?}");
    assert!(
        rig.world
            .calls()
            .iter()
            .any(|c| c == &format!("engine.restart {}", h.vm_id))
    );
    let row = rig.store.hosting_by_user(user.id).await.unwrap().unwrap();
    assert_eq!(row.state, HostingState::Running);
    drop(rig.db);
}

/// The tap's guard is lost (its nft table flushed or deleted) under a
/// running VM: it is put back on the same tap, with the VM's own MAC and
/// address, and QEMU is left alone (its fd still points at the tap).
async fn a_lost_guard_is_put_back_in_place(db: Db) {
    let rig = Rig::new(db).await;
    let user = rig.user("gus").await;
    let h = rig.svc.create(&user, key(), true).await.unwrap().hosting;
    let tap = rig.world.tap_name(&h.vm_id);
    let guard = (h.mac.clone(), h.vm_ip.parse().unwrap());
    assert_eq!(
        rig.world.held().guards.get(&tap),
        Some(&guard),
        "the create step guards the tap"
    );
    rig.world.lose_guard(&h.vm_id);
    let report = rig.svc.converge_all().await.unwrap();
    assert_eq!(report.repaired[&h.vm_id], vec!["tap guard"], "{report:?}");
    assert_eq!(rig.world.held().guards.get(&tap), Some(&guard));
    assert!(
        !rig.world
            .calls()
            .iter()
            .any(|c| c.starts_with("engine.restart") || c.starts_with("engine.kill")),
        "QEMU must not restart for a guard"
    );
    let row = rig.store.hosting_by_user(user.id).await.unwrap().unwrap();
    assert_eq!(row.state, HostingState::Running);
    let again = rig.svc.converge_all().await.unwrap();
    assert!(again.repaired.is_empty(), "{again:?}");
    drop(rig.db);
}

/// Start, stop and restart repair instead of refusing.
async fn power_calls_are_idempotent_and_repair(db: Db) {
    let rig = Rig::new(db).await;
    let user = rig.user("quinn").await;
    rig.svc.create(&user, key(), true).await.unwrap();
    assert_eq!(rig.svc.start(user.id).await.unwrap().state, HostingState::Running);
    rig.world.reboot();
    assert_eq!(rig.svc.start(user.id).await.unwrap().state, HostingState::Running);
    assert_eq!(rig.world.held().vms.values().filter(|r| **r).count(), 1);
    assert_eq!(rig.svc.stop(user.id).await.unwrap().state, HostingState::Stopped);
    assert_eq!(rig.svc.stop(user.id).await.unwrap().state, HostingState::Stopped);
    assert_eq!(
        rig.svc.restart(user.id).await.unwrap().state,
        HostingState::Running
    );
    drop(rig.db);
}

/// A running hosting's site is looked at every pass, its SSH door (a new
/// sshd in the guest each time) only once a minute. A running hosting is
/// `starting` only after three failed looks in a row; a guest that refuses
/// (these fakes fail at once) is knocked on at every pass until it answers.
/// Silent doors back off: `hosting::looks`.
async fn ssh_is_knocked_on_sparingly_once_running(db: Db) {
    let rig = Rig::new(db).await;
    let user = rig.user("sid").await;
    rig.svc.create(&user, key(), true).await.unwrap();
    let looks = |doors: &str| {
        let want = format!("probe.published_ready {} {doors}", user.id);
        rig.world.calls().iter().filter(|c| **c == want).count()
    };
    let state = || async { rig.store.hosting_by_user(user.id).await.unwrap().unwrap().state };
    let site_at_create = looks("site");
    assert_eq!(
        looks("site+ssh"),
        0,
        "the cold create's publish knocked on SSH again"
    );
    let forwarded = |c: &&String| c.starts_with("probe.forwarded_ssh ");
    assert!(
        rig.world.calls().iter().filter(forwarded).count() >= 1,
        "the cold create reads the banner through the forward"
    );
    for _ in 0..3 {
        rig.svc.converge_all().await.unwrap();
    }
    assert_eq!(
        looks("site"),
        site_at_create + 3,
        "the site is looked at every pass"
    );
    assert_eq!(looks("site+ssh"), 0, "SSH answered at the create");

    rig.world.fail_on("probe.published_ready");
    // The site fails: SSH is knocked on at the next look, and the one after.
    for _ in 0..2 {
        rig.svc.converge_all().await.unwrap();
        assert_eq!(
            state().await,
            HostingState::Running,
            "one failed look is no outage"
        );
    }
    assert_eq!((looks("site"), looks("site+ssh")), (site_at_create + 4, 1));
    rig.svc.converge_all().await.unwrap();
    assert_eq!(
        state().await,
        HostingState::Starting,
        "three failed looks in a row"
    );
    rig.svc.converge_all().await.unwrap();
    assert_eq!(looks("site+ssh"), 3, "refused: knocked on at every pass");
    rig.world.clear_faults();
    rig.svc.converge_all().await.unwrap();
    assert_eq!(state().await, HostingState::Running, "{:?}", rig.world.calls());
    assert_eq!(looks("site+ssh"), 4);
    rig.svc.converge_all().await.unwrap();
    assert_eq!(
        looks("site"),
        site_at_create + 5,
        "answered: the site alone again"
    );
    drop(rig.db);
}

/// A guest that rebooted is `starting` at the next pass: a known outage does
/// not wait for three failed looks. It is `running` again once it answers.
async fn a_guest_reboot_is_not_running(db: Db) {
    let rig = Rig::new(db).await;
    let user = rig.user("rhea").await;
    let created = rig.svc.create(&user, key(), true).await.unwrap();
    let hosting = || async { rig.store.hosting_by_user(user.id).await.unwrap().unwrap() };
    rig.svc.converge_all().await.unwrap();
    assert_eq!(hosting().await.state, HostingState::Running);

    rig.world.reboot_guest(&created.hosting.vm_id);
    rig.world.fail_on("probe.published_ready");
    rig.svc.converge_all().await.unwrap();
    let h = hosting().await;
    assert_eq!(h.state, HostingState::Starting, "one pass after the reboot");
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("not answering yet")),
        "{:?}",
        h.last_error
    );
    rig.world.clear_faults();
    rig.svc.converge_all().await.unwrap();
    let h = hosting().await;
    assert_eq!(h.state, HostingState::Running, "answered again");
    // A reboot told again would pass through `starting` within the pass
    // and end `running` anyway: only the time of the state shows it.
    rig.svc.converge_all().await.unwrap();
    let after = hosting().await;
    assert_eq!(
        (after.state, after.state_since),
        (HostingState::Running, h.state_since),
        "told once"
    );
    drop(rig.db);
}

/// DELETE of a hosting whose create hangs: the create is cancelled and
/// everything it made is removed.
async fn delete_cancels_a_create_in_flight(db: Db) {
    let rig = Rig::new(db).await;
    let user = rig.user("rita").await;
    rig.world.hang_on(step_method(Step::Ready));
    let svc = rig.svc.clone();
    let u = user.clone();
    let waiting = tokio::spawn(async move { svc.create(&u, key(), true).await });
    for _ in 0..500 {
        if rig
            .world
            .calls()
            .iter()
            .any(|c| c.starts_with(step_method(Step::Ready)))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rig.svc.delete(user.id).await.unwrap();
    let err = waiting.await.unwrap().unwrap_err();
    assert!(matches!(err, HostingError::Cancelled), "{err:?}");
    assert!(rig.world.held().is_empty(), "{:?}", rig.world.held());
    assert!(rig.store.hosting_by_user(user.id).await.unwrap().is_none());
    drop(rig.db);
}

/// A create task that panics half-way is rolled back, not left `creating`.
async fn a_panicking_create_is_rolled_back(db: Db) {
    let rig = Rig::new(db).await;
    let user = rig.user("sam").await;
    rig.world.panic_on(step_method(Step::Proxy));
    let err = rig.svc.create(&user, key(), true).await.unwrap_err();
    assert!(matches!(err, HostingError::TaskLost), "{err:?}");
    assert!(rig.world.held().is_empty(), "{:?}", rig.world.held());
    assert!(rig.store.hosting_by_user(user.id).await.unwrap().is_none());
    drop(rig.db);
}

/// What belongs to no hosting goes; what belongs to one stays.
async fn the_reaper_removes_orphans(db: Db) {
    let rig = Rig::new(db).await;
    let user = rig.user("tom").await;
    let h = rig.svc.create(&user, key(), true).await.unwrap().hosting;
    let kept = rig.world.held();
    rig.world.plant_orphan("vm-orphan", 4242);
    let reaped = rig.svc.reap().await.unwrap();
    assert_eq!(reaped.vms, vec!["vm-orphan".to_owned()]);
    assert_eq!(reaped.sites, vec![4242]);
    assert_eq!(reaped.network.len(), 2, "{reaped:?}");
    assert_eq!(rig.world.held(), kept);
    assert!(rig.world.held().vms.contains_key(&h.vm_id));
    drop(rig.db);
}

fn with_budget(budget: webhoster::hosting::admission::Budget) -> webhoster::hosting::HostingConfig {
    webhoster::hosting::HostingConfig {
        budget,
        ..fast_hosting_config()
    }
}

/// A create the memory budget or the free disk cannot take is refused at
/// once, before anything is made.
async fn no_capacity_is_refused_up_front(db: Db) {
    use webhoster::hosting::admission::Budget;
    let mut rig = Rig::new(db).await;
    rig.svc = HostingService::new(
        rig.store.clone(),
        rig.world.ports(),
        with_budget(Budget {
            memory_mib: 2048,
            per_hosting_mib: 1024 + 256,
            disk_reserve: 5 << 30,
            per_hosting_disk: 1 << 30,
            ..Budget::UNLIMITED
        }),
    );
    let (a, b) = (rig.user("uma").await, rig.user("vic").await);
    rig.svc.create(&a, key(), true).await.unwrap();
    let calls = rig.world.calls().len();
    let err = rig.svc.create(&b, key(), true).await.unwrap_err();
    assert!(
        matches!(&err, HostingError::Capacity(why) if why.contains("memory")),
        "{err:?}"
    );
    assert_eq!(rig.world.calls().len(), calls, "nothing was made");
    assert!(rig.store.hosting_by_user(b.id).await.unwrap().is_none());
    // Free the memory; now the disk is short.
    rig.svc.delete(a.id).await.unwrap();
    rig.world.set_free_disk(Some(5 << 30));
    let err = rig.svc.create(&b, None, true).await.unwrap_err();
    assert!(
        matches!(&err, HostingError::Capacity(why) if why.contains("disk")),
        "{err:?}"
    );
    rig.world.set_free_disk(Some(100 << 30));
    rig.svc.create(&b, None, true).await.unwrap();
    drop(rig.db);
}

/// Creates beyond the concurrency limit wait their turn in order, show
/// their place, and give up after the bounded wait.
async fn creates_queue_in_order(db: Db) {
    use webhoster::hosting::admission::Budget;
    let mut rig = Rig::new(db).await;
    rig.svc = HostingService::new(
        rig.store.clone(),
        rig.world.ports(),
        with_budget(Budget {
            concurrent_creates: 1,
            queue_wait: Duration::from_secs(5),
            ..Budget::UNLIMITED
        }),
    );
    let users = [
        rig.user("wes").await,
        rig.user("xia").await,
        rig.user("yan").await,
    ];
    rig.world.hang_on(step_method(Step::Ready));
    let key = || key();
    let first = rig.svc.create(&users[0], key(), false).await.unwrap().hosting;
    let second = rig.svc.create(&users[1], key(), false).await.unwrap().hosting;
    let third = rig.svc.create(&users[2], key(), false).await.unwrap().hosting;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rig.svc.queue_position(first.id), None, "the first one runs");
    assert_eq!(rig.svc.queue_position(second.id), Some(1));
    assert_eq!(rig.svc.queue_position(third.id), Some(2));
    // Deleting the running one lets the next in.
    rig.world.clear_faults();
    rig.svc.delete(users[0].id).await.unwrap();
    for _ in 0..200 {
        if rig.svc.creates_in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for u in &users[1..] {
        let h = rig.store.hosting_by_user(u.id).await.unwrap().unwrap();
        assert_eq!(h.state, HostingState::Running, "{h:?}");
    }
    // Bounded: a create that cannot get a slot in time fails and leaves nothing.
    rig.svc = HostingService::new(
        rig.store.clone(),
        rig.world.ports(),
        with_budget(Budget {
            concurrent_creates: 1,
            queue_wait: Duration::from_millis(200),
            ..Budget::UNLIMITED
        }),
    );
    rig.world.hang_on(step_method(Step::Ready));
    let (z, w) = (rig.user("zed").await, rig.user("ada").await);
    rig.svc.create(&z, key(), false).await.unwrap();
    let err = rig.svc.create(&w, key(), true).await.unwrap_err();
    assert!(
        matches!(&err, HostingError::Capacity(why) if why.contains("turn")),
        "{err:?}"
    );
    assert!(rig.store.hosting_by_user(w.id).await.unwrap().is_none());
    rig.svc.abort_creates();
    drop(rig.db);
}

/// A service whose pool keeps `n` warm clones, on fakes that make them.
fn with_pool(rig: &mut Rig, n: usize) {
    rig.world.enable_templates();
    rig.svc = HostingService::new(
        rig.store.clone(),
        rig.world.ports(),
        HostingConfig {
            warm_pool: n,
            ..fast_hosting_config()
        },
    );
}

async fn wait_pool_ready(svc: &HostingService, n: usize) {
    for _ in 0..500 {
        if svc.pool().status().ready >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the pool never had {n} ready: {:?}", svc.pool().status());
}

async fn a_create_takes_a_warm_clone_and_the_pool_refills(db: Db) {
    let mut rig = Rig::new(db).await;
    with_pool(&mut rig, 2);
    let task = rig.svc.spawn_pool().expect("a pool task");
    wait_pool_ready(&rig.svc, 2).await;
    let ready_before: Vec<String> = rig.world.held().clones.into_iter().collect();
    let user = rig.user("wendy").await;
    let before = rig.world.calls().len();
    let h = rig.svc.create(&user, key(), true).await.unwrap().hosting;
    assert_eq!(h.state, HostingState::Running);
    assert!(ready_before.contains(&h.vm_id), "the row took a clone's vm_id");
    let calls = rig.world.calls()[before..].to_vec();
    assert!(
        calls.iter().any(|c| c.starts_with("engine.resume_clone")),
        "{calls:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("engine.spawn ") || c.starts_with("engine.create_disk")),
        "no boot, no new disk: {calls:?}"
    );
    // The clone's tap got the hosting's guard.
    let tap = rig.world.tap_name(&h.vm_id);
    assert_eq!(rig.world.held().guards.get(&tap).unwrap().1.to_string(), h.vm_ip);
    let journal = rig.store.steps(h.id).await.unwrap();
    let names: Vec<&str> = journal.iter().map(|r| r.step.as_str()).collect();
    assert_eq!(names.len(), Step::PER_CREATE);
    for step in CreatePath::Warm.steps() {
        assert!(names.contains(&step.name()), "{names:?}");
    }
    assert_eq!(rig.svc.create_metrics().count(CreatePath::Warm), 1);
    // The reaper leaves the pool's clones and the hosting alone.
    let reaped = rig.svc.reap().await.unwrap();
    assert!(reaped.is_empty(), "{reaped:?}");
    wait_pool_ready(&rig.svc, 2).await;
    assert_eq!(rig.svc.pool().status().claimed_total, 1);
    // Delete leaves nothing of the hosting; the clones are the pool's.
    rig.svc.delete(user.id).await.unwrap();
    task.abort();
    let held = rig.world.held();
    assert_eq!(held.clones.len(), 2, "{held:?}");
    assert!(
        !held.disks.contains(&h.vm_id) && !held.taps.contains(&tap),
        "{held:?}"
    );
    // A restarted service does not know the old clones: the reaper takes them.
    rig.restart();
    let reaped = rig.svc.reap().await.unwrap();
    assert_eq!(reaped.vms.len(), 2, "{reaped:?}");
    assert!(rig.world.held().is_empty(), "{:?}", rig.world.held());
    drop(rig.db);
}

async fn a_clone_that_fails_to_personalise_falls_back_to_cold(db: Db) {
    let mut rig = Rig::new(db).await;
    with_pool(&mut rig, 1);
    let task = rig.svc.spawn_pool().unwrap();
    wait_pool_ready(&rig.svc, 1).await;
    task.abort();
    rig.world.fail_on("engine.resume_clone");
    let user = rig.user("fallback").await;
    let before = rig.world.calls().len();
    let h = rig.svc.create(&user, key(), true).await.unwrap().hosting;
    assert_eq!(
        h.state,
        HostingState::Running,
        "a pool problem never fails a create"
    );
    let calls = rig.world.calls()[before..].to_vec();
    let at = |m: &str| {
        calls
            .iter()
            .position(|c| c.starts_with(m))
            .unwrap_or_else(|| panic!("{m}: {calls:?}"))
    };
    assert!(at("engine.resume_clone") < at("engine.destroy"), "{calls:?}");
    assert!(
        at("engine.destroy") < at("engine.spawn "),
        "the same row boots cold: {calls:?}"
    );
    let held = rig.world.held();
    assert!(
        held.clones.is_empty() && held.vms.get(&h.vm_id) == Some(&true),
        "{held:?}"
    );
    assert_eq!(rig.svc.create_metrics().count(CreatePath::Cold), 1);
    assert_eq!(rig.svc.pool().status().discarded_total, 1);
    rig.world.clear_faults();
    rig.svc.delete(user.id).await.unwrap();
    assert!(rig.world.held().is_empty(), "{:?}", rig.world.held());
    drop(rig.db);
}

async fn a_dead_clone_is_replaced_and_no_pool_means_cold(db: Db) {
    let mut rig = Rig::new(db).await;
    with_pool(&mut rig, 1);
    let task = rig.svc.spawn_pool().unwrap();
    wait_pool_ready(&rig.svc, 1).await;
    let first: String = rig.world.held().clones.into_iter().next().unwrap();
    rig.world.crash_clone(&first);
    for _ in 0..500 {
        let clones = rig.world.held().clones;
        if clones.len() == 1 && !clones.contains(&first) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = rig.world.held();
    assert!(
        held.clones.len() == 1 && !held.clones.contains(&first),
        "{held:?}"
    );
    assert!(
        !held.disks.contains(&first),
        "the dead clone's parts are gone: {held:?}"
    );
    task.abort();
    // Parts that make no templates: the pool says so and creates boot cold.
    let mut plain = Rig::new(db).await;
    plain.svc = HostingService::new(
        plain.store.clone(),
        plain.world.ports(),
        HostingConfig {
            warm_pool: 2,
            ..fast_hosting_config()
        },
    );
    let task = plain.svc.spawn_pool().unwrap();
    for _ in 0..500 {
        if task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(plain.svc.pool().status().template, TemplateState::Unsupported);
    let user = plain.user("coldonly").await;
    plain.svc.create(&user, key(), true).await.unwrap();
    assert_eq!(plain.svc.create_metrics().count(CreatePath::Cold), 1);
    drop(plain.db);
    drop(rig.db);
}

/// The create queue bounds boots: warm creates run at once beside a cold one
/// that holds the only turn, and a cold create still waits for it.
async fn warm_creates_do_not_wait_in_the_create_queue(db: Db) {
    use webhoster::hosting::admission::Budget;
    let mut rig = Rig::new(db).await;
    rig.world.enable_templates();
    rig.svc = HostingService::new(
        rig.store.clone(),
        rig.world.ports(),
        HostingConfig {
            warm_pool: 2,
            budget: Budget {
                concurrent_creates: 1,
                queue_wait: Duration::from_secs(5),
                ..Budget::UNLIMITED
            },
            ..fast_hosting_config()
        },
    );
    let task = rig.svc.spawn_pool().expect("a pool task");
    wait_pool_ready(&rig.svc, 2).await;
    task.abort();
    rig.world.hang_on(step_method(Step::Resume));
    rig.world.hang_on(step_method(Step::Ready));
    let users = [rig.user("wa").await, rig.user("wb").await, rig.user("wc").await];
    let mut ids = Vec::new();
    for u in &users {
        ids.push(rig.svc.create(u, key(), false).await.unwrap().hosting.id);
    }
    for _ in 0..300 {
        let mut resuming = 0;
        for id in &ids[..2] {
            let h = rig.store.hosting_by_id(*id).await.unwrap().unwrap();
            resuming += usize::from(h.step == Some(Step::Resume));
        }
        if resuming == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in &ids[..2] {
        assert_eq!(rig.svc.queue_position(*id), None, "a warm create is not queued");
        let h = rig.store.hosting_by_id(*id).await.unwrap().unwrap();
        assert_eq!(h.step, Some(Step::Resume), "{h:?}");
    }
    // The pool is empty: the third is cold and takes the only turn.
    assert_eq!(rig.svc.queue_position(ids[2]), None);
    let late = rig.user("wd").await;
    let fourth = rig.svc.create(&late, key(), false).await.unwrap().hosting.id;
    for _ in 0..300 {
        if rig.svc.queue_position(fourth).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        rig.svc.queue_position(fourth),
        Some(1),
        "a cold create waits its turn"
    );
    rig.svc.abort_creates();
    drop(rig.db);
}

both_backends!(
    warm_creates_do_not_wait_in_the_create_queue,
    a_create_takes_a_warm_clone_and_the_pool_refills,
    a_clone_that_fails_to_personalise_falls_back_to_cold,
    a_dead_clone_is_replaced_and_no_pool_means_cold,
    rollback_at_every_step,
    failed_undo_keeps_the_row_until_delete,
    crash_at_every_step_is_undone_on_restart,
    crash_during_delete_is_finished_on_restart,
    concurrent_creates_by_one_user,
    concurrent_creates_by_many_users,
    subnet_full_is_503,
    status_follows_engine_events,
    convergence_brings_back_a_rebooted_host,
    a_vanished_tap_is_repaired,
    a_lost_guard_is_put_back_in_place,
    power_calls_are_idempotent_and_repair,
    ssh_is_knocked_on_sparingly_once_running,
    a_guest_reboot_is_not_running,
    delete_cancels_a_create_in_flight,
    a_panicking_create_is_rolled_back,
    the_reaper_removes_orphans,
    no_capacity_is_refused_up_front,
    creates_queue_in_order,
);
