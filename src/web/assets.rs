//! The pages' stylesheet and script, embedded (no CDN, no build step). Their
//! URLs carry a digest of the content (`?v=`), so a browser may cache them
//! for long and still never mixes an old file with a new page.

use std::sync::LazyLock;

use sha2::{Digest, Sha256};

pub(super) const CSS: &str = include_str!("../../templates/web/site.css");
pub(super) const JS: &str = include_str!("../../templates/web/site.js");

/// First 12 hex digits of the SHA-256 of both files.
pub(super) static VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut h = Sha256::new();
    h.update(CSS);
    h.update(JS);
    hex::encode(h.finalize())[..12].to_owned()
});

/// The asset at `path` (`/assets/<name>`): content type and body.
pub(super) fn get(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/assets/site.css" => Some(("text/css; charset=utf-8", CSS)),
        "/assets/site.js" => Some(("text/javascript; charset=utf-8", JS)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn script_and_style_stay_small() {
        // The budget: JS + CSS under 50 KB.
        assert!(super::CSS.len() + super::JS.len() < 50_000);
    }
}
