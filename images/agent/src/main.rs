//! webhoster-seed-agent: applies a NoCloud seed in the guest without Python.
//!
//! Runs early at every boot (`webhoster-seed.service`, before udev's
//! coldplug, networkd, sshd, nginx and cloud-init). It reads the `cidata`
//! ISO and, for a seed within the subset it knows (users, write_files,
//! hostname, ssh_pwauth, network-config v1/v2, bootcmd, runcmd), applies it
//! on the instance's first boot, and sets a static network at once. Any
//! other seed is left to the real cloud-init, which stays installed: the
//! agent starts its units (the image masks its generator), and they run as
//! they always did.
//!
//! Per instance, like cloud-init: the instance-id it applied is kept in
//! `/var/lib/webhoster-seed/instance`; later boots of the same instance run
//! only `bootcmd` (which cloud-init also runs at every boot).
//!
//! Snapshot templates and clones: `--template-prep`, `--warm-up` and
//! `--clone` (see `clone.rs`).

mod apply;
mod clone;
mod dbus;
mod dhcp;
mod live;
mod network;
mod seed;
mod sources;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::Instant;

use network::Network;
use seed::{Handover, Plan, SeedFiles};

/// Where the instance the agent last saw is kept: `<instance-id>\t<by>`,
/// `by` being `agent` or `cloud-init`.
const STATE: &str = "/var/lib/webhoster-seed/instance";
/// Flags for this boot's units (tmpfs: gone at the next boot).
const RUN_DIR: &str = "/run/webhoster-seed";
/// The per-instance runcmd script, run by webhoster-seed-runcmd.service.
const RUNCMD: &str = "/var/lib/webhoster-seed/runcmd";

/// Milliseconds per step, for the journal line (the agent is on the boot's
/// critical path: every step should show up if it grows).
#[derive(Default)]
struct Steps {
    last: Option<Instant>,
    done: Vec<(&'static str, f64)>,
}

impl Steps {
    fn step(&mut self, name: &'static str) {
        let now = Instant::now();
        if let Some(last) = self.last {
            self.done.push((name, (now - last).as_secs_f64() * 1000.0));
        }
        self.last = Some(now);
    }

    fn summary(&self) -> String {
        let parts: Vec<String> = self.done.iter().map(|(n, ms)| format!("{n} {ms:.0}")).collect();
        parts.join(", ")
    }
}

fn log(msg: impl AsRef<str>) {
    // stdout goes to the journal and the console (the unit says so: the
    // console is what `GET /host/my/console` shows); one line per event.
    println!("webhoster-seed-agent: {}", msg.as_ref());
}

/// What this boot did, for the caller and the tests.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// First boot of an instance: applied. Errors of single items.
    Applied(Vec<String>),
    /// A later boot of an instance the agent applied.
    AlreadyApplied,
    /// A seed the agent does not cover: cloud-init's.
    HandedOver(String),
    /// No `cidata` ISO: cloud-init's, if a datasource of another kind applies.
    NoSeed,
}

/// What the agent was asked to do.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// At boot (the unit): apply a new instance's seed, or hand it over.
    Boot,
    /// In the template VM, just before the host saves it.
    TemplatePrep,
    /// In a restored clone waiting in the pool: rehearse a claim.
    WarmUp,
    /// In a restored clone: become the instance of the seed now attached.
    Clone,
}

struct Options {
    root: PathBuf,
    /// Read the seed from this directory instead of the `cidata` device.
    seed_dir: Option<PathBuf>,
    /// Act on the running system (hostname syscall, host keys, commands).
    live: bool,
    /// `--clone`: how far the host found the clock behind (nanoseconds,
    /// negative when ahead). Relative, so it lands right however late this
    /// process started.
    clock_shift_ns: i64,
}

fn main() {
    let started = Instant::now();
    let mut args = std::env::args().skip(1);
    let mut opts = Options {
        root: PathBuf::from("/"),
        seed_dir: None,
        live: true,
        clock_shift_ns: 0,
    };
    let mut mode = Mode::Boot;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--source-hash" => {
                println!("{}", sources::hash());
                return;
            }
            "--root" => {
                opts.root = args.next().map(PathBuf::from).unwrap_or_else(|| usage());
                opts.live = false;
            }
            "--seed-dir" => opts.seed_dir = Some(args.next().map(PathBuf::from).unwrap_or_else(|| usage())),
            "--template-prep" => mode = Mode::TemplatePrep,
            "--clone" => mode = Mode::Clone,
            "--warm-up" => mode = Mode::WarmUp,
            "--clock-shift-ns" => {
                opts.clock_shift_ns = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage());
            }
            _ => usage(),
        }
    }
    let mut steps = Steps::default();
    steps.step("start");
    if mode != Mode::Boot {
        clone_main(mode, &opts, &mut steps, started);
        return;
    }
    let outcome = run(&opts, &mut steps);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    log(format!("steps (ms): {}", steps.summary()));
    match outcome {
        Ok(Outcome::Applied(errors)) if errors.is_empty() => log(format!("applied the seed in {ms:.0} ms")),
        Ok(Outcome::Applied(errors)) => {
            for e in &errors {
                log(format!("error: {e}"));
            }
            log(format!(
                "applied the seed with {} errors in {ms:.0} ms",
                errors.len()
            ));
            std::process::exit(1);
        }
        Ok(Outcome::AlreadyApplied) => log(format!("instance already applied; boot work done in {ms:.0} ms")),
        Ok(Outcome::HandedOver(why)) => {
            log(format!(
                "handing the seed over to cloud-init ({why}) after {ms:.0} ms"
            ));
            start_cloud_init(&opts, true);
        }
        Ok(Outcome::NoSeed) => {
            log(format!("no cidata ISO found after {ms:.0} ms"));
            start_cloud_init(&opts, false);
        }
        Err(e) => {
            // Nothing was marked applied: cloud-init's, as for any seed
            // the agent does not apply.
            log(format!("error: {e}; cloud-init applies the seed"));
            start_cloud_init(&opts, false);
            std::process::exit(1);
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: webhoster-seed-agent [--source-hash] [--template-prep | --warm-up | --clone [--clock-shift-ns N]] [--root DIR] [--seed-dir DIR]"
    );
    std::process::exit(2);
}

/// `--template-prep`, `--warm-up` and `--clone`: run by the host through the guest
/// agent, which shows it stdout and the exit status (0: done).
fn clone_main(mode: Mode, opts: &Options, steps: &mut Steps, started: Instant) {
    let what = match mode {
        Mode::Clone => "clone",
        Mode::WarmUp => "warm-up",
        _ => "template-prep",
    };
    let result = match mode {
        Mode::Clone => clone::read_entropy(std::io::stdin().lock())
            .and_then(|entropy| clone::personalise(opts, &entropy, steps)),
        Mode::WarmUp => clone::read_entropy(std::io::stdin().lock())
            .and_then(|entropy| clone::warm_up(opts, &entropy, steps))
            .map(|()| Vec::new()),
        _ => clone::template_prep(opts, steps).map(|()| Vec::new()),
    };
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    log(format!("{what} steps (ms): {}", steps.summary()));
    match result {
        Ok(errors) if errors.is_empty() => log(format!("{what} done in {ms:.0} ms")),
        Ok(errors) => {
            for e in &errors {
                log(format!("error: {e}"));
            }
            log(format!("{what} done with {} errors in {ms:.0} ms", errors.len()));
            std::process::exit(1);
        }
        Err(e) => {
            log(format!("{what} failed after {ms:.0} ms: {e}"));
            std::process::exit(1);
        }
    }
}

fn run(opts: &Options, steps: &mut Steps) -> Result<Outcome, String> {
    let root = &opts.root;
    let run_dir = apply::at(root, RUN_DIR);
    fs::create_dir_all(&run_dir).map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let files = match &opts.seed_dir {
        Some(dir) => read_seed_dir(dir)?,
        None => {
            let dev = find_seed_device()?;
            steps.step("find");
            match dev {
                Some(dev) => mount_and_read(&dev, &run_dir.join("mnt"))?,
                None => return Ok(Outcome::NoSeed),
            }
        }
    };
    steps.step("read");
    let state = apply::at(root, STATE);
    let previous = fs::read_to_string(&state).unwrap_or_default();
    let previous = previous.trim_end().split_once('\t');
    let plan = seed::plan(&files);
    steps.step("parse");
    let plan = match plan {
        Ok(plan) => plan,
        Err(Handover(why)) => {
            let id = instance_id(&files.meta_data);
            write_state(root, &id, "cloud-init")?;
            return Ok(Outcome::HandedOver(why));
        }
    };
    let applied_flag = run_dir.join("applied");
    if previous == Some((plan.instance_id.as_str(), "agent")) {
        bootcmd(opts, &plan)?;
        mark(&applied_flag)?;
        if plan.network.is_static() {
            mark(&run_dir.join("static-network"))?;
        }
        network_now(opts, &plan, steps);
        return Ok(Outcome::AlreadyApplied);
    }
    let errors = first_boot(opts, &plan, steps)?;
    write_state(root, &plan.instance_id, "agent")?;
    mark(&applied_flag)?;
    network_now(opts, &plan, steps);
    Ok(Outcome::Applied(errors))
}

/// The network is set now, so the VM answers as soon as sshd and nginx
/// listen rather than once networkd has started (seconds later under TCG):
/// a static network of webhoster's kind by ioctls, a seed without
/// network-config by one DHCP exchange. networkd then finds it as its files
/// say. A failure here only costs that time.
fn network_now(opts: &Options, plan: &Plan, steps: &mut Steps) {
    if !opts.live {
        return;
    }
    if plan.network == Network::Fallback {
        match live::dhcp_at_boot(&opts.root) {
            Ok(Some((ifname, lease))) => {
                steps.step("dhcp");
                log(format!(
                    "{ifname}: {}/{} from DHCP server {}",
                    lease.address, lease.prefix, lease.server
                ));
            }
            Ok(None) => {}
            Err(e) => log(format!("error: {e}; networkd takes a lease when it starts")),
        }
        return;
    }
    match live::network_at_boot(&plan.network) {
        Ok(true) => steps.step("network"),
        Ok(false) => {}
        Err(e) => log(format!("error: {e}; networkd sets the network when it starts")),
    }
}

/// cloud-init's units are in no boot of the image (its generator is
/// masked): for a seed the agent leaves to it, the agent starts them, as the
/// generator would have enabled them. They wait for this unit to end.
/// Without a cidata ISO, cloud-init's own ds-identify decides whether any
/// other NoCloud source (kernel command line, SMBIOS, seed directory) is
/// there, as the generator did.
fn start_cloud_init(opts: &Options, seed_found: bool) {
    if !opts.live {
        return;
    }
    // As the generator decides: `cloud-init=` on the kernel command line
    // (its last one), else the file.
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let word = cmdline
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("cloud-init="));
    let disabled = match word {
        Some("disabled") => true,
        Some("enabled") => false,
        _ => Path::new("/etc/cloud/cloud-init.disabled").exists(),
    };
    if disabled {
        log("cloud-init is disabled on this system: not starting it");
        return;
    }
    if !seed_found {
        let found = Process::new("/usr/lib/cloud-init/ds-identify")
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            log("ds-identify found no datasource: cloud-init stays off");
            return;
        }
    }
    match Process::new("/bin/systemctl")
        .args(["start", "--no-block", "cloud-init.target"])
        .status()
    {
        Ok(s) if s.success() => log("started cloud-init.target"),
        Ok(s) => log(format!("error: starting cloud-init.target: systemctl {s}")),
        Err(e) => log(format!("error: starting cloud-init.target: {e}")),
    }
}

fn first_boot(opts: &Options, plan: &Plan, steps: &mut Steps) -> Result<Vec<String>, String> {
    let root = &opts.root;
    let run_dir = apply::at(root, RUN_DIR);
    bootcmd(opts, plan)?;
    steps.step("bootcmd");
    let mut errors = apply::files(root, plan)?;
    steps.step("apply");
    if opts.live
        && let Some((short, _)) = &plan.hostname
        && let Err(e) = nix::unistd::sethostname(short)
    {
        errors.push(format!("setting the host name: {e}"));
    }
    if let Err(e) = host_keys(root, plan) {
        errors.push(e);
    }
    steps.step("hostkey");
    if let Err(e) = machine_id(root) {
        errors.push(e);
    }
    if plan.network.is_static() {
        mark(&run_dir.join("static-network"))?;
    }
    let script = apply::at(root, RUNCMD);
    if plan.runcmd.is_empty() {
        let _ = fs::remove_file(&script);
    } else {
        apply::write_atomic(&script, apply::runcmd_script(plan).as_bytes(), 0o700)?;
        mark(&run_dir.join("runcmd"))?;
    }
    Ok(errors)
}

fn mark(flag: &Path) -> Result<(), String> {
    fs::write(flag, b"").map_err(|e| format!("writing {}: {e}", flag.display()))
}

fn write_state(root: &Path, id: &str, by: &str) -> Result<(), String> {
    apply::write_atomic(&apply::at(root, STATE), format!("{id}\t{by}\n").as_bytes(), 0o644)
}

/// The instance-id of meta-data that may not parse as the agent wants.
fn instance_id(meta: &str) -> String {
    meta.lines()
        .find_map(|l| l.strip_prefix("instance-id:"))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_owned())
        .unwrap_or_default()
}

/// `bootcmd` runs at every boot, as cloud-init runs it, with INSTANCE_ID set.
fn bootcmd(opts: &Options, plan: &Plan) -> Result<(), String> {
    if plan.bootcmd.is_empty() || !opts.live {
        return Ok(());
    }
    let script: Vec<String> = plan.bootcmd.iter().map(seed::Command::script_line).collect();
    let status = Process::new("/bin/sh")
        .arg("-c")
        .arg(script.join("\n"))
        .env("INSTANCE_ID", &plan.instance_id)
        .status()
        .map_err(|e| format!("running bootcmd: {e}"))?;
    if !status.success() {
        // cloud-init reports a failed bootcmd and carries on.
        log(format!("bootcmd failed: {status}"));
    }
    Ok(())
}

/// A fresh ed25519 host key per instance (the image has none; an earlier
/// instance's keys are replaced, as cloud-init's ssh_deletekeys does).
/// Made here rather than by ssh-keygen: one process start less under TCG.
fn host_keys(root: &Path, plan: &Plan) -> Result<(), String> {
    use ssh_key::{LineEnding, PrivateKey, private::Ed25519Keypair};
    let dir = apply::at(root, "/etc/ssh");
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("ssh_host_") && (name.ends_with("_key") || name.ends_with("_key.pub")) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let mut seed = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let host = plan
        .hostname
        .as_ref()
        .map_or("localhost", |(short, _)| short.as_str());
    key.set_comment(format!("root@{host}"));
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| format!("encoding the host key: {e}"))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| format!("encoding the host key: {e}"))?;
    let path = dir.join("ssh_host_ed25519_key");
    apply::write_atomic(&path, private.as_bytes(), 0o600)?;
    apply::write_atomic(
        &path.with_extension("pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )
}

/// /etc/machine-id when empty or missing (systemd normally made it already).
fn machine_id(root: &Path) -> Result<(), String> {
    let path = apply::at(root, "/etc/machine-id");
    if fs::read_to_string(&path).is_ok_and(|s| s.trim().len() == 32) {
        return Ok(());
    }
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let id = hex::encode(bytes);
    apply::write_atomic(&path, format!("{id}\n").as_bytes(), 0o444)
}

fn read_seed_dir(dir: &Path) -> Result<SeedFiles, String> {
    let opt = |name: &str| fs::read(dir.join(name)).ok();
    let meta = dir.join("meta-data");
    Ok(SeedFiles {
        meta_data: fs::read_to_string(&meta).map_err(|e| format!("reading {}: {e}", meta.display()))?,
        user_data: opt("user-data"),
        network_config: opt("network-config").map(|b| String::from_utf8_lossy(&b).into_owned()),
        vendor_data: opt("vendor-data"),
    })
}

/// The first block device holding an ISO 9660 volume labelled `cidata`
/// (any case). The root disk's and the seed's drivers are in the initrd,
/// so the devices exist before udev runs.
fn find_seed_device() -> Result<Option<PathBuf>, String> {
    let mut names: Vec<String> = fs::read_dir("/sys/block")
        .map_err(|e| format!("reading /sys/block: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vd") || n.starts_with("sr") || n.starts_with("sd"))
        .collect();
    names.sort();
    for name in names {
        let dev = PathBuf::from("/dev").join(&name);
        if is_cidata_iso(&dev) {
            return Ok(Some(dev));
        }
    }
    Ok(None)
}

fn is_cidata_iso(dev: &Path) -> bool {
    let mut pvd = [0u8; 72];
    let read = fs::File::open(dev).and_then(|mut f| {
        f.seek(SeekFrom::Start(16 * 2048))?;
        f.read_exact(&mut pvd)
    });
    read.is_ok()
        && &pvd[..6] == b"\x01CD001"
        && String::from_utf8_lossy(&pvd[40..72])
            .trim()
            .eq_ignore_ascii_case("cidata")
}

fn mount_and_read(dev: &Path, mnt: &Path) -> Result<SeedFiles, String> {
    fs::create_dir_all(mnt).map_err(|e| format!("creating {}: {e}", mnt.display()))?;
    // In a mount namespace of its own: systemd re-reads the whole mount
    // table at every mount and umount it sees, which cost PID 1 0.3-0.5 s
    // of a TCG guest's CPU per seed read, while a claim waited. A thread of
    // its own: the rest of the agent stays where later mounts are seen.
    let (dev, at) = (dev.to_owned(), mnt.to_owned());
    let files = std::thread::spawn(move || {
        private_mounts()?;
        mount_read_umount(&dev, &at)
    })
    .join()
    .map_err(|_| "the seed reader panicked".to_owned())?;
    let _ = fs::remove_dir(mnt);
    files
}

/// This thread in a new mount namespace whose mounts stay in it.
fn private_mounts() -> Result<(), String> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("a mount namespace for the seed: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making the seed's mounts private: {e}"))
}

fn mount_read_umount(dev: &Path, mnt: &Path) -> Result<SeedFiles, String> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let try_mount = || mount(Some(dev), mnt, Some("iso9660"), flags, None::<&str>);
    // iso9660 is a module in Debian's cloud kernel; the image's initrd loads
    // it, so modprobe (a process start) is only the fallback.
    let mounted = match try_mount() {
        Err(nix::errno::Errno::ENODEV) => {
            let _ = Process::new("/sbin/modprobe").args(["-q", "isofs"]).status();
            try_mount()
        }
        other => other,
    };
    mounted.map_err(|e| format!("mounting {}: {e}", dev.display()))?;
    let files = read_seed_dir(mnt);
    let _ = umount2(mnt, MntFlags::MNT_DETACH);
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_and_seed(user_data: &str, id: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for (p, s) in [
            ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
            ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
            ("etc/group", "root:x:0:\n"),
            ("etc/gshadow", "root:*::\n"),
            ("etc/machine-id", ""),
        ] {
            fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            fs::write(r.join(p), s).unwrap();
        }
        let seed = r.join("seed");
        fs::create_dir_all(&seed).unwrap();
        fs::write(seed.join("meta-data"), format!("instance-id: {id}\n")).unwrap();
        fs::write(seed.join("user-data"), user_data).unwrap();
        (d, seed)
    }

    fn opts(root: &Path, seed: &Path) -> Options {
        Options {
            root: root.to_owned(),
            seed_dir: Some(seed.to_owned()),
            live: false,
            clock_shift_ns: 0,
        }
    }

    #[test]
    fn applies_once_per_instance() {
        let ud = "#cloud-config\nusers: [bob]\nwrite_files: [{path: /srv/page, content: first}]\nruncmd: [touch /x]\n";
        let (d, seed) = root_and_seed(ud, "iid-a");
        let r = d.path();
        let o = opts(r, &seed);
        assert_eq!(run(&o, &mut Steps::default()).unwrap(), Outcome::Applied(vec![]));
        assert_eq!(
            fs::read_to_string(r.join("var/lib/webhoster-seed/instance")).unwrap(),
            "iid-a\tagent\n"
        );
        assert!(r.join("run/webhoster-seed/applied").exists());
        assert!(r.join("run/webhoster-seed/runcmd").exists());
        assert!(!r.join("run/webhoster-seed/static-network").exists());
        assert!(
            fs::read_to_string(r.join("var/lib/webhoster-seed/runcmd"))
                .unwrap()
                .ends_with("\ntouch /x\n")
        );
        assert_eq!(
            fs::read_to_string(r.join("etc/machine-id")).unwrap().trim().len(),
            32
        );
        let host_key = fs::read_to_string(r.join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
        assert!(host_key.starts_with("ssh-ed25519 "), "{host_key}");
        let private = fs::metadata(r.join("etc/ssh/ssh_host_ed25519_key")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&private.permissions()) & 0o777,
            0o600
        );

        // A reboot: the user's own change to the file stays.
        fs::remove_dir_all(r.join("run")).unwrap();
        fs::write(r.join("srv/page"), "edited").unwrap();
        assert_eq!(run(&o, &mut Steps::default()).unwrap(), Outcome::AlreadyApplied);
        assert_eq!(fs::read_to_string(r.join("srv/page")).unwrap(), "edited");
        assert_eq!(
            fs::read_to_string(r.join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap(),
            host_key
        );
        assert!(r.join("run/webhoster-seed/applied").exists());
        assert!(
            !r.join("run/webhoster-seed/runcmd").exists(),
            "runcmd is per instance"
        );

        // A new instance-id: applied again.
        fs::write(seed.join("meta-data"), "instance-id: iid-b\n").unwrap();
        assert_eq!(run(&o, &mut Steps::default()).unwrap(), Outcome::Applied(vec![]));
        assert_eq!(fs::read_to_string(r.join("srv/page")).unwrap(), "first");
        assert_ne!(
            fs::read_to_string(r.join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap(),
            host_key
        );
    }

    #[test]
    fn other_seeds_are_handed_over_and_cloud_init_is_not_told_to_stand_down() {
        let (d, seed) = root_and_seed("#cloud-config\nusers: [bob]\npackages: []\n", "iid-h");
        let r = d.path();
        let out = run(&opts(r, &seed), &mut Steps::default()).unwrap();
        assert!(
            matches!(out, Outcome::HandedOver(ref why) if why.contains("packages")),
            "{out:?}"
        );
        assert!(!r.join("run/webhoster-seed/applied").exists());
        assert_eq!(
            fs::read_to_string(r.join("var/lib/webhoster-seed/instance")).unwrap(),
            "iid-h\tcloud-init\n"
        );
        assert!(!fs::read_to_string(r.join("etc/passwd")).unwrap().contains("bob"));
    }

    #[test]
    fn a_static_network_is_flagged() {
        let (d, seed) = root_and_seed("#cloud-config\nusers: [bob]\n", "iid-s");
        fs::write(
            seed.join("network-config"),
            include_str!("testdata/webhoster-network-config.yaml"),
        )
        .unwrap();
        let r = d.path();
        assert_eq!(
            run(&opts(r, &seed), &mut Steps::default()).unwrap(),
            Outcome::Applied(vec![])
        );
        assert!(r.join("run/webhoster-seed/static-network").exists());
        assert!(r.join("etc/systemd/network/10-webhoster-eth0.link").exists());
    }

    #[test]
    fn cidata_label_is_read_from_the_volume_descriptor() {
        let d = tempfile::tempdir().unwrap();
        let iso = d.path().join("x.iso");
        let mut img = vec![0u8; 17 * 2048];
        img[16 * 2048..16 * 2048 + 6].copy_from_slice(b"\x01CD001");
        let label = b"CIDATA                          ";
        img[16 * 2048 + 40..16 * 2048 + 72].copy_from_slice(label);
        fs::write(&iso, &img).unwrap();
        assert!(is_cidata_iso(&iso));
        img[16 * 2048 + 40] = b'X';
        fs::write(&iso, &img).unwrap();
        assert!(!is_cidata_iso(&iso));
        assert_eq!(instance_id("instance-id: 'iid-x'\n"), "iid-x");
    }

    /// What the seed reader's thread mounts, the rest of the agent (and PID
    /// 1, which shares its namespace) never sees. Needs root, as the agent.
    #[test]
    fn the_seed_readers_mounts_stay_in_its_thread() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().to_owned();
        fn listed(table: &str, at: &Path) -> bool {
            fs::read_to_string(table).unwrap().contains(at.to_str().unwrap())
        }
        let inside = std::thread::spawn({
            let at = at.clone();
            move || {
                private_mounts().unwrap();
                let flags = nix::mount::MsFlags::empty();
                nix::mount::mount(Some("tmpfs"), &at, Some("tmpfs"), flags, None::<&str>).unwrap();
                fs::write(at.join("x"), b"x").unwrap();
                listed("/proc/thread-self/mountinfo", &at)
            }
        })
        .join()
        .unwrap();
        assert!(inside, "the thread sees its own mount");
        assert!(
            !listed("/proc/self/mountinfo", &at),
            "the process's namespace got the mount"
        );
        assert!(
            !at.join("x").exists(),
            "the file went to the tmpfs, gone with its namespace"
        );
    }
}
