//! Health of the parts outside the database, for `/health/detailed` and
//! `/version`.

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Paths, ServeArgs};
use crate::hosting::ports::{HealthCheck, SystemInfo};
use crate::proxy::Proxy;
use crate::vmm::Engine;

pub struct System {
    pub paths: Paths,
    pub args: ServeArgs,
    pub engine: Arc<Engine>,
    pub proxy: Arc<Proxy>,
}

#[async_trait]
impl SystemInfo for System {
    async fn checks(&self) -> Vec<HealthCheck> {
        // The doctor's checks run programs (`qemu --version`...): off the
        // async workers.
        let (paths, vmm) = (self.paths.clone(), self.args.vmm.clone());
        let doctor = tokio::task::spawn_blocking(move || crate::doctor::checks(&paths, &vmm))
            .await
            .unwrap_or_default();
        let mut checks: Vec<HealthCheck> = doctor
            .into_iter()
            .map(|c| HealthCheck {
                name: c.name.into(),
                ok: c.ok,
                required: c.required,
                detail: c.detail,
            })
            .collect();
        let netns = crate::net::NetOptions::from(&self.args.net).netns_path();
        checks.push(HealthCheck {
            name: "namespace".into(),
            ok: netns.exists(),
            required: true,
            detail: netns.display().to_string(),
        });
        let master = self.proxy.master_pid();
        checks.push(HealthCheck {
            name: "nginx master".into(),
            ok: master.is_some(),
            required: true,
            detail: master.map_or_else(|| "not running".into(), |pid| format!("pid {pid}")),
        });
        let mut by_state = std::collections::BTreeMap::<String, usize>::new();
        for (_, status) in self.engine.list() {
            *by_state.entry(status.state.to_string()).or_default() += 1;
        }
        checks.push(HealthCheck {
            name: "vms".into(),
            ok: true,
            required: false,
            detail: serde_json::to_string(&by_state).unwrap_or_default(),
        });
        checks
    }

    async fn free_disk(&self) -> Option<u64> {
        let dir = self.paths.state_dir.clone();
        tokio::task::spawn_blocking(move || {
            nix::sys::statvfs::statvfs(&dir)
                .ok()
                .map(|st| st.blocks_available() * st.fragment_size())
        })
        .await
        .ok()
        .flatten()
    }

    async fn qemu_version(&self) -> Option<String> {
        let qemu = self.args.vmm.qemu.display().to_string();
        tokio::task::spawn_blocking(move || {
            crate::doctor::tool_version(&qemu, &["--version"], "qemu-system-x86").ok()
        })
        .await
        .ok()
        .flatten()
    }
}
