//! Failures with the real parts: the real `webhoster serve`, QEMU, network
//! namespace, nftables and nginx. A create that fails, and a service killed
//! in the middle of a create, leave either a running hosting or nothing: no
//! process, tap, forward, site, VM directory or row.

mod common;

use std::process::Command;
use std::time::Duration;

use common::deploy::{Deployment, sign_up};
use common::host::unique_name;

/// What the deployment still holds for VMs: QEMU processes, taps, forwards,
/// VM directories.
fn vm_leftovers(dep: &Deployment) -> Vec<String> {
    let mut left: Vec<String> = dep
        .our_processes()
        .into_iter()
        .filter(|p| p.contains("qemu-system"))
        .collect();
    let links = Command::new("ip")
        .args(["netns", "exec", &dep.netns, "ip", "-o", "link"])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        if line.contains(": whv") {
            left.push(format!("tap {line}"));
        }
    }
    let map = Command::new("nft")
        .args([
            "list",
            "map",
            "ip",
            &format!("webhoster_{}", dep.netns),
            "ssh_fwd",
        ])
        .output()
        .unwrap();
    let map = String::from_utf8_lossy(&map.stdout);
    if map.contains("vm-") {
        left.push(format!("forward {map}"));
    }
    if let Ok(entries) = std::fs::read_dir(dep.state_dir().join("vms")) {
        left.extend(
            entries
                .flatten()
                .map(|e| format!("VM directory {}", e.path().display())),
        );
    }
    left
}

/// Waits until the user's create is at its readiness step: by then QEMU
/// runs and the seed, disk, tap and forward exist for real.
async fn at_readiness_step(dep: &Deployment, client: &reqwest::Client, user: &common::deploy::User) {
    let started = std::time::Instant::now();
    loop {
        let (_, body) = user.host(client, &dep.api).await;
        if body["data"]["hosting"]["step"] == "ready" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the create never reached its readiness step: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!vm_leftovers(dep).is_empty(), "the create had made nothing yet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_fails_is_undone_completely() {
    let mut dep = Deployment::new();
    // No guest boots in a second here: the create fails at its readiness
    // step, after the seed, disk, tap, QEMU and forward were made for real.
    dep.env.insert("WEBHOSTER_READY_TIMEOUT", "1".into());
    dep.start().await;
    let client = reqwest::Client::new();
    let user = sign_up(&client, &dep.api, &unique_name("fail")).await;
    let (status, body) = user.create(&client, &dep.api).await;
    assert!(status >= 500, "{status} {body}");
    assert_eq!(body["success"], false);
    assert!(body["message"].as_str().unwrap().contains("undone"), "{body}");
    let (status, body) = user.host(&client, &dep.api).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(dep.get_site(user.id).0, 404);
    let left = vm_leftovers(&dep);
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_killed_mid_create_recovers_to_nothing() {
    let mut dep = Deployment::new();
    dep.start().await;
    let client = reqwest::Client::new();
    let user = sign_up(&client, &dep.api, &unique_name("kill")).await;
    let resp = client
        .post(format!("{}/host?wait=false", dep.api))
        .bearer_auth(&user.token)
        .json(&serde_json::json!({"ssh_public_key": user.key.public_line()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // Kill the service while it waits for the guest: by then QEMU runs and
    // the tap and the forward exist.
    at_readiness_step(&dep, &client, &user).await;
    dep.kill();

    dep.start().await;
    let (status, body) = user.host(&client, &dep.api).await;
    assert_eq!(status, 404, "the unfinished create was not undone: {body}");
    let left = vm_leftovers(&dep);
    assert!(left.is_empty(), "left behind: {left:#?}");
    dep.stop();
}

/// DELETE always works: a create in flight (QEMU, tap and forward made for
/// real, the guest still booting) is cancelled, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cancels_a_create_in_flight() {
    let mut dep = Deployment::new();
    dep.start().await;
    let client = reqwest::Client::new();
    let user = sign_up(&client, &dep.api, &unique_name("cancel")).await;
    let waiting = {
        let (client, api, token, key) = (
            client.clone(),
            dep.api.clone(),
            user.token.clone(),
            user.key.public_line().to_owned(),
        );
        tokio::spawn(async move {
            let resp = client
                .post(format!("{api}/host"))
                .bearer_auth(token)
                .json(&serde_json::json!({ "ssh_public_key": key }))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        })
    };
    at_readiness_step(&dep, &client, &user).await;
    let (status, body) = user.delete_host(&client, &dep.api).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = waiting.await.unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("create_cancelled")),
        "{body}"
    );
    let (status, body) = user.host(&client, &dep.api).await;
    assert_eq!(status, 404, "{body}");
    let left = vm_leftovers(&dep);
    assert!(left.is_empty(), "left behind: {left:#?}");
    dep.stop();
}

/// What a crash or an operator left (a tap, a forward, a VM directory that
/// no hosting owns) is removed by the reaper when `serve` starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_removes_what_no_hosting_owns() {
    let mut dep = Deployment::new();
    dep.start().await;
    dep.stop();
    let orphan = "vm-0rphan00";
    let tap = webhoster::net::tap_name(orphan);
    let run = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    run(&[
        "ip", "netns", "exec", &dep.netns, "ip", "tuntap", "add", &tap, "mode", "tap",
    ]);
    let table = format!("webhoster_{}", dep.netns);
    let port = dep.env["WEBHOSTER_SSH_PORTS"]
        .split('-')
        .next()
        .unwrap()
        .to_owned();
    let element = format!("{{ {port} comment \"{orphan}\" : 10.1.1.1 . 22 }}");
    run(&["nft", "add", "element", "ip", &table, "ssh_fwd", &element]);
    std::fs::create_dir_all(dep.state_dir().join("vms").join(orphan)).unwrap();
    assert_eq!(vm_leftovers(&dep).len(), 3, "{:#?}", vm_leftovers(&dep));
    dep.start().await;
    let left = vm_leftovers(&dep);
    assert!(left.is_empty(), "left behind: {left:#?}");
    dep.stop();
}
