//! Guest helpers for tests: the cached image, NoCloud seeds, SSH keys, QEMU guards.
//!
//! Everything here is blocking (std), so it works from plain `#[test]`s and
//! from inside a tokio runtime alike (call it from `spawn_blocking` there if
//! the runtime must stay responsive).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use webhoster::image::{self, Image};

/// The image cache tests use: `WEBHOSTER_IMAGE_CACHE`, or the default.
pub fn image_cache() -> PathBuf {
    std::env::var_os("WEBHOSTER_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/webhoster/images"))
}

/// The image for the current recipe, built first if it is not cached (once
/// per test binary; concurrent binaries wait on the cache lock).
pub fn test_image() -> Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE
        .get_or_init(|| image::ensure(&image_cache()).unwrap_or_else(|e| panic!("guest image: {e}")))
        .clone()
}

/// An ed25519 key pair made by `ssh-keygen` in its own temp dir.
pub struct TestKey {
    _dir: tempfile::TempDir,
    private: PathBuf,
    public: String,
}

impl TestKey {
    pub fn new() -> TestKey {
        let dir = tempfile::tempdir().expect("temp dir for the test key");
        let private = dir.path().join("id_ed25519");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "webhoster-test", "-f"])
            .arg(&private)
            .output()
            .expect("ssh-keygen (Debian package openssh-client)");
        assert!(out.status.success(), "ssh-keygen: {out:?}");
        let public = std::fs::read_to_string(private.with_extension("pub"))
            .expect("public key")
            .trim()
            .to_owned();
        TestKey {
            _dir: dir,
            private,
            public,
        }
    }

    pub fn public_line(&self) -> &str {
        &self.public
    }

    pub fn private_path(&self) -> &Path {
        &self.private
    }
}

impl Default for TestKey {
    fn default() -> Self {
        TestKey::new()
    }
}

/// ssh/sftp/scp options for tests: never prompt, never trust or record a
/// host key, log in with `key` only.
pub fn ssh_opts(key: &TestKey) -> Vec<String> {
    ssh_key_opts(key.private_path())
}

/// [`ssh_opts`] for a private key file made elsewhere.
pub fn ssh_key_opts(key: &Path) -> Vec<String> {
    [
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "IdentitiesOnly=yes",
        "-i",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([key.display().to_string()])
    .collect()
}

/// Runs `cmd` over SSH as `user`. Never prompts, never trusts a host key file.
pub fn ssh(host: &str, port: u16, user: &str, key: &TestKey, cmd: &str) -> Output {
    Command::new("ssh")
        .args(ssh_opts(key))
        .args(["-p", &port.to_string()])
        .arg(format!("{user}@{host}"))
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("ssh (Debian package openssh-client)")
}

/// Uploads `local` to `remote` with SFTP.
pub fn sftp_put(host: &str, port: u16, user: &str, key: &TestKey, local: &Path, remote: &str) -> Output {
    let mut child = Command::new("sftp")
        .args(ssh_opts(key))
        .args(["-P", &port.to_string(), "-b", "-"])
        .arg(format!("{user}@{host}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sftp (Debian package openssh-client)");
    let batch = format!("put \"{}\" \"{}\"\n", local.display(), remote);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(batch.as_bytes())
        .expect("sftp batch");
    child.wait_with_output().expect("sftp")
}

/// Polls `check` every 200 ms until it is true; panics after `timeout`.
/// Returns how long it took.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A plain HTTP/1.0 GET: (status, body). Short timeouts, for polling.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Writes any NoCloud seed (`files`: name, content) as a `cidata` ISO.
pub fn write_seed(files: &[(&str, &[u8])], path: &Path) {
    let files: Vec<(String, Vec<u8>)> = files.iter().map(|(n, c)| (n.to_string(), c.to_vec())).collect();
    let path = path.to_owned();
    // Own thread and runtime: callers may or may not be inside tokio.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (n.as_str(), c.as_slice())).collect();
        rt.block_on(webhoster::seed::write_iso(&refs, &path))
    })
    .join()
    .expect("seed thread")
    .unwrap_or_else(|e| panic!("writing the seed: {e}"));
}

/// How to boot a test guest.
pub struct GuestOptions {
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Size of the qcow2 overlay on the base image.
    pub disk_gib: u32,
    /// The NIC's MAC address; QEMU's default (52:54:00:12:34:56) when None.
    pub mac: Option<String>,
    /// Extra QEMU arguments (appended).
    pub extra_args: Vec<String>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            memory_mib: 1024,
            vcpus: 1,
            disk_gib: 4,
            mac: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running QEMU guest with user-mode networking (loopback hostfwd only,
/// `restrict=on`: no egress). Killed, and its temp dir removed, on drop,
/// also when the test panics.
pub struct Guest {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub http: SocketAddr,
    pub ssh_port: u16,
    /// When QEMU was spawned.
    pub started: Instant,
}

impl Guest {
    /// Boots `image` with the seed ISO at `seed` (any NoCloud seed).
    pub fn boot(image: &Image, seed: &Path, opts: &GuestOptions) -> Guest {
        let dir = tempfile::Builder::new()
            .prefix("webhoster-guest-")
            .tempdir()
            .expect("guest temp dir");
        let disk = dir.path().join("disk.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&image.disk)
            .arg(&disk)
            .arg(format!("{}G", opts.disk_gib))
            .output()
            .expect("qemu-img (Debian package qemu-utils)");
        assert!(out.status.success(), "qemu-img create: {out:?}");
        let http_port = free_port();
        let ssh_port = free_port();
        let args = qemu_args(&QemuArgs {
            image,
            disk: &disk,
            seed,
            serial: &dir.path().join("serial.log"),
            memory_mib: opts.memory_mib,
            vcpus: opts.vcpus,
            hostfwd: &[(http_port, 80), (ssh_port, 22)],
            mac: opts.mac.as_deref(),
        });
        let started = Instant::now();
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qemu.stderr")).expect("stderr file"))
            .spawn()
            .expect("qemu-system-x86_64 (Debian package qemu-system-x86)");
        Guest {
            child: Some(child),
            dir,
            http: SocketAddr::from((Ipv4Addr::LOCALHOST, http_port)),
            ssh_port,
            started,
        }
    }

    /// The guest's serial console so far (for failure messages).
    pub fn serial(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default();
        let err = std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default();
        format!("{log}\n--- qemu stderr ---\n{err}")
    }

    /// Panics (with the serial log) if QEMU has exited.
    pub fn assert_alive(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("QEMU exited ({status}):\n{}", self.serial());
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct QemuArgs<'a> {
    pub image: &'a Image,
    pub disk: &'a Path,
    pub seed: &'a Path,
    pub serial: &'a Path,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// (host port on 127.0.0.1, guest port)
    pub hostfwd: &'a [(u16, u16)],
    pub mac: Option<&'a str>,
}

/// The guest hardware the image is made for (see the image contract): root
/// disk first virtio-blk, seed second (read-only), one virtio-net NIC,
/// virtio-rng, serial console, no graphics. TCG: nested KVM does not work on
/// these machines. QEMU's default CPU model: `-cpu max` was not faster under
/// TCG (and gives the guest 5-level paging).
pub fn qemu_args(a: &QemuArgs) -> Vec<String> {
    let hostfwd: String = a
        .hostfwd
        .iter()
        .map(|(host, guest)| format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"))
        .collect();
    let mut args: Vec<String> = vec![
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        "tcg".into(),
        "-m".into(),
        a.memory_mib.to_string(),
        "-smp".into(),
        a.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-kernel".into(),
        a.image.kernel.display().to_string(),
        "-initrd".into(),
        a.image.initrd.display().to_string(),
        "-append".into(),
        webhoster::vmm::cmdline::guest_append(image::KERNEL_CMDLINE, webhoster::vmm::AccelChoice::Tcg),
        "-drive".into(),
        format!("file={},if=virtio,format=qcow2", a.disk.display()),
        "-drive".into(),
        format!("file={},if=virtio,format=raw,readonly=on", a.seed.display()),
        "-netdev".into(),
        format!("user,id=net0,restrict=on{hostfwd}"),
        "-device".into(),
        match a.mac {
            Some(mac) => format!("virtio-net-pci,netdev=net0,mac={mac}"),
            None => "virtio-net-pci,netdev=net0".into(),
        },
        "-device".into(),
        "virtio-rng-pci".into(),
        "-serial".into(),
        format!("file:{}", a.serial.display()),
    ];
    args.shrink_to_fit();
    args
}

/// The host keys the SSH server on `host:port` offers, each as
/// `"<type> <base64>"`, sorted (from `ssh-keyscan`; empty when it answers
/// none).
pub fn ssh_host_keys(host: &str, port: u16) -> Vec<String> {
    let out = Command::new("ssh-keyscan")
        .args(["-T", "10", "-p", &port.to_string(), host])
        .stdin(Stdio::null())
        .output()
        .expect("ssh-keyscan (Debian package openssh-client)");
    let mut keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace().skip(1);
            Some(format!("{} {}", fields.next()?, fields.next()?))
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Connects to `addr` and reads the SSH server's identification line
/// (`SSH-2.0-...`); an error when nothing answers within `timeout` or the
/// answer is not an SSH banner.
pub fn ssh_banner(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf)?;
    let line = String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    if line.starts_with("SSH-2.0-") {
        Ok(line)
    } else {
        Err(std::io::Error::other(format!("not an SSH banner: {line:?}")))
    }
}

/// A real Debian guest for the engine tests: writes its NoCloud seed (user
/// `ubuntu` with `key`, QEMU user networking's static address) into the VM's
/// directory and returns a `small`-plan spec with the guest's HTTP and SSH
/// forwarded to `127.0.0.1:http_port` and `:ssh_port`.
pub async fn user_net_spec(
    engine: &webhoster::vmm::Engine,
    image: &Image,
    vm_id: &str,
    name: &str,
    key: &TestKey,
    (http_port, ssh_port): (u16, u16),
) -> webhoster::vmm::VmSpec {
    use webhoster::vmm::{Plan, VmNet, VmSpec};
    let dir = engine.vm_dir(vm_id);
    std::fs::create_dir_all(dir.root()).unwrap();
    webhoster::seed::write(
        &webhoster::seed::SeedSpec {
            instance_id: vm_id.to_owned(),
            hostname: name.into(),
            user: "ubuntu".into(),
            ssh_keys: vec![webhoster::auth::SshPublicKey::parse(key.public_line()).unwrap()],
            owner: name.into(),
            network: Some(webhoster::seed::StaticNetwork {
                mac: webhoster::vmm::cmdline::USER_NET_MAC.into(),
                address: "10.0.2.15/24".parse().unwrap(),
                gateway: "10.0.2.2".parse().unwrap(),
            }),
        },
        &dir.seed_iso(),
    )
    .await
    .unwrap();
    VmSpec {
        vm_id: vm_id.to_owned(),
        plan: Plan::load("small").unwrap(),
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        base_disk: image.disk.clone(),
        append: image::KERNEL_CMDLINE.into(),
        seed_iso: dir.seed_iso(),
        net: VmNet::User {
            hostfwd: vec![
                (SocketAddr::from(([127, 0, 0, 1], http_port)), 80),
                (SocketAddr::from(([127, 0, 0, 1], ssh_port)), 22),
            ],
        },
        labels: Default::default(),
        restore: None,
    }
}

/// PID 1's own journal lines of this boot. They say when it started,
/// stopped or reloaded each unit; the ones it logged before journald ran
/// (sshd and nginx start before it) carry no unit field, so a
/// `journalctl -u` filter misses them. Needs root (or the adm group).
pub const PID1_JOURNAL: &str = "journalctl -b -o cat --no-pager -t systemd";

/// How often PID 1 says it `verb`ed `unit` ("Started", "Stopping",
/// "Reloading") in `pid1_journal` (the output of [`PID1_JOURNAL`]).
pub fn unit_events(pid1_journal: &str, verb: &str, unit: &str) -> usize {
    let prefix = format!("{verb} {unit} ");
    pid1_journal.lines().filter(|l| l.starts_with(&prefix)).count()
}
