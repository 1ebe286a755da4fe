//! Backup handlers: parse, call the hosting service, answer. Backups are
//! reached only through the caller's own hosting, so another user's backup
//! id is a 404 like one that never existed.

use serde::Serialize;
use utoipa::ToSchema;
use warp::http::StatusCode;
use warp::reply::Response;

use super::Request;
use super::error::{ApiError, ok};
use super::handlers::bearer;
use crate::hosting::backups::BackupView;

type Reply = Result<Response, ApiError>;

/// One backup, as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Backup)]
pub struct BackupData {
    pub id: i64,
    /// `running` while QEMU copies, then `complete`.
    #[schema(schema_with = backup_status_schema)]
    pub status: &'static str,
    /// `full` or `incremental`. While running, what was asked (incremental
    /// on the last backup); QEMU's bitmap decides, and the complete row says
    /// what it was.
    #[schema(schema_with = backup_kind_schema)]
    pub kind: &'static str,
    /// The backup it is incremental on.
    pub parent_id: Option<i64>,
    /// `crash` (as after a power cut) or `frozen` (the guest agent froze
    /// the file systems as the copy began).
    #[schema(schema_with = consistency_schema)]
    pub consistency: &'static str,
    pub size_bytes: u64,
    pub created_at: String,
    pub completed_at: Option<String>,
    /// While running: bytes copied and to copy, and their ratio in percent.
    pub progress: Option<Progress>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BackupProgress)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
}

// The names the store's enums print, so the document cannot drift from them.
fn backup_status_schema() -> utoipa::openapi::Object {
    use crate::store::BackupStatus as S;
    super::openapi::string_enum([S::Running, S::Complete].map(S::as_str), "Backup status")
}

fn backup_kind_schema() -> utoipa::openapi::Object {
    use crate::store::BackupKind as K;
    super::openapi::string_enum([K::Full, K::Incremental].map(K::as_str), "Backup kind")
}

fn consistency_schema() -> utoipa::openapi::Object {
    use crate::store::Consistency as C;
    super::openapi::string_enum([C::Crash, C::Frozen].map(C::as_str), "Backup consistency")
}

/// The backup a restore put back.
#[derive(Debug, Serialize, ToSchema)]
pub struct RestoredData {
    pub id: i64,
}

impl From<BackupView> for BackupData {
    fn from(v: BackupView) -> BackupData {
        let b = v.backup;
        BackupData {
            id: b.id,
            status: b.status.as_str(),
            kind: b.kind.as_str(),
            parent_id: b.parent_id,
            consistency: b.consistency.as_str(),
            size_bytes: b.size_bytes,
            created_at: b.created_at,
            completed_at: b.completed_at,
            progress: v.progress.map(|p| Progress {
                done_bytes: p.done,
                total_bytes: p.total,
                percent: if p.total == 0 {
                    0.0
                } else {
                    (p.done as f64 * 1000.0 / p.total as f64).round() / 10.0
                },
            }),
        }
    }
}

/// The `{id}` of `/api/v1/host/my/backups/{id}[/restore]`.
fn backup_id(path: &str) -> Result<i64, ApiError> {
    path.split('/')
        .nth(6)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_backup",
                "this hosting has no such backup",
            )
        })
}

pub async fn create(req: &Request<'_>) -> Reply {
    let user_id = bearer(req).await?;
    let view = req.state.hosting.create_backup(user_id).await?;
    Ok(ok(
        StatusCode::ACCEPTED,
        "backup started; GET /api/v1/host/my/backups shows its progress",
        &BackupData::from(view),
    ))
}

pub async fn list(req: &Request<'_>) -> Reply {
    let user_id = bearer(req).await?;
    let all: Vec<BackupData> = req
        .state
        .hosting
        .backups(user_id)
        .await?
        .into_iter()
        .map(BackupData::from)
        .collect();
    Ok(ok(StatusCode::OK, "your backups", &all))
}

pub async fn restore(req: &Request<'_>, path: &str) -> Reply {
    let user_id = bearer(req).await?;
    let id = backup_id(path)?;
    req.state.hosting.restore_backup(user_id, id).await?;
    Ok(ok(
        StatusCode::OK,
        "backup restored; the VM runs on it",
        &RestoredData { id },
    ))
}

pub async fn delete(req: &Request<'_>, path: &str) -> Reply {
    let user_id = bearer(req).await?;
    let id = backup_id(path)?;
    req.state.hosting.delete_backup(user_id, id).await?;
    Ok(ok(StatusCode::OK, "backup deleted", &serde_json::Value::Null))
}
