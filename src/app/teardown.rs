//! `webhoster teardown`, and stopping every guest at shutdown: what a clean
//! host shutdown does. Guests are stopped cleanly (ACPI power-down, a
//! bounded wait, then quit), all at once, so their last writes reach their
//! disks; disks, seeds and the database stay, and `serve` brings it all back.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use futures::future::join_all;

use super::adapters::GRACEFUL_STOP;
use crate::config::{NetArgs, Paths};
use crate::net::{NetOptions, Network};
use crate::proxy;
use crate::vmm::{self, Engine, EngineOptions};

/// Stops every VM of `vms_dir` cleanly and concurrently; returns how many
/// were running.
pub async fn stop_guests(engine: &Arc<Engine>, vms_dir: &Path) -> anyhow::Result<usize> {
    let mut specs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(vms_dir) {
        for entry in entries.flatten() {
            let vm_id = entry.file_name().to_string_lossy().into_owned();
            if let Ok(spec) = engine.vm_dir(&vm_id).read_spec() {
                specs.push(spec);
            }
        }
    }
    let running: Vec<String> = engine
        .reattach(&specs)
        .await
        .into_iter()
        .filter(|(_, outcome)| matches!(outcome, Ok(vmm::ReattachOutcome::Reattached { .. })))
        .map(|(vm_id, _)| vm_id)
        .collect();
    let stops = running.iter().map(|vm_id| async move {
        let started = std::time::Instant::now();
        let result = engine.stop(vm_id, GRACEFUL_STOP).await;
        tracing::info!(%vm_id, seconds = started.elapsed().as_secs_f64(), ok = result.is_ok(), "guest stopped");
        result.with_context(|| format!("stopping VM {vm_id}"))
    });
    for result in join_all(stops).await {
        result?;
    }
    Ok(running.len())
}

/// `webhoster teardown`: stops every VM of the state dir and the nginx
/// master, and removes the VM network. Disks, seeds and the database stay.
pub async fn teardown(paths: &Paths, args: &NetArgs) -> anyhow::Result<()> {
    let engine = Arc::new(Engine::new(EngineOptions::new(paths.vms_dir())).context("opening the VM engine")?);
    let stopped = stop_guests(&engine, &paths.vms_dir()).await?;
    tracing::info!(stopped, "guests stopped");
    if let Ok(engine) = Arc::try_unwrap(engine) {
        engine.detach_all().await;
    }
    proxy::stop(&paths.nginx_dir(), std::time::Duration::from_secs(10)).context("stopping nginx")?;
    Network::down(&NetOptions::from(args))
        .await
        .context("removing the VM network")?;
    Ok(())
}
