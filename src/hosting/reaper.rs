//! The reaper: removes what belongs to no hosting. A rollback whose undo
//! failed, a crash between two steps, or a database restored from a backup
//! can leave QEMU processes, VM directories, taps (and their guards), SSH
//! forwards and nginx sites behind; this finds them by name and removes them.
//!
//! Order matters: what exists is listed *before* the hostings are read, so a
//! create that inserts its row and then makes its tap between the two reads
//! is never mistaken for an orphan (its row is seen by the second read).
//! The warm pool's clones are no hosting's but are not orphans either:
//! `Pool::owned` names them.

use std::collections::HashSet;

use tracing::{info, warn};

use super::{HostingError, HostingService, chain};

/// What one reaper run removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// VMs (process and directory) of no hosting.
    pub vms: Vec<String>,
    /// Taps and forwards of no hosting (tap names, forward vm_ids).
    pub network: Vec<String>,
    /// Sites (user ids) of no hosting.
    pub sites: Vec<i64>,
}

impl Reaped {
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.network.is_empty() && self.sites.is_empty()
    }
}

impl HostingService {
    /// Removes every resource that belongs to no hosting row.
    pub async fn reap(&self) -> Result<Reaped, HostingError> {
        let ports = &self.ports;
        let vm_ids = ports.engine.vm_ids().await.map_err(|source| HostingError::Vm {
            action: "listing",
            source,
        })?;
        let sites = ports.proxy.sites().await.unwrap_or_else(|e| {
            warn!(error = %chain(&e), "reaper: reading the nginx sites");
            Vec::new()
        });
        let inventory = ports.network.inventory().await;
        // Read after the listings: see the module docs. The pool's set before
        // the hostings: a claimed clone leaves the set only once its row exists.
        let pooled = self.pool().owned();
        let hostings = self.store.all_hostings().await?;
        let known: HashSet<String> = hostings.iter().map(|h| h.vm_id.clone()).chain(pooled).collect();
        let users: HashSet<i64> = hostings.iter().map(|h| h.user_id).collect();

        let mut reaped = Reaped::default();
        for vm_id in vm_ids.into_iter().filter(|v| !known.contains(v)) {
            match ports.engine.destroy(&vm_id).await {
                Ok(()) => reaped.vms.push(vm_id),
                Err(e) => warn!(%vm_id, error = %chain(&e), "reaper: removing an orphaned VM"),
            }
        }
        match inventory {
            Ok(inv) => {
                let known_taps: HashSet<String> = known.iter().map(|v| ports.network.tap_name(v)).collect();
                // A guard whose tap is gone is an orphan too.
                let held: std::collections::BTreeSet<String> =
                    inv.taps.into_iter().chain(inv.guards.into_keys()).collect();
                let orphan_taps: Vec<String> = held.into_iter().filter(|t| !known_taps.contains(t)).collect();
                let orphan_forwards: Vec<String> =
                    inv.forwards.into_keys().filter(|v| !known.contains(v)).collect();
                match ports.network.remove_orphans(&orphan_taps, &orphan_forwards).await {
                    Ok(()) => {
                        reaped.network.extend(orphan_taps);
                        reaped.network.extend(orphan_forwards);
                    }
                    Err(e) => warn!(error = %chain(&e), "reaper: removing orphaned taps and forwards"),
                }
            }
            Err(e) => warn!(error = %chain(&e), "reaper: reading the VM network"),
        }
        for site in sites.into_iter().filter(|s| !users.contains(&s.user_id)) {
            match ports.proxy.remove_site(site.user_id).await {
                Ok(()) => reaped.sites.push(site.user_id),
                Err(e) => {
                    warn!(user_id = site.user_id, error = %chain(&e), "reaper: removing an orphaned site")
                }
            }
        }
        if !reaped.is_empty() {
            info!(?reaped, "reaper removed what belonged to no hosting");
        }
        Ok(reaped)
    }
}
