//! The recipe in `images/`, embedded in the binary, and its hash: the cache key.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::ImageError;

/// The guest's seed agent (`images/agent/`): its sources are part of the recipe,
/// its binary goes into the image.
#[path = "../../images/agent/src/sources.rs"]
pub(crate) mod agent_sources;

/// Every file of `images/` but its README (path relative to it, content,
/// executable). A unit test checks that no file of the directory is missing
/// here, so the hash covers the whole recipe; editing the README (docs only)
/// does not make a new image.
pub const FILES: &[(&str, &str, bool)] = &[
    ("build.sh", include_str!("../../images/build.sh"), true),
    ("packages.txt", include_str!("../../images/packages.txt"), false),
    (
        "dpkg-excludes.cfg",
        include_str!("../../images/dpkg-excludes.cfg"),
        false,
    ),
    (
        "masked-units.txt",
        include_str!("../../images/masked-units.txt"),
        false,
    ),
    ("initrd/init", include_str!("../../images/initrd/init"), true),
    (
        "overlay/etc/cloud/cloud.cfg.d/99-webhoster.cfg",
        include_str!("../../images/overlay/etc/cloud/cloud.cfg.d/99-webhoster.cfg"),
        false,
    ),
    (
        "overlay/etc/fstab",
        include_str!("../../images/overlay/etc/fstab"),
        false,
    ),
    (
        "overlay/etc/sysctl.d/60-webhoster-writeback.conf",
        include_str!("../../images/overlay/etc/sysctl.d/60-webhoster-writeback.conf"),
        false,
    ),
    (
        "overlay/etc/systemd/network/10-cloud-init-eth0.network.d/10-webhoster.conf",
        include_str!(
            "../../images/overlay/etc/systemd/network/10-cloud-init-eth0.network.d/10-webhoster.conf"
        ),
        false,
    ),
    (
        "overlay/etc/systemd/system/cloud-config.service.d/10-webhoster.conf",
        include_str!("../../images/overlay/etc/systemd/system/cloud-config.service.d/10-webhoster.conf"),
        false,
    ),
    (
        "overlay/etc/systemd/system/cloud-init-local.service.d/10-webhoster-seed.conf",
        include_str!(
            "../../images/overlay/etc/systemd/system/cloud-init-local.service.d/10-webhoster-seed.conf"
        ),
        false,
    ),
    (
        "overlay/etc/systemd/system/cloud-init.service.d/10-webhoster-seed.conf",
        include_str!("../../images/overlay/etc/systemd/system/cloud-init.service.d/10-webhoster-seed.conf"),
        false,
    ),
    (
        "overlay/etc/systemd/system/cloud-final.service.d/10-webhoster-seed.conf",
        include_str!("../../images/overlay/etc/systemd/system/cloud-final.service.d/10-webhoster-seed.conf"),
        false,
    ),
    (
        "masked-generators.txt",
        include_str!("../../images/masked-generators.txt"),
        false,
    ),
    (
        "startup-cpu-weights.txt",
        include_str!("../../images/startup-cpu-weights.txt"),
        false,
    ),
    (
        "overlay/etc/systemd/system/ssh.service",
        include_str!("../../images/overlay/etc/systemd/system/ssh.service"),
        false,
    ),
    (
        "overlay/etc/systemd/system/nginx.service",
        include_str!("../../images/overlay/etc/systemd/system/nginx.service"),
        false,
    ),
    (
        "overlay/etc/systemd/system/qemu-guest-agent.service",
        include_str!("../../images/overlay/etc/systemd/system/qemu-guest-agent.service"),
        false,
    ),
    (
        "overlay/etc/systemd/system/webhoster-ready.target",
        include_str!("../../images/overlay/etc/systemd/system/webhoster-ready.target"),
        false,
    ),
    (
        "overlay/etc/systemd/system/webhoster-ready-flag.service",
        include_str!("../../images/overlay/etc/systemd/system/webhoster-ready-flag.service"),
        false,
    ),
    (
        "overlay/etc/tmpfiles.d/systemd-nologin.conf",
        include_str!("../../images/overlay/etc/tmpfiles.d/systemd-nologin.conf"),
        false,
    ),
    (
        "overlay/etc/systemd/system/webhoster-seed.service",
        include_str!("../../images/overlay/etc/systemd/system/webhoster-seed.service"),
        false,
    ),
    (
        "overlay/etc/systemd/system/webhoster-growfs.service",
        include_str!("../../images/overlay/etc/systemd/system/webhoster-growfs.service"),
        false,
    ),
    (
        "overlay/etc/systemd/system/webhoster-seed-runcmd.service",
        include_str!("../../images/overlay/etc/systemd/system/webhoster-seed-runcmd.service"),
        false,
    ),
    (
        "overlay/etc/systemd/system/ssh-hostkey-fallback.service",
        include_str!("../../images/overlay/etc/systemd/system/ssh-hostkey-fallback.service"),
        false,
    ),
    (
        "overlay/etc/systemd/system/dbus.socket.d/10-webhoster.conf",
        include_str!("../../images/overlay/etc/systemd/system/dbus.socket.d/10-webhoster.conf"),
        false,
    ),
    (
        "overlay/etc/systemd/system/systemd-networkd-wait-online.service.d/10-webhoster.conf",
        include_str!(
            "../../images/overlay/etc/systemd/system/systemd-networkd-wait-online.service.d/10-webhoster.conf"
        ),
        false,
    ),
];

/// Cache key: the recipe files, the seed agent's sources (and its
/// Cargo.toml), the kernel command line and the Debian suite they are
/// built for. The agent's binary is not hashed (builds are
/// not byte-for-byte reproducible); the build checks that it was built from
/// these sources.
pub fn key(suite: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(b"webhoster-image-v1\0");
    hash.update(suite.as_bytes());
    hash.update(b"\0");
    hash.update(agent_sources::hash().as_bytes());
    hash.update(b"\0");
    hash.update(super::KERNEL_CMDLINE.as_bytes());
    hash.update(b"\0");
    for (path, content, exec) in FILES {
        hash.update(path.as_bytes());
        hash.update([0, u8::from(*exec)]);
        hash.update((content.len() as u64).to_le_bytes());
        hash.update(content.as_bytes());
    }
    hex::encode(&hash.finalize()[..8])
}

/// Writes the recipe into `dir` (for build.sh to read).
pub fn write_to(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    for (path, content, exec) in FILES {
        let dest = dir.join(path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(ImageError::io("creating the recipe directory", parent))?;
        }
        std::fs::write(&dest, content).map_err(ImageError::io("writing the recipe file", &dest))?;
        let mode = if *exec { 0o755 } else { 0o644 };
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
            .map_err(ImageError::io("setting the mode of", &dest))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path != base.join("README.md") {
                out.push(path.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }

    #[test]
    fn every_recipe_file_is_embedded() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("images");
        let mut on_disk = Vec::new();
        walk(&base, &base, &mut on_disk);
        // The agent's sources are hashed by their own list (below).
        on_disk.retain(|p| !p.starts_with("agent/"));
        on_disk.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|(p, _, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded, "images/ and recipe::FILES differ");
    }

    #[test]
    fn every_agent_source_is_hashed() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/agent");
        let mut on_disk = Vec::new();
        walk(&base, &base, &mut on_disk);
        on_disk.sort();
        let mut hashed: Vec<String> = agent_sources::FILES.iter().map(|(p, _)| p.to_string()).collect();
        hashed.sort();
        assert_eq!(
            on_disk, hashed,
            "images/agent/ and its src/sources.rs FILES differ"
        );
    }

    #[test]
    fn key_depends_on_suite_and_is_stable() {
        assert_eq!(key("bookworm"), key("bookworm"));
        assert_ne!(key("bookworm"), key("trixie"));
        assert_eq!(key("bookworm").len(), 16);
    }

    #[test]
    fn written_recipe_matches() {
        let dir = tempfile::tempdir().unwrap();
        write_to(dir.path()).unwrap();
        let build = std::fs::read_to_string(dir.path().join("build.sh")).unwrap();
        let embedded = FILES.iter().find(|(p, _, _)| *p == "build.sh").unwrap();
        assert_eq!(build, embedded.1);
    }
}
