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

/// `cmd` over SSH as `user`, which must succeed: its output, trimmed.
fn ssh_ok(port: u16, user: &str, key: &TestKey, cmd: &str) -> String {
    let out = guest::ssh("127.0.0.1", port, user, key, cmd);
    assert!(out.status.success(), "{cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Waits until the guest's boot is over; a degraded one fails the test.
fn wait_for_boot_end(guest: &mut Guest, user: &str, key: &TestKey) {
    let port = guest.ssh_port;
    guest::wait_for("the end of the boot", BOOT_TIMEOUT, || {
        guest.assert_alive();
        let out = guest::ssh("127.0.0.1", port, user, key, "systemctl is-system-running");
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(state != "degraded", "the guest booted degraded");
        state == "running"
    });
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
# Modules the seed agent does not apply (chpasswd, packages): the whole seed
# goes to cloud-init, as before the agent.
packages: []
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
    let ssh = |cmd: &str| ssh_ok(port, "alice", &key, cmd);

    assert_eq!(ssh("hostname"), "seedtest");
    assert_eq!(ssh("id -un"), "alice");
    // The agent handed this seed over, and cloud-init applied it.
    assert_eq!(
        ssh("cat /var/lib/webhoster-seed/instance"),
        "iid-seedtest\tcloud-init"
    );
    assert!(
        ssh("journalctl -b -o cat --no-pager -u webhoster-seed.service")
            .contains("handing the seed over to cloud-init"),
    );

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
    wait_for_boot_end(&mut vm, "alice", &key);
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
    let pid1 = ssh(guest::PID1_JOURNAL);
    assert_eq!(
        guest::unit_events(&pid1, "Started", "ssh.service"),
        1,
        "sshd started more than once:\n{pid1}"
    );
    let journal = ssh("journalctl -b -o cat --no-pager -u ssh.service");
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
    // webhoster's own seed is applied by the seed agent: cloud-init stood down.
    let out = guest::ssh(
        "127.0.0.1",
        vm.ssh_port,
        "ubuntu",
        &key,
        "cat /var/lib/webhoster-seed/instance; test -e /var/lib/cloud/instance && echo cloud-init-ran; true",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "vm-imagetest\tagent\n",
        "{out:?}"
    );

    // No network-config: the agent took a DHCP lease at boot, and networkd,
    // once up, took it over (same address) on the NIC that kept its kernel
    // name.
    let port = vm.ssh_port;
    let ssh = |cmd: &str| ssh_ok(port, "ubuntu", &key, cmd);
    wait_for_boot_end(&mut vm, "ubuntu", &key);
    let agent = ssh("sudo -n journalctl -b -o cat --no-pager -u webhoster-seed.service");
    assert!(
        agent.contains("eth0: 10.0.2.15/24 from DHCP server 10.0.2.2"),
        "{agent}"
    );
    let networkd = ssh("sudo -n journalctl -b -o cat --no-pager -u systemd-networkd.service");
    assert!(
        networkd.contains("eth0: DHCPv4 address 10.0.2.15/24"),
        "{networkd}"
    );
    let addrs = ssh("ip -4 -o addr show dev eth0");
    assert_eq!(addrs.lines().count(), 1, "{addrs}");
    assert!(addrs.contains("10.0.2.15/24"), "{addrs}");
    // networkd holds it as its own lease (no default route: QEMU's
    // restricted user network offers no router).
    let status = ssh("networkctl status eth0 --no-pager");
    assert!(
        status.contains("10.0.2.15 (DHCP4 via 10.0.2.2)") && status.contains("(configured)"),
        "{status}"
    );
    let udev = ssh("sudo -n journalctl -b -o cat --no-pager -u systemd-udevd.service");
    assert!(!udev.contains("rename"), "{udev}");
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

/// The foreign-seed case: a NoCloud seed written here with genisoimage (not
/// by webhoster's seed module) and booted by bare `qemu-system`. The seed
/// agent applies it (users, keys, write_files with encodings, owners and
/// modes, hostname and FQDN, network-config v2 DHCP, bootcmd, runcmd) and
/// cloud-init stands down. Prints the times to HTTP and SSH and the agent's
/// own run time.
#[test]
fn a_foreign_seed_is_applied_by_the_agent_under_bare_qemu() {
    use base64::Engine;
    use std::io::Write;
    let image = guest::test_image();
    let key = TestKey::new();
    let dir = tempfile::tempdir().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"gzipped line\n").unwrap();
    let gz = b64.encode(gz.finish().unwrap());
    let iid = format!("iid-foreign-{}", rand::random::<u32>());
    let user_data = format!(
        r#"#cloud-config
hostname: foreign
fqdn: foreign.example.test
manage_etc_hosts: true
ssh_pwauth: false
users:
  - name: webadmin
    gecos: Web Admin
    shell: /bin/bash
    groups: [www-data, adm]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    lock_passwd: true
    ssh_authorized_keys:
      - {key}
write_files:
  - path: /var/www/html/index.html
    owner: root:www-data
    permissions: '0640'
    content: |
      <h1>foreign seed page</h1>
  - path: /etc/foreign/secret.conf
    owner: webadmin:webadmin
    permissions: '0600'
    encoding: b64
    content: {secret}
    defer: true
  - path: /etc/foreign/zipped.txt
    encoding: gzip+base64
    content: {gz}
  - path: /etc/foreign/zipped.txt
    append: true
    content: "appended line\n"
bootcmd:
  - echo "boot $INSTANCE_ID" >> /var/tmp/bootcmd.log
runcmd:
  - [sh, -c, "id -un > /var/tmp/runcmd.out"]
"#,
        key = key.public_line(),
        secret = b64.encode("secret=42\n"),
    );
    let network = "version: 2\nethernets:\n  nic:\n    match:\n      name: \"en*\"\n    dhcp4: true\n";
    let seed_dir = dir.path().join("cidata");
    std::fs::create_dir(&seed_dir).unwrap();
    std::fs::write(seed_dir.join("user-data"), user_data).unwrap();
    std::fs::write(
        seed_dir.join("meta-data"),
        format!("instance-id: {iid}\nlocal-hostname: not-this-one\n"),
    )
    .unwrap();
    std::fs::write(seed_dir.join("network-config"), network).unwrap();
    let seed = dir.path().join("seed.iso");
    let out = std::process::Command::new("genisoimage")
        .args(["-quiet", "-V", "cidata", "-J", "-R", "-o"])
        .arg(&seed)
        .arg(&seed_dir)
        .output()
        .expect("genisoimage (Debian package genisoimage)");
    assert!(out.status.success(), "genisoimage: {out:?}");

    let mut vm = Guest::boot(&image, &seed, &GuestOptions::default());
    wait_for_page(&mut vm, "foreign seed page");
    let http_at = vm.started.elapsed();
    wait_for_ssh(&mut vm, "webadmin", &key);
    let ssh_at = vm.started.elapsed();
    eprintln!(
        "foreign seed under bare qemu: HTTP {:.1}s, SSH login {:.1}s after QEMU start",
        http_at.as_secs_f64(),
        ssh_at.as_secs_f64()
    );
    let port = vm.ssh_port;
    let ssh = |cmd: &str| ssh_ok(port, "webadmin", &key, cmd);
    wait_for_boot_end(&mut vm, "webadmin", &key);

    assert_eq!(ssh("hostname; hostname -f"), "foreign\nforeign.example.test");
    // The root filesystem grew to the 4 GiB disk (webhoster-growfs.service).
    let root_bytes: u64 = ssh("df -B1 --output=size / | tail -n 1").parse().unwrap();
    assert!(
        root_bytes > 3 << 30,
        "root fs {root_bytes} B did not grow to the disk"
    );
    assert_eq!(ssh("id -un; id -nG"), "webadmin\nwebadmin adm www-data");
    assert_eq!(
        ssh("getent passwd webadmin | cut -d: -f5-7"),
        "Web Admin:/home/webadmin:/bin/bash"
    );
    assert_eq!(
        ssh(
            "stat -c '%n %U:%G %a' /var/www/html/index.html /etc/foreign/secret.conf /etc/foreign/zipped.txt /home/webadmin/.ssh/authorized_keys"
        ),
        "/var/www/html/index.html root:www-data 640\n\
         /etc/foreign/secret.conf webadmin:webadmin 600\n\
         /etc/foreign/zipped.txt root:root 644\n\
         /home/webadmin/.ssh/authorized_keys webadmin:webadmin 600"
    );
    assert_eq!(ssh("cat /etc/foreign/secret.conf"), "secret=42");
    assert_eq!(ssh("cat /etc/foreign/zipped.txt"), "gzipped line\nappended line");
    assert_eq!(ssh("sudo -n cat /var/tmp/bootcmd.log"), format!("boot {iid}"));
    assert_eq!(ssh("cat /var/tmp/runcmd.out"), "root");
    // The network came from the seed's v2 DHCP config, via networkd.
    assert!(ssh("networkctl list --no-legend").contains("configured"));
    assert!(ssh("ls /etc/systemd/network").contains("10-webhoster-nic.network"));
    // The agent applied it; cloud-init stood down.
    assert_eq!(
        ssh("cat /var/lib/webhoster-seed/instance"),
        format!("{iid}\tagent")
    );
    assert_eq!(
        ssh("test -e /var/lib/cloud/instance && echo ran || echo stood-down"),
        "stood-down"
    );
    assert_eq!(
        ssh("find /etc/ssh -maxdepth 1 -name 'ssh_host_*_key'"),
        "/etc/ssh/ssh_host_ed25519_key"
    );
    let agent_log = ssh("journalctl -b -o cat --no-pager -u webhoster-seed.service");
    let line = agent_log
        .lines()
        .find(|l| l.contains("applied the seed in "))
        .unwrap_or_else(|| panic!("agent log: {agent_log}"));
    eprintln!("in the guest: {line}");
    if let Some(steps) = agent_log.lines().find(|l| l.contains("steps (ms): ")) {
        eprintln!("in the guest: {steps}");
    }
    eprintln!(
        "in the guest: {}",
        ssh("systemd-analyze time | head -n 1; systemd-analyze blame --no-pager | head -n 8")
    );
    let journal = ssh(&format!("sudo -n {}", guest::PID1_JOURNAL));
    for unit in ["ssh.service", "nginx.service"] {
        assert_eq!(
            guest::unit_events(&journal, "Started", unit),
            1,
            "{unit} starts once:\n{journal}"
        );
    }
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
