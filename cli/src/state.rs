//! kmount's local state: where the record of each running mount, its control socket and its
//! log live. Every directory is private (mode 0700).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The record of one running mount, written by its daemon once the mount is ready.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    pub target: String,
    pub mountpoint: PathBuf,
    pub pid: u32,
    /// Seconds since the epoch.
    pub started: u64,
}

/// The state directories of the current user.
#[derive(Debug, Clone)]
pub struct StateDirs {
    /// Records and control sockets of running mounts.
    pub run: PathBuf,
    /// One log file per mount.
    pub logs: PathBuf,
}

impl StateDirs {
    /// `KMOUNT_STATE_DIR` if set (tests), else /run/kmount for root and the XDG runtime and
    /// state directories for everyone else.
    pub fn for_current_user() -> Result<Self> {
        if let Some(base) = std::env::var_os("KMOUNT_STATE_DIR") {
            let base = PathBuf::from(base);
            return Ok(Self {
                run: base.join("run"),
                logs: base.join("logs"),
            });
        }
        let uid = nix::unistd::geteuid();
        let run = if uid.is_root() {
            PathBuf::from("/run/kmount")
        } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
            PathBuf::from(x).join("kmount")
        } else {
            std::env::temp_dir().join(format!("kmount-{uid}"))
        };
        let state_home = match std::env::var_os("XDG_STATE_HOME") {
            Some(x) => PathBuf::from(x),
            None => {
                let home = std::env::var_os("HOME")
                    .context("$HOME is not set; set it or KMOUNT_STATE_DIR")?;
                PathBuf::from(home).join(".local/state")
            }
        };
        Ok(Self {
            run,
            logs: state_home.join("kmount/logs"),
        })
    }

    /// Creates both directories with mode 0700 (and tightens them if they exist).
    pub fn create(&self) -> Result<()> {
        for dir in [&self.run, &self.logs] {
            private_dir(dir)?;
        }
        Ok(())
    }

    pub fn record_path(&self, id: &str) -> PathBuf {
        self.run.join(format!("{id}.json"))
    }

    pub fn socket_path(&self, id: &str) -> PathBuf {
        self.run.join(format!("{id}.sock"))
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.logs.join(format!("{id}.log"))
    }

    pub fn write_record(&self, rec: &MountRecord) -> Result<()> {
        let id = mount_id(&rec.mountpoint);
        let path = self.record_path(&id);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(rec)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    pub fn remove_record(&self, mountpoint: &Path) {
        let id = mount_id(mountpoint);
        let _ = std::fs::remove_file(self.record_path(&id));
        let _ = std::fs::remove_file(self.socket_path(&id));
    }

    /// Every record on disk, unreadable ones skipped.
    pub fn records(&self) -> Vec<MountRecord> {
        let Ok(dir) = std::fs::read_dir(&self.run) else {
            return Vec::new();
        };
        let mut out: Vec<MountRecord> = dir
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
    }

    pub fn record_for(&self, mountpoint: &Path) -> Option<MountRecord> {
        let b = std::fs::read(self.record_path(&mount_id(mountpoint))).ok()?;
        serde_json::from_slice(&b).ok()
    }
}

/// Creates `dir` (and parents) with mode 0700, and makes an existing one 0700.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))?;
    Ok(())
}

/// A stable, file-name-safe id for a mountpoint (FNV-1a 64 of the canonical path).
pub fn mount_id(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mountpoint.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let name: String = mountpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(24)
        .collect();
    format!("{name}-{h:016x}")
}

/// Whether a process with this pid is alive.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    let exists = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    };
    // A zombie (exited, not yet reaped by whoever adopted it) is not alive.
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("Z")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = mount_id(Path::new("/tmp/x/mnt"));
        assert_eq!(a, mount_id(Path::new("/tmp/x/mnt")));
        assert_ne!(a, mount_id(Path::new("/tmp/y/mnt")));
        assert!(a.starts_with("mnt-"));
    }

    #[test]
    fn records_round_trip_in_private_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = StateDirs {
            run: dir.path().join("run"),
            logs: dir.path().join("logs"),
        };
        dirs.create().unwrap();
        let mode = std::fs::metadata(&dirs.run).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let rec = MountRecord {
            target: "/src".into(),
            mountpoint: "/mnt/a".into(),
            pid: 42,
            started: 1,
        };
        dirs.write_record(&rec).unwrap();
        assert_eq!(dirs.records(), vec![rec.clone()]);
        assert_eq!(dirs.record_for(Path::new("/mnt/a")), Some(rec));
        dirs.remove_record(Path::new("/mnt/a"));
        assert!(dirs.records().is_empty());
    }

    #[test]
    fn own_pid_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
