//! Applying a [`Plan`] to a root directory (`/` in the guest, a temp dir in
//! the unit tests). Users and groups are written straight into the passwd,
//! shadow and group files, as useradd would, so no process is started for
//! them (each exec costs tens of ms under TCG). Only what needs the running
//! system (the host name syscall, ssh-keygen, commands) is left to `main`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};

use crate::seed::{Plan, User, WriteFile};

pub type Result<T> = std::result::Result<T, String>;

fn ctx<T, E: std::fmt::Display>(r: std::result::Result<T, E>, what: &str, path: &Path) -> Result<T> {
    r.map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// `root` joined with an absolute guest path.
pub fn at(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Replaces a file atomically (temp file, then rename), with a mode.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        ctx(fs::create_dir_all(dir), "creating", dir)?;
    }
    let tmp = path.with_extension("webhoster-tmp");
    {
        let mut f = ctx(fs::File::create(&tmp), "creating", &tmp)?;
        ctx(f.write_all(content), "writing", &tmp)?;
    }
    ctx(
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)),
        "setting the mode of",
        &tmp,
    )?;
    ctx(fs::rename(&tmp, path), "renaming into", path)
}

/// The passwd and group databases of a root directory.
#[derive(Debug, Default)]
pub struct Accounts {
    /// name, uid, gid, home
    pub users: Vec<(String, u32, u32, String)>,
    /// name, gid, members
    pub groups: Vec<(String, u32, Vec<String>)>,
}

impl Accounts {
    pub fn load(root: &Path) -> Result<Accounts> {
        let mut a = Accounts::default();
        let passwd = at(root, "/etc/passwd");
        for line in ctx(fs::read_to_string(&passwd), "reading", &passwd)?.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 7 {
                a.users.push((
                    f[0].into(),
                    f[2].parse().unwrap_or(0),
                    f[3].parse().unwrap_or(0),
                    f[5].into(),
                ));
            }
        }
        let group = at(root, "/etc/group");
        for line in ctx(fs::read_to_string(&group), "reading", &group)?.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4 {
                let members = f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect();
                a.groups.push((f[0].into(), f[2].parse().unwrap_or(0), members));
            }
        }
        Ok(a)
    }

    pub fn uid(&self, name: &str) -> Option<u32> {
        self.users
            .iter()
            .find(|u| u.0 == name)
            .map(|u| u.1)
            .or_else(|| name.parse().ok())
    }

    pub fn gid(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|g| g.0 == name)
            .map(|g| g.1)
            .or_else(|| name.parse().ok())
    }

    /// `user`, `user:group` or `user.group` as (uid, gid); the user's
    /// primary group when no group is given.
    pub fn owner(&self, owner: &str) -> Result<(u32, u32)> {
        let (u, g) = match owner.split_once([':', '.']) {
            Some((u, g)) => (u, Some(g)),
            None => (owner, None),
        };
        let uid = self.uid(u).ok_or_else(|| format!("no user {u:?}"))?;
        let gid = match g {
            Some(g) => self.gid(g).ok_or_else(|| format!("no group {g:?}"))?,
            None => self.users.iter().find(|x| x.1 == uid).map(|x| x.2).unwrap_or(0),
        };
        Ok((uid, gid))
    }

    /// The next free id in [1000, 60000), as useradd picks it.
    fn next_id(used: impl Iterator<Item = u32>) -> u32 {
        let max = used.filter(|id| (1000..60000).contains(id)).max();
        max.map_or(1000, |m| m + 1)
    }
}

fn days_since_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0)
}

fn append_line(path: &Path, line: &str, mode: u32) -> Result<()> {
    let mut text = fs::read_to_string(path).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
    write_atomic(path, text.as_bytes(), mode)
}

/// Rewrites the lines of a colon-separated file whose first field is in
/// `names`, appending `member` to the member list (field `field`).
fn add_member(path: &Path, names: &[String], field: usize, member: &str, mode: u32) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(()); // no gshadow in the root: nothing to keep in step
    };
    let mut out = String::new();
    for line in text.lines() {
        let mut f: Vec<String> = line.split(':').map(str::to_owned).collect();
        if f.len() > field && names.contains(&f[0]) {
            let mut members: Vec<&str> = f[field].split(',').filter(|m| !m.is_empty()).collect();
            if !members.contains(&member) {
                members.push(member);
            }
            f[field] = members.join(",");
        }
        out.push_str(&f.join(":"));
        out.push('\n');
    }
    write_atomic(path, out.as_bytes(), mode)
}

fn mode_of(path: &Path, default: u32) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(default)
}

fn copy_skel(skel: &Path, home: &Path, uid: u32, gid: u32) -> Result<()> {
    let Ok(entries) = fs::read_dir(skel) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let dest = home.join(e.file_name());
        let ft = e.file_type().map_err(|e| e.to_string())?;
        if ft.is_dir() {
            ctx(fs::create_dir_all(&dest), "creating", &dest)?;
            copy_skel(&e.path(), &dest, uid, gid)?;
        } else if ft.is_file() {
            ctx(fs::copy(e.path(), &dest), "copying to", &dest)?;
        } else {
            continue;
        }
        ctx(chown(&dest, Some(uid), Some(gid)), "chown", &dest)?;
    }
    Ok(())
}

/// Creates or updates one user; its keys, groups and sudo rules.
pub fn user(root: &Path, u: &User) -> Result<()> {
    let mut acc = Accounts::load(root)?;
    let (passwd, shadow, group, gshadow) = (
        at(root, "/etc/passwd"),
        at(root, "/etc/shadow"),
        at(root, "/etc/group"),
        at(root, "/etc/gshadow"),
    );
    // Missing supplementary groups are made, as cloud-init does.
    for g in &u.groups {
        if acc.gid(g).is_none() {
            let gid = Accounts::next_id(acc.groups.iter().map(|g| g.1));
            append_line(&group, &format!("{g}:x:{gid}:"), mode_of(&group, 0o644))?;
            append_line(&gshadow, &format!("{g}:!::"), mode_of(&gshadow, 0o640))?;
            acc.groups.push((g.clone(), gid, Vec::new()));
        }
    }
    let home = u.homedir.clone().unwrap_or_else(|| format!("/home/{}", u.name));
    let (uid, gid, home) = match acc.users.iter().find(|x| x.0 == u.name) {
        Some(x) => (x.1, x.2, x.3.clone()),
        None => {
            let uid = Accounts::next_id(acc.users.iter().map(|x| x.1));
            // A group of the user's own name, as useradd's USERGROUPS_ENAB.
            let gid = match acc.gid(&u.name) {
                Some(g) => g,
                None => {
                    let free = !acc.groups.iter().any(|g| g.1 == uid);
                    let gid = if free {
                        uid
                    } else {
                        Accounts::next_id(acc.groups.iter().map(|g| g.1))
                    };
                    append_line(&group, &format!("{}:x:{gid}:", u.name), mode_of(&group, 0o644))?;
                    append_line(&gshadow, &format!("{}:!::", u.name), mode_of(&gshadow, 0o640))?;
                    acc.groups.push((u.name.clone(), gid, Vec::new()));
                    gid
                }
            };
            let shell = u.shell.clone().unwrap_or_else(|| "/bin/sh".into());
            let gecos = u.gecos.clone().unwrap_or_default();
            append_line(
                &passwd,
                &format!("{}:x:{uid}:{gid}:{gecos}:{home}:{shell}", u.name),
                mode_of(&passwd, 0o644),
            )?;
            // `!`: no password can log in (keys can); `*` when the seed asks
            // for an unlocked account without giving it a password.
            let pw = if u.lock_passwd { "!" } else { "*" };
            append_line(
                &shadow,
                &format!("{}:{pw}:{}:0:99999:7:::", u.name, days_since_epoch()),
                mode_of(&shadow, 0o640),
            )?;
            let h = at(root, &home);
            if !h.exists() {
                ctx(fs::create_dir_all(&h), "creating", &h)?;
                ctx(
                    fs::set_permissions(&h, fs::Permissions::from_mode(0o750)),
                    "chmod",
                    &h,
                )?;
                copy_skel(&at(root, "/etc/skel"), &h, uid, gid)?;
                ctx(chown(&h, Some(uid), Some(gid)), "chown", &h)?;
            }
            (uid, gid, home)
        }
    };
    if !u.groups.is_empty() {
        add_member(&group, &u.groups, 3, &u.name, mode_of(&group, 0o644))?;
        add_member(&gshadow, &u.groups, 3, &u.name, mode_of(&gshadow, 0o640))?;
    }
    if !u.ssh_authorized_keys.is_empty() {
        let ssh = at(root, &home).join(".ssh");
        if !ssh.exists() {
            ctx(fs::create_dir_all(&ssh), "creating", &ssh)?;
            ctx(
                fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700)),
                "chmod",
                &ssh,
            )?;
            ctx(chown(&ssh, Some(uid), Some(gid)), "chown", &ssh)?;
        }
        let keys = ssh.join("authorized_keys");
        let mut text = fs::read_to_string(&keys).unwrap_or_default();
        for k in &u.ssh_authorized_keys {
            if !text.lines().any(|l| l.trim() == k.trim()) {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(k.trim());
                text.push('\n');
            }
        }
        write_atomic(&keys, text.as_bytes(), 0o600)?;
        ctx(chown(&keys, Some(uid), Some(gid)), "chown", &keys)?;
    }
    if !u.sudo.is_empty() {
        // Same file as cloud-init, so either tool finds what the other wrote.
        let file = at(root, "/etc/sudoers.d/90-cloud-init-users");
        let mut text = fs::read_to_string(&file)
            .unwrap_or_else(|_| "# Created by cloud-init v. 22.4.2 (here by webhoster-seed-agent)\n".into());
        for rule in &u.sudo {
            let line = format!("{} {rule}", u.name);
            if !text.lines().any(|l| l == line) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        write_atomic(&file, text.as_bytes(), 0o440)?;
    }
    Ok(())
}

/// One `write_files` entry (owner resolved in the root's own databases).
pub fn write_file(root: &Path, f: &WriteFile) -> Result<()> {
    let acc = Accounts::load(root)?;
    let (uid, gid) = acc
        .owner(&f.owner)
        .map_err(|e| format!("{}: owner {}: {e}", f.path, f.owner))?;
    let path = at(root, &f.path);
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        ctx(fs::create_dir_all(dir), "creating", dir)?;
    }
    if f.append {
        let mut file = ctx(
            fs::OpenOptions::new().create(true).append(true).open(&path),
            "opening",
            &path,
        )?;
        ctx(file.write_all(&f.content), "appending to", &path)?;
    } else {
        write_atomic(&path, &f.content, f.permissions)?;
    }
    ctx(chown(&path, Some(uid), Some(gid)), "chown", &path)?;
    // After chown: chown clears setuid/setgid bits.
    ctx(
        fs::set_permissions(&path, fs::Permissions::from_mode(f.permissions)),
        "chmod",
        &path,
    )
}

/// /etc/hostname and (with manage_etc_hosts) /etc/hosts.
pub fn hostname(root: &Path, short: &str, fqdn: &str, manage_hosts: bool) -> Result<()> {
    write_atomic(&at(root, "/etc/hostname"), format!("{short}\n").as_bytes(), 0o644)?;
    if manage_hosts {
        let names = if fqdn == short {
            short.to_owned()
        } else {
            format!("{fqdn} {short}")
        };
        let hosts = format!(
            "# Written by webhoster-seed-agent (cloud-init's manage_etc_hosts).\n\
             127.0.1.1 {names}\n127.0.0.1 localhost\n\n\
             ::1 localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n"
        );
        write_atomic(&at(root, "/etc/hosts"), hosts.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// The sshd drop-in cloud-init's set-passwords writes (the only sshd
/// configuration a seed changes).
pub const SSHD_DROP_IN: &str = "/etc/ssh/sshd_config.d/50-cloud-init.conf";

pub fn ssh_pwauth(root: &Path, on: bool) -> Result<()> {
    let text = format!("PasswordAuthentication {}\n", if on { "yes" } else { "no" });
    write_atomic(&at(root, SSHD_DROP_IN), text.as_bytes(), 0o600)
}

/// systemd-networkd files for the seed's network; stale ones of an earlier
/// instance are removed.
pub fn network(root: &Path, plan: &Plan) -> Result<()> {
    let dir = at(root, "/etc/systemd/network");
    ctx(fs::create_dir_all(&dir), "creating", &dir)?;
    for e in fs::read_dir(&dir).map_err(|e| e.to_string())?.flatten() {
        if e.file_name().to_string_lossy().starts_with("10-webhoster-") && e.path().is_file() {
            ctx(fs::remove_file(e.path()), "removing", &e.path())?;
        }
    }
    for (name, content) in plan.network.render() {
        write_atomic(&dir.join(name), content.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// The per-instance runcmd script.
pub fn runcmd_script(plan: &Plan) -> String {
    let mut s = String::from("#!/bin/sh\n# runcmd of the seed, written by webhoster-seed-agent\n");
    for c in &plan.runcmd {
        s.push_str(&c.script_line());
        s.push('\n');
    }
    s
}

/// Everything that is files: the first boot of an instance, in cloud-init's
/// order (write_files, then users, then deferred files).
pub fn files(root: &Path, plan: &Plan) -> Result<Vec<String>> {
    let mut errors = Vec::new();
    if let Some((short, fqdn)) = &plan.hostname {
        hostname(root, short, fqdn, plan.manage_etc_hosts)?;
    }
    network(root, plan)?;
    // A failing file or user is reported and the rest still applied, as
    // cloud-init's modules do; the agent exits non-zero at the end.
    for f in plan.write_files.iter().filter(|f| !f.defer) {
        if let Err(e) = write_file(root, f) {
            errors.push(e);
        }
    }
    for u in &plan.users {
        if let Err(e) = user(root, u) {
            errors.push(format!("user {}: {e}", u.name));
        }
    }
    for f in plan.write_files.iter().filter(|f| f.defer) {
        if let Err(e) = write_file(root, f) {
            errors.push(e);
        }
    }
    if let Some(on) = plan.ssh_pwauth {
        ssh_pwauth(root, on)?;
    }
    Ok(errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::{SeedFiles, plan};
    use std::os::unix::fs::MetadataExt;

    fn fake_root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let w = |p: &str, s: &str| {
            let path = at(d.path(), p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, s).unwrap();
        };
        w(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n",
        );
        w(
            "/etc/shadow",
            "root:*:19000:0:99999:7:::\nwww-data:*:19000:0:99999:7:::\n",
        );
        w("/etc/group", "root:x:0:\nsudo:x:27:\nwww-data:x:33:\n");
        w("/etc/gshadow", "root:*::\nsudo:*::\nwww-data:*::\n");
        w("/etc/skel/.bashrc", "# skel\n");
        fs::create_dir_all(at(d.path(), "/var/www/html")).unwrap();
        d
    }

    fn seed(user_data: &str, network: Option<&str>) -> Plan {
        plan(&SeedFiles {
            meta_data: "instance-id: iid-t\n".into(),
            user_data: Some(user_data.as_bytes().to_vec()),
            network_config: network.map(str::to_owned),
            vendor_data: None,
        })
        .unwrap()
    }

    #[test]
    fn webhosters_seed_applies_to_a_root() {
        let root = fake_root();
        let r = root.path();
        let p = seed(
            include_str!("testdata/webhoster-user-data.yaml"),
            Some(include_str!("testdata/webhoster-network-config.yaml")),
        );
        let errors = files(r, &p).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let read = |p: &str| fs::read_to_string(at(r, p)).unwrap();
        assert_eq!(read("/etc/hostname"), "vm-a\n");
        assert!(read("/etc/hosts").contains("127.0.1.1 vm-a\n"));
        assert!(read("/etc/passwd").contains("ubuntu:x:1000:1000:ubuntu:/home/ubuntu:/bin/bash\n"));
        assert!(read("/etc/shadow").contains("\nubuntu:!:"));
        let group = read("/etc/group");
        assert!(
            group.contains("sudo:x:27:ubuntu\n") && group.contains("www-data:x:33:ubuntu\n"),
            "{group}"
        );
        assert!(group.contains("ubuntu:x:1000:\n"), "{group}");
        assert!(read("/etc/gshadow").contains("www-data:*::ubuntu\n"));
        assert_eq!(
            read("/etc/sudoers.d/90-cloud-init-users").lines().last(),
            Some("ubuntu ALL=(ALL) NOPASSWD:ALL")
        );
        let keys = at(r, "/home/ubuntu/.ssh/authorized_keys");
        let meta = fs::metadata(&keys).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (1000, 1000, 0o600));
        assert!(fs::read_to_string(&keys).unwrap().starts_with("ssh-ed25519 "));
        assert_eq!(read("/home/ubuntu/.bashrc"), "# skel\n");
        let page = fs::metadata(at(r, "/var/www/html/index.html")).unwrap();
        assert_eq!((page.uid(), page.gid(), page.mode() & 0o7777), (0, 33, 0o664));
        assert_eq!(
            read("/etc/ssh/sshd_config.d/50-cloud-init.conf"),
            "PasswordAuthentication no\n"
        );
        assert!(read("/etc/systemd/network/10-webhoster-eth0.network").contains("Address=10.0.0.5/24"));

        // Applying again (same instance re-applied by hand) adds nothing twice.
        assert!(files(r, &p).unwrap().is_empty());
        assert_eq!(
            read("/etc/passwd")
                .lines()
                .filter(|l| l.starts_with("ubuntu:"))
                .count(),
            1
        );
        assert_eq!(fs::read_to_string(&keys).unwrap().lines().count(), 1);
        assert_eq!(
            read("/etc/sudoers.d/90-cloud-init-users")
                .matches("ubuntu ")
                .count(),
            1
        );
    }

    #[test]
    fn deferred_files_owned_by_new_users_append_and_new_groups() {
        let root = fake_root();
        let r = root.path();
        fs::write(at(r, "/etc/motd"), "old\n").unwrap();
        let p = seed(
            "#cloud-config\nusers:\n- {name: bob, groups: 'www-data, deploy', lock_passwd: false}\n- carol\nwrite_files:\n- {path: /home/bob/app/run.sh, owner: 'bob:deploy', permissions: '0750', content: 'x', defer: true}\n- {path: /etc/motd, append: true, content: \"new\\n\"}\n",
            None,
        );
        assert!(files(r, &p).unwrap().is_empty());
        let acc = Accounts::load(r).unwrap();
        assert_eq!(acc.uid("bob"), Some(1000));
        assert_eq!(acc.uid("carol"), Some(1001));
        let deploy = acc.gid("deploy").unwrap();
        assert!(deploy >= 1000);
        let m = fs::metadata(at(r, "/home/bob/app/run.sh")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, deploy, 0o750));
        assert_eq!(fs::read_to_string(at(r, "/etc/motd")).unwrap(), "old\nnew\n");
        assert!(
            fs::read_to_string(at(r, "/etc/shadow"))
                .unwrap()
                .contains("\nbob:*:")
        );
        assert!(
            fs::read_to_string(at(r, "/etc/systemd/network/10-webhoster-fallback.network"))
                .unwrap()
                .contains("DHCP=yes")
        );
        // A file for an owner that does not exist is reported, the rest applied.
        let p = seed(
            "#cloud-config\nusers: [dave]\nwrite_files:\n- {path: /a, owner: nobody-here}\n- {path: /b}\n",
            None,
        );
        let errors = files(r, &p).unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(at(r, "/b").exists());
    }
}
