//! `kmount doctor`: checks what kmount needs on this machine and says what to fix.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::preflight::find_in_path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but something the user may want is off.
    Warn,
    /// kmount cannot work until this is fixed.
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do, when not Ok.
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    pub fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    pub fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The machine-level checks (targets add their own).
pub fn local_checks() -> Vec<Check> {
    vec![
        check_dev_fuse(Path::new("/dev/fuse")),
        check_fusermount(),
        check_fuse_conf(&std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default()),
        check_inotify(
            read_number("/proc/sys/fs/inotify/max_user_watches"),
            read_number("/proc/sys/fs/inotify/max_user_instances"),
        ),
        check_agent(),
    ]
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub fn check_dev_fuse(dev: &Path) -> Check {
    if !dev.exists() {
        return Check::fail(
            "/dev/fuse",
            "missing",
            "install FUSE (sudo apt-get install fuse3) and load it (sudo modprobe fuse); in a \
             container, start it with --device /dev/fuse",
        );
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => Check::ok("/dev/fuse", "present and usable"),
        Err(e) => Check::fail(
            "/dev/fuse",
            format!("cannot be opened: {e}"),
            "make /dev/fuse readable and writable for your user (mode 0666 is the default)",
        ),
    }
}

pub fn check_fusermount() -> Check {
    let Some(path) = find_in_path("fusermount3") else {
        return Check::fail(
            "fusermount3",
            "not found on PATH",
            "sudo apt-get install fuse3",
        );
    };
    let is_root = nix::unistd::geteuid().is_root();
    let setuid = std::fs::metadata(&path)
        .map(|m| m.permissions().mode() & 0o4000 != 0)
        .unwrap_or(false);
    if !is_root && !setuid {
        return Check::fail(
            "fusermount3",
            format!(
                "{} is not setuid root, so users cannot mount",
                path.display()
            ),
            format!("sudo chmod u+s {}", path.display()),
        );
    }
    Check::ok("fusermount3", path.display().to_string())
}

pub fn check_fuse_conf(text: &str) -> Check {
    let allowed = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .any(|l| l == "user_allow_other");
    if allowed {
        Check::ok("user_allow_other", "set in /etc/fuse.conf")
    } else {
        Check::warn(
            "user_allow_other",
            "not set in /etc/fuse.conf: mounts made by a normal user are visible to that user only",
            "to share mounts with other users (e.g. a container runtime), add the line \
             user_allow_other to /etc/fuse.conf",
        )
    }
}

pub fn check_inotify(watches: Option<u64>, instances: Option<u64>) -> Check {
    const WANT_WATCHES: u64 = 65536;
    match (watches, instances) {
        (Some(w), Some(i)) if w >= WANT_WATCHES && i >= 128 => Check::ok(
            "inotify limits",
            format!("max_user_watches {w}, max_user_instances {i}"),
        ),
        (Some(w), Some(i)) => Check::warn(
            "inotify limits",
            format!(
                "max_user_watches {w}, max_user_instances {i}: watchers (nodemon, webpack, \
                 the kmount agent) may run out on big trees"
            ),
            "sudo sysctl fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512 \
             (and add them to /etc/sysctl.d/ to keep them)",
        ),
        _ => Check::warn(
            "inotify limits",
            "cannot read /proc/sys/fs/inotify",
            "check that /proc is mounted",
        ),
    }
}

fn check_agent() -> Check {
    match crate::connect::agent_binary() {
        Ok(p) => Check::ok("kmount-agent", p.display().to_string()),
        Err(e) => Check::fail(
            "kmount-agent",
            format!("{e:#}"),
            "install both binaries together with ./install.sh",
        ),
    }
}

/// Prints the checks; returns whether everything needed is there (no Fail).
pub fn report(checks: &[Check]) -> bool {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let mark = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        println!("{mark}  {:<width$}  {}", c.name, c.detail);
        if let Some(fix) = &c.fix {
            println!("      {:<width$}  fix: {fix}", "");
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if failed == 0 {
        println!("kmount doctor: all needed checks passed");
    } else {
        println!("kmount doctor: {failed} check(s) need fixing (see fix: lines above)");
    }
    failed == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_conf_detection() {
        assert_eq!(check_fuse_conf("user_allow_other\n").status, Status::Ok);
        assert_eq!(
            check_fuse_conf("# user_allow_other\nmount_max = 1000\n").status,
            Status::Warn
        );
        assert_eq!(check_fuse_conf("").status, Status::Warn);
    }

    #[test]
    fn inotify_thresholds() {
        assert_eq!(check_inotify(Some(524288), Some(512)).status, Status::Ok);
        let low = check_inotify(Some(8192), Some(128));
        assert_eq!(low.status, Status::Warn);
        assert!(low.fix.unwrap().contains("max_user_watches=524288"));
        assert_eq!(check_inotify(None, None).status, Status::Warn);
    }

    #[test]
    fn missing_device_fails_with_a_fix() {
        let c = check_dev_fuse(Path::new("/nonexistent/fuse"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("apt-get install fuse3"));
    }
}
