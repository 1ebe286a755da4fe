//! The agent's own sources, hashed. The image build puts the agent binary
//! into the guest image, so its sources are part of the image's cache key
//! (`src/image/recipe.rs` includes this file); the binary reports the hash
//! it was built from (`--source-hash`), and the image build refuses a binary
//! whose hash differs (a stale build).

/// Every file of `images/agent/` (a unit test of the image recipe checks none is
/// missing). Paths relative to `images/agent/`.
pub const FILES: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../Cargo.toml")),
    ("src/apply.rs", include_str!("apply.rs")),
    ("src/clone.rs", include_str!("clone.rs")),
    ("src/dbus.rs", include_str!("dbus.rs")),
    ("src/dhcp.rs", include_str!("dhcp.rs")),
    ("src/live.rs", include_str!("live.rs")),
    ("src/main.rs", include_str!("main.rs")),
    ("src/network.rs", include_str!("network.rs")),
    ("src/seed.rs", include_str!("seed.rs")),
    ("src/sources.rs", include_str!("sources.rs")),
    (
        "src/testdata/webhoster-network-config.yaml",
        include_str!("testdata/webhoster-network-config.yaml"),
    ),
    (
        "src/testdata/webhoster-user-data.yaml",
        include_str!("testdata/webhoster-user-data.yaml"),
    ),
];

/// sha256 over the file names and contents, hex, first 16 bytes.
pub fn hash() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"webhoster-seed-agent-v1\0");
    for (path, content) in FILES {
        h.update(path.as_bytes());
        h.update((content.len() as u64).to_le_bytes());
        h.update(content.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}
