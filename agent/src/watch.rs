//! The watcher (`Op::Watch`): reports changes under the root as `FromAgent::Events`.
//!
//! Raw inotify rather than the `notify` crate, because the agent needs what notify's recursive
//! inotify mode does not give: watches added through confined descriptors (notify walks with
//! `follow_links(true)` and would follow a symlink out of the root), a new directory watched
//! *before* its contents are listed and reported (notify adds the watch after handing out the
//! event and reports nothing already inside), per-directory knowledge of which directories
//! could not be watched when the watch limit is reached (notify aborts the walk or drops the
//! error), and watched paths kept right across directory renames.
//!
//! Invariants:
//! - One thread owns the inotify descriptor and every table here. Every directory it watches
//!   is opened beneath the root without following symlinks, and the watch is added on that
//!   very directory (`fchdir` to it in this thread's private working directory, then
//!   `inotify_add_watch(".")`), so nothing outside the root is ever watched.
//! - A new directory is watched first and listed second, so anything created in it is either
//!   seen by the listing or reported by the watch (often both; duplicates merge).
//! - Changes are coalesced for [`COALESCE`] after the first one into one batch. A batch holds
//!   structural items (renames, removals of names moved out, rescans) in the order they
//!   happened, and "touched" paths; when it is sent, each touched path is `lstat`ed and
//!   reported with its state at that moment (`Upsert`, or `Remove` when it is gone). Touched
//!   paths follow later renames in the same batch, and structural items come first, so applying
//!   a message in order yields the state at send time.
//! - A rename is `Rename` when both halves are seen; a name moved out of the root is `Remove`,
//!   a name moved in is `Upsert` (and a directory moved in is watched and listed).
//! - Echoes of the agent's own operations are dropped ([`crate::echo`]); paths an operation is
//!   still working on are held back until it finished.
//! - Paths the ignore rules hide ([`crate::hide`]) are never reported, and hidden directories
//!   are neither watched nor listed. A rename from a hidden name to a visible one is reported
//!   as the new name's `Upsert` (a directory's contents are listed and reported too), a rename
//!   from a visible name to a hidden one as the old name's `Remove`.
//! - Queue overflow: `Rescan` of the root, and every directory is watched again. Watch limit:
//!   one clear message on stderr, `Rescan` of the unwatched directory, which is then compared
//!   against a snapshot every [`POLL_EVERY`] (and watched again once the limit allows).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kmount_proto::{Event, RelPath, WireError};

use crate::confine::Root;
use crate::echo::{Echo, NodeState, Seen, look};
use crate::handles::DirStream;
use crate::hide::{Hide, View};
use crate::sys::{self, Errno, SysResult, cvt};
use crate::walk::visible_entry;

/// The agent's `FromAgent::Events` writer: `false` once nobody listens any more.
pub type Sink = Arc<dyn Fn(Vec<Event>) -> bool + Send + Sync>;

/// How long changes are gathered after the first one before they are sent.
pub const COALESCE: Duration = Duration::from_millis(5);
/// How often directories that could not be watched are compared with their snapshot.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// A batch this big is sent at once.
const MAX_PENDING: usize = 8192;
/// Longest time a batch waits for the agent's own rename to finish.
const MAX_HOLD: Duration = Duration::from_millis(200);
/// Rough encoded size of one `Events` message at most (a frame is 32 MiB).
const MESSAGE_BYTES: usize = 4 << 20;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW
    | libc::IN_EXCL_UNLINK;

/// Test switch: when set (to anything but `0` or empty), `Op::Watch` succeeds without
/// watching anything. Only for tests of reconciliation; never set it in real use.
pub const NO_WATCH_ENV: &str = "KMOUNT_AGENT_NO_WATCH";

fn blind() -> bool {
    std::env::var_os(NO_WATCH_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The watch-limit message is printed once per process.
static LIMIT_REPORTED: AtomicBool = AtomicBool::new(false);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts and stops the watcher thread of one session.
#[derive(Default)]
pub struct Watch {
    running: Mutex<Option<Running>>,
    sink: Mutex<Option<Sink>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("running", &lock(&self.running).is_some())
            .finish()
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    thread: JoinHandle<()>,
}

impl Watch {
    /// Where events go; `None` detaches (the watcher stops at its next batch).
    pub fn set_sink(&self, sink: Option<Sink>) {
        *lock(&self.sink) = sink;
    }

    /// Starts watching (a no-op when already on). Returns once every directory is watched.
    ///
    /// Test switch: with [`NO_WATCH_ENV`] set (to anything but `0`), this answers as if the
    /// watcher were on but starts none, so nothing is ever reported and only the mount's
    /// periodic reconciliation can notice changes (tests/tests/watch.rs uses it).
    pub fn enable(
        &self,
        root: &Arc<Root>,
        echo: &Arc<Echo>,
        hide: &Arc<Hide>,
    ) -> Result<(), WireError> {
        let mut running = lock(&self.running);
        if running.is_some() {
            return Ok(());
        }
        if blind() {
            eprintln!(
                "kmount-agent: {NO_WATCH_ENV} is set: the watcher is off (a test switch); \
                 changes made here reach the mount only through reconciliation"
            );
            return Ok(());
        }
        let sink = lock(&self.sink)
            .clone()
            .ok_or_else(|| WireError::new(libc::EINVAL, "no event stream to report to"))?;
        // SAFETY: plain syscall; the descriptor is ours.
        let wake = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
            .map_err(|e| WireError::new(e.0, format!("cannot start the watcher: {e}")))?;
        let wake = Arc::new(sys::owned_fd(wake));
        let stop = Arc::new(AtomicBool::new(false));
        echo.set_enabled(true);
        let (ready_tx, ready_rx) = sync_channel(1);
        let thread = {
            let (root, echo, wake, stop) = (root.clone(), echo.clone(), wake.clone(), stop.clone());
            let hide = hide.clone();
            thread::Builder::new()
                .name("watcher".into())
                .spawn(
                    move || match Watcher::start(root, echo, hide, sink, wake, stop) {
                        Ok(mut w) => {
                            let _ = ready_tx.send(Ok(()));
                            w.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    },
                )
                .map_err(|e| {
                    WireError::new(libc::EAGAIN, format!("cannot start the watcher: {e}"))
                })?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {
                *running = Some(Running { stop, wake, thread });
                Ok(())
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                echo.set_enabled(false);
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                echo.set_enabled(false);
                Err(WireError::new(libc::EIO, "the watcher failed to start"))
            }
        }
    }

    /// Stops watching and waits for the thread.
    pub fn disable(&self, echo: &Echo) {
        let running = lock(&self.running).take();
        if let Some(r) = running {
            r.stop.store(true, Ordering::SeqCst);
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(r.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
            let _ = r.thread.join();
        }
        echo.set_enabled(false);
    }

    /// Stops watching and lets go of the event stream (end of session).
    pub fn shutdown(&self, echo: &Echo) {
        self.disable(echo);
        self.set_sink(None);
    }

    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// Sends `events` to the mount (when anybody listens).
    pub fn report(&self, events: Vec<Event>) {
        if let Some(sink) = lock(&self.sink).clone() {
            sink(events);
        }
    }
}

/// A path touched in the current batch.
#[derive(Debug, Clone, Copy)]
struct Touch {
    order: u64,
    /// The first thing seen of this path in the batch was its creation: the mount cannot know
    /// it, so it need not hear of it if it is gone again.
    new: bool,
}

#[derive(Debug)]
enum Item {
    /// `from` left its name; `to` once the other half is seen.
    Move {
        from: RelPath,
        to: Option<RelPath>,
        /// Watches of the directories that moved with it.
        wds: Vec<i32>,
        /// `from` was created in this batch.
        from_new: bool,
        /// The node moved is a directory.
        is_dir: bool,
    },
    Rescan {
        path: RelPath,
        reason: String,
    },
    /// Two names swapped their nodes (`RENAME_EXCHANGE`).
    Exchange {
        a: RelPath,
        b: RelPath,
    },
    /// Nothing (the first half of an exchange).
    Skip,
}

#[derive(Debug, Default)]
struct Batch {
    items: Vec<Item>,
    /// inotify cookie -> index of its half-seen `Item::Move`.
    moves: HashMap<u32, usize>,
    touches: HashMap<RelPath, Touch>,
    next_order: u64,
    /// When the oldest unsent change arrived.
    since: Option<Instant>,
    /// When the batch started waiting for the agent's own rename.
    held_since: Option<Instant>,
    /// Whether each name seen in this batch's events was a directory (what the rules decide
    /// for a name that is gone by the time the batch is sent can depend on it).
    kinds: HashMap<RelPath, bool>,
}

impl Batch {
    fn len(&self) -> usize {
        self.items.len() + self.touches.len()
    }

    fn touch(&mut self, path: RelPath, created: bool, now: Instant) {
        self.since.get_or_insert(now);
        let order = self.next_order;
        self.touches.entry(path).or_insert_with(|| Touch {
            order,
            new: created,
        });
        self.next_order += 1;
    }

    fn rescan(&mut self, path: RelPath, reason: impl Into<String>, now: Instant) {
        self.since.get_or_insert(now);
        self.items.push(Item::Rescan {
            path,
            reason: reason.into(),
        });
    }

    /// Touched paths at or below `from` move to `to`.
    fn rename_touches(&mut self, from: &RelPath, to: &RelPath) {
        let moved: Vec<RelPath> = self
            .touches
            .keys()
            .filter(|p| under(p, from))
            .cloned()
            .collect();
        for old in moved {
            let Some(mut t) = self.touches.remove(&old) else {
                continue;
            };
            let Some(new) = rebase(&old, from, to) else {
                continue;
            };
            if old == *from {
                // Whatever stood at `to` before may be known to the mount.
                t.new = self.touches.get(&new).is_some_and(|e| e.new);
            }
            self.touches
                .entry(new)
                .and_modify(|e| e.order = e.order.min(t.order))
                .or_insert(t);
        }
    }
}

/// `p` is `base` or below it.
fn under(p: &RelPath, base: &RelPath) -> bool {
    let (p, b) = (p.as_bytes(), base.as_bytes());
    b.is_empty() || p == b || (p.len() > b.len() && p.starts_with(b) && p[b.len()] == b'/')
}

/// `p` (at or below `from`) with `from` replaced by `to`.
fn rebase(p: &RelPath, from: &RelPath, to: &RelPath) -> Option<RelPath> {
    let suffix = &p.as_bytes()[from.as_bytes().len()..];
    let mut v = to.as_bytes().to_vec();
    if to.is_root() {
        v.extend_from_slice(suffix.strip_prefix(b"/").unwrap_or(suffix));
    } else {
        v.extend_from_slice(suffix);
    }
    RelPath::new(v).ok()
}

/// The state of every node below a directory, by path relative to it.
type Snapshot = HashMap<Vec<u8>, (NodeState, Option<Vec<u8>>)>;

/// A directory that could not be watched, compared against its snapshot instead.
#[derive(Debug)]
struct Polled {
    root: RelPath,
    snapshot: Snapshot,
}

fn snapshot(root: &Root, top: &RelPath, hide: &View) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![top.clone()];
    let skip = if top.is_root() {
        0
    } else {
        top.as_bytes().len() + 1
    };
    while let Some(dir) = stack.pop() {
        let Ok(fd) = root.open_beneath(&dir, libc::O_RDONLY | libc::O_DIRECTORY, 0) else {
            continue;
        };
        let Ok(mut stream) = DirStream::new(fd) else {
            continue;
        };
        while let Ok(Some(raw)) = stream.next_entry() {
            let Some(e) = visible_entry(stream.fd(), &dir, &raw, hide) else {
                continue;
            };
            if e.attr.is_dir() {
                stack.push(e.path.clone());
            }
            out.insert(
                e.path.as_bytes()[skip..].to_vec(),
                (NodeState::of(&e.attr), e.symlink),
            );
        }
    }
    out
}

fn limit_message() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let global = read("/proc/sys/fs/inotify/max_user_watches");
    let here = read("/proc/sys/user/max_inotify_watches");
    let shown = global.map_or("unknown".to_string(), |n| n.to_string());
    let ns = match (global, here) {
        (Some(g), Some(h)) if h < g => format!(" (this user namespace allows {h})"),
        _ => String::new(),
    };
    format!(
        "kmount-agent: the inotify watch limit is reached (fs.inotify.max_user_watches = \
         {shown}){ns}; directories beyond it are compared every {} s instead of watched, so \
         their changes show up later. Raise the limit on the host, as root: \
         sysctl fs.inotify.max_user_watches=524288",
        POLL_EVERY.as_secs()
    )
}

fn instance_message(e: Errno) -> String {
    let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    match e.0 {
        libc::EMFILE => format!(
            "cannot start the watcher: too many inotify instances for this user \
             (fs.inotify.max_user_instances = {limit}); raise it on the host, as root: \
             sysctl fs.inotify.max_user_instances=1024"
        ),
        _ => format!("cannot start the watcher: inotify_init1: {e}"),
    }
}

/// One `struct inotify_event` with its name.
struct RawEvent {
    wd: i32,
    mask: u32,
    cookie: u32,
    name: Vec<u8>,
}

fn parse(buf: &[u8], out: &mut Vec<RawEvent>) {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let mut at = 0;
    while at + HEADER <= buf.len() {
        let field = |o: usize| {
            u32::from_ne_bytes(
                buf[at + o..at + o + 4]
                    .try_into()
                    .expect("four bytes within the header"),
            )
        };
        let (wd, mask, cookie, len) = (field(0) as i32, field(4), field(8), field(12) as usize);
        let end = (at + HEADER + len).min(buf.len());
        let raw = &buf[at + HEADER..end];
        let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        out.push(RawEvent {
            wd,
            mask,
            cookie,
            name: name.to_vec(),
        });
        at = end;
    }
}

/// The watcher thread's state.
pub struct Watcher {
    root: Arc<Root>,
    echo: Arc<Echo>,
    hide: Arc<Hide>,
    sink: Sink,
    inotify: OwnedFd,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    /// Watch descriptor -> the watched directory's path now.
    dirs: HashMap<i32, RelPath>,
    batch: Batch,
    polled: Vec<Polled>,
    next_poll: Option<Instant>,
    buf: Vec<u8>,
}

impl Watcher {
    /// Creates the inotify instance and watches the whole root. Must run on the thread that
    /// will own the watcher (it gets a working directory of its own).
    pub fn start(
        root: Arc<Root>,
        echo: Arc<Echo>,
        hide: Arc<Hide>,
        sink: Sink,
        wake: Arc<OwnedFd>,
        stop: Arc<AtomicBool>,
    ) -> Result<Watcher, WireError> {
        // A working directory of this thread's own for fchdir: if the kernel refuses, the
        // process-wide one moves, which nothing else in the agent uses (it works by descriptor).
        // SAFETY: affects only this thread's filesystem context.
        unsafe { libc::unshare(libc::CLONE_FS) };
        // SAFETY: plain syscall; the descriptor is ours.
        let fd = cvt(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })
            .map_err(|e| WireError::new(e.0, instance_message(e)))?;
        let mut w = Watcher {
            root,
            echo,
            hide,
            sink,
            // SAFETY: fd was just returned to us.
            inotify: unsafe { OwnedFd::from_raw_fd(fd) },
            wake,
            stop,
            dirs: HashMap::new(),
            batch: Batch::default(),
            polled: Vec::new(),
            next_poll: None,
            buf: vec![0u8; 64 << 10],
        };
        w.watch_tree(RelPath::root(), false, Instant::now());
        if !w.dirs.values().any(RelPath::is_root) {
            return Err(WireError::new(
                libc::EIO,
                "cannot start the watcher: the served directory cannot be watched",
            ));
        }
        Ok(w)
    }

    fn run(&mut self) {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let timeout = self
                .deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            self.wait(timeout);
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if !self.step(Instant::now()) {
                return; // nobody listens any more
            }
        }
    }

    /// When the next batch is due or the next poll runs.
    fn deadline(&self) -> Option<Instant> {
        let batch = self.batch.since.map(|s| match self.batch.held_since {
            Some(_) => Instant::now() + Duration::from_millis(1),
            None => s + COALESCE,
        });
        match (batch, self.next_poll) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Waits for inotify, the stop signal, or the timeout.
    fn wait(&self, timeout: Option<Duration>) {
        let mut fds = [
            libc::pollfd {
                fd: self.inotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs() as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: fds and the timespec outlive the call; no signal mask change.
        unsafe { libc::ppoll(fds.as_mut_ptr(), 2, tsp, std::ptr::null()) };
    }

    /// Reads what is there, polls when due, sends a batch when due. `false`: stop.
    pub(crate) fn step(&mut self, now: Instant) -> bool {
        self.read_events(now);
        if self.next_poll.is_some_and(|p| now >= p) {
            self.poll_unwatched(now);
            self.next_poll = (!self.polled.is_empty()).then(|| now + POLL_EVERY);
        }
        let due = self.batch.since.is_some_and(|s| now >= s + COALESCE);
        if due || self.batch.len() >= MAX_PENDING {
            return self.flush(now);
        }
        true
    }

    /// Reads and handles every event queued now.
    fn read_events(&mut self, now: Instant) {
        let mut buf = std::mem::take(&mut self.buf);
        let mut events = Vec::new();
        loop {
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::read(self.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break; // EAGAIN: drained
            }
            parse(&buf[..n as usize], &mut events);
            for e in events.drain(..) {
                self.event(e, now);
            }
        }
        self.buf = buf;
    }

    fn event(&mut self, e: RawEvent, now: Instant) {
        if e.mask & libc::IN_Q_OVERFLOW != 0 {
            self.overflowed(now);
            return;
        }
        let Some(dir) = self.dirs.get(&e.wd).cloned() else {
            return;
        };
        if e.mask & libc::IN_IGNORED != 0 {
            self.dirs.remove(&e.wd);
            return;
        }
        if e.name.is_empty() {
            if dir.is_root() && e.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                self.batch.rescan(
                    RelPath::root(),
                    "the served directory itself was removed or moved",
                    now,
                );
            } else if e.mask & libc::IN_ATTRIB != 0 {
                self.batch.touch(dir, false, now);
            }
            return;
        }
        let Ok(path) = dir.join(&e.name) else {
            return;
        };
        let is_dir = e.mask & libc::IN_ISDIR != 0;
        self.batch.kinds.insert(path.clone(), is_dir);
        if e.mask & libc::IN_MOVED_FROM != 0 {
            let wds = if is_dir {
                self.dirs
                    .iter()
                    .filter(|(_, p)| under(p, &path))
                    .map(|(w, _)| *w)
                    .collect()
            } else {
                Vec::new()
            };
            let from_new = self.batch.touches.get(&path).is_some_and(|t| t.new);
            self.batch.moves.insert(e.cookie, self.batch.items.len());
            self.batch.items.push(Item::Move {
                from: path,
                to: None,
                wds,
                from_new,
                is_dir,
            });
            self.batch.touch(dir, false, now);
        } else if e.mask & libc::IN_MOVED_TO != 0 {
            match self.batch.moves.remove(&e.cookie) {
                Some(i) if self.exchanged(i, &path) => {
                    let Item::Move { from, .. } = &self.batch.items[i] else {
                        unreachable!("moves only index Item::Move")
                    };
                    let other = from.clone();
                    // RENAME_EXCHANGE: the two names swapped nodes. Replaying two renames would
                    // lose one, so both names are reported with their new state instead, and a
                    // directory among them is walked again (its watches get their right names
                    // back by being added again).
                    self.batch.items[i - 1] = Item::Skip;
                    self.batch.items[i] = Item::Exchange {
                        a: path.clone(),
                        b: other.clone(),
                    };
                    for p in [path, other] {
                        self.batch.touch(p.clone(), false, now);
                        if self.is_dir_now(&p) {
                            self.watch_tree(p, false, now);
                        }
                    }
                    self.batch.touch(dir, false, now);
                }
                Some(i) => {
                    let Item::Move { from, to, .. } = &mut self.batch.items[i] else {
                        unreachable!("moves only index Item::Move")
                    };
                    *to = Some(path.clone());
                    let from = from.clone();
                    self.batch.rename_touches(&from, &path);
                    self.batch.touch(path.clone(), false, now);
                    self.batch.touch(dir, false, now);
                    if is_dir {
                        self.renamed_dir(&from, &path);
                        if self.hide.hidden(&path, true) {
                            // Moved out of sight: nothing below it is reported any more.
                            self.unwatch_under(&path);
                        } else if !self.dirs.values().any(|p| *p == path) {
                            // Created and renamed before its creation event was handled, or
                            // moved out of a hidden name: it was not watched, so it is watched
                            // and listed now.
                            self.watch_tree(path, true, now);
                        }
                    }
                }
                None => {
                    self.batch.touch(path.clone(), true, now);
                    self.batch.touch(dir, false, now);
                    if is_dir {
                        self.watch_tree(path, true, now);
                    }
                }
            }
        } else if e.mask & libc::IN_CREATE != 0 {
            self.batch.touch(path.clone(), true, now);
            self.batch.touch(dir, false, now);
            if is_dir {
                self.watch_tree(path, true, now);
            }
        } else if e.mask & libc::IN_DELETE != 0 {
            self.batch.touch(path, false, now);
            self.batch.touch(dir, false, now);
        } else if e.mask & (libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_CLOSE_WRITE) != 0 {
            self.batch.touch(path, false, now);
        }
    }

    /// Whether the move at `i` (from `path`'s partner to `path`) is the second half of a
    /// `RENAME_EXCHANGE`: the item just before it moved `path` to where this one came from.
    fn exchanged(&self, i: usize, path: &RelPath) -> bool {
        let Item::Move {
            from: this_from, ..
        } = &self.batch.items[i]
        else {
            return false;
        };
        i > 0
            && matches!(&self.batch.items[i - 1], Item::Move { from, to: Some(to), .. }
                if from == path && to == this_from)
    }

    fn is_dir_now(&self, path: &RelPath) -> bool {
        matches!(look(&self.root, path), Some(Seen::Present(a)) if a.is_dir())
    }

    /// Watched directories and polled snapshots below `from` now live below `to`.
    fn renamed_dir(&mut self, from: &RelPath, to: &RelPath) {
        for p in self.dirs.values_mut() {
            if under(p, from)
                && let Some(n) = rebase(p, from, to)
            {
                *p = n;
            }
        }
        for p in &mut self.polled {
            if under(&p.root, from)
                && let Some(n) = rebase(&p.root, from, to)
            {
                p.root = n;
            }
        }
    }

    /// Stops watching `top` and every directory below it.
    fn unwatch_under(&mut self, top: &RelPath) {
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, p)| under(p, top))
            .map(|(w, _)| *w)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // SAFETY: plain syscall on our inotify descriptor.
            unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
        }
        self.polled.retain(|p| !under(&p.root, top));
    }

    /// `fchdir` to the open directory and watch it.
    fn add_watch(&self, dir: RawFd) -> SysResult<i32> {
        // SAFETY: dir is an open directory; the working directory is this thread's own.
        cvt(unsafe { libc::fchdir(dir) })?;
        // SAFETY: "." is NUL-terminated.
        cvt(unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), c".".as_ptr(), MASK) })
    }

    fn is_polled(&self, dir: &RelPath) -> bool {
        self.polled.iter().any(|p| under(dir, &p.root))
    }

    /// Watches `top` and every directory below it, each before it is listed. With `report`,
    /// everything found is touched as new.
    /// Directories the ignore rules hide are left alone.
    fn watch_tree(&mut self, top: RelPath, report: bool, now: Instant) {
        let hide = self.hide.view();
        let mut stack = vec![top];
        while let Some(dir) = stack.pop() {
            if self.is_polled(&dir) || hide.hidden(&dir, true) {
                continue;
            }
            let Ok(fd) = self
                .root
                .open_beneath(&dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            else {
                continue; // gone already, or unreadable: nothing inside can be seen
            };
            match self.add_watch(fd.as_raw_fd()) {
                Ok(wd) => {
                    self.dirs.insert(wd, dir.clone());
                }
                Err(Errno(libc::ENOSPC)) => {
                    self.unwatched(dir, now);
                    continue;
                }
                Err(_) => continue,
            }
            let Ok(mut stream) = DirStream::new(fd) else {
                continue;
            };
            while let Ok(Some(raw)) = stream.next_entry() {
                let Ok(path) = dir.join(&raw.name) else {
                    continue;
                };
                let is_dir = match raw.kind {
                    libc::DT_DIR => true,
                    libc::DT_UNKNOWN => sys::cstring(&raw.name)
                        .and_then(|c| sys::fstatat(stream.fd(), &c, libc::AT_SYMLINK_NOFOLLOW))
                        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR),
                    _ => false,
                };
                if hide.hidden(&path, is_dir) {
                    continue;
                }
                if report {
                    self.batch.touch(path.clone(), true, now);
                }
                if is_dir {
                    stack.push(path);
                }
            }
        }
    }

    /// The watch limit struck at `dir`: poll it instead and have the mount walk it again.
    fn unwatched(&mut self, dir: RelPath, now: Instant) {
        if !LIMIT_REPORTED.swap(true, Ordering::Relaxed) {
            eprintln!("{}", limit_message());
        }
        let snapshot = snapshot(&self.root, &dir, &self.hide.view());
        self.polled.push(Polled {
            root: dir.clone(),
            snapshot,
        });
        self.batch.rescan(
            dir,
            format!(
                "inotify watch limit reached; compared every {} s instead of watched",
                POLL_EVERY.as_secs()
            ),
            now,
        );
        self.next_poll.get_or_insert(now + POLL_EVERY);
    }

    /// Compares every polled directory with its snapshot; watches it again when possible.
    fn poll_unwatched(&mut self, now: Instant) {
        for mut p in std::mem::take(&mut self.polled) {
            let Ok(fd) = self
                .root
                .open_beneath(&p.root, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            else {
                // Gone: what it held is gone too (its own name is its parent's business).
                self.diff(&p.root, &p.snapshot, &Snapshot::new(), now);
                continue;
            };
            let watched = match self.add_watch(fd.as_raw_fd()) {
                Ok(wd) => {
                    self.dirs.insert(wd, p.root.clone());
                    true
                }
                Err(_) => false,
            };
            drop(fd);
            if watched {
                // Everything below is watched first and compared second, so nothing falls
                // between the two; directories the limit still refuses are polled anew.
                self.watch_tree(p.root.clone(), false, now);
            }
            let current = snapshot(&self.root, &p.root, &self.hide.view());
            self.diff(&p.root, &p.snapshot, &current, now);
            if !watched {
                p.snapshot = current;
                self.polled.push(p);
            }
        }
    }

    /// Touches every path whose state differs between two snapshots of `top`, parents first.
    fn diff(&mut self, top: &RelPath, old: &Snapshot, new: &Snapshot, now: Instant) {
        let mut changed: Vec<&Vec<u8>> = new
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(v))
            .map(|(k, _)| k)
            .chain(old.keys().filter(|k| !new.contains_key(*k)))
            .collect();
        changed.sort_unstable();
        for k in changed {
            let mut v = top.as_bytes().to_vec();
            if !v.is_empty() {
                v.push(b'/');
            }
            v.extend_from_slice(k);
            if let Ok(p) = RelPath::new(v) {
                self.batch.touch(p, false, now);
            }
        }
    }

    /// Events were lost: the mount must walk everything again, and every directory is watched
    /// again (directories created meanwhile were never watched).
    fn overflowed(&mut self, now: Instant) {
        self.batch.rescan(
            RelPath::root(),
            "the inotify event queue overflowed (fs.inotify.max_queued_events); changes were lost",
            now,
        );
        let old: HashSet<i32> = self.dirs.keys().copied().collect();
        self.dirs.clear();
        self.polled.clear();
        self.watch_tree(RelPath::root(), false, now);
        for wd in old {
            if !self.dirs.contains_key(&wd) {
                // SAFETY: plain syscall on our inotify descriptor.
                unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
            }
        }
    }

    /// Sends the batch (or holds it a little while the agent's own rename finishes).
    fn flush(&mut self, now: Instant) -> bool {
        // The other half of a rename is queued right behind the first.
        self.read_events(now);
        let echo = self.echo.clone();
        let held = self.batch.items.iter().any(|it| match it {
            Item::Move { from, to, .. } => {
                echo.busy_path(from) || to.as_ref().is_some_and(|t| echo.busy_path(t))
            }
            Item::Exchange { a, b } => echo.busy_path(a) || echo.busy_path(b),
            Item::Rescan { .. } | Item::Skip => false,
        });
        if held {
            let since = *self.batch.held_since.get_or_insert(now);
            if now < since + MAX_HOLD {
                return true;
            }
        }
        let mut batch = std::mem::take(&mut self.batch);
        let hide = self.hide.view();
        let mut events = Vec::new();
        let mut again: Vec<RelPath> = Vec::new();
        for item in batch.items {
            match item {
                Item::Move {
                    from,
                    to: Some(to),
                    from_new,
                    is_dir,
                    ..
                } if hide.hidden(&from, is_dir) || hide.hidden(&to, is_dir) => {
                    // Across the rules' boundary (or hidden on both ends): out of sight is
                    // gone, into sight is new (`to` is touched, and a directory's contents
                    // were listed when it was watched). Both names are reported as they are.
                    let from_new = from_new && !echo.made_by_us(&from);
                    if !hide.hidden(&from, is_dir) && !from_new && !echo.removed_by_us(&from) {
                        again.push(from);
                    }
                }
                Item::Move {
                    from,
                    to: Some(to),
                    from_new,
                    ..
                } => {
                    // Made within the batch, unknown to the mount: unless it was made through
                    // the mount (a link made there and renamed in the container at once).
                    let from_new = from_new && !echo.made_by_us(&from);
                    if !from_new && !echo.removed_by_us(&from) {
                        if matches!(look(&self.root, &from), Some(Seen::Present(_))) {
                            // `from` names another file by now (git makes `config.lock`
                            // again right after renaming it over `config`): a rename would
                            // move that file in the mount. Both names are reported as they
                            // are instead, and a moved directory is walked again.
                            if matches!(look(&self.root, &to), Some(Seen::Present(a)) if a.is_dir())
                            {
                                events.push(Event::Rescan {
                                    path: to.clone(),
                                    reason: "a directory moved while its old name was reused"
                                        .into(),
                                });
                            }
                            again.push(from);
                            again.push(to);
                        } else {
                            events.push(Event::Rename { from, to });
                        }
                    }
                }
                Item::Move {
                    from,
                    to: None,
                    wds,
                    is_dir,
                    ..
                } => {
                    // Its watches (if it left the root) report from outside now: forget them. A
                    // directory still inside is watched again when its new name is listed.
                    for wd in wds {
                        if self.dirs.remove(&wd).is_some() {
                            // SAFETY: plain syscall on our inotify descriptor.
                            unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
                        }
                    }
                    self.polled.retain(|p| !under(&p.root, &from));
                    // Moved out of the root, or into a directory not watched yet (its listing
                    // reports the new name). The agent's own rename needs no word.
                    if matches!(look(&self.root, &from), Some(Seen::Present(_))) {
                        again.push(from); // made again since: report what is there now
                    } else if !echo.removed_by_us(&from) && !hide.hidden(&from, is_dir) {
                        events.push(Event::Remove { path: from });
                    }
                }
                Item::Rescan { path, .. } if hide.hidden(&path, true) => {}
                Item::Rescan { path, reason } => events.push(Event::Rescan { path, reason }),
                Item::Exchange { a, b } => {
                    // Both names are touched too; a directory's contents moved as a whole.
                    for path in [a, b] {
                        let seen = look(&self.root, &path);
                        let dir = matches!(&seen, Some(Seen::Present(at)) if at.is_dir());
                        if dir
                            && !hide.hidden(&path, true)
                            && !seen.is_some_and(|s| echo.is_echo(&path, &s))
                        {
                            events.push(Event::Rescan {
                                path,
                                reason: "swapped with another name (rename exchange)".into(),
                            });
                        }
                    }
                }
                Item::Skip => {}
            }
        }
        for path in again {
            let order = batch.next_order;
            batch.next_order += 1;
            batch
                .touches
                .entry(path)
                .or_insert(Touch { order, new: false });
        }
        let mut touches: Vec<(RelPath, Touch)> = batch.touches.into_iter().collect();
        touches.sort_unstable_by_key(|(_, t)| t.order);
        for (path, t) in touches {
            if echo.busy(&path, None) {
                self.carry(path, t, now);
                continue;
            }
            let finished = echo.finished();
            let Some(seen) = look(&self.root, &path) else {
                continue; // cannot be seen: nothing to report
            };
            let hidden = match &seen {
                Seen::Present(attr) => hide.hidden(&path, attr.is_dir()),
                Seen::Absent => hide.hidden_kind(&path, batch.kinds.get(&path).copied()),
            };
            if hidden {
                continue;
            }
            if echo.busy(&path, Some(&seen)) {
                self.carry(path, t, now);
                continue;
            }
            if echo.is_echo(&path, &seen) {
                continue;
            }
            if echo.finished() != finished {
                // An own operation (a write by handle, busy on the node only) may have ended
                // between the look and the checks: what was seen may be a state it passed
                // through. Looked at again in the next batch.
                self.carry(path, t, now);
                continue;
            }
            match seen {
                // Made and removed again within the batch: unknown to the mount, unless the
                // name was made through it (a link made through the mount and removed in the
                // container at once stayed in the mount's view).
                Seen::Absent if t.new && !echo.made_by_us(&path) => {}
                Seen::Absent => events.push(Event::Remove { path }),
                Seen::Present(attr) => {
                    let symlink = if attr.file_type() == libc::S_IFLNK {
                        let target = self
                            .root
                            .locate(&path)
                            .and_then(|loc| sys::readlinkat(loc.dirfd(), loc.name()));
                        match target {
                            Ok(t) => Some(t),
                            Err(_) => continue, // changed again: its next event reports it
                        }
                    } else {
                        None
                    };
                    events.push(Event::Upsert {
                        path,
                        attr,
                        symlink,
                    });
                }
            }
        }
        self.send(events)
    }

    /// Keeps a touched path for the next batch (an own operation is still working on it).
    fn carry(&mut self, path: RelPath, t: Touch, now: Instant) {
        self.batch.since.get_or_insert(now);
        self.batch.next_order = self.batch.next_order.max(t.order + 1);
        self.batch.touches.insert(path, t);
    }

    fn send(&self, events: Vec<Event>) -> bool {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        for e in events {
            let size = 160
                + match &e {
                    Event::Upsert { path, symlink, .. } => {
                        path.as_bytes().len() + symlink.as_ref().map_or(0, Vec::len)
                    }
                    Event::Remove { path } => path.as_bytes().len(),
                    Event::Rename { from, to } => from.as_bytes().len() + to.as_bytes().len(),
                    Event::Rescan { path, reason } => path.as_bytes().len() + reason.len(),
                };
            if !chunk.is_empty() && bytes + size > MESSAGE_BYTES {
                if !(self.sink)(std::mem::take(&mut chunk)) {
                    return false;
                }
                bytes = 0;
            }
            bytes += size;
            chunk.push(e);
        }
        chunk.is_empty() || (self.sink)(chunk)
    }

    /// How many directories are watched.
    #[cfg(test)]
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }
}
