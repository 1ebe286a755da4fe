//! Real QEMU guests (TCG) on webhoster's taps: two Debian guests from the
//! cached image, each on its own persistent tap (fd from `open_tap`, handed to
//! QEMU as `-netdev tap,fd=N`), configured by a NoCloud seed with a static
//! address. The host reaches both on :80, a real SSH session reaches guest A
//! through the forward on 127.0.0.1, and from inside A guest B is unreachable.
//!
//! Needs the guest image in the cache (`make test` builds it first).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::host::{TestNet, run_ok, temp_dir, unique_name};
use common::tap_guest::{boot, wait_http};
use webhoster::net::{Network, alloc};

fn ssh(key: &Path, port: u16, cmd: &str) -> std::process::Output {
    Command::new("ssh")
        .args(["-i", key.to_str().unwrap(), "-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg("ubuntu@127.0.0.1")
        .arg(cmd)
        .output()
        .expect("run ssh")
}

#[tokio::test]
async fn qemu_guests_on_taps_are_reachable_and_isolated() {
    let img = common::guest::test_image();
    let t = TestNet::new();
    let net = Network::up(t.opts.clone()).await.expect("up");
    let dir = temp_dir("wh-net-qemu-");
    let key = dir.path().join("id_ed25519");
    run_ok(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-f", key.to_str().unwrap()],
    );
    let pubkey = std::fs::read_to_string(dir.path().join("id_ed25519.pub")).unwrap();

    let mut ips = alloc::guest_ips(net.subnet());
    let (id_a, id_b) = (unique_name("qa"), unique_name("qb"));
    let a = boot(&net, &img, dir.path(), &id_a, ips.next().unwrap(), &pubkey).await;
    let b = boot(&net, &img, dir.path(), &id_b, ips.next().unwrap(), &pubkey).await;
    let port = *t.opts.ssh_ports.start();
    net.add_forward(&id_a, port, a.ip).await.expect("forward");

    // TCG on a shared 2-core machine: generous, bounded.
    let deadline = Instant::now() + Duration::from_secs(420);
    let body_a = wait_http(&a, deadline);
    let body_b = wait_http(&b, deadline);
    assert!(body_a.contains(&format!("owner-{id_a}")), "A's page: {body_a}");
    assert!(body_b.contains(&format!("owner-{id_b}")), "B's page: {body_b}");

    // A real SSH session into A through 127.0.0.1:<port>; sshd may come up
    // a little after nginx.
    let probe = format!(
        "ip -4 -o addr show; \
         for t in 127.0.0.1:80 {b}:80 {b}:22; do \
           if timeout 5 bash -c \"exec 3<>/dev/tcp/${{t%:*}}/${{t#*:}}\" 2>/dev/null; \
           then echo \"REACH $t\"; else echo \"BLOCK $t\"; fi; done",
        b = b.ip
    );
    let out = loop {
        let out = ssh(&key, port, &probe);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ssh into A: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("inet {}/", a.ip)), "{stdout}");
    assert!(
        stdout.contains("REACH 127.0.0.1:80"),
        "the probe itself must work: {stdout}"
    );
    assert!(
        stdout.contains(&format!("BLOCK {}:80", b.ip)),
        "A reached B: {stdout}"
    );
    assert!(
        stdout.contains(&format!("BLOCK {}:22", b.ip)),
        "A reached B: {stdout}"
    );

    drop((a, b));
    net.delete_tap(&id_a).await.unwrap();
    net.delete_tap(&id_b).await.unwrap();
    net.remove_forward(&id_a).await.unwrap();
}
