//! `webhoster install --root <tmp>`: the binary, the unit and the env file
//! land under the root, a second install keeps an edited env file, and
//! `systemd-analyze verify` accepts the installed unit with its ExecStart
//! resolved inside the root (and rejects broken copies of it, so the check
//! itself is checked).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_webhoster");

fn install(root: &Path, extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("install")
        .arg("--root")
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "install failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// `section -> key -> values` of a unit file.
fn parse_unit(text: &str) -> HashMap<String, HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, HashMap<String, Vec<String>>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        out.entry(section.clone())
            .or_default()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    out
}

/// Give the root the host's system units (`sysinit.target`,
/// `network-online.target`, ...), which verify loads as dependencies, and
/// resolves everything else (ExecStart too) inside the root.
fn add_system_units(root: &Path) {
    let units = Path::new("/usr/lib/systemd/system");
    assert!(
        units.is_dir(),
        "no {}: install the Debian package systemd",
        units.display()
    );
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(units)
        .arg(root.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(status.success());
}

/// `systemd-analyze verify` of `unit` inside `root`. verify exits 0 on many
/// mistakes (an unknown key, a value it cannot parse: "ignoring"), so any
/// output counts as a failure too.
fn verify(root: &Path, unit: &str) -> Result<(), String> {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian package systemd) runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {text}", out.status))
    }
}

#[test]
fn install_into_a_root_gives_a_unit_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let stdout = install(root, &[]);

    let bin = root.join("usr/local/bin/webhoster");
    assert!(stdout.contains(&bin.display().to_string()), "{stdout}");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(BIN).unwrap(),
        "not the running binary"
    );

    let unit_path = root.join("etc/systemd/system/webhoster.service");
    let unit_text = std::fs::read_to_string(&unit_path).unwrap();
    assert_eq!(mode(&unit_path), 0o644);
    let unit = parse_unit(&unit_text);
    let expect = [
        ("Unit", "After", "network-online.target"),
        ("Unit", "Wants", "network-online.target"),
        ("Service", "Type", "simple"),
        ("Service", "ExecStart", "/usr/local/bin/webhoster serve"),
        ("Service", "EnvironmentFile", "-/etc/webhoster/webhoster.env"),
        ("Service", "KillMode", "process"),
        ("Service", "Restart", "on-failure"),
        ("Service", "RestartSec", "2"),
        ("Install", "WantedBy", "multi-user.target"),
    ];
    for (section, key, value) in expect {
        assert_eq!(
            unit.get(section).and_then(|s| s.get(key)).map(Vec::as_slice),
            Some(&[value.to_owned()][..]),
            "[{section}] {key}= in:\n{unit_text}"
        );
    }
    let stop: u64 = unit["Service"]["TimeoutStopSec"][0].parse().unwrap();
    assert!(
        stop > 30,
        "TimeoutStopSec={stop} leaves no room after the API's 30 s grace"
    );

    let env_path = root.join("etc/webhoster/webhoster.env");
    let env = std::fs::read_to_string(&env_path).unwrap();
    assert_eq!(mode(&env_path), 0o600);
    assert!(
        env.lines()
            .any(|l| l == "#WEBHOSTER_STATE_DIR=/var/lib/webhoster"),
        "{env}"
    );
    assert!(env.lines().all(|l| l.is_empty() || l.starts_with('#')), "{env}");

    add_system_units(root);
    verify(root, "webhoster.service").unwrap();

    // The check catches a broken unit: an unknown key (verify only warns)
    // and an ExecStart that does not exist in the root (verify fails).
    let units = root.join("etc/systemd/system");
    let broken = [
        ("typo", unit_text.replace("KillMode=process", "KilMode=process")),
        (
            "bad-value",
            unit_text.replace("Restart=on-failure", "Restart=sometimes"),
        ),
        (
            "no-binary",
            unit_text.replace("/usr/local/bin/webhoster", "/usr/local/bin/nope"),
        ),
    ];
    for (name, text) in broken {
        let unit = format!("webhoster-{name}.service");
        std::fs::write(units.join(&unit), text).unwrap();
        assert!(verify(root, &unit).is_err(), "verify accepted the {name} unit");
        std::fs::remove_file(units.join(&unit)).unwrap();
    }

    // Again: the edited env file stays, the unit and binary are replaced.
    std::fs::write(&env_path, "WEBHOSTER_PLAN=small\n").unwrap();
    std::fs::write(&unit_path, "stale").unwrap();
    let stdout = install(root, &[]);
    assert!(stdout.contains("kept"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(&env_path).unwrap(),
        "WEBHOSTER_PLAN=small\n"
    );
    assert_eq!(std::fs::read_to_string(&unit_path).unwrap(), unit_text);
}

#[test]
fn prefix_moves_the_binary_and_the_exec_start() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    install(root, &["--prefix", "/opt/webhoster"]);
    assert!(root.join("opt/webhoster/bin/webhoster").is_file());
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/webhoster.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/opt/webhoster/bin/webhoster serve"),
        "{unit}"
    );

    let out = Command::new(BIN)
        .args(["install", "--prefix", "opt/relative", "--root"])
        .arg(root)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
