//! A real TLS client for tests: curl, verifying against a given certificate.

use serde_json::Value;

/// What curl got: status, response head (lowercase) and body.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Got {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Runs curl with `args` (never through a proxy); Err with its stderr when
/// it fails (a refused certificate, a failed handshake).
pub async fn curl(args: &[&str]) -> Result<Got, String> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "--noproxy", "*", "--max-time", "60"])
        .args(args)
        .output()
        .await
        .expect("curl runs (make test installs it)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    Ok(Got {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    })
}
