//! `GET /api/v1/host/my/usage`: the account's VM usage as the sampler saw
//! it, the latest sample and the last hour (see `crate::usage`).

use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::Response;

use super::Request;
use super::error::{ApiError, ok};
use super::handlers::bearer;
use crate::usage::Sample;

/// One sample of a VM's cumulative counters.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct UsageSample {
    /// When it was taken, unix seconds.
    pub at: i64,
    /// CPU time used by the VM's QEMU since it started.
    pub cpu_seconds: f64,
    /// Resident memory of the VM's QEMU.
    pub rss_bytes: u64,
    /// Bytes the guest read from and wrote to its drives since its QEMU started.
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    /// Bytes the guest received and sent on its network interface.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

impl From<Sample> for UsageSample {
    fn from(s: Sample) -> UsageSample {
        UsageSample {
            at: s.at,
            cpu_seconds: s.cpu_seconds,
            rss_bytes: s.rss_bytes,
            disk_read_bytes: s.disk_read_bytes,
            disk_write_bytes: s.disk_write_bytes,
            net_rx_bytes: s.net_rx_bytes,
            net_tx_bytes: s.net_tx_bytes,
        }
    }
}

/// The hosting's usage. Counters are cumulative: a rate is the difference
/// of two samples over their time apart, and a drop means a restart.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageData {
    pub vm_id: String,
    /// Seconds between samples; null when no sampler runs.
    pub sample_every_seconds: Option<u64>,
    /// The newest sample; null before the first one (or with no sampler).
    pub latest: Option<UsageSample>,
    /// The last hour, oldest first.
    pub history: Vec<UsageSample>,
}

pub async fn usage(req: &Request<'_>) -> Result<Response, ApiError> {
    let user_id = bearer(req).await?;
    let h = match req.state.hosting.get(user_id).await {
        Ok(h) => h,
        Err(crate::hosting::HostingError::NotFound) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_hosting",
                "this account has no hosting",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let usage = &req.state.usage;
    let history = usage.history(&h.vm_id);
    let data = UsageData {
        sample_every_seconds: usage.every().map(|d| d.as_secs()),
        latest: history.last().copied().map(UsageSample::from),
        history: history.into_iter().map(UsageSample::from).collect(),
        vm_id: h.vm_id,
    };
    Ok(ok(StatusCode::OK, "your hosting's usage", &data))
}
