//! `webhoster doctor`: checks that everything the service needs is present and
//! says what to install when it is not. Read-only: it never fixes anything.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use crate::config::{Paths, VmmArgs};

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub vmm: VmmArgs,

    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Free space below which VM disks are likely to fill the state dir.
const MIN_FREE_BYTES: u64 = 5 << 30;

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// A failed required check makes doctor exit non-zero.
    pub required: bool,
    pub detail: String,
}

fn check(name: &'static str, required: bool, result: Result<String, String>) -> Check {
    match result {
        Ok(detail) => Check {
            name,
            ok: true,
            required,
            detail,
        },
        Err(detail) => Check {
            name,
            ok: false,
            required,
            detail,
        },
    }
}

/// First line of `tool args` output, or what to install to get it.
pub fn tool_version(tool: &str, args: &[&str], package: &str) -> Result<String, String> {
    match std::process::Command::new(tool).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            Ok(String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{tool} not found: install the Debian package {package}"))
        }
        Err(err) => Err(format!("{tool}: {err}")),
    }
}

fn free_bytes(path: &Path) -> Result<u64, String> {
    // The state dir may not exist yet: measure the filesystem it will live on.
    let mut dir: PathBuf = path.to_owned();
    while !dir.exists() {
        if !dir.pop() {
            break;
        }
    }
    let stat = nix::sys::statvfs::statvfs(&dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

pub fn checks(paths: &Paths, vmm: &VmmArgs) -> Vec<Check> {
    let qemu = vmm.qemu.display().to_string();
    let mut checks = vec![
        check(
            "root",
            true,
            if nix::unistd::geteuid().is_root() {
                Ok("running as root".into())
            } else {
                Err("webhoster needs root: it creates namespaces, taps and nftables rules".into())
            },
        ),
        check(
            "qemu",
            true,
            tool_version(&qemu, &["--version"], "qemu-system-x86"),
        ),
        check(
            "qemu-img",
            true,
            tool_version("qemu-img", &["--version"], "qemu-utils"),
        ),
        {
            let (accel, reason) = crate::vmm::accel::decide(vmm.accel);
            check("accel", true, Ok(format!("{accel}: {reason}")))
        },
        cgroups_check(vmm),
        qemu_ids_check(vmm),
        check(
            "image",
            false,
            match crate::image::cached(&paths.image_cache) {
                Ok(Some(image)) => Ok(format!(
                    "{} (built {})",
                    image.disk.display(),
                    image.manifest.built_at
                )),
                Ok(None) => Err(format!(
                    "not built for this recipe in {}: run `webhoster image build` (serve builds it too)",
                    paths.image_cache.display()
                )),
                Err(err) => Err(err.to_string()),
            },
        ),
        check("nginx", true, tool_version("nginx", &["-v"], "nginx-light")),
        check(
            "genisoimage",
            true,
            tool_version("genisoimage", &["-version"], "genisoimage"),
        ),
        check("nftables", true, tool_version("nft", &["--version"], "nftables")),
        check(
            "netns",
            true,
            if Path::new("/proc/self/ns/net").exists() && Path::new("/dev/net/tun").exists() {
                Ok("network namespaces and /dev/net/tun available".into())
            } else {
                Err("no network namespaces or no /dev/net/tun on this kernel".into())
            },
        ),
    ];
    checks.push(check(
        "free disk",
        true,
        free_bytes(&paths.state_dir).and_then(|free| {
            let detail = format!(
                "{:.1} GiB free for {}",
                free as f64 / (1u64 << 30) as f64,
                paths.state_dir.display()
            );
            if free >= MIN_FREE_BYTES {
                Ok(detail)
            } else {
                Err(format!("only {detail}; need 5 GiB"))
            }
        }),
    ));
    checks
}

/// Which cgroups the engine would put VMs in, with which limits. Only a
/// failure under `--vm-cgroups required` is fatal.
fn cgroups_check(vmm: &VmmArgs) -> Check {
    use crate::config::CgroupPolicy;
    use crate::vmm::cgroup::Cgroups;
    let required = vmm.vm_cgroups == CgroupPolicy::Required;
    if vmm.vm_cgroups == CgroupPolicy::Off {
        return check(
            "cgroups",
            false,
            Err("off (--vm-cgroups off): VMs run without memory and pids limits".into()),
        );
    }
    let result = match Cgroups::detect(&vmm.cgroup_parent) {
        Ok(cg) => {
            let layout = cg
                .dirs("<vm_id>")
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            Ok(format!(
                "{}: each VM in {layout}, memory = plan + {} MiB, pids {}",
                cg.mode(),
                vmm.vm_memory_overhead_mib,
                vmm.vm_pids_max
            ))
        }
        Err(err) => Err(format!(
            "{}: VMs would run without memory and pids limits",
            crate::vmm::error_chain(&err)
        )),
    };
    check("cgroups", required, result)
}

/// The ids QEMUs run as.
fn qemu_ids_check(vmm: &VmmArgs) -> Check {
    check(
        "qemu ids",
        true,
        Ok(format!(
            "each VM's QEMU runs as its own uid and gid from {} (never root; set*id denied by seccomp)",
            vmm.qemu_ids
        )),
    )
}

pub async fn run(paths: Paths, args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let checks = checks(&paths, &args.vmm);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let mark = match (c.ok, c.required) {
                (true, _) => "ok  ",
                (false, true) => "FAIL",
                (false, false) => "warn",
            };
            println!("{mark} {:<12} {}", c.name, c.detail);
        }
    }
    let failed = checks.iter().any(|c| c.required && !c.ok);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_package() {
        let err = tool_version("webhoster-no-such-tool", &[], "some-package").unwrap_err();
        assert!(err.contains("install the Debian package some-package"), "{err}");
    }

    #[test]
    fn free_space_of_a_path_that_does_not_exist_yet() {
        assert!(free_bytes(Path::new("/tmp/webhoster-does-not-exist/a/b")).unwrap() > 0);
    }
}
