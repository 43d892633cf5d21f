//! Echo suppression: changes the agent makes on behalf of the mount must not come back to it as
//! watcher events, while a change by anyone else to the same node still does.
//!
//! After a mutating operation succeeds, the state of every node it touched is recorded: for a
//! node that exists, its `lstat` state (inode, type and mode, owner, size, mtime and ctime to
//! the nanosecond: any later change by anyone moves ctime) keyed by (dev, ino), so it holds
//! whatever name the node has now; for a name the operation removed, "absent" keyed by path.
//! When the watcher reports a path, it `lstat`s it: a state equal to a record (or an absence
//! recorded for that path) is the agent's own doing and is dropped; anything else is reported.
//!
//! Invariants:
//! - While an operation runs, the paths and the node it works on are marked busy; the watcher
//!   holds back events for busy paths and nodes until the operation has recorded its result
//!   (recording and unmarking happen under one lock), so an event can never be judged before
//!   the record that explains it exists.
//! - Records expire [`TTL`] after the last operation on them; expired records match nothing.
//! - Nothing is recorded while the watcher is off.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kmount_proto::{Attr, NodeRef, Op, RelPath, Timespec};

use crate::confine::Root;
use crate::handles::Handle;
use crate::ops::{Agent, attr};
use crate::sys::{self, Errno};

/// How long a record lives after the last own operation on it.
pub const TTL: Duration = Duration::from_secs(2);

/// (dev, ino)
pub type NodeKey = (u64, u64);

/// What the watcher sees at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Absent,
    Present(Attr),
}

/// The parts of a node's state that any change moves (atime and block counts left out:
/// reads and delayed allocation change them without an event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    mode: u32,
    nlink: u64,
    uid: u32,
    gid: u32,
    rdev: u64,
    size: u64,
    mtime: Timespec,
    ctime: Timespec,
}

impl NodeState {
    pub fn of(a: &Attr) -> NodeState {
        NodeState {
            mode: a.mode,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            size: a.size,
            mtime: a.mtime,
            ctime: a.ctime,
        }
    }
}

pub fn key(a: &Attr) -> NodeKey {
    (a.dev, a.ino)
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<NodeKey, (NodeState, Instant)>,
    absent: HashMap<RelPath, Instant>,
    /// Names own operations made (whatever is there now).
    made: HashMap<RelPath, Instant>,
    busy_paths: HashMap<RelPath, u32>,
    busy_nodes: HashMap<NodeKey, u32>,
    last_sweep: Option<Instant>,
    /// Operations finished so far (see [`Echo::finished`]).
    finished: u64,
}

impl State {
    fn sweep(&mut self, now: Instant) {
        if self.last_sweep.is_some_and(|t| now < t + TTL) {
            return;
        }
        self.last_sweep = Some(now);
        self.nodes.retain(|_, (_, until)| *until > now);
        self.absent.retain(|_, until| *until > now);
        self.made.retain(|_, until| *until > now);
    }

    fn record(&mut self, path: &RelPath, seen: &Seen, now: Instant) {
        match seen {
            Seen::Absent => {
                self.absent.insert(path.clone(), now + TTL);
            }
            Seen::Present(a) => {
                self.nodes.insert(key(a), (NodeState::of(a), now + TTL));
                // The name exists again: an older "absent" no longer describes it.
                self.absent.remove(path);
            }
        }
    }
}

fn unmark<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, k: &K) {
    if let Some(n) = map.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            map.remove(k);
        }
    }
}

#[derive(Debug, Default)]
pub struct Echo {
    enabled: AtomicBool,
    state: Mutex<State>,
}

/// One running operation's claim on its paths and node; [`Echo::finish`] records and releases.
#[derive(Debug)]
pub struct Pending {
    paths: Vec<RelPath>,
    /// Names the operation removes. Only their absence is the operation's doing: a node found
    /// there when the result is recorded was made by someone else in between (a file removed
    /// through the mount and made again in the container at once went unreported).
    removed: Vec<RelPath>,
    /// Names the operation makes: likewise, an absence found there is someone else's removal
    /// (a hard link made through the mount and removed in the container at once stayed).
    made: Vec<RelPath>,
    node: Option<PendingNode>,
    /// Nodes losing one of several names (their link count and ctime change), pinned by an
    /// `O_PATH` descriptor so their state can be read once the name is gone.
    pinned: Vec<OwnedFd>,
}

#[derive(Debug)]
struct PendingNode {
    key: NodeKey,
    /// The handle, to `fstat` after the operation.
    handle: Option<Arc<Handle>>,
    /// For a close: the state before (closing changes nothing but emits `IN_CLOSE_WRITE`).
    before: Option<Attr>,
}

/// `lstat` of a path beneath the root, as the watcher sees it. `None` when it cannot tell
/// (permission denied on the way, I/O error).
pub fn look(root: &Root, path: &RelPath) -> Option<Seen> {
    let r = root
        .locate(path)
        .and_then(|loc| sys::fstatat(loc.dirfd(), loc.name(), libc::AT_SYMLINK_NOFOLLOW));
    match r {
        Ok(st) => Some(Seen::Present(attr(&st))),
        Err(Errno(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)) => Some(Seen::Absent),
        Err(_) => None,
    }
}

/// An `O_PATH` descriptor of the non-directory at `path` when it has other names too.
fn pin_linked(root: &Root, path: &RelPath) -> Option<OwnedFd> {
    let loc = root.locate(path).ok()?;
    let st = sys::fstatat(loc.dirfd(), loc.name(), libc::AT_SYMLINK_NOFOLLOW).ok()?;
    if st.st_nlink < 2 || st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        return None;
    }
    sys::openat(
        loc.dirfd(),
        loc.name(),
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )
    .ok()
}

fn parent(p: &RelPath) -> Option<RelPath> {
    p.split_last().map(|(parent, _)| parent)
}

impl Echo {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every update is a single map operation: consistent after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
        if !on {
            let mut s = self.state();
            s.nodes.clear();
            s.absent.clear();
            s.made.clear();
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Marks what `op` is about to change as busy. `None` when nothing needs recording.
    pub fn begin(&self, a: &Agent, op: &Op) -> Option<Pending> {
        if !self.enabled() {
            return None;
        }
        let mut paths: Vec<RelPath> = Vec::new();
        let mut handle = None;
        let mut close = false;
        let with_parent = |paths: &mut Vec<RelPath>, p: &RelPath| {
            paths.push(p.clone());
            paths.extend(parent(p));
        };
        match op {
            Op::SetAttr { node, .. } | Op::SetXattr { node, .. } | Op::RemoveXattr { node, .. } => {
                match node {
                    NodeRef::Path(p) => paths.push(p.clone()),
                    NodeRef::Handle(h) => handle = Some(*h),
                }
            }
            Op::Open { path, flags } if flags & libc::O_TRUNC != 0 => paths.push(path.clone()),
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::PutFile { path, .. } => with_parent(&mut paths, path),
            Op::Link { from, to } => {
                paths.push(from.clone());
                with_parent(&mut paths, to);
            }
            Op::Rename { from, to, .. } => {
                with_parent(&mut paths, from);
                with_parent(&mut paths, to);
            }
            Op::WritePath { path, .. } | Op::FallocatePath { path, .. } => paths.push(path.clone()),
            Op::Write { handle: h, .. } | Op::Fallocate { handle: h, .. } => handle = Some(*h),
            Op::Close { handle: h } => {
                handle = Some(*h);
                close = true;
            }
            _ => return None,
        }
        paths.sort_unstable();
        paths.dedup();
        let losing = match op {
            Op::Unlink { path } => Some(path),
            Op::Rename { to, flags, .. } if flags & libc::RENAME_EXCHANGE == 0 => Some(to),
            _ => None,
        };
        let pinned: Vec<OwnedFd> = losing
            .and_then(|p| pin_linked(&a.root, p))
            .into_iter()
            .collect();
        let removed = match op {
            Op::Unlink { path } | Op::Rmdir { path } => vec![path.clone()],
            Op::Rename { from, flags, .. } if flags & libc::RENAME_EXCHANGE == 0 => {
                vec![from.clone()]
            }
            _ => Vec::new(),
        };
        let made = match op {
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. }
            | Op::PutFile { path, .. }
            | Op::Link { to: path, .. } => vec![path.clone()],
            Op::Rename { from, to, flags } if flags & libc::RENAME_EXCHANGE != 0 => {
                vec![from.clone(), to.clone()]
            }
            Op::Rename { to, .. } => vec![to.clone()],
            _ => Vec::new(),
        };
        let node = handle.and_then(|h| {
            let h = a.handles.get(h).ok()?;
            let st = sys::fstat(h.fd()).ok()?;
            let at = attr(&st);
            Some(if close {
                PendingNode {
                    key: key(&at),
                    handle: None, // a close must be the last user of its handle
                    before: Some(at),
                }
            } else {
                PendingNode {
                    key: key(&at),
                    handle: Some(h),
                    before: None,
                }
            })
        });
        let mut pending = self.mark(paths, node, pinned);
        pending.removed = removed;
        pending.made = made;
        Some(pending)
    }

    /// Marks extra paths busy (an operation's temporary files).
    pub fn begin_paths(&self, paths: Vec<RelPath>) -> Option<Pending> {
        self.enabled().then(|| self.mark(paths, None, Vec::new()))
    }

    fn mark(
        &self,
        paths: Vec<RelPath>,
        node: Option<PendingNode>,
        pinned: Vec<OwnedFd>,
    ) -> Pending {
        let mut s = self.state();
        for p in &paths {
            *s.busy_paths.entry(p.clone()).or_default() += 1;
        }
        if let Some(n) = &node {
            *s.busy_nodes.entry(n.key).or_default() += 1;
        }
        Pending {
            paths,
            removed: Vec::new(),
            made: Vec::new(),
            node,
            pinned,
        }
    }

    /// Records the state the operation left (when it succeeded) and releases its claim.
    pub fn finish(&self, root: &Root, pending: Pending, ok: bool) {
        self.finish_told(root, pending, ok, None);
    }

    /// [`Echo::finish`] for an operation that told the mount the state it left its node in
    /// (`told`: the attributes in its answer, read right after the change). That state is
    /// recorded for the node rather than the one found when recording: a change someone else
    /// made in between (a file written through the mount and rewritten in the container at
    /// once) is theirs, and must be reported, since the mount only knows `told`.
    pub fn finish_told(&self, root: &Root, pending: Pending, ok: bool, told: Option<&Attr>) {
        let mut seen: Vec<(RelPath, Seen)> = Vec::new();
        let mut node_seen: Option<Attr> = None;
        // A close changes nothing itself: it only vouches for a state an own operation left.
        let mut close_seen: Option<Attr> = None;
        let mut pinned_seen: Vec<Attr> = Vec::new();
        if ok {
            for fd in &pending.pinned {
                if let Ok(st) = sys::fstat(fd.as_raw_fd()) {
                    pinned_seen.push(attr(&st));
                }
            }
            for p in &pending.paths {
                match look(root, p) {
                    // A removed name found present was made again by someone else (or a
                    // rename between two links of one node left both names); a made name
                    // found absent was removed by someone else: neither is ours to record.
                    Some(Seen::Present(_)) if pending.removed.contains(p) => {}
                    Some(Seen::Absent) if pending.made.contains(p) => {}
                    Some(Seen::Present(now)) if told.is_some_and(|t| key(t) == key(&now)) => {
                        seen.push((p.clone(), Seen::Present(told.cloned().unwrap_or(now))));
                    }
                    Some(s) => seen.push((p.clone(), s)),
                    None => {}
                }
            }
            if let Some(n) = &pending.node {
                match (&n.before, &n.handle) {
                    (Some(before), _) => close_seen = Some(before.clone()),
                    (None, Some(h)) => node_seen = sys::fstat(h.fd()).ok().map(|st| attr(&st)),
                    (None, None) => {}
                }
            }
        }
        let now = Instant::now();
        let mut s = self.state();
        s.sweep(now);
        for (p, st) in &seen {
            s.record(p, st, now);
        }
        if ok {
            for p in &pending.made {
                s.made.insert(p.clone(), now + TTL);
            }
        }
        for a in node_seen.iter().chain(&pinned_seen) {
            s.nodes.insert(key(a), (NodeState::of(a), now + TTL));
        }
        // Only a state that is already the agent's own doing is kept alive by a close (its
        // IN_CLOSE_WRITE reports nothing new). Recording the state found at close time would
        // claim whatever another process did to the node meanwhile (a hard link made in the
        // container while the mount was reading the file through a handle went unreported).
        if let Some(a) = &close_seen
            && let Some((st, until)) = s.nodes.get_mut(&key(a))
            && *until > now
            && *st == NodeState::of(a)
        {
            *until = now + TTL;
        }
        for p in &pending.paths {
            unmark(&mut s.busy_paths, p);
        }
        if let Some(n) = &pending.node {
            unmark(&mut s.busy_nodes, &n.key);
        }
        s.finished += 1;
    }

    /// How many operations have finished. A state the watcher read while this number moved
    /// may be one an operation passed through (ext4 grows a file page by page during one
    /// write): it is judged again rather than reported.
    pub fn finished(&self) -> u64 {
        self.state().finished
    }

    /// Whether an operation is still working on `path` or on the node seen there.
    pub fn busy(&self, path: &RelPath, seen: Option<&Seen>) -> bool {
        let s = self.state();
        s.busy_paths.contains_key(path)
            || matches!(seen, Some(Seen::Present(a)) if s.busy_nodes.contains_key(&key(a)))
    }

    /// Whether any operation is working on `path`.
    pub fn busy_path(&self, path: &RelPath) -> bool {
        self.state().busy_paths.contains_key(path)
    }

    /// Whether `seen` at `path` is exactly what the agent's own operations left there.
    /// A name seen present is no longer the absence an own removal left: a later absence
    /// there is someone else's doing (a file removed through the mount, made again in the
    /// container and removed or renamed away within [`TTL`] went unreported).
    pub fn is_echo(&self, path: &RelPath, seen: &Seen) -> bool {
        let now = Instant::now();
        let mut s = self.state();
        match seen {
            Seen::Absent => s.absent.get(path).is_some_and(|until| *until > now),
            Seen::Present(a) => {
                s.absent.remove(path);
                s.nodes
                    .get(&key(a))
                    .is_some_and(|(st, until)| *until > now && *st == NodeState::of(a))
            }
        }
    }

    /// Whether an own operation made the name `path` (recently): the mount knows of it, even
    /// when someone else removed it again before the watcher looked.
    pub fn made_by_us(&self, path: &RelPath) -> bool {
        let now = Instant::now();
        self.state()
            .made
            .get(path)
            .is_some_and(|until| *until > now)
    }

    /// Whether the agent's own operation removed `path` (recently).
    pub fn removed_by_us(&self, path: &RelPath) -> bool {
        self.is_echo(path, &Seen::Absent)
    }
}
