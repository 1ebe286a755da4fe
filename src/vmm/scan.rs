//! Finding this state dir's QEMU processes without trusting any file: the
//! reaper asks which VMs run on the host, including the ones whose directory
//! is gone. A process counts as ours when its command line names a VM
//! (`-name <vm_id>`) and its pidfile lies under our `vms_dir`.

use std::path::Path;

/// (pid, vm_id) of every live QEMU started for a VM under `vms_dir`.
pub fn qemu_processes(vms_dir: &Path) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let prefix = vms_dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid <= 0 || !super::dir::is_alive(pid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if let Some(vm_id) = ours(&cmdline, &prefix) {
            found.push((pid, vm_id));
        }
    }
    found
}

/// The vm_id of a NUL-separated QEMU command line whose pidfile is under
/// `prefix`.
fn ours(cmdline: &[u8], prefix: &str) -> Option<String> {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let value_of = |flag: &[u8]| {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| String::from_utf8_lossy(w[1]).into_owned())
    };
    let pidfile = value_of(b"-pidfile")?;
    let under = Path::new(&pidfile).parent()?.parent()? == Path::new(prefix);
    let vm_id = value_of(b"-name")?;
    (under && super::validate_vm_id(&vm_id).is_ok()).then_some(vm_id)
}

#[cfg(test)]
mod tests {
    use super::ours;

    #[test]
    fn recognises_only_our_vms() {
        let line = |args: &[&str]| args.join("\0").into_bytes();
        let ok = line(&["qemu", "-name", "vm-1", "-pidfile", "/s/vms/vm-1/qemu.pid"]);
        assert_eq!(ours(&ok, "/s/vms").as_deref(), Some("vm-1"));
        assert_eq!(ours(&ok, "/other/vms"), None);
        let no_pidfile = line(&["qemu", "-name", "vm-1"]);
        assert_eq!(ours(&no_pidfile, "/s/vms"), None);
        let bad_name = line(&["qemu", "-name", "../x", "-pidfile", "/s/vms/x/qemu.pid"]);
        assert_eq!(ours(&bad_name, "/s/vms"), None);
    }
}
