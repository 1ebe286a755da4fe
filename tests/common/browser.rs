//! A headless Debian chromium driven through chromedriver (fantoccini), for
//! the page tests, with screenshots kept as test artifacts.
//!
//! chromedriver runs on a free loopback port in a process group of its own
//! (the chromium it starts joins it), with a profile in a temp dir; Drop
//! kills the whole group, so no browser outlives a failed test. Every
//! [`Browser::shot`] is held in memory and written under
//! `<target>/test-artifacts/<test>/` when the test fails (Drop while
//! panicking), or at once with [`Browser::keep`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

use super::host::free_port;

/// Flags that work for Debian's chromium headless on these machines
/// (../shared/notes/host-and-guest-facts.md).
const CHROMIUM_ARGS: [&str; 8] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--no-first-run",
    "--no-default-browser-check",
    "--window-size=1100,1400",
];

pub struct Browser {
    driver: Child,
    client: Option<Client>,
    profile: tempfile::TempDir,
    test: String,
    shots: Vec<(String, Vec<u8>)>,
}

/// Where a test's screenshots go.
pub fn artifacts_dir(test: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("test-artifacts").join(test)
}

/// Waits (20 s at most) until something listens on loopback `port`.
pub fn wait_for_port(port: u16, what: &str) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what} did not listen on {port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The path of a program from the Debian packages the Makefile installs.
pub fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not installed (make test-deps installs chromium and chromium-driver)")
        })
}

impl Browser {
    /// A fresh profile; `accept_language` sets the browser's languages.
    pub async fn start(test: &str, accept_language: Option<&str>) -> Browser {
        use std::os::unix::process::CommandExt;
        let chromium = which("chromium");
        let chromedriver = which("chromedriver");
        let port = free_port();
        let profile = tempfile::Builder::new().prefix("whweb-").tempdir().unwrap();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let mut browser = Browser {
            driver,
            client: None,
            profile,
            test: test.to_owned(),
            shots: Vec::new(),
        };
        wait_for_port(port, "chromedriver");
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", browser.profile.path().display()));
        let mut options = json!({ "binary": chromium, "args": args });
        if let Some(langs) = accept_language {
            options["args"]
                .as_array_mut()
                .unwrap()
                .push(json!(format!("--accept-lang={langs}")));
            options["prefs"] = json!({ "intl": { "accept_languages": langs } });
        }
        let caps = json!({ "browserName": "chrome", "goog:chromeOptions": options });
        let Value::Object(caps) = caps else { unreachable!() };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session in chromium");
        browser.client = Some(client);
        browser
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("a session")
    }

    /// A screenshot of the page now, named `name`, kept for the artifacts.
    pub async fn shot(&mut self, name: &str) {
        if let Ok(png) = self.client().screenshot().await {
            let n = self.shots.len() + 1;
            self.shots.push((format!("{n:02}-{name}.png"), png));
        }
    }

    /// Writes the screenshots taken so far (a test that always keeps some).
    pub fn keep(&self) -> PathBuf {
        let dir = artifacts_dir(&self.test);
        let _ = std::fs::create_dir_all(&dir);
        for (name, png) in &self.shots {
            let _ = std::fs::write(dir.join(name), png);
        }
        dir
    }

    /// Ends the session cleanly (chromium exits); Drop does the rest.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = self.keep();
            eprintln!("screenshots of the failed test: {}", dir.display());
        }
        // The group id is chromedriver's pid (process_group(0) above).
        let group = nix::unistd::Pid::from_raw(-(self.driver.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::SIGKILL);
        let _ = self.driver.wait();
    }
}
