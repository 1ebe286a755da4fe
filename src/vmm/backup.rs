//! Live backups of a VM's disk, and restores from them.
//!
//! A backup is a QMP `blockdev-backup` job from the running disk into a new
//! qcow2 file under `<vm dir>/backups/`. The copy is point-in-time (QEMU
//! copies a cluster before the guest overwrites it), so the site keeps
//! serving. Each file is a complete view of its moment through its backing
//! chain: a full backup holds what the disk holds beyond the base image and
//! is backed by that image; an incremental holds what changed since its
//! parent and is backed by the parent's file. What changed is a persistent
//! dirty bitmap, `webhoster-<id>`, created in the same QMP `transaction` as
//! the job of backup `<id>`, so no write falls between two backups.
//!
//! QEMU has dropped root and cannot open our files by path: the target file
//! is opened here and passed with `add-fd` (SCM_RIGHTS) on the operator
//! monitor, and QEMU opens `/dev/fdset/<n>` with no backing (it writes
//! clusters and never reads the chain). The job writes `.<id>.qcow2.tmp`,
//! which is renamed to `<id>.qcow2` only once the job concluded without
//! error and the file is synced; the caller marks its row complete after
//! that. An abandoned backup (a restart of the service, a crash of QEMU, a
//! full disk) leaves at most a temporary file, removed by [`Engine::abandon_backup`].
//!
//! A restore copies a backup file and rebases the copy onto the base image
//! (`qemu-img rebase` writes in what the chain held), syncs it, and renames
//! it over `disk.qcow2` while QEMU is stopped: until that rename, the old
//! disk is in place. The new disk has no bitmap, so the next backup is full.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use super::dir::{self, VmDir};
use super::disk;
use super::qga::QgaClient;
use super::qmp::{Monitor, QmpError};
use super::{Engine, VmmError};

/// How often a running job's progress is read.
const JOB_POLL: Duration = Duration::from_millis(250);
/// How long a cancelled job may take to stop: it stops at its next cluster,
/// well within a second even under TCG; the margin is for a loaded host.
const CANCEL_PATIENCE: Duration = Duration::from_secs(30);
/// The QEMU device of the VM's disk (`-drive id=disk0`).
const DISK_DEVICE: &str = "disk0";
const BITMAP_PREFIX: &str = "webhoster-";

/// Which backup to take: `id` names its file, job, node and bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupRequest {
    pub id: i64,
    /// The latest complete backup: an incremental on it is taken when the
    /// disk still tracks what changed since (its bitmap is whole).
    pub parent: Option<i64>,
}

/// How a backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupOutcome {
    /// The parent it is incremental on (None: a full backup).
    pub parent: Option<i64>,
    /// The guest agent froze the file systems as the job started.
    pub frozen: bool,
    /// Bytes the file takes on the host's disk.
    pub size_bytes: u64,
}

/// Bytes copied of bytes to copy, as QEMU's job reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackupProgress {
    pub done: u64,
    pub total: u64,
}

fn bitmap(id: i64) -> String {
    format!("{BITMAP_PREFIX}{id}")
}
fn job(id: i64) -> String {
    format!("backup-{id}")
}
fn node(id: i64) -> String {
    format!("backup-target-{id}")
}
fn fdset_tag(id: i64) -> String {
    format!("webhoster-backup-{id}")
}

/// What QEMU says about the disk: its size and the bitmaps it tracks.
struct DiskInfo {
    virtual_size: u64,
    /// Names of the bitmaps usable for an incremental (recording, whole).
    bitmaps: Vec<String>,
    /// Every bitmap of ours, usable or not.
    ours: Vec<String>,
}

impl Engine {
    /// Takes backup `req` of the running VM; `progress` follows the job.
    pub async fn backup(
        &self,
        vm_id: &str,
        req: BackupRequest,
        progress: &watch::Sender<BackupProgress>,
    ) -> Result<BackupOutcome, VmmError> {
        let dir = self.vm_dir(vm_id);
        if dir.live_pid(vm_id).is_none() {
            return Err(VmmError::NotRunning(vm_id.to_owned()));
        }
        let io = |what: &str| {
            let (vm_id, what) = (vm_id.to_owned(), what.to_owned());
            move |source| VmmError::Io { vm_id, what, source }
        };
        let qmp = |source| VmmError::Qmp {
            vm_id: vm_id.to_owned(),
            source,
        };
        let spec = dir.read_spec().map_err(io("cannot read vm.json"))?;
        dir::create_dir_with_mode(&dir.backups(), dir::PRIVATE_DIR_MODE)
            .map_err(io("cannot create the backups directory"))?;
        let tmp = dir.backup_tmp(req.id);
        remove_if_present(&tmp).map_err(io("cannot remove a stale temporary backup"))?;
        let mut mon = Monitor::connect(&dir.operator_socket()).await.map_err(qmp)?;
        let disk = disk_info(&mut mon).await.map_err(qmp)?;
        let parent = req.parent.filter(|p| disk.bitmaps.contains(&bitmap(*p)));
        let backing = match parent {
            Some(p) => dir.backup_file(p),
            None => std::path::absolute(&spec.base_disk).map_err(io("bad base disk path"))?,
        };
        disk::create_qcow2(vm_id, &tmp, &backing, &disk.virtual_size.to_string()).await?;
        let taken = async {
            let target = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&tmp)
                .map_err(io("cannot open the backup file"))?;
            let added = mon
                .execute(
                    json!({"execute": "add-fd", "arguments": {"opaque": fdset_tag(req.id)}}),
                    Some(target.as_fd()),
                )
                .await
                .map_err(qmp)?;
            let fdset = added["fdset-id"].as_i64().unwrap_or_default();
            mon.execute(
                json!({"execute": "blockdev-add", "arguments": {
                    "driver": "qcow2", "node-name": node(req.id), "backing": null,
                    "file": {"driver": "file", "filename": format!("/dev/fdset/{fdset}")},
                }}),
                None,
            )
            .await
            .map_err(qmp)?;
            let frozen = self
                .run_job(vm_id, &dir, &mut mon, req.id, parent, progress)
                .await?;
            finish_target(&mut mon, req.id).await.map_err(qmp)?;
            sync_file(&tmp).map_err(io("cannot sync the backup file"))?;
            std::fs::rename(&tmp, dir.backup_file(req.id)).map_err(io("cannot move the backup in place"))?;
            sync_file(&dir.backups()).map_err(io("cannot sync the backups directory"))?;
            Ok::<bool, VmmError>(frozen)
        }
        .await;
        let frozen = match taken {
            Ok(frozen) => frozen,
            Err(err) => {
                abandon_in(&mut mon, req.id).await;
                let _ = remove_if_present(&tmp);
                return Err(err);
            }
        };
        // The new bitmap tracks from this backup on; older ones are no use.
        for old in disk.ours.iter().filter(|b| **b != bitmap(req.id)) {
            if let Err(err) = mon
                .execute(json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": DISK_DEVICE, "name": old}}), None)
                .await
            {
                warn!(bitmap = %old, %err, "cannot remove an old dirty bitmap");
            }
        }
        let size_bytes = allocated(&dir.backup_file(req.id));
        info!(id = req.id, ?parent, frozen, size_bytes, "backup complete");
        Ok(BackupOutcome {
            parent,
            frozen,
            size_bytes,
        })
    }

    /// Freezes the guest's file systems if its agent answers, starts the job
    /// with its new bitmap in one transaction, thaws, and follows the job to
    /// its end. Returns whether the guest was frozen.
    async fn run_job(
        &self,
        vm_id: &str,
        dir: &VmDir,
        mon: &mut Monitor,
        id: i64,
        parent: Option<i64>,
        progress: &watch::Sender<BackupProgress>,
    ) -> Result<bool, VmmError> {
        let qmp = |source| VmmError::Qmp {
            vm_id: vm_id.to_owned(),
            source,
        };
        let mut backup = json!({
            "job-id": job(id), "device": DISK_DEVICE, "target": node(id),
            "sync": "top", "auto-dismiss": false,
        });
        if let Some(p) = parent {
            // `never`: the parent's bitmap stays as it is until this backup
            // is complete, so a failed one leaves the parent usable.
            backup["sync"] = json!("bitmap");
            backup["bitmap"] = json!(bitmap(p));
            backup["bitmap-mode"] = json!("never");
        }
        let actions = json!([
            {"type": "block-dirty-bitmap-add", "data": {"node": DISK_DEVICE, "name": bitmap(id), "persistent": true}},
            {"type": "blockdev-backup", "data": backup},
        ]);
        let mut agent = freeze(dir).await;
        let started = mon
            .execute(
                json!({"execute": "transaction", "arguments": {"actions": actions}}),
                None,
            )
            .await;
        if let Some(agent) = agent.as_mut()
            && let Err(err) = agent.fsfreeze_thaw().await
        {
            warn!(%err, "the guest agent did not thaw the file systems");
        }
        started.map_err(qmp)?;
        loop {
            tokio::time::sleep(JOB_POLL).await;
            let jobs = mon
                .execute(json!({"execute": "query-jobs"}), None)
                .await
                .map_err(qmp)?;
            let Some(info) = find_job(&jobs, id) else {
                return Err(VmmError::Backup {
                    vm_id: vm_id.to_owned(),
                    id,
                    why: "the job vanished".into(),
                });
            };
            let _ = progress.send(BackupProgress {
                done: info["current-progress"].as_u64().unwrap_or(0),
                total: info["total-progress"].as_u64().unwrap_or(0),
            });
            if info["status"] == "concluded" {
                if let Some(why) = info["error"].as_str() {
                    return Err(VmmError::Backup {
                        vm_id: vm_id.to_owned(),
                        id,
                        why: why.to_owned(),
                    });
                }
                return Ok(agent.is_some());
            }
        }
    }

    /// Removes what is left of backup `id`, which did not complete (the
    /// service restarted under it): its job, its target, its bitmap and its
    /// files. Idempotent.
    pub async fn abandon_backup(&self, vm_id: &str, id: i64) -> Result<(), VmmError> {
        let dir = self.vm_dir(vm_id);
        if dir.live_pid(vm_id).is_some() {
            match Monitor::connect(&dir.operator_socket()).await {
                Ok(mut mon) => abandon_in(&mut mon, id).await,
                Err(err) => warn!(%vm_id, id, %err, "cannot reach QEMU to stop an abandoned backup"),
            }
        }
        for path in [dir.backup_tmp(id), dir.backup_file(id)] {
            remove_if_present(&path).map_err(|source| VmmError::Io {
                vm_id: vm_id.to_owned(),
                what: format!("cannot remove {}", path.display()),
                source,
            })?;
        }
        Ok(())
    }

    /// Deletes backup `id`'s file. Its `child` (the backup backed by it)
    /// first gets what it read through it (`qemu-img rebase` onto the
    /// deleted file's own backing), so it stays restorable. Returns the
    /// child's new size.
    pub async fn delete_backup(
        &self,
        vm_id: &str,
        id: i64,
        child: Option<i64>,
    ) -> Result<Option<u64>, VmmError> {
        let dir = self.vm_dir(vm_id);
        let file = dir.backup_file(id);
        let mut child_size = None;
        if let Some(child) = child {
            let args = ["info", "--output=json"].map(std::ffi::OsStr::new);
            let info = disk::qemu_img(vm_id, &[args[0], args[1], file.as_os_str()]).await?;
            let info: Value = serde_json::from_slice(&info).map_err(|e| VmmError::Backup {
                vm_id: vm_id.to_owned(),
                id,
                why: format!("unreadable qemu-img info: {e}"),
            })?;
            let backing = info["full-backing-filename"]
                .as_str()
                .or(info["backing-filename"].as_str())
                .map(PathBuf::from)
                .ok_or_else(|| VmmError::Backup {
                    vm_id: vm_id.to_owned(),
                    id,
                    why: "the file has no backing file".into(),
                })?;
            let child_file = dir.backup_file(child);
            rebase(vm_id, &child_file, &backing).await?;
            child_size = Some(allocated(&child_file));
        }
        remove_if_present(&file).map_err(|source| VmmError::Io {
            vm_id: vm_id.to_owned(),
            what: format!("cannot remove {}", file.display()),
            source,
        })?;
        Ok(child_size)
    }

    /// Puts the disk back to backup `id`. QEMU must not run; until the final
    /// rename the old disk stays in place.
    pub async fn restore_disk(&self, vm_id: &str, id: i64) -> Result<(), VmmError> {
        let dir = self.vm_dir(vm_id);
        if dir.live_pid(vm_id).is_some() {
            return Err(VmmError::StillRunning(vm_id.to_owned()));
        }
        let io = |what: &str| {
            let (vm_id, what) = (vm_id.to_owned(), what.to_owned());
            move |source| VmmError::Io { vm_id, what, source }
        };
        let spec = dir.read_spec().map_err(io("cannot read vm.json"))?;
        let base = std::path::absolute(&spec.base_disk).map_err(io("bad base disk path"))?;
        let tmp = dir.restore_tmp();
        remove_if_present(&tmp).map_err(io("cannot remove a stale restore"))?;
        let restored = async {
            tokio::fs::copy(dir.backup_file(id), &tmp)
                .await
                .map_err(io("cannot copy the backup"))?;
            rebase(vm_id, &tmp, &base).await?;
            sync_file(&tmp).map_err(io("cannot sync the restored disk"))?;
            std::fs::rename(&tmp, dir.disk()).map_err(io("cannot move the restored disk in place"))?;
            sync_file(dir.root()).map_err(io("cannot sync the VM directory"))
        }
        .await;
        if restored.is_err() {
            let _ = remove_if_present(&tmp);
        }
        restored?;
        info!(id, "disk restored from backup");
        Ok(())
    }
}

/// `qemu-img rebase` (safe mode) of `file` onto `backing`: whatever the old
/// chain showed and the new one does not is written into `file`, so its
/// content stays the same. Interrupted, it leaves the old backing in the
/// header and only clusters equal to what the old chain showed.
async fn rebase(vm_id: &str, file: &Path, backing: &Path) -> Result<(), VmmError> {
    let format = disk::disk_format(backing).map_err(|source| VmmError::Io {
        vm_id: vm_id.to_owned(),
        what: format!("cannot read {}", backing.display()),
        source,
    })?;
    let args = ["rebase", "-q", "-f", "qcow2", "-F", format, "-b"]
        .map(std::ffi::OsStr::new)
        .into_iter()
        .chain([backing.as_os_str(), file.as_os_str()])
        .collect::<Vec<_>>();
    disk::qemu_img(vm_id, &args).await?;
    sync_file(file).map_err(|source| VmmError::Io {
        vm_id: vm_id.to_owned(),
        what: format!("cannot sync {}", file.display()),
        source,
    })
}

async fn disk_info(mon: &mut Monitor) -> Result<DiskInfo, QmpError> {
    let blocks = mon.execute(json!({"execute": "query-block"}), None).await?;
    let inserted = blocks
        .as_array()
        .and_then(|all| all.iter().find(|b| b["device"] == DISK_DEVICE))
        .map(|b| &b["inserted"])
        .ok_or_else(|| QmpError::Protocol(format!("QEMU has no device {DISK_DEVICE}")))?;
    let all = inserted["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
    let name = |b: &Value| b["name"].as_str().unwrap_or_default().to_owned();
    Ok(DiskInfo {
        virtual_size: inserted["image"]["virtual-size"]
            .as_u64()
            .ok_or_else(|| QmpError::Protocol("query-block has no virtual-size".into()))?,
        bitmaps: all
            .iter()
            .filter(|b| b["recording"] == true && b["inconsistent"] != true)
            .map(name)
            .collect(),
        ours: all
            .iter()
            .map(name)
            .filter(|n| n.starts_with(BITMAP_PREFIX))
            .collect(),
    })
}

fn find_job(jobs: &Value, id: i64) -> Option<&Value> {
    jobs.as_array()?.iter().find(|j| j["id"] == job(id))
}

/// Dismisses the concluded job, closes the target and gives its fd back.
async fn finish_target(mon: &mut Monitor, id: i64) -> Result<(), QmpError> {
    mon.execute(
        json!({"execute": "job-dismiss", "arguments": {"id": job(id)}}),
        None,
    )
    .await?;
    mon.execute(
        json!({"execute": "blockdev-del", "arguments": {"node-name": node(id)}}),
        None,
    )
    .await?;
    remove_fdsets(mon, id).await
}

async fn remove_fdsets(mon: &mut Monitor, id: i64) -> Result<(), QmpError> {
    let sets = mon.execute(json!({"execute": "query-fdsets"}), None).await?;
    for set in sets.as_array().into_iter().flatten() {
        let ours = set["fds"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|fd| fd["opaque"] == fdset_tag(id));
        if ours {
            mon.execute(
                json!({"execute": "remove-fd", "arguments": {"fdset-id": set["fdset-id"]}}),
                None,
            )
            .await?;
        }
    }
    Ok(())
}

/// Stops backup `id`'s job in QEMU and removes its target and bitmap;
/// whatever is already gone is fine.
async fn abandon_in(mon: &mut Monitor, id: i64) {
    let _ = mon
        .execute(
            json!({"execute": "job-cancel", "arguments": {"id": job(id)}}),
            None,
        )
        .await;
    let deadline = tokio::time::Instant::now() + CANCEL_PATIENCE;
    while tokio::time::Instant::now() < deadline {
        let Ok(jobs) = mon.execute(json!({"execute": "query-jobs"}), None).await else {
            break;
        };
        match find_job(&jobs, id) {
            Some(j) if j["status"] != "concluded" => tokio::time::sleep(JOB_POLL).await,
            _ => break,
        }
    }
    let _ = mon
        .execute(
            json!({"execute": "job-dismiss", "arguments": {"id": job(id)}}),
            None,
        )
        .await;
    let _ = mon
        .execute(
            json!({"execute": "blockdev-del", "arguments": {"node-name": node(id)}}),
            None,
        )
        .await;
    let _ = remove_fdsets(mon, id).await;
    let _ = mon
        .execute(
            json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": DISK_DEVICE, "name": bitmap(id)}}),
            None,
        )
        .await;
}

/// The guest agent, with the guest's file systems frozen; None when no
/// agent answers or it cannot freeze (the backup is then crash-consistent).
async fn freeze(dir: &VmDir) -> Option<QgaClient> {
    let mut agent = QgaClient::connect(&dir.qga_socket(), &dir.qga_lock())
        .await
        .ok()?;
    match agent.fsfreeze_freeze().await {
        Ok(_) => Some(agent),
        Err(err) => {
            warn!(%err, "the guest agent cannot freeze; the backup is crash-consistent");
            // A freeze that timed out may still have frozen some.
            let _ = agent.fsfreeze_thaw().await;
            None
        }
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// fsync of a file or directory.
fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Bytes a file takes on disk (qcow2 files are sparse).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}
