//! The mount itself, in the foreground: connect to the agent, mount, then serve until the
//! mount is unmounted (by `kmount unmount`, a signal, or `fusermount3 -u`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use kmount_mount::{Client, Connector, Flusher, MountHandle, MountOptions};

use crate::bwlimit::LimitedConnector;
use crate::connect;
use crate::control::{self, ControlRequest};
use crate::daemon::Ready;
use crate::options::MountFlags;
use crate::state::{MountRecord, StateDirs, mount_id};
use crate::target::Target;

/// What the main loop of a running mount reacts to.
enum Event {
    Signal(&'static str),
    Control(ControlRequest),
}

/// Mounts `target` (already checked) at `mountpoint` (canonical, empty) and serves it until it
/// is unmounted. Reports readiness or failure through `ready`.
pub fn run(target: &Target, mountpoint: &Path, flags: &MountFlags, mut ready: Ready) -> Result<()> {
    match mount_and_serve(target, mountpoint, flags, &mut ready) {
        Ok(()) => Ok(()),
        Err(e) => {
            ready.fail(&e);
            Err(e)
        }
    }
}

fn mount_and_serve(
    target: &Target,
    mountpoint: &Path,
    flags: &MountFlags,
    ready: &mut Ready,
) -> Result<()> {
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
    let connector: Arc<dyn Connector> = match flags.bwlimit {
        Some(rate) => Arc::new(LimitedConnector::new(plan.connector.clone(), rate)),
        None => plan.connector.clone(),
    };
    ready.progress(&format!("connecting to {}", connector.describe()));
    // Shared: a lost connection is made again through the same connector.
    let client = runtime
        .block_on(Client::connect_shared(connector.clone()))
        .with_context(|| format!("cannot start serving {}", target.display()))?;
    let peer = connector.describe();
    ready.progress(&format!("connected to {peer}; reading the tree"));
    let local_first = flags.write_back_enabled(matches!(target, Target::Kube(_) | Target::Ssh(_)));
    let (cache_dir, journal_dir) = if local_first {
        let state = session_dir(&dirs, &target.display(), mountpoint);
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
        reconcile_interval: flags
            .reconcile_interval
            .unwrap_or_else(|| MountOptions::default().reconcile_interval),
        cache_dir,
        journal_dir,
        rules: flags.rules.clone(),
        on_change: flags.on_change.clone(),
        remote_timeout: flags
            .remote_timeout
            .unwrap_or(kmount_mount::DEFAULT_REMOTE_TIMEOUT),
        progress: Some(ready.walk_progress()),
        ..MountOptions::default()
    };
    let handle = kmount_mount::mount(runtime.handle().clone(), client, mountpoint, &opts)
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
    if local_first && !handle.status().write_back {
        tracing::info!(
            "the agent keeps no journal: every change reaches it before the call returns"
        );
    }

    let (events_tx, events_rx) = mpsc::channel::<Event>();
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

    let record = MountRecord {
        target: target.display(),
        mountpoint: mountpoint.to_path_buf(),
        pid: std::process::id(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    dirs.write_record(&record)?;
    let files = handle.tree_counts().nodes;
    // Kubernetes: " (pod P, container C)"; ssh: " via kmount-agent on HOST (ssh)".
    let via = match target {
        Target::Local { .. } => String::new(),
        _ => peer
            .strip_prefix(&format!("the agent in {}", target.display()))
            .map_or_else(|| format!(" via {peer}"), str::to_string),
    };
    let line = format!(
        "kmount: mounted {}{via} at {}: {files} file{} in {:.2}s (pid {}; `kmount unmount {}` to stop)",
        target.display(),
        mountpoint.display(),
        if files == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64(),
        std::process::id(),
        mountpoint.display()
    );
    tracing::info!("{line}");
    ready.ok(&line);

    let daemon = Daemon {
        record,
        flags,
        journal: local_first
            .then(|| session_dir(&dirs, &target.display(), mountpoint).join("journal")),
    };
    let result = daemon.serve_until_unmounted(handle, &events_rx);
    dirs.remove_record(mountpoint);
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

/// What the main loop of a running mount answers from.
struct Daemon<'a> {
    record: MountRecord,
    flags: &'a MountFlags,
    /// The write-back journal, if local-first.
    journal: Option<PathBuf>,
}

impl Daemon<'_> {
    fn serve_until_unmounted(
        &self,
        handle: MountHandle,
        events_rx: &mpsc::Receiver<Event>,
    ) -> Result<()> {
        let mountpoint = self.record.mountpoint.as_path();
        let flusher = handle.flusher();
        let mut interrupts = 0;
        // Threads answering `wait` and `unmount`.
        let mut answering: Vec<std::thread::JoinHandle<()>> = Vec::new();
        loop {
            let event = match events_rx.recv_timeout(SESSION_POLL) {
                Ok(event) => event,
                Err(mpsc::RecvTimeoutError::Timeout) if handle.session_ended() => {
                    tracing::info!("{} was unmounted", mountpoint.display());
                    // The last hold on the mount's state: the journal and the cache close
                    // with it.
                    let joined = handle.join();
                    // An `unmount` is answered after the session ended: let that answer out
                    // before the process exits.
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while answering.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    return joined.context("the FUSE session ended with an error");
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("internal error: every event source of the mount is gone")
                }
            };
            match event {
                // Waiting for changes to land can take long: on a thread of its own, so
                // that `status` and `why` are answered meanwhile.
                Event::Control(req) if matches!(req.command.as_str(), "wait" | "unmount") => {
                    let flusher = flusher.clone();
                    let mountpoint = mountpoint.to_path_buf();
                    answering.retain(|t| !t.is_finished());
                    answering.push(std::thread::spawn(move || {
                        let flushed = flush(&flusher, UNMOUNT_FLUSH);
                        let result = if req.command == "unmount" {
                            flushed
                                .map_err(|e| e.context("not unmounted"))
                                .and_then(|()| unmount_path(&mountpoint, false))
                        } else {
                            flushed
                        };
                        req.answer(&answer_line(result.map(|()| String::new())));
                    }));
                }
                Event::Control(req) => {
                    let answer = self.answer(&req.command, &handle);
                    req.answer(&answer);
                }
                Event::Signal(name) => {
                    interrupts += 1;
                    // A second interrupt gives up waiting for busy users of the mount.
                    let lazy = interrupts > 1;
                    tracing::info!("{name}: unmounting {}", mountpoint.display());
                    if !lazy && let Err(e) = flush(&flusher, SIGNAL_FLUSH) {
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

    /// The answer line to a control command that is answered at once.
    fn answer(&self, command: &str, handle: &MountHandle) -> String {
        let (verb, arg) = command.split_once(' ').unwrap_or((command, ""));
        answer_line(match verb {
            "ping" => Ok(std::process::id().to_string()),
            "status" => {
                let s = crate::status::snapshot(&self.record, handle, self.flags);
                serde_json::to_string(&s).map_err(Into::into)
            }
            "pending" => {
                let p = handle.pending().unwrap_or_default();
                let u = crate::unmount::Unapplied {
                    records: p.records,
                    bytes: p.bytes,
                    paths: p.paths.iter().map(ToString::to_string).collect(),
                    journal: self.journal.clone(),
                };
                serde_json::to_string(&u).map_err(Into::into)
            }
            "confirm" => crate::confirm::answer(handle),
            "why" => serde_json::from_str::<crate::why::Question>(arg)
                .context("bad question")
                .and_then(|q| {
                    let a = crate::why::answer(&handle.rules(), &q);
                    serde_json::to_string(&a).map_err(Into::into)
                }),
            other => Err(anyhow::anyhow!(
                "unknown command '{other}' (is this kmount older than the one asking?)"
            )),
        })
    }
}

/// `ok [DATA]` or `error: MESSAGE`, on one line as the protocol wants.
fn answer_line(result: Result<String>) -> String {
    match result {
        Ok(s) if s.is_empty() => "ok".to_string(),
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("error: {}", format!("{e:#}").replace('\n', "; ")),
    }
}

/// How often the main loop looks whether the kernel has ended the session.
const SESSION_POLL: Duration = Duration::from_millis(100);

/// How long `kmount unmount` waits for changes to reach the target before giving up (the
/// mount then stays). Below the control request's own timeout.
const UNMOUNT_FLUSH: Duration = Duration::from_secs(100);
/// How long an interrupt waits for them before unmounting anyway.
const SIGNAL_FLUSH: Duration = Duration::from_secs(20);

/// The directory of this mount's journal and content cache: one per target and mountpoint,
/// kept across runs so that changes not yet sent when kmount stopped are sent by the next
/// mount of the same target at the same place (`<state>/mounts/<mountpoint id>-<target id>`).
fn session_dir(dirs: &StateDirs, target: &str, mountpoint: &Path) -> PathBuf {
    let base = dirs
        .logs
        .parent()
        .map_or_else(|| dirs.logs.clone(), Path::to_path_buf);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.bytes() {
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
    // In slices, so that a target gone for longer than the remote timeout ends the wait.
    let deadline = Instant::now() + timeout;
    let waited = loop {
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        let started = Instant::now();
        let Err(e) = flusher.wait_applied(slice) else {
            break Ok(());
        };
        let unreachable = flusher
            .unreachable_for()
            .filter(|(gone, limit)| gone >= limit);
        if let Some((gone, _)) = unreachable {
            let records = flusher.pending().map_or(0, |p| p.records);
            break Err(kmount_mount::FsError::new(
                e.errno,
                format!(
                    "{records} change(s) not applied: the target has been unreachable for {} s",
                    gone.as_secs()
                ),
            ));
        }
        // At the deadline, or an error of its own (not a slice that ran out).
        if Instant::now() >= deadline || started.elapsed() < slice / 2 {
            break Err(e);
        }
    };
    waited.map_err(|e| {
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
