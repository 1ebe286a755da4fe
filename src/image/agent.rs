//! Finding the guest's seed agent binary (`webhoster-seed-agent`, a second
//! binary of this crate) for the image build, and checking it was built from
//! the sources the image key covers.

use std::path::{Path, PathBuf};

use super::error::ImageError;
use super::recipe::agent_sources;

pub const BINARY: &str = "webhoster-seed-agent";

/// Where to look: `WEBHOSTER_SEED_AGENT`, then beside the running binary
/// (`cargo build`, `make install`), then one directory up (a test binary
/// runs from `target/<profile>/deps/`).
fn candidates(exe: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("WEBHOSTER_SEED_AGENT") {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) = exe.parent() {
        out.push(dir.join(BINARY));
        if let Some(up) = dir.parent() {
            out.push(up.join(BINARY));
        }
    }
    out
}

/// The agent binary built from this webhoster's sources.
pub(crate) fn locate() -> Result<PathBuf, ImageError> {
    let exe = std::env::current_exe().unwrap_or_default();
    let want = agent_sources::hash();
    let mut stale = None;
    for path in candidates(&exe) {
        if !path.is_file() {
            continue;
        }
        let found = std::process::Command::new(&path)
            .arg("--source-hash")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        if found == want {
            return Ok(path);
        }
        stale.get_or_insert((path, found));
    }
    match stale {
        Some((path, found)) => Err(ImageError::AgentStale { path, found, want }),
        None => Err(ImageError::AgentMissing { exe }),
    }
}
