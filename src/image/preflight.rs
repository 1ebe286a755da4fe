//! Checks made before a build starts, so a build fails early and says why:
//! root, tools (with the Debian package to install), disk space, the mirror.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use super::error::ImageError;
use super::sources::Source;

/// Peak space a build uses beside the cache: rootfs, raw disk, qcow2.
pub const NEED_MIB: u64 = 3 * 1024;

/// Programs build.sh runs, and the Debian package each comes in.
pub const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
    ("cpio", "cpio"),
    ("gzip", "gzip"),
    ("chroot", "coreutils"),
    ("dpkg-query", "dpkg"),
];

/// busybox goes into the initrd, where there is no libc: it must be static.
pub const BUSYBOX: &str = "/bin/busybox";

pub fn check_root() -> Result<(), ImageError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(ImageError::NotRoot)
    }
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| is_executable(&dir.join(tool)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub fn check_tools() -> Result<(), ImageError> {
    for (tool, package) in TOOLS {
        if !on_path(tool) {
            return Err(ImageError::ToolMissing { tool, package });
        }
    }
    if !is_static_elf(Path::new(BUSYBOX)) {
        return Err(ImageError::ToolMissing {
            tool: "a static /bin/busybox",
            package: "busybox-static",
        });
    }
    Ok(())
}

/// True for an ELF file without a program interpreter (statically linked).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        bytes
            .get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap_or_default()) != PT_INTERP)
    })
}

pub fn check_space(dir: &Path) -> Result<(), ImageError> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| ImageError::Io {
        what: "checking free space in",
        path: dir.to_owned(),
        source: e.into(),
    })?;
    let free_mib = stat.blocks_available() * stat.fragment_size() / (1 << 20);
    if free_mib < NEED_MIB {
        return Err(ImageError::NoSpace {
            path: dir.to_owned(),
            free_mib,
            need_mib: NEED_MIB,
        });
    }
    Ok(())
}

/// `host:port` of an http(s) URI; None for other schemes (file:, cdrom:, ...).
pub fn host_port(uri: &str) -> Option<(String, u16)> {
    let (scheme, rest) = uri.split_once("://")?;
    let default = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, port) = v6.split_once(']')?;
        let port = port
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default);
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((authority.to_owned(), default)),
    }
}

/// Opens a TCP connection to each mirror (or to the apt proxy, when the host
/// uses one): a build would spend minutes before failing otherwise.
pub fn check_mirrors(sources: &[Source], apt_options: &[String]) -> Result<(), ImageError> {
    let proxy = apt_options
        .iter()
        .find(|o| o.starts_with("Acquire::http::Proxy "))
        .and_then(|o| o.split('"').nth(1))
        .filter(|p| p.contains("://"));
    let targets: Vec<&str> = match proxy {
        Some(p) => vec![p],
        None => sources.iter().map(|s| s.uri.as_str()).collect(),
    };
    for uri in targets {
        let Some((host, port)) = host_port(uri) else {
            continue;
        };
        let unreachable = || ImageError::MirrorUnreachable { uri: uri.to_owned() };
        let addrs: Vec<_> = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|_| unreachable())?
            .collect();
        if !addrs
            .iter()
            .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(10)).is_ok())
        {
            return Err(unreachable());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_host_and_port() {
        assert_eq!(
            host_port("http://m.invalid/debian"),
            Some(("m.invalid".into(), 80))
        );
        assert_eq!(
            host_port("https://u@m.invalid:8443/x"),
            Some(("m.invalid".into(), 8443))
        );
        assert_eq!(host_port("http://[::1]:3142/debian"), Some(("::1".into(), 3142)));
        assert_eq!(host_port("file:///srv/mirror"), None);
    }

    #[test]
    fn host_busybox_and_shell() {
        // /bin/sh is dynamically linked on every Debian host.
        assert!(!is_static_elf(Path::new("/bin/sh")));
        assert!(!is_static_elf(Path::new("/etc/os-release")));
    }

    #[test]
    fn unreachable_mirror_is_reported() {
        // A port nothing listens on, on loopback: refused at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let src = Source {
            uri: format!("http://127.0.0.1:{port}/debian"),
            suite: "bookworm".into(),
            components: vec!["main".into()],
        };
        assert!(matches!(
            check_mirrors(&[src], &[]),
            Err(ImageError::MirrorUnreachable { .. })
        ));
    }

    #[test]
    fn tool_missing_names_the_package() {
        let err = ImageError::ToolMissing {
            tool: "mmdebstrap",
            package: "mmdebstrap",
        };
        assert!(err.to_string().contains("install the Debian package mmdebstrap"));
    }
}
