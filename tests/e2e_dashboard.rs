//! End to end in a real browser: Debian's chromium drives the pages of the
//! real `webhoster serve` binary through its nginx front, and the hosting is a
//! real QEMU guest. One test, in the order a new user lives it: sign up, log
//! in, create and watch the progress bar, open the site, stop and start,
//! delete, log out (and the back button shows no dashboard).
//!
//! The screenshot taken while the site is being created is the one the README
//! shows; the test writes it to the artifacts dir every run.

mod common;

use std::time::{Duration, Instant};

use common::browser::Browser;
use common::deploy::Deployment;
use common::host::unique_name;
use fantoccini::Locator;

/// How long a create, a stop or a start may take on a busy 2-core TCG host.
const SETTLE: Duration = Duration::from_secs(600);

async fn text_of(b: &Browser, css: &str) -> Option<String> {
    match b.client().find(Locator::Css(css)).await {
        Ok(el) => el.text().await.ok(),
        Err(_) => None,
    }
}

async fn click(b: &Browser, css: &str) {
    b.client()
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} is on the page: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn fill(b: &Browser, css: &str, value: &str) {
    let el = b
        .client()
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} is on the page: {e}"));
    el.clear().await.unwrap();
    el.send_keys(value).await.unwrap();
}

/// Waits until the dashboard's data attribute (stable across languages)
/// says the hosting is `want`.
async fn wait_state(b: &Browser, want: &str) {
    let started = Instant::now();
    loop {
        let state = b
            .client()
            .execute(
                "const h = document.getElementById('hosting'); return h ? h.dataset.state : null;",
                vec![],
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        if state.as_deref() == Some(want) {
            return;
        }
        assert!(
            started.elapsed() < SETTLE,
            "the dashboard never showed {want}; it shows {state:?}"
        );
        // The page's script reloads it when the state moves; a refresh
        // here does not depend on that.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = b.client().refresh().await;
    }
}

/// Waits until the browser is on `path` (a form post answers after the
/// password hash, under load in seconds); says what the page shows if not.
async fn wait_path(b: &Browser, path: &str) {
    let started = Instant::now();
    loop {
        let url = b.client().current_url().await.unwrap();
        if url.path() == path {
            return;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let errors = text_of(b, "main").await.unwrap_or_default();
            panic!("still at {url}, not {path}; the page says: {errors}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_user_lives_the_whole_product_in_the_browser() {
    let mut dep = Deployment::new();
    dep.start().await;
    let front = format!("http://127.0.0.1:{}", dep.http_port);
    let mut b = Browser::start("e2e_dashboard", Some("en")).await;
    let username = unique_name("web").replace('-', "");
    let password = "correct horse battery";

    // 1. The home page, then sign up.
    b.client().goto(&format!("{front}/")).await.unwrap();
    b.shot("home").await;
    click(&b, "#nav-signup").await;
    fill(&b, "#email", &format!("{username}@example.com")).await;
    fill(&b, "#username", &username).await;
    fill(&b, "#password", password).await;
    click(&b, "#submit").await;

    // 2. Log in (sign-up leads to the log-in page, the name filled in).
    wait_path(&b, "/login").await;
    b.shot("login").await;
    fill(&b, "#username", &username).await;
    fill(&b, "#password", password).await;
    click(&b, "#submit").await;
    wait_path(&b, "/dashboard").await;

    // 3. Create, and watch the progress bar move through its steps.
    click(&b, "#create").await;
    let started = Instant::now();
    let mut seen: Vec<(i64, String)> = Vec::new();
    let mut shot_taken = false;
    loop {
        let progress = b
            .client()
            .execute(
                "const p = document.getElementById('progress'); \
                 const s = document.getElementById('step'); \
                 const h = document.getElementById('hosting'); \
                 return [p ? p.value : null, s ? s.textContent : null, h ? h.dataset.state : null];",
                vec![],
            )
            .await
            .unwrap();
        let value = progress[0].as_f64().map(|v| v as i64);
        let step = progress[1].as_str().unwrap_or("").to_owned();
        let state = progress[2].as_str().unwrap_or("").to_owned();
        if let Some(v) = value
            && seen.last().map(|(lv, ls)| (*lv, ls.as_str())) != Some((v, step.as_str()))
        {
            seen.push((v, step.clone()));
            if !shot_taken && v > 0 {
                b.shot("dashboard-creating").await;
                shot_taken = true;
            }
        }
        if state == "running" {
            break;
        }
        assert!(
            state == "creating" || state.is_empty(),
            "the create ended in {state}; steps seen: {seen:?}; log:\n{}",
            dep.log_tail()
        );
        assert!(
            started.elapsed() < SETTLE,
            "no site after {SETTLE:?}; steps seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    eprintln!(
        "create in the browser: running after {:.1} s; progress seen: {seen:?}",
        started.elapsed().as_secs_f64()
    );
    let values: Vec<i64> = seen.iter().map(|(v, _)| *v).collect();
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "the progress bar went back: {seen:?}"
    );
    let distinct: std::collections::BTreeSet<&str> = seen.iter().map(|(_, s)| s.as_str()).collect();
    assert!(
        distinct.len() >= 2,
        "the progress bar showed one step only: {seen:?}"
    );
    b.shot("dashboard-running").await;
    // The page weight, as served: the dashboard (with its charts once the
    // sampler has read the VM), its CSS and its JS.
    let cookie = b.client().get_named_cookie("webhoster_session").await.unwrap();
    let http = reqwest::Client::new();
    let mut weight = Vec::new();
    for path in ["/dashboard", "/assets/site.css", "/assets/site.js"] {
        let body = http
            .get(format!("{front}{path}"))
            .header("cookie", format!("webhoster_session={}", cookie.value()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        weight.push((path, body.len()));
    }
    eprintln!(
        "dashboard page weight: {weight:?}, {} bytes in all",
        weight.iter().map(|(_, n)| n).sum::<usize>()
    );
    let ssh = text_of(&b, "#ssh-command").await.unwrap_or_default();
    let port = text_of(&b, "#port").await.unwrap_or_default();
    assert_eq!(ssh, format!("ssh -p {port} ubuntu@127.0.0.1"));

    // 4. The site link opens the welcome page naming the user.
    let link = b
        .client()
        .find(Locator::Css("#site-link"))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .expect("the site link has an href");
    b.client().goto(&link).await.unwrap();
    let body = b.client().source().await.unwrap();
    b.shot("site").await;
    assert!(
        body.contains(&format!("Welcome, {username}")),
        "the site at {link} does not welcome {username}: {body}"
    );

    // 5. Stop and start.
    b.client().goto(&format!("{front}/dashboard")).await.unwrap();
    click(&b, "#action-stop").await;
    wait_state(&b, "stopped").await;
    b.shot("dashboard-stopped").await;
    click(&b, "#action-start").await;
    wait_state(&b, "running").await;
    let user_id: i64 = link
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("the site link ends in the user id");
    let (status, page) = dep.get_site(user_id);
    assert_eq!(status, 200, "the site after start: {page}");

    // 6. Delete, after confirming.
    click(&b, "#action-delete").await;
    wait_path(&b, "/dashboard/delete").await;
    b.shot("confirm-delete").await;
    click(&b, "#confirm").await;
    click(&b, "#confirm-delete").await;
    let started = Instant::now();
    while b.client().find(Locator::Css("#create")).await.is_err() {
        assert!(started.elapsed() < SETTLE, "the hosting was never deleted");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = b.client().goto(&format!("{front}/dashboard")).await;
    }
    b.shot("dashboard-empty").await;
    let qemus: Vec<String> = dep
        .our_processes()
        .into_iter()
        .filter(|p| p.contains("qemu-system"))
        .collect();
    assert!(qemus.is_empty(), "QEMU left after the delete: {qemus:?}");

    // 7. Log out; the back button shows no dashboard.
    click(&b, "#logout").await;
    wait_path(&b, "/").await;
    b.client().back().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let url = b.client().current_url().await.unwrap();
    let source = b.client().source().await.unwrap();
    b.shot("after-back").await;
    assert!(
        b.client()
            .find(Locator::Css("#no-hosting, #hosting"))
            .await
            .is_err(),
        "the back button showed a dashboard at {url}: {source}"
    );

    let dir = b.keep();
    eprintln!("screenshots: {}", dir.display());
    b.close().await;
    dep.stop();
    let out = dep.command(&["teardown"]).output().unwrap();
    assert!(
        out.status.success(),
        "teardown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dep.leftovers().is_empty(), "left behind: {:?}", dep.leftovers());
}
