//! Persistent taps inside our namespace, made with the TUNSETIFF ioctl on a
//! thread that entered the namespace (rtnetlink's `LinkTun` fails here).
//! Names derive from the vm_id alone, so a tap is found by name after a crash.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::sys::{TapFlags, in_netns, tap_open};

/// Every tap webhoster makes starts with this; `reclaim` only looks at these.
pub const TAP_PREFIX: &str = "whv";

/// `whv` + 12 hex digits of SHA-256(vm_id): 15 bytes, the IFNAMSIZ limit.
pub fn tap_name(vm_id: &str) -> String {
    let digest = Sha256::digest(vm_id.as_bytes());
    format!("{TAP_PREFIX}{}", &hex::encode(digest)[..12])
}

/// Create (or adopt) the persistent tap `name` in the namespace at `ns`.
pub fn create(ns: &Path, name: &str) -> io::Result<()> {
    let name = name.to_string();
    in_netns(ns, move || {
        match tap_open(
            &name,
            TapFlags {
                vnet_hdr: true,
                persist: true,
            },
        ) {
            Ok(_fd) => Ok(()),
            // A QEMU is attached already: the tap exists and is persistent.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(e),
        }
    })?
}

/// Open an fd on the existing tap `name` for QEMU (`-netdev tap,fd=N`).
/// Refuses to create a tap: one made here would not be on the bridge.
pub fn open(ns: &Path, name: &str) -> io::Result<OwnedFd> {
    let name = name.to_string();
    in_netns(ns, move || {
        nix::net::if_::if_nametoindex(name.as_str()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("tap {name:?} does not exist in the VM namespace: {e}"),
            )
        })?;
        tap_open(
            &name,
            TapFlags {
                vnet_hdr: true,
                persist: false,
            },
        )
    })?
}
