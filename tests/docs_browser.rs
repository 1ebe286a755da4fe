//! `/docs` in a real browser (Debian chromium, headless, driven through
//! chromedriver with fantoccini) against the real router, store and auth
//! with the fake VM parts: the vendored Swagger UI lists every operation;
//! its Authorize dialog logs in with username and password through the
//! OAuth2 password flow (`POST /api/v1/auth/login`, form-encoded, the token
//! read from the top level of the answer per RFC 6749 §5.1); "Try it out" on
//! `GET /api/v1/auth/me` then sends `Authorization: Bearer` and shows the
//! account with 200.
//!
//! On failure, screenshots of each step are written under
//! `<target>/test-artifacts/docs_browser/` (tests/common/browser.rs).

mod common;

use std::time::Duration;

use fantoccini::{Client, Locator};

use common::browser::Browser;
use common::control::{Db, TestApi};

/// Generous: a debug build on two busy cores serves Swagger UI's 1.4 MB
/// bundle and hashes a password.
const WAIT: Duration = Duration::from_secs(30);

async fn find(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} did not appear: {e}"))
}

async fn find_xpath(c: &Client, xpath: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::XPath(xpath))
        .await
        .unwrap_or_else(|e| panic!("{xpath} did not appear: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swagger_ui_authorizes_with_the_password_flow_and_tries_an_operation() {
    let api = TestApi::start(Db::Sqlite).await;
    let (s, b) = api.register("explorer").await;
    assert_eq!(s, 201, "{b}");
    let mut browser = Browser::start("docs_browser", None).await;

    // The page and every operation of the document.
    browser.client().goto(&api.url("/docs")).await.unwrap();
    find(browser.client(), ".opblock").await;
    browser.shot("operations").await;
    let c = browser.client();
    let listed: Vec<String> = {
        let mut paths = Vec::new();
        for e in c.find_all(Locator::Css(".opblock-summary-path")).await.unwrap() {
            paths.push(e.attr("data-path").await.unwrap().unwrap_or_default());
        }
        paths
    };
    for r in webhoster::api::ROUTES {
        assert!(
            listed.iter().any(|p| p == r.path),
            "{} not listed: {listed:?}",
            r.path
        );
    }

    // Authorize: username and password, OAuth2 password flow.
    find(c, ".auth-wrapper button.authorize")
        .await
        .click()
        .await
        .unwrap();
    find(c, "#oauth_username")
        .await
        .send_keys("explorer")
        .await
        .unwrap();
    find(c, "#oauth_password")
        .await
        .send_keys("password123")
        .await
        .unwrap();
    browser.shot("authorize-dialog").await;
    let c = browser.client();
    // The Authorize button of the OAuth2 scheme's section (the bearer
    // scheme has its own).
    let section = "//input[@id='oauth_username']/ancestor::div[contains(@class,'auth-container')]";
    find_xpath(c, &format!("{section}//button[contains(@class,'authorize')]"))
        .await
        .click()
        .await
        .unwrap();
    // Authorized: the section offers to log out instead.
    let logout = find_xpath(
        c,
        "//div[contains(@class,'auth-container')]//button[normalize-space()='Logout']",
    )
    .await;
    assert!(logout.is_displayed().await.unwrap());
    let errors = c.find_all(Locator::Css(".auth-container .errors")).await.unwrap();
    for e in errors {
        let text = e.text().await.unwrap_or_default();
        assert!(text.trim().is_empty(), "the authorization failed: {text}");
    }
    browser.shot("authorized").await;
    let c = browser.client();
    find(c, ".modal-ux button.btn-done").await.click().await.unwrap();
    // The lock on the page's Authorize button closes.
    find(c, ".auth-wrapper button.authorize.locked").await;

    // Try it out: GET /api/v1/auth/me with the token.
    let op = "[id='operations-auth-get_api_v1_auth_me']";
    find(c, &format!("{op} .opblock-summary-control"))
        .await
        .click()
        .await
        .unwrap();
    find(c, &format!("{op} button.try-out__btn"))
        .await
        .click()
        .await
        .unwrap();
    find(c, &format!("{op} button.execute"))
        .await
        .click()
        .await
        .unwrap();
    let status = find(
        c,
        &format!("{op} .live-responses-table .response .response-col_status"),
    )
    .await;
    let status = status.text().await.unwrap();
    browser.shot("me").await;
    let c = browser.client();
    let body = find(
        c,
        &format!("{op} .live-responses-table .response-col_description pre"),
    )
    .await
    .text()
    .await
    .unwrap();
    assert_eq!(
        status.trim(),
        "200",
        "GET /api/v1/auth/me answered {status}: {body}"
    );
    assert!(body.contains("\"username\": \"explorer\""), "{body}");
    // The request Swagger UI shows used the token it got from the log-in.
    let curl = find(c, &format!("{op} .curl-command"))
        .await
        .text()
        .await
        .unwrap();
    assert!(curl.contains("Authorization: Bearer ey"), "{curl}");

    browser.close().await;
    api.stop().await;
}
