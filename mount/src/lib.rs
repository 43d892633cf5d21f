//! kmount's FUSE filesystem: the [`Client`] that talks to the agent, a FUSE-free async
//! [`core::Core`], and a thin fuser adapter.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use kmount_mount::{Client, LocalConnector, MountOptions, mount};
//! let connector = LocalConnector::new("kmount-agent".into(), "/srv/dir".into(), vec![]);
//! let client = Client::connect(&connector).await?;
//! let runtime = tokio::runtime::Handle::current();
//! let mounted = tokio::task::spawn_blocking(move || {
//!     mount(runtime, client, "/mnt/x".as_ref(), &MountOptions::default())
//! })
//! .await??;
//! mounted.join()?;
//! # Ok(()) }
//! ```

mod abort;
pub mod client;
pub mod content;
pub mod core;
pub mod error;
pub mod fault;
mod fuse;
pub mod guard;
pub mod invalidate;
pub mod journal;
pub mod local;
pub mod local_only;
mod local_ops;
pub mod on_change;
pub mod owner;
pub mod reconcile;
pub mod remote;
pub mod sender;
pub mod tree;

pub use kmount_proto::rules;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use abort::unescape_mountinfo;
pub use client::{
    BoxedStream, CallError, Client, ClientError, ClientEvent, ConnectFuture, Connector,
    DEFAULT_REMOTE_TIMEOUT, LinkStatus, LocalConnector, StderrTail,
};
pub use error::FsError;
pub use fuser::Notifier;
pub use owner::OwnerMap;
pub use remote::{SyncStats, WalkProgress};

use fuser::{Config, MountOption, Session, SessionACL};
use kmount_proto::{RelPath, features};

use crate::core::Core;
use crate::fuse::FuseFs;
use crate::tree::{ROOT_ID, Tree};

/// Shortest attribute/entry TTL used; a TTL of zero makes the kernel ask for every stat.
pub const MIN_ATTR_TTL: Duration = Duration::from_millis(1);

/// Called with the progress of the walk that builds the tree at mount time.
#[derive(Clone)]
pub struct Progress(pub Arc<remote::ProgressFn>);

impl Progress {
    pub fn new(f: impl Fn(WalkProgress) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress(..)")
    }
}

impl PartialEq for Progress {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Progress {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Shown as the source in `/proc/mounts` (e.g. the target as the user typed it).
    pub fsname: String,
    /// Let other users use the mount (`allow_other`).
    pub allow_other: bool,
    /// The kernel checks permissions against the remote's modes and owners.
    pub default_permissions: bool,
    /// Requests run in the agent with the caller's uid/gid/groups (when the agent offers it).
    pub identity: bool,
    /// How long the kernel trusts attributes and names when changes are not pushed (an agent
    /// without a watcher); at least [`MIN_ATTR_TTL`].
    pub attr_ttl: Duration,
    /// The same when the agent walks and watches the tree: every change reaches the kernel as
    /// an invalidation, so this can be long.
    pub cached_ttl: Duration,
    /// Threads reading kernel requests (requests themselves run on the tokio runtime).
    pub threads: usize,
    /// Keep a complete local tree and answer names and attributes from it, when the agent
    /// offers the walk and the watcher. Off: every request goes to the agent.
    pub whole_tree: bool,
    /// How often the tree is compared with the remote (digests) to catch what the watcher
    /// missed. It is also compared after every reconnection.
    pub reconcile_interval: Duration,
    /// How long a request that needs the remote waits for a broken connection to come back
    /// (with a client made by [`Client::connect_shared`]) before failing with `EIO`.
    pub remote_timeout: Duration,
    /// When a removal the remote reports or a reconciliation finds is held instead of
    /// applied ([`guard`]): by default more than 100 entries and more than half the tree.
    pub mass_removal: guard::GuardConfig,
    /// Told how the walk that builds the tree progresses.
    pub progress: Option<Progress>,
    /// Where cached file contents are kept (per target; see [`target_dirs`]). With
    /// `journal_dir` and an agent that keeps a journal lane, changes are local-first:
    /// written to the journal and sent in the background.
    pub cache_dir: Option<PathBuf>,
    /// The durable write-back journal (per target).
    pub journal_dir: Option<PathBuf>,
    /// Bytes of file contents kept in the cache at most (files with unsent changes aside).
    pub cache_limit: u64,
    /// Files of the agent's user shown as the local user's (and chowns to the local user sent
    /// as the agent's user); see [`OwnerMap`].
    pub owner_map: Option<OwnerMap>,
    /// Which paths are hidden (`--exclude`) or kept on this side (`--local-only`, editor junk
    /// by default); see [`rules`]. `.kmountignore` at the root is read by the mount itself and
    /// must be left `None` here.
    pub rules: rules::RulesConfig,
    /// `--on-change`: a command run in the target (`sh -c`, in the root) after a batch of
    /// changes made through the mount has been applied there; debounced, never overlapping.
    pub on_change: Option<String>,
    /// Write-back flow control: once this many changes wait to be applied, new ones wait for
    /// the target to catch up, up to 10 s each.
    pub backlog_limit: u64,
}

/// The cache and journal directories for `target` (the target as the user names it): under
/// `$XDG_CACHE_HOME/kmount/<id>` and `$XDG_STATE_HOME/kmount/journal/<id>` (or `~/.cache`,
/// `~/.local/state`), `<id>` a hash of the target.
pub fn target_dirs(target: &str) -> (PathBuf, PathBuf) {
    let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(target.as_bytes()));
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let xdg = |var: &str, fallback: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| home.join(fallback))
    };
    (
        xdg("XDG_CACHE_HOME", ".cache").join("kmount").join(&id),
        xdg("XDG_STATE_HOME", ".local/state")
            .join("kmount")
            .join("journal")
            .join(&id),
    )
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fsname: "kmount".to_string(),
            allow_other: false,
            default_permissions: false,
            identity: false,
            attr_ttl: Duration::from_secs(1),
            cached_ttl: Duration::from_secs(3600),
            threads: 4,
            whole_tree: true,
            reconcile_interval: Duration::from_secs(30),
            remote_timeout: DEFAULT_REMOTE_TIMEOUT,
            mass_removal: guard::GuardConfig::default(),
            progress: None,
            cache_dir: None,
            journal_dir: None,
            cache_limit: 2 << 30,
            owner_map: None,
            rules: rules::RulesConfig::default(),
            on_change: None,
            backlog_limit: local::BACKLOG_LIMIT,
        }
    }
}

/// Why mounting failed; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "cannot make the private directory for local-only files (in the cache directory, \
         else $TMPDIR): {0}; check that it is writable"
    )]
    LocalOnly(std::io::Error),
    #[error("bad ignore rule: {0}")]
    Rules(#[from] rules::RulesError),
    #[error(
        "/dev/fuse is missing: install fuse3 (apt-get install fuse3) and check that /dev/fuse \
         exists (in a container: run it with --device /dev/fuse --cap-add SYS_ADMIN)"
    )]
    NoDevFuse,
    #[error(
        "fusermount3 was not found: install fuse3 (apt-get install fuse3); unprivileged users \
         need it to mount"
    )]
    NoFusermount,
    #[error("mountpoint {path}: {problem}")]
    Mountpoint { path: PathBuf, problem: String },
    #[error(
        "permission denied mounting on {path}: {detail}; mount on a directory you own, check \
         that you can open /dev/fuse, and for allow_other add 'user_allow_other' to \
         /etc/fuse.conf"
    )]
    PermissionDenied { path: PathBuf, detail: String },
    #[error("cannot read the served directory through the agent: {0}")]
    Root(FsError),
    #[error(
        "cannot read the tree of the served directory through the agent: {0}; check that the \
         agent can read every directory below it"
    )]
    Walk(FsError),
    #[error("cannot mount on {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the FUSE session thread: {0}")]
    Thread(#[source] io::Error),
    #[error("{0}")]
    Journal(#[from] journal::JournalError),
    #[error("{0}")]
    Cache(#[from] content::ContentError),
}

/// Changes made through the mount and not yet applied remotely.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pending {
    pub records: u64,
    /// Their size in the journal.
    pub bytes: u64,
    /// The paths they name, sorted.
    pub paths: Vec<RelPath>,
}

/// The state of a mount, for `kmount status`.
#[derive(Debug, Clone)]
pub struct Status {
    pub link: LinkStatus,
    /// Names and attributes answered from a complete local tree.
    pub whole_tree: bool,
    /// Changes are local-first (journal, content cache).
    pub write_back: bool,
    pub pending: Pending,
    /// The journal's applied and last seqs.
    pub applied_seq: u64,
    pub tail_seq: u64,
    pub sync: SyncStats,
    pub conflicts: Vec<local::Conflict>,
    /// The change the remote refuses (the sender retries it), if any.
    pub blocked: Option<local::RemoteError>,
    pub recent_errors: Vec<local::RemoteError>,
    pub cache_usage: u64,
    pub cache_limit: u64,
    pub cache_entries: usize,
    pub tree: tree::TreeCounts,
}

/// [`MountHandle::flush_and_unmount`] could not apply every change in time; the mount is
/// still there.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} change(s) ({} bytes) not yet applied remotely{}; first paths: {}",
    pending.records,
    pending.bytes,
    blocked.as_ref().map(|b| format!(" (the remote refuses one: {})", b.message)).unwrap_or_default(),
    pending.paths.iter().take(5).map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
)]
pub struct FlushError {
    pub pending: Pending,
    pub blocked: Option<local::RemoteError>,
    /// The mount, still mounted.
    pub handle: Box<MountHandle>,
}

/// Unmounts a live mount; cheap to clone and usable from any thread (e.g. a signal handler
/// task). Not fuser's own unmounter: that one forgets the mount after a first failure, so a
/// retry "succeeded" without unmounting and the session was then waited for forever.
#[derive(Debug, Clone)]
pub struct Unmounter {
    mountpoint: PathBuf,
}

impl Unmounter {
    /// Unmounts (not lazily); the session then ends. Fails with `EBUSY` while files are in
    /// use; a file closed just before may take a moment to leave the kernel (its release is
    /// asynchronous), so `EBUSY` is retried for up to 2 s. Not mounted is success.
    pub fn unmount(&self) -> io::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            match unmount_once(&self.mountpoint) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }
}

fn unmount_once(mountpoint: &Path) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        return match nix::mount::umount(mountpoint) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let fusermount = find_fusermount().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "fusermount3 is missing: install fuse3 (apt-get install fuse3)",
        )
    })?;
    let out = std::process::Command::new(fusermount)
        .arg("-u")
        .arg("--")
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("busy") {
        Err(io::Error::from_raw_os_error(libc::EBUSY))
    } else if stderr.contains("not found in") || stderr.contains("not mounted") {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 -u {}: {stderr}",
            mountpoint.display()
        )))
    }
}

/// A live mount. Dropping it unmounts (best effort).
#[derive(Debug)]
pub struct MountHandle {
    session: Option<JoinHandle<io::Result<()>>>,
    unmounter: Unmounter,
    notifier: Notifier,
    mountpoint: PathBuf,
    core: Arc<Core>,
    /// mount handle --commands--> remote task (whole-tree mounts only)
    commands_tx: Option<tokio::sync::mpsc::Sender<remote::RemoteCommand>>,
    /// Closed when every background task holding the core has ended.
    tasks_done: Option<std::sync::mpsc::Receiver<()>>,
    /// The kernel's number for this FUSE connection (fusectl), to abort a session that does
    /// not end after an unmount.
    conn: Option<u32>,
    /// The `--on-change` runner's live status, when a command is set.
    on_change: Option<on_change::SharedStatus>,
    /// FUSE requests received, by kind.
    fuse_requests: Arc<fuse::RequestCounts>,
}

/// How long a session may take to end after its unmount before its connection is aborted.
const SESSION_END_GRACE: Duration = Duration::from_secs(10);

impl MountHandle {
    /// Unmounts and waits for the session to end. When files stay in use (`EBUSY` for 2 s),
    /// the error is returned and, the handle being gone, the mount is detached and its
    /// connection aborted as when it is dropped.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmounter.unmount()?;
        self.join_session(Some(SESSION_END_GRACE))
    }

    /// Waits until the filesystem is unmounted (by [`Unmounter::unmount`] or externally).
    pub fn join(mut self) -> io::Result<()> {
        self.join_session(None)
    }

    /// Waits for the FUSE session to end: without `bound`, for as long as it takes (the
    /// mount is in use until someone unmounts it); with one, the session was just unmounted
    /// and should end at once: when it does not (the unmount only detached it, the kernel
    /// still has requests or open files), its connection is aborted so that nothing waits
    /// on it forever.
    fn join_session(&mut self, bound: Option<Duration>) -> io::Result<()> {
        let result = match self.session.take() {
            None => Ok(()),
            Some(thread) => {
                let ended = match bound {
                    None => true,
                    Some(limit) => finished_within(&thread, limit) || self.abort_session(&thread),
                };
                if ended {
                    thread
                        .join()
                        .map_err(|_| io::Error::other("the FUSE session thread panicked"))?
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the FUSE session of {} did not end after its unmount, even after \
                             aborting its connection",
                            self.mountpoint.display()
                        ),
                    ))
                }
            }
        };
        self.core.shutdown();
        if let Some(done) = self.tasks_done.take() {
            // Background tasks let go of the core (and with it the journal and cache locks).
            let _ = done.recv_timeout(Duration::from_secs(10));
        }
        result
    }

    /// Aborts the connection of a session that outlived its unmount; whether it ended then.
    fn abort_session(&self, thread: &JoinHandle<io::Result<()>>) -> bool {
        tracing::warn!(
            "the FUSE session of {} did not end {SESSION_END_GRACE:?} after its unmount; \
             aborting its connection",
            self.mountpoint.display()
        );
        match self.conn {
            Some(conn) => {
                if let Err(e) = abort::abort_connection(conn) {
                    tracing::warn!("{e}");
                }
            }
            None => tracing::warn!("the FUSE connection number of this mount is unknown"),
        }
        // Whatever is left of the mount goes too.
        let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        finished_within(thread, Duration::from_secs(5))
    }

    /// A handle that unmounts this mount from anywhere.
    pub fn unmounter(&self) -> Unmounter {
        self.unmounter.clone()
    }

    /// Sends cache invalidations to the kernel. Call it from a thread of its own, never from
    /// inside a request and never while holding a lock a request needs.
    pub fn notifier(&self) -> Notifier {
        self.notifier.clone()
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Nodes the kernel currently holds (the root included).
    pub fn known_nodes(&self) -> usize {
        self.core.tree().kernel_len()
    }

    /// Whether names and attributes are answered from a complete local tree.
    pub fn whole_tree(&self) -> bool {
        self.core.whole_tree()
    }

    /// Nodes and bytes the local tree holds.
    pub fn tree_counts(&self) -> tree::TreeCounts {
        self.core.tree().lock().counts()
    }

    /// Counters of the remote side (events applied, rescans, reconciliations).
    pub fn sync_stats(&self) -> SyncStats {
        self.core.sync_stats(|s| s.clone())
    }

    /// The ignore rules in force (flags, defaults and the root's `.kmountignore`).
    pub fn rules(&self) -> Arc<rules::Rules> {
        self.core.client().rules()
    }

    /// The `--on-change` command's runs and failures.
    pub fn on_change_status(&self) -> on_change::Status {
        self.on_change
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    /// The state of the connection to the agent.
    pub fn link(&self) -> LinkStatus {
        self.core.client().status()
    }

    /// Compares the tree with the remote now and repairs what differs (changes already
    /// received are applied first). Blocking; waits at most `timeout`, and returns once the
    /// kernel has been told what changed (a read after it sees the repair).
    pub fn reconcile_now(&self, timeout: Duration) -> Result<reconcile::Outcome, FsError> {
        let Some(tx) = &self.commands_tx else {
            return Err(err!(
                libc::ENOTSUP,
                "this mount has no local tree to reconcile (the agent cannot walk and watch)"
            ));
        };
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        tx.try_send(remote::RemoteCommand::Reconcile(reply_tx))
            .map_err(|_| err!(libc::EBUSY, "a reconciliation is already waiting"))?;
        let outcome = reply_rx.recv_timeout(timeout).map_err(|_| {
            err!(
                libc::ETIMEDOUT,
                "the reconciliation took longer than {timeout:?}"
            )
        })?;
        // What it repaired is in the view once the kernel has dropped what it cached.
        self.core.invalidator().drain(timeout);
        outcome
    }

    /// The mass removal held by the guard ([`guard`]), if any.
    pub fn held_removal(&self) -> Option<guard::Held> {
        self.core.sync_stats(|s| s.guard.held().cloned())
    }

    /// Confirms the held mass removal: the next reconciliation (started now) applies what
    /// the remote lacks. Returns what it confirms; an error when nothing is held.
    pub fn confirm_removal(&self) -> Result<guard::Held, FsError> {
        let held = self.core.sync_stats(|s| s.guard.confirm()).ok_or_else(|| {
            err!(
                libc::ENOENT,
                "no removal is paused on this mount (`kmount status` shows one when it is)"
            )
        })?;
        tracing::info!("confirmed: {}", held.describe());
        if let Some(tx) = &self.commands_tx {
            // A full queue means a reconciliation is due anyway; it applies the removal.
            let _ = tx.try_send(remote::RemoteCommand::Confirmed);
        }
        Ok(held)
    }

    /// Changes not yet applied remotely (`None`: not a write-back mount).
    pub fn pending(&self) -> Option<Pending> {
        let wb = self.core.write_back()?;
        let (records, bytes) = wb.journal.pending().unwrap_or((0, 0));
        Some(Pending {
            records,
            bytes,
            paths: wb.journal.pending_paths(),
        })
    }

    /// Waits until every change made so far is applied remotely, at most `timeout`. The
    /// error says why not (the remote refuses a change, the agent is unreachable, time ran
    /// out).
    pub fn wait_applied(&self, timeout: Duration) -> Result<(), FsError> {
        self.flusher().wait_applied(timeout)
    }

    /// A handle that waits for this mount's changes from any thread (e.g. while another
    /// thread waits in [`MountHandle::join`]).
    pub fn flusher(&self) -> Flusher {
        Flusher {
            core: self.core.clone(),
        }
    }

    /// Waits until every change is applied remotely (at most `timeout`), then unmounts.
    /// When time runs out, the mount stays and the error says what is not applied.
    pub fn flush_and_unmount(self, timeout: Duration) -> Result<(), Box<FlushError>> {
        if let Err(e) = self.wait_applied(timeout) {
            tracing::warn!("not unmounting: {e}");
            let pending = self.pending().unwrap_or_default();
            let blocked = self.core.write_back().and_then(|wb| wb.blocked());
            return Err(Box::new(FlushError {
                pending,
                blocked,
                handle: Box::new(self),
            }));
        }
        self.unmount()
            .map_err(|e| {
                tracing::warn!("cannot unmount: {e}");
                e
            })
            .ok();
        Ok(())
    }

    /// A snapshot of the mount's state.
    pub fn status(&self) -> Status {
        let wb = self.core.write_back();
        let (applied_seq, tail_seq) =
            wb.map_or((0, 0), |w| (w.journal.applied(), w.journal.tail()));
        Status {
            link: self.link(),
            whole_tree: self.whole_tree(),
            write_back: wb.is_some(),
            pending: self.pending().unwrap_or_default(),
            applied_seq,
            tail_seq,
            sync: self.sync_stats(),
            conflicts: {
                let mut all = self.core.conflicts();
                all.extend(wb.map(|w| w.conflicts()).unwrap_or_default());
                all
            },
            blocked: wb.and_then(|w| w.blocked()),
            recent_errors: wb.map(|w| w.recent_errors()).unwrap_or_default(),
            cache_usage: wb.map_or(0, |w| w.cache.usage()),
            cache_limit: wb.map_or(0, |w| w.cache.limit()),
            cache_entries: wb.map_or(0, |w| w.cache.len()),
            tree: self.tree_counts(),
        }
    }

    /// FUSE requests received so far, by kind (`"lookup"`, `"getxattr"`, ...), the kinds
    /// never received left out: what reached kmount instead of being answered by the kernel.
    pub fn fuse_requests(&self) -> Vec<(&'static str, u64)> {
        self.fuse_requests.snapshot()
    }

    /// Requests sent to the agent so far, by kind (`"ReadPath"`, `"Journaled"`, ...).
    pub fn requests_sent(&self, kind: &str) -> u64 {
        self.core.client().requests_sent(kind)
    }

    /// Invalidations handed to the kernel so far.
    pub fn invalidations_sent(&self) -> u64 {
        self.core
            .invalidator()
            .stats()
            .sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the FUSE session has ended (the filesystem was unmounted, by anyone):
    /// [`MountHandle::join`] then returns at once. Lets the owner keep the handle (for
    /// [`MountHandle::status`]) instead of parking a thread in `join`.
    pub fn session_ended(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.is_finished())
    }
}

/// Waits for a mount's changes to reach the remote; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct Flusher {
    core: Arc<Core>,
}

impl Flusher {
    /// How long the remote has been unreachable (`None`: connected), measured against the
    /// remote timeout: a wait for changes to land need not outlast it.
    pub fn unreachable_for(&self) -> Option<(Duration, Duration)> {
        match self.core.client().status() {
            LinkStatus::Connected { .. } => None,
            LinkStatus::Reconnecting { since, .. } => {
                Some((since.elapsed(), self.core.remote_timeout()))
            }
            LinkStatus::Closed { .. } => {
                Some((self.core.remote_timeout(), self.core.remote_timeout()))
            }
        }
    }

    /// See [`MountHandle::wait_applied`].
    pub fn wait_applied(&self, timeout: Duration) -> Result<(), FsError> {
        let Some(wb) = self.core.write_back() else {
            return Ok(());
        };
        wb.journal.commit()?;
        let tail = wb.journal.tail();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if wb.journal.applied() >= tail {
                // What landing changed (inode numbers of new files) reaches the kernel too.
                self.core.invalidator().drain(Duration::from_secs(1));
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                let (records, _) = wb.journal.pending().unwrap_or((0, 0));
                return Err(match wb.blocked() {
                    Some(b) => FsError::new(
                        b.errno,
                        format!(
                            "{records} change(s) not applied: the remote refuses one{}: {}",
                            b.path.map(|p| format!(" to {p}")).unwrap_or_default(),
                            b.message
                        ),
                    ),
                    None => err!(
                        libc::ETIMEDOUT,
                        "{records} change(s) not applied within {timeout:?}"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Changes not yet applied remotely (`None`: not a write-back mount).
    pub fn pending(&self) -> Option<Pending> {
        let wb = self.core.write_back()?;
        let (records, bytes) = wb.journal.pending().unwrap_or((0, 0));
        Some(Pending {
            records,
            bytes,
            paths: wb.journal.pending_paths(),
        })
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.session.is_none() {
            return;
        }
        if let Err(e) = self.unmounter.unmount() {
            // Nobody is left to serve it: detached, and its connection aborted below.
            tracing::warn!(
                "cannot unmount {}: {e}; detaching it",
                self.mountpoint.display()
            );
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Err(e) = self.join_session(Some(SESSION_END_GRACE)) {
            tracing::warn!("{e}");
        }
    }
}

/// Mounts the directory `client` serves at `mountpoint`; returns once the kernel handshake is
/// done. Blocking: call it outside async code (e.g. in `spawn_blocking`). Requests run on
/// `runtime`.
pub fn mount(
    runtime: tokio::runtime::Handle,
    client: Client,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<MountHandle, MountError> {
    check_mountpoint(mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoDevFuse);
    }
    if !nix::unistd::geteuid().is_root() && find_fusermount().is_none() {
        return Err(MountError::NoFusermount);
    }

    client.set_remote_timeout(opts.remote_timeout);
    client.set_rules(&opts.rules).map_err(MountError::Rules)?;
    let root = {
        let c = client.clone();
        block_on(&runtime, async move { Core::root_attr(&c).await }).map_err(MountError::Root)?
    };
    if !root.is_dir() {
        return Err(MountError::Root(err!(
            libc::ENOTDIR,
            "the served path is not a directory"
        )));
    }
    if opts.identity && client.features() & features::IDENTITY == 0 {
        tracing::warn!(
            "the agent ({}) does not run requests as their callers; everything runs as the \
             agent's user",
            client.peer().software
        );
    }
    let wanted = features::TREE | features::WATCH;
    let whole_tree = opts.whole_tree && client.features() & wanted == wanted;
    let mut tree = Tree::new(&root);
    let mut events_rx = None;
    if whole_tree {
        tree.lock().set_complete(ROOT_ID, true);
        // Taken before the watcher starts, so that changes made during the walk are applied
        // after it.
        events_rx = client.take_events();
        let shared = Arc::new(tree);
        let (c, t, progress) = (client.clone(), shared.clone(), opts.progress.clone());
        block_on(&runtime, async move {
            remote::enable_watch(&c).await?;
            let p = progress.as_ref().map(|p| &*p.0);
            remote::walk(&c, &t, &RelPath::root(), 0, false, p, None).await
        })
        .map_err(MountError::Walk)?;
        tree = Arc::try_unwrap(shared)
            .map_err(|_| MountError::Walk(err!(libc::EIO, "the walk did not end cleanly")))?;
    }
    let (inval, inval_queue) = invalidate::channel();
    let mut recovered = None;
    let write_back = match (&opts.cache_dir, &opts.journal_dir) {
        (Some(cache_dir), Some(journal_dir))
            if whole_tree && client.features() & features::JOURNAL != 0 =>
        {
            let (journal, recovery) = journal::Journal::open(journal_dir)?;
            let cache = content::ContentCache::open(cache_dir, opts.cache_limit)?;
            if recovery.records > 0 {
                tracing::info!(
                    "the journal holds {} change(s) of an earlier run; sending them",
                    recovery.records
                );
                recovered = Some(recovery);
            }
            Some(local::WriteBack::new(journal, cache).with_backlog_limit(opts.backlog_limit))
        }
        (Some(_), Some(_)) => {
            tracing::info!(
                "the agent ({}) keeps no journal; changes go to it directly",
                client.peer().software
            );
            None
        }
        _ => None,
    };
    let mut core = Core::new(
        client,
        tree,
        opts.identity,
        whole_tree,
        inval,
        write_back,
        opts.remote_timeout,
    );
    if whole_tree {
        let store =
            local_only::LocalOnly::new(opts.cache_dir.as_deref()).map_err(MountError::LocalOnly)?;
        core.set_local_only(store);
    }
    core.sync_stats(|s| s.guard = guard::Guard::new(opts.mass_removal));
    let core = core.into_arc();
    let (tasks_tx, tasks_done) = std::sync::mpsc::channel::<()>();
    let mut commands_tx = None;
    if let Some(events_rx) = events_rx {
        let (tx, commands_rx) = tokio::sync::mpsc::channel(4);
        commands_tx = Some(tx);
        let (core, done) = (core.clone(), tasks_tx.clone());
        let reconcile_interval = opts.reconcile_interval;
        runtime.spawn(async move {
            let shutdown = core.shutdown_signal();
            let settings = remote::RemoteSettings { reconcile_interval };
            remote::run(core, events_rx, commands_rx, shutdown, settings).await;
            drop(done);
        });
    }
    if core.write_back().is_some() {
        let (c, done) = (core.clone(), tasks_tx.clone());
        runtime.spawn(async move {
            let shutdown = c.shutdown_signal();
            sender::run(c, shutdown).await;
            drop(done);
        });
        let (c, done) = (core.clone(), tasks_tx.clone());
        runtime.spawn(async move {
            // Now and then the cache is made good across a reboot (closing it does not).
            let mut shutdown = c.shutdown_signal();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(content::SYNC_EVERY) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
                let Some(cache) = c.write_back().map(|wb| wb.cache.clone()) else {
                    break;
                };
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cache.sync()).await {
                    tracing::warn!("content cache: {e}");
                }
            }
            drop(done);
        });
        if let (Some(recovery), Some(commands)) = (recovered, commands_tx.clone()) {
            // What an earlier run changed is in the tree once it has landed remotely.
            let (c, done) = (core.clone(), tasks_tx.clone());
            runtime.spawn(async move {
                let mut shutdown = c.shutdown_signal();
                let landed = async {
                    match c.write_back() {
                        Some(wb) => wb.journal.wait_applied(recovery.tail).await.is_ok(),
                        None => false,
                    }
                };
                let landed = tokio::select! {
                    l = landed => l,
                    _ = shutdown.wait_for(|s| *s) => false,
                };
                if landed {
                    let dirs: Vec<RelPath> = recovery
                        .pending_paths
                        .iter()
                        .map(|p| p.split_last().map_or(RelPath::root(), |(d, _)| d))
                        .collect();
                    let _ = commands.send(remote::RemoteCommand::Rescan(dirs)).await;
                }
                drop(done);
            });
        }
    }
    let on_change = opts
        .on_change
        .as_ref()
        .map(|command| on_change::spawn(&runtime, core.clone(), command.clone(), tasks_tx.clone()));
    drop(tasks_tx);
    let ttl = if whole_tree {
        opts.cached_ttl
    } else {
        opts.attr_ttl
    };
    let owner_map = opts.owner_map.filter(|m| !m.is_identity());
    if let Some(m) = &owner_map {
        tracing::info!(
            "files of the remote user {}:{} appear owned by {}:{}",
            m.remote_uid,
            m.remote_gid,
            m.local_uid,
            m.local_gid
        );
    }
    // The agent's user, known from the owner map even when it maps nothing.
    let agent_user = opts
        .owner_map
        .map(|m| (m.remote_uid, m.remote_gid, core.client().agent_groups()));
    let fuse_requests = Arc::new(fuse::RequestCounts::default());
    let fs = FuseFs::new(
        core.clone(),
        runtime,
        ttl.max(MIN_ATTR_TTL),
        owner_map,
        agent_user,
        whole_tree,
        fuse_requests.clone(),
    );

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("kmount".to_string()),
    ];
    if opts.default_permissions {
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;

    // Before the mount: resolving the mountpoint afterwards would ask the mount itself.
    let absolute = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let session = Session::new(fs, mountpoint, &config).map_err(|e| mount_error(mountpoint, e))?;
    let conn = abort::connection_of(&absolute);
    if let Some(minor) = conn {
        raise_readahead(minor);
    }
    let unmounter = Unmounter {
        mountpoint: absolute.clone(),
    };
    let notifier = session.notifier();
    // The notifier thread ends when the core (and its invalidator) is gone.
    inval_queue
        .start(notifier.clone())
        .map_err(MountError::Thread)?;
    let thread = std::thread::Builder::new()
        .name("kmount-fuse".to_string())
        .spawn(move || session.run())
        .map_err(MountError::Thread)?;
    tracing::debug!(whole_tree, "mounted at {}", mountpoint.display());
    Ok(MountHandle {
        session: Some(thread),
        unmounter,
        notifier,
        mountpoint: mountpoint.to_path_buf(),
        core,
        commands_tx,
        tasks_done: Some(tasks_done),
        conn,
        on_change,
        fuse_requests,
    })
}

/// Whether `thread` ends within `limit`.
fn finished_within<T>(thread: &JoinHandle<T>, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !thread.is_finished() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Runs `fut` on `runtime` and waits for it from this (non-async) thread.
fn block_on<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = Result<T, FsError>> + Send + 'static,
) -> Result<T, FsError> {
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| err!(libc::EIO, "the runtime is shutting down"))?
}

fn check_mountpoint(mountpoint: &Path) -> Result<(), MountError> {
    let problem = match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => "it is not a directory".to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            "it does not exist; create it first (mkdir -p)".to_string()
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            "a dead mount is still there; unmount it first (fusermount3 -u)".to_string()
        }
        Err(e) => e.to_string(),
    };
    Err(MountError::Mountpoint {
        path: mountpoint.to_path_buf(),
        problem,
    })
}

fn find_fusermount() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/bin"), PathBuf::from("/sbin")])
        .flat_map(|dir| [dir.join("fusermount3"), dir.join("fusermount")])
        .find(|p| p.is_file())
}

fn mount_error(mountpoint: &Path, e: io::Error) -> MountError {
    let path = mountpoint.to_path_buf();
    if e.kind() == io::ErrorKind::PermissionDenied {
        return MountError::PermissionDenied {
            path,
            detail: e.to_string().trim().to_string(),
        };
    }
    if e.kind() == io::ErrorKind::NotFound {
        if !Path::new("/dev/fuse").exists() {
            return MountError::NoDevFuse;
        }
        if find_fusermount().is_none() {
            return MountError::NoFusermount;
        }
    }
    MountError::Mount { path, source: e }
}

/// The kernel gives a FUSE mount 128 KiB of read-ahead whatever the filesystem asks for in
/// INIT; over a link with a round trip, a sequential read then waits one round trip per
/// 128 KiB. Its backing device's `read_ahead_kb` raises it (root only; without it the default
/// stays, nothing else changes).
fn raise_readahead(minor: u32) {
    let path = format!("/sys/class/bdi/0:{minor}/read_ahead_kb");
    let kb = (fuse::MAX_READAHEAD_WANTED / 1024).to_string();
    match std::fs::write(&path, kb) {
        Ok(()) => tracing::debug!(
            "read-ahead raised to {} KiB ({path})",
            fuse::MAX_READAHEAD_WANTED / 1024
        ),
        Err(e) => tracing::debug!("read-ahead stays at the kernel's default ({path}: {e})"),
    }
}
