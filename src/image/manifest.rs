//! `manifest.json`: what an image is made of. On disk the file names are
//! relative to the image directory; [`Manifest::load`] makes them absolute.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ImageError;

pub const FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The cache key (recipe hash and suite).
    pub key: String,
    /// Debian release of the guest (the host's).
    pub suite: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    pub kernel_version: String,
    /// The command line the image is made to boot with.
    pub cmdline: String,
    /// RFC 3339, UTC.
    pub built_at: String,
    pub build_seconds: f64,
    pub files: BTreeMap<String, FileInfo>,
    /// Installed packages: name to version.
    pub packages: BTreeMap<String, String>,
    /// Sum of the packages' Installed-Size, in KiB.
    pub installed_kib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub size: u64,
    pub sha256: String,
}

impl Manifest {
    /// Reads `dir/manifest.json` and resolves its file names against `dir`.
    pub fn load(dir: &Path) -> Result<Manifest, ImageError> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(ImageError::io("reading", &path))?;
        let mut m: Manifest = serde_json::from_str(&text).map_err(|e| ImageError::Corrupt {
            dir: dir.to_owned(),
            reason: format!("{FILE}: {e}"),
        })?;
        for file in [&mut m.kernel, &mut m.initrd, &mut m.disk] {
            *file = dir.join(&*file);
            if !file.is_file() {
                return Err(ImageError::Corrupt {
                    dir: dir.to_owned(),
                    reason: format!("{} is missing", file.display()),
                });
            }
        }
        Ok(m)
    }

    /// Writes the manifest with file names relative to `dir`.
    pub fn store(&self, dir: &Path) -> Result<(), ImageError> {
        let mut rel = self.clone();
        for file in [&mut rel.kernel, &mut rel.initrd, &mut rel.disk] {
            if let Some(name) = file.file_name() {
                *file = PathBuf::from(name);
            }
        }
        let path = dir.join(FILE);
        let text = serde_json::to_string_pretty(&rel).expect("a manifest always serializes");
        std::fs::write(&path, text + "\n").map_err(ImageError::io("writing", &path))
    }
}

/// Size and sha256 of one file.
pub fn file_info(path: &Path) -> Result<FileInfo, ImageError> {
    let mut file = std::fs::File::open(path).map_err(ImageError::io("opening", path))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(ImageError::io("reading", path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hash.update(&buf[..n]);
    }
    Ok(FileInfo {
        size,
        sha256: hex::encode(hash.finalize()),
    })
}

/// Parses `dpkg-query -f '${Package}\t${Version}\t${Installed-Size}\n'`.
pub fn parse_packages(tsv: &str) -> (BTreeMap<String, String>, u64) {
    let mut packages = BTreeMap::new();
    let mut kib = 0;
    for line in tsv.lines() {
        let mut cols = line.split('\t');
        if let (Some(name), Some(version)) = (cols.next(), cols.next())
            && !name.is_empty()
            && !version.is_empty()
        {
            packages.insert(name.to_owned(), version.to_owned());
            kib += cols
                .next()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (packages, kib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_and_sizes() {
        let (p, kib) = parse_packages("bash\t5.2.15-2+b13\t7164\nnginx-light\t1.22.1-9\t\nbad\n");
        assert_eq!(p.len(), 2);
        assert_eq!(p["bash"], "5.2.15-2+b13");
        assert_eq!(kib, 7164);
    }

    #[test]
    fn store_then_load_gives_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["vmlinux", "initrd.img", "disk.qcow2"] {
            std::fs::write(dir.path().join(f), f).unwrap();
        }
        let m = Manifest {
            key: "k".into(),
            suite: "bookworm".into(),
            kernel: dir.path().join("vmlinux"),
            initrd: dir.path().join("initrd.img"),
            disk: dir.path().join("disk.qcow2"),
            kernel_version: "6.1".into(),
            cmdline: "console=ttyS0".into(),
            built_at: "2026-01-01T00:00:00Z".into(),
            build_seconds: 1.5,
            files: BTreeMap::from([(
                "disk.qcow2".into(),
                file_info(&dir.path().join("disk.qcow2")).unwrap(),
            )]),
            packages: BTreeMap::new(),
            installed_kib: 0,
        };
        m.store(dir.path()).unwrap();
        let raw = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(raw.contains("\"disk\": \"disk.qcow2\""), "{raw}");
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        std::fs::remove_file(dir.path().join("initrd.img")).unwrap();
        assert!(matches!(
            Manifest::load(dir.path()),
            Err(ImageError::Corrupt { .. })
        ));
    }
}
