//! Checks made before anything is mounted, so that bad input fails with a clear message and
//! leaves nothing behind.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where `fusermount3` lives, if anywhere on PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// /dev/fuse and fusermount3 are present.
pub fn check_fuse() -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "the FUSE device /dev/fuse is missing: install FUSE (sudo apt-get install fuse3) and \
             load the module (sudo modprobe fuse); inside a container, start it with --device /dev/fuse"
        );
    }
    if find_in_path("fusermount3").is_none() {
        bail!(
            "fusermount3 was not found on PATH: install it with `sudo apt-get install fuse3` \
             (kmount needs it to mount and unmount)"
        );
    }
    Ok(())
}

/// The target root exists and is a directory; returns its canonical path.
pub fn check_local_root(root: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(root).with_context(|| {
        format!(
            "the target directory {} cannot be used; check the path",
            root.display()
        )
    })?;
    if !meta.is_dir() {
        bail!(
            "the target {} is not a directory; kmount mounts directories",
            root.display()
        );
    }
    root.canonicalize()
        .with_context(|| format!("cannot resolve {}", root.display()))
}

/// The mountpoint exists, is an empty directory and is not mounted on; returns its canonical path.
pub fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf> {
    let meta = match std::fs::metadata(mountpoint) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "the mountpoint {} does not exist; create it first: mkdir -p {}",
            mountpoint.display(),
            mountpoint.display()
        ),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "the mountpoint {} is a mount whose kmount process is gone; clean it up with: \
             kmount unmount {}",
            mountpoint.display(),
            mountpoint.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot use {}", mountpoint.display()));
        }
    };
    if !meta.is_dir() {
        bail!(
            "the mountpoint {} is not a directory; give an empty directory",
            mountpoint.display()
        );
    }
    let canonical = mountpoint
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", mountpoint.display()))?;
    if let Some(fs) = mounted_fs_type(&canonical)? {
        bail!(
            "{} is already a mount point ({fs}); unmount it first (kmount unmount {}) or choose \
             another directory",
            canonical.display(),
            canonical.display()
        );
    }
    let mut entries = std::fs::read_dir(&canonical)
        .with_context(|| format!("cannot read the mountpoint {}", canonical.display()))?;
    if entries.next().is_some() {
        bail!(
            "the mountpoint {} is not empty; kmount mounts only on an empty directory so that \
             nothing in it is hidden (use another directory, or move its contents away)",
            canonical.display()
        );
    }
    Ok(canonical)
}

/// Neither directory contains the other (a mount inside its own source loops forever).
pub fn check_no_nesting(root: &Path, mountpoint: &Path) -> Result<()> {
    if mountpoint.starts_with(root) {
        bail!(
            "the mountpoint {} lies inside the target {}: the mount would contain itself and \
             loop forever; choose a mountpoint outside the target",
            mountpoint.display(),
            root.display()
        );
    }
    if root.starts_with(mountpoint) {
        bail!(
            "the target {} lies inside the mountpoint {}: mounting would hide the target; choose \
             a mountpoint outside the target",
            root.display(),
            mountpoint.display()
        );
    }
    Ok(())
}

/// The filesystem type mounted exactly at `path`, from /proc/self/mountinfo.
pub fn mounted_fs_type(path: &Path) -> Result<Option<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo (is /proc mounted?)")?;
    Ok(mountinfo_lookup(&info, path))
}

/// Parses mountinfo text; the last mount at `path` wins (it is the visible one).
pub fn mountinfo_lookup(info: &str, path: &Path) -> Option<String> {
    let want = path.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 10 {
            continue;
        }
        if kmount_mount::unescape_mountinfo(fields[4]) != want {
            continue;
        }
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        found = fields.get(sep + 1).map(|s| s.to_string());
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_refused_both_ways() {
        let r = Path::new("/a/b");
        assert!(check_no_nesting(r, Path::new("/a/b/mnt")).is_err());
        assert!(check_no_nesting(r, Path::new("/a/b")).is_err());
        assert!(check_no_nesting(r, Path::new("/a")).is_err());
        assert!(check_no_nesting(r, Path::new("/a/bc")).is_ok());
        assert!(check_no_nesting(r, Path::new("/x/mnt")).is_ok());
    }

    #[test]
    fn mountinfo_parsing() {
        let info = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:40 / /tmp/with\\040space rw - fuse.kmount kmount:/x rw,user_id=0\n";
        assert_eq!(
            mountinfo_lookup(info, Path::new("/tmp/with space")).as_deref(),
            Some("fuse.kmount")
        );
        assert_eq!(
            mountinfo_lookup(info, Path::new("/")).as_deref(),
            Some("ext4")
        );
        assert_eq!(mountinfo_lookup(info, Path::new("/tmp")), None);
    }

    #[test]
    fn mountpoint_checks() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = check_mountpoint(&missing).unwrap_err().to_string();
        assert!(e.contains("mkdir -p"), "{e}");
        let full = dir.path().join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("f"), b"x").unwrap();
        let e = check_mountpoint(&full).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_mountpoint(&file).is_err());
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(
            check_mountpoint(&empty).unwrap(),
            empty.canonicalize().unwrap()
        );
        let e = check_local_root(&missing).unwrap_err();
        assert!(format!("{e:#}").contains("check the path"));
        assert!(check_local_root(&file).is_err());
    }
}
