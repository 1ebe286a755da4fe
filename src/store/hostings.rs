//! Hostings (one per user, with their allocations) and the steps journal.

use std::collections::HashSet;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, classify, now};
use crate::hosting::state::{Desired, HostingState, Step};

/// One hosting row, typed: its state and wish are parsed as they are read,
/// so a row nobody can interpret is an error here, not a surprise later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosting {
    pub id: i64,
    pub user_id: i64,
    pub vm_id: String,
    pub vm_ip: String,
    pub mac: String,
    pub ssh_port: u16,
    pub state: HostingState,
    pub desired: Desired,
    /// The create step under way (while `creating`).
    pub step: Option<Step>,
    pub last_error: Option<String>,
    /// When `state` was entered (RFC 3339).
    pub state_since: String,
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
        "id, user_id, vm_id, vm_ip, mac, ssh_port, status, desired, step, error, state_since, created_at, updated_at"
    };
}

fn parse_column<T: std::str::FromStr>(row: &AnyRow, column: &'static str) -> Result<T, StoreError> {
    let text: String = row
        .try_get(column)
        .map_err(|e| StoreError::Query("read hosting", e))?;
    text.parse()
        .map_err(|_| StoreError::Corrupt { column, value: text })
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
        state: parse_column(row, "status")?,
        desired: parse_column(row, "desired")?,
        step: row
            .try_get::<Option<String>, _>("step")
            .map_err(get)?
            .map(|s| {
                s.parse().map_err(|_| StoreError::Corrupt {
                    column: "step",
                    value: s,
                })
            })
            .transpose()?,
        last_error: row.try_get("error").map_err(get)?,
        state_since: row.try_get("state_since").map_err(get)?,
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
            "INSERT INTO hostings (user_id, vm_id, vm_ip, mac, ssh_port, status, desired, state_since, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $8) RETURNING ",
            columns!()
        ))
        .bind(new.user_id)
        .bind(new.vm_id)
        .bind(new.vm_ip)
        .bind(new.mac)
        .bind(i64::from(new.ssh_port))
        .bind(HostingState::Creating.as_str())
        .bind(Desired::Running.as_str())
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

    pub async fn hosting_by_vm(&self, vm_id: &str) -> Result<Option<Hosting>, StoreError> {
        let row = sqlx::query(concat!("SELECT ", columns!(), " FROM hostings WHERE vm_id = $1"))
            .bind(vm_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::Query("find hosting by vm_id", e))?;
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

    /// Moves the hosting from `from` to `to` (with the step and last error
    /// to show) only if it is still in `from`: the time written, or None when
    /// another task got there first. The caller has checked the move with
    /// `HostingState::transition`; `state_since` changes only with the state.
    pub async fn swap_state(
        &self,
        id: i64,
        from: HostingState,
        to: HostingState,
        step: Option<Step>,
        error: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let ts = now();
        let done = sqlx::query(
            "UPDATE hostings SET status = $3, step = $4, error = $5, updated_at = $6, \
             state_since = CASE WHEN status = $3 THEN state_since ELSE $6 END \
             WHERE id = $1 AND status = $2",
        )
        .bind(id)
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(step.map(Step::name))
        .bind(error)
        .bind(&ts)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::Query("swap hosting state", e))?;
        Ok((done.rows_affected() == 1).then_some(ts))
    }

    /// Records what the user asks for.
    pub async fn set_desired(&self, id: i64, desired: Desired) -> Result<(), StoreError> {
        sqlx::query("UPDATE hostings SET desired = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(desired.as_str())
            .bind(now())
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Query("set desired state", e))?;
        Ok(())
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
