//! `kmount unmount`: flush, then unmount; `--force` detaches at once even when the target or
//! the mount's process is gone or hangs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::state::{MountRecord, StateDirs, mount_id, pid_alive};
use crate::{absolute_mountpoint, control, preflight, run};

/// `kmount unmount [MOUNTPOINT] [--all] [--force]`.
pub fn command(mountpoint: Option<&Path>, all: bool, force: bool) -> Result<()> {
    let dirs = StateDirs::for_current_user()?;
    let one = |mnt: &Path| {
        if force {
            force_one(&dirs, mnt)
        } else {
            unmount_one(&dirs, mnt)
        }
    };
    if all {
        let records = dirs.records();
        if records.is_empty() {
            println!("kmount: nothing is mounted");
            return Ok(());
        }
        let mut failed = 0;
        for rec in records {
            if let Err(e) = one(&rec.mountpoint) {
                eprintln!("kmount: error: {e:#}");
                failed += 1;
            }
        }
        if failed > 0 {
            bail!("{failed} mount(s) could not be unmounted (see above)");
        }
        return Ok(());
    }
    let Some(mountpoint) = mountpoint else {
        bail!("give a mountpoint or --all");
    };
    one(&absolute_mountpoint(mountpoint)?)
}

/// Flushes, unmounts, and waits for the daemon to exit.
pub fn unmount_one(dirs: &StateDirs, mountpoint: &Path) -> Result<()> {
    let id = mount_id(mountpoint);
    let record = dirs.record_for(mountpoint);
    let mounted = preflight::mounted_fs_type(mountpoint)?;
    match record {
        Some(rec) if pid_alive(rec.pid) => {
            control::request(&dirs.socket_path(&id), "unmount", Duration::from_secs(120))
                .with_context(|| {
                    format!(
                        "cannot unmount {}; `kmount unmount --force {}` detaches it anyway \
                         (changes not yet applied are kept for the next mount)",
                        mountpoint.display(),
                        mountpoint.display()
                    )
                })?;
            // The daemon exits once the kernel has ended the session.
            if !wait_exit(rec.pid, Duration::from_secs(30)) {
                bail!(
                    "{} was unmounted but its kmount process (pid {}) has not exited yet; see \
                     `kmount logs {}`, or end it with `kill {}`",
                    mountpoint.display(),
                    rec.pid,
                    mountpoint.display(),
                    rec.pid
                );
            }
            println!("kmount: unmounted {}", mountpoint.display());
            Ok(())
        }
        rec => {
            let is_kmount = mounted.as_deref().is_some_and(|t| t.starts_with("fuse"));
            if !is_kmount {
                dirs.remove_record(mountpoint);
                if rec.is_some() {
                    println!(
                        "kmount: {} was no longer mounted; removed its stale record",
                        mountpoint.display()
                    );
                    return Ok(());
                }
                bail!(
                    "{} is not a kmount mount (see `kmount list`)",
                    mountpoint.display()
                );
            }
            if rec.is_none() && std::fs::metadata(mountpoint).is_ok() {
                // Something still serves it, and it is not a mount this state directory
                // knows: detaching it would leave that process's unsent changes behind.
                bail!(
                    "{} is served by a kmount process that this user's state directory does                      not know (another KMOUNT_STATE_DIR, or another user started it): run                      `kmount unmount` as that user or with that KMOUNT_STATE_DIR so its changes                      are flushed first, or `kmount unmount --force {}` to detach it now                      (changes not yet applied stay in that process's journal)",
                    mountpoint.display(),
                    mountpoint.display()
                );
            }
            // The daemon is gone (killed, crashed): detach the dead mount.
            run::unmount_path(mountpoint, true)?;
            dirs.remove_record(mountpoint);
            println!(
                "kmount: unmounted {} (its kmount process was gone)",
                mountpoint.display()
            );
            Ok(())
        }
    }
}

/// What a daemon that still answers says is not applied yet.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Unapplied {
    pub records: u64,
    pub bytes: u64,
    pub paths: Vec<String>,
    /// Where they are kept (the write-back journal), if anywhere.
    pub journal: Option<std::path::PathBuf>,
}

/// Detaches the mount at once (lazy unmount), ends its daemon, and says what was not applied.
fn force_one(dirs: &StateDirs, mountpoint: &Path) -> Result<()> {
    let id = mount_id(mountpoint);
    let record = dirs.record_for(mountpoint);
    let mounted = preflight::mounted_fs_type(mountpoint)?;
    let is_fuse = mounted.as_deref().is_some_and(|t| t.starts_with("fuse"));
    if record.is_none() && !is_fuse {
        bail!(
            "{} is not a kmount mount (see `kmount list`)",
            mountpoint.display()
        );
    }
    let alive = record
        .as_ref()
        .filter(|r| pid_alive(r.pid) && is_kmount(r.pid));
    // A daemon that still answers says what it has not sent; a hung one cannot.
    let unapplied = alive.map(|_| {
        control::request(&dirs.socket_path(&id), "pending", Duration::from_secs(2))
            .ok()
            .and_then(|json| serde_json::from_str::<Unapplied>(&json).ok())
    });
    if is_fuse {
        run::unmount_path(mountpoint, true)?;
    }
    if let Some(rec) = alive {
        end_daemon(rec);
    }
    dirs.remove_record(mountpoint);
    println!("kmount: unmounted {} (forced)", mountpoint.display());
    match unapplied {
        Some(Some(u)) if u.records > 0 => {
            println!(
                "kmount: {} change(s) ({} bytes) were not applied to {}:",
                u.records,
                u.bytes,
                record.as_ref().map_or("the target", |r| r.target.as_str())
            );
            for p in u.paths.iter().take(20) {
                println!("  {p}");
            }
            if u.paths.len() > 20 {
                println!("  … and {} more", u.paths.len() - 20);
            }
            if let Some(j) = &u.journal {
                println!(
                    "kmount: they are kept in {} and sent by the next mount of the same target \
                     at {}",
                    j.display(),
                    mountpoint.display()
                );
            }
        }
        Some(Some(_)) => println!("kmount: every change had been applied"),
        Some(None) => println!(
            "kmount: its process did not say which changes were not applied; a write-back \
             journal, if any, is kept and sent by the next mount of the same target at {}",
            mountpoint.display()
        ),
        None => {}
    }
    Ok(())
}

/// Whether `pid` is a kmount process (a recorded pid may have been reused).
fn is_kmount(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let argv0 = c.split(|&b| b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(argv0).contains("kmount")
        })
        .unwrap_or(false)
}

/// SIGTERM (the unmounted daemon then exits on its own), then SIGKILL after a short wait.
fn end_daemon(rec: &MountRecord) {
    use nix::sys::signal::{Signal, kill};
    let Ok(raw) = i32::try_from(rec.pid) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(raw);
    // A stopped (hung under a debugger, SIGSTOP) process takes no SIGTERM: wake it.
    let _ = kill(pid, Signal::SIGCONT);
    if wait_exit(rec.pid, Duration::from_secs(2)) {
        return;
    }
    let _ = kill(pid, Signal::SIGTERM);
    if wait_exit(rec.pid, Duration::from_secs(3)) {
        return;
    }
    let _ = kill(pid, Signal::SIGKILL);
    wait_exit(rec.pid, Duration::from_secs(5));
}

/// Waits until `pid` has exited; returns whether it has.
fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    !pid_alive(pid)
}
