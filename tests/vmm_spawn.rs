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
