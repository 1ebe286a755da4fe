//! image: finding or building the default guest image (kernel, initrd, base
//! qcow2, manifest) from the recipe in `images/`, which is embedded in the
//! binary and hashed into the cache key.
//!
//! Owns the image cache directory (`<cache>/<key>/`, a lock file, work
//! directories of running builds). It never starts a VM, never writes outside
//! the cache, and never names a package mirror: the mirror is the host's.

mod agent;
mod build;
pub mod cli;
mod error;
mod manifest;
mod preflight;
mod recipe;
mod sources;

use std::path::{Path, PathBuf};

pub use error::ImageError;
pub use manifest::{FileInfo, Manifest};

/// The kernel command line the image is built to boot with. Beyond the
/// standard `console=ttyS0 root=/dev/vda rw`:
/// - `quiet`: under TCG every byte on the emulated UART costs; the kernel's
///   boot messages alone cost about a second.
/// - `no_timer_check`: skips the IO-APIC timer check, which waits for timer
///   ticks that an emulated CPU delivers slowly.
/// - `rcupdate.rcu_expedited=1`: RCU grace periods (module loads, mounts,
///   network setup during boot) end without waiting out the scheduler.
/// - `cryptomgr.notests`: the crypto API's self-tests of every algorithm it
///   registers cost 0.4-0.6 s of TCG at each boot; they check the kernel's
///   own implementations, which do not change from boot to boot.
/// - `sysctl.vm.dirty_*`: the writeback bound of the image's
///   `/etc/sysctl.d/60-webhoster-writeback.conf`, in force from the kernel's
///   start. sshd takes uploads long before systemd-sysctl runs, late in the
///   boot; until then a crash could lose up to 30 s of acknowledged writes.
///
/// Part of the image's cache key: a change boots (and snapshots) anew.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 root=/dev/vda rw quiet no_timer_check \
     rcupdate.rcu_expedited=1 cryptomgr.notests \
     sysctl.vm.dirty_expire_centisecs=50 sysctl.vm.dirty_writeback_centisecs=50";

/// A built image; all paths are absolute.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    fn from_manifest(manifest: Manifest) -> Image {
        Image {
            kernel: manifest.kernel.clone(),
            initrd: manifest.initrd.clone(),
            disk: manifest.disk.clone(),
            manifest,
        }
    }
}

/// The cache key of the current recipe on this host.
pub fn key() -> Result<String, ImageError> {
    Ok(recipe::key(&sources::host_suite()?))
}

fn absolute(dir: &Path) -> Result<PathBuf, ImageError> {
    std::path::absolute(dir).map_err(ImageError::io("resolving", dir))
}

/// The image for the current recipe if it is in the cache. Builds nothing.
pub fn cached(cache_dir: &Path) -> Result<Option<Image>, ImageError> {
    let dir = absolute(cache_dir)?.join(key()?);
    if !dir.join(manifest::FILE).is_file() {
        return Ok(None);
    }
    Manifest::load(&dir).map(|m| Some(Image::from_manifest(m)))
}

/// The cached image, or a fresh build of it. Concurrent callers (threads or
/// processes) serialize on a lock file in the cache: one builds, the others
/// wait and then find it cached.
pub fn ensure(cache_dir: &Path) -> Result<Image, ImageError> {
    if let Some(image) = cached(cache_dir)? {
        return Ok(image);
    }
    preflight::check_root()?;
    preflight::check_tools()?;
    let agent = agent::locate()?;
    let cache_dir = absolute(cache_dir)?;
    std::fs::create_dir_all(&cache_dir).map_err(ImageError::io("creating the image cache", &cache_dir))?;
    let lock_path = cache_dir.join(".lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(ImageError::io("opening the lock", &lock_path))?;
    let _lock =
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
            ImageError::Io {
                what: "locking",
                path: lock_path.clone(),
                source: errno.into(),
            }
        })?;
    if let Some(image) = cached(&cache_dir)? {
        return Ok(image);
    }
    build::sweep(&cache_dir);
    preflight::check_space(&cache_dir)?;
    let suite = sources::host_suite()?;
    let srcs = sources::host_sources(Path::new("/etc/apt"), &suite)?;
    let apt_options = sources::host_apt_options();
    preflight::check_mirrors(&srcs, &apt_options)?;
    let key = recipe::key(&suite);
    tracing::info!(%key, %suite, cache = %cache_dir.display(), "building the guest image");
    let dir = build::run(&cache_dir, &key, &suite, &srcs, &apt_options, &agent)?;
    Manifest::load(&dir).map(Image::from_manifest)
}

#[cfg(test)]
mod tests {
    use super::KERNEL_CMDLINE;

    #[test]
    fn the_command_line_carries_the_images_writeback_sysctls() {
        let conf = include_str!("../../images/overlay/etc/sysctl.d/60-webhoster-writeback.conf");
        let mut settings = conf
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| format!("sysctl.{}={}", k.trim(), v.trim()))
            })
            .collect::<Option<Vec<_>>>()
            .expect("key = value lines");
        assert_eq!(settings.len(), 2, "{conf}");
        let words: Vec<&str> = KERNEL_CMDLINE.split(' ').collect();
        settings.retain(|s| !words.contains(&s.as_str()));
        assert!(settings.is_empty(), "not on the command line: {settings:?}");
        assert!(!KERNEL_CMDLINE.contains("  "), "{KERNEL_CMDLINE:?}");
    }
}
