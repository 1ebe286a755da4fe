//! A VM's disk: a qcow2 overlay on the base image, created with `qemu-img`
//! into a temporary name and moved in place, so a crash never leaves half a
//! disk under the real name. Never overwrites an existing disk (it holds the
//! user's data) and never touches a running QEMU.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::dir::VmDir;
use super::{VmSpec, VmmError};

/// `<dir>/disk.qcow2` as an overlay on `spec.base_disk`, sized by plan; an
/// existing disk is kept as it is.
pub(super) async fn create_overlay(dir: &VmDir, spec: &VmSpec) -> Result<PathBuf, VmmError> {
    let disk = dir.disk();
    if disk.exists() {
        return Ok(disk);
    }
    let base = std::path::absolute(&spec.base_disk).map_err(|source| VmmError::Io {
        vm_id: spec.vm_id.clone(),
        what: format!("bad base disk path {}", spec.base_disk.display()),
        source,
    })?;
    let tmp = dir.root().join(".disk.qcow2.tmp");
    create_qcow2(&spec.vm_id, &tmp, &base, &format!("{}G", spec.plan.disk_gib)).await?;
    std::fs::rename(&tmp, &disk).map_err(|source| VmmError::Io {
        vm_id: spec.vm_id.clone(),
        what: "cannot move the new disk in place".into(),
        source,
    })?;
    Ok(disk)
}

/// A new qcow2 at `path`, `size` large (`20G`, or bytes), backed by
/// `backing`, root's only: the one way a VM's disk and its backups are made.
pub(super) async fn create_qcow2(
    vm_id: &str,
    path: &Path,
    backing: &Path,
    size: &str,
) -> Result<(), VmmError> {
    let format = disk_format(backing).map_err(|source| VmmError::Io {
        vm_id: vm_id.to_owned(),
        what: format!("cannot read backing disk {}", backing.display()),
        source,
    })?;
    let mut args: Vec<&std::ffi::OsStr> = ["create", "-q", "-f", "qcow2", "-F", format, "-b"]
        .map(std::ffi::OsStr::new)
        .to_vec();
    args.extend([backing.as_os_str(), path.as_os_str(), std::ffi::OsStr::new(size)]);
    qemu_img(vm_id, &args).await?;
    // qemu-img creates 0644 (less the umask): the user's data is root's only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(super::dir::PRIVATE_FILE_MODE),
    )
    .map_err(|source| VmmError::Io {
        vm_id: vm_id.to_owned(),
        what: format!("cannot restrict the mode of {}", path.display()),
        source,
    })
}

/// Runs `qemu-img` with `args`; returns its stdout, or its stderr as the error.
pub(super) async fn qemu_img(vm_id: &str, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, VmmError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => VmmError::QemuImgMissing,
            _ => VmmError::Io {
                vm_id: vm_id.to_owned(),
                what: "cannot run qemu-img".into(),
                source: err,
            },
        })?;
    if !out.status.success() {
        return Err(VmmError::QemuImg {
            vm_id: vm_id.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// `qcow2` when the file starts with qcow2's magic, `raw` otherwise. Passed
/// as `-F` because qemu-img refuses to guess a backing file's format.
pub(super) fn disk_format(path: &Path) -> std::io::Result<&'static str> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)?;
    let n = file.read(&mut magic)?;
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_follows_the_magic() {
        let tmp = tempfile::tempdir().unwrap();
        let qcow2 = tmp.path().join("a.qcow2");
        std::fs::write(&qcow2, b"QFI\xfb\0\0\0\x03rest").unwrap();
        assert_eq!(disk_format(&qcow2).unwrap(), "qcow2");
        let raw = tmp.path().join("a.raw");
        std::fs::write(&raw, [0u8; 512]).unwrap();
        assert_eq!(disk_format(&raw).unwrap(), "raw");
        let short = tmp.path().join("short");
        std::fs::write(&short, b"QF").unwrap();
        assert_eq!(disk_format(&short).unwrap(), "raw");
        assert!(disk_format(&tmp.path().join("missing")).is_err());
    }
}
