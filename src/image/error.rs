use std::path::PathBuf;

/// Everything that can go wrong finding or building the guest image. Each
/// message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("building the guest image needs root (mmdebstrap, chroot, file ownership): run it as root")]
    NotRoot,
    #[error("{tool} is missing: install the Debian package {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error(
        "not enough disk space in {}: {free_mib} MiB free, the build needs {need_mib} MiB; free some space or point WEBHOSTER_IMAGE_CACHE elsewhere",
        path.display()
    )]
    NoSpace {
        path: PathBuf,
        free_mib: u64,
        need_mib: u64,
    },
    #[error(
        "the package mirror {uri} is unreachable: check the host's network and its apt sources (`apt-get update` must work)"
    )]
    MirrorUnreachable { uri: String },
    #[error(
        "no usable apt source for {suite} in the host's apt configuration (/etc/apt/sources.list, /etc/apt/sources.list.d/)"
    )]
    NoSources { suite: String },
    #[error("cannot tell the host's Debian release from /etc/os-release (VERSION_CODENAME)")]
    UnknownRelease,
    #[error("the image build failed in stage {stage}; last lines of {}:\n{tail}", log.display())]
    BuildFailed {
        stage: String,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "the guest seed agent binary webhoster-seed-agent was not found next to {} (or in WEBHOSTER_SEED_AGENT): build it with `cargo build` in the repository (it builds images/agent/ too; make run and make test do)",
        exe.display()
    )]
    AgentMissing { exe: PathBuf },
    #[error(
        "the seed agent {} was built from other sources (hash {found}, this webhoster wants {want}): rebuild it with `cargo build` (or `cargo build --release`)",
        path.display()
    )]
    AgentStale {
        path: PathBuf,
        found: String,
        want: String,
    },
    #[error("the cached image in {} is damaged: {reason}; delete that directory and build again", dir.display())]
    Corrupt { dir: PathBuf, reason: String },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ImageError::Io { what, path, source }
    }
}
