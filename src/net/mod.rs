//! net: the VM network, built with netlink (rtnetlink), tun ioctls and
//! nftables. Owns one network namespace (default `whns`) holding a bridge with
//! the gateway address and one persistent tap per VM (an isolated bridge port:
//! guests reach the gateway, never each other), the veth pair joining it to
//! the host (the host end is named like the namespace), the host route to the
//! VM subnet, the SSH forwards (kernel DNAT in the host table
//! `ip webhoster_<netns>`) and the few sysctls that make them work.
//!
//! The walls, because a guest's user is root in it and may forge anything:
//!
//! - **Who a guest may be** (`guard`): each tap gets a guard when it is
//!   created: the bridge table `webhoster_guard` lets a port send only IPv4
//!   from its guest's own MAC and address and ARP for that address alone,
//!   and drops IPv6, DHCP server answers and every other ethertype. With it,
//!   a permanent neighbour entry (guest address -> guest MAC) on `br0`, so
//!   the namespace never learns a mapping from a guest at all. An isolated
//!   port only stops A talking *to* B; this stops A *being* B.
//! - **Where a guest may go** (`nft::ns_ruleset`, `nft::host_ruleset`):
//!   nowhere without `--egress`; with it, the outside world only: never the
//!   host (the host table's input guard), link-local (metadata), the VM
//!   subnet, or private ranges not opened by `--egress-allow`.
//! - IPv6 is off inside the namespace (`disable_ipv6`), so even a frame the
//!   guard missed would teach the namespace no route.
//!
//! Everything is found by name, so `up` is idempotent, `down` removes it all
//! and `reclaim` removes what a crash left. This module never touches
//! interfaces, namespaces or nftables tables it did not name, never persists
//! allocations (the store does) and never starts processes other than `nft`.

pub mod alloc;
pub mod cli;
mod errors;
mod guard;
mod host;
mod link;
pub mod netns;
pub mod nft;
mod options;
mod sysctl;
mod tap;
mod veth;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use ipnet::Ipv4Net;
use rtnetlink::Handle;
use rtnetlink::packet_route::link::InfoKind;
use tracing::{debug, info, warn};

pub use errors::NetError;
pub use guard::{Guard, Mac};
pub use nft::Forward;
pub use options::{NetOptions, validate_netns_name};

use host::{check_ports, check_subnet, open_ingress};
pub use tap::{TAP_PREFIX, tap_name};

/// An fd on a VM's persistent tap in the namespace `opts` names, for QEMU's
/// `-netdev tap,fd=N`. Blocking (a helper thread enters the namespace).
pub fn open_tap(opts: &NetOptions, tap_name: &str) -> std::io::Result<OwnedFd> {
    tap::open(&opts.netns_path(), tap_name)
}
use veth::{create_veth, host_end, ns_end, pick_transfer};

/// The bridge inside the namespace (names inside are ours alone).
pub const BRIDGE: &str = "br0";
/// The namespace end of the veth pair.
pub const NS_UPLINK: &str = "up0";
/// Guests' SSH port.
pub const GUEST_SSH_PORT: u16 = 22;

/// A tap's byte counters from the guest's side (see [`Network::tap_traffic`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapTraffic {
    pub guest_received_bytes: u64,
    pub guest_transmitted_bytes: u64,
}

/// What `reclaim` removed.
#[derive(Debug, Default, Clone)]
pub struct Reclaimed {
    pub taps: Vec<String>,
    pub forwards: Vec<Forward>,
}

/// The live VM network. Holds netlink sockets in the host and in the
/// namespace; dropping it changes nothing in the kernel.
pub struct Network {
    opts: NetOptions,
    host: Handle,
    ns: Handle,
    bridge_index: u32,
    transfer: Ipv4Net,
    /// The namespace this network was built in (device, inode of its
    /// `/run/netns` file): a namespace deleted and made anew by someone else
    /// is another one, even under the same name.
    ns_id: (u64, u64),
    /// One netlink dump at a time on the namespace socket: the kernel
    /// refuses a second one while the first is still being read (EBUSY),
    /// and convergence reads links and neighbours concurrently.
    ns_dumps: tokio::sync::Mutex<()>,
}

fn ns_identity(opts: &NetOptions) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(opts.netns_path())
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Whether every chain of a table we installed still has its rules.
fn table_intact(family: &str, table: &str) -> Result<bool, NetError> {
    Ok(nft::chain_rules(family, table)?
        .is_some_and(|chains| !chains.is_empty() && chains.values().all(|n| *n > 0)))
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("opts", &self.opts)
            .field("transfer", &self.transfer)
            .finish()
    }
}

/// A netlink connection whose socket lives in the calling (host) namespace.
fn host_handle() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::io("open a netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink connection whose socket was opened on a thread inside `ns`, so
/// every request on it applies there, whichever thread sends it.
fn ns_handle(opts: &NetOptions) -> Result<Handle, NetError> {
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = crate::sys::in_netns(&opts.netns_path(), move || {
        let _guard = rt.enter();
        rtnetlink::new_connection()
    })
    .and_then(|r| r)
    .map_err(NetError::io(format!(
        "open a netlink socket in namespace {:?}",
        opts.netns
    )))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Run blocking work (nft, ioctls on helper threads) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<T, NetError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| NetError::Io {
        op: "run a blocking network task".into(),
        source: std::io::Error::other(e.to_string()),
    })?
}

/// Run `f` on a thread inside the namespace (sysctls, nft).
async fn in_ns<T: Send + 'static>(
    opts: &NetOptions,
    what: &str,
    f: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<T, NetError> {
    let path = opts.netns_path();
    let what = what.to_string();
    blocking(move || crate::sys::in_netns(&path, f).map_err(NetError::io(what))?).await
}

impl Network {
    /// Build the network, or adopt what is there: calling it again changes
    /// nothing; after a host reboot it builds everything anew. All checks on
    /// the options run before anything is created.
    pub async fn up(opts: NetOptions) -> Result<Network, NetError> {
        opts.validate()?;
        let host = host_handle()?;
        let veth = opts.host_veth().to_string();
        let table = opts.table();

        let existing = link::get(&host, &veth).await?;
        if let Some(l) = &existing
            && l.kind != Some(InfoKind::Veth)
        {
            return Err(NetError::ForeignInterface { name: veth });
        }
        check_subnet(&host, opts.subnet, existing.as_ref().map(|l| l.index)).await?;
        {
            let (o, t) = (opts.clone(), table.clone());
            blocking(move || check_ports(&o, &t)).await?;
        }

        if netns::create(&opts.netns)? {
            info!(netns = %opts.netns, "created network namespace");
        }
        let ns = ns_handle(&opts)?;

        let host_index = match existing {
            Some(l) => l.index,
            None => create_veth(&host, &ns, &veth).await?,
        };
        let transfer = pick_transfer(&host, &opts.netns, host_index).await?;

        // Host end.
        link::ensure_address(&host, host_index, host_end(transfer)).await?;
        link::up(&host, host_index).await?;

        // Namespace: loopback, uplink, bridge with the gateway.
        if let Some(lo) = link::get(&ns, "lo").await? {
            link::up(&ns, lo.index).await?;
        }
        let uplink = link::get(&ns, NS_UPLINK)
            .await?
            .ok_or_else(|| NetError::NoNamespace(opts.netns.clone()))?;
        link::ensure_address(&ns, uplink.index, ns_end(transfer)).await?;
        link::up(&ns, uplink.index).await?;
        let bridge_index = link::ensure_bridge(&ns, BRIDGE, alloc::bridge_mac(&opts.netns)).await?;
        let gw = Ipv4Net::new(alloc::gateway(opts.subnet), opts.subnet.prefix_len()).expect("valid prefix");
        link::ensure_address(&ns, bridge_index, gw).await?;
        link::up(&ns, bridge_index).await?;

        // Routes: host -> subnet via the namespace; namespace default -> host
        // (replies to the host and, with egress, the way out).
        let any: Ipv4Net = "0.0.0.0/0".parse().expect("valid");
        link::replace_route(&ns, any, host_end(transfer).addr(), uplink.index).await?;
        link::replace_route(&host, opts.subnet, ns_end(transfer).addr(), host_index).await?;

        // Namespace: forward between veth and bridge (filtered by nft),
        // no IPv6, and the guards in front of the taps (with the guards the
        // old table held: one transaction, no moment without a wall).
        {
            let rules = nft::ns_ruleset(&nft::NsRules {
                bridge: BRIDGE,
                uplink: NS_UPLINK,
                subnet: opts.subnet,
                egress: opts.egress.is_some(),
                allow: &opts.egress_allow,
            });
            in_ns(&opts, "configure the namespace", move || {
                sysctl::write("ip_forward", "1")?;
                sysctl::disable_ipv6()?;
                nft::apply(&rules, "install the namespace table")?;
                nft::apply(&guard::ruleset(&guard::list()?), "install the guard table")
            })
            .await?;
        }

        // Host: 127.0.0.1 may leave through our veth after DNAT
        // (route_localnet), and DNATed traffic may be forwarded to it.
        sysctl::write(&sysctl::conf(&veth, "route_localnet"), "1")?;
        sysctl::write(&sysctl::conf(&veth, "forwarding"), "1")?;
        let opened = open_ingress(&host, &opts).await?;

        {
            let o = opts.clone();
            blocking(move || {
                let table = o.table();
                let forwards = nft::forwards(&table)?;
                let rules = nft::host_ruleset(&nft::HostRules {
                    table: &table,
                    veth: o.host_veth(),
                    subnet: o.subnet,
                    ssh_bind: o.ssh_bind,
                    ports: o.ssh_ports.clone(),
                    egress: o.egress.as_deref(),
                    opened: &opened,
                    forwards: &forwards,
                });
                nft::apply(&rules, "install the host table")
            })
            .await?;
        }
        info!(netns = %opts.netns, subnet = %opts.subnet, transfer = %transfer, "VM network up");
        let ns_id = ns_identity(&opts).ok_or_else(|| NetError::NoNamespace(opts.netns.clone()))?;
        Ok(Network {
            opts,
            host,
            ns,
            bridge_index,
            transfer,
            ns_id,
            ns_dumps: tokio::sync::Mutex::new(()),
        })
    }

    /// Use the network `up` built, changing nothing (operator tools, `net
    /// show`). Fails with `NoNamespace` when it is not (fully) there.
    pub async fn attach(opts: NetOptions) -> Result<Network, NetError> {
        opts.validate()?;
        if !netns::exists(&opts.netns) {
            return Err(NetError::NoNamespace(opts.netns.clone()));
        }
        let host = host_handle()?;
        let ns = ns_handle(&opts)?;
        let missing = || NetError::NoNamespace(opts.netns.clone());
        let bridge_index = link::get(&ns, BRIDGE).await?.ok_or_else(missing)?.index;
        let veth = link::get(&host, opts.host_veth()).await?.ok_or_else(missing)?;
        let transfer = link::addresses(&host, Some(veth.index))
            .await?
            .into_iter()
            .map(|(_, a)| a)
            .find(|a| a.prefix_len() == 30 && a.addr().is_link_local())
            .ok_or_else(missing)?
            .trunc();
        let ns_id = ns_identity(&opts).ok_or_else(missing)?;
        Ok(Network {
            opts,
            host,
            ns,
            bridge_index,
            transfer,
            ns_id,
            ns_dumps: tokio::sync::Mutex::new(()),
        })
    }

    /// Remove everything of the network named by `opts.netns`: host table,
    /// forwarding we turned on, the veth (and with it the host route), the
    /// namespace (and with it the bridge and taps). Missing parts are fine.
    pub async fn down(opts: &NetOptions) -> Result<(), NetError> {
        validate_netns_name(&opts.netns)?;
        let table = opts.table();
        let opened = {
            let t = table.clone();
            blocking(move || nft::opened(&t)).await?
        };
        for iface in &opened {
            // The interface may be gone; nothing to restore then.
            if let Err(e) = sysctl::write(&sysctl::conf(iface, "forwarding"), "0") {
                debug!(%iface, error = %e, "forwarding not restored");
            }
        }
        {
            let t = table.clone();
            blocking(move || nft::delete_table("ip", &t)).await?;
        }
        let host = host_handle()?;
        if let Some(l) = link::get(&host, opts.host_veth()).await? {
            if l.kind == Some(InfoKind::Veth) {
                link::delete(&host, opts.host_veth()).await?;
            } else {
                warn!(name = %opts.host_veth(), "left alone: not a veth");
            }
        }
        // The host route goes with the veth; the namespace takes the bridge,
        // the taps and its own table with it.
        netns::delete(&opts.netns)?;
        info!(netns = %opts.netns, "VM network down");
        Ok(())
    }

    pub fn options(&self) -> &NetOptions {
        &self.opts
    }

    /// The parts `up` builds that are gone now (a `teardown`, `net down`, a
    /// reboot, an operator's `nft flush`): empty when all is in place. Each
    /// check is cheap (netlink, two `nft` calls), so convergence runs it
    /// every pass; any missing part means `up` again.
    pub async fn missing_parts(&self) -> Result<Vec<&'static str>, NetError> {
        let mut missing = Vec::new();
        if ns_identity(&self.opts) != Some(self.ns_id) {
            // Everything below lived in that namespace.
            return Ok(vec!["namespace"]);
        }
        if link::get(&self.host, self.opts.host_veth()).await?.is_none() {
            missing.push("host veth");
        }
        if link::get(&self.ns, BRIDGE).await?.is_none() {
            missing.push("bridge");
        }
        let table = self.opts.table();
        if !blocking(move || table_intact("ip", &table)).await? {
            missing.push("host nft table");
        }
        if !in_ns(&self.opts, "read the namespace table", || {
            table_intact("inet", nft::NS_TABLE)
        })
        .await?
        {
            missing.push("namespace nft table");
        }
        if !in_ns(&self.opts, "read the guard table", || {
            table_intact("bridge", guard::TABLE)
        })
        .await?
        {
            missing.push("guard nft table");
        }
        Ok(missing)
    }

    /// Removes a tap by name, with its guard (the reaper's orphans, whose
    /// vm_id is unknown; a guard whose tap is already gone).
    pub async fn delete_tap_named(&self, name: &str) -> Result<(), NetError> {
        if name.starts_with(TAP_PREFIX) {
            let (link, guard) = tokio::join!(link::delete(&self.ns, name), self.unguard(name));
            link.and(guard)?;
        }
        Ok(())
    }

    pub fn gateway(&self) -> Ipv4Addr {
        alloc::gateway(self.opts.subnet)
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.opts.subnet
    }

    /// The host-side address of the veth: where guests see host traffic
    /// (including SSH from 127.0.0.1) coming from.
    pub fn host_address(&self) -> Ipv4Addr {
        host_end(self.transfer).addr()
    }

    /// Create (or adopt) the VM's persistent tap and plug it into the bridge
    /// as an isolated port, up, behind its guard: the tap sends only from
    /// `mac` and `ip` (the guest's), and the namespace's neighbour entry for
    /// `ip` is `mac`, permanently. Idempotent: called again (convergence),
    /// it puts back whatever part of that is missing. Returns the tap's name.
    pub async fn create_tap(&self, vm_id: &str, mac: &str, ip: Ipv4Addr) -> Result<String, NetError> {
        let name = tap_name(vm_id);
        let guard = self.guard_for(&name, mac, ip)?;
        // The wall first: a port is mute without it, but its guest's
        // address must never be learned from it either.
        self.install_guard(&guard).await?;
        {
            let (path, n) = (self.opts.netns_path(), name.clone());
            blocking(move || tap::create(&path, &n).map_err(NetError::io(format!("create tap {n:?}"))))
                .await?;
        }
        let l = link::get(&self.ns, &name).await?.ok_or_else(|| NetError::Io {
            op: format!("tap {name:?} vanished after creation"),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })?;
        self.plug_port_index(l.index).await?;
        debug!(vm_id, tap = %name, %mac, %ip, "tap ready");
        Ok(name)
    }

    /// Create the VM's tap with no guard and off the bridge: whatever its
    /// QEMU sends goes nowhere until `create_tap` puts the guard in and
    /// plugs it (a warm clone before a create gives it an address).
    pub async fn create_mute_tap(&self, vm_id: &str) -> Result<String, NetError> {
        let name = tap_name(vm_id);
        let (path, n) = (self.opts.netns_path(), name.clone());
        blocking(move || tap::create(&path, &n).map_err(NetError::io(format!("create tap {n:?}")))).await?;
        debug!(vm_id, tap = %name, "mute tap ready");
        Ok(name)
    }

    /// Plug an existing interface of the namespace into the bridge as an
    /// isolated port behind a guard for `mac` and `ip` (what `create_tap`
    /// does to taps; tests plug veths).
    pub async fn plug_port(&self, ifname: &str, mac: &str, ip: Ipv4Addr) -> Result<(), NetError> {
        let guard = self.guard_for(ifname, mac, ip)?;
        self.install_guard(&guard).await?;
        let l = link::get(&self.ns, ifname).await?.ok_or_else(|| NetError::Io {
            op: format!("plug {ifname:?} into the bridge"),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })?;
        self.plug_port_index(l.index).await
    }

    fn guard_for(&self, port: &str, mac: &str, ip: Ipv4Addr) -> Result<Guard, NetError> {
        self.check_guest_ip(ip)?;
        Ok(Guard {
            port: port.to_string(),
            mac: mac.parse()?,
            ip,
        })
    }

    fn check_guest_ip(&self, ip: Ipv4Addr) -> Result<(), NetError> {
        let subnet = self.opts.subnet;
        if !subnet.contains(&ip) || ip == self.gateway() || ip == subnet.network() || ip == subnet.broadcast()
        {
            return Err(NetError::NotAGuestAddress { ip, subnet });
        }
        Ok(())
    }

    /// The port's element in the guard set (replacing stale ones of the
    /// port, the address or the MAC), then the permanent neighbour entry.
    async fn install_guard(&self, g: &Guard) -> Result<(), NetError> {
        {
            let want = g.clone();
            in_ns(&self.opts, "install a guard", move || {
                guard::edit(&format!("guard port {}", want.port), |current| {
                    guard::install_script(current, &want)
                })
                .map(|_| ())
            })
            .await?;
        }
        link::set_permanent_neighbour(&self.ns, self.bridge_index, g.ip, g.mac.0).await
    }

    /// Remove a port's guard (after its interface is gone): its element in
    /// the guard set, and the permanent neighbour entry of its address if
    /// that still names its MAC (a later VM with the address has its own).
    async fn unguard(&self, port: &str) -> Result<(), NetError> {
        let p = port.to_string();
        let removed = in_ns(&self.opts, "remove a guard", move || {
            let mine = |current: &[Guard]| -> Vec<Guard> {
                current.iter().filter(|g| g.port == p).cloned().collect()
            };
            let before = guard::edit(&format!("unguard port {p}"), |current| {
                let gone = mine(current);
                (!gone.is_empty()).then(|| guard::delete_script(&gone.iter().collect::<Vec<_>>()))
            })?;
            Ok(mine(&before))
        })
        .await?;
        if removed.is_empty() {
            return Ok(());
        }
        for n in self.neighbours().await? {
            if removed.iter().any(|g| g.ip == n.ip && n.mac == Some(g.mac.0)) {
                link::delete_neighbour(&self.ns, &n).await?;
            }
        }
        debug!(port, "guard removed");
        Ok(())
    }

    async fn neighbours(&self) -> Result<Vec<link::Neighbour>, NetError> {
        let _dump = self.ns_dumps.lock().await;
        link::neighbours(&self.ns, self.bridge_index).await
    }

    /// Every guard in the namespace by port, and whether it is whole: its
    /// set element and its permanent neighbour entry both in place (one nft
    /// call and one netlink dump, for a convergence pass).
    pub async fn guards(&self) -> Result<std::collections::HashMap<String, bool>, NetError> {
        let guards = in_ns(&self.opts, "read the guards", guard::list).await?;
        let neighbours = self.neighbours().await?;
        Ok(guards
            .into_iter()
            .map(|g| {
                let whole = neighbours
                    .iter()
                    .any(|n| n.permanent && n.ip == g.ip && n.mac == Some(g.mac.0));
                (g.port, whole)
            })
            .collect())
    }

    async fn plug_port_index(&self, index: u32) -> Result<(), NetError> {
        link::plug_isolated(&self.ns, index, self.bridge_index).await
    }

    /// Delete the VM's tap and its guard (fine if they are gone). A QEMU
    /// still holding it keeps a detached device until it exits. Both wait
    /// (netdev unregister, nft spawns), so they run concurrently; a port
    /// whose guard went first is mute (the guard chain's policy drop).
    pub async fn delete_tap(&self, vm_id: &str) -> Result<(), NetError> {
        let name = tap_name(vm_id);
        let (link, guard) = tokio::join!(link::delete(&self.ns, &name), self.unguard(&name));
        if link? {
            debug!(vm_id, tap = %name, "tap deleted");
        }
        guard
    }

    /// Taps webhoster made (by prefix) in the namespace.
    pub async fn taps(&self) -> Result<Vec<String>, NetError> {
        let _dump = self.ns_dumps.lock().await;
        Ok(link::list(&self.ns)
            .await?
            .into_iter()
            .map(|l| l.name)
            .filter(|n| n.starts_with(TAP_PREFIX))
            .collect())
    }

    /// The byte counters of every tap webhoster made, by tap name, as the
    /// guest sees them: `received` is what the tap sent towards the guest
    /// (the tap's tx), `transmitted` what the guest sent (the tap's rx).
    /// One link dump on the namespace's own netlink socket: no thread
    /// enters the namespace and no fd is opened for it.
    pub async fn tap_traffic(&self) -> Result<std::collections::HashMap<String, TapTraffic>, NetError> {
        let _dump = self.ns_dumps.lock().await;
        Ok(link::list(&self.ns)
            .await?
            .into_iter()
            .filter(|l| l.name.starts_with(TAP_PREFIX))
            .filter_map(|l| {
                let (rx, tx) = l.bytes?;
                Some((
                    l.name,
                    TapTraffic {
                        guest_received_bytes: tx,
                        guest_transmitted_bytes: rx,
                    },
                ))
            })
            .collect())
    }

    /// An fd on the VM's persistent tap for QEMU's `-netdev tap,fd=N,vhost=off`.
    /// Blocking (a short-lived helper thread enters the namespace).
    pub fn open_tap(&self, tap_name: &str) -> std::io::Result<OwnedFd> {
        tap::open(&self.opts.netns_path(), tap_name)
    }

    /// Forward host `ssh_bind:host_port` to `guest_ip:22` (kernel DNAT). The
    /// rule outlives this process, and so do connections through it.
    pub async fn add_forward(&self, vm_id: &str, host_port: u16, guest_ip: Ipv4Addr) -> Result<(), NetError> {
        let (lo, hi) = (*self.opts.ssh_ports.start(), *self.opts.ssh_ports.end());
        if !self.opts.ssh_ports.contains(&host_port) {
            return Err(NetError::PortOutOfRange {
                port: host_port,
                lo,
                hi,
            });
        }
        self.check_guest_ip(guest_ip)?;
        let table = self.opts.table();
        let bind = self.opts.ssh_bind;
        let want = Forward {
            vm_id: vm_id.to_string(),
            port: host_port,
            guest: guest_ip,
            guest_port: GUEST_SSH_PORT,
        };
        blocking(move || {
            let current = nft::forwards(&table)?;
            if let Some(f) = current.iter().find(|f| f.port == host_port) {
                if *f == want {
                    return Ok(());
                }
                if f.vm_id != want.vm_id {
                    return Err(NetError::PortInUse {
                        port: host_port,
                        by: format!(" by the forward of VM {}", f.vm_id),
                    });
                }
            }
            if !alloc::port_is_free(bind, host_port) {
                return Err(NetError::PortInUse {
                    port: host_port,
                    by: " by another process on the host".into(),
                });
            }
            let old = current.iter().find(|f| f.vm_id == want.vm_id);
            nft::add_forward(&table, &want, old)
        })
        .await?;
        debug!(vm_id, host_port, %guest_ip, "SSH forward added");
        Ok(())
    }

    /// Remove the VM's forward(s); fine if there is none.
    pub async fn remove_forward(&self, vm_id: &str) -> Result<(), NetError> {
        let table = self.opts.table();
        let vm = vm_id.to_string();
        blocking(move || {
            let ports: Vec<u16> = nft::forwards(&table)?
                .into_iter()
                .filter(|f| f.vm_id == vm)
                .map(|f| f.port)
                .collect();
            nft::delete_forwards(&table, &ports)
        })
        .await
    }

    /// Remove the VM's tap and forward together (VM deletion). Both wait on
    /// kernel RCU grace periods (netdev unregister, nft commit), so they run
    /// concurrently: the cost is the slower of the two, not the sum.
    pub async fn release_vm(&self, vm_id: &str) -> Result<(), NetError> {
        let (tap, fwd) = tokio::join!(self.delete_tap(vm_id), self.remove_forward(vm_id));
        tap.and(fwd)
    }

    /// Forwards currently in the host table.
    pub async fn forwards(&self) -> Result<Vec<Forward>, NetError> {
        let table = self.opts.table();
        blocking(move || nft::forwards(&table)).await
    }

    /// Whether `port` can be handed out: in range, not forwarded by us (a
    /// forwarded port is bound by nothing), and not held by anyone else.
    pub async fn port_available(&self, port: u16) -> Result<bool, NetError> {
        if !self.opts.ssh_ports.contains(&port) {
            return Ok(false);
        }
        let forwarded = self.forwards().await?.iter().any(|f| f.port == port);
        Ok(!forwarded && alloc::port_is_free(self.opts.ssh_bind, port))
    }

    /// Remove taps (with their guards), guards of taps that are gone, and
    /// forwards of VMs not in `keep` (service start: whatever a crash left
    /// behind).
    pub async fn reclaim(&self, keep: &HashSet<String>) -> Result<Reclaimed, NetError> {
        let keep_taps: HashSet<String> = keep.iter().map(|v| tap_name(v)).collect();
        let mut out = Reclaimed::default();
        let mut ports: Vec<String> = self.taps().await?;
        for port in self.guards().await?.into_keys() {
            if port.starts_with(TAP_PREFIX) && !ports.contains(&port) {
                ports.push(port);
            }
        }
        for tap in ports {
            if !keep_taps.contains(&tap) {
                self.delete_tap_named(&tap).await?;
                out.taps.push(tap);
            }
        }
        let stale: Vec<Forward> = self
            .forwards()
            .await?
            .into_iter()
            .filter(|f| !keep.contains(&f.vm_id))
            .collect();
        {
            let table = self.opts.table();
            let ports: Vec<u16> = stale.iter().map(|f| f.port).collect();
            blocking(move || nft::delete_forwards(&table, &ports)).await?;
        }
        out.forwards = stale;
        if !out.taps.is_empty() || !out.forwards.is_empty() {
            info!(taps = ?out.taps, forwards = out.forwards.len(), "reclaimed leftovers");
        }
        Ok(out)
    }

    /// The host netlink handle (for diagnostics such as `net show`).
    pub fn host_handle(&self) -> &Handle {
        &self.host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz() {
        let n = tap_name("0f8fad5b-d9cb-469f-a165-70867728950e");
        assert_eq!(n.len(), 15);
        assert!(n.starts_with(TAP_PREFIX));
        assert_eq!(n, tap_name("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert_ne!(n, tap_name("another"));
    }
}
