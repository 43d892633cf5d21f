//! The mount itself, in the foreground: connect to the agent, mount, then serve until the
//! mount is unmounted (by `kmount unmount`, a signal, or `fusermount3 -u`).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use kmount_mount::{Client, Flusher, MountOptions};

use crate::connect;
use crate::control::{self, ControlRequest};
use crate::daemon::Ready;
use crate::state::{MountRecord, StateDirs, mount_id};
use crate::target::Target;

/// What the main loop of a running mount reacts to.
enum Event {
    Signal(&'static str),
    Control(ControlRequest),
    SessionEnded(std::io::Result<()>),
}

/// Mounts `target` (already checked) at `mountpoint` (canonical, empty) and serves it until it
/// is unmounted. Reports readiness or failure through `ready`.
pub fn run(target: &Target, mountpoint: &Path, mut ready: Ready) -> Result<()> {
    match mount_and_serve(target, mountpoint, &mut ready) {
        Ok(()) => Ok(()),
        Err(e) => {
            ready.fail(&e);
            Err(e)
        }
    }
}

fn mount_and_serve(target: &Target, mountpoint: &Path, ready: &mut Ready) -> Result<()> {
    let started = Instant::now();
    let dirs = StateDirs::for_current_user()?;
    dirs.create()?;
    let id = mount_id(mountpoint);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("kmount-io")
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")?;

    let plan = connect::plan(target, mountpoint)?;
    // Shared: a lost connection is made again through the same connector.
    let client = runtime
        .block_on(Client::connect_shared(plan.connector.clone()))
        .with_context(|| format!("cannot start serving {}", target.display()))?;
    let local_first = write_back_enabled();
    let (cache_dir, journal_dir) = if local_first {
        let state = session_dir(&dirs, target, mountpoint);
        crate::state::private_dir(&state)?;
        (Some(state.join("cache")), Some(state.join("journal")))
    } else {
        (None, None)
    };

    let opts = MountOptions {
        fsname: format!("kmount:{}", target.display()),
        allow_other: plan.shared,
        default_permissions: plan.shared,
        identity: plan.identity,
        owner_map: plan.owner_map(&client),
        reconcile_interval: crate::reconcile_interval(),
        cache_dir,
        journal_dir,
        ..MountOptions::default()
    };
    let handle = kmount_mount::mount(runtime.handle().clone(), client, mountpoint, &opts)
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
    let flusher = handle.flusher();
    if local_first && !handle.status().write_back {
        tracing::info!(
            "the agent keeps no journal: every change reaches it before the call returns"
        );
    }

    let (events_tx, events_rx) = mpsc::channel::<Event>();
    // session thread --ended--> main loop
    {
        let events_tx = events_tx.clone();
        std::thread::Builder::new()
            .name("session-join".into())
            .spawn(move || {
                let _ = events_tx.send(Event::SessionEnded(handle.join()));
            })?;
    }
    // control socket --requests--> main loop
    {
        let (control_tx, control_rx) = mpsc::channel::<ControlRequest>();
        control::serve(&dirs.socket_path(&id), control_tx)?;
        let events_tx = events_tx.clone();
        std::thread::spawn(move || {
            for req in control_rx {
                if events_tx.send(Event::Control(req)).is_err() {
                    break;
                }
            }
        });
    }
    // signals --> main loop
    {
        let events_tx = events_tx.clone();
        runtime.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            loop {
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                    _ = hup.recv() => "SIGHUP",
                };
                if events_tx.send(Event::Signal(name)).is_err() {
                    break;
                }
            }
        });
    }

    dirs.write_record(&MountRecord {
        target: target.display(),
        mountpoint: mountpoint.to_path_buf(),
        pid: std::process::id(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })?;
    let line = format!(
        "kmount: mounted {} at {} in {:.2}s (pid {}; `kmount unmount {}` to stop)",
        target.display(),
        mountpoint.display(),
        started.elapsed().as_secs_f64(),
        std::process::id(),
        mountpoint.display()
    );
    tracing::info!("{line}");
    ready.ok(&line);

    let result = serve_until_unmounted(mountpoint, &events_rx, &flusher);
    // The last hold on the mount's state: the journal and the cache close with it.
    drop(flusher);
    dirs.remove_record(mountpoint);
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

fn serve_until_unmounted(
    mountpoint: &Path,
    events_rx: &mpsc::Receiver<Event>,
    flusher: &Flusher,
) -> Result<()> {
    let mut interrupts = 0;
    loop {
        let Ok(event) = events_rx.recv() else {
            bail!("internal error: every event source of the mount is gone");
        };
        match event {
            Event::SessionEnded(res) => {
                tracing::info!("{} was unmounted", mountpoint.display());
                return res.context("the FUSE session ended with an error");
            }
            Event::Control(req) => {
                let answer = match req.command.as_str() {
                    "ping" => format!("ok {}", std::process::id()),
                    "wait" => match flush(flusher, UNMOUNT_FLUSH) {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("error: {e:#}"),
                    },
                    "unmount" => match flush(flusher, UNMOUNT_FLUSH)
                        .map_err(|e| e.context("not unmounted"))
                        .and_then(|()| unmount_path(mountpoint, false))
                    {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("error: {e:#}"),
                    },
                    other => format!("error: unknown command '{other}'"),
                };
                req.answer(&answer);
            }
            Event::Signal(name) => {
                interrupts += 1;
                // A second interrupt gives up waiting for busy users of the mount.
                let lazy = interrupts > 1;
                tracing::info!("{name}: unmounting {}", mountpoint.display());
                if !lazy && let Err(e) = flush(flusher, SIGNAL_FLUSH) {
                    // Kept in the journal: the next mount of this target here sends them.
                    tracing::warn!("{e:#}; unmounting anyway, the journal keeps them");
                }
                if let Err(e) = unmount_path(mountpoint, lazy) {
                    tracing::error!("{e:#}");
                    eprintln!("kmount: {e:#}\nkmount: press Ctrl-C again to detach it anyway");
                }
            }
        }
    }
}

/// How long `kmount unmount` waits for changes to reach the target before giving up (the
/// mount then stays). Below the control request's own timeout.
const UNMOUNT_FLUSH: Duration = Duration::from_secs(100);
/// How long an interrupt waits for them before unmounting anyway.
const SIGNAL_FLUSH: Duration = Duration::from_secs(20);

/// Whether this mount is local-first (`--write-back`, or `KMOUNT_WRITE_BACK=1`): changes land
/// in a local journal and content cache and reach the target in order, in the background.
/// Not the default yet: through the CLI's test tiers some attributes (inode numbers of nodes
/// made while many changes are queued, times of directories) and extended attribute flags
/// still differ from the target's.
pub fn write_back_enabled() -> bool {
    crate::write_back_flag() || std::env::var_os("KMOUNT_WRITE_BACK").is_some_and(|v| v == "1")
}

/// The directory of this mount's journal and content cache: one per target and mountpoint,
/// kept across runs so that changes not yet sent when kmount stopped are sent by the next
/// mount of the same target at the same place (`<state>/mounts/<mountpoint id>-<target id>`).
fn session_dir(dirs: &StateDirs, target: &Target, mountpoint: &Path) -> PathBuf {
    let base = dirs
        .logs
        .parent()
        .map_or_else(|| dirs.logs.clone(), Path::to_path_buf);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.display().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    base.join("mounts")
        .join(format!("{}-{h:016x}", mount_id(mountpoint)))
}

/// Waits until every change made through the mount is in the target, at most `timeout`.
fn flush(flusher: &Flusher, timeout: Duration) -> Result<()> {
    if let Some(p) = flusher.pending().filter(|p| p.records > 0) {
        tracing::info!(
            "waiting for {} pending change(s) to reach the target",
            p.records
        );
    }
    flusher.wait_applied(timeout).map_err(|e| {
        let paths = flusher
            .pending()
            .map(|p| {
                p.paths
                    .iter()
                    .take(5)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        anyhow::anyhow!(
            "{e}{}; the changes are kept in the local journal and sent once the target takes \
             them",
            if paths.is_empty() {
                String::new()
            } else {
                format!(" (first paths: {paths})")
            }
        )
    })
}

/// Unmounts `mountpoint` with fusermount3 (`lazy`: detach even while busy).
pub fn unmount_path(mountpoint: &Path, lazy: bool) -> Result<()> {
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run fusermount3; install it with `sudo apt-get install fuse3`")?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("busy") {
        bail!(
            "{} is busy: a process is still using it (find it with `fuser -vm {}`); close it \
             and try again",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    bail!("cannot unmount {}: {stderr}", mountpoint.display())
}
