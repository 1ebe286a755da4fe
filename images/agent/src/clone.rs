//! The agent in a snapshot template and its clones.
//!
//! `--template-prep` runs once in the template VM just before the host saves
//! it: nothing of the template's own instance that a clone must not inherit
//! stays (the random seed file, the placeholder login keys, the seed
//! device's cached blocks).
//!
//! `--warm-up` runs in a restored clone while it waits in the pool: it
//! rehearses a claim, so that the claim itself runs translated code.
//!
//! `--clone` runs in a restored clone, started by the host through the guest
//! agent (`guest-exec`, root) with 64 bytes of host entropy on stdin. The
//! clone woke up as the template; the host has written the user's seed into
//! the seed drive's file in place. The agent applies that seed as the first
//! boot of its instance, on the live system: entropy first, then the seed's
//! files and users, a new identity (host key, machine-id, hostname), sshd and
//! the network switched over now, the instance recorded, all synced.

use std::fs;
use std::io::Read;
use std::path::Path;

use crate::seed::{self, Handover, Plan, SeedFiles};
use crate::{Options, RUN_DIR, STATE, Steps, apply, live};

/// Less than this on stdin is not the host's entropy (a clone would go on
/// with the template's random state where vmgenid does not reseed).
const MIN_ENTROPY: usize = 32;

/// The seed: from `--seed-dir`, or the `cidata` device with its buffers
/// dropped first (its file was rewritten behind the guest's cache).
fn read_seed(opts: &Options) -> Result<SeedFiles, String> {
    if let Some(dir) = &opts.seed_dir {
        return crate::read_seed_dir(dir);
    }
    let dev = crate::find_seed_device()?.ok_or("no cidata ISO found")?;
    live::flush_buffers(&dev)?;
    crate::mount_and_read(&dev, &apply::at(&opts.root, RUN_DIR).join("mnt"))
}

/// The login keys of these users' accounts removed (a clone's users get
/// exactly its seed's keys; nothing of the template's placeholder stays).
fn remove_keys(root: &Path, users: &[seed::User]) -> Result<(), String> {
    let accounts = apply::Accounts::load(root)?;
    for u in users {
        let home = accounts
            .users
            .iter()
            .find(|x| x.0 == u.name)
            .map(|x| x.3.clone())
            .or_else(|| u.homedir.clone())
            .unwrap_or_else(|| format!("/home/{}", u.name));
        let keys = apply::at(root, &home).join(".ssh/authorized_keys");
        match fs::remove_file(&keys) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", keys.display())),
        }
    }
    Ok(())
}

/// `--template-prep`.
pub fn template_prep(opts: &Options, steps: &mut Steps) -> Result<(), String> {
    let root = &opts.root;
    // systemd-random-seed would credit the same file to every clone's pool
    // at its next boot.
    let random_seed = apply::at(root, "/var/lib/systemd/random-seed");
    match fs::remove_file(&random_seed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing {}: {e}", random_seed.display())),
    }
    let files = match &opts.seed_dir {
        Some(dir) => crate::read_seed_dir(dir)?,
        None => {
            let dev = crate::find_seed_device()?.ok_or("no cidata ISO found")?;
            let files = crate::mount_and_read(&dev, &apply::at(root, RUN_DIR).join("mnt"))?;
            // Nothing of the template's seed stays cached for the clones.
            live::flush_buffers(&dev)?;
            files
        }
    };
    let plan =
        seed::plan(&files).map_err(|Handover(why)| format!("the template's seed needs cloud-init: {why}"))?;
    remove_keys(root, &plan.users)?;
    steps.step("seed");
    // Synced, and the page cache kept: the clones map this RAM
    // copy-on-write, so what it caches (the agent, sshd, their libraries)
    // costs them nothing, while reading it again from disk under TCG would
    // cost each clone's first create.
    live::sync();
    steps.step("sync");
    Ok(())
}

/// A warm-up's scratch root: on the root filesystem, where a claim writes.
const REHEARSAL_DIR: &str = "/var/lib/webhoster-seed/rehearsal";

/// Account databases a rehearsal's scratch root starts from.
const ACCOUNT_FILES: [&str; 4] = ["/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow"];

/// `--warm-up`: in a restored clone before any create claims it, with host
/// entropy on stdin. Under TCG each QEMU translates guest code anew, so the
/// first run of a path costs several times the later ones. The clone runs
/// now, at the pool's leisure, what its claim will run: the seed read from
/// its device (the host wrote a rehearsal seed there), the seed applied to a
/// scratch copy of the accounts, written and synced to the root filesystem
/// as the claim's files will be (run cold, ext4's and the disk's write
/// paths cost a claim's first step 70 ms; the scratch goes after, and
/// nothing of the live system changes but the kernel's random state), and
/// one request to each door, nginx's and sshd's. The host pauses the clone
/// after; its translations stay.
pub fn warm_up(opts: &Options, entropy: &[u8], steps: &mut Steps) -> Result<(), String> {
    if opts.live {
        live::add_entropy(entropy)?;
    }
    steps.step("entropy");
    let files = read_seed(opts)?;
    steps.step("seed");
    let plan =
        seed::plan(&files).map_err(|Handover(why)| format!("the rehearsal seed needs cloud-init: {why}"))?;
    let scratch = apply::at(&opts.root, REHEARSAL_DIR);
    let rehearsed = rehearse(&opts.root, &scratch, &plan, steps);
    if opts.live {
        live::sync();
    }
    // Gone whatever happened: a claim must find nothing of it.
    let _ = fs::remove_dir_all(&scratch);
    rehearsed?;
    steps.step("rehearsal");
    if opts.live {
        live::knock_doors()?;
        steps.step("doors");
    }
    Ok(())
}

/// `plan` applied as a first boot to `scratch`, a root holding a copy of
/// `root`'s account files.
fn rehearse(root: &Path, scratch: &Path, plan: &Plan, steps: &mut Steps) -> Result<(), String> {
    let _ = fs::remove_dir_all(scratch);
    let scratch_run = apply::at(scratch, RUN_DIR);
    fs::create_dir_all(&scratch_run).map_err(|e| format!("creating {}: {e}", scratch_run.display()))?;
    for file in ACCOUNT_FILES {
        let to = apply::at(scratch, file);
        fs::create_dir_all(to.parent().unwrap_or(scratch))
            .and_then(|()| fs::copy(apply::at(root, file), &to))
            .map_err(|e| format!("copying {file} for the rehearsal: {e}"))?;
    }
    let rehearsal = Options {
        root: scratch.to_owned(),
        seed_dir: None,
        live: false,
        clock_shift_ns: 0,
    };
    remove_keys(scratch, &plan.users)?;
    let errors = crate::first_boot(&rehearsal, plan, steps)?;
    crate::write_state(scratch, &plan.instance_id, "agent")?;
    match errors.first() {
        Some(e) => Err(format!("the rehearsal failed: {e}")),
        None => Ok(()),
    }
}

/// Reads the host's entropy (stdin, to its end).
pub fn read_entropy(mut input: impl Read) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    input
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the host's entropy from stdin: {e}"))?;
    if bytes.len() < MIN_ENTROPY {
        return Err(format!(
            "{} bytes of entropy on stdin, {MIN_ENTROPY} at least wanted",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// `--clone`: the errors of single items (the rest was applied), or why
/// nothing could be.
pub fn personalise(opts: &Options, entropy: &[u8], steps: &mut Steps) -> Result<Vec<String>, String> {
    let root = &opts.root;
    // Before anything reads a random byte: the host key, the machine-id.
    if opts.live {
        live::add_entropy(entropy)?;
    }
    steps.step("entropy");
    // Before anything is written: files get the real time.
    if opts.live && opts.clock_shift_ns != 0 {
        live::shift_clock(opts.clock_shift_ns)?;
        steps.step("clock");
    }
    let files = read_seed(opts)?;
    steps.step("seed");
    let plan: Plan = seed::plan(&files).map_err(|Handover(why)| {
        format!("the seed needs cloud-init, which a clone cannot hand over to: {why}")
    })?;
    let previous = fs::read_to_string(apply::at(root, STATE)).unwrap_or_default();
    if previous.split('\t').next() == Some(plan.instance_id.as_str()) {
        // The template's own seed (or a stale read of it): not a new instance.
        return Err(format!(
            "the seed's instance-id {} is the one this system already is",
            plan.instance_id
        ));
    }
    remove_keys(root, &plan.users)?;
    // A new machine-id: first_boot makes one for an empty file.
    apply::write_atomic(&apply::at(root, "/etc/machine-id"), b"", 0o444)?;
    let sshd_config = || fs::read(apply::at(root, apply::SSHD_DROP_IN)).ok();
    let sshd_config_before = sshd_config();
    let errors = crate::first_boot(opts, &plan, steps)?;
    crate::write_state(root, &plan.instance_id, "agent")?;
    crate::mark(&apply::at(root, RUN_DIR).join("applied"))?;
    steps.step("state");
    if opts.live {
        // sshd (OpenSSH 9.2) re-executes itself for each connection, and
        // that process reads the host keys from their files: the new key is
        // served without a reload. Its configuration, though, is the one the
        // listener read at its start: a changed drop-in needs the reload.
        let sshd = if sshd_config() != sshd_config_before {
            live::reload_sshd()?
        } else {
            None
        };
        live::apply_network(&plan.network, steps)?;
        if let Some(old) = sshd {
            live::wait_sshd(&old)?;
        }
        steps.step("sshd");
        if !plan.runcmd.is_empty() {
            live::start_runcmd()?;
        }
    }
    // A crash from here on cold-boots as this instance, with its files.
    live::sync();
    steps.step("sync");
    Ok(errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const TEMPLATE_KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlaceholderPlaceholderPlaceholderPlace template";
    const USER_KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ7bOZkVG2yo7dUG5nQF2J4bwWwTfE6ZQY0kK2b7sQp user";

    fn user_data(host: &str, key: &str, page: &str) -> String {
        format!(
            "#cloud-config\nhostname: {host}\nmanage_etc_hosts: true\nusers:\n- name: ubuntu\n  shell: /bin/bash\n  groups: [www-data]\n  sudo: 'ALL=(ALL) NOPASSWD:ALL'\n  ssh_authorized_keys: ['{key}']\nwrite_files:\n- {{path: /var/www/html/index.html, content: '{page}'}}\n"
        )
    }

    fn network(mac: &str, ip: &str) -> String {
        format!(
            "version: 2\nethernets:\n  eth0:\n    match: {{macaddress: '{mac}'}}\n    set-name: eth0\n    addresses: ['{ip}/24']\n    routes: [{{to: 0.0.0.0/0, via: 10.0.0.1}}]\n"
        )
    }

    /// A root that booted as the template (its seed applied), and a seed dir.
    fn template_root() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for (p, s) in [
            ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
            ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
            ("etc/group", "root:x:0:\nwww-data:x:33:\n"),
            ("etc/gshadow", "root:*::\nwww-data:*::\n"),
            ("etc/machine-id", ""),
            ("var/lib/systemd/random-seed", "template's"),
        ] {
            fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            fs::write(r.join(p), s).unwrap();
        }
        let seed = r.join("seed");
        fs::create_dir_all(&seed).unwrap();
        fs::write(seed.join("meta-data"), "instance-id: template-abc\n").unwrap();
        fs::write(
            seed.join("user-data"),
            user_data("template", TEMPLATE_KEY, "template"),
        )
        .unwrap();
        fs::write(
            seed.join("network-config"),
            network("52:54:00:12:34:56", "10.0.2.15"),
        )
        .unwrap();
        let opts = Options {
            root: r.to_owned(),
            seed_dir: Some(seed.clone()),
            live: false,
            clock_shift_ns: 0,
        };
        assert_eq!(
            crate::run(&opts, &mut Steps::default()).unwrap(),
            crate::Outcome::Applied(vec![])
        );
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
    fn template_prep_leaves_no_login_key_and_no_random_seed() {
        let (d, seed) = template_root();
        let r = d.path();
        let keys = r.join("home/ubuntu/.ssh/authorized_keys");
        assert!(fs::read_to_string(&keys).unwrap().contains("template"));
        template_prep(&opts(r, &seed), &mut Steps::default()).unwrap();
        assert!(!keys.exists());
        assert!(!r.join("var/lib/systemd/random-seed").exists());
        // Again (a retried build): nothing left to remove is fine.
        template_prep(&opts(r, &seed), &mut Steps::default()).unwrap();
    }

    #[test]
    fn a_clone_becomes_the_seeds_instance() {
        let (d, seed) = template_root();
        let r = d.path();
        let o = opts(r, &seed);
        template_prep(&o, &mut Steps::default()).unwrap();
        let read = |p: &str| fs::read_to_string(r.join(p)).unwrap();
        let (tpl_host_key, tpl_machine_id) =
            (read("etc/ssh/ssh_host_ed25519_key.pub"), read("etc/machine-id"));
        assert_eq!(tpl_machine_id.trim().len(), 32);

        // The template's own seed is refused: it is not a new instance.
        let entropy = [7u8; 64];
        let err = personalise(&o, &entropy, &mut Steps::default()).unwrap_err();
        assert!(err.contains("template-abc"), "{err}");

        fs::write(seed.join("meta-data"), "instance-id: vm-1\n").unwrap();
        fs::write(seed.join("user-data"), user_data("site-one", USER_KEY, "one")).unwrap();
        fs::write(
            seed.join("network-config"),
            network("52:54:00:aa:bb:01", "10.0.0.5"),
        )
        .unwrap();
        let mut steps = Steps::default();
        steps.step("start");
        assert_eq!(
            personalise(&o, &entropy, &mut steps).unwrap(),
            Vec::<String>::new()
        );
        assert!(steps.summary().contains("entropy"), "{}", steps.summary());
        assert_eq!(read("etc/hostname"), "site-one\n");
        assert!(read("etc/hosts").contains("127.0.1.1 site-one\n"));
        assert_eq!(read("home/ubuntu/.ssh/authorized_keys"), format!("{USER_KEY}\n"));
        assert_eq!(read("var/www/html/index.html"), "one");
        assert_eq!(read("var/lib/webhoster-seed/instance"), "vm-1\tagent\n");
        let machine_id = read("etc/machine-id");
        assert_eq!(machine_id.trim().len(), 32);
        assert_ne!(machine_id, tpl_machine_id);
        assert_ne!(read("etc/ssh/ssh_host_ed25519_key.pub"), tpl_host_key);
        let net = read("etc/systemd/network/10-webhoster-eth0.network");
        assert!(
            net.contains("MACAddress=52:54:00:aa:bb:01") && net.contains("Address=10.0.0.5/24"),
            "{net}"
        );
        assert_eq!(
            read("etc/passwd")
                .lines()
                .filter(|l| l.starts_with("ubuntu:"))
                .count(),
            1
        );

        // A later boot of the clone is a boot of its own instance: nothing redone.
        let host_key = read("etc/ssh/ssh_host_ed25519_key.pub");
        fs::remove_dir_all(r.join("run")).unwrap();
        assert_eq!(
            crate::run(&o, &mut Steps::default()).unwrap(),
            crate::Outcome::AlreadyApplied
        );
        assert_eq!(read("etc/ssh/ssh_host_ed25519_key.pub"), host_key);
        assert_eq!(read("etc/machine-id"), machine_id);
    }

    #[test]
    fn a_warm_up_rehearses_the_seed_and_changes_nothing() {
        let (d, seed) = template_root();
        let r = d.path();
        let o = opts(r, &seed);
        template_prep(&o, &mut Steps::default()).unwrap();
        // Every file of the root but the seed's, with its content.
        let seed_dir = seed.clone();
        let snapshot = move || -> Vec<(PathBuf, Vec<u8>)> {
            let mut files = Vec::new();
            let mut dirs = vec![r.to_owned()];
            while let Some(dir) = dirs.pop() {
                for e in fs::read_dir(&dir).unwrap().flatten() {
                    let path = e.path();
                    if path.is_dir() {
                        dirs.push(path);
                    } else if !path.starts_with(&seed_dir) {
                        files.push((path.clone(), fs::read(&path).unwrap()));
                    }
                }
            }
            files.sort();
            files
        };
        let before = snapshot();
        fs::write(seed.join("meta-data"), "instance-id: warm-up-vm-1\n").unwrap();
        fs::write(seed.join("user-data"), user_data("vm-1", USER_KEY, "rehearsal")).unwrap();
        let mut steps = Steps::default();
        steps.step("start");
        warm_up(&o, &[3u8; 64], &mut steps).unwrap();
        assert!(steps.summary().contains("rehearsal"), "{}", steps.summary());
        let after = snapshot();
        assert_eq!(
            after.iter().map(|f| &f.0).collect::<Vec<_>>(),
            before.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        assert!(after == before, "the warm-up changed a file of the system");

        // A rehearsal seed that only cloud-init could apply is an error.
        fs::write(seed.join("user-data"), "#cloud-config\npackages: [git]\n").unwrap();
        let err = warm_up(&o, &[3u8; 64], &mut Steps::default()).unwrap_err();
        assert!(err.contains("packages"), "{err}");
    }

    #[test]
    fn a_seed_for_cloud_init_fails_the_clone_and_changes_nothing() {
        let (d, seed) = template_root();
        let r = d.path();
        fs::write(seed.join("meta-data"), "instance-id: vm-2\n").unwrap();
        fs::write(
            seed.join("user-data"),
            "#cloud-config\nusers: [bob]\npackages: [git]\n",
        )
        .unwrap();
        let err = personalise(&opts(r, &seed), &[1u8; 64], &mut Steps::default()).unwrap_err();
        assert!(err.contains("packages"), "{err}");
        assert_eq!(
            fs::read_to_string(r.join("var/lib/webhoster-seed/instance")).unwrap(),
            "template-abc\tagent\n"
        );
    }

    #[test]
    fn entropy_must_come_from_the_host() {
        assert!(read_entropy(&[0u8; 8][..]).unwrap_err().contains("8 bytes"));
        assert_eq!(read_entropy(&[5u8; 64][..]).unwrap().len(), 64);
    }
}
