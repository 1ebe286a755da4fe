//! One VM's QEMU process: spawn it detached and wait until it answers QMP,
//! attach to one already running, hold the per-VM start lock, and stop it
//! (`system_powerdown`, then `quit`, then SIGKILL). Every signal goes to a
//! [`QemuPid`], which can only hold a positive pid.
//!
//! Never decides a VM's state and never touches the registry: callers record
//! what happened. Knows nothing of other VMs.

use std::fmt;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

use super::accel::AccelChoice;
use super::cgroup::{CgroupOptions, Cgroups};
use super::cmdline::{self, CmdlineConfig, Nic};
use super::dir::{self, VmDir};
use super::logs;
use super::qmp::{QmpClient, QmpEvent};
use super::sandbox::QemuIds;
use super::{TapOpener, VmNet, VmSpec, VmmError};
use crate::logfile::{LogCap, RotatingFile};

/// How long a spawned QEMU may take to answer QMP. QEMU itself needs well
/// under a second (no guest boot involved); the margin is for a loaded host.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// After `quit` or SIGKILL, how long until the process must be gone.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// QEMU's umask: it may create nothing in its VM directory, but whatever it
/// creates elsewhere (a temporary file) is its own only.
const QEMU_UMASK: libc::mode_t = 0o077;

/// The pid of a QEMU: always positive. `kill(2)` reads 0 as "my process
/// group" and -1 as "every process I may signal", so a pid that fell back to
/// a sentinel would take the host down with the guest; this type cannot hold
/// one, and it is the only way this module sends a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct QemuPid(i32);

impl QemuPid {
    /// `None` for 0 and negative numbers.
    pub fn new(raw: i32) -> Option<QemuPid> {
        (raw > 0).then_some(QemuPid(raw))
    }

    /// From `Child::id()`'s `u32`: `None` when it does not fit a pid.
    fn from_u32(raw: u32) -> Option<QemuPid> {
        i32::try_from(raw).ok().and_then(QemuPid::new)
    }

    /// The pid of this VM's live QEMU, read from its pidfile and checked in
    /// /proc ([`VmDir::live_pid`]).
    pub fn live(dir: &VmDir, vm_id: &str) -> Option<QemuPid> {
        dir.live_pid(vm_id).and_then(QemuPid::new)
    }

    pub fn get(self) -> i32 {
        self.0
    }

    /// Still alive and still running this VM's `-name` (a reused pid is not).
    pub fn is_ours(self, vm_id: &str) -> bool {
        dir::is_our_qemu(self.0, vm_id)
    }

    fn signal(self, signal: Signal) -> nix::Result<()> {
        kill(Pid::from_raw(self.0), signal)
    }
}

impl fmt::Display for QemuPid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A QEMU just spawned or found, with what its supervisor needs.
pub(super) struct Attached {
    pub pid: QemuPid,
    pub qmp: Arc<QmpClient>,
    pub events: mpsc::UnboundedReceiver<QmpEvent>,
    /// Exit status, when QEMU is our own child.
    pub exit: Option<watch::Receiver<Option<ExitStatus>>>,
}

/// How a spawn differs from a cold boot: the snapshot role and its RAM
/// memfd, a fixed id to run as, a lower CPU priority.
#[derive(Clone, Copy, Default)]
pub(super) struct Launch<'a> {
    /// The role and the RAM memfd, passed as [`cmdline::RAM_FD`].
    pub snapshot: Option<(cmdline::Snapshot, std::os::fd::BorrowedFd<'a>)>,
    /// Run as this id instead of the VM directory's ([`QemuIds::assign`]).
    pub id: Option<u32>,
    /// `nice` value set in the child before exec.
    pub nice: Option<i32>,
}

impl Launch<'_> {
    fn is_clone(&self) -> bool {
        matches!(self.snapshot, Some((cmdline::Snapshot::Clone, _)))
    }
}

/// How [`stop`] ended the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopMethod {
    PoweredOff,
    Quit,
    Killed,
}

impl fmt::Display for StopMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopMethod::PoweredOff => "powered off",
            StopMethod::Quit => "quit",
            StopMethod::Killed => "killed",
        })
    }
}

/// What every spawn needs and no single VM owns: the QEMU binary, the
/// accelerator, where taps come from, the cgroups and the ids QEMUs run as.
pub(super) struct Launcher {
    pub qemu: PathBuf,
    pub accel: AccelChoice,
    pub tap_opener: Option<Arc<dyn TapOpener>>,
    /// `None`: VMs run without cgroups (off, or none usable here).
    pub cgroups: Option<Cgroups>,
    pub cgroup_options: CgroupOptions,
    pub qemu_ids: QemuIds,
    /// The cap of `serial.log` and `qemu.log`.
    pub log_cap: LogCap,
}

impl Launcher {
    /// The VM's cgroup, created with its limits; the files the child writes
    /// itself into before exec.
    fn prepare_cgroup(&self, vm_id: &str, spec: &VmSpec) -> Result<Vec<std::ffi::CString>, VmmError> {
        let Some(cgroups) = &self.cgroups else {
            return Ok(Vec::new());
        };
        let limits = self.cgroup_options.limits(spec.plan.memory_mib.into());
        let files = cgroups
            .prepare(vm_id, limits)
            .map_err(|source| VmmError::Cgroup {
                vm_id: vm_id.to_owned(),
                source,
            })?;
        tracing::debug!(?limits, "cgroup ready");
        files
            .into_iter()
            .map(|f| {
                use std::os::unix::ffi::OsStringExt;
                std::ffi::CString::new(f.into_os_string().into_vec())
                    .map_err(|_| VmmError::BadSpec("a cgroup path holds a NUL byte".into()))
            })
            .collect()
    }

    /// Who this VM's QEMU runs as: its own id ([`QemuIds::assign`]; an id a
    /// live QEMU of ours holds is never given to another VM), as uid and
    /// gid. Under KVM also the group of `/dev/kvm`, which QEMU opens by path.
    fn credentials(
        &self,
        vm_id: &str,
        dir: &VmDir,
        fixed: Option<u32>,
    ) -> Result<crate::sys::Credentials, VmmError> {
        let vms_dir = dir.root().parent().unwrap_or(Path::new("/"));
        let live = || {
            super::scan::qemu_processes(vms_dir)
                .into_iter()
                .filter_map(|(pid, _)| dir::uid_of(pid))
                .collect()
        };
        let id = match fixed {
            Some(id) => {
                std::os::unix::fs::chown(dir.root(), Some(0), Some(id)).map_err(|source| VmmError::Io {
                    vm_id: vm_id.to_owned(),
                    what: "cannot give the VM directory its group".into(),
                    source,
                })?;
                id
            }
            None => self.qemu_ids.assign(vms_dir, dir, live)?,
        };
        let groups = match self.accel {
            AccelChoice::Kvm => {
                use std::os::unix::fs::MetadataExt;
                let kvm = std::fs::metadata("/dev/kvm").map_err(|source| VmmError::Io {
                    vm_id: vm_id.to_owned(),
                    what: "cannot stat /dev/kvm".into(),
                    source,
                })?;
                // A root-group device is out of reach whatever we do here.
                vec![kvm.gid()].into_iter().filter(|gid| *gid != 0).collect()
            }
            AccelChoice::Tcg => Vec::new(),
        };
        tracing::debug!(id, ?groups, "QEMU's ids");
        Ok(crate::sys::Credentials {
            uid: id,
            gid: id,
            groups,
        })
    }

    /// Remove the VM's cgroup once its QEMU is gone. A cgroup still busy
    /// (the process not quite gone) stays for the next stop or destroy.
    pub fn release_cgroup(&self, vm_id: &str) -> Result<(), VmmError> {
        match &self.cgroups {
            Some(cgroups) => cgroups.remove(vm_id).map_err(|source| VmmError::Cgroup {
                vm_id: vm_id.to_owned(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// [`Self::release_cgroup`], retried for up to `patience` while busy;
    /// what still fails is logged, not returned (an empty cgroup left behind
    /// costs nothing and is reused by the next start).
    pub async fn release_cgroup_patiently(&self, vm_id: &str, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            match self.release_cgroup(vm_id) {
                Ok(()) => return,
                Err(err) if Instant::now() >= deadline => {
                    tracing::warn!(err = %super::error_chain(&err), "cannot remove the VM's cgroup; it is tried again at the next stop");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Spawn QEMU for `spec` and wait for QMP `running`. The caller holds
    /// the VM's op lock and the start lock, and has made sure no QEMU of
    /// this VM runs.
    pub async fn spawn(&self, vm_id: &str, dir: &VmDir, spec: &VmSpec) -> Result<Attached, VmmError> {
        self.spawn_with(vm_id, dir, spec, Launch::default()).await
    }

    /// [`Self::spawn`] as `launch` says. A clone is not `running` but waits
    /// for its state (`inmigrate`): that is what it is expected to report.
    pub async fn spawn_with(
        &self,
        vm_id: &str,
        dir: &VmDir,
        spec: &VmSpec,
        launch: Launch<'_>,
    ) -> Result<Attached, VmmError> {
        let io = |what: &str| {
            let (vm_id, what) = (vm_id.to_owned(), what.to_owned());
            move |source| VmmError::Io { vm_id, what, source }
        };
        if !dir.disk().exists() {
            return Err(VmmError::NoDisk {
                vm_id: vm_id.to_owned(),
                path: dir.disk(),
            });
        }
        // Stale files are not removed here: QEMU overwrites a stale pidfile,
        // `listen` replaces stale sockets, and the caller holds the start
        // lock, so no other QEMU of this VM can be starting right now.
        let tap = match &spec.net {
            VmNet::Tap { tap_name, .. } => {
                let opener = self.tap_opener.as_ref().ok_or_else(|| VmmError::NoTapOpener {
                    vm_id: vm_id.to_owned(),
                })?;
                Some(opener.open(tap_name).map_err(|source| VmmError::Tap {
                    vm_id: vm_id.to_owned(),
                    tap_name: tap_name.clone(),
                    source,
                })?)
            }
            _ => None,
        };
        dir.create()
            .map_err(io("cannot restrict the VM directory's mode"))?;
        let credentials = self.credentials(vm_id, dir, launch.id)?;
        dir.grant(credentials.gid, &spec.seed_iso)
            .map_err(io("cannot give QEMU's id its files"))?;
        let sockets = dir.listen().map_err(io("cannot bind QEMU's sockets"))?;
        let mut config = cmdline_config(self.accel, dir, spec);
        config.snapshot = launch.snapshot.map(|(role, _)| role);
        let argv = cmdline::build(&config);
        let qemu_log =
            RotatingFile::open(dir.qemu_log(), self.log_cap).map_err(io("cannot open qemu.log"))?;
        let (output, output_write) = logs::output_pipe().map_err(io("cannot make QEMU's output pipe"))?;
        let output_write2 = output_write
            .try_clone()
            .map_err(io("cannot make QEMU's output pipe"))?;
        let mut cmd = std::process::Command::new(&self.qemu);
        cmd.args(&argv)
            .current_dir(dir.root())
            .stdin(Stdio::null())
            .stdout(output_write)
            .stderr(output_write2);
        let [qmp, operator, qga] = &sockets;
        let mut fds = vec![
            (qmp.as_fd(), cmdline::QMP_FD),
            (operator.as_fd(), cmdline::OPERATOR_FD),
            (qga.as_fd(), cmdline::QGA_FD),
        ];
        fds.extend(tap.iter().map(|fd| (fd.as_fd(), cmdline::TAP_FD)));
        fds.extend(launch.snapshot.map(|(_, ram)| (ram, cmdline::RAM_FD)));
        let cgroup_procs = self.prepare_cgroup(vm_id, spec)?;
        let started = Instant::now();
        let detach = crate::sys::Detach {
            fds: &fds,
            cgroup_procs,
            umask: Some(QEMU_UMASK),
            credentials: Some(credentials),
            nice: launch.nice,
        };
        let spawned = crate::sys::spawn_detached_with(cmd, detach);
        let mut child = spawned.map_err(|err| {
            let _ = self.release_cgroup(vm_id);
            // NotFound is also what a vanished cgroup gives in the child.
            if err.kind() == std::io::ErrorKind::NotFound && !self.qemu.exists() {
                VmmError::QemuMissing {
                    program: self.qemu.display().to_string(),
                }
            } else {
                io("cannot spawn QEMU (or put it into its cgroup)")(err)
            }
        })?;
        // Only QEMU holds the listening sockets now: should it die, a client
        // gets an error instead of waiting on a socket nobody serves.
        drop(fds);
        drop(sockets);
        drop(tap);
        // The command is gone with its copies of the write end, so the copy
        // ends (EOF) when QEMU does.
        let mut output = tokio::spawn(logs::copy_output(output, qemu_log));
        // `id()` is `None` only once the child has been reaped, and nothing
        // has waited on it yet. Should it ever be `None`, fail: guessing a
        // pid is how a later kill hits the wrong processes.
        let Some(pid) = child.id().and_then(QemuPid::from_u32) else {
            return Err(io("cannot spawn QEMU")(std::io::Error::other(
                "the spawned QEMU has no pid",
            )));
        };
        tracing::debug!(pid = pid.get(), "QEMU spawned");
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let _ = exit_tx.send(Some(status));
            }
        });
        let fail_exit = |status: ExitStatus| VmmError::StartExited {
            vm_id: vm_id.to_owned(),
            status: describe_exit(Some(status)),
            log_tail: dir::tail(&dir.qemu_log(), 10),
        };
        let connected = loop {
            let exited = *exit_rx.borrow();
            if let Some(status) = exited {
                let _ = self.release_cgroup(vm_id);
                // What QEMU said before it died must be in qemu.log first.
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut output).await;
                return Err(fail_exit(status));
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = pid.signal(Signal::SIGKILL);
                return Err(VmmError::StartTimeout {
                    vm_id: vm_id.to_owned(),
                    after: START_TIMEOUT,
                });
            }
            if dir.qmp_socket().exists() {
                match QmpClient::connect(&dir.qmp_socket()).await {
                    Ok(pair) => break pair,
                    Err(err) => tracing::debug!(%err, "QMP not ready"),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let (client, events) = connected;
        let status = match client.query_status().await {
            Ok(status) => status,
            Err(source) => {
                let _ = pid.signal(Signal::SIGKILL);
                return Err(VmmError::Qmp {
                    vm_id: vm_id.to_owned(),
                    source,
                });
            }
        };
        let expected = if launch.is_clone() {
            status.status == "inmigrate"
        } else {
            status.running
        };
        if !expected {
            let _ = pid.signal(Signal::SIGKILL);
            return Err(VmmError::NotRunningAfterStart {
                vm_id: vm_id.to_owned(),
                status: status.status,
            });
        }
        tracing::info!(
            pid = pid.get(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "QEMU running"
        );
        Ok(Attached {
            pid,
            qmp: Arc::new(client),
            events,
            exit: Some(exit_rx),
        })
    }

    /// Under the start lock: attach to this VM's QEMU if one runs (another
    /// service process started it meanwhile), or spawn one.
    pub async fn spawn_or_attach(
        &self,
        vm_id: &str,
        dir: &VmDir,
        spec: &VmSpec,
    ) -> Result<Attached, VmmError> {
        let _flock = lock_start(vm_id, dir).await?;
        match QemuPid::live(dir, vm_id) {
            Some(pid) => attach(vm_id, dir, pid).await,
            None => self.spawn(vm_id, dir, spec).await,
        }
    }
}

/// The per-VM start lock (`<vm_dir>/start.lock`, flock), held from the
/// "is it running?" check until QEMU runs. Across processes (a second
/// service, the CLI): QEMU takes its pidfile lock only after creating its
/// sockets, so a second QEMU would steal them; this lock makes
/// check-then-spawn atomic.
pub(super) async fn lock_start(
    vm_id: &str,
    dir: &VmDir,
) -> Result<nix::fcntl::Flock<std::fs::File>, VmmError> {
    let path = dir.start_lock();
    let io = |source| VmmError::Io {
        vm_id: vm_id.to_owned(),
        what: format!("cannot lock {}", path.display()),
        source,
    };
    dir.create().map_err(io)?;
    let file = dir::open_private(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true),
        &path,
    )
    .map_err(io)?;
    tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))
    })
    .await
    .map_err(|err| io(std::io::Error::other(err)))?
    .map_err(io)
}

/// Connect QMP to a live QEMU that this engine did not spawn.
pub(super) async fn attach(vm_id: &str, dir: &VmDir, pid: QemuPid) -> Result<Attached, VmmError> {
    let qmp_err = |source| VmmError::Qmp {
        vm_id: vm_id.to_owned(),
        source,
    };
    let (client, events) = QmpClient::connect(&dir.qmp_socket()).await.map_err(qmp_err)?;
    let status = client.query_status().await.map_err(qmp_err)?;
    tracing::info!(pid = pid.get(), status = %status.status, "attached to QEMU");
    Ok(Attached {
        pid,
        qmp: Arc::new(client),
        events,
        exit: None,
    })
}

/// End this VM's QEMU `pid`. `graceful`: `system_powerdown` and wait that
/// long first; `None`: `quit` at once. Then `quit` (SIGTERM without a QMP
/// client), then SIGKILL, each given [`EXIT_WAIT`]. A zombie counts as gone
/// (PID 1 may never reap a detached QEMU).
pub(super) async fn stop(
    vm_id: &str,
    pid: QemuPid,
    client: Option<&QmpClient>,
    graceful: Option<Duration>,
) -> Result<StopMethod, VmmError> {
    let gone = || !pid.is_ours(vm_id);
    let mut how = StopMethod::PoweredOff;
    if let Some(timeout) = graceful {
        if let Some(client) = client {
            match client.system_powerdown().await {
                Ok(()) => {}
                Err(err) => tracing::warn!(%err, "system_powerdown failed"),
            }
        }
        wait_until(timeout, gone).await;
    }
    if !gone() {
        how = StopMethod::Quit;
        match client {
            Some(client) => {
                let _ = client.quit().await;
            }
            None => {
                let _ = pid.signal(Signal::SIGTERM);
            }
        }
        wait_until(EXIT_WAIT, gone).await;
    }
    if !gone() {
        how = StopMethod::Killed;
        tracing::warn!(pid = pid.get(), "QEMU did not quit: SIGKILL");
        let _ = pid.signal(Signal::SIGKILL);
        wait_until(EXIT_WAIT, gone).await;
        if !gone() {
            return Err(VmmError::Unkillable {
                vm_id: vm_id.to_owned(),
                pid: pid.get(),
            });
        }
    }
    Ok(how)
}

/// The qemu-system binary: a program name looked up in PATH, or a path that
/// exists.
pub(super) fn find_qemu(program: &Path) -> Result<PathBuf, VmmError> {
    which(program).ok_or_else(|| VmmError::QemuMissing {
        program: program.display().to_string(),
    })
}

fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.exists().then(|| program.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn cmdline_config(accel: AccelChoice, dir: &VmDir, spec: &VmSpec) -> CmdlineConfig {
    CmdlineConfig {
        vm_id: spec.vm_id.clone(),
        plan: spec.plan.clone(),
        accel,
        kernel: spec.kernel.clone(),
        initrd: spec.initrd.clone(),
        append: spec.append.clone(),
        disk: dir.disk(),
        seed_iso: spec.seed_iso.clone(),
        nic: match &spec.net {
            VmNet::None => Nic::None,
            VmNet::User { hostfwd } => Nic::User {
                hostfwd: hostfwd.clone(),
            },
            VmNet::Tap { mac, .. } => Nic::Tap { mac: mac.clone() },
            VmNet::Detached => Nic::Detached,
        },
        pidfile: dir.pidfile(),
        snapshot: None,
    }
}

/// The argv (without the program) the engine would run for `spec` in
/// `vms_dir`: for golden tests.
pub fn argv_for(accel: AccelChoice, vms_dir: &Path, spec: &VmSpec) -> Vec<String> {
    let dir = VmDir::new(vms_dir, &spec.vm_id);
    cmdline::build(&cmdline_config(accel, &dir, spec))
}

/// [`argv_for`] a template (`Some(Template)`) or a clone: for golden tests.
pub fn snapshot_argv_for(
    accel: AccelChoice,
    vms_dir: &Path,
    spec: &VmSpec,
    snapshot: cmdline::Snapshot,
) -> Vec<String> {
    let dir = VmDir::new(vms_dir, &spec.vm_id);
    let mut config = cmdline_config(accel, &dir, spec);
    config.snapshot = Some(snapshot);
    cmdline::build(&config)
}

pub(super) fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "exit status unknown: not our child".to_owned(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {sig}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            (None, None) => "exit status unknown".to_owned(),
        },
    }
}

/// Poll `done` every 20 ms until it holds (`true`) or `timeout` passes.
pub(super) async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qemu_pid_is_never_zero_or_negative() {
        // kill(0) signals our process group, kill(-1) every process we may.
        for bad in [0, -1, -2, i32::MIN] {
            assert_eq!(QemuPid::new(bad), None, "{bad}");
        }
        assert_eq!(QemuPid::from_u32(0), None);
        // u32::MAX as i32 is -1: the cast the old code could have made.
        assert_eq!(QemuPid::from_u32(u32::MAX), None);
        assert_eq!(QemuPid::from_u32(1 << 31), None);
        assert_eq!(QemuPid::new(1).map(QemuPid::get), Some(1));
        assert_eq!(QemuPid::from_u32(4_194_304).map(QemuPid::get), Some(4_194_304));
    }

    #[test]
    fn live_ignores_a_pidfile_naming_a_sentinel() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path(), "vm-x");
        std::fs::create_dir_all(dir.root()).unwrap();
        for text in ["-1\n", "0\n", "junk"] {
            std::fs::write(dir.pidfile(), text).unwrap();
            assert_eq!(QemuPid::live(&dir, "vm-x"), None, "{text:?}");
        }
    }

    #[test]
    fn exits_are_described() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_exit(Some(ExitStatus::from_raw(1 << 8))), "exit code 1");
        assert_eq!(describe_exit(Some(ExitStatus::from_raw(9))), "killed by SIGKILL");
        assert_eq!(describe_exit(None), "exit status unknown: not our child");
    }
}
