//! `kmount confirm MOUNTPOINT`: applies a mass removal the mount paused (the remote suddenly
//! lacks most of the tree; see `kmount_mount::guard`), through the daemon's control socket
//! (`confirm` command, answered with a [`Confirmed`] as JSON).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::state::{StateDirs, mount_id, pid_alive};

/// The daemon's answer: what it confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmed {
    /// Entries the removal takes out of the mount.
    pub entries: u64,
    /// Entries the mount held when the removal was paused.
    pub of: u64,
}

/// The daemon side.
pub fn answer(handle: &kmount_mount::MountHandle) -> Result<String> {
    let held = handle
        .confirm_removal()
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    Ok(serde_json::to_string(&Confirmed {
        entries: held.removing,
        of: held.known,
    })?)
}

/// `kmount confirm MOUNTPOINT`.
pub fn command(mountpoint: &Path) -> Result<()> {
    let dirs = StateDirs::for_current_user()?;
    let rec = crate::find_record(&dirs, mountpoint)?;
    if !pid_alive(rec.pid) {
        bail!(
            "the kmount process of {} (pid {}) is gone, so nothing is paused there; `kmount \
             unmount {}` cleans up",
            rec.mountpoint.display(),
            rec.pid,
            rec.mountpoint.display()
        );
    }
    let json = crate::control::request(
        &dirs.socket_path(&mount_id(&rec.mountpoint)),
        "confirm",
        Duration::from_secs(10),
    )
    .with_context(|| format!("cannot confirm on {}", rec.mountpoint.display()))?;
    let c: Confirmed =
        serde_json::from_str(&json).context("the kmount daemon answered something unreadable")?;
    println!(
        "kmount: confirmed: {} of {} entries go from {} (the target lacks them); `kmount \
         status {}` shows when it is done",
        c.entries,
        c.of,
        rec.mountpoint.display(),
        rec.mountpoint.display()
    );
    Ok(())
}
