//! Running the recipe: build.sh in a work directory beside the cache, then
//! the manifest, then one rename into place. A failed or interrupted build
//! leaves no image behind (the work directory is removed on drop, and stale
//! ones are swept by the next build, under the lock).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use time::format_description::well_known::Rfc3339;

use super::error::ImageError;
use super::manifest::{self, Manifest};
use super::{KERNEL_CMDLINE, recipe, sources};

/// Removes the work directory when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        remove_work_dir(&self.0);
    }
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Deletes a build's work directory. A killed mmdebstrap can leave the host's
/// /dev, /proc and /sys mounted inside the rootfs: those are unmounted first,
/// and nothing is deleted while any mount remains (deleting through a bind
/// mount of /dev would delete the host's device nodes).
fn remove_work_dir(dir: &Path) {
    for mount in mounts_under(dir) {
        let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        tracing::error!(dir = %dir.display(), mounts = ?left, "not removing a build directory that still has mounts");
    }
}

/// Stage lines on stderr: name, elapsed time.
struct Progress {
    start: Instant,
    stage: String,
    stage_start: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress {
            start: Instant::now(),
            stage: "preflight".into(),
            stage_start: Instant::now(),
        }
    }

    fn enter(&mut self, stage: &str) {
        let now = Instant::now();
        eprintln!(
            "image build: {:<10} {:>6.1}s  (total {:>6.1}s)",
            self.stage,
            (now - self.stage_start).as_secs_f64(),
            (now - self.start).as_secs_f64()
        );
        self.stage = stage.to_owned();
        self.stage_start = now;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

const MIRROR_FAILURES: &[&str] = &[
    "Failed to fetch",
    "Temporary failure resolving",
    "Could not resolve",
    "Could not connect",
    "Unable to connect",
    "Connection timed out",
    "Connection refused",
];

/// Builds the image for `key` into `cache_dir/<key>`. The caller holds the
/// cache lock and has run the preflight checks.
pub(crate) fn run(
    cache_dir: &Path,
    key: &str,
    suite: &str,
    srcs: &[sources::Source],
    apt_options: &[String],
    agent: &Path,
) -> Result<PathBuf, ImageError> {
    let mut progress = Progress::new();
    let work = WorkDir(cache_dir.join(format!(".build-{key}-{}", std::process::id())));
    let out = work.0.join("out");
    let recipe_dir = work.0.join("recipe");
    std::fs::create_dir_all(&out).map_err(ImageError::io("creating", &out))?;
    recipe::write_to(&recipe_dir)?;
    let sources_file = work.0.join("sources.list");
    let lines: Vec<String> = srcs.iter().map(|s| s.line() + "\n").collect();
    std::fs::write(&sources_file, lines.concat()).map_err(ImageError::io("writing", &sources_file))?;
    let aptopts_file = work.0.join("apt-options");
    let opts: Vec<String> = apt_options.iter().map(|o| format!("{o}\n")).collect();
    std::fs::write(&aptopts_file, opts.concat()).map_err(ImageError::io("writing", &aptopts_file))?;
    // A copy: the build reads a file that a `cargo build` cannot change under it.
    let agent_copy = work.0.join(super::agent::BINARY);
    std::fs::copy(agent, &agent_copy).map_err(ImageError::io("copying the seed agent from", agent))?;
    let log_path = work.0.join("build.log");
    let mut log = std::fs::File::create(&log_path).map_err(ImageError::io("creating", &log_path))?;
    let stderr_log = log.try_clone().map_err(ImageError::io("opening", &log_path))?;

    let mut child = Command::new("bash")
        .arg(recipe_dir.join("build.sh"))
        .env("WH_RECIPE", &recipe_dir)
        .env("WH_WORK", &out)
        .env("WH_SUITE", suite)
        .env("WH_SOURCES", &sources_file)
        .env("WH_APTOPTS", &aptopts_file)
        .env("WH_AGENT", &agent_copy)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr_log)
        .spawn()
        .map_err(ImageError::io("running the build script in", &work.0))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        match line.strip_prefix("@@stage ") {
            Some(stage) => progress.enter(stage),
            None => {
                let _ = writeln!(log, "{line}");
            }
        }
    }
    let status = child
        .wait()
        .map_err(ImageError::io("waiting for the build script in", &work.0))?;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        // Keep the log of the last failure beside the cache (not an image).
        let kept = cache_dir.join(format!("failed-{key}.log"));
        let _ = std::fs::copy(&log_path, &kept);
        if text.contains("No space left on device") {
            let free_mib = nix::sys::statvfs::statvfs(cache_dir)
                .map(|s| s.blocks_available() * s.fragment_size() / (1 << 20))
                .unwrap_or(0);
            return Err(ImageError::NoSpace {
                path: cache_dir.to_owned(),
                free_mib,
                need_mib: super::preflight::NEED_MIB,
            });
        }
        if progress.stage == "rootfs" && MIRROR_FAILURES.iter().any(|m| text.contains(m)) {
            return Err(ImageError::MirrorUnreachable {
                uri: srcs.first().map(|s| s.uri.clone()).unwrap_or_default(),
            });
        }
        return Err(ImageError::BuildFailed {
            stage: progress.stage.clone(),
            log: kept,
            tail: tail(&log_path, 25),
        });
    }
    progress.enter("manifest");

    let read = |name: &str| {
        let p = out.join(name);
        std::fs::read_to_string(&p).map_err(ImageError::io("reading", p))
    };
    let (packages, installed_kib) = manifest::parse_packages(&read("packages.tsv")?);
    let kernel_version = read("kernel-version")?.trim().to_owned();
    let mut files = std::collections::BTreeMap::new();
    for name in ["vmlinux", "initrd.img", "disk.qcow2"] {
        files.insert(name.to_owned(), manifest::file_info(&out.join(name))?);
    }
    let m = Manifest {
        key: key.to_owned(),
        suite: suite.to_owned(),
        kernel: out.join("vmlinux"),
        initrd: out.join("initrd.img"),
        disk: out.join("disk.qcow2"),
        kernel_version,
        cmdline: KERNEL_CMDLINE.to_owned(),
        built_at: time::OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default(),
        build_seconds: (progress.start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        files,
        packages,
        installed_kib,
    };
    m.store(&out)?;
    for scratch in ["packages.tsv", "kernel-version"] {
        let _ = std::fs::remove_file(out.join(scratch));
    }
    let _ = std::fs::copy(&log_path, out.join("build.log"));
    let dest = cache_dir.join(key);
    std::fs::rename(&out, &dest).map_err(ImageError::io("moving the built image to", &dest))?;
    progress.enter("done");
    Ok(dest)
}

/// Removes work directories left by builds that were killed. Only called
/// with the cache lock held, so none of them is in use.
pub(crate) fn sweep(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".build-") {
            tracing::info!(path = %entry.path().display(), "removing an interrupted image build");
            remove_work_dir(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_dir_with_a_mount_is_unmounted_then_removed() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test mounts a tmpfs: run it as root (make test does)");
        }
        let cache = tempfile::tempdir().unwrap();
        let work = cache.path().join(".build-test-1");
        let dev = work.join("out/rootfs/dev");
        std::fs::create_dir_all(&dev).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(dev.join("null-stand-in"), "x").unwrap();
        assert_eq!(mounts_under(&work), vec![dev.clone()]);
        sweep(cache.path());
        assert!(mounts_under(&work).is_empty());
        assert!(!work.exists());
    }
}
