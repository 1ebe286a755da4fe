//! Size-capped log files. Every log webhoster keeps (a VM's console and
//! QEMU's own output, nginx's access and error logs) reaches the disk only
//! through a [`RotatingFile`] in webhoster: nothing else holds these files
//! open, so rotation is a rename, and while webhoster is down nothing grows
//! (the writers' output waits in bounded buffers or is dropped; see
//! `ARCHITECTURE.md`, "Logs"). Never decides what is logged.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How large a log may grow and how many old generations stay, so one log
/// takes at most `max_bytes * (1 + keep)` on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogCap {
    pub max_bytes: u64,
    /// Old generations kept: `<name>.1` (newest) .. `<name>.<keep>`.
    pub keep: u32,
}

impl LogCap {
    pub const DEFAULT_MAX_MIB: u64 = 10;
    pub const DEFAULT_KEEP: u32 = 2;

    pub fn from_mib(max_mib: u64, keep: u32) -> LogCap {
        LogCap {
            max_bytes: max_mib.max(1) << 20,
            keep,
        }
    }

    /// The most one log and its generations take on disk.
    pub fn bound(&self) -> u64 {
        self.max_bytes * (1 + u64::from(self.keep))
    }
}

impl Default for LogCap {
    fn default() -> Self {
        LogCap::from_mib(Self::DEFAULT_MAX_MIB, Self::DEFAULT_KEEP)
    }
}

/// `<path>.<n>`: the n-th older generation of a log.
pub fn generation(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// A log file that is rotated before a write would take it past its cap.
/// Created 0600 (root's only: a console log holds whatever the guest
/// printed).
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    cap: LogCap,
    /// With its length; `None` until the first write (or [`Self::open`]).
    file: Option<(File, u64)>,
}

impl RotatingFile {
    pub fn new(path: PathBuf, cap: LogCap) -> RotatingFile {
        RotatingFile {
            path,
            cap,
            file: None,
        }
    }

    /// [`Self::new`], with the file made now.
    pub fn open(path: PathBuf, cap: LogCap) -> io::Result<RotatingFile> {
        let mut file = RotatingFile::new(path, cap);
        file.reopen()?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `data`; one write larger than the cap keeps only its end.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let max = usize::try_from(self.cap.max_bytes).unwrap_or(usize::MAX);
        let data = &data[data.len().saturating_sub(max)..];
        if data.is_empty() {
            return Ok(());
        }
        let len = match &self.file {
            Some((_, len)) => *len,
            None => self.reopen()?,
        };
        if len > 0 && len + data.len() as u64 > self.cap.max_bytes {
            self.rotate()?;
            self.reopen()?;
        }
        let (file, len) = self.file.as_mut().expect("opened above");
        file.write_all(data)?;
        *len += data.len() as u64;
        Ok(())
    }

    fn reopen(&mut self) -> io::Result<u64> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        file.set_permissions(Permissions::from_mode(0o600))?;
        let len = file.metadata()?.len();
        self.file = Some((file, len));
        Ok(len)
    }

    /// `<name>.<keep-1>` -> `<name>.<keep>` ... `<name>` -> `<name>.1`; the
    /// oldest is overwritten. With `keep == 0` the log starts afresh.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        if self.cap.keep == 0 {
            return std::fs::remove_file(&self.path);
        }
        for n in (1..self.cap.keep).rev() {
            match std::fs::rename(generation(&self.path, n), generation(&self.path, n + 1)) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        std::fs::rename(&self.path, generation(&self.path, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn rotates_before_passing_the_cap_and_keeps_that_many_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let cap = LogCap {
            max_bytes: 100,
            keep: 2,
        };
        let mut log = RotatingFile::new(path.clone(), cap);
        for i in 0..50u8 {
            log.append(&[b'a' + i % 26; 30]).unwrap();
            assert!(size(&path) <= 100);
        }
        assert_eq!(
            size(&path),
            60,
            "50 writes of 30 bytes: 3 per file, 2 in the last"
        );
        assert_eq!(size(&generation(&path, 1)), 90);
        assert_eq!(size(&generation(&path, 2)), 90);
        assert!(!generation(&path, 3).exists());
        // The newest lines are in the current file, the one before in .1.
        assert_eq!(std::fs::read(&path).unwrap()[59], b'a' + 49 % 26);
        assert_eq!(std::fs::read(generation(&path, 1)).unwrap()[0], b'a' + 45 % 26);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn an_oversized_write_keeps_its_end_and_an_existing_file_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, [b'o'; 90]).unwrap();
        let mut log = RotatingFile::new(
            path.clone(),
            LogCap {
                max_bytes: 100,
                keep: 0,
            },
        );
        let big: Vec<u8> = (0..250u16).map(|i| i as u8).collect();
        log.append(&big).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), big[150..]);
        assert!(!generation(&path, 1).exists());
    }
}
