//! Where everything of webhoster's nginx lives under `<state>/nginx`.
//!
//! ```text
//! current -> gen-0000000042     symlink swapped atomically on every change
//! gen-0000000042/nginx.conf     main config of that generation
//! gen-0000000042/sites/<id>.conf  one file per site: the record of the site
//! gen-0000000042/routes/<id>.conf its `/<id>/` locations (derived)
//! logs/error.log, logs/access.log, logs/sites/<id>.access.log
//!                                 written by webhoster's sink, capped (+ .1, .2 ...)
//! run/nginx.pid, run/control.sock
//! run/log.sock                    the sink nginx sends every log line to
//! tmp/                            nginx's temp paths (unused by design)
//! .lock                           serializes changes across processes
//! ```

use std::path::{Path, PathBuf};

use super::ProxyError;

#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

const GEN_PREFIX: &str = "gen-";

impl Layout {
    /// `root` must be absolute and made only of characters that need no
    /// quoting in an nginx config.
    pub(crate) fn new(root: PathBuf) -> Result<Self, ProxyError> {
        super::site::validate_config_path("dir", &root)?;
        Ok(Layout { root })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }
    pub(crate) fn current(&self) -> PathBuf {
        self.root.join("current")
    }
    /// The path the master is started with; it follows `current` on every HUP.
    pub(crate) fn main_conf(&self) -> PathBuf {
        self.current().join("nginx.conf")
    }
    pub(crate) fn gen_dir(&self, generation: u64) -> PathBuf {
        self.root.join(gen_name(generation))
    }
    /// The record of `user_id`'s site in the generation in force.
    pub(crate) fn current_site_file(&self, user_id: i64) -> PathBuf {
        self.current().join("sites").join(format!("{user_id}.conf"))
    }
    pub(crate) fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub(crate) fn site_logs(&self) -> PathBuf {
        self.logs().join("sites")
    }
    pub(crate) fn error_log(&self) -> PathBuf {
        self.logs().join("error.log")
    }
    pub(crate) fn access_log(&self) -> PathBuf {
        self.logs().join("access.log")
    }
    pub(crate) fn site_access_log(&self, user_id: i64) -> PathBuf {
        self.site_logs().join(format!("{user_id}.access.log"))
    }
    pub(crate) fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    pub(crate) fn pidfile(&self) -> PathBuf {
        self.run().join("nginx.pid")
    }
    pub(crate) fn control_socket(&self) -> PathBuf {
        self.run().join("control.sock")
    }
    pub(crate) fn log_socket(&self) -> PathBuf {
        self.run().join("log.sock")
    }
    pub(crate) fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub(crate) fn lock_file(&self) -> PathBuf {
        self.root.join(".lock")
    }

    /// Every directory nginx and webhoster expect, 0755 so nginx's
    /// unprivileged workers may enter them.
    pub(crate) fn create_dirs(&self) -> Result<(), ProxyError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [
            self.root.clone(),
            self.logs(),
            self.site_logs(),
            self.run(),
            self.tmp(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&dir)
                .map_err(ProxyError::io("creating", &dir))?;
        }
        Ok(())
    }

    /// The generation `current` points at, if any.
    pub(crate) fn current_generation(&self) -> Result<Option<u64>, ProxyError> {
        let link = self.current();
        match std::fs::read_link(&link) {
            Ok(target) => Ok(target.to_str().and_then(parse_gen_name)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ProxyError::io("reading the symlink", &link)(e)),
        }
    }

    /// All generation directories on disk, oldest first.
    pub(crate) fn generations(&self) -> Result<Vec<u64>, ProxyError> {
        let mut gens = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(ProxyError::io("listing", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(ProxyError::io("listing", &self.root))?;
            if let Some(g) = entry.file_name().to_str().and_then(parse_gen_name) {
                gens.push(g);
            }
        }
        gens.sort_unstable();
        Ok(gens)
    }
}

pub(crate) fn gen_name(generation: u64) -> String {
    format!("{GEN_PREFIX}{generation:010}")
}

fn parse_gen_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(GEN_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_must_be_safe_to_write_into_a_config() {
        Layout::new("/var/lib/webhoster/nginx".into()).unwrap();
        Layout::new("/tmp/.tmpAb_c-1/nginx".into()).unwrap();
        for bad in ["relative/nginx", "/a b", "/a;b", "/a'b", "/a$b", "/a{b"] {
            assert!(Layout::new(bad.into()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generation_names() {
        assert_eq!(gen_name(42), "gen-0000000042");
        assert_eq!(parse_gen_name("gen-0000000042"), Some(42));
        assert_eq!(parse_gen_name("gen-0000000042.tmp"), None);
        assert_eq!(parse_gen_name("gen-"), None);
        assert_eq!(parse_gen_name("current"), None);
    }
}
