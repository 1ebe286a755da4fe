//! Snapshot templates: one booted guest per (image, plan, QEMU, accelerator),
//! saved once, restored many times (`vmm::clone`). Owns a template's
//! directory and its RAM:
//!
//! ```text
//! <templates>/<key>/
//!   disk.qcow2     the template VM's overlay on the image, frozen at the save
//!                  (0444: every clone's backing file)
//!   ram            the guest RAM, a sparse copy (0600), loaded into a memfd
//!   state          the migration stream saved with x-ignore-shared (0600)
//!   seed.iso       the template's own seed (written by the caller)
//!   template.json  written last, atomically: without it the rest is partial
//! ```
//!
//! Why a sealed memfd: QEMU 7.2 opens a `memory-backend-file` read-write even
//! with `share=off`, so a RAM *file* every clone maps would be writable by
//! each clone's QEMU uid, and an escaped QEMU could change the memory of
//! every clone (private pages not yet written follow the file). webhoster
//! holds the RAM in a memfd instead and seals it (write, grow, shrink, seal)
//! once the template's QEMU is gone: no write(), shared writable mapping or
//! truncation of it succeeds any more, whoever tries. Clones get it as an
//! inherited descriptor ([`cmdline::RAM_FD`]) and map it copy-on-write.
//!
//! The template QEMU runs as the template id ([`QemuIds::template_id`]),
//! which no VM's QEMU ever gets, at nice 19, in its own cgroup, sandboxed
//! like any VM; its runtime files live in `<templates>/.run/tpl-<key 12>/`
//! while it runs (not under `<key>/`: a 64-hex directory name makes socket
//! paths longer than a unix socket address takes).
//!
//! [`QemuIds::template_id`]: super::sandbox::QemuIds::template_id

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use super::accel::AccelChoice;
use super::cmdline::{self, Snapshot};
use super::dir::{self, VmDir};
use super::disk;
use super::engine::Engine;
use super::guest::GuestSystemState;
use super::plan::Plan;
use super::process::{self, Launch};
use super::qga::QgaClient;
use super::qmp::Monitor;
use super::registry;
use super::{VmNet, VmSpec, VmmError};

/// The seed agent in the guest image (`images/agent/`).
pub const SEED_AGENT: &str = "/usr/local/sbin/webhoster-seed-agent";
/// How long a save or restore migration may take. A template's stream is
/// about a megabyte (its RAM stays in the memfd): seconds mean trouble.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `--template-prep` may run in the template guest.
const PREP_TIMEOUT: Duration = Duration::from_secs(120);
/// The template QEMU's nice value: its boot must not slow running guests.
const TEMPLATE_NICE: i32 = 19;
/// Modes: the template directory is traversable for clones' QEMUs (they
/// open `disk.qcow2` as their backing file by path), not listable.
const TEMPLATE_DIR_MODE: u32 = 0o711;
const FROZEN_DISK_MODE: u32 = 0o444;

/// What to build: `spec` gives image (kernel, initrd, base disk), plan,
/// kernel command line and seed; its vm_id and network are the template's
/// own (`tpl-<key>`, user networking without forwards).
#[derive(Debug, Clone)]
pub struct TemplateRequest {
    pub key: String,
    pub dir: PathBuf,
    pub spec: VmSpec,
    /// How long the guest may take to reach `running`.
    pub ready_timeout: Duration,
}

/// How long each step of a build took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TemplateTimings {
    /// QEMU spawn to `systemctl is-system-running` = `running`.
    pub boot_ms: u64,
    /// `--template-prep` in the guest.
    pub prep_ms: u64,
    /// `stop` to migration `completed`.
    pub save_ms: u64,
    /// QEMU exit, seal, `ram` written, disk frozen.
    pub persist_ms: u64,
}

/// `template.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub key: String,
    pub vm_id: String,
    pub plan: Plan,
    pub qemu_version: String,
    pub accel: AccelChoice,
    pub template_format: u32,
    /// sha256 of the template's argv, for telling lines apart in reports.
    pub argv_sha256: String,
    /// Seconds since 1970.
    pub created_at: u64,
    pub timings: TemplateTimings,
    /// Bytes of guest RAM with data (the rest is holes).
    pub ram_data_bytes: u64,
}

/// A complete template, its RAM loaded and sealed. Cheap to clone: the
/// memfd is shared.
#[derive(Debug, Clone)]
pub struct Template {
    meta: TemplateMeta,
    dir: PathBuf,
    ram: Arc<OwnedFd>,
}

impl Template {
    pub fn key(&self) -> &str {
        &self.meta.key
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The frozen disk every clone's overlay is backed by.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn plan(&self) -> &Plan {
        &self.meta.plan
    }
    pub fn meta(&self) -> &TemplateMeta {
        &self.meta
    }
    pub(super) fn state_file(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// The sealed RAM memfd clones inherit.
    pub(super) fn ram(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ram.as_fd()
    }
}

/// The key of the template for this image, plan, QEMU and accelerator: hex
/// sha256, changing with any of them and with [`cmdline::TEMPLATE_FORMAT`].
pub fn template_key(image_key: &str, plan: &Plan, qemu_version: &str, accel: AccelChoice) -> String {
    let text = format!(
        "webhoster template\nformat={}\nmachine={}\nimage={}\nplan={},{},{},{}\nqemu={}\naccel={}\n",
        cmdline::TEMPLATE_FORMAT,
        cmdline::SNAPSHOT_MACHINE,
        image_key,
        plan.name,
        plan.vcpus,
        plan.memory_mib,
        plan.disk_gib,
        qemu_version.trim(),
        accel,
    );
    hex(&Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn meta_file(dir: &Path) -> PathBuf {
    dir.join("template.json")
}

fn template_err(dir: &Path, why: impl Into<String>) -> VmmError {
    VmmError::Template {
        dir: dir.to_owned(),
        why: why.into(),
    }
}

impl Engine {
    /// QEMU's version line (`QEMU emulator version 7.2.19 (Debian ...)`),
    /// part of every template key.
    pub async fn qemu_version(&self) -> Result<String, VmmError> {
        let out = tokio::process::Command::new(&self.launcher.qemu)
            .arg("--version")
            .output()
            .await
            .map_err(|source| VmmError::Io {
                vm_id: "-".into(),
                what: format!("cannot run {} --version", self.launcher.qemu.display()),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned())
    }

    /// Boot the template VM, wait for its guest, run `--template-prep`,
    /// save, seal. Slow (20-40 s under TCG). Whatever it leaves on failure
    /// (disk, ram, state, the run directory) is removed; the caller's seed
    /// stays.
    pub async fn build_template(&self, req: &TemplateRequest) -> Result<Template, VmmError> {
        let vm_id = format!("tpl-{}", req.key.get(..12).unwrap_or(&req.key));
        super::validate_vm_id(&vm_id)?;
        async {
            let result = self.build_in_span(req, &vm_id).await;
            if let Err(err) = &result {
                tracing::warn!(err = %super::error_chain(err), "template build failed");
                remove_partial(&req.dir, &vm_id);
                self.launcher
                    .release_cgroup_patiently(&vm_id, Duration::from_secs(2))
                    .await;
            }
            result
        }
        .instrument(registry::span(&vm_id))
        .await
    }

    async fn build_in_span(&self, req: &TemplateRequest, vm_id: &str) -> Result<Template, VmmError> {
        let io = |what: String| {
            let vm_id = vm_id.to_owned();
            move |source| VmmError::Io { vm_id, what, source }
        };
        let tdir = &req.dir;
        if let Some(parent) = tdir.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("cannot create {}", parent.display())))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(TEMPLATE_DIR_MODE))
                .map_err(io(format!("cannot set the mode of {}", parent.display())))?;
        }
        dir::create_dir_with_mode(tdir, TEMPLATE_DIR_MODE)
            .map_err(io(format!("cannot create {}", tdir.display())))?;
        let runs = run_dir(tdir, vm_id)
            .root()
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        dir::create_dir_with_mode(&runs, TEMPLATE_DIR_MODE)
            .map_err(io(format!("cannot create {}", runs.display())))?;
        // A template is built once: leftovers of an earlier attempt go.
        let _ = std::fs::remove_file(meta_file(tdir));
        remove_partial(tdir, vm_id);

        let mut spec = req.spec.clone();
        spec.vm_id = vm_id.to_owned();
        spec.net = VmNet::Detached;
        spec.restore = None;
        spec.validate()?;
        let run = run_dir(tdir, vm_id);
        run.create()
            .map_err(io("cannot create the run directory".into()))?;
        disk::create_overlay(&run, &spec).await?;

        let template_id = self.launcher.qemu_ids.template_id();
        // The template QEMU reads its seed by path.
        if spec.seed_iso.exists() {
            std::os::unix::fs::chown(&spec.seed_iso, Some(0), Some(template_id))
                .map_err(io("cannot give the template QEMU its seed".into()))?;
            std::fs::set_permissions(&spec.seed_iso, std::fs::Permissions::from_mode(dir::QEMU_RO_MODE))
                .map_err(io("cannot give the template QEMU its seed".into()))?;
        }

        let ram_bytes = u64::from(spec.plan.memory_mib) << 20;
        let ram = ram::create(ram_bytes).map_err(io("cannot create the RAM memfd".into()))?;
        let argv_sha256 = hex(&Sha256::digest(
            process::snapshot_argv_for(
                self.launcher.accel,
                run.root().parent().unwrap_or(tdir),
                &spec,
                Snapshot::Template,
            )
            .join("\0")
            .as_bytes(),
        ));
        let spawned = Instant::now();
        let launch = Launch {
            snapshot: Some((Snapshot::Template, ram.as_fd())),
            id: Some(template_id),
            nice: Some(TEMPLATE_NICE),
        };
        let attached = {
            let _flock = process::lock_start(vm_id, &run).await?;
            self.launcher.spawn_with(vm_id, &run, &spec, launch).await?
        };
        let pid = attached.pid;
        tracing::info!(pid = pid.get(), "template QEMU running (nice {TEMPLATE_NICE})");

        let steps = async {
            wait_ready(vm_id, &run, req.ready_timeout).await?;
            let boot_ms = ms(spawned.elapsed());
            tracing::info!(boot_ms, "template guest running");
            let prep_started = Instant::now();
            prep(vm_id, &run).await?;
            let prep_ms = ms(prep_started.elapsed());
            tracing::info!(prep_ms, "template prepared");
            let save_started = Instant::now();
            save(vm_id, &run, &tdir.join("state")).await?;
            let save_ms = ms(save_started.elapsed());
            tracing::info!(save_ms, "template saved");
            Ok::<_, VmmError>((boot_ms, prep_ms, save_ms))
        };
        let (boot_ms, prep_ms, save_ms) = match steps.await {
            Ok(t) => t,
            Err(err) => {
                let _ = process::stop(vm_id, pid, Some(&attached.qmp), None).await;
                return Err(err);
            }
        };
        // The template never runs again after its save.
        let persist_started = Instant::now();
        process::stop(vm_id, pid, Some(&attached.qmp), None).await?;
        drop(attached);
        self.launcher
            .release_cgroup_patiently(vm_id, Duration::from_secs(2))
            .await;

        ram::seal(&ram).map_err(io("cannot seal the RAM memfd".into()))?;
        let ram_data_bytes =
            ram::save_sparse(&ram, &tdir.join("ram")).map_err(io("cannot write the ram file".into()))?;
        let disk = tdir.join("disk.qcow2");
        std::fs::rename(run.disk(), &disk).map_err(io("cannot move the template disk".into()))?;
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(FROZEN_DISK_MODE))
            .map_err(io("cannot freeze the template disk".into()))?;
        std::os::unix::fs::chown(&disk, Some(0), Some(0))
            .map_err(io("cannot chown the template disk".into()))?;
        // Its console, for whoever wonders what the template booted like.
        let _ = std::fs::rename(run.serial_log(), tdir.join("serial.log"));
        let _ = std::fs::rename(run.qemu_log(), tdir.join("qemu.log"));
        std::fs::remove_dir_all(run.root()).map_err(io("cannot remove the run directory".into()))?;
        let persist_ms = ms(persist_started.elapsed());

        let meta = TemplateMeta {
            key: req.key.clone(),
            vm_id: vm_id.to_owned(),
            plan: spec.plan.clone(),
            qemu_version: self.qemu_version().await?,
            accel: self.launcher.accel,
            template_format: cmdline::TEMPLATE_FORMAT,
            argv_sha256,
            created_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            timings: TemplateTimings {
                boot_ms,
                prep_ms,
                save_ms,
                persist_ms,
            },
            ram_data_bytes,
        };
        write_meta(tdir, &meta).map_err(io("cannot write template.json".into()))?;
        tracing::info!(
            boot_ms,
            prep_ms,
            save_ms,
            persist_ms,
            ram_data_mib = ram_data_bytes >> 20,
            "template built"
        );
        Ok(Template {
            meta,
            dir: tdir.clone(),
            ram: Arc::new(ram),
        })
    }

    /// A complete template on disk, its RAM loaded into a new memfd and
    /// sealed; `None` when `dir` holds no complete template (no
    /// `template.json`, or a file it needs is missing). The caller removes
    /// an incomplete directory.
    pub async fn load_template(&self, dir: &Path) -> Result<Option<Template>, VmmError> {
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || load(&dir))
            .await
            .map_err(|err| VmmError::Template {
                dir: PathBuf::new(),
                why: format!("the loader task failed: {err}"),
            })?
    }
}

fn load(dir: &Path) -> Result<Option<Template>, VmmError> {
    let text = match std::fs::read(meta_file(dir)) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(template_err(dir, format!("cannot read template.json: {err}"))),
    };
    let meta: TemplateMeta = serde_json::from_slice(&text)
        .map_err(|err| template_err(dir, format!("template.json does not parse: {err}")))?;
    for file in ["disk.qcow2", "ram", "state"] {
        if !dir.join(file).exists() {
            tracing::warn!(dir = %dir.display(), file, "template incomplete");
            return Ok(None);
        }
    }
    let started = Instant::now();
    let bytes = u64::from(meta.plan.memory_mib) << 20;
    let ram = ram::load_sparse(&dir.join("ram"), bytes)
        .map_err(|err| template_err(dir, format!("cannot load the ram file: {err}")))?;
    ram::seal(&ram).map_err(|err| template_err(dir, format!("cannot seal the RAM memfd: {err}")))?;
    tracing::info!(key = %meta.key, load_ms = ms(started.elapsed()), "template loaded");
    Ok(Some(Template {
        meta,
        dir: dir.to_owned(),
        ram: Arc::new(ram),
    }))
}

fn write_meta(dir: &Path, meta: &TemplateMeta) -> std::io::Result<()> {
    let tmp = dir.join(".template.json.tmp");
    let mut file = dir::open_private(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true),
        &tmp,
    )?;
    file.write_all(&serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, meta_file(dir))?;
    File::open(dir)?.sync_all()
}

/// Where the template VM's runtime files live during its build:
/// `<templates>/.run/<vm_id>/`.
fn run_dir(tdir: &Path, vm_id: &str) -> VmDir {
    let templates = tdir.parent().unwrap_or(Path::new("/"));
    VmDir::new(&templates.join(".run"), vm_id)
}

/// Remove what a build makes, never the caller's seed.
fn remove_partial(dir: &Path, vm_id: &str) {
    for file in ["disk.qcow2", "ram", ".ram.tmp", "state", ".template.json.tmp"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    let _ = std::fs::remove_dir_all(run_dir(dir, vm_id).root());
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Until the guest says `running` (over its agent), within `timeout`.
async fn wait_ready(vm_id: &str, run: &VmDir, timeout: Duration) -> Result<(), VmmError> {
    let deadline = Instant::now() + timeout;
    let mut last = GuestSystemState::NoAgent;
    loop {
        if dir::is_our_qemu(run.read_pid().unwrap_or(0), vm_id) {
            match QgaClient::connect(&run.qga_socket(), &run.qga_lock()).await {
                Ok(mut agent) => {
                    let limit = Duration::from_secs(10);
                    match agent
                        .exec_with_timeout("/bin/systemctl", &["is-system-running"], limit)
                        .await
                    {
                        Ok(out) => {
                            last = GuestSystemState::parse(&out.stdout);
                            if last == GuestSystemState::Running {
                                return Ok(());
                            }
                        }
                        Err(err) => tracing::debug!(%err, "guest agent not ready"),
                    }
                }
                Err(err) => tracing::debug!(%err, "guest agent not ready"),
            }
        } else {
            return Err(template_err(
                run.root(),
                format!(
                    "the template QEMU exited during its boot: {}",
                    dir::tail(&run.qemu_log(), 5)
                ),
            ));
        }
        if Instant::now() >= deadline {
            return Err(template_err(
                run.root(),
                format!("the guest did not reach running within {timeout:?} (last: {last:?})"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `webhoster-seed-agent --template-prep` in the guest: exit 0 or the build
/// fails with the agent's output tail.
async fn prep(vm_id: &str, run: &VmDir) -> Result<(), VmmError> {
    let agent_err = |source| VmmError::GuestAgent {
        vm_id: vm_id.to_owned(),
        source,
    };
    let mut agent = QgaClient::connect(&run.qga_socket(), &run.qga_lock())
        .await
        .map_err(agent_err)?;
    let out = agent
        .exec_with_timeout(SEED_AGENT, &["--template-prep"], PREP_TIMEOUT)
        .await
        .map_err(agent_err)?;
    if out.success() {
        return Ok(());
    }
    let text = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let chars: Vec<char> = text.trim().chars().collect();
    let tail: String = chars[chars.len().saturating_sub(300)..].iter().collect();
    Err(VmmError::Template {
        dir: run.root().to_owned(),
        why: format!(
            "{SEED_AGENT} --template-prep exited {:?}: {}",
            out.exit_code,
            tail.escape_debug()
        ),
    })
}

/// QMP on the operator socket (the supervisor's is not involved: nobody
/// supervises a template): pause, then migrate into `state` through a
/// passed descriptor with `x-ignore-shared` (the RAM stays in the memfd).
async fn save(vm_id: &str, run: &VmDir, state: &Path) -> Result<(), VmmError> {
    let qmp_err = |source| VmmError::Qmp {
        vm_id: vm_id.to_owned(),
        source,
    };
    let mut mon = Monitor::connect(&run.operator_socket()).await.map_err(qmp_err)?;
    mon.execute(serde_json::json!({"execute": "stop"}), None)
        .await
        .map_err(qmp_err)?;
    let file = dir::open_private(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true),
        state,
    )
    .map_err(|source| VmmError::Io {
        vm_id: vm_id.to_owned(),
        what: format!("cannot create {}", state.display()),
        source,
    })?;
    migrate_through_fd(&mut mon, vm_id, file.as_fd(), Migration::Save).await?;
    file.sync_all().map_err(|source| VmmError::Io {
        vm_id: vm_id.to_owned(),
        what: "cannot sync the state file".into(),
        source,
    })
}

/// Which way a migration goes: a template's save or a clone's restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Migration {
    Save,
    Restore,
}

/// The state stream through `fd` (QEMU's sandbox denies `exec:`), with
/// `x-ignore-shared` (the RAM stays in the memfd): `getfd`, then `migrate`
/// or `migrate-incoming` on `fd:`, then the wait for `completed`.
pub(super) async fn migrate_through_fd(
    mon: &mut Monitor,
    vm_id: &str,
    fd: std::os::fd::BorrowedFd<'_>,
    way: Migration,
) -> Result<(), VmmError> {
    let qmp_err = |source| VmmError::Qmp {
        vm_id: vm_id.to_owned(),
        source,
    };
    let (command, name, what) = match way {
        Migration::Save => ("migrate", "migrate-out", "save"),
        Migration::Restore => ("migrate-incoming", "migrate-in", "restore"),
    };
    mon.execute(
        serde_json::json!({"execute": "migrate-set-capabilities", "arguments": {
            "capabilities": [{"capability": "x-ignore-shared", "state": true}]}}),
        None,
    )
    .await
    .map_err(qmp_err)?;
    mon.execute(
        serde_json::json!({"execute": "getfd", "arguments": {"fdname": name}}),
        Some(fd),
    )
    .await
    .map_err(qmp_err)?;
    mon.execute(
        serde_json::json!({"execute": command, "arguments": {"uri": format!("fd:{name}")}}),
        None,
    )
    .await
    .map_err(qmp_err)?;
    wait_migration(mon, vm_id, what).await
}

/// Poll `query-migrate` until `completed` (Ok), `failed`/`cancelled` (QEMU's
/// reason), or [`MIGRATION_TIMEOUT`].
async fn wait_migration(mon: &mut Monitor, vm_id: &str, what: &str) -> Result<(), VmmError> {
    let fail = |why: String| VmmError::Migration {
        vm_id: vm_id.to_owned(),
        what: what.to_owned(),
        why,
    };
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let mut pause = Duration::from_millis(2);
    loop {
        let info = mon
            .execute(serde_json::json!({"execute": "query-migrate"}), None)
            .await
            .map_err(|source| VmmError::Qmp {
                vm_id: vm_id.to_owned(),
                source,
            })?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            status @ ("failed" | "cancelled") => {
                let desc = info["error-desc"].as_str().unwrap_or("no reason given");
                return Err(fail(format!("{status}: {desc}")));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "not completed within {MIGRATION_TIMEOUT:?} (status {})",
                info["status"]
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The template RAM as a memfd: created, sealed, saved to and loaded from a
/// sparse file.
pub(super) mod ram {
    use std::fs::File;
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use nix::unistd::{Whence, lseek};

    /// Copy in chunks of this many bytes.
    const CHUNK: usize = 1 << 20;

    /// The seals a template RAM carries: no write, no resize, no more seals
    /// (so no one can take the others away... or add new ones).
    pub fn seals() -> SealFlag {
        SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL
    }

    /// A new memfd of `bytes` (a hole: no memory used until written),
    /// sealable, closed on exec (QEMU gets it by an explicit dup).
    pub fn create(bytes: u64) -> std::io::Result<OwnedFd> {
        let fd = memfd_create(
            c"webhoster-template-ram",
            MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC,
        )?;
        let file = File::from(fd);
        file.set_len(bytes)?;
        Ok(file.into())
    }

    pub fn seal(fd: &OwnedFd) -> std::io::Result<()> {
        fcntl(fd.as_fd(), FcntlArg::F_ADD_SEALS(seals()))?;
        Ok(())
    }

    /// The seals `fd` carries now.
    #[cfg(test)]
    pub fn current_seals(fd: &OwnedFd) -> std::io::Result<SealFlag> {
        Ok(SealFlag::from_bits_truncate(fcntl(
            fd.as_fd(),
            FcntlArg::F_GET_SEALS,
        )?))
    }

    /// The data ranges of `fd` (SEEK_DATA/SEEK_HOLE), up to `len`.
    fn data_ranges(fd: &OwnedFd, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
        let mut ranges = Vec::new();
        let mut pos: i64 = 0;
        let end = i64::try_from(len).map_err(std::io::Error::other)?;
        while pos < end {
            let start = match lseek(fd.as_fd(), pos, Whence::SeekData) {
                Ok(start) => start,
                Err(nix::errno::Errno::ENXIO) => break,
                Err(err) => return Err(err.into()),
            };
            let stop = lseek(fd.as_fd(), start, Whence::SeekHole)?.min(end);
            ranges.push((start as u64, stop as u64));
            pos = stop;
        }
        Ok(ranges)
    }

    fn copy_ranges(from: &File, to: &File, ranges: &[(u64, u64)]) -> std::io::Result<u64> {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0;
        for &(start, stop) in ranges {
            let mut off = start;
            while off < stop {
                let n = usize::try_from(stop - off).unwrap_or(CHUNK).min(CHUNK);
                from.read_exact_at(&mut buf[..n], off)?;
                to.write_all_at(&buf[..n], off)?;
                off += n as u64;
            }
            total += stop - start;
        }
        Ok(total)
    }

    /// Write `fd`'s data into `path` (0600, sparse, synced, renamed into
    /// place); returns the bytes of data.
    pub fn save_sparse(fd: &OwnedFd, path: &Path) -> std::io::Result<u64> {
        let len = File::from(fd.try_clone()?).metadata()?.len();
        let ranges = data_ranges(fd, len)?;
        let tmp = path.with_file_name(".ram.tmp");
        let out = super::dir::open_private(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true),
            &tmp,
        )?;
        out.set_len(len)?;
        let from = File::from(fd.try_clone()?);
        let total = copy_ranges(&from, &out, &ranges)?;
        out.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(total)
    }

    /// A new memfd of `bytes` holding `path`'s data (holes stay holes).
    pub fn load_sparse(path: &Path, bytes: u64) -> std::io::Result<OwnedFd> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len != bytes {
            return Err(std::io::Error::other(format!(
                "the ram file has {len} bytes, the plan {bytes}"
            )));
        }
        let fd = create(bytes)?;
        let ranges = data_ranges(&file.try_clone()?.into(), len)?;
        let to = File::from(fd.try_clone()?);
        copy_ranges(&file, &to, &ranges)?;
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn the_key_changes_with_image_plan_qemu_and_accel() {
        let small = Plan::load("small").unwrap();
        let standard = Plan::load("standard").unwrap();
        let qemu = "QEMU emulator version 7.2.19";
        let base = template_key("img-a", &small, qemu, AccelChoice::Tcg);
        assert_eq!(base.len(), 64);
        assert_eq!(base, template_key("img-a", &small, qemu, AccelChoice::Tcg));
        for other in [
            template_key("img-b", &small, qemu, AccelChoice::Tcg),
            template_key("img-a", &standard, qemu, AccelChoice::Tcg),
            template_key("img-a", &small, "QEMU emulator version 8.2.0", AccelChoice::Tcg),
            template_key("img-a", &small, qemu, AccelChoice::Kvm),
        ] {
            assert_ne!(base, other);
        }
        let mut bigger = small.clone();
        bigger.memory_mib += 1;
        assert_ne!(base, template_key("img-a", &bigger, qemu, AccelChoice::Tcg));
    }

    #[test]
    fn a_sealed_memfd_refuses_writes_and_resizes() {
        let fd = ram::create(1 << 20).unwrap();
        let file = File::from(fd.try_clone().unwrap());
        file.write_all_at(b"before", 4096).unwrap();
        ram::seal(&fd).unwrap();
        assert_eq!(ram::current_seals(&fd).unwrap(), ram::seals());
        let eperm = |r: std::io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EPERM);
        assert!(eperm(file.write_all_at(b"after", 4096)));
        assert!(eperm(file.set_len(2 << 20)));
        assert!(eperm(file.set_len(4096)));
        // Reopening by path gives no way around it either.
        let again = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)))
            .unwrap();
        assert!(eperm(again.write_all_at(b"after", 0)));
        let mut buf = [0u8; 6];
        file.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"before");
    }

    #[test]
    fn the_ram_file_is_sparse_and_loads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let fd = ram::create(8 << 20).unwrap();
        let file = File::from(fd.try_clone().unwrap());
        file.write_all_at(b"one", 0).unwrap();
        file.write_all_at(b"two", 5 << 20).unwrap();
        let path = tmp.path().join("ram");
        let data = ram::save_sparse(&fd, &path).unwrap();
        assert!(data < (1 << 20), "only the written pages are data: {data}");
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 8 << 20);
        assert!(meta.blocks() * 512 < (1 << 20), "sparse on disk");
        assert_eq!(meta.mode() & 0o777, 0o600);
        let loaded = ram::load_sparse(&path, 8 << 20).unwrap();
        let loaded = File::from(loaded);
        let mut buf = [0u8; 3];
        loaded.read_exact_at(&mut buf, 5 << 20).unwrap();
        assert_eq!(&buf, b"two");
        loaded.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"one");
        assert!(
            ram::load_sparse(&path, 4 << 20).is_err(),
            "size must match the plan"
        );
    }
}
