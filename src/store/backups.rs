//! Backups of a hosting's disk: one row per backup file. A row is `running`
//! while QEMU copies and `complete` once the file has its final name.

use std::str::FromStr;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, now};

/// How a backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupKind {
    /// Everything the disk holds beyond the base image.
    Full,
    /// What changed since its parent (a persistent dirty bitmap).
    Incremental,
}

/// What the guest's file systems looked like at the backup's point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// As after a power cut: the journal replays.
    Crash,
    /// The guest agent froze the file systems (`fsfreeze`) as the copy began.
    Frozen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupStatus {
    Running,
    Complete,
}

macro_rules! text_enum {
    ($t:ty, $($v:path => $s:literal),+) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $($v => $s),+ }
            }
        }
        impl FromStr for $t {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s { $($s => Ok($v),)+ _ => Err(()) }
            }
        }
    };
}
text_enum!(BackupKind, BackupKind::Full => "full", BackupKind::Incremental => "incremental");
text_enum!(Consistency, Consistency::Crash => "crash", Consistency::Frozen => "frozen");
text_enum!(BackupStatus, BackupStatus::Running => "running", BackupStatus::Complete => "complete");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub id: i64,
    pub hosting_id: i64,
    /// The backup this one's file is backed by; None: the base image.
    pub parent_id: Option<i64>,
    pub kind: BackupKind,
    pub consistency: Consistency,
    pub status: BackupStatus,
    /// Bytes the file takes on the host's disk.
    pub size_bytes: u64,
    pub created_at: String,
    pub completed_at: Option<String>,
}

/// The backup columns; a macro so statements stay `&'static str`.
macro_rules! columns {
    () => {
        "id, hosting_id, parent_id, kind, consistency, status, size_bytes, created_at, completed_at"
    };
}

fn parse<T: FromStr>(row: &AnyRow, column: &'static str) -> Result<T, StoreError> {
    let text: String = row
        .try_get(column)
        .map_err(|e| StoreError::Query("read backup", e))?;
    text.parse()
        .map_err(|_| StoreError::Corrupt { column, value: text })
}

fn backup_from(row: &AnyRow) -> Result<Backup, StoreError> {
    let get = |e| StoreError::Query("read backup", e);
    let size: i64 = row.try_get("size_bytes").map_err(get)?;
    Ok(Backup {
        id: row.try_get("id").map_err(get)?,
        hosting_id: row.try_get("hosting_id").map_err(get)?,
        parent_id: row.try_get("parent_id").map_err(get)?,
        kind: parse(row, "kind")?,
        consistency: parse(row, "consistency")?,
        status: parse(row, "status")?,
        size_bytes: u64::try_from(size).unwrap_or(0),
        created_at: row.try_get("created_at").map_err(get)?,
        completed_at: row.try_get("completed_at").map_err(get)?,
    })
}

impl Store {
    /// A `running` row: the backup's id names its file and QEMU job.
    pub async fn insert_backup(&self, hosting_id: i64, parent_id: Option<i64>) -> Result<Backup, StoreError> {
        let kind = if parent_id.is_some() {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        };
        let row = sqlx::query(concat!(
            "INSERT INTO backups (hosting_id, parent_id, kind, consistency, status, size_bytes, created_at) \
             VALUES ($1, $2, $3, $4, $5, 0, $6) RETURNING ",
            columns!()
        ))
        .bind(hosting_id)
        .bind(parent_id)
        .bind(kind.as_str())
        .bind(Consistency::Crash.as_str())
        .bind(BackupStatus::Running.as_str())
        .bind(now())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::Query("insert backup", e))?;
        backup_from(&row)
    }

    /// Marks the backup complete, with how it was really taken.
    pub async fn complete_backup(
        &self,
        id: i64,
        parent_id: Option<i64>,
        consistency: Consistency,
        size_bytes: u64,
    ) -> Result<(), StoreError> {
        let kind = if parent_id.is_some() {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        };
        sqlx::query(
            "UPDATE backups SET status = $2, parent_id = $3, kind = $4, consistency = $5, \
             size_bytes = $6, completed_at = $7 WHERE id = $1",
        )
        .bind(id)
        .bind(BackupStatus::Complete.as_str())
        .bind(parent_id)
        .bind(kind.as_str())
        .bind(consistency.as_str())
        .bind(i64::try_from(size_bytes).unwrap_or(i64::MAX))
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::Query("complete backup", e))?;
        Ok(())
    }

    /// A backup's file now stands on another parent (its old one was deleted
    /// and merged into it), with its new size.
    pub async fn reparent_backup(
        &self,
        id: i64,
        parent_id: Option<i64>,
        size_bytes: u64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE backups SET parent_id = $2, size_bytes = $3 WHERE id = $1")
            .bind(id)
            .bind(parent_id)
            .bind(i64::try_from(size_bytes).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Query("reparent backup", e))?;
        Ok(())
    }

    pub async fn delete_backup_row(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM backups WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Query("delete backup", e))?;
        Ok(())
    }

    /// The hosting's backups, oldest first.
    pub async fn backups(&self, hosting_id: i64) -> Result<Vec<Backup>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM backups WHERE hosting_id = $1 ORDER BY id"
        ))
        .bind(hosting_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| StoreError::Query("list backups", e))?;
        rows.iter().map(backup_from).collect()
    }

    /// Every backup still `running`, of every hosting (for recovery at start).
    pub async fn running_backups(&self) -> Result<Vec<Backup>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM backups WHERE status = $1 ORDER BY id"
        ))
        .bind(BackupStatus::Running.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| StoreError::Query("list running backups", e))?;
        rows.iter().map(backup_from).collect()
    }
}
