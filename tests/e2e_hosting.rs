//! End to end: the real `webhoster serve` binary, real QEMU guests (TCG here),
//! the real network namespace and nftables forwards, the real nginx front.
//! One test, in the order a customer and an operator would live it, because
//! every step builds on the state the previous one left.
//!
//! Everything runs under names unique to this run (state dir, namespace,
//! subnet, ports) and the guard tears it all down even when a step fails.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::deploy::{Deployment, User, call, sign_up};
use common::guest::{sftp_put, ssh, ssh_opts, wait_for};
use common::host::unique_name;
use serde_json::{Value, json};
use webhoster::vmm::dir::is_alive;

fn ssh_ok(port: u16, user: &User, cmd: &str) -> String {
    let out = ssh("127.0.0.1", port, "ubuntu", &user.key, cmd);
    assert!(
        out.status.success(),
        "ssh {cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_hosting_flow() {
    let mut dep = Deployment::new();
    // Usage sampled every 2 s (15 in production), so step 5b sees it move.
    dep.env.insert("WEBHOSTER_USAGE_EVERY", "2".into());
    dep.start().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .build()
        .unwrap();
    let api = dep.api.clone();

    // 1. Two users register and log in.
    let run = unique_name("u");
    let alice = sign_up(&client, &api, &format!("alice-{run}")).await;
    let bob = sign_up(&client, &api, &format!("bob-{run}")).await;

    // 2. Both hostings are created at the same time.
    let started = Instant::now();
    let ((sa, a), (sb, b)) = tokio::join!(alice.create(&client, &api), bob.create(&client, &api));
    eprintln!(
        "two concurrent creates took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(sa, 201, "{a}");
    assert_eq!(sb, 201, "{b}");
    let host_a = a["data"].clone();
    let host_b = b["data"].clone();
    for (user, host) in [(&alice, &host_a), (&bob, &host_b)] {
        assert_eq!(host["hosting"]["status"], "running", "{host}");
        assert_eq!(host["web_url"], dep.site(user.id));
        let port = host["hosting"]["ssh_port"].as_u64().unwrap();
        assert_eq!(host["ssh_command"], format!("ssh -p {port} ubuntu@127.0.0.1"));
    }
    let vm_a = host_a["hosting"]["vm_id"].as_str().unwrap().to_owned();
    let vm_b = host_b["hosting"]["vm_id"].as_str().unwrap().to_owned();
    let port_a = host_a["hosting"]["ssh_port"].as_u64().unwrap() as u16;
    let port_b = host_b["hosting"]["ssh_port"].as_u64().unwrap() as u16;
    let ip_b = host_b["hosting"]["vm_ip"].as_str().unwrap().to_owned();
    assert_ne!(vm_a, vm_b);
    assert_ne!(port_a, port_b);

    // 3. Each site, through nginx, welcomes its own user.
    for user in [&alice, &bob] {
        let (status, page) = dep.get_site(user.id);
        assert_eq!(status, 200);
        assert!(page.contains(&format!("Welcome, {}", user.username)), "{page}");
    }

    // 4. SSH as ubuntu with the user's key.
    let id = ssh_ok(port_a, &alice, "id");
    assert!(id.starts_with("uid=") && id.contains("(ubuntu)"), "{id}");
    assert!(
        !ssh("127.0.0.1", port_a, "ubuntu", &bob.key, "id")
            .status
            .success(),
        "bob's key opened alice's VM"
    );

    // 5. An SFTP upload is served at once.
    let page = dep.state_dir().join("upload.html");
    std::fs::write(&page, format!("<h1>alice {run} was here</h1>\n")).unwrap();
    let out = sftp_put(
        "127.0.0.1",
        port_a,
        "ubuntu",
        &alice.key,
        &page,
        "/var/www/html/index.html",
    );
    assert!(
        out.status.success(),
        "sftp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = dep.get_site(alice.id);
    assert_eq!(
        (status, body.trim()),
        (200, format!("<h1>alice {run} was here</h1>").as_str())
    );

    // 5b. Usage at a glance: the sampler reads alice's real VM. Its CPU
    //     seconds grow, its QEMU is resident, guest disk I/O shows in
    //     QMP's block counters and traffic to its site and SSH in its tap's.
    let before = latest_usage(&client, &api, &alice, None).await;
    assert!(before["rss_bytes"].as_u64().unwrap() > 64 << 20, "{before}");
    ssh_ok(
        port_a,
        &alice,
        "dd if=/dev/urandom of=/home/ubuntu/usage.bin bs=1M count=4 oflag=direct status=none \
         && dd if=/home/ubuntu/usage.bin of=/dev/null bs=1M iflag=direct status=none && rm /home/ubuntu/usage.bin",
    );
    for _ in 0..5 {
        assert_eq!(dep.get_site(alice.id).0, 200);
    }
    let io_done = unix_seconds();
    let after = latest_usage(&client, &api, &alice, Some(io_done)).await;
    eprintln!("usage before the I/O: {before}\nusage after: {after}");
    let grew = |key: &str, by: f64| {
        let (a, b) = (before[key].as_f64().unwrap(), after[key].as_f64().unwrap());
        assert!(
            b >= a + by,
            "{key} went from {a} to {b}, not up by {by}: {before} -> {after}"
        );
    };
    grew("cpu_seconds", 0.01);
    grew("disk_write_bytes", f64::from(4u32 << 20));
    grew("disk_read_bytes", f64::from(4u32 << 20));
    // The pages went out (site and SSH replies), the requests came in.
    grew("net_tx_bytes", 5000.0);
    grew("net_rx_bytes", 1000.0);
    assert!(after["rss_bytes"].as_u64().unwrap() > 64 << 20, "{after}");
    let metrics = client
        .get(api.replace("/api/v1", "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in [
        "webhoster_vm_cpu_seconds_total",
        "webhoster_vm_memory_rss_bytes",
        "webhoster_vm_disk_read_bytes_total",
        "webhoster_vm_disk_write_bytes_total",
        "webhoster_vm_network_receive_bytes_total",
        "webhoster_vm_network_transmit_bytes_total",
    ] {
        for vm in [&vm_a, &vm_b] {
            let series = format!("{family}{{vm_id=\"{vm}\"}} ");
            let value: f64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix(&series))
                .unwrap_or_else(|| panic!("no {series} in /metrics:\n{metrics}"))
                .parse()
                .unwrap();
            assert!(value > 0.0, "{series}{value}");
        }
    }

    // 6. Bob cannot see, stop or delete Alice's hosting: everything he does
    //    lands on his own, and a token he forges for Alice is refused.
    let (status, mine) = bob.host(&client, &api).await;
    assert_eq!(status, 200);
    assert_eq!(mine["data"]["hosting"]["vm_id"], vm_b.as_str());
    let pid_a = dep.qemu_pid(&vm_a);
    let (status, body) = bob.power(&client, &api, "stop").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(dep.qemu_pid(&vm_a), pid_a);
    assert_eq!(dep.get_site(alice.id).0, 200);
    let (status, body) = bob.power(&client, &api, "start").await;
    assert_eq!(status, 200, "{body}");
    let forged = forge_token(&bob.token, alice.id);
    let (status, _) = call(
        &client,
        reqwest::Method::DELETE,
        &format!("{api}/host/my"),
        Some(&forged),
        None,
    )
    .await;
    assert_eq!(status, 401);
    for path in [
        format!("/host/{}", host_a["hosting"]["id"]),
        format!("/host/{vm_a}"),
    ] {
        let (status, _) = call(
            &client,
            reqwest::Method::DELETE,
            &format!("{api}{path}"),
            Some(&bob.token),
            None,
        )
        .await;
        assert!(status == 404 || status == 405, "DELETE {path} gave {status}");
    }
    assert_eq!(dep.qemu_pid(&vm_a), pid_a);
    wait_for("bob's site after his restart", Duration::from_secs(300), || {
        dep.get_site(bob.id).0 == 200
    });

    // 7. Guest A cannot reach guest B (but reaches its own gateway's side of things).
    let probe = format!("timeout 5 bash -c 'echo > /dev/tcp/{ip_b}/80' && echo reached || echo blocked");
    assert_eq!(ssh_ok(port_a, &alice, &probe).trim(), "blocked");

    // 8. SIGTERM webhoster: the sites and an open SSH session stay up.
    let mut session = Command::new("ssh")
        .args(ssh_opts(&alice.key))
        .args(["-p", &port_a.to_string(), "ubuntu@127.0.0.1"])
        .arg("read line; echo got:$line")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let pids = (dep.qemu_pid(&vm_a), dep.qemu_pid(&vm_b));
    dep.stop();
    for user in [&alice, &bob] {
        assert_eq!(
            dep.get_site(user.id).0,
            200,
            "site of {} down while webhoster is stopped",
            user.username
        );
    }
    {
        use std::io::Write;
        let mut stdin = session.stdin.take().unwrap();
        writeln!(stdin, "still-here").unwrap();
    }
    let out = session.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "got:still-here",
        "SSH session did not survive"
    );

    // 9. Start again: it reattaches to the same QEMU processes.
    dep.start().await;
    assert_eq!(
        (dep.qemu_pid(&vm_a), dep.qemu_pid(&vm_b)),
        pids,
        "QEMU was restarted instead of reattached"
    );
    let (status, mine) = alice.host(&client, &api).await;
    assert_eq!(status, 200);
    assert_eq!(mine["data"]["hosting"]["status"], "running", "{mine}");

    // 10. kill -9 a guest's QEMU: it comes back by itself, page intact.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids.0), nix::sys::signal::SIGKILL).unwrap();
    wait_for(
        "alice's VM restarted by the supervisor",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(dep.vm_dir(&vm_a).join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .is_some_and(|pid| pid != pids.0 && is_alive(pid))
        },
    );
    wait_for("alice's site after the crash", Duration::from_secs(300), || {
        dep.get_site(alice.id)
            .1
            .contains(&format!("alice {run} was here"))
    });

    // 11. Delete Bob's hosting: everything it held is gone, Alice still serves.
    let tap_b = webhoster::net::tap_name(&vm_b);
    let pid_b = dep.qemu_pid(&vm_b);
    let (status, body) = bob.delete_host(&client, &api).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(dep.get_site(bob.id).0, 404);
    assert!(
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port_b).into(), Duration::from_secs(3))
            .is_err()
            || !ssh("127.0.0.1", port_b, "ubuntu", &bob.key, "true")
                .status
                .success(),
        "bob's SSH port still answers"
    );
    assert!(!is_alive(pid_b), "bob's QEMU still runs");
    assert!(!dep.vm_dir(&vm_b).exists(), "bob's VM directory is left");
    let links = Command::new("ip")
        .args(["netns", "exec", &dep.netns, "ip", "-o", "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&tap_b),
        "bob's tap is left"
    );
    let rules = Command::new("nft").args(["list", "ruleset"]).output().unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains(&vm_b) && !rules.contains(&format!("dport {port_b} ")),
        "bob's forward is left"
    );
    let (status, _) = bob.host(&client, &api).await;
    assert_eq!(status, 404, "bob's row is left");
    assert!(
        dep.get_site(alice.id)
            .1
            .contains(&format!("alice {run} was here"))
    );

    // 12. Shut everything down: nothing of ours is left on the host.
    dep.stop();
    let out = dep.command(&["teardown"]).output().unwrap();
    assert!(
        out.status.success(),
        "teardown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = dep.leftovers();
    assert!(left.is_empty(), "left on the host: {left:#?}");
}

/// The latest usage sample of `user`'s hosting, once there is one (stamped
/// after `taken_after`, when given) and the history holds at least two. A
/// sample is stamped before its counters are read, so one stamped a whole
/// second after the I/O ended saw all of it; counting sample periods since
/// an earlier sample does not, when the SSH session outlasts them.
async fn latest_usage(client: &reqwest::Client, api: &str, user: &User, taken_after: Option<i64>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = call(
            client,
            reqwest::Method::GET,
            &format!("{api}/host/my/usage"),
            Some(&user.token),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let data = &body["data"];
        assert_eq!(data["sample_every_seconds"], 2, "{body}");
        let latest = &data["latest"];
        let newer = match taken_after {
            Some(t) => latest["at"].as_i64().is_some_and(|at| at > t),
            None => !latest.is_null(),
        };
        if newer && data["history"].as_array().is_some_and(|h| h.len() >= 2) {
            assert_eq!(data["history"].as_array().unwrap().last().unwrap(), latest);
            return latest.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no new usage sample within 60 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn unix_seconds() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    i64::try_from(since.unwrap().as_secs()).unwrap()
}

/// Re-signs nothing: swaps the subject of a valid token, which must then fail
/// its signature check.
fn forge_token(token: &str, user_id: i64) -> String {
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut claims: Value = serde_json::from_slice(&engine.decode(&parts[1]).unwrap()).unwrap();
    claims["sub"] = json!(user_id.to_string());
    parts[1] = engine.encode(serde_json::to_vec(&claims).unwrap());
    parts.join(".")
}
