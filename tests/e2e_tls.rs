//! End to end over HTTPS: the real `webhoster serve` with `--tls-self-signed`
//! and `--site-domain`, one real guest (TCG here), and curl as the TLS
//! client, trusting only the certificate serve made in its state dir.
//! The site answers at its host name and at its path over HTTPS, its path
//! over HTTP as before, and the API answers through the front over HTTPS.
//!
//! Everything runs under names unique to this run (state dir, namespace,
//! subnet, ports) and the guard tears it all down even when a step fails.

mod common;

use std::time::{Duration, Instant};

use common::deploy::{Deployment, sign_up};
use common::host::{free_port, unique_name};
use common::https::curl;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_over_https_by_host_name_and_path() {
    let mut dep = Deployment::new();
    let https_port = free_port();
    dep.env.insert("WEBHOSTER_TLS_SELF_SIGNED", "true".into());
    dep.env
        .insert("WEBHOSTER_HTTPS_ADDR", format!("127.0.0.1:{https_port}"));
    dep.env.insert("WEBHOSTER_SITE_DOMAIN", "sites.test".into());
    dep.start().await;
    let ca = dep.state_dir().join("tls/self-signed.crt");
    let ca = ca.to_str().unwrap().to_owned();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .build()
        .unwrap();

    let user = sign_up(&client, &dep.api, &unique_name("tls")).await;
    let started = Instant::now();
    let (status, created) = user.create(&client, &dep.api).await;
    eprintln!("create took {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(status, 201, "{created}");
    let host = &created["data"];
    let name = format!("{}.sites.test", user.username);
    assert_eq!(host["web_url"], format!("http://{name}:{}/", dep.http_port));
    assert_eq!(host["web_isolation"], "origin");
    assert_eq!(host["https_url"], format!("https://{name}:{https_port}/"));

    // The host name over HTTPS (SNI and Host), verified against serve's
    // own certificate, which covers *.sites.test.
    let resolve = format!("{name}:{https_port}:127.0.0.1");
    let welcome = format!("Welcome, {}", user.username);
    let by_name = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        host["https_url"].as_str().unwrap(),
    ])
    .await
    .unwrap();
    assert_eq!(by_name.status, 200, "{by_name:?}");
    assert!(by_name.body.contains(&welcome), "{}", by_name.body);
    assert!(
        !by_name.head.contains("content-security-policy"),
        "{}",
        by_name.head
    );

    // The path over HTTPS (the certificate covers the public host,
    // 127.0.0.1), sandboxed as over HTTP; and over HTTP as before.
    let by_path = curl(&[
        "--cacert",
        &ca,
        &format!("https://127.0.0.1:{https_port}/{}/", user.id),
    ])
    .await
    .unwrap();
    assert_eq!(by_path.status, 200, "{by_path:?}");
    assert!(by_path.body.contains(&welcome));
    assert!(
        by_path.head.contains("content-security-policy: sandbox"),
        "{}",
        by_path.head
    );
    let (status, page) = dep.get_site(user.id);
    assert_eq!(status, 200);
    assert!(page.contains(&welcome));

    // The API through the front over HTTPS, with the caller's token.
    let bearer = format!("authorization: Bearer {}", user.token);
    let mine = curl(&[
        "--cacert",
        &ca,
        "-H",
        &bearer,
        &format!("https://127.0.0.1:{https_port}/api/v1/host/my"),
    ])
    .await
    .unwrap();
    assert_eq!(mine.status, 200, "{mine:?}");
    assert_eq!(mine.json()["data"]["https_url"], host["https_url"]);
    assert_eq!(mine.json()["data"]["hosting"]["status"], "running");

    let (status, deleted) = user.delete_host(&client, &dep.api).await;
    assert_eq!(status, 200, "{deleted}");
}
