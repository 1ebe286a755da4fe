//! The warm pool: clones of the template (one booted guest, saved once),
//! restored, warmed up (a claim rehearsed in the guest, so that under TCG
//! the real one runs translated code) and paused, each with its own vm_id,
//! disk, mute tap and QEMU. A create claims one and only personalises it
//! (its seed, its address), which takes a second instead of a boot.
//!
//! Policy only; the template and the clones are the engine's
//! (`VmEngine::prepare_template`, `spawn_clone`, `resume_clone`):
//!
//! - the pool keeps `target` clones ready and refills in the background, one
//!   clone at a time and only while no create is running (counted from the
//!   moment a create takes a clone), so it never takes CPU from a create or
//!   a guest's boot;
//! - a clone that is not paused any more (crashed, killed) is discarded;
//! - whatever goes wrong here, a create still gets a VM: without a ready
//!   clone it takes the cold path, and a clone that fails to personalise is
//!   discarded and the create goes on cold (`HostingService::run_create`);
//! - clones are not kept across restarts of webhoster: the reaper removes
//!   them (they belong to no hosting), and the pool makes new ones. The
//!   template is kept on disk and rebuilt when its key (image, plan, QEMU)
//!   changes.
//!
//! The reaper asks [`Pool::owned`] which vm_ids are the pool's: every clone
//! is registered before any of its parts exists, and leaves the set only
//! after its hosting row exists (claimed) or its parts are gone (discarded).

use std::collections::{HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tracing::{Instrument, info, warn};

use super::ports::{PortError, VmLaunch, VmRunState};
use super::{HostingService, alloc, chain, locked, vm_span};

/// How often the pool looks at its clones when nothing wakes it.
const TICK: Duration = Duration::from_secs(2);
/// Waits after a failed template build or clone (doubling, capped).
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// A ready clone, as a create takes it (its MAC is `alloc::mac_for` its
/// vm_id, as every VM's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmClone {
    pub vm_id: String,
}

/// Where the template stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum TemplateState {
    /// Not looked at yet (or the pool is off).
    #[default]
    Absent,
    /// A guest is booting to be saved as the template.
    Building,
    Ready {
        key: String,
    },
    /// The last build failed; it is tried again later.
    Failed {
        error: String,
    },
    /// These parts cannot make templates: every create is cold.
    Unsupported,
}

/// The pool as `/health/detailed` and `/metrics` show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    /// Clones restored, warmed up and paused, ready to be claimed.
    pub ready: usize,
    /// How many the pool keeps ready (`--warm-pool`).
    pub target: usize,
    /// Clones being made right now.
    pub filling: usize,
    pub template: TemplateState,
    /// Clones taken by creates since this start.
    pub claimed_total: u64,
    /// Clones thrown away (crashed while waiting, failed to restore or to
    /// personalise) since this start.
    pub discarded_total: u64,
}

/// A clone a create took, until its hosting owns it.
pub struct Claim<'a> {
    pool: &'a Pool,
    clone: Option<WarmClone>,
}

impl Claim<'_> {
    pub fn warm_clone(&self) -> &WarmClone {
        self.clone
            .as_ref()
            .expect("a claim holds its clone until it ends")
    }

    /// The create stored its row with this clone's vm_id: the clone is the
    /// hosting's now.
    pub fn handed_over(mut self) {
        self.end();
    }

    /// The claim is over: the clone is neither busy nor being claimed.
    fn end(&mut self) -> Option<(WarmClone, std::sync::MutexGuard<'_, Inner>)> {
        let clone = self.clone.take()?;
        let mut inner = locked(&self.pool.inner);
        inner.busy.remove(&clone.vm_id);
        inner.claiming -= 1;
        Some((clone, inner))
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some((clone, mut inner)) = self.end() {
            inner.claimed -= 1;
            inner.ready.push_front(clone);
        }
    }
}

#[derive(Default)]
struct Inner {
    ready: VecDeque<WarmClone>,
    /// Being made, or taken by a create whose row is not stored yet.
    busy: HashSet<String>,
    /// Taken by creates that have no row yet ([`Pool::claims_pending`]).
    claiming: usize,
    filling: usize,
    template: TemplateState,
    claimed: u64,
    discarded: u64,
}

pub struct Pool {
    target: usize,
    inner: Mutex<Inner>,
    wake: Notify,
}

impl Pool {
    pub fn new(target: usize) -> Pool {
        Pool {
            target,
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
        }
    }

    pub fn target(&self) -> usize {
        self.target
    }

    /// A ready clone for a create, if there is one. It stays the pool's (for
    /// the reaper) until the claim is [`Claim::handed_over`]; a claim
    /// dropped before that (the create did not go on, or its caller went
    /// away) puts the clone back, ready again and first.
    pub fn take(&self) -> Option<Claim<'_>> {
        let mut inner = locked(&self.inner);
        let clone = inner.ready.pop_front()?;
        inner.busy.insert(clone.vm_id.clone());
        inner.claimed += 1;
        inner.claiming += 1;
        drop(inner);
        self.wake.notify_one();
        Some(Claim {
            pool: self,
            clone: Some(clone),
        })
    }

    /// Whether a create took a clone and has no row yet: the refill waits
    /// for it too, as for the creates in flight (it would take the CPU from
    /// the claim it was woken by).
    pub fn claims_pending(&self) -> bool {
        locked(&self.inner).claiming > 0
    }

    /// vm_ids whose parts are the pool's (ready, being made, being claimed).
    pub fn owned(&self) -> HashSet<String> {
        let inner = locked(&self.inner);
        inner
            .ready
            .iter()
            .map(|c| c.vm_id.clone())
            .chain(inner.busy.iter().cloned())
            .collect()
    }

    pub fn status(&self) -> PoolStatus {
        let inner = locked(&self.inner);
        PoolStatus {
            ready: inner.ready.len(),
            target: self.target,
            filling: inner.filling,
            template: inner.template.clone(),
            claimed_total: inner.claimed,
            discarded_total: inner.discarded,
        }
    }

    /// A clone failed after a create took it.
    pub fn count_discard(&self) {
        locked(&self.inner).discarded += 1;
    }

    fn set_template(&self, state: TemplateState) {
        locked(&self.inner).template = state;
    }

    fn missing(&self) -> usize {
        let inner = locked(&self.inner);
        self.target.saturating_sub(inner.ready.len() + inner.filling)
    }
}

impl HostingService {
    /// Keeps the pool filled, in the background, for the life of the
    /// service. Nothing runs when the target is 0.
    pub fn spawn_pool(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if self.pool.target() == 0 {
            return None;
        }
        let this = Arc::clone(self);
        Some(tokio::spawn(async move { this.keep_pool().await }))
    }

    async fn keep_pool(&self) {
        let mut retry = RETRY_FIRST;
        loop {
            if !self.template_ready().await {
                if matches!(self.pool.status().template, TemplateState::Unsupported) {
                    return;
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
            self.drop_dead_clones().await;
            // Low priority: a create (or its boot) gets the CPU first.
            if self.pool.missing() > 0 && self.creates_in_flight() == 0 && !self.pool.claims_pending() {
                match self.fill_one().await {
                    Ok(()) => retry = RETRY_FIRST,
                    Err(()) => {
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
                continue;
            }
            let _ = tokio::time::timeout(TICK, self.pool.wake.notified()).await;
        }
    }

    /// Loads or builds the template once; false while there is none.
    async fn template_ready(&self) -> bool {
        if matches!(self.pool.status().template, TemplateState::Ready { .. }) {
            return true;
        }
        self.pool.set_template(TemplateState::Building);
        let started = std::time::Instant::now();
        match self.ports.engine.prepare_template().await {
            Ok(key) => {
                info!(%key, seconds = started.elapsed().as_secs_f64(), "warm pool: template ready");
                self.pool.set_template(TemplateState::Ready { key });
                true
            }
            Err(PortError::Unsupported(what)) => {
                info!(
                    what,
                    "warm pool off: these parts make no templates; every create boots cold"
                );
                self.pool.set_template(TemplateState::Unsupported);
                false
            }
            Err(e) => {
                let error = chain(&e);
                warn!(%error, "warm pool: building the template failed; creates boot cold");
                self.pool.set_template(TemplateState::Failed { error });
                false
            }
        }
    }

    /// Ready clones whose QEMU is no longer paused are thrown away.
    async fn drop_dead_clones(&self) {
        let dead: VecDeque<WarmClone> = {
            let mut inner = locked(&self.pool.inner);
            let (alive, dead): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut inner.ready)
                .into_iter()
                .partition(|c| self.ports.engine.run_state(&c.vm_id) == Some(VmRunState::Paused));
            inner.ready = alive;
            for c in &dead {
                inner.busy.insert(c.vm_id.clone());
            }
            dead
        };
        for clone in dead {
            warn!(vm_id = %clone.vm_id, "warm pool: a ready clone is not paused any more; discarding it");
            self.discard_clone(&clone.vm_id).await;
        }
    }

    /// Makes one clone: registered first, then tap, disk and QEMU.
    async fn fill_one(&self) -> Result<(), ()> {
        let vm_id = alloc::new_vm_id();
        {
            let mut inner = locked(&self.pool.inner);
            inner.busy.insert(vm_id.clone());
            inner.filling += 1;
        }
        let launch = VmLaunch {
            vm_id: vm_id.clone(),
            tap_name: self.ports.network.tap_name(&vm_id),
            mac: alloc::mac_for(&vm_id),
            guest_ip: Ipv4Addr::UNSPECIFIED,
            ssh_port: 0,
            seed_iso: self.ports.engine.vm_dir(&vm_id).join("seed.iso"),
            labels: vec![("pool".into(), "warm".into())],
        };
        let started = std::time::Instant::now();
        let made = async {
            self.ports.network.create_mute_tap(&vm_id).await?;
            self.ports.engine.spawn_clone(&launch).await
        }
        .instrument(vm_span(&vm_id))
        .await;
        locked(&self.pool.inner).filling -= 1;
        match made {
            Ok(()) => {
                info!(parent: &vm_span(&vm_id), seconds = started.elapsed().as_secs_f64(), "warm pool: clone ready");
                let mut inner = locked(&self.pool.inner);
                inner.busy.remove(&vm_id);
                inner.ready.push_back(WarmClone { vm_id });
                Ok(())
            }
            Err(e) => {
                warn!(parent: &vm_span(&vm_id), error = %chain(&e), "warm pool: making a clone failed");
                self.discard_clone(&vm_id).await;
                Err(())
            }
        }
    }

    /// Removes a clone the pool owns (busy) and forgets it.
    async fn discard_clone(&self, vm_id: &str) {
        let removed = async {
            let vm = self.ports.engine.destroy(vm_id).await;
            let tap = self.ports.network.delete_tap(vm_id).await;
            vm.and(tap)
        }
        .instrument(vm_span(vm_id))
        .await;
        if let Err(e) = removed {
            // Left to the reaper once it is not the pool's any more.
            warn!(%vm_id, error = %chain(&e), "warm pool: removing a clone failed");
        }
        let mut inner = locked(&self.pool.inner);
        inner.busy.remove(vm_id);
        inner.discarded += 1;
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clone(id: &str) -> WarmClone {
        WarmClone { vm_id: id.into() }
    }

    #[test]
    fn a_taken_clone_stays_owned_until_its_row_exists() {
        let pool = Pool::new(2);
        locked(&pool.inner).ready.push_back(clone("vm-a"));
        let taken = pool.take().unwrap();
        assert!(pool.owned().contains("vm-a"), "the reaper must not take it yet");
        assert!(pool.claims_pending(), "no refill before the create runs");
        assert_eq!(pool.status().ready, 0);
        taken.handed_over();
        assert!(pool.owned().is_empty());
        assert!(!pool.claims_pending());
        assert_eq!(pool.status().claimed_total, 1);
    }

    #[test]
    fn a_claim_dropped_puts_its_clone_back_ready_and_first() {
        let pool = Pool::new(2);
        locked(&pool.inner).ready.extend([clone("vm-a"), clone("vm-b")]);
        drop(pool.take().unwrap());
        assert!(!pool.claims_pending());
        assert!(pool.owned().contains("vm-a"));
        assert_eq!(pool.status().ready, 2);
        let again = pool.take().unwrap();
        assert_eq!(again.warm_clone().vm_id, "vm-a");
        assert_eq!(pool.status().claimed_total, 1);
    }

    #[test]
    fn an_empty_pool_gives_nothing() {
        let pool = Pool::new(0);
        assert!(pool.take().is_none());
        assert_eq!(pool.missing(), 0);
    }
}
