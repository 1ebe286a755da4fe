//! Boots the real guest image under QEMU (TCG) with NoCloud seeds and checks
//! what a user of the VM relies on: the page on :80, SSH, SFTP into
//! /var/www/html, the hostname, the grown root filesystem. User-mode
//! networking with loopback-only `hostfwd` and `restrict=on`: no egress.

mod common;

use std::time::Duration;

use common::guest::{self, Guest, GuestOptions, TestKey};

/// Under TCG on a busy 2-core machine a boot takes 10-60 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn wait_for_page(guest: &mut Guest, needle: &str) -> String {
    let mut body = String::new();
    let http = guest.http;
    let waited = guest::wait_for("the page on :80", BOOT_TIMEOUT, || {
        guest.assert_alive();
        match guest::http_get(http, "/") {
            Ok((200, b)) if b.contains(needle) => {
                body = b;
                true
            }
            _ => false,
        }
    });
    eprintln!(
        "page served {:.1}s after QEMU start",
        (guest.started.elapsed()).as_secs_f64()
    );
    let _ = waited;
    body
}

fn wait_for_ssh(guest: &mut Guest, user: &str, key: &TestKey) {
    let port = guest.ssh_port;
    guest::wait_for("an SSH login", BOOT_TIMEOUT, || {
        guest.assert_alive();
        guest::ssh("127.0.0.1", port, user, key, "true").status.success()
    });
    eprintln!(
        "SSH login {:.1}s after QEMU start",
        guest.started.elapsed().as_secs_f64()
    );
}

#[test]
fn boots_any_nocloud_seed() {
    let image = guest::test_image();
    let key = TestKey::new();
    let dir = tempfile::tempdir().unwrap();
    // A password for alice, turned on for SSH as many foreign seeds do
    // (cloud-init's set-passwords; adm lets her read the whole journal).
    let password = format!("pw-{}", rand::random::<u64>());
    let user_data = format!(
        r#"#cloud-config
hostname: seedtest
ssh_pwauth: true
chpasswd:
  expire: false
  users:
    - name: alice
      password: {password}
      type: text
users:
  - name: alice
    shell: /bin/bash
    groups: [www-data, adm]
    lock_passwd: false
    ssh_authorized_keys:
      - {key}
write_files:
  - path: /var/www/html/index.html
    content: |
      <h1>hand-written seed page</h1>
"#,
        key = key.public_line()
    );
    let seed = dir.path().join("seed.iso");
    guest::write_seed(
        &[
            ("user-data", user_data.as_bytes()),
            ("meta-data", b"instance-id: iid-seedtest\n"),
        ],
        &seed,
    );
    let mut vm = Guest::boot(&image, &seed, &GuestOptions::default());

    wait_for_page(&mut vm, "hand-written seed page");
    wait_for_ssh(&mut vm, "alice", &key);
    let port = vm.ssh_port;
    let ssh = |cmd: &str| {
        let out = guest::ssh("127.0.0.1", port, "alice", &key, cmd);
        assert!(out.status.success(), "{cmd}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };

    assert_eq!(ssh("hostname"), "seedtest");
    assert_eq!(ssh("id -un"), "alice");

    // The root filesystem grew past the base image's to the 4 GiB disk.
    let root_bytes: u64 = ssh("df -B1 --output=size / | tail -n 1").parse().unwrap();
    let base_virtual = qcow2_virtual_size(&image.disk);
    assert!(
        root_bytes > base_virtual,
        "root fs {root_bytes} B is not larger than the base image's {base_virtual} B"
    );
    assert!(
        root_bytes > 3 << 30,
        "root fs {root_bytes} B did not grow to the disk"
    );

    // Host keys were made in this VM at first boot (after systemd wrote
    // its machine-id), never baked into the image; ed25519 only.
    assert_eq!(
        ssh("find /etc/ssh -maxdepth 1 -name 'ssh_host_*_key' -newer /etc/machine-id"),
        "/etc/ssh/ssh_host_ed25519_key"
    );
    assert_eq!(ssh("cat /etc/machine-id").len(), 32);

    // SFTP into /var/www/html, then nginx serves it.
    let local = dir.path().join("upload.html");
    std::fs::write(&local, "<p>uploaded over sftp</p>\n").unwrap();
    let out = guest::sftp_put(
        "127.0.0.1",
        vm.ssh_port,
        "alice",
        &key,
        &local,
        "/var/www/html/upload.html",
    );
    assert!(out.status.success(), "sftp: {out:?}");
    let (status, body) = guest::http_get(vm.http, "/upload.html").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("uploaded over sftp"), "{body}");

    // The seed's password works over SSH, and turning it on did not
    // restart sshd (set-passwords ran before sshd first started).
    guest::wait_for("the end of the boot", BOOT_TIMEOUT, || {
        vm.assert_alive();
        let out = guest::ssh("127.0.0.1", port, "alice", &key, "systemctl is-system-running");
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(state != "degraded", "the guest booted degraded");
        state == "running"
    });
    let out = std::process::Command::new("sshpass")
        .args(["-p", &password, "ssh"])
        // ssh takes the first value given: BatchMode=no (sshpass answers the
        // prompt) replaces the helpers' BatchMode=yes in place.
        .args(guest::ssh_opts(&key).into_iter().map(|o| {
            if o == "BatchMode=yes" {
                "BatchMode=no".to_owned()
            } else {
                o
            }
        }))
        .args(["-o", "PubkeyAuthentication=no"])
        .args(["-o", "PreferredAuthentications=password", "-p", &port.to_string()])
        .args(["alice@127.0.0.1", "id -un"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("sshpass (Debian package sshpass)");
    assert!(out.status.success(), "password login: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice");
    let journal = ssh("journalctl -b -o cat --no-pager -u ssh.service");
    assert_eq!(
        journal.lines().filter(|l| l.starts_with("Started ")).count(),
        1,
        "sshd started more than once:\n{journal}"
    );
    assert!(
        !journal.contains("Received signal"),
        "sshd was restarted:\n{journal}"
    );
}

#[test]
fn boots_webhosters_own_seed() {
    let image = guest::test_image();
    let key = TestKey::new();
    let dir = tempfile::tempdir().unwrap();
    let spec = webhoster::seed::SeedSpec {
        instance_id: "vm-imagetest".into(),
        hostname: "vm-imagetest".into(),
        user: "ubuntu".into(),
        ssh_keys: vec![webhoster::auth::SshPublicKey::parse(key.public_line()).unwrap()],
        owner: "carol".into(),
        network: None,
    };
    let seed = dir.path().join("seed.iso");
    let spec2 = spec.clone();
    let seed2 = seed.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(webhoster::seed::write(&spec2, &seed2))
    })
    .join()
    .unwrap()
    .unwrap();
    let mut vm = Guest::boot(&image, &seed, &GuestOptions::default());

    let body = wait_for_page(&mut vm, "Welcome, carol!");
    assert!(body.contains("vm-imagetest"), "{body}");
    wait_for_ssh(&mut vm, "ubuntu", &key);
    let out = guest::ssh(
        "127.0.0.1",
        vm.ssh_port,
        "ubuntu",
        &key,
        "hostname; id -nG; stat -c '%U:%G %a' /var/www/html; sudo -n true && echo sudo-ok; systemctl is-active nginx ssh systemd-journald",
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "vm-imagetest");
    assert!(lines[1].split_whitespace().any(|g| g == "www-data"), "{text}");
    assert!(lines[1].split_whitespace().any(|g| g == "sudo"), "{text}");
    assert_eq!(lines[2], "root:www-data 2775");
    assert_eq!(lines[3], "sudo-ok");
    assert_eq!(&lines[4..], ["active", "active", "active"], "{text}");
}

/// webhoster's seed with a static address matched by MAC (as on the bridge):
/// here inside QEMU's user-mode network (10.0.2.0/24, gateway 10.0.2.2,
/// where hostfwd sends to 10.0.2.15).
#[test]
fn boots_a_static_network_matched_by_mac() {
    let image = guest::test_image();
    let key = TestKey::new();
    let dir = tempfile::tempdir().unwrap();
    let mac = "52:54:00:5e:00:2a";
    let spec = webhoster::seed::SeedSpec {
        instance_id: "vm-statictest".into(),
        hostname: "vm-statictest".into(),
        user: "ubuntu".into(),
        ssh_keys: vec![webhoster::auth::SshPublicKey::parse(key.public_line()).unwrap()],
        owner: "dave".into(),
        network: Some(webhoster::seed::StaticNetwork {
            mac: mac.into(),
            address: "10.0.2.15/24".parse().unwrap(),
            gateway: "10.0.2.2".parse().unwrap(),
        }),
    };
    let seed = dir.path().join("seed.iso");
    let seed2 = seed.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(webhoster::seed::write(&spec, &seed2))
    })
    .join()
    .unwrap()
    .unwrap();
    let opts = GuestOptions {
        mac: Some(mac.into()),
        ..GuestOptions::default()
    };
    let mut vm = Guest::boot(&image, &seed, &opts);
    wait_for_page(&mut vm, "Welcome, dave!");
    wait_for_ssh(&mut vm, "ubuntu", &key);
    let out = guest::ssh(
        "127.0.0.1",
        vm.ssh_port,
        "ubuntu",
        &key,
        "ip -o -4 addr show dev eth0; ip route show default",
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("10.0.2.15/24"), "{text}");
    assert!(text.contains("default via 10.0.2.2 dev eth0"), "{text}");
}

fn qcow2_virtual_size(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}
