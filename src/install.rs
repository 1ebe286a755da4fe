//! `webhoster install`: installs `webhoster serve` as a systemd service. It
//! copies the running binary to `<prefix>/bin/webhoster`, writes the unit
//! rendered from `templates/systemd/webhoster.service.hbs` (embedded), and a
//! default environment file listing every setting of `serve` with its
//! default, all under `--root` (`/` unless staging).
//!
//! Never runs systemctl (nothing is enabled, started or reloaded) and never
//! overwrites an existing environment file: it is the operator's.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use handlebars::Handlebars;

use crate::config::{Paths, ServeArgs};

/// Where systemd looks for units installed by the administrator.
pub const UNIT_PATH: &str = "/etc/systemd/system/webhoster.service";
/// The unit's `EnvironmentFile`.
pub const ENV_PATH: &str = "/etc/webhoster/webhoster.env";

const UNIT_TEMPLATE: &str = include_str!("../templates/systemd/webhoster.service.hbs");

#[derive(Args, Debug, Clone)]
pub struct InstallArgs {
    /// The binary goes to `<prefix>/bin/webhoster`, and the unit runs it
    /// from there.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,

    /// Write every file under this directory instead of `/` (staging a
    /// package, tests). The unit still names the paths as seen from `/`.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
}

pub fn run(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let bin = installed_binary(&args.prefix)?;
    let exe = std::env::current_exe().context("cannot find the running binary")?;

    let bin_dest = under(&args.root, &bin);
    // Copied next to the target and renamed over it: writing into a binary
    // that runs (an upgrade of the service) fails with ETXTBSY, a rename
    // does not, and nobody ever sees half a binary.
    let content = std::fs::read(&exe).with_context(|| format!("cannot read {}", exe.display()))?;
    write_atomic(&bin_dest, &content, 0o755)?;
    println!("installed {}", bin_dest.display());

    // The guest image's seed agent, built beside webhoster (`cargo build
    // --release` builds both): `image build` looks for it beside webhoster.
    let agent = exe.with_file_name("webhoster-seed-agent");
    if agent.is_file() {
        let agent_dest = bin_dest.with_file_name("webhoster-seed-agent");
        let content = std::fs::read(&agent).with_context(|| format!("cannot read {}", agent.display()))?;
        write_atomic(&agent_dest, &content, 0o755)?;
        println!("installed {}", agent_dest.display());
    } else {
        println!(
            "note: {} is missing; `webhoster image build` needs it (cargo build --release builds it)",
            agent.display()
        );
    }

    let unit_dest = under(&args.root, Path::new(UNIT_PATH));
    write_atomic(&unit_dest, render_unit(&bin)?.as_bytes(), 0o644)?;
    println!("installed {}", unit_dest.display());

    let env_dest = under(&args.root, Path::new(ENV_PATH));
    if env_dest.exists() {
        println!("kept {} (it exists)", env_dest.display());
    } else {
        // 0600: once edited it may hold the JWT secret or a database password.
        write_atomic(&env_dest, env_file().as_bytes(), 0o600)?;
        println!("installed {}", env_dest.display());
    }
    if args.root == Path::new("/") {
        println!("next: systemctl daemon-reload && systemctl enable --now webhoster");
    }
    Ok(ExitCode::SUCCESS)
}

/// `<prefix>/bin/webhoster`, checked to be safe to write into a unit file:
/// absolute, without `..`, and only characters that need no quoting there
/// (a space would split `ExecStart`, a `%` starts a specifier).
fn installed_binary(prefix: &Path) -> anyhow::Result<PathBuf> {
    let bin = prefix.join("bin/webhoster");
    let text = bin.to_str().unwrap_or_default();
    let safe = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b));
    if !prefix.is_absolute() || prefix.components().any(|c| c == Component::ParentDir) || !safe {
        bail!(
            "--prefix {:?} must be an absolute path without '..', of letters, digits and / . _ + -",
            prefix.display()
        );
    }
    Ok(bin)
}

/// `path` (absolute) inside `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The unit for a binary installed at `bin`.
pub fn render_unit(bin: &Path) -> anyhow::Result<String> {
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(handlebars::no_escape);
    let data = serde_json::json!({
        "bin": bin.to_str().context("the binary path is not UTF-8")?,
        "env_file": ENV_PATH,
    });
    hb.render_template(UNIT_TEMPLATE, &data)
        .context("rendering the embedded systemd unit")
}

/// The default environment file: every variable `serve` reads, commented
/// out, with its help and default. Generated from the clap definitions, so
/// it cannot drift from them.
pub fn env_file() -> String {
    use clap::Args as _;
    let cmd = ServeArgs::augment_args(Paths::augment_args(clap::Command::new("serve")));
    let mut out = String::from(
        "# Environment of `webhoster serve`, read by its systemd unit. Every\n\
         # setting is shown commented out with its default: uncomment a line to\n\
         # change it, then `systemctl restart webhoster`. `webhoster serve --help`\n\
         # shows the same as flags. `webhoster install` never overwrites this file.\n",
    );
    for arg in cmd.get_arguments() {
        let Some(name) = arg.get_env().and_then(|env| env.to_str()) else {
            continue;
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let mut help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        // clap drops the final period of a one-sentence help.
        if !help.is_empty() && !help.ends_with('.') {
            help.push('.');
        }
        let choices: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| v.get_name().to_owned())
            .collect();
        if !choices.is_empty() {
            help.push_str(&format!(" One of: {}.", choices.join(", ")));
        }
        let default: Vec<_> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy())
            .collect();
        out.push('\n');
        for line in wrap(&help, 76) {
            out.push_str(&format!("# {line}\n"));
        }
        out.push_str(&format!("#{name}={}\n", default.join(",")));
    }
    out.push_str("\n# Log filter (tracing's EnvFilter syntax), e.g. webhoster=debug.\n#RUST_LOG=info\n");
    out
}

/// Words of `text` in lines of at most `width` characters (a longer word
/// gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Write `content` to a temporary file beside `dest`, set `mode`, and
/// rename it over `dest`, creating the parent directories.
fn write_atomic(dest: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    let parent = dest.parent().context("an install path has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".webhoster-install")
        .tempfile_in(parent)
        .with_context(|| format!("cannot write in {}", parent.display()))?;
    tmp.write_all(content)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", tmp.path().display()))?;
    tmp.persist(dest)
        .with_context(|| format!("cannot move the new file to {}", dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_the_installed_binary_and_spares_the_guests() {
        let unit = render_unit(Path::new("/opt/wh/bin/webhoster")).unwrap();
        for line in [
            "Type=simple",
            "ExecStart=/opt/wh/bin/webhoster serve",
            "EnvironmentFile=-/etc/webhoster/webhoster.env",
            "KillMode=process",
            "Restart=on-failure",
            "RestartSec=2",
            "After=network-online.target",
            "Wants=network-online.target",
            "WantedBy=multi-user.target",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} missing from:\n{unit}");
        }
        assert!(!unit.contains("{{"), "{unit}");
    }

    #[test]
    fn stop_timeout_outlasts_the_api_grace() {
        let unit = render_unit(Path::new("/usr/local/bin/webhoster")).unwrap();
        let secs: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs > 30, "TimeoutStopSec={secs}");
    }

    #[test]
    fn env_file_lists_every_setting_commented_with_its_default() {
        let env = env_file();
        for line in [
            "#WEBHOSTER_STATE_DIR=/var/lib/webhoster",
            "#WEBHOSTER_IMAGE_CACHE=/var/cache/webhoster/images",
            "#WEBHOSTER_ACCEL=auto",
            "#WEBHOSTER_API_ADDR=127.0.0.1:8000",
            "#WEBHOSTER_SSH_PORTS=10000-20000",
            "#WEBHOSTER_EGRESS=",
            "#WEBHOSTER_JWT_SECRET=",
            "#DATABASE_URL=",
        ] {
            assert!(env.lines().any(|l| l == line), "{line} missing from:\n{env}");
        }
        // Nothing is set: systemd would read any uncommented line.
        assert!(env.lines().all(|l| l.is_empty() || l.starts_with('#')), "{env}");
        assert!(env.lines().all(|l| l.len() <= 80 || !l.contains(' ')), "{env}");
    }

    #[test]
    fn prefix_must_be_safe_in_a_unit() {
        assert_eq!(
            installed_binary(Path::new("/usr/local")).unwrap(),
            Path::new("/usr/local/bin/webhoster")
        );
        for bad in [
            "usr/local",
            "/usr/../tmp",
            "/opt/my prefix",
            "/opt/%h",
            "/opt/a\nb",
        ] {
            assert!(installed_binary(Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_land_under_the_root() {
        assert_eq!(
            under(Path::new("/tmp/r"), Path::new(UNIT_PATH)),
            Path::new("/tmp/r/etc/systemd/system/webhoster.service")
        );
        assert_eq!(under(Path::new("/"), Path::new(ENV_PATH)), Path::new(ENV_PATH));
    }
}
