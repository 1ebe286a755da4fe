//! Cold boots of the guest image under QEMU (TCG, 1 vCPU, 1 GiB): seconds from
//! QEMU start to HTTP 200 (the seed's page) and to the first SSH login.
//! `BOOT_RUNS` (default 5) sets the number of boots; `BOOT_QEMU_ARGS` adds
//! QEMU arguments (space separated) to compare settings.

#[allow(dead_code)]
#[path = "../tests/common/guest.rs"]
mod guest;

use std::time::Duration;

use guest::{Guest, GuestOptions, TestKey};

fn stats(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    println!(
        "{name:<14} min {:>6.2} s   median {:>6.2} s   max {:>6.2} s   (n={})",
        v[0],
        median,
        v[v.len() - 1],
        v.len()
    );
}

fn main() {
    let runs: usize = std::env::var("BOOT_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let extra: Vec<String> = std::env::var("BOOT_QEMU_ARGS")
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let image = guest::test_image();
    let key = TestKey::new();
    let dir = tempfile::tempdir().unwrap();
    let user_data = format!(
        "#cloud-config\nhostname: bench\nusers:\n  - name: bench\n    ssh_authorized_keys:\n      - {}\nwrite_files:\n  - path: /var/www/html/index.html\n    content: \"bench page\\n\"\n",
        key.public_line()
    );
    let (mut http, mut ssh) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let seed = dir.path().join(format!("seed-{run}.iso"));
        let meta = format!("instance-id: bench-{run}\n");
        guest::write_seed(
            &[
                ("user-data", user_data.as_bytes()),
                ("meta-data", meta.as_bytes()),
            ],
            &seed,
        );
        let opts = GuestOptions {
            extra_args: extra.clone(),
            ..GuestOptions::default()
        };
        let mut vm = Guest::boot(&image, &seed, &opts);
        let (addr, port, started) = (vm.http, vm.ssh_port, vm.started);
        let deadline = Duration::from_secs(300);
        // Each probe on its own thread, so a slow one does not delay the other.
        let h = std::thread::spawn(move || {
            guest::wait_for(
                "HTTP 200",
                deadline,
                || matches!(guest::http_get(addr, "/"), Ok((200, b)) if b.contains("bench page")),
            );
            started.elapsed().as_secs_f64()
        });
        let key_path = key.private_path().to_owned();
        let s = std::thread::spawn(move || {
            guest::wait_for("SSH login", deadline, || {
                std::process::Command::new("ssh")
                    .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
                    .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
                    .args(["-o", "ConnectTimeout=3", "-i"])
                    .arg(&key_path)
                    .args(["-p", &port.to_string(), "bench@127.0.0.1", "true"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
            started.elapsed().as_secs_f64()
        });
        let (th, ts) = (h.join(), s.join());
        vm.assert_alive();
        let (th, ts) = (th.expect("HTTP never answered"), ts.expect("SSH never answered"));
        println!("boot {}: HTTP 200 at {th:.2} s, SSH login at {ts:.2} s", run + 1);
        http.push(th);
        ssh.push(ts);
    }
    stats("HTTP 200", http);
    stats("SSH login", ssh);
    let m = &image.manifest;
    let disk = m.files.get("disk.qcow2").map(|f| f.size).unwrap_or(0);
    println!(
        "base image     {:.1} MiB qcow2 ({})",
        disk as f64 / (1 << 20) as f64,
        image.disk.display()
    );
    println!("cold build     {:.1} s (built {})", m.build_seconds, m.built_at);
    println!(
        "packages       {} ({:.0} MiB installed)",
        m.packages.len(),
        m.installed_kib as f64 / 1024.0
    );
}
