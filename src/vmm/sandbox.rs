//! The unprivileged user QEMU drops to (`-runas`), and making sure it
//! exists. QEMU starts as root, opens everything it needs (disk, seed,
//! kernel, serial log, pidfile, its listening sockets, `/dev/urandom`; the
//! tap arrives as an open fd), then switches to this user for good: real,
//! effective and saved ids, no capabilities, `no_new_privs` from its
//! seccomp filter. After that it reaches nothing by path under the state
//! dir (root's, 0700), so a guest that breaks into QEMU holds an
//! unprivileged process with open descriptors to its own VM's files only.
//!
//! The user is a system user, `webhoster-qemu` by default, created at
//! engine start with `useradd --system` when missing (so neither `make run`
//! nor the tests need a manual step). Every VM's QEMU shares it; one uid per
//! VM (QEMU 7.2 also takes `-runas UID:GID`) would also keep an escaped
//! QEMU from signalling its neighbours, and is the next step.
//!
//! Never starts QEMU: `process.rs` puts `-runas` on the command line.

use std::sync::Mutex;

use super::VmmError;

/// The system user QEMU runs as unless configured otherwise.
pub const DEFAULT_QEMU_USER: &str = "webhoster-qemu";

/// Who QEMU runs as after dropping root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuUser {
    /// A user from the passwd database (created when missing).
    Name(String),
    /// Bare ids: nothing to create (`-runas UID:GID`, QEMU 7.2 and later).
    Ids { uid: u32, gid: u32 },
}

impl QemuUser {
    /// A user name (`[a-z_][a-z0-9_-]*`, at most 32 bytes) or `UID:GID`,
    /// neither of them root.
    pub fn parse(text: &str) -> Result<QemuUser, VmmError> {
        let bad = |reason: &str| VmmError::QemuUser {
            user: text.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some((uid, gid)) = text.split_once(':') {
            let (Ok(uid), Ok(gid)) = (uid.parse::<u32>(), gid.parse::<u32>()) else {
                return Err(bad("UID:GID must be two numbers"));
            };
            if uid == 0 || gid == 0 {
                return Err(bad("QEMU must not run as root"));
            }
            return Ok(QemuUser::Ids { uid, gid });
        }
        let ok = !text.is_empty()
            && text.len() <= 32
            && text
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(bad("a user name is 1-32 characters of a-z, 0-9, '_', '-'"));
        }
        if text == "root" {
            return Err(bad("QEMU must not run as root"));
        }
        Ok(QemuUser::Name(text.to_owned()))
    }

    /// The value of `-runas`.
    pub fn runas(&self) -> String {
        match self {
            QemuUser::Name(name) => name.clone(),
            QemuUser::Ids { uid, gid } => format!("{uid}:{gid}"),
        }
    }

    /// The ids QEMU will run with, or `None` for a name not in passwd.
    pub fn ids(&self) -> Option<(u32, u32)> {
        match self {
            QemuUser::Ids { uid, gid } => Some((*uid, *gid)),
            QemuUser::Name(name) => nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .map(|u| (u.uid.as_raw(), u.gid.as_raw())),
        }
    }

    /// Make sure the user exists: a name missing from passwd is created as
    /// a system user with its own group, no home and no login shell.
    /// Returns its ids, which must not be root's.
    pub fn ensure(&self) -> Result<(u32, u32), VmmError> {
        // Engines of one process (tests) must not race two useradds.
        static CREATING: Mutex<()> = Mutex::new(());
        let fail = |reason: String| VmmError::QemuUser {
            user: self.runas(),
            reason,
        };
        let ids = match (self.ids(), self) {
            (Some(ids), _) => ids,
            (None, QemuUser::Ids { .. }) => unreachable!("bare ids always resolve"),
            (None, QemuUser::Name(name)) => {
                let _guard = CREATING.lock().unwrap_or_else(|e| e.into_inner());
                if self.ids().is_none() {
                    create_system_user(name).map_err(fail)?;
                    tracing::info!(user = %name, "created the system user QEMU runs as");
                }
                self.ids()
                    .ok_or_else(|| fail("useradd succeeded but the user is not in passwd".into()))?
            }
        };
        if ids.0 == 0 || ids.1 == 0 {
            return Err(fail("QEMU must not run as root (uid or gid 0)".into()));
        }
        Ok(ids)
    }
}

/// `useradd --system` for `name`. Another process may create it at the same
/// moment (useradd then fails on its lock or on the name): what counts is
/// that the user exists afterwards, so a few tries are made.
fn create_system_user(name: &str) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..5 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        if nix::unistd::User::from_name(name).ok().flatten().is_some() {
            return Ok(());
        }
        let out = std::process::Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "webhoster QEMU",
                name,
            ])
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "useradd not found: install the Debian package passwd, or create the user".to_owned()
                }
                _ => format!("cannot run useradd: {e}"),
            })?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    }
    if nix::unistd::User::from_name(name).ok().flatten().is_some() {
        return Ok(());
    }
    Err(format!("useradd failed: {last}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_parsed_and_root_refused() {
        assert_eq!(
            QemuUser::parse("webhoster-qemu").unwrap(),
            QemuUser::Name("webhoster-qemu".into())
        );
        assert_eq!(
            QemuUser::parse("64000:64000").unwrap(),
            QemuUser::Ids {
                uid: 64000,
                gid: 64000
            }
        );
        assert_eq!(QemuUser::parse("64000:5").unwrap().runas(), "64000:5");
        for bad in [
            "root",
            "0:5",
            "5:0",
            "",
            "Web",
            "-x",
            "a b",
            "a:b",
            "1:",
            &"x".repeat(33),
        ] {
            assert!(QemuUser::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bare_ids_need_no_account() {
        let user = QemuUser::parse("64123:64123").unwrap();
        assert_eq!(user.ensure().unwrap(), (64123, 64123));
    }
}
