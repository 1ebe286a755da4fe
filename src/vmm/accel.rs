//! The acceleration decision: KVM only when `/dev/kvm` opens read-write AND
//! the CPU flags show `vmx` or `svm`. On nested hosts `/dev/kvm` can open
//! while guests hang right after the BIOS (no virtualization flags exposed),
//! so the device alone is not enough. `--accel kvm|tcg` overrides.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::Accel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    Kvm,
    Tcg,
}

impl AccelChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        }
    }
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decide from the real machine. Returns the choice and why, for logs and
/// `webhoster doctor`.
pub fn decide(requested: Accel) -> (AccelChoice, String) {
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|err| err.to_string());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    decide_from(requested, kvm_opens, &cpuinfo)
}

/// The decision on given facts (unit-testable).
pub fn decide_from(
    requested: Accel,
    kvm_opens: Result<std::fs::File, String>,
    cpuinfo: &str,
) -> (AccelChoice, String) {
    match requested {
        Accel::Kvm => (AccelChoice::Kvm, "forced by --accel kvm".to_owned()),
        Accel::Tcg => (AccelChoice::Tcg, "forced by --accel tcg".to_owned()),
        Accel::Auto => {
            let flag = cpu_virt_flag(cpuinfo);
            match (kvm_opens, flag) {
                (Ok(_), Some(flag)) => (
                    AccelChoice::Kvm,
                    format!("/dev/kvm opens and the CPU shows {flag}"),
                ),
                (Ok(_), None) => (
                    AccelChoice::Tcg,
                    "/dev/kvm opens but the CPU shows neither vmx nor svm (nested guests hang): \
                     using TCG, guests run slowly"
                        .to_owned(),
                ),
                (Err(err), _) => (
                    AccelChoice::Tcg,
                    format!("/dev/kvm does not open ({err}): using TCG, guests run slowly"),
                ),
            }
        }
    }
}

fn cpu_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for flag in value.split_whitespace() {
            match flag {
                "vmx" => return Some("vmx"),
                "svm" => return Some("svm"),
                _ => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opens() -> Result<std::fs::File, String> {
        Ok(std::fs::File::open("/dev/null").unwrap())
    }

    #[test]
    fn auto_needs_both_the_device_and_the_flag() {
        let with_vmx = "processor: 0\nflags\t\t: fpu vme vmx sse2\n";
        let without = "processor: 0\nflags\t\t: fpu vme sse2 hypervisor\n";
        assert_eq!(decide_from(Accel::Auto, opens(), with_vmx).0, AccelChoice::Kvm);
        assert_eq!(
            decide_from(Accel::Auto, opens(), "flags : svm\n").0,
            AccelChoice::Kvm
        );
        let (choice, why) = decide_from(Accel::Auto, opens(), without);
        assert_eq!(choice, AccelChoice::Tcg);
        assert!(why.contains("neither vmx nor svm"), "{why}");
        let (choice, why) = decide_from(Accel::Auto, Err("ENOENT".into()), with_vmx);
        assert_eq!(choice, AccelChoice::Tcg);
        assert!(why.contains("ENOENT"), "{why}");
        // A flag named like vmx inside another word is not vmx.
        assert_eq!(
            decide_from(Accel::Auto, opens(), "flags : vmxnet svmx\n").0,
            AccelChoice::Tcg
        );
    }

    #[test]
    fn overrides_win() {
        assert_eq!(decide_from(Accel::Kvm, Err("x".into()), "").0, AccelChoice::Kvm);
        assert_eq!(
            decide_from(Accel::Tcg, opens(), "flags : vmx\n").0,
            AccelChoice::Tcg
        );
    }

    #[test]
    fn this_machine_picks_tcg() {
        // Measured fact: nested KVM does not work on these hosts (no vmx/svm).
        let (choice, why) = decide(Accel::Auto);
        if !std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .split_whitespace()
            .any(|f| f == "vmx" || f == "svm")
        {
            assert_eq!(choice, AccelChoice::Tcg, "{why}");
        }
    }
}
