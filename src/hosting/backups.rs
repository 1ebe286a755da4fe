//! A hosting's backups: taken live while the site serves, listed, restored,
//! deleted, pruned to the last N, and cleaned after a crash.
//!
//! Every operation holds the hosting's turn (its lock): a backup for the
//! whole copy, so no stop, restore, delete or convergence pass moves the VM
//! under the job (convergence skips the hosting meanwhile, as it does for a
//! start). A restore goes through the usual states (`stopping`, `stopped`,
//! `starting`, `running`) and leaves `desired` at `running`, so a restart
//! of the service in the middle brings the VM back on whichever disk is in
//! place: the old one until the restored one is whole.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{Instrument, info, warn};

use super::converge::Power;
use super::ports::{BackupProgress, BackupRequest};
use super::{HostingError, HostingService, HostingState, chain, locked, vm_span};
use crate::store::{Backup, BackupStatus, Consistency};

/// Kept by default (`--backups-keep`).
pub const DEFAULT_KEEP: usize = 7;

/// One backup as the API shows it: the row, and the job's progress while
/// it runs.
#[derive(Debug, Clone)]
pub struct BackupView {
    pub backup: Backup,
    pub progress: Option<BackupProgress>,
}

impl HostingService {
    fn progress_of(&self, backup: &Backup) -> Option<BackupProgress> {
        (backup.status == BackupStatus::Running)
            .then(|| {
                locked(&self.backups_running)
                    .get(&backup.hosting_id)
                    .map(|rx| *rx.borrow())
            })
            .flatten()
    }

    fn view(&self, backup: Backup) -> BackupView {
        BackupView {
            progress: self.progress_of(&backup),
            backup,
        }
    }

    /// Starts a backup of the user's running VM and returns at once with
    /// its row (`running`); the copy goes on in its own task. One at a time
    /// per hosting; refused before anything is written when the host's disk
    /// could not hold it.
    pub async fn create_backup(self: &Arc<Self>, user_id: i64) -> Result<BackupView, HostingError> {
        let h = self.get(user_id).await?;
        if locked(&self.backups_running).contains_key(&h.id) {
            return Err(HostingError::Busy("taking a backup"));
        }
        let turn = self.lock(h.id).await;
        let Some(h) = self.store.hosting_by_id(h.id).await? else {
            return Err(HostingError::NotFound);
        };
        if !matches!(h.state, HostingState::Running | HostingState::Starting) {
            return Err(HostingError::NotRunning(h.state.as_str()));
        }
        // At most what the disk holds beyond the base image is copied.
        let need = self.ports.engine.disk_usage(&h.vm_id);
        let reserve = self.cfg.budget.disk_reserve;
        if let Some(free) = self.ports.system.free_disk().await
            && free < reserve.saturating_add(need)
        {
            return Err(HostingError::NoRoom(format!(
                "a backup may take up to {} MiB, the host has {} MiB free and {} MiB must stay free",
                need.div_ceil(1 << 20),
                free >> 20,
                reserve >> 20
            )));
        }
        let parent = self
            .store
            .backups(h.id)
            .await?
            .into_iter()
            .rev()
            .find(|b| b.status == BackupStatus::Complete)
            .map(|b| b.id);
        let row = self.store.insert_backup(h.id, parent).await?;
        let (tx, rx) = watch::channel(BackupProgress::default());
        locked(&self.backups_running).insert(h.id, rx);
        let this = self.clone();
        let (id, vm_id) = (row.id, h.vm_id.clone());
        tokio::spawn(
            async move {
                let _turn = turn;
                let req = BackupRequest { id, parent };
                let result = match this.ports.engine.backup(&vm_id, req, &tx).await {
                    Ok(done) => {
                        let consistency = if done.frozen {
                            Consistency::Frozen
                        } else {
                            Consistency::Crash
                        };
                        this.store
                            .complete_backup(id, done.parent, consistency, done.size_bytes)
                            .await
                            .map_err(|e| chain(&e))
                    }
                    Err(err) => Err(chain(&err)),
                };
                match result {
                    Ok(()) => this.prune(h.id, &vm_id).await,
                    Err(why) => {
                        warn!(id, %why, "backup failed");
                        this.drop_backup(&vm_id, id).await;
                    }
                }
                locked(&this.backups_running).remove(&h.id);
            }
            .instrument(vm_span(&h.vm_id)),
        );
        Ok(self.view(row))
    }

    /// The user's backups, oldest first.
    pub async fn backups(&self, user_id: i64) -> Result<Vec<BackupView>, HostingError> {
        let h = self.get(user_id).await?;
        Ok(self
            .store
            .backups(h.id)
            .await?
            .into_iter()
            .map(|b| self.view(b))
            .collect())
    }

    /// One complete backup of the user's hosting.
    async fn complete_backup(&self, hosting_id: i64, id: i64) -> Result<Backup, HostingError> {
        let backup = self
            .store
            .backups(hosting_id)
            .await?
            .into_iter()
            .find(|b| b.id == id)
            .ok_or(HostingError::NoBackup)?;
        if backup.status != BackupStatus::Complete {
            return Err(HostingError::Busy("taking this backup"));
        }
        Ok(backup)
    }

    /// Deletes one backup; the next one in its chain takes over its content,
    /// so every other backup stays restorable.
    pub async fn delete_backup(&self, user_id: i64, id: i64) -> Result<(), HostingError> {
        let h = self.get(user_id).await?;
        let _turn = self.lock(h.id).await;
        self.complete_backup(h.id, id).await?;
        self.remove_backup(h.id, &h.vm_id, id)
            .instrument(vm_span(&h.vm_id))
            .await
    }

    async fn remove_backup(&self, hosting_id: i64, vm_id: &str, id: i64) -> Result<(), HostingError> {
        let all = self.store.backups(hosting_id).await?;
        let Some(backup) = all.iter().find(|b| b.id == id) else {
            return Ok(());
        };
        let child = all.iter().find(|b| b.parent_id == Some(id)).map(|b| b.id);
        let child_size = self
            .ports
            .engine
            .delete_backup(vm_id, id, child)
            .await
            .map_err(|source| HostingError::Vm {
                action: "deleting a backup of",
                source,
            })?;
        if let (Some(child), Some(size)) = (child, child_size) {
            self.store.reparent_backup(child, backup.parent_id, size).await?;
        }
        self.store.delete_backup_row(id).await?;
        info!(id, ?child, "backup deleted");
        Ok(())
    }

    /// Keeps the last `backups_keep` complete backups.
    async fn prune(&self, hosting_id: i64, vm_id: &str) {
        let all = match self.store.backups(hosting_id).await {
            Ok(all) => all,
            Err(err) => return warn!(err = %chain(&err), "retention: cannot list backups"),
        };
        let complete: Vec<i64> = all
            .iter()
            .filter(|b| b.status == BackupStatus::Complete)
            .map(|b| b.id)
            .collect();
        let excess = complete.len().saturating_sub(self.cfg.backups_keep.max(1));
        for id in &complete[..excess] {
            if let Err(err) = self.remove_backup(hosting_id, vm_id, *id).await {
                warn!(id, err = %chain(&err), "retention: cannot delete an old backup");
            }
        }
    }

    /// Removes an unfinished backup: QEMU's job, its files, its row.
    async fn drop_backup(&self, vm_id: &str, id: i64) {
        if let Err(err) = self.ports.engine.abandon_backup(vm_id, id).await {
            warn!(id, err = %chain(&err), "cannot remove what an unfinished backup left");
        }
        if let Err(err) = self.store.delete_backup_row(id).await {
            warn!(id, err = %chain(&err), "cannot remove an unfinished backup's row");
        }
    }

    /// Stops the VM cleanly, puts its disk back to backup `id` and starts
    /// it again; same address, port, host key and site, the files of then.
    pub async fn restore_backup(&self, user_id: i64, id: i64) -> Result<super::Hosting, HostingError> {
        let (_turn, mut h) = self.turn_to_operate(user_id).await?;
        self.complete_backup(h.id, id).await?;
        let span = vm_span(&h.vm_id);
        async {
            info!(id, "restore: stopping the VM");
            self.ensure_stopped(&mut h).await?;
            if let Err(source) = self.ports.engine.restore_disk(&h.vm_id, id).await {
                // The old disk is in place: bring the VM back on it.
                warn!(id, err = %chain(&source), "restore failed; starting the VM on its old disk");
                let _ = self.power_locked(h, Power::Start).await;
                return Err(HostingError::Vm {
                    action: "restoring the disk of",
                    source,
                });
            }
            info!(id, "restore: starting the VM on the restored disk");
            self.power_locked(h, Power::Start).await
        }
        .instrument(span)
        .await
    }

    /// At start: backups left `running` by a crash of the service are
    /// removed with whatever they left (a partial file never looks complete).
    pub(super) async fn recover_backups(&self) -> Result<Vec<i64>, HostingError> {
        let mut dropped = Vec::new();
        for backup in self.store.running_backups().await? {
            let Some(h) = self.store.hosting_by_id(backup.hosting_id).await? else {
                continue;
            };
            info!(vm_id = %h.vm_id, id = backup.id, "recovery: removing an unfinished backup");
            self.drop_backup(&h.vm_id, backup.id)
                .instrument(vm_span(&h.vm_id))
                .await;
            dropped.push(backup.id);
        }
        Ok(dropped)
    }
}
