//! Safe config changes: render a whole new generation into its own
//! directory, `nginx -t` it exactly as it will be loaded, swap the `current`
//! symlink atomically, HUP the master and wait until its workers answer with
//! the new generation. On any failure the previous generation stays (or is
//! put back) in force. The caller holds the change locks.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::layout::{Layout, gen_name};
use super::render::{self, RenderInput, Rendered};
use super::site::{self, Site};
use super::tls::Https;
use super::{ProxyError, ProxyOptions, control, master};

/// How long the workers get to answer with a new generation after a HUP.
/// A reload takes milliseconds; this covers a machine busy with TCG guests.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);
/// `nginx -t` parses every site file once.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The sites recorded in the generation in force (empty before the first).
pub(crate) fn read_sites(layout: &Layout) -> Result<BTreeMap<i64, Site>, ProxyError> {
    let dir = layout.current().join("sites");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(ProxyError::io("listing", &dir)(e)),
    };
    let mut sites = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(ProxyError::io("listing", &dir))?.path();
        if path.extension().is_none_or(|ext| ext != "conf") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(ProxyError::io("reading", &path))?;
        let site = site::decode_meta(&text).map_err(|reason| ProxyError::CorruptSite {
            path: path.clone(),
            reason,
        })?;
        let expected = format!("{}.conf", site.user_id);
        if path.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
            return Err(ProxyError::CorruptSite {
                path,
                reason: format!("it records user {} but is not named {expected}", site.user_id),
            });
        }
        sites.insert(site.user_id, site);
    }
    Ok(sites)
}

fn render_generation(
    layout: &Layout,
    opts: &ProxyOptions,
    generation: u64,
    sites: &[Site],
) -> Result<Rendered, ProxyError> {
    let gen_dir = layout.gen_dir(generation);
    let tls_digest = opts.https.as_ref().map(tls_digest).transpose()?;
    render::render(&RenderInput {
        root: layout.root(),
        gen_dir: &gen_dir,
        generation,
        listen: opts.listen,
        https: opts.https.as_ref(),
        tls_digest: tls_digest.as_deref(),
        api: opts.api.as_ref(),
        site_domain: opts.site_domain.as_deref(),
        docs_url: &opts.docs_url,
        limits: &opts.limits,
        workers: opts.workers,
        max_files: max_open_files(),
        sites,
    })
}

/// The SHA-256 of the certificate and key files: a pair renewed in place
/// changes the rendering, so the next convergence (every start) tests it
/// with `nginx -t` and has nginx load it.
fn tls_digest(https: &Https) -> Result<String, ProxyError> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for path in [&https.cert, &https.key] {
        let bytes = std::fs::read(path).map_err(ProxyError::io("reading the TLS file", path))?;
        hasher.update(&bytes);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The hard limit on open files this process (and so nginx) got, read from
/// `/proc/self/limits`, capped at 65536.
fn max_open_files() -> u64 {
    const CAP: u64 = 65536;
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max open files"))?;
            let hard = line.split_whitespace().nth(4)?;
            Some(if hard == "unlimited" {
                CAP
            } else {
                hard.parse().ok()?
            })
        })
        .unwrap_or(1024)
        .min(CAP)
}

/// Whether generation `generation` on disk is exactly what we would render.
fn on_disk_matches(layout: &Layout, generation: u64, rendered: &Rendered) -> bool {
    let dir = layout.gen_dir(generation);
    let mut on_disk = Vec::new();
    for sub in ["", "sites", "routes"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            return false;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() {
                let rel = Path::new(sub).join(entry.file_name());
                match std::fs::read_to_string(&path) {
                    Ok(text) => on_disk.push((rel, text)),
                    Err(_) => return false,
                }
            }
        }
    }
    on_disk.sort();
    let mut wanted = rendered.files.to_vec();
    wanted.sort();
    on_disk == wanted
}

/// What `converge` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Converged {
    pub generation: u64,
    pub pid: i32,
    /// A new generation was written and loaded.
    pub changed: bool,
    /// A master was started.
    pub started: bool,
}

/// Make the running master serve exactly `sites` with `opts`: a new
/// generation only when the rendering differs from the one in force, a
/// master only when none runs, a HUP only when the workers serve another
/// generation.
pub(crate) async fn converge(
    layout: &Layout,
    opts: &ProxyOptions,
    sites: &[Site],
) -> Result<Converged, ProxyError> {
    let previous = layout.current_generation()?;
    let up_to_date = match previous {
        Some(g) => on_disk_matches(layout, g, &render_generation(layout, opts, g, sites)?),
        None => false,
    };
    let target = match previous {
        Some(g) if up_to_date => g,
        _ => {
            let newest = layout.generations()?.into_iter().max().unwrap_or(0);
            let next = newest.max(previous.unwrap_or(0)) + 1;
            let rendered = render_generation(layout, opts, next, sites)?;
            write_generation(layout, next, &rendered)?;
            if let Err(e) = test_generation(layout, &opts.nginx, next).await {
                remove_generation(layout, next);
                return Err(e);
            }
            swap_current(layout, next)?;
            next
        }
    };
    let changed = Some(target) != previous;

    let (pid, started) = match master::find(layout) {
        Some(pid) => (pid, false),
        None => (master::spawn(&opts.nginx, layout).await?, true),
    };
    let answered = match control::generation(&layout.control_socket()).await {
        Ok(g) if g == target => Ok(()),
        _ => {
            let old_workers = master::accepting_workers(pid);
            tracing::debug!(pid, generation = target, ?old_workers, "reloading nginx");
            master::reload(pid)?;
            confirm(layout, target, &old_workers).await
        }
    };
    if let Err(answered) = answered {
        if changed && let Some(previous) = previous {
            tracing::warn!(generation = target, previous, %answered, "nginx did not load the new config; putting the previous one back");
            swap_current(layout, previous)?;
            // The master may have loaded the new generation after all, late.
            let _ = master::reload(pid);
            remove_generation(layout, target);
        }
        return Err(ProxyError::NotConfirmed {
            generation: target,
            answered,
            waited: CONFIRM_TIMEOUT,
            error_log: layout.error_log(),
        });
    }
    if changed {
        tracing::info!(
            generation = target,
            pid,
            sites = sites.len(),
            "nginx serves a new config generation"
        );
        prune(layout, target);
    }
    Ok(Converged {
        generation: target,
        pid,
        changed,
        started,
    })
}

fn write_generation(layout: &Layout, generation: u64, rendered: &Rendered) -> Result<(), ProxyError> {
    let dir = layout.gen_dir(generation);
    // A leftover of a crash between writing and swapping: never in force.
    remove_generation(layout, generation);
    for sub in ["sites", "routes"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(ProxyError::io("creating", &d))?;
    }
    for (rel, text) in &rendered.files {
        let path = dir.join(rel);
        std::fs::write(&path, text).map_err(ProxyError::io("writing", &path))?;
    }
    Ok(())
}

async fn test_generation(layout: &Layout, nginx: &Path, generation: u64) -> Result<(), ProxyError> {
    let conf = layout.gen_dir(generation).join("nginx.conf");
    let mut prefix = layout.root().as_os_str().to_owned();
    prefix.push("/");
    let run = tokio::process::Command::new(nginx)
        .arg("-t")
        .arg("-q")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(TEST_TIMEOUT, run)
        .await
        .map_err(|_| ProxyError::Timeout {
            step: "config test",
            waited: TEST_TIMEOUT,
        })?
        .map_err(|source| ProxyError::Spawn {
            nginx: nginx.to_path_buf(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if text.is_empty() {
        text = format!("{} and no message", output.status);
    }
    tracing::warn!(generation, output = %text, "nginx -t rejected a candidate config");
    Err(ProxyError::ConfigTest {
        generation,
        output: text,
    })
}

/// Point `current` at `generation` with one rename(2): nginx reads either the
/// whole old tree or the whole new one.
fn swap_current(layout: &Layout, generation: u64) -> Result<(), ProxyError> {
    let tmp = layout.root().join(format!(
        ".current.{}.{}",
        std::process::id(),
        gen_name(generation)
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(gen_name(generation), &tmp)
        .map_err(ProxyError::io("creating the symlink", &tmp))?;
    let current = layout.current();
    std::fs::rename(&tmp, &current).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ProxyError::io("renaming over", &current)(e)
    })
}

/// Poll the control socket until the workers answer `generation`, then wait
/// until the old workers stop accepting: until then a new visitor could
/// still land on the old config. The error says what was answered last.
async fn confirm(layout: &Layout, generation: u64, old_workers: &[i32]) -> Result<(), String> {
    let socket = layout.control_socket();
    let started = Instant::now();
    loop {
        let last = match control::generation(&socket).await {
            Ok(g) if g == generation => break,
            Ok(g) => format!("generation {g}"),
            Err(e) => e,
        };
        if started.elapsed() > CONFIRM_TIMEOUT {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    loop {
        let accepting: Vec<i32> = old_workers
            .iter()
            .copied()
            .filter(|w| master::is_accepting_worker(*w))
            .collect();
        if accepting.is_empty() {
            tracing::debug!(generation, ?old_workers, waited = ?started.elapsed(), "nginx reload confirmed");
            return Ok(());
        }
        if started.elapsed() > CONFIRM_TIMEOUT {
            return Err(format!(
                "generation {generation}, but old workers {accepting:?} still accept connections"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn remove_generation(layout: &Layout, generation: u64) {
    let dir = layout.gen_dir(generation);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), %e, "cannot remove an nginx config generation"),
    }
}

/// Keep the generation in force and the one before it (for an operator's
/// `diff -r`); older ones and failed candidates go.
fn prune(layout: &Layout, current: u64) {
    let Ok(gens) = layout.generations() else {
        return;
    };
    let keep_from = gens.iter().copied().filter(|g| *g < current).max();
    for g in gens {
        if g != current && Some(g) != keep_from {
            remove_generation(layout, g);
        }
    }
}
