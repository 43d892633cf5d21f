//! `kmount logs`: a mount's log, one file per mount in the private log directory.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::state::{StateDirs, mount_id, pid_alive};
use crate::{absolute_mountpoint, only_record};

/// Logs larger than this are moved aside (`.log.old`) when the next mount there starts.
const ROTATE_AT: u64 = 8 << 20;

/// Moves a big log aside before a new daemon appends to it.
pub fn rotate(log: &Path) {
    if std::fs::metadata(log).is_ok_and(|m| m.len() > ROTATE_AT) {
        let _ = std::fs::rename(log, log.with_extension("log.old"));
    }
}

/// `kmount logs [MOUNTPOINT] [-f]`.
pub fn command(mountpoint: Option<&Path>, follow: bool) -> Result<()> {
    let dirs = StateDirs::for_current_user()?;
    let (mnt, pid) = match mountpoint {
        Some(p) => {
            let abs = absolute_mountpoint(p)?;
            let pid = dirs.record_for(&abs).map(|r| r.pid);
            (abs, pid)
        }
        None => {
            let rec = only_record(&dirs)?;
            (rec.mountpoint, Some(rec.pid))
        }
    };
    let log = dirs.log_path(&mount_id(&mnt));
    let file = match std::fs::File::open(&log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no log for {}: it was not mounted in the background by this user ({} does not \
             exist); a mount in the foreground (-f) logs to its terminal, with KMOUNT_LOG=info",
            mnt.display(),
            log.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", log.display())),
    };
    copy_to_stdout(file, &log, if follow { pid } else { None })
}

/// Prints `file`; with `follow_pid`, keeps printing what is appended while that process
/// lives (until interrupted).
fn copy_to_stdout(mut file: std::fs::File, log: &PathBuf, follow_pid: Option<u32>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", log.display()))?;
        if n > 0 {
            if let Err(e) = out.write_all(&buf[..n]) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(e).context("cannot write to stdout");
            }
            continue;
        }
        let _ = out.flush();
        let Some(pid) = follow_pid else {
            return Ok(());
        };
        if !pid_alive(pid) {
            // The mount ended: print its last words, then stop.
            let n = file.read(&mut buf).unwrap_or(0);
            let _ = out.write_all(&buf[..n]);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
        // The log was moved aside under us: start again on the new one.
        if let Ok(pos) = file.stream_position()
            && std::fs::metadata(log).is_ok_and(|m| m.len() < pos)
            && let Ok(f) = std::fs::File::open(log)
        {
            file = f;
            file.seek(SeekFrom::Start(0))?;
        }
    }
}
