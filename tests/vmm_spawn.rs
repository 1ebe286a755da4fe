//! `sys::spawn_detached`: descriptors land at the asked numbers, survive
//! exec, and the child runs in its own session. Needs no QEMU.

use std::io::{Seek, Write};
use std::os::fd::AsFd;

#[tokio::test]
async fn fds_land_at_their_numbers_in_a_new_session() {
    let mut a = tempfile::tempfile().unwrap();
    a.write_all(b"tap-a").unwrap();
    a.rewind().unwrap();
    let mut b = tempfile::tempfile().unwrap();
    b.write_all(b"tap-b").unwrap();
    b.rewind().unwrap();
    let mut cmd = std::process::Command::new("sh");
    // Read fd 3 and 4, then print our session id and pid.
    cmd.args([
        "-c",
        "cat <&3; echo; cat <&4; echo; cut -d' ' -f6 /proc/self/stat; echo $$",
    ])
    .stdout(std::process::Stdio::piped());
    // Targets that collide with each other's sources must still work:
    // swap the natural order.
    let child = webhoster::sys::spawn_detached(cmd, &[(b.as_fd(), 4), (a.as_fd(), 3)]).unwrap();
    let out = child.wait_with_output().await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert_eq!(&lines[..2], &["tap-a", "tap-b"], "{text}");
    assert_eq!(lines[2], lines[3], "the child leads its own session: {text}");
}

#[tokio::test]
async fn the_child_gets_the_asked_umask() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "umask"]).stdout(std::process::Stdio::piped());
    let child = webhoster::sys::spawn_detached_with(
        cmd,
        webhoster::sys::Detach {
            umask: Some(0o077),
            ..Default::default()
        },
    )
    .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0077");
}

#[tokio::test]
async fn a_cgroup_that_cannot_be_joined_fails_the_spawn() {
    let cmd = std::process::Command::new("true");
    let err = webhoster::sys::spawn_detached_with(
        cmd,
        webhoster::sys::Detach {
            cgroup_procs: vec![std::ffi::CString::new("/nonexistent/cgroup.procs").unwrap()],
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
}

/// The child becomes the given ids for good before exec: real, effective
/// and saved uid and gid, only the given groups, no capability, and
/// `no_new_privs`. It still joined its session first (which needs no root,
/// but runs before the drop like the cgroup join, which does).
#[tokio::test]
async fn the_child_drops_to_the_given_ids_before_exec() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "grep -E '^(Uid|Gid|Groups|CapEff|CapPrm|NoNewPrivs):' /proc/self/status",
    ])
    .stdout(std::process::Stdio::piped());
    let child = webhoster::sys::spawn_detached_with(
        cmd,
        webhoster::sys::Detach {
            credentials: Some(webhoster::sys::Credentials {
                uid: 2_100_000_123,
                gid: 2_100_000_124,
                groups: vec![2_100_000_125],
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
    };
    assert_eq!(field("Uid:"), "2100000123 2100000123 2100000123 2100000123");
    assert_eq!(field("Gid:"), "2100000124 2100000124 2100000124 2100000124");
    assert_eq!(field("Groups:"), "2100000125");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
}

#[tokio::test]
async fn dropping_to_root_is_refused() {
    let err = webhoster::sys::spawn_detached_with(
        std::process::Command::new("true"),
        webhoster::sys::Detach {
            credentials: Some(webhoster::sys::Credentials {
                uid: 0,
                gid: 5,
                groups: Vec::new(),
            }),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
}
