//! Hostings (one per user, with their allocations) and the steps journal.

use std::collections::HashSet;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, classify, now};

/// One hosting row. `status` and `step` are the orchestrator's words; the
/// store keeps them as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosting {
    pub id: i64,
    pub user_id: i64,
    pub vm_id: String,
    pub vm_ip: String,
    pub mac: String,
    pub ssh_port: u16,
    pub status: String,
    pub step: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone)]
pub struct NewHosting<'a> {
    pub user_id: i64,
    pub vm_id: &'a str,
    pub vm_ip: &'a str,
    pub mac: &'a str,
    pub ssh_port: u16,
    pub status: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    Pending,
    Done,
    Undone,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Done => "done",
            StepState::Undone => "undone",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    pub seq: i64,
    pub step: String,
    pub state: StepState,
}

/// IPs and ports held by hostings right now (candidates skip them).
#[derive(Debug, Clone, Default)]
pub struct UsedAllocations {
    pub ips: HashSet<String>,
    pub ports: HashSet<u16>,
}

/// The hosting columns; a macro so statements stay `&'static str` (sqlx
/// refuses dynamic SQL).
macro_rules! columns {
    () => {
        "id, user_id, vm_id, vm_ip, mac, ssh_port, status, step, error, created_at, updated_at"
    };
}

fn hosting_from(row: &AnyRow) -> Result<Hosting, StoreError> {
    let get = |e| StoreError::Query("read hosting", e);
    let port: i64 = row.try_get("ssh_port").map_err(get)?;
    Ok(Hosting {
        id: row.try_get("id").map_err(get)?,
        user_id: row.try_get("user_id").map_err(get)?,
        vm_id: row.try_get("vm_id").map_err(get)?,
        vm_ip: row.try_get("vm_ip").map_err(get)?,
        mac: row.try_get("mac").map_err(get)?,
        ssh_port: u16::try_from(port).map_err(|_| StoreError::Corrupt {
            column: "ssh_port",
            value: port.to_string(),
        })?,
        status: row.try_get("status").map_err(get)?,
        step: row.try_get("step").map_err(get)?,
        error: row.try_get("error").map_err(get)?,
        created_at: row.try_get("created_at").map_err(get)?,
        updated_at: row.try_get("updated_at").map_err(get)?,
    })
}

impl Store {
    /// Inserts a hosting with its allocations in one statement; a second
    /// hosting for the user or a taken vm_id / IP / MAC / port is a `Conflict`.
    pub async fn insert_hosting(&self, new: &NewHosting<'_>) -> Result<Hosting, StoreError> {
        let ts = now();
        let row = sqlx::query(concat!(
            "INSERT INTO hostings (user_id, vm_id, vm_ip, mac, ssh_port, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7) RETURNING ",
            columns!()
        ))
        .bind(new.user_id)
        .bind(new.vm_id)
        .bind(new.vm_ip)
        .bind(new.mac)
        .bind(i64::from(new.ssh_port))
        .bind(new.status)
        .bind(ts)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| classify("insert hosting", e))?;
        hosting_from(&row)
    }

    pub async fn hosting_by_user(&self, user_id: i64) -> Result<Option<Hosting>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM hostings WHERE user_id = $1"
        ))
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::Query("find hosting by user", e))?;
        row.as_ref().map(hosting_from).transpose()
    }

    pub async fn hosting_by_id(&self, id: i64) -> Result<Option<Hosting>, StoreError> {
        let row = sqlx::query(concat!("SELECT ", columns!(), " FROM hostings WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::Query("find hosting by id", e))?;
        row.as_ref().map(hosting_from).transpose()
    }

    pub async fn all_hostings(&self) -> Result<Vec<Hosting>, StoreError> {
        let rows = sqlx::query(concat!("SELECT ", columns!(), " FROM hostings ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StoreError::Query("list hostings", e))?;
        rows.iter().map(hosting_from).collect()
    }

    /// Sets status, current step and error message.
    pub async fn set_hosting_state(
        &self,
        id: i64,
        status: &str,
        step: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE hostings SET status = $2, step = $3, error = $4, updated_at = $5 WHERE id = $1")
            .bind(id)
            .bind(status)
            .bind(step)
            .bind(error)
            .bind(now())
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Query("update hosting state", e))?;
        Ok(())
    }

    /// Moves `id` from `from` to `to` only if it is still in `from`; false when
    /// another request got there first.
    pub async fn swap_hosting_status(&self, id: i64, from: &str, to: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE hostings SET status = $3, updated_at = $4 WHERE id = $1 AND status = $2")
                .bind(id)
                .bind(from)
                .bind(to)
                .bind(now())
                .execute(&self.pool)
                .await
                .map_err(|e| StoreError::Query("swap hosting status", e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Like [`Store::swap_hosting_status`], by vm_id.
    pub async fn swap_status_by_vm(&self, vm_id: &str, from: &str, to: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE hostings SET status = $3, updated_at = $4 WHERE vm_id = $1 AND status = $2")
                .bind(vm_id)
                .bind(from)
                .bind(to)
                .bind(now())
                .execute(&self.pool)
                .await
                .map_err(|e| StoreError::Query("swap hosting status by vm", e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes the row, its journal, and with them its allocations.
    pub async fn delete_hosting(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM hostings WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Query("delete hosting", e))?;
        Ok(())
    }

    pub async fn used_allocations(&self) -> Result<UsedAllocations, StoreError> {
        let rows = sqlx::query("SELECT vm_ip, ssh_port FROM hostings")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StoreError::Query("list allocations", e))?;
        let mut used = UsedAllocations::default();
        for row in &rows {
            let get = |e| StoreError::Query("list allocations", e);
            used.ips.insert(row.try_get("vm_ip").map_err(get)?);
            let port: i64 = row.try_get("ssh_port").map_err(get)?;
            if let Ok(port) = u16::try_from(port) {
                used.ports.insert(port);
            }
        }
        Ok(used)
    }

    /// Number of hostings per status.
    pub async fn count_by_status(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM hostings GROUP BY status ORDER BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StoreError::Query("count hostings", e))?;
        rows.iter()
            .map(|r| Ok((r.try_get("status")?, r.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| StoreError::Query("count hostings", e))
    }

    /// Records a step's state in the journal (insert or update).
    pub async fn record_step(
        &self,
        hosting_id: i64,
        seq: i64,
        step: &str,
        state: StepState,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO hosting_steps (hosting_id, seq, step, state, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (hosting_id, step) DO UPDATE SET state = excluded.state, \
             updated_at = excluded.updated_at",
        )
        .bind(hosting_id)
        .bind(seq)
        .bind(step)
        .bind(state.as_str())
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::Query("record step", e))?;
        Ok(())
    }

    /// The journal of one hosting, in step order.
    pub async fn steps(&self, hosting_id: i64) -> Result<Vec<StepRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT seq, step, state FROM hosting_steps WHERE hosting_id = $1 ORDER BY seq")
                .bind(hosting_id)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| StoreError::Query("read journal", e))?;
        rows.iter()
            .map(|r| {
                let get = |e| StoreError::Query("read journal", e);
                let state: String = r.try_get("state").map_err(get)?;
                let state = match state.as_str() {
                    "pending" => StepState::Pending,
                    "done" => StepState::Done,
                    "undone" => StepState::Undone,
                    _ => {
                        return Err(StoreError::Corrupt {
                            column: "hosting_steps.state",
                            value: state,
                        });
                    }
                };
                Ok(StepRecord {
                    seq: r.try_get("seq").map_err(get)?,
                    step: r.try_get("step").map_err(get)?,
                    state,
                })
            })
            .collect()
    }
}
