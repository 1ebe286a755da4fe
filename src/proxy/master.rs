//! The nginx master process: found through its pidfile and checked against
//! `/proc/<pid>/cmdline` (a stale pidfile is never trusted), started
//! detached, signalled, stopped.
//!
//! nginx daemonizes itself (fork + setsid), so the master is in its own
//! session, is not webhoster's child, and outlives webhoster: sites stay up
//! while the service restarts. This file never renders or tests a config.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::ProxyError;
use super::layout::Layout;

/// nginx forks, writes its pidfile, and its first process exits: all of that
/// is quick unless the machine is badly overloaded.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The pid of the master serving `layout`, if one runs.
pub(crate) fn find(layout: &Layout) -> Option<i32> {
    let conf = layout.main_conf();
    if let Some(pid) = read_pidfile(&layout.pidfile())
        && is_master_of(pid, &conf)
    {
        return Some(pid);
    }
    // The pidfile is missing or stale, yet a master may still run (someone
    // removed the file): starting a second one would fail to bind anyway.
    scan_proc(&conf)
}

fn read_pidfile(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse().ok().filter(|pid: &i32| *pid > 1)
}

/// nginx rewrites its title to `nginx: master process <argv...>`; ours was
/// started with `-c <root>/current/nginx.conf`, which no other master uses.
fn is_master_of(pid: i32, conf: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    let Some(args) = text.strip_prefix("nginx: master process ") else {
        return false;
    };
    let conf = conf.to_string_lossy();
    let mut words = args.split_whitespace();
    while let Some(word) = words.next() {
        if word == "-c" && words.next() == Some(conf.as_ref()) {
            return true;
        }
    }
    false
}

fn scan_proc(conf: &Path) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| is_master_of(*pid, conf))
}

/// The processes whose parent is `pid` (the master's workers).
fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // The command name in parentheses may hold spaces: parse after it.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The master's workers that still accept connections: a worker shows
/// "is shutting down" in its title from the moment it stops listening.
pub(crate) fn accepting_workers(master: i32) -> Vec<i32> {
    children(master)
        .into_iter()
        .filter(|w| is_accepting_worker(*w))
        .collect()
}

pub(crate) fn is_accepting_worker(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).trim_end_matches(['\0', ' ']) == "nginx: worker process")
        .unwrap_or(false)
}

/// nginx processes left by a master of this dir that died hard (OOM killer,
/// SIGKILL): its workers keep serving, and holding the listening sockets, on
/// their own. They are known by their working directory, which webhoster
/// sets to the dir when it starts a master and every worker inherits.
fn orphans(layout: &Layout) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            title.starts_with(b"nginx: ")
                && !title.starts_with(b"nginx: master process")
                && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == layout.root())
        })
        .collect()
}

/// Ask orphaned workers to stop listening and finish their requests; kill
/// those that do not let go of the sockets in time.
async fn retire_orphans(layout: &Layout) {
    let orphans = orphans(layout);
    if orphans.is_empty() {
        return;
    }
    tracing::warn!(?orphans, dir = %layout.root().display(), "nginx workers without a master; retiring them");
    for pid in &orphans {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGQUIT);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while orphans.iter().any(|w| is_accepting_worker(*w)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for pid in orphans.iter().filter(|w| is_accepting_worker(**w)) {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
}

/// Start a master on the config `current` points at and return its pid.
/// The caller made sure none runs.
pub(crate) async fn spawn(nginx: &Path, layout: &Layout) -> Result<i32, ProxyError> {
    retire_orphans(layout).await;
    // A master that died hard leaves its socket behind, and nginx refuses to
    // bind a unix socket whose file exists.
    for stale in [layout.control_socket(), layout.pidfile()] {
        match std::fs::remove_file(&stale) {
            Ok(()) => tracing::debug!(path = %stale.display(), "removed a stale nginx file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ProxyError::io("removing", &stale)(e)),
        }
    }
    let mut prefix = layout.root().as_os_str().to_owned();
    prefix.push("/");
    let mut cmd = tokio::process::Command::new(nginx);
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(layout.main_conf())
        .current_dir(layout.root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // The first process reports startup errors (a port in use, ...)
        // here; the daemon hands stderr over to the error log once it runs,
        // which ends the pipe.
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().map_err(|source| ProxyError::Spawn {
        nginx: nginx.to_path_buf(),
        source,
    })?;
    let output = tokio::time::timeout(START_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| ProxyError::Timeout {
            step: "start",
            waited: START_TIMEOUT,
        })?
        .map_err(|source| ProxyError::Spawn {
            nginx: nginx.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(ProxyError::StartFailed {
            status: output.status.to_string(),
            output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let started = Instant::now();
    loop {
        if let Some(pid) = find(layout) {
            tracing::info!(pid, dir = %layout.root().display(), "started the nginx master");
            return Ok(pid);
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(ProxyError::Timeout {
                step: "pidfile",
                waited: START_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Ask the master to load the config `current` points at now.
pub(crate) fn reload(pid: i32) -> Result<(), ProxyError> {
    kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|source| ProxyError::Signal { pid, source })
}

/// Stop the master of `layout` and its workers: graceful first (SIGQUIT lets
/// requests in flight finish), then SIGTERM, then SIGKILL for all of them.
/// Returns whether a master was running. Blocking, so it also works from a
/// `Drop`.
pub fn stop(dir: &Path, timeout: Duration) -> Result<bool, ProxyError> {
    // The master was started with the resolved path; a dir that is gone
    // has no master to stop either.
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Ok(false);
    };
    let dir = dir.as_path();
    let layout = Layout::new(dir.to_path_buf())?;
    let Some(pid) = find(&layout) else {
        return Ok(false);
    };
    let conf = layout.main_conf();
    let workers = children(pid);
    let gone = |deadline: Instant| {
        while Instant::now() < deadline {
            if !is_master_of(pid, &conf) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        !is_master_of(pid, &conf)
    };
    let mut stopped = false;
    for (signal, share) in [(Signal::SIGQUIT, 2), (Signal::SIGTERM, 4)] {
        match kill(Pid::from_raw(pid), signal) {
            Ok(()) => {}
            Err(nix::Error::ESRCH) => {
                stopped = true;
                break;
            }
            Err(source) => return Err(ProxyError::Signal { pid, source }),
        }
        if gone(Instant::now() + timeout / share) {
            stopped = true;
            break;
        }
    }
    if !stopped {
        tracing::warn!(pid, "the nginx master ignored QUIT and TERM; killing it");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        gone(Instant::now() + Duration::from_secs(5));
    }
    // Workers of a killed master keep serving on their own; old workers of a
    // graceful stop finish their requests first, within the timeout.
    let deadline = Instant::now() + timeout / 4;
    for worker in workers {
        let alive = || {
            std::fs::read(format!("/proc/{worker}/cmdline"))
                .map(|c| c.starts_with(b"nginx: "))
                .unwrap_or(false)
        };
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if alive() {
            let _ = kill(Pid::from_raw(worker), Signal::SIGKILL);
        }
    }
    for leftover in [layout.control_socket(), layout.pidfile()] {
        let _ = std::fs::remove_file(leftover);
    }
    tracing::info!(pid, dir = %dir.display(), "stopped the nginx master");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_not_a_master() {
        let me = std::process::id() as i32;
        assert!(!is_master_of(me, Path::new("/x/current/nginx.conf")));
        assert!(!is_master_of(i32::MAX, Path::new("/x/current/nginx.conf")));
        assert!(children(i32::MAX).is_empty());
    }
}
