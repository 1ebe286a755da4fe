//! Who each QEMU runs as: an id of its own, taken from a range
//! (`--qemu-ids`), used as both uid and gid. QEMU never holds root: it is
//! spawned directly with that id (`sys::Credentials`, after it joined its
//! cgroup and before exec), so its seccomp filter can deny every set*id call
//! (`elevateprivileges=deny`).
//!
//! One id per VM, not one shared user: a process may signal and ptrace any
//! other of its uid, and a QEMU that starts unprivileged stays dumpable, so
//! one escaped QEMU sharing a uid with the others would own them all. With
//! its own id it reaches only what is granted to its group: its VM
//! directory (traverse only), its disk, seed, serial log and pidfile (see
//! `dir.rs`). The ids need no passwd entry.
//!
//! The record of which VM has which id is the group of its directory, so it
//! survives restarts of the service with no other state. Ids are handed out
//! under an flock on the `vms` directory; one still held by a live QEMU of
//! this state dir (an orphan whose directory is gone) is not handed out
//! again. Ids are unique within one state dir: two services on one host
//! need disjoint ranges.
//!
//! Never starts QEMU: `process.rs` does, with the id assigned here.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::VmmError;
use super::dir::VmDir;

/// The default range: inside the span systemd's "UID/GID ranges" document
/// leaves unused (1879048192-2147352575), so it collides with no account,
/// container or dynamic user of a stock host.
pub const DEFAULT_QEMU_IDS: &str = "2000000000-2000065535";

/// The ids QEMU processes may run as, `first..=last`, none of them root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuIds {
    first: u32,
    last: u32,
}

impl QemuIds {
    /// `FIRST-LAST`, inclusive, `0 < FIRST <= LAST < 2^31` (ids with the
    /// sign bit set break tools that read them as signed).
    pub fn parse(text: &str) -> Result<QemuIds, VmmError> {
        let bad = |reason: &str| VmmError::QemuIds {
            range: text.to_owned(),
            reason: reason.to_owned(),
        };
        let Some((first, last)) = text.trim().split_once('-') else {
            return Err(bad("write the range as FIRST-LAST"));
        };
        let (Ok(first), Ok(last)) = (first.parse::<u32>(), last.parse::<u32>()) else {
            return Err(bad("FIRST and LAST must be numbers"));
        };
        if first == 0 {
            return Err(bad("QEMU must not run as root"));
        }
        if first > last || last > i32::MAX as u32 {
            return Err(bad("need FIRST <= LAST < 2147483648"));
        }
        Ok(QemuIds { first, last })
    }

    pub fn contains(&self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }

    /// The id every template QEMU runs as (`vmm::template`): the range's
    /// last, which [`Self::assign`] never gives a VM, so no user's QEMU can
    /// ever share a uid with the QEMU whose RAM becomes every clone's.
    pub fn template_id(&self) -> u32 {
        self.last
    }

    /// The ids [`Self::assign`] gives VMs: all but the template's (a range
    /// of one id has nothing to spare, and shares it).
    fn vm_ids(&self) -> std::ops::RangeInclusive<u32> {
        if self.first < self.last {
            self.first..=self.last - 1
        } else {
            self.first..=self.last
        }
    }

    /// The id of `dir`'s VM: the one its directory's group already names,
    /// or else the lowest one in the range that no other VM directory under
    /// `vms_dir` and no live QEMU of ours (the uids `live` lists, asked only
    /// for a new id: it scans /proc) holds; the directory's group is set to
    /// it. Serialised across processes by an flock on `vms_dir`.
    pub fn assign(
        &self,
        vms_dir: &Path,
        dir: &VmDir,
        live: impl FnOnce() -> Vec<u32>,
    ) -> Result<u32, VmmError> {
        let fail = |what: &str, source: std::io::Error| VmmError::Io {
            vm_id: dir_name(dir),
            what: what.to_owned(),
            source,
        };
        let lock = std::fs::File::open(vms_dir).map_err(|e| fail("cannot open the vms directory", e))?;
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| fail("cannot lock the vms directory", errno.into()))?;
        let mut taken = BTreeSet::new();
        let mut own = None;
        for entry in std::fs::read_dir(vms_dir).map_err(|e| fail("cannot list the vms directory", e))? {
            let entry = entry.map_err(|e| fail("cannot list the vms directory", e))?;
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() || !self.contains(meta.gid()) {
                continue;
            }
            if entry.path() == dir.root() {
                own = Some(meta.gid());
            } else {
                taken.insert(meta.gid());
            }
        }
        // Kept unless another directory claims the same id (a copied dir).
        // No other VM can have been given it meanwhile, so a live QEMU with
        // it can only be this VM's own.
        if let Some(id) = own.filter(|id| !taken.contains(id) && self.vm_ids().contains(id)) {
            return Ok(id);
        }
        taken.extend(live());
        let id = self
            .vm_ids()
            .find(|id| !taken.contains(id))
            .ok_or_else(|| VmmError::QemuIds {
                range: self.to_string(),
                reason: "every id in the range is in use".into(),
            })?;
        std::os::unix::fs::chown(dir.root(), Some(0), Some(id))
            .map_err(|e| fail("cannot give the VM directory its group", e))?;
        Ok(id)
    }
}

impl std::str::FromStr for QemuIds {
    type Err = VmmError;
    fn from_str(text: &str) -> Result<QemuIds, VmmError> {
        QemuIds::parse(text)
    }
}

impl std::fmt::Display for QemuIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

fn dir_name(dir: &VmDir) -> String {
    dir.root()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_parsed_and_root_refused() {
        let ids = QemuIds::parse(DEFAULT_QEMU_IDS).unwrap();
        assert!(ids.contains(2_000_000_000) && ids.contains(2_000_065_535));
        assert!(!ids.contains(1_999_999_999) && !ids.contains(2_000_065_536));
        assert_eq!(QemuIds::parse("5-5").unwrap().to_string(), "5-5");
        for bad in ["", "5", "0-10", "10-5", "a-b", "1-2147483648", "-5", "5-"] {
            assert!(QemuIds::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// Run as root (chown): each VM gets its own id, keeps it, and does not
    /// get one a live QEMU holds; a freed id is reused.
    #[test]
    fn each_vm_dir_gets_its_own_id_and_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        // The last id is the templates' and never a VM's.
        let ids = QemuIds::parse("2100000000-2100000003").unwrap();
        assert_eq!(ids.template_id(), 2_100_000_003);
        let dirs: Vec<VmDir> = ["vm-a", "vm-b", "vm-c", "vm-d"]
            .iter()
            .map(|id| VmDir::new(tmp.path(), id))
            .collect();
        for d in &dirs {
            d.create().unwrap();
        }
        let none = Vec::new;
        let a = ids.assign(tmp.path(), &dirs[0], none).unwrap();
        assert_eq!(a, ids.first);
        let kept = ids.assign(tmp.path(), &dirs[0], || unreachable!("no scan for a kept id"));
        assert_eq!(kept.unwrap(), a);
        let b = ids.assign(tmp.path(), &dirs[1], || vec![ids.first + 1]).unwrap();
        assert_eq!(b, ids.first + 2, "skips the id a live QEMU holds");
        let full = ids.assign(tmp.path(), &dirs[2], || vec![ids.first + 1]);
        assert!(full.is_err(), "range exhausted");
        std::fs::remove_dir(dirs[0].root()).unwrap();
        assert_eq!(
            ids.assign(tmp.path(), &dirs[3], none).unwrap(),
            a,
            "freed id reused"
        );
    }
}
