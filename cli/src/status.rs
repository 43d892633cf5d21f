//! `kmount status`: what each mount is doing, as its daemon reports it over the control
//! socket (`status` command, answered with one [`MountStatus`] as JSON).
//!
//! `kmount status --json` prints one object, stable across releases within a version:
//!
//! ```json
//! {
//!   "schema": "kmount.status",
//!   "version": 1,
//!   "mounts": [{
//!     "target": "deploy/app:/app",          // as `kmount list` shows it
//!     "mountpoint": "/home/me/mnt",
//!     "pid": 4242,                          // the mount's daemon
//!     "state": "connected",                 // connected | reconnecting | stopped
//!     "state_detail": null,                 // why it is reconnecting or stopped
//!     "write_back": false,                  // local-first (--write-back)
//!     "pending_changes": 0,                 // changes not yet applied to the target
//!     "pending_bytes": 0,
//!     "last_reconcile": 1764160000.5,       // unix seconds, null before the first
//!     "last_reconcile_outcome": "in sync",
//!     "conflicts": 0,
//!     "recent_errors": ["..."],
//!     "files": 1234, "bytes": 5678,         // what the local tree holds
//!     "cache_bytes": 0, "cache_limit_bytes": 0,
//!     "bwlimit": null,                      // bytes per second, each direction
//!     "on_change": { "command": null, "runs": 0, "failures": 0, "running": false,
//!                    "last_run": null, "last_status": null, "last_error": null },
//!     "paused_removal": null                // or, when the target suddenly lacks most files:
//!     // { "entries": 500, "of": 500,       //   entries missing there, entries the mount has
//!     //   "since": 1764160000.5,           //   unix seconds
//!     //   "detail": "..." }                //   `kmount confirm MOUNTPOINT` applies it
//!     "fuse_requests": { "lookup": 12, "getattr": 3 }  // requests the kernel sent the mount
//!                                           // since it started, by kind (none: left out)
//!   }]
//! }
//! ```
//!
//! New keys may be added within version 1; none is removed or renamed without a new version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use kmount_mount::on_change;
use serde::{Deserialize, Serialize};

use crate::state::{MountRecord, StateDirs, mount_id, pid_alive};

pub const SCHEMA: &str = "kmount.status";
pub const VERSION: u32 = 1;

/// The whole `kmount status --json` document.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub version: u32,
    pub mounts: Vec<MountStatus>,
}

/// One mount's state. See the module documentation for the meaning of each key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MountStatus {
    pub target: String,
    pub mountpoint: PathBuf,
    pub pid: u32,
    pub state: String,
    pub state_detail: Option<String>,
    pub write_back: bool,
    pub pending_changes: u64,
    pub pending_bytes: u64,
    pub last_reconcile: Option<f64>,
    pub last_reconcile_outcome: Option<String>,
    pub conflicts: u64,
    pub recent_errors: Vec<String>,
    pub files: u64,
    pub bytes: u64,
    pub cache_bytes: u64,
    pub cache_limit_bytes: u64,
    pub bwlimit: Option<u64>,
    pub on_change: OnChange,
    /// Absent in answers of daemons older than the key.
    #[serde(default)]
    pub paused_removal: Option<PausedRemoval>,
    /// FUSE requests received since the mount started, by kind (for diagnosing what the
    /// kernel's caches do not answer). Absent in answers of daemons older than the key.
    #[serde(default)]
    pub fuse_requests: BTreeMap<String, u64>,
}

/// A mass removal the mount holds (`kmount_mount::guard`) until `kmount confirm` or until the
/// target has the entries again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PausedRemoval {
    /// Entries missing on the target, not removed from the mount.
    pub entries: u64,
    /// Entries the mount held when it paused.
    pub of: u64,
    pub since: f64,
    pub detail: String,
}

/// The `--on-change` command's state (mirrors [`on_change::Status`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OnChange {
    pub command: Option<String>,
    pub runs: u64,
    pub failures: u64,
    pub running: bool,
    pub last_run: Option<f64>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
}

impl OnChange {
    pub fn from_status(s: &on_change::Status, configured: Option<&str>) -> Self {
        OnChange {
            command: s.command.clone().or_else(|| configured.map(String::from)),
            runs: s.runs,
            failures: s.failures,
            running: s.running,
            last_run: s.last_run.map(unix_secs),
            last_status: s.last_status,
            last_error: s.last_error.clone(),
        }
    }
}

pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The daemon side: a snapshot of `handle`.
pub fn snapshot(
    record: &MountRecord,
    handle: &kmount_mount::MountHandle,
    flags: &crate::options::MountFlags,
) -> MountStatus {
    use kmount_mount::LinkStatus;
    let s = handle.status();
    let (state, detail) = match &s.link {
        LinkStatus::Connected { .. } => ("connected", None),
        LinkStatus::Reconnecting {
            since,
            attempts,
            last_error,
        } => (
            "reconnecting",
            Some(format!(
                "for {} s, {attempts} attempt(s): {last_error}",
                since.elapsed().as_secs()
            )),
        ),
        LinkStatus::Closed { reason } => ("stopped", Some(reason.clone())),
    };
    let mut recent_errors: Vec<String> = s
        .recent_errors
        .iter()
        .map(|e| match &e.path {
            Some(p) => format!("{p}: {}", e.message),
            None => e.message.clone(),
        })
        .collect();
    if let Some(b) = &s.blocked {
        recent_errors.push(format!("the target refuses a change: {}", b.message));
    }
    MountStatus {
        target: record.target.clone(),
        mountpoint: record.mountpoint.clone(),
        pid: record.pid,
        state: state.into(),
        state_detail: detail,
        write_back: s.write_back,
        pending_changes: s.pending.records,
        pending_bytes: s.pending.bytes,
        last_reconcile: s.sync.last_reconcile.map(unix_secs),
        last_reconcile_outcome: s.sync.last_reconcile_outcome.clone(),
        conflicts: s.conflicts.len() as u64,
        recent_errors,
        files: s.tree.nodes,
        bytes: s.tree.bytes,
        cache_bytes: s.cache_usage,
        cache_limit_bytes: s.cache_limit,
        bwlimit: flags.bwlimit,
        on_change: OnChange::from_status(&handle.on_change_status(), flags.on_change.as_deref()),
        paused_removal: s.sync.guard.held().map(|h| PausedRemoval {
            entries: h.removing,
            of: h.known,
            since: unix_secs(h.since),
            detail: h.describe(),
        }),
        fuse_requests: handle
            .fuse_requests()
            .into_iter()
            .map(|(kind, n)| (kind.to_string(), n))
            .collect(),
    }
}

/// The client side: asks the daemon of `rec`; a mount whose daemon is gone or silent is
/// reported `stopped`, with why.
pub fn query(dirs: &StateDirs, rec: &MountRecord) -> MountStatus {
    let stopped = |why: String| MountStatus {
        target: rec.target.clone(),
        mountpoint: rec.mountpoint.clone(),
        pid: rec.pid,
        state: "stopped".into(),
        state_detail: Some(why),
        ..MountStatus::default()
    };
    if !pid_alive(rec.pid) {
        return stopped(format!(
            "its kmount process (pid {}) is gone; `kmount unmount {}` cleans up",
            rec.pid,
            rec.mountpoint.display()
        ));
    }
    let sock = dirs.socket_path(&mount_id(&rec.mountpoint));
    match crate::control::request(&sock, "status", Duration::from_secs(10)) {
        Ok(json) => match serde_json::from_str::<MountStatus>(&json) {
            Ok(s) => s,
            Err(e) => stopped(format!("its daemon answered something unreadable: {e}")),
        },
        Err(e) => stopped(format!(
            "its daemon (pid {}) does not answer: {e:#}; see `kmount logs {}`",
            rec.pid,
            rec.mountpoint.display()
        )),
    }
}

/// `kmount status [MOUNTPOINT] [--json]`.
pub fn command(mountpoint: Option<&Path>, json: bool) -> Result<()> {
    let dirs = StateDirs::for_current_user()?;
    let records = match mountpoint {
        Some(p) => vec![crate::find_record(&dirs, p)?],
        None => dirs.records(),
    };
    let mounts: Vec<MountStatus> = records.iter().map(|r| query(&dirs, r)).collect();
    if json {
        let report = Report {
            schema: SCHEMA.into(),
            version: VERSION,
            mounts,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if mounts.is_empty() {
        println!("no kmount mounts");
    }
    for (i, m) in mounts.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", human(m));
    }
    Ok(())
}

/// The text form of one mount's status.
pub fn human(m: &MountStatus) -> String {
    let mut out = format!("{} on {}\n", m.target, m.mountpoint.display());
    let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<15} {v}\n"));
    let state = match &m.state_detail {
        Some(d) => format!("{} ({d})", m.state),
        None => m.state.clone(),
    };
    row("state", state);
    row("pid", m.pid.to_string());
    if m.state == "stopped" && m.files == 0 {
        return out;
    }
    row(
        "mode",
        if m.write_back {
            "write-back (local-first)".into()
        } else {
            "write-through".into()
        },
    );
    row(
        "not applied",
        format!(
            "{} change(s), {}",
            m.pending_changes,
            human_bytes(m.pending_bytes)
        ),
    );
    row(
        "last reconcile",
        match m.last_reconcile {
            Some(t) => format!(
                "{} ago{}",
                ago(t),
                m.last_reconcile_outcome
                    .as_ref()
                    .map(|o| format!(": {o}"))
                    .unwrap_or_default()
            ),
            None => "not yet".into(),
        },
    );
    if let Some(p) = &m.paused_removal {
        row(
            "removal",
            format!(
                "PAUSED for {}: the target lacks {} of {} entries; they stay in the mount. If \
                 the target is right: `kmount confirm {}`; else fix it and the pause ends by \
                 itself",
                ago(p.since),
                p.entries,
                p.of,
                m.mountpoint.display()
            ),
        );
    }
    row("conflicts", m.conflicts.to_string());
    row("files", format!("{} ({})", m.files, human_bytes(m.bytes)));
    if m.write_back {
        row(
            "cache",
            format!(
                "{} of {}",
                human_bytes(m.cache_bytes),
                human_bytes(m.cache_limit_bytes)
            ),
        );
    }
    if let Some(rate) = m.bwlimit {
        row(
            "bwlimit",
            format!("{}/s each way", crate::options::format_rate(rate)),
        );
    }
    let oc = &m.on_change;
    if let Some(cmd) = &oc.command {
        let mut v = format!("{cmd:?}: {} run(s), {} failed", oc.runs, oc.failures);
        if oc.running {
            v.push_str(", running now");
        }
        if let Some(e) = &oc.last_error {
            v.push_str(&format!("; last error: {e}"));
        }
        row("on change", v);
    }
    if m.recent_errors.is_empty() {
        row("errors", "none".into());
    } else {
        row("errors", String::new());
        for e in &m.recent_errors {
            out.push_str(&format!("    {e}\n"));
        }
    }
    out
}

fn ago(unix: f64) -> String {
    let secs = (unix_secs(SystemTime::now()) - unix).max(0.0) as u64;
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keys_are_stable() {
        let report = Report {
            schema: SCHEMA.into(),
            version: VERSION,
            mounts: vec![MountStatus::default()],
        };
        let v = serde_json::to_value(&report).unwrap();
        let mut keys: Vec<&String> = v["mounts"][0].as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "bwlimit",
                "bytes",
                "cache_bytes",
                "cache_limit_bytes",
                "conflicts",
                "files",
                "fuse_requests",
                "last_reconcile",
                "last_reconcile_outcome",
                "mountpoint",
                "on_change",
                "paused_removal",
                "pending_bytes",
                "pending_changes",
                "pid",
                "recent_errors",
                "state",
                "state_detail",
                "target",
                "write_back",
            ]
        );
        assert_eq!(v["schema"], "kmount.status");
        assert_eq!(v["version"], 1);
    }

    #[test]
    fn a_paused_removal_is_shown_with_what_to_do() {
        let m = MountStatus {
            mountpoint: "/m".into(),
            state: "connected".into(),
            paused_removal: Some(PausedRemoval {
                entries: 500,
                of: 510,
                since: unix_secs(SystemTime::now()),
                detail: String::new(),
            }),
            ..MountStatus::default()
        };
        let text = human(&m);
        assert!(text.contains("lacks 500 of 510"), "{text}");
        assert!(text.contains("kmount confirm /m"), "{text}");
        // An older daemon's answer, without the key, still reads.
        let mut v = serde_json::to_value(&m).unwrap();
        v.as_object_mut().unwrap().remove("paused_removal");
        let old: MountStatus = serde_json::from_value(v).unwrap();
        assert_eq!(old.paused_removal, None);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
