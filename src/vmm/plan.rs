//! VM plans: the hardware a VM gets (vCPUs, memory, disk size), kept as data
//! files in `qemu/plans/<name>.toml` and embedded in the binary, so a running
//! service cannot drift from the plans it was built with. Validated at load.

use serde::{Deserialize, Serialize};

/// The plans that exist, by name; `standard` is the default.
const PLANS: &[(&str, &str)] = &[
    ("small", include_str!("../../qemu/plans/small.toml")),
    ("standard", include_str!("../../qemu/plans/standard.toml")),
];

pub const DEFAULT_PLAN: &str = "standard";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("unknown plan {name:?} (known: {known})")]
    Unknown { name: String, known: String },
    #[error("plan {name:?} does not parse")]
    Parse {
        name: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("plan {name:?}: {field} = {value} is outside {min}..={max}")]
    OutOfRange {
        name: String,
        field: &'static str,
        value: u32,
        min: u32,
        max: u32,
    },
}

/// The file format: the name comes from the file name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    vcpus: u32,
    memory_mib: u32,
    disk_gib: u32,
}

impl Plan {
    /// The embedded plan `name`, validated.
    pub fn load(name: &str) -> Result<Plan, PlanError> {
        let text = PLANS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, text)| *text)
            .ok_or_else(|| PlanError::Unknown {
                name: name.to_owned(),
                known: Self::names().join(", "),
            })?;
        Self::parse(name, text)
    }

    pub fn names() -> Vec<&'static str> {
        PLANS.iter().map(|(n, _)| *n).collect()
    }

    /// Parse then validate a plan file's text.
    pub fn parse(name: &str, text: &str) -> Result<Plan, PlanError> {
        let file: PlanFile = toml::from_str(text).map_err(|source| PlanError::Parse {
            name: name.to_owned(),
            source,
        })?;
        let plan = Plan {
            name: name.to_owned(),
            vcpus: file.vcpus,
            memory_mib: file.memory_mib,
            disk_gib: file.disk_gib,
        };
        plan.validate()?;
        Ok(plan)
    }

    /// Bounds: a Debian guest with cloud-init needs about 256 MiB to boot and
    /// 2 GiB of disk (the base image); the upper bounds catch unit mistakes
    /// (MiB written as bytes, GiB as MiB).
    pub fn validate(&self) -> Result<(), PlanError> {
        let check = |field: &'static str, value: u32, min: u32, max: u32| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(PlanError::OutOfRange {
                    name: self.name.clone(),
                    field,
                    value,
                    min,
                    max,
                })
            }
        };
        check("vcpus", self.vcpus, 1, 64)?;
        check("memory_mib", self.memory_mib, 256, 256 * 1024)?;
        check("disk_gib", self.disk_gib, 2, 4096)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_plans_load_with_the_promised_sizes() {
        let small = Plan::load("small").unwrap();
        assert_eq!((small.vcpus, small.memory_mib, small.disk_gib), (1, 512, 10));
        let standard = Plan::load(DEFAULT_PLAN).unwrap();
        assert_eq!(standard.name, "standard");
        assert_eq!(
            (standard.vcpus, standard.memory_mib, standard.disk_gib),
            (1, 1024, 20)
        );
    }

    #[test]
    fn unknown_plan_names_the_known_ones() {
        let err = Plan::load("huge").unwrap_err().to_string();
        assert!(err.contains("small, standard"), "{err}");
    }

    #[test]
    fn bad_files_are_rejected() {
        assert!(matches!(
            Plan::parse("x", "vcpus = 1\nmemory_mib = 512\n"),
            Err(PlanError::Parse { .. })
        ));
        assert!(matches!(
            Plan::parse("x", "vcpus = 1\nmemory_mib = 512\ndisk_gib = 10\ncolor = 1\n"),
            Err(PlanError::Parse { .. })
        ));
        assert!(matches!(
            Plan::parse("x", "vcpus = 0\nmemory_mib = 512\ndisk_gib = 10\n"),
            Err(PlanError::OutOfRange { field: "vcpus", .. })
        ));
        assert!(matches!(
            Plan::parse("x", "vcpus = 1\nmemory_mib = 536870912\ndisk_gib = 10\n"),
            Err(PlanError::OutOfRange {
                field: "memory_mib",
                ..
            })
        ));
    }
}
