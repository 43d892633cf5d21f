//! Local-first operation (write-back): with an agent that walks, watches and keeps a journal
//! lane, every change is applied to the tree and the content cache at once and appended to the
//! durable journal; the sender ([`crate::sender`]) takes it to the agent later, in order.
//! Reads come from the content cache, fetched by path (`Op::ReadPath`) when missing.
//!
//! Invariants:
//! - The tree and the journal change together, under [`WriteBack::order`]: a record's paths are
//!   the tree's paths at the moment it is appended, and records are appended in the order the
//!   tree changed. So replaying the journal on the remote reproduces the tree.
//! - A node with records not yet applied (its `last_seq` above the journal's applied seq) keeps
//!   its local attributes; remote events and listings for its path are left alone
//!   ([`PendingSet`]). Once its last record is applied, the remote's attributes are adopted
//!   and its cached bytes are declared those of that remote version.
//! - Bytes are fetched from the remote only when no record touching the file's path is
//!   pending, so the remote file at that path is the one the cache holds (or a newer version,
//!   found out by comparing attributes).
//! - `close()` returns once the journal is durable (group commit); `fsync()` once every record
//!   of the file is applied remotely and the agent fsynced it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use kmount_proto::{Attr, Caller, Done, NodeRef, Op, RelPath, SetAttr, SetTime, Timespec};
use tokio::sync::watch;

use crate::content::{CHUNK, CacheKey, ContentCache, ContentError, Entry, Validity};
use crate::core::{Core, Created, NodeAttr, Opened, timespec};
use crate::err;
use crate::error::FsError;
use crate::journal::{Journal, JournalError};
use crate::tree::{Effects, ROOT_ID, TreeState};

mod crossing;

/// `st_dev` of nodes made here and not yet on the remote (their `st_ino` is a counter).
pub const LOCAL_DEV: u64 = u64::MAX;

/// Files up to this size are fetched whole when opened.
const WHOLE_FILE: u64 = CHUNK;
/// Chunks fetched ahead of a sequential reader.
const READ_AHEAD: u64 = 4;
/// Fetches in flight at once for one file.
const FETCHES_PER_FILE: usize = 8;
/// A change that makes or changes a node waits for the remote (so that the node shows the
/// remote's identity and attributes from the start, not changing a moment later) when fewer
/// than this many records are ahead of it.
const SYNC_BACKLOG: u64 = 64;
/// ... and when the record before it was appended at least this long ago: a change in a burst
/// (an untar, a build's output, a checkout) does not wait, or the burst would pay one round
/// trip per file.
const SYNC_QUIET: Duration = Duration::from_millis(20);
/// The longest such a wait lasts (a slow or frozen remote must not stall a save).
const SYNC_WAIT_MAX: Duration = Duration::from_secs(1);
/// Recent remote errors kept for status.
const KEEP_ERRORS: usize = 32;
/// Flow control: once this many records wait to be applied, a change waits for the sender to
/// bring them below it again before it is journaled (writers go at the sender's pace), so
/// that writers faster than the remote (a build writing in a loop) cannot grow the backlog,
/// the daemon's memory and the time `kmount wait` and unmount take without bound. An untar or
/// a checkout stays below it.
pub const BACKLOG_LIMIT: u64 = 20_000;
/// The longest one change waits so (a remote that stopped applying must not stall a save for
/// good); a remote that refuses changes, or is not connected, makes none wait.
const BACKLOG_WAIT_MAX: Duration = Duration::from_secs(10);

/// A change the remote refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub errno: i32,
    /// The path the change named, if any.
    pub path: Option<RelPath>,
    pub message: String,
    /// The journal record, when it was one.
    pub seq: Option<u64>,
    pub at: SystemTime,
}

/// A file changed on both sides; one version keeps the name, the other was kept under
/// another name, in the mount only (see [`crate::local_ops`] for the rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub path: RelPath,
    /// The name the other version has in the mount now (never sent to the remote).
    pub saved_as: RelPath,
    pub at: SystemTime,
}

/// An open regular file in write-back mode.
#[derive(Debug, Clone)]
pub(crate) struct WbFile {
    pub id: u64,
    pub entry: Entry,
    /// Opened for writing, by this caller: the kernel's handle-less truncate of an `O_TRUNC`
    /// open is this open's own (see [`Core::wb_setattr`]).
    pub writer: Option<Option<Caller>>,
}

/// Paths with records not yet applied: the names themselves and every directory above them.
#[derive(Debug, Default)]
pub struct PendingSet {
    paths: BTreeSet<Vec<u8>>,
    ancestors: BTreeSet<Vec<u8>>,
}

impl PendingSet {
    pub fn new(paths: Vec<RelPath>) -> Self {
        let mut s = Self::default();
        for p in paths {
            let mut cur = p.clone();
            while let Some((parent, _)) = cur.split_last() {
                s.ancestors.insert(parent.as_bytes().to_vec());
                cur = parent;
            }
            s.paths.insert(p.as_bytes().to_vec());
        }
        s
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// `path` itself has pending records.
    pub fn contains(&self, path: &RelPath) -> bool {
        self.paths.contains(path.as_bytes())
    }

    /// `path` or something below it has pending records.
    pub fn touches(&self, path: &RelPath) -> bool {
        self.contains(path) || self.ancestors.contains(path.as_bytes())
    }

    /// `path` or one of its ancestors has pending records (a rename of a directory above
    /// moves it).
    pub fn covers(&self, path: &RelPath) -> bool {
        let mut cur = path.clone();
        loop {
            if self.contains(&cur) {
                return true;
            }
            match cur.split_last() {
                Some((parent, _)) => cur = parent,
                None => return false,
            }
        }
    }
}

/// A fetch of one chunk in flight: its outcome, once known.
type FetchSlot = watch::Receiver<Option<Result<(), FsError>>>;

/// Write-back state of a mount.
pub struct WriteBack {
    pub journal: Journal,
    pub cache: ContentCache,
    /// Serialises tree changes with their journal appends.
    order: Mutex<()>,
    /// Node id -> the last journal seq that changed it.
    last_seq: Mutex<HashMap<u64, u64>>,
    /// Per node, the seq of its last record that is not only about its bytes (a write, a
    /// fallocate, a truncation): what a question about its name or xattrs must wait for.
    last_meta_seq: Mutex<HashMap<u64, u64>>,
    /// When the last record was appended (for [`SYNC_QUIET`]).
    last_append: Mutex<Option<std::time::Instant>>,
    /// Wakes the sender out of its backoff ([`WriteBack::retry_now`]).
    retry: tokio::sync::Notify,
    /// Wakes the sender when a file is closed: the records it holds back for a file still
    /// open go at once rather than at its next look ([`WriteBack::file_closed`]).
    closed: tokio::sync::Notify,
    /// Seq -> nodes it changed (to settle them when it is applied).
    seq_nodes: Mutex<BTreeMap<u64, Vec<u64>>>,
    /// Our file handles.
    files: Mutex<HashMap<u64, WbFile>>,
    fetches: Mutex<HashMap<(CacheKey, u64), FetchSlot>>,
    next_local_ino: AtomicU64,
    /// The record the sender is stuck at, if any.
    blocked: Mutex<Option<RemoteError>>,
    errors: Mutex<VecDeque<RemoteError>>,
    conflicts: Mutex<Vec<Conflict>>,
    /// Nodes known to have no `security.capability` (the kernel asks before every write).
    no_caps: Mutex<std::collections::HashSet<u64>>,
    /// Settled nodes whose remote attributes could not be fetched yet: their path is still
    /// being renamed on the remote.
    deferred: Mutex<std::collections::HashSet<u64>>,
    /// [`BACKLOG_LIMIT`] or as set ([`WriteBack::with_backlog_limit`]).
    backlog_limit: u64,
    /// Paths whose remote changes were left out while local changes of them were pending:
    /// looked at again once those are applied.
    left_out: Mutex<std::collections::HashSet<RelPath>>,
}

impl std::fmt::Debug for WriteBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBack")
            .field("journal", &self.journal)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No section panics midway, so a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl From<JournalError> for FsError {
    fn from(e: JournalError) -> Self {
        let errno = match &e {
            JournalError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            JournalError::TooLarge { .. } => libc::EFBIG,
            _ => libc::EIO,
        };
        FsError::new(errno, format!("the local journal: {e}"))
    }
}

impl From<ContentError> for FsError {
    fn from(e: ContentError) -> Self {
        let errno = match &e {
            ContentError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        };
        FsError::new(errno, format!("the content cache: {e}"))
    }
}

fn now() -> Timespec {
    timespec(SystemTime::now())
}

/// 512-byte blocks a file of `size` bytes would take.
fn blocks_for(size: u64) -> u64 {
    size.div_ceil(4096) * 8
}

impl WriteBack {
    pub fn new(journal: Journal, cache: ContentCache) -> Self {
        Self {
            journal,
            cache,
            order: Mutex::new(()),
            last_seq: Mutex::new(HashMap::new()),
            last_meta_seq: Mutex::new(HashMap::new()),
            last_append: Mutex::new(None),
            retry: tokio::sync::Notify::new(),
            closed: tokio::sync::Notify::new(),
            seq_nodes: Mutex::new(BTreeMap::new()),
            files: Mutex::new(HashMap::new()),
            fetches: Mutex::new(HashMap::new()),
            next_local_ino: AtomicU64::new(1),
            blocked: Mutex::new(None),
            errors: Mutex::new(VecDeque::new()),
            conflicts: Mutex::new(Vec::new()),
            no_caps: Mutex::new(std::collections::HashSet::new()),
            deferred: Mutex::new(std::collections::HashSet::new()),
            left_out: Mutex::new(std::collections::HashSet::new()),
            backlog_limit: BACKLOG_LIMIT,
        }
    }

    /// Flow control from this many records waiting to be applied (at least 1).
    pub fn with_backlog_limit(mut self, records: u64) -> Self {
        self.backlog_limit = records.max(1);
        self
    }

    /// Keeps `paths` until no pending record covers them; returns those none covers now.
    pub fn keep_left_out(&self, paths: Vec<RelPath>) -> Vec<RelPath> {
        let mut left = lock(&self.left_out);
        left.extend(paths);
        drop(left);
        self.left_out_due()
    }

    /// Takes the left-out paths no record pending covers any more.
    fn left_out_due(&self) -> Vec<RelPath> {
        let mut left = lock(&self.left_out);
        if left.is_empty() {
            return Vec::new();
        }
        let due: Vec<RelPath> = left
            .iter()
            .filter(|p| !self.journal.covers_after(p, 0))
            .cloned()
            .collect();
        for p in &due {
            left.remove(p);
        }
        due
    }

    /// Paths with records not yet applied.
    pub fn pending_set(&self) -> PendingSet {
        PendingSet::new(self.journal.pending_paths())
    }

    /// The last record that changed node `id`, when it is not applied yet.
    pub fn pending_seq(&self, id: u64) -> Option<u64> {
        let seq = *lock(&self.last_seq).get(&id)?;
        (seq > self.journal.applied()).then_some(seq)
    }

    /// Like [`WriteBack::pending_seq`], for the records of `id` other than those that only
    /// change its bytes.
    pub fn pending_meta_seq(&self, id: u64) -> Option<u64> {
        let seq = *lock(&self.last_meta_seq).get(&id)?;
        (seq > self.journal.applied()).then_some(seq)
    }

    /// Nodes changed by records up to `seq` (inclusive) and after `from`, removed from the
    /// per-seq bookkeeping; with each, whether that was its last record. Their last seqs stay
    /// (so they count as pending) until [`WriteBack::release_settled`], once adopted.
    pub(crate) fn take_settled(&self, from: u64, seq: u64) -> Vec<(u64, bool)> {
        let nodes: Vec<u64> = {
            // The first entries taken one by one: a split would move every later entry (the
            // whole backlog, once per applied record).
            let mut map = lock(&self.seq_nodes);
            let mut nodes = Vec::new();
            while let Some(first) = map.first_entry() {
                if *first.key() > seq {
                    break;
                }
                let (s, n) = first.remove_entry();
                if s >= from {
                    nodes.extend(n);
                }
            }
            nodes
        };
        let last = lock(&self.last_seq);
        let mut out: Vec<(u64, bool)> = Vec::new();
        for id in nodes {
            if out.iter().any(|(n, _)| *n == id) {
                continue;
            }
            let settled = last.get(&id).is_none_or(|&s| s <= seq);
            out.push((id, settled));
        }
        out
    }

    /// Forgets the last seq of `ids` where it is at most `seq` (they are settled).
    fn release_settled(&self, ids: impl IntoIterator<Item = u64>, seq: u64) {
        let mut last = lock(&self.last_seq);
        let mut meta = lock(&self.last_meta_seq);
        for id in ids {
            if last.get(&id).is_some_and(|&s| s <= seq) {
                last.remove(&id);
            }
            if meta.get(&id).is_some_and(|&s| s <= seq) {
                meta.remove(&id);
            }
        }
    }

    /// Whether node `id` has a record after `seq`.
    fn changed_after(&self, id: u64, seq: u64) -> bool {
        lock(&self.last_seq).get(&id).is_some_and(|&s| s > seq)
    }

    /// The sender stopped at this record (or goes on again, with `None`).
    pub fn set_blocked(&self, e: Option<RemoteError>) {
        if let Some(e) = &e {
            let mut errors = lock(&self.errors);
            errors.push_back(e.clone());
            while errors.len() > KEEP_ERRORS {
                errors.pop_front();
            }
        }
        *lock(&self.blocked) = e;
    }

    /// A remote error that did not stop the sender (kept for status).
    pub fn note_error(&self, e: RemoteError) {
        let mut errors = lock(&self.errors);
        errors.push_back(e);
        while errors.len() > KEEP_ERRORS {
            errors.pop_front();
        }
    }

    pub fn blocked(&self) -> Option<RemoteError> {
        lock(&self.blocked).clone()
    }

    /// Asks the sender to send the refused record again now, not after its backoff (an
    /// `fsync` wants to know whether the cause is gone).
    pub fn retry_now(&self) {
        self.retry.notify_one();
    }

    /// Resolves after a file opened through the mount was closed (since the last call).
    pub async fn file_closed(&self) {
        self.closed.notified().await;
    }

    /// Resolves when someone asked for [`WriteBack::retry_now`].
    pub async fn retry_asked(&self) {
        self.retry.notified().await;
    }

    pub fn recent_errors(&self) -> Vec<RemoteError> {
        lock(&self.errors).iter().cloned().collect()
    }

    /// Files open through the mount now.
    pub fn open_files(&self) -> usize {
        lock(&self.files).len()
    }

    pub fn conflicts(&self) -> Vec<Conflict> {
        lock(&self.conflicts).clone()
    }

    /// The key the cached bytes of a node are kept under.
    pub fn content_key(&self, remote: (u64, u64)) -> CacheKey {
        if remote.0 == LOCAL_DEV {
            CacheKey(format!("local-{:x}-{:x}", self.journal.session(), remote.1))
        } else {
            CacheKey(format!("{:x}-{:x}", remote.0, remote.1))
        }
    }

    pub(crate) fn file(&self, fh: u64) -> Option<WbFile> {
        lock(&self.files).get(&fh).cloned()
    }

    /// The newest handle open for writing on node `id` by `caller`.
    fn writer_of(&self, id: u64, caller: &Option<Caller>) -> Option<u64> {
        lock(&self.files)
            .iter()
            .filter(|(_, f)| f.id == id && f.writer.as_ref() == Some(caller))
            .map(|(fh, _)| *fh)
            .max()
    }
}

/// A node to make: its mode (type included), size, device number and symlink target.
struct NewNode {
    mode: u32,
    size: u64,
    rdev: u64,
    symlink: Option<Vec<u8>>,
}

/// What one local change does to the tree before it is journaled.
struct Change {
    op: Op,
    caller: Option<Caller>,
    /// Nodes whose state this record sets.
    nodes: Vec<u64>,
}

impl Core {
    pub(crate) fn wb(&self) -> Option<&WriteBack> {
        self.write_back.as_deref()
    }

    /// Waits while more than [`BACKLOG_LIMIT`] records are not applied yet and the sender is
    /// making progress on them (flow control), at most [`BACKLOG_WAIT_MAX`].
    pub(crate) async fn throttle(&self) {
        let Some(wb) = self.wb() else { return };
        let backlog = || wb.journal.tail().saturating_sub(wb.journal.applied());
        let draining = || self.client().is_connected() && wb.blocked().is_none();
        let limit = wb.backlog_limit;
        if backlog() <= limit || !draining() {
            return;
        }
        // Someone waits: the sender holds nothing back for coalescing.
        let _waiting = wb.journal.waiting();
        let mut applied = wb.journal.watch_applied();
        let started = std::time::Instant::now();
        let waited = tokio::time::timeout(BACKLOG_WAIT_MAX, async {
            while backlog() > limit && draining() {
                // Woken by progress, or to look at the connection again.
                let tick = Duration::from_millis(250);
                if let Ok(Err(_)) = tokio::time::timeout(tick, applied.changed()).await {
                    break;
                }
            }
        })
        .await;
        let took = started.elapsed();
        self.sync_stats(|s| {
            s.throttled += 1;
            s.throttled_ms += took.as_millis() as u64;
        });
        if waited.is_err() {
            tracing::warn!(
                "changes are made faster than the target applies them: {} are waiting; a \
                 change waited {} s and goes ahead",
                backlog(),
                took.as_secs()
            );
        } else {
            tracing::debug!(
                ?took,
                backlog = backlog(),
                "a change waited for the backlog"
            );
        }
    }

    /// Applies `f` to the tree and journals the change it returns, as one step.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut TreeState) -> Result<(T, Option<Change>), FsError>,
    ) -> Result<T, FsError> {
        self.change_seq(f).map(|(v, _)| v)
    }

    /// [`Core::change`], also returning the record's seq and whether the journal had little
    /// else pending (fewer than [`SYNC_BACKLOG`] records).
    fn change_seq<T>(
        &self,
        f: impl FnOnce(&mut TreeState) -> Result<(T, Option<Change>), FsError>,
    ) -> Result<(T, Option<(u64, bool)>), FsError> {
        let wb = self.wb().ok_or_else(|| err!(libc::EIO, "no write-back"))?;
        let order = lock(&wb.order);
        self.change_in(&order, f)
    }

    /// The order lock, for a change whose cached bytes must change under it too (a write,
    /// a truncate): settling ([`Core::adopt`]) then never sees the bytes without the record.
    fn order(&self) -> Result<MutexGuard<'_, ()>, FsError> {
        let wb = self.wb().ok_or_else(|| err!(libc::EIO, "no write-back"))?;
        Ok(lock(&wb.order))
    }

    /// [`Core::change_seq`] under the order lock, taken by the caller.
    fn change_in<T>(
        &self,
        _order: &MutexGuard<'_, ()>,
        f: impl FnOnce(&mut TreeState) -> Result<(T, Option<Change>), FsError>,
    ) -> Result<(T, Option<(u64, bool)>), FsError> {
        let wb = self.wb().ok_or_else(|| err!(libc::EIO, "no write-back"))?;
        let (value, change) = {
            let mut t = self.tree().lock();
            let (value, change) = f(&mut t)?;
            if let Some(c) = &change {
                // Newer than any remote listing or event taken before now: a reconciliation
                // whose listing predates this change's arrival there must not undo it.
                let seq = self.next_mutation();
                for &id in &c.nodes {
                    t.mark_touched(id, seq);
                }
            }
            (value, change)
        };
        let Some(c) = change else {
            return Ok((value, None));
        };
        // Few enough records ahead that the sender has them in flight already, and none
        // appended just before (no burst): waiting for this one costs about one round trip.
        let quiet = lock(&wb.last_append)
            .replace(std::time::Instant::now())
            .is_none_or(|t| t.elapsed() >= SYNC_QUIET);
        let idle = quiet && wb.journal.tail() - wb.journal.applied() < SYNC_BACKLOG;
        let bytes_only = matches!(
            &c.op,
            Op::WritePath { .. }
                | Op::FallocatePath { .. }
                | Op::SetAttr {
                    set: SetAttr {
                        size: Some(_),
                        mode: None,
                        uid: None,
                        gid: None,
                        atime: None,
                        mtime: None,
                    },
                    ..
                }
        );
        let summary =
            tracing::enabled!(tracing::Level::DEBUG).then(|| crate::journal::summary(&c.op));
        let seq = wb.journal.append_as(c.caller, c.op)?;
        if let Some(summary) = summary {
            tracing::debug!(seq, nodes = ?c.nodes, "journaled: {summary}");
        }
        let mut last = lock(&wb.last_seq);
        for &id in &c.nodes {
            last.insert(id, seq);
        }
        drop(last);
        if !bytes_only {
            let mut meta = lock(&wb.last_meta_seq);
            for &id in &c.nodes {
                meta.insert(id, seq);
            }
        }
        lock(&wb.seq_nodes).insert(seq, c.nodes);
        Ok((value, Some((seq, idle))))
    }

    /// Owner of a node made by `caller` in `parent`: the caller (the agent's user, as the
    /// owner of the served directory, without identity); the group of a set-group-id parent.
    fn owner(&self, t: &TreeState, caller: &Option<Caller>, parent: u64) -> (u32, u32, bool) {
        let (uid, gid) = match caller {
            Some(c) => (c.uid, c.gid),
            None => t.attr(ROOT_ID).map_or((0, 0), |a| (a.uid, a.gid)),
        };
        match t.attr(parent) {
            Ok(p) if p.mode & libc::S_ISGID != 0 => (uid, p.gid, true),
            _ => (uid, gid, false),
        }
    }

    fn local_attr(&self, mode: u32, uid: u32, gid: u32, size: u64, rdev: u64) -> Attr {
        let wb = self.wb().expect("write-back mode");
        let t = now();
        Attr {
            ino: wb.next_local_ino.fetch_add(1, Ordering::Relaxed),
            dev: LOCAL_DEV,
            mode,
            nlink: if mode & libc::S_IFMT == libc::S_IFDIR {
                2
            } else {
                1
            },
            uid,
            gid,
            rdev,
            size,
            blocks: blocks_for(size),
            blksize: 4096,
            atime: t,
            mtime: t,
            ctime: t,
        }
    }

    /// A directory's times (and link count) after an entry was added or removed.
    fn dir_changed(t: &mut TreeState, dir: u64, nlink_delta: i64) {
        let Ok(mut a) = t.attr(dir).cloned() else {
            return;
        };
        let ts = now();
        a.mtime = ts;
        a.ctime = ts;
        a.nlink = a.nlink.saturating_add_signed(nlink_delta);
        t.update_attr(dir, &a, None, &mut Effects::default());
    }

    /// Makes `name` in `parent` (which must not exist). When little else waits to be sent
    /// ([`SYNC_BACKLOG`]) and the agent is there, waits (briefly) for the remote to make it too, so that the kernel
    /// gets the node under the remote's inode number from the start. The lookup of the node
    /// is counted (the reply is an entry).
    async fn make_node(
        &self,
        caller: &Option<Caller>,
        parent: u64,
        name: &[u8],
        new: NewNode,
        op: impl FnOnce(RelPath) -> Op,
    ) -> Result<NodeAttr, FsError> {
        let wb = self.wb().expect("write-back mode");
        let (made, seq) = self.make_node_now(caller, parent, name, new, op)?;
        let mut attr = made;
        if let Some((seq, true)) = seq
            && self.client().is_connected()
        {
            wb.journal.commit()?;
            let wait = self.remote_timeout().min(SYNC_WAIT_MAX);
            if let Ok(Ok(())) = tokio::time::timeout(wait, self.wait_applied_for(seq, None)).await {
                // The kernel does not know the node yet: it can have the remote's number as
                // its id from the start (an id never changes once the kernel has it).
                let mut fx = Effects::default();
                let mut t = self.tree().lock();
                let id = t.renumber(attr.ino, &mut fx).unwrap_or(attr.ino);
                if let Ok(a) = t.attr(id) {
                    attr = NodeAttr::from_remote(id, a);
                }
                drop(t);
                self.invalidator().send(fx.inval);
            }
        }
        self.tree().lock().count_lookup(attr.ino);
        Ok(attr)
    }

    /// The local half of [`Core::make_node`].
    fn make_node_now(
        &self,
        caller: &Option<Caller>,
        parent: u64,
        name: &[u8],
        new: NewNode,
        op: impl FnOnce(RelPath) -> Op,
    ) -> Result<(NodeAttr, Option<(u64, bool)>), FsError> {
        self.change_seq(|t| {
            check_dir(t, parent)?;
            let path = t.child_path(parent, name)?;
            if t.child(parent, name).is_some() {
                return Err(err!(libc::EEXIST, "{path} exists"));
            }
            let NewNode {
                mode,
                size,
                rdev,
                symlink,
            } = new;
            let (uid, gid, sgid_parent) = self.owner(t, caller, parent);
            let mut mode = mode;
            if sgid_parent && mode & libc::S_IFMT == libc::S_IFDIR {
                mode |= libc::S_ISGID;
            }
            let attr = self.local_attr(mode, uid, gid, size, rdev);
            let id = t.upsert(parent, name, &attr, symlink, true, &mut Effects::default());
            let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
            Self::dir_changed(t, parent, if is_dir { 1 } else { 0 });
            let change = Change {
                op: op(path),
                caller: caller.clone(),
                nodes: vec![id, parent],
            };
            Ok((NodeAttr::from_remote(id, &attr), Some(change)))
        })
    }

    pub(crate) async fn wb_mknod(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
    ) -> Result<NodeAttr, FsError> {
        self.throttle().await;
        let fmt = mode & libc::S_IFMT;
        let fmt = if fmt == 0 { libc::S_IFREG } else { fmt };
        let mode = fmt | (mode & 0o7777);
        let new = NewNode {
            mode,
            size: 0,
            rdev,
            symlink: None,
        };
        self.make_node(&caller, parent, name, new, |path| Op::Mknod {
            path,
            mode,
            rdev,
        })
        .await
    }

    pub(crate) async fn wb_mkdir(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> Result<NodeAttr, FsError> {
        self.throttle().await;
        let perm = mode & 0o7777;
        let new = NewNode {
            mode: libc::S_IFDIR | perm,
            size: 4096,
            rdev: 0,
            symlink: None,
        };
        self.make_node(&caller, parent, name, new, |path| Op::Mkdir {
            path,
            mode: perm,
        })
        .await
    }

    pub(crate) async fn wb_symlink(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> Result<NodeAttr, FsError> {
        self.throttle().await;
        let len = target.len() as u64;
        let target = target.to_vec();
        let new = NewNode {
            mode: libc::S_IFLNK | 0o777,
            size: len,
            rdev: 0,
            symlink: Some(target.clone()),
        };
        self.make_node(&caller, parent, name, new, |path| Op::Symlink {
            path,
            target,
        })
        .await
    }

    pub(crate) async fn wb_create(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<Created, FsError> {
        self.throttle().await;
        let wb = self.wb().expect("write-back mode");
        let perm = mode & 0o7777;
        if let Some(existing) = self.tree().child(parent, name) {
            if flags & libc::O_EXCL != 0 {
                return Err(err!(
                    libc::EEXIST,
                    "{} exists",
                    String::from_utf8_lossy(name)
                ));
            }
            // Raced with another creator: open what is there.
            let attr = self.getattr(caller.clone(), existing).await?;
            self.tree().lock().count_lookup(existing);
            let opened = self.wb_open(caller, existing, flags).await?;
            return Ok(Created {
                attr,
                fh: opened.fh,
            });
        }
        let new = NewNode {
            mode: libc::S_IFREG | perm,
            size: 0,
            rdev: 0,
            symlink: None,
        };
        let attr = self
            .make_node(&caller, parent, name, new, |path| Op::Create {
                path,
                flags: libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                mode: perm,
            })
            .await?;
        let (remote, validity) = {
            let t = self.tree().lock();
            let remote = t
                .remote_of(attr.ino)
                .ok_or_else(|| err!(libc::ESTALE, "the new file vanished"))?;
            (remote, Validity::of(t.attr(attr.ino)?))
        };
        let key = wb.content_key(remote);
        let entry = wb.cache.create(key, validity, 0)?;
        entry.pin();
        self.tree().opened(attr.ino)?;
        let fh = self.add_wb_file(WbFile {
            id: attr.ino,
            entry,
            writer: Some(caller),
        });
        Ok(Created { attr, fh })
    }

    pub(crate) async fn wb_link(
        &self,
        caller: Option<Caller>,
        id: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> Result<NodeAttr, FsError> {
        self.throttle().await;
        let (attr, seq) = self.change_seq(|t| {
            check_dir(t, new_parent)?;
            let mut attr = t.attr(id)?.clone();
            if attr.is_dir() {
                return Err(err!(libc::EPERM, "cannot link a directory"));
            }
            // The node's remote identity (its attributes keep the numbers it was made with
            // until they are adopted): the new name must find this same node.
            if let Some((dev, ino)) = t.remote_of(id) {
                (attr.dev, attr.ino) = (dev, ino);
            }
            let from = t.path(id)?;
            let to = t.child_path(new_parent, new_name)?;
            if t.child(new_parent, new_name).is_some() {
                return Err(err!(libc::EEXIST, "{to} exists"));
            }
            attr.nlink += 1;
            attr.ctime = now();
            let symlink = t.symlink(id).map(<[u8]>::to_vec);
            t.update_attr(id, &attr, symlink.clone(), &mut Effects::default());
            let got = t.upsert(
                new_parent,
                new_name,
                &attr,
                symlink,
                false,
                &mut Effects::default(),
            );
            t.count_lookup(got);
            Self::dir_changed(t, new_parent, 0);
            Ok((
                NodeAttr::from_remote(got, &attr),
                Some(Change {
                    op: Op::Link { from, to },
                    caller: caller.clone(),
                    nodes: vec![got, new_parent],
                }),
            ))
        })?;
        // The link count and ctime the remote gives it, from the start.
        self.settle_when_idle(attr.ino, seq).await;
        Ok(self
            .tree()
            .lock()
            .attr(attr.ino)
            .map_or(attr, |a| NodeAttr::from_remote(attr.ino, a)))
    }

    pub(crate) async fn wb_remove(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        dir: bool,
    ) -> Result<(), FsError> {
        self.throttle().await;
        let wb = self.wb().expect("write-back mode");
        let dropped = self.change(|t| {
            let path = t.child_path(parent, name)?;
            let id = t
                .child(parent, name)
                .ok_or_else(|| err!(libc::ENOENT, "{path} does not exist"))?;
            let mut attr = t.attr(id)?.clone();
            if dir {
                if !attr.is_dir() {
                    return Err(err!(libc::ENOTDIR, "{path} is not a directory"));
                }
                if !t.listing(id).is_empty() {
                    return Err(err!(libc::ENOTEMPTY, "{path} is not empty"));
                }
            } else if attr.is_dir() {
                return Err(err!(libc::EISDIR, "{path} is a directory"));
            }
            let remote = t.remote_of(id);
            t.remove(parent, name, &mut Effects::default());
            Self::dir_changed(t, parent, if dir { -1 } else { 0 });
            let gone = !t.is_linked(id);
            if t.contains(id) {
                attr.nlink = if dir { 0 } else { attr.nlink.saturating_sub(1) };
                attr.ctime = now();
                t.update_attr(id, &attr, None, &mut Effects::default());
            }
            let op = if dir {
                Op::Rmdir { path }
            } else {
                Op::Unlink { path }
            };
            let mut nodes = vec![parent];
            if !gone {
                // Its other names see the new link count.
                nodes.push(id);
            }
            Ok((
                remote.filter(|_| gone && !dir),
                Some(Change {
                    op,
                    caller: caller.clone(),
                    nodes,
                }),
            ))
        })?;
        // The last name of a file is gone: its cached bytes are no use (open handles keep
        // theirs).
        if let Some(remote) = dropped {
            wb.cache.remove(&wb.content_key(remote));
        }
        Ok(())
    }

    pub(crate) async fn wb_rename(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> Result<(), FsError> {
        self.throttle().await;
        let wb = self.wb().expect("write-back mode");
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let dropped = self.change(|t| {
            check_dir(t, new_parent)?;
            let from = t.child_path(parent, name)?;
            let to = t.child_path(new_parent, new_name)?;
            let src = t
                .child(parent, name)
                .ok_or_else(|| err!(libc::ENOENT, "{from} does not exist"))?;
            let dst = t.child(new_parent, new_name);
            let src_dir = t.is_dir(src);
            if src_dir
                && to.as_bytes().starts_with(from.as_bytes())
                && to.as_bytes().get(from.as_bytes().len()) == Some(&b'/')
            {
                return Err(err!(libc::EINVAL, "cannot move {from} into itself"));
            }
            if let Some(d) = dst {
                if noreplace {
                    return Err(err!(libc::EEXIST, "{to} exists"));
                }
                if d == src {
                    // Two names of one file: nothing to do.
                    return Ok((None, None));
                }
                if !exchange {
                    match (src_dir, t.is_dir(d)) {
                        (true, false) => {
                            return Err(err!(libc::ENOTDIR, "{to} is not a directory"));
                        }
                        (false, true) => return Err(err!(libc::EISDIR, "{to} is a directory")),
                        (true, true) if !t.listing(d).is_empty() => {
                            return Err(err!(libc::ENOTEMPTY, "{to} is not empty"));
                        }
                        _ => {}
                    }
                }
            } else if exchange {
                return Err(err!(libc::ENOENT, "{to} does not exist"));
            }
            let replaced = dst.filter(|_| !exchange);
            let replaced_remote = replaced.and_then(|d| t.remote_of(d));
            let replaced_dir = replaced.is_some_and(|d| t.is_dir(d));
            t.rename(
                parent,
                name,
                new_parent,
                new_name,
                exchange,
                &mut Effects::default(),
            );
            let ts = now();
            for id in [Some(src), dst].into_iter().flatten() {
                if let Ok(mut a) = t.attr(id).cloned() {
                    a.ctime = ts;
                    if Some(id) == replaced {
                        a.nlink = if replaced_dir {
                            0
                        } else {
                            a.nlink.saturating_sub(1)
                        };
                    }
                    t.update_attr(id, &a, None, &mut Effects::default());
                }
            }
            let moved_dirs = |d: bool| i64::from(d);
            if parent != new_parent {
                let (a, b) = if exchange {
                    (
                        moved_dirs(dst.is_some_and(|d| t.is_dir(d))) - moved_dirs(src_dir),
                        moved_dirs(src_dir) - moved_dirs(dst.is_some_and(|d| t.is_dir(d))),
                    )
                } else {
                    (
                        -moved_dirs(src_dir),
                        moved_dirs(src_dir) - moved_dirs(replaced_dir),
                    )
                };
                Self::dir_changed(t, parent, a);
                Self::dir_changed(t, new_parent, b);
            } else {
                Self::dir_changed(t, parent, -moved_dirs(replaced_dir));
            }
            let gone = replaced.filter(|&d| !t.is_linked(d)).and(replaced_remote);
            let mut nodes = vec![src];
            nodes.extend(dst.filter(|&d| t.is_linked(d)));
            nodes.push(parent);
            if new_parent != parent {
                nodes.push(new_parent);
            }
            Ok((
                gone,
                Some(Change {
                    op: Op::Rename { from, to, flags },
                    caller: caller.clone(),
                    nodes,
                }),
            ))
        })?;
        if let Some(remote) = dropped {
            wb.cache.remove(&wb.content_key(remote));
        }
        Ok(())
    }

    /// The cache entry for node `id`: the one holding its current bytes (a file with pending
    /// changes keeps whatever it has; any other must match the tree's attributes), else a new
    /// empty one. The flag says whether an entry of another version was replaced.
    fn entry_for(&self, id: u64) -> Result<(Entry, bool), FsError> {
        let wb = self.wb().expect("write-back mode");
        let (remote, attr) = {
            let t = self.tree().lock();
            (
                t.remote_of(id)
                    .ok_or_else(|| err!(libc::ESTALE, "node {id} is not known"))?,
                t.attr(id)?.clone(),
            )
        };
        let key = wb.content_key(remote);
        if (remote.0 == LOCAL_DEV || wb.pending_seq(id).is_some())
            && let Some(e) = wb.cache.lookup(&key)
        {
            return Ok((e, false));
        }
        let validity = Validity::of(&attr);
        if let Some(e) = wb.cache.get(&key, &validity) {
            return Ok((e, false));
        }
        let replaced = wb.cache.contains(&key);
        Ok((wb.cache.create(key, validity, attr.size)?, replaced))
    }

    fn add_wb_file(&self, file: WbFile) -> u64 {
        let fh = self.alloc_fh();
        lock(&self.wb().expect("write-back mode").files).insert(fh, file);
        fh
    }

    fn wb_file(&self, fh: u64) -> Result<WbFile, FsError> {
        self.wb()
            .and_then(|wb| wb.file(fh))
            .ok_or_else(|| err!(libc::EBADF, "no open file {fh}"))
    }

    pub(crate) async fn wb_open(
        &self,
        caller: Option<Caller>,
        id: u64,
        flags: i32,
    ) -> Result<Opened, FsError> {
        let (mut entry, mut replaced) = self.entry_for(id)?;
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            // Allowed by the open itself (the file may not be writable by path afterwards).
            self.truncate(&None, id, &entry, 0)?;
        }
        if entry.size() <= WHOLE_FILE && !entry.is_complete() {
            // Small files come whole at the first open: one round trip, then local reads.
            match self.fetch(id, &entry, 0, entry.size().max(1)).await {
                Err(e) if e.errno == libc::ESTALE => {
                    // The remote has another version than the tree knew: take its
                    // attributes, then its bytes.
                    drop(entry);
                    let applied = self.wb().map_or(0, |wb| wb.journal.applied());
                    self.adopt_remote(vec![id], applied).await;
                    (entry, _) = self.entry_for(id)?;
                    replaced = true;
                    self.fetch(id, &entry, 0, entry.size().max(1))
                        .await
                        .map_err(stale_is_eio)?;
                }
                other => other?,
            }
        }
        self.tree().opened(id)?;
        let writer = (flags & libc::O_ACCMODE != libc::O_RDONLY).then_some(caller);
        let fh = self.add_wb_file(WbFile { id, entry, writer });
        Ok(Opened {
            fh,
            keep_cache: !replaced,
        })
    }

    /// Local truncate (or extension) of node `id` to `size`, journaled.
    fn truncate(
        &self,
        caller: &Option<Caller>,
        id: u64,
        entry: &Entry,
        size: u64,
    ) -> Result<NodeAttr, FsError> {
        entry.pin();
        let order = self.order()?;
        entry.set_len(size)?;
        self.set_attrs_in(
            &order,
            caller,
            id,
            SetAttr {
                size: Some(size),
                ..SetAttr::default()
            },
        )
        .map(|(a, _)| a)
    }

    /// Applies `set` to node `id`'s attributes and journals it, under the order lock; with
    /// the record's seq and whether little was ahead of it ([`Core::change_seq`]).
    fn set_attrs_in(
        &self,
        order: &MutexGuard<'_, ()>,
        caller: &Option<Caller>,
        id: u64,
        set: SetAttr,
    ) -> Result<(NodeAttr, Option<(u64, bool)>), FsError> {
        self.change_in(order, |t| {
            let mut a = t.attr(id)?.clone();
            let may_set_times = caller.as_ref().is_none_or(|c| c.uid == 0 || c.uid == a.uid);
            let ts = now();
            let resolve = |s: SetTime| match s {
                SetTime::Now => ts,
                SetTime::At(t) => t,
            };
            if let Some(mode) = set.mode {
                a.mode = (a.mode & libc::S_IFMT) | (mode & 0o7777);
            }
            if let Some(uid) = set.uid {
                a.uid = uid;
            }
            if let Some(gid) = set.gid {
                a.gid = gid;
            }
            if let Some(size) = set.size {
                if a.is_dir() {
                    return Err(err!(libc::EISDIR, "cannot truncate a directory"));
                }
                a.size = size;
                a.blocks = blocks_for(size);
                a.mtime = ts;
            }
            let atime = set.atime.map(resolve);
            let mtime = set.mtime.map(resolve);
            if let Some(t) = atime {
                a.atime = t;
            }
            if let Some(t) = mtime {
                a.mtime = t;
            }
            a.ctime = ts;
            t.update_attr(id, &a, None, &mut Effects::default());
            // The remote gets the very times used here; but only the owner (or root) may set
            // explicit times, while "now" needs only write access: a non-owner's "now" stays
            // "now".
            let explicit = |s: Option<SetTime>, t: Option<Timespec>| match (s, t) {
                (Some(SetTime::Now), _) if !may_set_times => Some(SetTime::Now),
                (_, t) => t.map(SetTime::At),
            };
            let sent = SetAttr {
                atime: explicit(set.atime, atime),
                mtime: explicit(set.mtime, mtime),
                ..set
            };
            let change = t.path(id).ok().map(|path| Change {
                op: Op::SetAttr {
                    node: NodeRef::Path(path),
                    set: sent,
                },
                caller: caller.clone(),
                nodes: vec![id],
            });
            Ok((NodeAttr::from_remote(id, &a), change))
        })
    }

    pub(crate) async fn wb_setattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> Result<NodeAttr, FsError> {
        self.throttle().await;
        let mut caller = caller;
        let only_size = |size| {
            set == SetAttr {
                size: Some(size),
                ..SetAttr::default()
            }
        };
        // `open(O_TRUNC)`: the kernel opens (without O_TRUNC, as FUSE_ATOMIC_O_TRUNC is off),
        // then truncates by path, no handle. Done as that open's, like an `ftruncate`, so the
        // save (truncate and writes, one caller) coalesces into one PutFile.
        let fh = fh.or_else(|| {
            only_size(0)
                .then(|| self.wb().and_then(|wb| wb.writer_of(id, &caller)))
                .flatten()
        });
        let (attr, seq) = if let Some(size) = set.size {
            let file = fh
                .and_then(|fh| self.wb_file(fh).ok())
                .filter(|f| f.id == id);
            let entry = match file {
                Some(f) => {
                    // `ftruncate`: the handle's open allowed it, whatever the file's mode says
                    // now; the agent applies it as itself (the journal names paths).
                    if only_size(size) {
                        caller = None;
                    }
                    f.entry
                }
                None => self.entry_for(id)?.0,
            };
            entry.pin();
            let order = self.order()?;
            entry.set_len(size)?;
            self.set_attrs_in(&order, &caller, id, set)?
        } else {
            let order = self.order()?;
            self.set_attrs_in(&order, &caller, id, set)?
        };
        self.settle_when_idle(id, seq).await;
        Ok(self
            .tree()
            .lock()
            .attr(id)
            .map_or(attr, |a| NodeAttr::from_remote(id, a)))
    }

    /// When `seq` (the record of a change to node `id`) had little ahead of it in the
    /// journal ([`SYNC_BACKLOG`]) and the agent is there, waits (briefly) for the remote to apply it, so that the node shows
    /// the remote's attributes (its ctime above all) from the start rather than changing
    /// them a moment later.
    async fn settle_when_idle(&self, id: u64, seq: Option<(u64, bool)>) {
        let Some(wb) = self.wb() else { return };
        let Some((seq, true)) = seq else { return };
        if self.tree().lock().is_open(id) {
            // The sender holds back the records of a file open here (a save in progress:
            // the kernel's truncate of an O_TRUNC open, then the writes) to send it whole;
            // waiting for this one would stall the save until that hold gives up.
            return;
        }
        if !self.client().is_connected() || wb.journal.commit().is_err() {
            return;
        }
        let wait = self.remote_timeout().min(SYNC_WAIT_MAX);
        let path = self.tree().path(id).ok();
        let _ = tokio::time::timeout(wait, self.wait_applied_for(seq, path.as_ref())).await;
    }

    /// `_caller`: the journal applies it as the agent (the handle's open allowed it).
    pub(crate) async fn wb_write(
        &self,
        _caller: Option<Caller>,
        fh: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u32, FsError> {
        self.throttle().await;
        let f = self.wb_file(fh)?;
        let len = u32::try_from(data.len()).map_err(|_| err!(libc::EFBIG, "write too large"))?;
        let end = offset + u64::from(len);
        f.entry.pin();
        let order = self.order()?;
        f.entry.write_local(offset, &data)?;
        self.change_in(&order, |t| {
            let mut a = t.attr(f.id)?.clone();
            let ts = now();
            a.size = a.size.max(end);
            a.blocks = blocks_for(a.size);
            a.mtime = ts;
            a.ctime = ts;
            t.update_attr(f.id, &a, None, &mut Effects::default());
            // An unlinked file's bytes reach nobody remotely.
            let change = t.path(f.id).ok().map(|path| Change {
                op: Op::WritePath { path, offset, data },
                // Allowed by the handle's open, whatever the file's mode says now (a file made
                // read-only and written through the handle that made it): the agent applies
                // it as itself, since the journal names paths, not handles.
                caller: None,
                nodes: vec![f.id],
            });
            Ok((len, change))
        })
        .map(|(v, _)| v)
    }

    /// `_caller`: the journal applies it as the agent (the handle's open allowed it).
    pub(crate) async fn wb_fallocate(
        &self,
        _caller: Option<Caller>,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Result<(), FsError> {
        self.throttle().await;
        let f = self.wb_file(fh)?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        if mode & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) != 0 {
            return Err(err!(libc::EOPNOTSUPP, "fallocate mode {mode:#x}"));
        }
        let end = offset.saturating_add(len);
        f.entry.pin();
        if punch {
            // Make sure the bytes around the hole are here before zeroing it.
            self.fetch(f.id, &f.entry, offset, len)
                .await
                .map_err(stale_is_eio)?;
        }
        let order = self.order()?;
        if punch {
            let zeros = vec![0u8; len.min(f.entry.size().saturating_sub(offset)) as usize];
            f.entry.write_local(offset, &zeros)?;
        } else if !keep_size && end > f.entry.size() {
            f.entry.set_len(end)?;
        }
        self.change_in(&order, |t| {
            let mut a = t.attr(f.id)?.clone();
            let ts = now();
            if !keep_size && !punch {
                a.size = a.size.max(end);
            }
            a.blocks = a.blocks.max(blocks_for(end.min(a.size.max(end))));
            a.ctime = ts;
            if !keep_size && !punch {
                a.mtime = ts;
            }
            t.update_attr(f.id, &a, None, &mut Effects::default());
            let change = t.path(f.id).ok().map(|path| Change {
                op: Op::FallocatePath {
                    path,
                    mode,
                    offset,
                    len,
                },
                // Allowed by the handle's open (see `wb_write`).
                caller: None,
                nodes: vec![f.id],
            });
            Ok(((), change))
        })
        .map(|_| ())
    }

    pub(crate) async fn wb_read(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let f = self.follow_remote(fh)?;
        let len = u64::from(size);
        if !f.entry.missing(offset, len).is_empty() {
            self.fetch(f.id, &f.entry, offset, len)
                .await
                .map_err(stale_is_eio)?;
            // Read ahead for a sequential reader.
            let ahead = offset + len;
            if ahead < f.entry.size() && !f.entry.missing(ahead, READ_AHEAD * CHUNK).is_empty() {
                let core = self.me();
                let entry = f.entry.clone();
                let id = f.id;
                tokio::spawn(async move {
                    if let Some(core) = core
                        && let Err(e) = core.fetch(id, &entry, ahead, READ_AHEAD * CHUNK).await
                    {
                        tracing::debug!("read-ahead failed: {e}");
                    }
                });
            }
        }
        Ok(f.entry.read(offset, len)?)
    }

    /// Handle `fh`, reading the file's current remote version: a file changed remotely since
    /// it was opened (and with no local change of its own) is read anew, as a handle on a
    /// local disk sees a rewrite in place.
    fn follow_remote(&self, fh: u64) -> Result<WbFile, FsError> {
        let wb = self.wb().expect("write-back mode");
        let f = self.wb_file(fh)?;
        if f.entry.has_local_changes() || wb.pending_seq(f.id).is_some() {
            return Ok(f);
        }
        let now = {
            let t = self.tree().lock();
            match (t.remote_of(f.id), t.attr(f.id)) {
                (Some(r), Ok(a)) if r.0 != LOCAL_DEV && wb.content_key(r) == f.entry.key() => {
                    Validity::of(a)
                }
                _ => return Ok(f),
            }
        };
        if f.entry.validity() == now {
            return Ok(f);
        }
        let (entry, _) = self.entry_for(f.id)?;
        let fresh = WbFile { entry, ..f.clone() };
        if let Some(slot) = lock(&wb.files).get_mut(&fh) {
            *slot = fresh.clone();
        }
        Ok(fresh)
    }

    /// Makes the regular file at `path` again in the target, with the whole content it has
    /// here (the target removed it while changes to it were still in the journal). Only for a
    /// file whose bytes are all here, and small enough for one message.
    pub(crate) async fn wb_recreate(&self, path: &RelPath) -> Result<(), FsError> {
        let (id, attr) = {
            let t = self.tree().lock();
            let id = t
                .resolve(path)
                .ok_or_else(|| err!(libc::ENOENT, "{path} is gone here too"))?;
            (id, t.attr(id)?.clone())
        };
        if attr.mode & libc::S_IFMT != libc::S_IFREG {
            return Err(err!(libc::EINVAL, "{path} is not a regular file"));
        }
        if attr.size > u64::from(kmount_proto::MAX_IO_LEN) {
            return Err(err!(libc::EFBIG, "{path} is too big to send in one piece"));
        }
        let (entry, _) = self.entry_for(id)?;
        if !entry.is_complete() {
            return Err(err!(libc::ENODATA, "not all of {path} is here"));
        }
        let data = entry
            .read(0, entry.size())
            .map_err(|e| err!(libc::EIO, "cannot read the cached {path}: {e}"))?;
        let made = self.put(&None, path, data, &attr, true).await?;
        // The node is that new file there now: the records still to come change it, and
        // their answers (with its identity) settle the node as usual.
        let wb = self.wb().expect("write-back mode");
        let _order = lock(&wb.order);
        self.rebind_remote(id, &made);
        Ok(())
    }

    /// Node `id` is the remote node `attr` now (made by an applied record): the tree and the
    /// content cache key follow.
    fn rebind_remote(&self, id: u64, attr: &Attr) {
        let wb = self.wb().expect("write-back mode");
        let old = self.tree().remote_of(id);
        if let Some(old) = old.filter(|o| *o != (attr.dev, attr.ino)) {
            self.tree().lock().rebind(id, attr);
            if let Err(e) = wb
                .cache
                .rekey(&wb.content_key(old), wb.content_key((attr.dev, attr.ino)))
            {
                tracing::debug!("cannot rename a cache entry: {e}");
            }
        }
    }

    /// Makes `offset..offset+len` of node `id`'s cached bytes present, fetching the missing
    /// chunks by path (up to [`FETCHES_PER_FILE`] at once; a chunk another reader is already
    /// fetching is waited for).
    pub(crate) async fn fetch(
        &self,
        id: u64,
        entry: &Entry,
        offset: u64,
        len: u64,
    ) -> Result<(), FsError> {
        let wb = self.wb().expect("write-back mode");
        let missing = entry.missing(offset, len);
        if missing.is_empty() {
            return Ok(());
        }
        // The remote file at this path must be the one cached: let pending renames, creates
        // and writes of it land first.
        let path = self.tree().path(id)?;
        if wb.journal.covers_after(&path, 0) {
            let tail = wb.journal.tail();
            wb.journal.commit()?;
            self.wait_applied_for(tail, Some(&path)).await?;
        }
        let path = self.tree().path(id)?;
        let local = entry.has_local_changes();
        let key = entry.key();
        let mut set = tokio::task::JoinSet::new();
        let mut waits = Vec::new();
        for range in missing {
            let slot_key = (key.clone(), range.start);
            let existing = lock(&wb.fetches).get(&slot_key).cloned();
            if let Some(rx) = existing {
                waits.push(rx);
                continue;
            }
            let (tx, rx) = watch::channel(None);
            lock(&wb.fetches).insert(slot_key.clone(), rx);
            let (client, entry, path) = (self.client().clone(), entry.clone(), path.clone());
            let validity = entry.validity();
            set.spawn(async move {
                let r = fetch_range(&client, &entry, &path, range, validity, local).await;
                let _ = tx.send(Some(r.clone()));
                (slot_key, r)
            });
            while set.len() >= FETCHES_PER_FILE {
                if let Some(Ok((k, r))) = set.join_next().await {
                    lock(&wb.fetches).remove(&k);
                    self.fetched(id, r)?;
                }
            }
        }
        while let Some(joined) = set.join_next().await {
            let Ok((k, r)) = joined else {
                return Err(err!(libc::EIO, "a fetch task failed"));
            };
            lock(&wb.fetches).remove(&k);
            self.fetched(id, r)?;
        }
        for mut rx in waits {
            let r = rx
                .wait_for(Option::is_some)
                .await
                .map(|r| r.clone().unwrap_or(Ok(())))
                .unwrap_or_else(|_| Err(err!(libc::EIO, "a fetch was abandoned")));
            self.fetched(id, r)?;
        }
        Ok(())
    }

    /// The outcome of one chunk fetch: `ESTALE` when the remote has another version than the
    /// cached one.
    fn fetched(&self, id: u64, r: Result<(), FsError>) -> Result<(), FsError> {
        if let Err(e) = &r
            && e.errno == libc::ESTALE
        {
            tracing::debug!(id, "the remote has another version: {e}");
        }
        r
    }

    pub(crate) async fn wb_flush(&self, fh: u64) -> Result<(), FsError> {
        let wb = self.wb().expect("write-back mode");
        let f = self.wb_file(fh)?;
        if wb.pending_seq(f.id).is_some() {
            wb.journal.commit()?;
        }
        Ok(())
    }

    pub(crate) async fn wb_release(&self, id: u64, fh: u64) -> Result<(), FsError> {
        let wb = self.wb().expect("write-back mode");
        let f = lock(&wb.files).remove(&fh);
        self.tree().closed(id);
        wb.closed.notify_one();
        if let Some(f) = f
            && let Err(e) = f.entry.flush()
        {
            tracing::debug!("cannot write a cache sidecar: {e}");
        }
        Ok(())
    }

    pub(crate) async fn wb_fsync(
        &self,
        caller: Option<Caller>,
        fh: u64,
        datasync: bool,
    ) -> Result<(), FsError> {
        let wb = self.wb().expect("write-back mode");
        let f = self.wb_file(fh)?;
        wb.journal.commit()?;
        let path = self.tree().path(f.id).ok();
        if let Some(seq) = wb.pending_seq(f.id) {
            self.wait_applied_for(seq, path.as_ref()).await?;
        }
        let Some(path) = path else {
            return Ok(());
        };
        match self
            .client()
            .call(Op::FsyncPath { path, datasync }, caller)
            .await?
        {
            Done::Ok => Ok(()),
            other => Err(err!(
                libc::EIO,
                "the agent answered FsyncPath with {other:?}"
            )),
        }
    }

    /// Waits until every record up to `seq` is applied. When the sender is stuck on a record
    /// (at or before `seq`) that the remote refuses, its errno is returned once it has been
    /// stuck for the remote timeout, or at once when it names `path`.
    pub(crate) async fn wait_applied_for(
        &self,
        seq: u64,
        path: Option<&RelPath>,
    ) -> Result<(), FsError> {
        let wb = self.wb().expect("write-back mode");
        // The sender holds back nothing while someone waits (records of a file still open
        // would otherwise wait for it to close, up to its hold time: an fsync took 2 s).
        let _waiting = wb.journal.waiting();
        let mut applied = wb.journal.watch_applied();
        let started = std::time::Instant::now();
        // The refusal of our own record seen first: the sender is asked to try it again at
        // once, and the answer to that try is the one returned (the cause may be gone: space
        // freed, the filesystem writable again).
        let mut retried: Option<SystemTime> = None;
        loop {
            if *applied.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(b) = wb.blocked()
                && b.seq.is_none_or(|s| s <= seq)
            {
                let ours = path.is_some_and(|p| b.path.as_ref() == Some(p));
                let timed_out = started.elapsed() >= self.remote_timeout();
                if ours && !timed_out {
                    match retried {
                        None => {
                            retried = Some(b.at);
                            wb.retry_now();
                        }
                        Some(at) if b.at > at => return Err(FsError::new(b.errno, b.message)),
                        Some(_) => {}
                    }
                } else if ours || timed_out {
                    return Err(FsError::new(b.errno, b.message));
                }
            }
            if !self.client().is_connected() && started.elapsed() >= self.remote_timeout() {
                return Err(err!(
                    libc::EIO,
                    "the agent is unreachable; the change is kept in the local journal and \
                     will be sent when it comes back"
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), applied.changed()).await;
        }
    }

    /// The remote's bytes at an explicit position are needed (`SEEK_DATA`/`SEEK_HOLE`): the
    /// file's changes land first, then the agent answers for the file itself.
    pub(crate) async fn wb_lseek(
        &self,
        caller: Option<Caller>,
        fh: u64,
        offset: u64,
        whence: i32,
    ) -> Result<i64, FsError> {
        let wb = self.wb().expect("write-back mode");
        let f = self.wb_file(fh)?;
        let size = f.entry.size();
        if offset >= size {
            return Err(err!(libc::ENXIO, "offset {offset} is at or past the end"));
        }
        let path = self.tree().path(f.id)?;
        wb.journal.commit()?;
        if let Some(seq) = wb.pending_seq(f.id) {
            self.wait_applied_for(seq, Some(&path)).await?;
        }
        let client = self.client();
        let (done, generation) = client
            .call_gen(
                Op::Open {
                    path,
                    flags: libc::O_RDONLY,
                },
                caller.clone(),
            )
            .await?;
        let Done::Opened { handle, .. } = done else {
            return Err(err!(libc::EIO, "the agent answered Open with {done:?}"));
        };
        let r = client
            .call_in(
                generation,
                Op::Lseek {
                    handle,
                    offset,
                    whence,
                },
                caller,
            )
            .await;
        let _ = client.call_in(generation, Op::Close { handle }, None).await;
        match r? {
            Done::Offset(o) => i64::try_from(o).map_err(|_| err!(libc::EOVERFLOW, "offset {o}")),
            other => Err(err!(libc::EIO, "the agent answered Lseek with {other:?}")),
        }
    }

    /// Extended attributes live on the remote only: changes go through the journal, reads
    /// wait for the node's changes to land first.
    pub(crate) async fn wb_setxattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        op: impl FnOnce(NodeRef) -> Op,
    ) -> Result<(), FsError> {
        self.throttle().await;
        self.wb_xattrs_changed(id);
        let ((), seq) = self.change_seq(|t| {
            let path = t.path(id)?;
            let mut a = t.attr(id)?.clone();
            a.ctime = now();
            t.update_attr(id, &a, None, &mut Effects::default());
            Ok((
                (),
                Some(Change {
                    op: op(NodeRef::Path(path)),
                    caller: caller.clone(),
                    nodes: vec![id],
                }),
            ))
        })?;
        // Whether it succeeds depends on the remote's attributes (XATTR_CREATE, XATTR_REPLACE,
        // removing a missing one), which live there only: it is waited for, and a refusal
        // (which the sender passes over) is the caller's error.
        let Some((seq, _)) = seq else { return Ok(()) };
        let wb = self.wb().expect("write-back mode");
        if !self.client().is_connected() {
            return Ok(());
        }
        wb.journal.commit()?;
        let path = self.tree().path(id).ok();
        let wait = self.remote_timeout();
        match tokio::time::timeout(wait, self.wait_applied_for(seq, path.as_ref())).await {
            Ok(Err(e)) => Err(e),
            _ => match wb.recent_errors().into_iter().find(|e| e.seq == Some(seq)) {
                Some(e) => Err(FsError::new(e.errno, e.message)),
                None => Ok(()),
            },
        }
    }

    /// `getxattr(security.capability)`, which the kernel asks before every write, answered
    /// without waiting for the file's pending changes when it is known to have none.
    pub(crate) fn wb_no_caps(&self, id: u64, name: &[u8]) -> bool {
        let Some(wb) = self.wb() else { return false };
        if name != b"security.capability" {
            return false;
        }
        let local = self.tree().remote_of(id).is_some_and(|r| r.0 == LOCAL_DEV);
        local || lock(&wb.no_caps).contains(&id)
    }

    /// Records what a `getxattr(security.capability)` of the remote found.
    pub(crate) fn wb_caps_seen(&self, id: u64, name: &[u8], none: bool) {
        let Some(wb) = self.wb() else { return };
        if name == b"security.capability" {
            if none {
                lock(&wb.no_caps).insert(id);
            } else {
                lock(&wb.no_caps).remove(&id);
            }
        }
    }

    /// Forgets what is known about node `id`'s extended attributes.
    pub(crate) fn wb_xattrs_changed(&self, id: u64) {
        if let Some(wb) = self.wb() {
            lock(&wb.no_caps).remove(&id);
        }
    }

    /// Waits until the records that make, name or describe `id` are applied (not those of
    /// its bytes): xattrs do not depend on the bytes, and an editor's getxattr in the middle
    /// of a save must not wait for the save's writes, which the sender holds back while the
    /// file is open.
    pub(crate) async fn wb_settle_name(&self, id: u64) -> Result<(), FsError> {
        let wb = self.wb().expect("write-back mode");
        self.settle_up_to(id, wb.pending_meta_seq(id)).await
    }

    async fn settle_up_to(&self, id: u64, seq: Option<u64>) -> Result<(), FsError> {
        let wb = self.wb().expect("write-back mode");
        if let Some(seq) = seq {
            wb.journal.commit()?;
            let path = self.tree().path(id).ok();
            self.wait_applied_for(seq, path.as_ref()).await?;
        }
        Ok(())
    }

    /// `access(2)` against the tree's attributes, as the kernel's `generic_permission` does.
    pub(crate) fn wb_access(
        &self,
        caller: &Option<Caller>,
        id: u64,
        mask: i32,
    ) -> Result<(), FsError> {
        let t = self.tree().lock();
        let a = t.attr(id)?;
        let Some(c) = caller else {
            // Without identity, the agent's user is the one that counts; it owns the tree.
            return Ok(());
        };
        let mask = mask as u32 & 7;
        if mask == 0 {
            return Ok(());
        }
        let perm = if c.uid == 0 {
            // root: read and write always, execute when anyone may
            let x = a.mode & 0o111 != 0 || a.is_dir();
            if mask & 1 != 0 && !x { 0 } else { 7 }
        } else if c.uid == a.uid {
            (a.mode >> 6) & 7
        } else if c.gid == a.gid || c.groups.contains(&a.gid) {
            (a.mode >> 3) & 7
        } else {
            a.mode & 7
        };
        if perm & mask == mask {
            Ok(())
        } else {
            Err(err!(libc::EACCES, "permission denied"))
        }
    }
}

/// A remote version other than the cached one, found while reading: the reader gets `EIO`.
fn stale_is_eio(e: FsError) -> FsError {
    if e.errno == libc::ESTALE {
        err!(
            libc::EIO,
            "the file changed on the remote while it was read; read it again ({})",
            e.message
        )
    } else {
        e
    }
}

fn check_dir(t: &TreeState, dir: u64) -> Result<(), FsError> {
    if !t.contains(dir) {
        return Err(err!(libc::ESTALE, "directory {dir} is not known"));
    }
    if !t.is_dir(dir) {
        return Err(err!(libc::ENOTDIR, "not a directory"));
    }
    if !t.is_linked(dir) {
        return Err(err!(libc::ENOENT, "the directory was removed"));
    }
    Ok(())
}

/// Fetches `range` of the file at `path` into `entry`. `ESTALE` when the remote file is
/// another version than the entry's (a clean entry only: one with local changes takes the
/// remote's bytes only where it has none of its own, which are the same in both versions).
async fn fetch_range(
    client: &crate::client::Client,
    entry: &Entry,
    path: &RelPath,
    range: std::ops::Range<u64>,
    validity: Validity,
    local: bool,
) -> Result<(), FsError> {
    let len = u32::try_from(range.end - range.start).unwrap_or(u32::MAX);
    let done = client
        .call(
            Op::ReadPath {
                path: path.clone(),
                offset: range.start,
                len,
            },
            None,
        )
        .await?;
    let Done::Content {
        attr,
        data,
        compressed,
    } = done
    else {
        return Err(err!(libc::EIO, "the agent answered ReadPath with {done:?}"));
    };
    if !local && Validity::of(&attr) != validity {
        return Err(err!(
            libc::ESTALE,
            "{path} changed remotely (size {} -> {})",
            validity.size,
            attr.size
        ));
    }
    let data = if compressed {
        kmount_proto::tree::decompress(&data, len as usize)
            .map_err(|e| err!(libc::EIO, "a compressed read of {path} is malformed: {e}"))?
    } else {
        data
    };
    entry.write_fetched(range.start, &data)?;
    Ok(())
}

impl Core {
    /// Looks again at the paths whose remote changes were left out while local records of
    /// them were pending, once none is (called after records count as applied).
    pub(crate) async fn look_again_left_out(&self) {
        let Some(wb) = self.wb() else { return };
        let due = wb.left_out_due();
        if !due.is_empty() {
            tracing::debug!(
                ?due,
                "looking again at remote changes left out while pending"
            );
            crate::remote::rescan_all(self, due).await;
        }
    }

    /// Records `first..=seq` are applied remotely (`reply`: the answer to the batch, the
    /// session it came from, and the watcher stamp when it was sent). Handles a journaled
    /// create left open are closed; nodes made here take their remote identity; nodes with no
    /// later pending change take the remote's attributes, and their cached bytes become those
    /// of that remote version.
    pub(crate) async fn settle(&self, first: u64, seq: u64, reply: Option<(&Op, Done, u64, u64)>) {
        let Some(wb) = self.wb() else { return };
        // The reply's attributes, with the watcher stamp when the batch was sent.
        let mut remote_attr = None;
        if let Some((op, done, generation, sent)) = reply {
            match done {
                Done::Opened { handle, attr } => {
                    let client = self.client().clone();
                    tokio::spawn(async move {
                        let _ = client.call_in(generation, Op::Close { handle }, None).await;
                    });
                    remote_attr = Some((attr, sent));
                }
                // The attributes of the node the operation made or changed (a rename or an
                // unlink answers Ok).
                Done::Attr(attr) if !matches!(op, Op::Rename { .. }) => {
                    remote_attr = Some((attr, sent));
                }
                _ => {}
            }
        }
        let nodes = wb.take_settled(first, seq);
        {
            // Applied there now: a listing taken or an event judged while these records were
            // on their way predates them (a name made here, not yet there, would be removed
            // from the view), so the nodes count as changed now.
            let now = self.next_mutation();
            let mut t = self.tree().lock();
            for &(id, _) in &nodes {
                t.mark_touched(id, now);
            }
        }
        let settled: Vec<u64> = nodes.iter().filter(|(_, l)| *l).map(|(n, _)| *n).collect();
        let mut fx = Effects::default();
        let mut refresh = Vec::new();
        for (id, last) in nodes {
            // The reply's attributes are those of the node the operation made or changed: one
            // made here (not on the remote yet) or the same remote node. Others (the parent
            // directories) are fetched.
            let subject = remote_attr.as_ref().filter(|(a, _)| {
                self.tree()
                    .remote_of(id)
                    .is_some_and(|r| r.0 == LOCAL_DEV || r == (a.dev, a.ino))
            });
            match subject {
                Some((attr, asked)) => {
                    self.rebind_remote(id, attr);
                    if last {
                        self.adopt(id, attr, seq, *asked, &mut fx);
                    }
                }
                None if last => refresh.push(id),
                None => {}
            }
        }
        self.invalidator().send(std::mem::take(&mut fx.inval));
        refresh.extend(lock(&wb.deferred).drain());
        if !refresh.is_empty() {
            self.adopt_remote(refresh, seq).await;
        }
        wb.release_settled(settled, seq);
    }

    /// Takes the remote's attributes for `id` when no change of it after `seq` (applied) is
    /// journaled. Under the order lock: a local change cannot come between the check and the
    /// update (its bytes are in the cache before its record is journaled, under that lock).
    ///
    /// `asked`: the watcher stamp ([`TreeState::heard_seq`]) when `attr` was asked for. What
    /// a watcher event applied since said about the same remote file, if not older
    /// ([`TreeState::heard_newer`]: a rename or a chmod there right after our change, its
    /// event applied before the sender got to the change's reply), stays in the tree; the
    /// cached bytes still take `attr`'s version, which is theirs.
    fn adopt(&self, id: u64, attr: &Attr, seq: u64, asked: u64, fx: &mut Effects) {
        let Some(wb) = self.wb() else { return };
        let _order = lock(&wb.order);
        if wb.changed_after(id, seq) {
            return;
        }
        let key = wb.content_key((attr.dev, attr.ino));
        if self.tree().remote_of(id) != Some((attr.dev, attr.ino)) {
            return;
        }
        tracing::debug!(id, seq, size = attr.size, mtime = ?attr.mtime, "adopting remote attributes");
        if let Some(entry) = wb.cache.lookup(&key) {
            if entry.size() == attr.size {
                entry.set_validity(Validity::of(attr));
                entry.unpin();
            } else {
                // Not the bytes the remote has: fetched again when needed.
                drop(entry);
                wb.cache.remove(&key);
            }
        }
        let mut t = self.tree().lock();
        if t.heard_newer(id, attr, asked) {
            tracing::debug!(
                id,
                seq,
                "a watcher event since is newer; keeping its attributes"
            );
            return;
        }
        let symlink = t.symlink(id).map(<[u8]>::to_vec);
        t.update_attr(id, attr, symlink, fx);
    }

    /// Fetches the attributes of `ids` by path and adopts them. A node whose path (or a
    /// directory above it) is still being changed on the remote by a record after `settled`
    /// (records up to it are applied) waits for that record.
    async fn adopt_remote(&self, ids: Vec<u64>, settled: u64) {
        let Some(wb) = self.wb() else { return };
        let asked = self.heard_seq();
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let Ok(path) = self.tree().path(id) else {
                continue;
            };
            if wb.journal.covers_after(&path, settled) {
                lock(&wb.deferred).insert(id);
                continue;
            }
            let client = self.client().clone();
            set.spawn(async move {
                let r = client
                    .call(
                        Op::GetAttr {
                            node: NodeRef::Path(path),
                        },
                        None,
                    )
                    .await;
                (id, r)
            });
        }
        let mut fx = Effects::default();
        while let Some(joined) = set.join_next().await {
            if let Ok((id, Ok(Done::Attr(attr)))) = joined {
                // A node made here whose record was applied without its answer reaching us
                // (the agent was killed after applying it, and said so on reconnecting) has
                // no remote identity yet: the node at its path is the one the record made.
                // Unbound, the next listing took that node for another one and replaced
                // this one, with the names made in it.
                let made_here = {
                    let t = self.tree().lock();
                    t.remote_of(id).is_some_and(|r| r.0 == LOCAL_DEV)
                        && t.attr(id).is_ok_and(|a| a.file_type() == attr.file_type())
                };
                if made_here {
                    self.rebind_remote(id, &attr);
                }
                self.adopt(id, &attr, settled, asked, &mut fx);
            }
        }
        self.invalidator().send(fx.inval);
    }
}
