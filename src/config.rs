//! Command-line flags with environment fallbacks. Every flag of `serve` is also
//! an env var (`WEBHOSTER_*`), so a unit file or a test can set them either way.
//! This module parses; the modules that use a value validate it.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use ipnet::Ipv4Net;

use crate::logfile::LogCap;

/// Where the service keeps its state, and where guest images are cached.
/// Shared by every subcommand.
#[derive(Args, Debug, Clone)]
pub struct Paths {
    /// State directory: database, VM directories, nginx prefix, secrets.
    #[arg(
        long,
        env = "WEBHOSTER_STATE_DIR",
        default_value = "/var/lib/webhoster",
        global = true
    )]
    pub state_dir: PathBuf,

    /// Guest image cache, keyed by a hash of the `images/` recipe. Shared by
    /// several state dirs (tests use their own state dir and this cache).
    #[arg(
        long,
        env = "WEBHOSTER_IMAGE_CACHE",
        default_value = "/var/cache/webhoster/images",
        global = true
    )]
    pub image_cache: PathBuf,
}

impl Paths {
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.vms_dir().join(vm_id)
    }
    pub fn nginx_dir(&self) -> PathBuf {
        self.state_dir.join("nginx")
    }
}

/// How guests are accelerated.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and the CPU shows vmx or svm, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Whether each VM's QEMU runs in its own cgroup with memory and pids limits.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupPolicy {
    /// Use cgroup v2 where it offers memory and pids, v1 otherwise; without
    /// either, run VMs unlimited with a warning (`webhoster doctor` says which).
    #[default]
    Auto,
    /// Refuse to start a VM without its cgroup.
    Required,
    /// No per-VM cgroups.
    Off,
}

#[derive(Args, Debug, Clone)]
pub struct VmmArgs {
    /// How guests are accelerated (`webhoster doctor` shows what `auto` picks).
    #[arg(long, env = "WEBHOSTER_ACCEL", value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,

    /// The qemu-system binary to run.
    #[arg(long, env = "WEBHOSTER_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,

    /// Per-VM cgroups with memory and pids limits.
    #[arg(long, env = "WEBHOSTER_VM_CGROUPS", value_enum, default_value_t = CgroupPolicy::Auto)]
    pub vm_cgroups: CgroupPolicy,

    /// The cgroup (relative to each hierarchy's root) the VM cgroups are
    /// created under.
    #[arg(long, env = "WEBHOSTER_CGROUP_PARENT", default_value = crate::vmm::cgroup::DEFAULT_PARENT)]
    pub cgroup_parent: String,

    /// Memory a VM's cgroup allows beyond its plan's RAM, for QEMU itself
    /// (TCG translation buffer, binary, heap, I/O buffers), MiB.
    #[arg(long, env = "WEBHOSTER_VM_MEMORY_OVERHEAD_MIB", default_value_t = crate::vmm::cgroup::DEFAULT_MEMORY_OVERHEAD_MIB)]
    pub vm_memory_overhead_mib: u64,

    /// Most tasks (threads) a VM's QEMU may have.
    #[arg(long, env = "WEBHOSTER_VM_PIDS_MAX", default_value_t = crate::vmm::cgroup::DEFAULT_PIDS_MAX)]
    pub vm_pids_max: u64,

    /// The ids QEMUs run as, `FIRST-LAST`: each VM's QEMU gets one of its
    /// own as uid and gid (no account needed) and never runs as root.
    #[arg(long, env = "WEBHOSTER_QEMU_IDS", default_value = crate::vmm::sandbox::DEFAULT_QEMU_IDS)]
    pub qemu_ids: crate::vmm::QemuIds,
}

impl VmmArgs {
    pub fn cgroup_options(&self) -> crate::vmm::cgroup::CgroupOptions {
        crate::vmm::cgroup::CgroupOptions {
            policy: self.vm_cgroups,
            parent: self.cgroup_parent.clone(),
            memory_overhead_mib: self.vm_memory_overhead_mib,
            pids_max: self.vm_pids_max,
        }
    }
}

/// The VM network: namespace, subnet, SSH forwards, egress.
#[derive(Args, Debug, Clone)]
pub struct NetArgs {
    /// Network namespace holding the bridge and the taps (at most 15 bytes,
    /// because host-side interface names derive from it).
    #[arg(long, env = "WEBHOSTER_NETNS", default_value = "whns")]
    pub netns: String,

    /// VM subnet. The first host address is the gateway on the bridge.
    #[arg(long, env = "WEBHOSTER_SUBNET", default_value = "10.83.0.0/24")]
    pub subnet: Ipv4Net,

    /// Host address the SSH forwards listen on.
    #[arg(long, env = "WEBHOSTER_SSH_BIND", default_value = "0.0.0.0")]
    pub ssh_bind: Ipv4Addr,

    /// Host ports handed out for SSH forwards, `LOW-HIGH`.
    #[arg(long, env = "WEBHOSTER_SSH_PORTS", default_value = "10000-20000", value_parser = parse_port_range)]
    pub ssh_ports: RangeInclusive<u16>,

    /// Uplink interface: when set, guests get forwarding and masquerade to it.
    /// Off by default: guests have no egress.
    #[arg(long, env = "WEBHOSTER_EGRESS")]
    pub egress: Option<String>,

    /// Private ranges (10/8, 172.16/12, 192.168/16, 100.64/10) guests may
    /// reach through the egress uplink anyway, comma-separated. Without it
    /// they reach only public addresses; never the host, link-local
    /// (169.254/16, cloud metadata) or each other.
    #[arg(long, env = "WEBHOSTER_EGRESS_ALLOW", value_delimiter = ',')]
    pub egress_allow: Vec<Ipv4Net>,
}

/// `webhoster serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub vmm: VmmArgs,

    #[command(flatten)]
    pub net: NetArgs,

    /// REST API listen address.
    #[arg(long, env = "WEBHOSTER_API_ADDR", default_value = "127.0.0.1:8000")]
    pub api_addr: SocketAddr,

    /// Where webhoster's nginx listens for the sites.
    #[arg(long, env = "WEBHOSTER_HTTP_ADDR", default_value = "0.0.0.0:80")]
    pub http_addr: SocketAddr,

    /// Where nginx serves the sites, the API and its docs over HTTPS.
    /// Default with `--tls-cert` or `--tls-self-signed`: `0.0.0.0:443`.
    #[arg(long, env = "WEBHOSTER_HTTPS_ADDR", requires = "tls")]
    pub https_addr: Option<SocketAddr>,

    /// PEM certificate (leaf first, then its chain) for HTTPS.
    #[arg(long, env = "WEBHOSTER_TLS_CERT", group = "tls", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`, unencrypted.
    #[arg(long, env = "WEBHOSTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// HTTPS with a self-signed certificate for `--public-host` (and
    /// `*.<site domain>`), made once into `<state>/tls/` and kept.
    #[arg(
        long,
        env = "WEBHOSTER_TLS_SELF_SIGNED",
        group = "tls",
        conflicts_with = "tls_cert"
    )]
    pub tls_self_signed: bool,

    /// Host name put in `web_url` and `ssh_command`. Defaults to the address
    /// the request came in on (its Host header).
    #[arg(long, env = "WEBHOSTER_PUBLIC_HOST")]
    pub public_host: Option<String>,

    /// Database URL. Default: SQLite at `<state>/webhoster.db`.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// JWT signing secret. Default: generated once, kept 0600 in the state dir.
    #[arg(long, env = "WEBHOSTER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Token lifetime in seconds.
    #[arg(long, env = "WEBHOSTER_TOKEN_TTL", default_value_t = 24 * 3600)]
    pub token_ttl: u64,

    /// How long a web session (the dashboard's log-in) lasts, seconds.
    #[arg(long, env = "WEBHOSTER_SESSION_TTL", default_value_t = 7 * 24 * 3600)]
    pub session_ttl: u64,

    /// Also serve each site at `http://<username>.<domain>/` by Host header,
    /// an origin of its own, and make that its `web_url`.
    #[arg(long, env = "WEBHOSTER_SITE_DOMAIN")]
    pub site_domain: Option<String>,

    /// VM plan for new hostings (a file `qemu/plans/<name>.toml`).
    #[arg(long, env = "WEBHOSTER_PLAN", default_value = "standard")]
    pub plan: String,

    /// How long a create waits for the guest to answer HTTP and SSH, seconds.
    /// Guests boot in seconds under KVM and in tens of seconds under TCG.
    #[arg(long, env = "WEBHOSTER_READY_TIMEOUT", default_value_t = 300)]
    pub ready_timeout: u64,

    /// Memory all hostings may take together, MiB. Default: the host's RAM
    /// minus a reserve for the host (the larger of 2 GiB and 10 %).
    #[arg(long, env = "WEBHOSTER_MEMORY_BUDGET_MIB")]
    pub memory_budget_mib: Option<u64>,

    /// Disk that must stay free on the state dir's filesystem, GiB; a create
    /// that would leave less is refused.
    #[arg(long, env = "WEBHOSTER_DISK_RESERVE_GIB", default_value_t = 5)]
    pub disk_reserve_gib: u64,

    /// Complete backups kept per hosting; a new one beyond deletes the
    /// oldest (the next in its chain takes over its content).
    #[arg(long, env = "WEBHOSTER_BACKUPS_KEEP", default_value_t = crate::hosting::backups::DEFAULT_KEEP)]
    pub backups_keep: usize,

    /// Creates that run at once; more wait in a queue (bounded by
    /// `--ready-timeout`) and `GET /host/my` shows their place.
    #[arg(long, env = "WEBHOSTER_CONCURRENT_CREATES", default_value_t = 4)]
    pub concurrent_creates: usize,

    /// Warm clones kept ready for creates: guests restored and paused from
    /// a template (booted and saved once per image, plan and QEMU), which a
    /// create personalises in seconds instead of booting a new guest.
    /// Refilled in the background while no create runs. 0: every create
    /// boots cold.
    #[arg(long, env = "WEBHOSTER_WARM_POOL", default_value_t = 2)]
    pub warm_pool: usize,

    /// On SIGTERM/SIGINT, also stop every guest cleanly (ACPI power-down, a
    /// bounded wait, then quit), as a host shutdown wants. Without it guests
    /// keep running and the next `serve` reattaches to them.
    #[arg(long, env = "WEBHOSTER_STOP_GUESTS")]
    pub stop_guests: bool,

    /// How often each running VM's usage (CPU, memory, disk and network
    /// counters) is sampled for `/metrics` and the dashboard's charts,
    /// seconds. The last hour is kept in memory.
    #[arg(long, env = "WEBHOSTER_USAGE_EVERY", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub usage_every: u64,

    /// Redis URL for scale-out; unset on a single machine.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Largest size of each log file, MiB: a VM's `serial.log` and
    /// `qemu.log`, nginx's error, access and per-site logs. A log about to
    /// pass it is rotated.
    #[arg(long, env = "WEBHOSTER_LOG_MAX_MIB", default_value_t = LogCap::DEFAULT_MAX_MIB,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub log_max_mib: u64,

    /// Rotated generations kept of each log (`<name>.1` is the newest).
    #[arg(long, env = "WEBHOSTER_LOG_KEEP", default_value_t = LogCap::DEFAULT_KEEP,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub log_keep: u32,
}

impl ServeArgs {
    pub fn log_cap(&self) -> LogCap {
        LogCap::from_mib(self.log_max_mib, self.log_keep)
    }
}

/// Where the front's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// HTTP only.
    Off,
    /// The operator's files.
    Files { cert: PathBuf, key: PathBuf },
    /// Made once in the state dir.
    SelfSigned,
}

/// `--https-addr`'s default.
pub const DEFAULT_HTTPS_ADDR: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 443));

impl ServeArgs {
    pub fn tls(&self) -> TlsSource {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ if self.tls_self_signed => TlsSource::SelfSigned,
            _ => TlsSource::Off,
        }
    }

    /// Where HTTPS is served, when it is.
    pub fn https_listen(&self) -> Option<SocketAddr> {
        (self.tls() != TlsSource::Off).then(|| self.https_addr.unwrap_or(DEFAULT_HTTPS_ADDR))
    }
}

pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("port range {s:?} is not LOW-HIGH"))?;
    let lo: u16 = lo
        .trim()
        .parse()
        .map_err(|e| format!("port range start {lo:?}: {e}"))?;
    let hi: u16 = hi
        .trim()
        .parse()
        .map_err(|e| format!("port range end {hi:?}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err(format!("port range {s:?} must have 0 < LOW <= HIGH"));
    }
    Ok(lo..=hi)
}

/// `serve`'s flags parsed from `argv`, for unit tests.
#[cfg(test)]
pub(crate) fn parse_serve(argv: &[&str]) -> Result<ServeArgs, clap::Error> {
    use clap::Parser;
    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }
    Serve::try_parse_from(std::iter::once("serve").chain(argv.iter().copied())).map(|s| s.args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(argv: &[&str]) -> Result<ServeArgs, clap::Error> {
        parse_serve(argv)
    }

    #[test]
    fn tls_flags() {
        let plain = serve(&[]).unwrap();
        assert_eq!(plain.tls(), TlsSource::Off);
        assert_eq!(plain.https_listen(), None);
        let files = serve(&["--tls-cert", "/c.pem", "--tls-key", "/k.pem"]).unwrap();
        assert_eq!(
            files.tls(),
            TlsSource::Files {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            }
        );
        assert_eq!(files.https_listen(), Some(DEFAULT_HTTPS_ADDR));
        let own = serve(&["--tls-self-signed", "--https-addr", "127.0.0.1:8443"]).unwrap();
        assert_eq!(own.tls(), TlsSource::SelfSigned);
        assert_eq!(own.https_listen(), Some("127.0.0.1:8443".parse().unwrap()));
        for bad in [
            &["--https-addr", "0.0.0.0:443"][..],
            &["--tls-cert", "/c.pem"],
            &["--tls-key", "/k.pem"],
            &["--tls-self-signed", "--tls-cert", "/c.pem", "--tls-key", "/k.pem"],
        ] {
            assert!(serve(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("10000-20000").unwrap(), 10000..=20000);
        assert_eq!(parse_port_range("22-22").unwrap(), 22..=22);
        assert!(parse_port_range("20000-10000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("10000").is_err());
        assert!(parse_port_range("1-70000").is_err());
    }
}
