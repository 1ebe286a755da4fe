//! `GET /api/v1/host/my/usage`: the account's VM usage as the sampler saw
//! it, the latest sample and the last hour (see `crate::usage`).

use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::Response;

use super::Request;
use super::error::{ApiError, ok};
use super::handlers::bearer;
use crate::usage::Sample;

/// The hosting's usage. Counters are cumulative: a rate is the difference
/// of two samples over their time apart, and a drop means a restart.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageData {
    pub vm_id: String,
    /// Seconds between samples; null when no sampler runs.
    pub sample_every_seconds: Option<u64>,
    /// The newest sample; null before the first one (or with no sampler).
    pub latest: Option<Sample>,
    /// The last hour, oldest first.
    pub history: Vec<Sample>,
}

pub async fn usage(req: &Request<'_>) -> Result<Response, ApiError> {
    let user_id = bearer(req).await?;
    let h = req.state.hosting.get(user_id).await?;
    let usage = &req.state.usage;
    let history = usage.history(&h.vm_id);
    let data = UsageData {
        sample_every_seconds: usage.every().map(|d| d.as_secs()),
        latest: history.last().copied(),
        history,
        vm_id: h.vm_id,
    };
    Ok(ok(StatusCode::OK, "your hosting's usage", &data))
}
