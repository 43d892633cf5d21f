//! The filesystem, free of FUSE: one async function per operation, answering with plain values
//! or an [`FsError`] carrying the errno for the kernel.
//!
//! Node ids are the kernel's (see [`crate::tree`]). With a whole tree (an agent that walks and
//! watches), names, attributes, listings and symlink targets are answered from the tree with no
//! round trip; otherwise every request goes to the agent (pass-through). File and directory
//! handles given to the kernel are ours: a file handle maps to the agent's handle, a directory
//! handle holds a snapshot of the listing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use kmount_proto::{
    Attr, Caller, DirEntry, Done, MAX_IO_LEN, NodeRef, Op, RelPath, SetAttr, Statfs, Timespec,
    features,
};

use crate::client::{Client, op_name};
use crate::err;
use crate::error::FsError;
use crate::invalidate::Invalidator;
use crate::local::{PendingSet, WriteBack};
use crate::remote::SyncStats;
use crate::tree::{Change, Effects, Listed, ROOT_ID, Tree};

/// Entries asked of the agent per `ReadDir`.
const READDIR_BATCH: u32 = 1024;

/// Attributes as the kernel gets them: the remote's own values, with the node id as `ino`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAttr {
    /// The FUSE node id (the remote `st_ino` unless that was ambiguous).
    pub ino: u64,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number in the kernel's 32-bit encoding (`new_encode_dev`), as FUSE carries it.
    pub rdev: u32,
    pub blksize: u32,
}

impl NodeAttr {
    /// The attributes of node `ino`. The root's node id is fixed at 1, but `stat` shows the
    /// remote root's own inode number (the kernel takes `st_ino` from the attributes, and
    /// the root never appears in an entry reply, where fuser makes the two one).
    pub fn from_remote(ino: u64, a: &Attr) -> Self {
        Self {
            ino: if ino == ROOT_ID { a.ino } else { ino },
            size: a.size,
            blocks: a.blocks,
            atime: system_time(a.atime),
            mtime: system_time(a.mtime),
            ctime: system_time(a.ctime),
            mode: a.mode,
            nlink: u32::try_from(a.nlink).unwrap_or(u32::MAX),
            uid: a.uid,
            gid: a.gid,
            rdev: kernel_dev(a.rdev),
            blksize: a.blksize,
        }
    }

    /// `S_IFMT` bits.
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    /// Permission bits (`0o7777`).
    pub fn perm(&self) -> u16 {
        (self.mode & 0o7777) as u16
    }

    /// Attributes of `.` and `..` in a readdirplus reply; the kernel takes only the node id
    /// from those entries.
    fn placeholder_dir(ino: u64) -> Self {
        Self {
            ino,
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            mode: libc::S_IFDIR | 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
        }
    }
}

/// Exact conversion, including times before the epoch.
pub fn system_time(t: Timespec) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(t.nsec.min(999_999_999)));
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.sec as u64) + nsec
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + nsec
    }
}

/// The inverse of [`system_time`].
pub fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nsec: d.subsec_nanos(),
        },
        Err(before) => {
            let d = before.duration();
            let sec = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() == 0 {
                Timespec { sec, nsec: 0 }
            } else {
                Timespec {
                    sec: sec - 1,
                    nsec: 1_000_000_000 - d.subsec_nanos(),
                }
            }
        }
    }
}

/// glibc `dev_t` (as `st_rdev` holds it) to the kernel's 32-bit `new_encode_dev` form.
pub fn kernel_dev(dev: u64) -> u32 {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    ((minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)) as u32
}

/// The kernel's 32-bit device number (as FUSE mknod carries it) to a glibc `dev_t`.
pub fn user_dev(dev: u32) -> u64 {
    let dev = u64::from(dev);
    let major = (dev >> 8) & 0xfff;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
}

/// Answer to getxattr/listxattr, following the size protocol of `getxattr(2)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Xattr {
    /// The caller asked for the size only (size 0).
    Size(u32),
    Data(Vec<u8>),
}

/// A created and opened file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Created {
    pub attr: NodeAttr,
    pub fh: u64,
}

/// One directory entry as handed to the kernel. `offset` is the offset of the next entry.
#[derive(Debug, Clone, Copy)]
pub struct DirItem<'a> {
    pub ino: u64,
    pub offset: u64,
    /// `S_IFMT` bits.
    pub kind: u32,
    pub name: &'a [u8],
    /// Set for readdirplus.
    pub attr: Option<NodeAttr>,
}

/// An open regular file: the agent's handle on it.
#[derive(Debug, Clone)]
struct OpenFile {
    id: u64,
    handle: u64,
    /// The agent session the handle belongs to.
    generation: u64,
    /// As opened, to open it again on a new session.
    flags: i32,
    caller: Option<Caller>,
    /// Opened for writing on a version of the file the tree did not have (changed in the
    /// target, unseen here): its attributes. A save's truncation through this open keeps that
    /// version as a conflict copy first ([`crate::local_ops`]).
    unseen: Option<Attr>,
}

#[derive(Debug, Default)]
struct Files {
    /// Our file handle (the kernel's `fh`) -> the open file.
    by_fh: HashMap<u64, OpenFile>,
    /// Node id -> our file handles open on it, oldest first.
    by_node: HashMap<u64, Vec<u64>>,
}

/// A snapshot of a directory listing, served across readdir calls.
enum Listing {
    /// Read from the agent (pass-through mode).
    Remote(Vec<DirEntry>),
    /// Taken from the tree.
    Tree(Vec<Listed>),
}

impl Listing {
    fn len(&self) -> usize {
        match self {
            Listing::Remote(e) => e.len(),
            Listing::Tree(e) => e.len(),
        }
    }
}

struct DirState {
    id: u64,
    /// Open on the agent (handle, session) until the listing has been read (pass-through
    /// mode).
    agent_handle: Option<(u64, u64)>,
    listing: Option<Listing>,
    /// [`TreeState::heard_seq`] before the agent's handle was opened: the remote listing's
    /// attributes may predate watcher events applied since.
    asked: u64,
    /// A readdir was answered from `listing`; a later one at offset 0 is a rewind.
    served: bool,
}

/// An opened file, as the kernel gets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// The kernel may keep the pages it cached for this file: its contents did not change
    /// since they were cached.
    pub keep_cache: bool,
}

/// See the module documentation.
pub struct Core {
    pub(crate) client: Client,
    pub(crate) tree: Tree,
    identity: bool,
    /// The tree is complete and kept current by the agent's watcher: names and attributes
    /// are answered from it.
    whole_tree: bool,
    inval: Invalidator,
    dirs: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<DirState>>>>,
    files: Mutex<Files>,
    next_fh: AtomicU64,
    /// Sequence of local changes ([`crate::tree::TreeState::touch`]).
    /// Shared with the client, which stamps remote events with it.
    mutations: Arc<AtomicU64>,
    sync: Mutex<SyncStats>,
    /// Turns true when the mount ends; background tasks stop.
    shutdown: watch::Sender<bool>,
    /// Local-first changes and cached contents (an agent with a journal lane).
    pub(crate) write_back: Option<Arc<WriteBack>>,
    remote_timeout: Duration,
    this: OnceLock<Weak<Core>>,
    /// Nodes the ignore rules keep on this side (whole-tree mounts).
    pub(crate) local_only: Option<crate::local_only::LocalOnly>,
    /// Files changed on both sides (write-through), as `kmount status` shows them.
    pub(crate) conflicts: Mutex<Vec<crate::local::Conflict>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("identity", &self.identity)
            .field("whole_tree", &self.whole_tree)
            .finish_non_exhaustive()
    }
}

fn unexpected(op: &str, done: &Done) -> FsError {
    let what = match done {
        Done::Ok => "Ok",
        Done::Attr(_) => "Attr",
        Done::Handle(_) => "Handle",
        Done::Opened { .. } => "Opened",
        Done::Entries { .. } => "Entries",
        Done::Data(_) => "Data",
        Done::Written(_) => "Written",
        Done::Statfs(_) => "Statfs",
        Done::Offset(_) => "Offset",
        Done::Tree { .. } => "Tree",
        Done::Digests(_) => "Digests",
        Done::Seq(_) => "Seq",
        Done::Content { .. } => "Content",
        Done::Command { .. } => "Command",
    };
    err!(libc::EIO, "the agent answered {op} with {what}")
}

fn sized(value: Vec<u8>, size: u32) -> Result<Xattr, FsError> {
    let len = u32::try_from(value.len()).map_err(|_| err!(libc::E2BIG, "value too large"))?;
    if size == 0 {
        Ok(Xattr::Size(len))
    } else if len > size {
        Err(err!(libc::ERANGE, "value of {len} bytes, buffer of {size}"))
    } else {
        Ok(Xattr::Data(value))
    }
}

/// Supplementary groups of a process, from the `Groups:` line of `/proc/<pid>/status`.
pub fn process_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    parse_groups(&status)
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Checks a name the kernel hands us (length, no NUL) before it is looked up locally.
fn check_name(name: &[u8]) -> Result<(), FsError> {
    RelPath::root().join(name)?;
    Ok(())
}

impl Core {
    /// `tree` holds at least the root. `whole_tree`: the tree is complete and the agent's
    /// watcher keeps it current (names and attributes are answered locally). With `identity`,
    /// requests carry the caller's uid/gid/groups when the agent offered
    /// [`features::IDENTITY`].
    pub fn new(
        client: Client,
        tree: Tree,
        identity: bool,
        whole_tree: bool,
        inval: Invalidator,
        write_back: Option<WriteBack>,
        remote_timeout: Duration,
    ) -> Self {
        let identity = identity && client.features() & features::IDENTITY != 0;
        let mutations = client.local_clock();
        Self {
            client,
            tree,
            identity,
            whole_tree,
            inval,
            dirs: Mutex::new(HashMap::new()),
            files: Mutex::new(Files::default()),
            next_fh: AtomicU64::new(1),
            mutations,
            sync: Mutex::new(SyncStats::default()),
            shutdown: watch::channel(false).0,
            write_back: write_back.map(Arc::new),
            remote_timeout,
            this: OnceLock::new(),
            local_only: None,
            conflicts: Mutex::new(Vec::new()),
        }
    }

    /// Keeps what the ignore rules call excluded or local-only on this side, in `store`.
    pub fn set_local_only(&mut self, store: crate::local_only::LocalOnly) {
        self.local_only = Some(store);
    }

    /// Files open for writing through the mount now (write-back: every open file), local-only
    /// ones aside: a batch of changes is not over while one is.
    pub fn open_writers(&self) -> usize {
        let direct = self
            .files()
            .by_fh
            .values()
            .filter(|f| f.flags & libc::O_ACCMODE != libc::O_RDONLY)
            .count();
        direct + self.wb().map_or(0, WriteBack::open_files)
    }

    /// Files changed on both sides so far (write-through; write-back keeps its own).
    pub fn conflicts(&self) -> Vec<crate::local::Conflict> {
        self.conflicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wraps the core in an `Arc` that tasks it starts can hold on to.
    pub fn into_arc(self) -> Arc<Core> {
        let core = Arc::new(self);
        let _ = core.this.set(Arc::downgrade(&core));
        core
    }

    /// This core, for tasks that outlive a request.
    pub(crate) fn me(&self) -> Option<Arc<Core>> {
        self.this.get().and_then(Weak::upgrade)
    }

    /// How long a request that needs the remote waits for it.
    pub fn remote_timeout(&self) -> Duration {
        self.remote_timeout
    }

    /// The write-back state, when changes are local-first.
    pub fn write_back(&self) -> Option<&WriteBack> {
        self.wb()
    }

    pub(crate) fn alloc_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Ends background work: the invalidator is disarmed and tasks watching
    /// [`Core::shutdown_signal`] stop. Idempotent.
    pub fn shutdown(&self) {
        self.inval.disarm();
        self.shutdown.send_replace(true);
    }

    /// Turns true when the mount ends.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Updates the counters of the remote side.
    pub fn sync_stats<R>(&self, f: impl FnOnce(&mut SyncStats) -> R) -> R {
        f(&mut self.sync.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Paths whose remote changes were left out for pending local changes: kept to be looked
    /// at once those are applied; those no longer pending already are returned, to look at now.
    pub fn look_again_once_applied(&self, paths: Vec<RelPath>) -> Vec<RelPath> {
        match self.wb() {
            Some(wb) if !paths.is_empty() => wb.keep_left_out(paths),
            _ => Vec::new(),
        }
    }

    /// Remote files (st_dev, st_ino) whose cached contents no longer belong to them.
    pub fn note_stale_content(&self, keys: &[(u64, u64)]) {
        let Some(wb) = self.wb() else { return };
        for &key in keys {
            let key = wb.content_key(key);
            if let Some(entry) = wb.cache.lookup(&key)
                && !entry.has_local_changes()
            {
                drop(entry);
                wb.cache.remove(&key);
            }
        }
    }

    /// Whether `path` or a directory above it has local changes not yet applied remotely
    /// (write-back mode); [`Core::pending_set`] for one path, without copying every one.
    pub fn pending_covers(&self, path: &RelPath) -> bool {
        self.wb().is_some_and(|wb| wb.journal.covers_after(path, 0))
    }

    /// Paths with local changes not yet applied remotely (write-back mode).
    pub fn pending_set(&self) -> Option<PendingSet> {
        self.wb().map(WriteBack::pending_set)
    }

    /// The attributes of the served directory.
    pub async fn root_attr(client: &Client) -> Result<Attr, FsError> {
        let done = client
            .call(
                Op::GetAttr {
                    node: NodeRef::Path(RelPath::root()),
                },
                None,
            )
            .await?;
        match done {
            Done::Attr(a) => Ok(a),
            other => Err(unexpected("GetAttr", &other)),
        }
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn invalidator(&self) -> &Invalidator {
        &self.inval
    }

    /// Whether names and attributes are answered from the local tree.
    pub fn whole_tree(&self) -> bool {
        self.whole_tree
    }

    /// Whether requests run as their callers.
    pub fn identity(&self) -> bool {
        self.identity
    }

    /// The current local-change sequence number; listings taken after reading it may
    /// overwrite nodes whose [`TreeState::touched`] is at most this.
    pub fn mutation_seq(&self) -> u64 {
        self.mutations.load(Ordering::Acquire)
    }

    /// The identity a request runs as in the agent, or `None` when identity is off.
    pub fn caller(&self, uid: u32, gid: u32, pid: u32) -> Option<Caller> {
        self.identity.then(|| Caller {
            uid,
            gid,
            groups: if pid == 0 {
                Vec::new()
            } else {
                process_groups(pid)
            },
        })
    }

    fn dirs(&self) -> MutexGuard<'_, HashMap<u64, Arc<tokio::sync::Mutex<DirState>>>> {
        // No section panics midway, so a poisoned map is still consistent.
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn files(&self) -> MutexGuard<'_, Files> {
        // No section panics midway, so a poisoned map is still consistent.
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records local changes to `ids`: their attributes are fetched again when next asked
    /// for, and remote listings taken before now leave them alone.
    /// A new local-change sequence number (see [`Core::touch`]).
    pub(crate) fn next_mutation(&self) -> u64 {
        self.mutations.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(crate) fn touch(&self, ids: &[u64]) {
        let seq = self.mutations.fetch_add(1, Ordering::AcqRel) + 1;
        let mut t = self.tree.lock();
        for &id in ids {
            t.touch(id, seq);
        }
    }

    pub(crate) async fn call(&self, op: Op, caller: &Option<Caller>) -> Result<Done, FsError> {
        Ok(self.client.call(op, caller.clone()).await?)
    }

    /// A request naming an agent handle of session `generation`.
    async fn call_in(
        &self,
        generation: u64,
        op: Op,
        caller: &Option<Caller>,
    ) -> Result<Done, FsError> {
        Ok(self.client.call_in(generation, op, caller.clone()).await?)
    }

    pub(crate) async fn call_attr(&self, op: Op, caller: &Option<Caller>) -> Result<Attr, FsError> {
        let name = op_name(&op);
        match self.call(op, caller).await? {
            Done::Attr(a) => Ok(a),
            other => Err(unexpected(name, &other)),
        }
    }

    pub(crate) async fn call_ok(&self, op: Op, caller: &Option<Caller>) -> Result<(), FsError> {
        let name = op_name(&op);
        match self.call(op, caller).await? {
            Done::Ok => Ok(()),
            other => Err(unexpected(name, &other)),
        }
    }

    async fn call_data(&self, op: Op, caller: &Option<Caller>) -> Result<Vec<u8>, FsError> {
        let name = op_name(&op);
        match self.call(op, caller).await? {
            Done::Data(d) => Ok(d),
            other => Err(unexpected(name, &other)),
        }
    }

    /// An `Opened` reply and the session it came from.
    async fn call_opened(
        &self,
        op: Op,
        caller: &Option<Caller>,
    ) -> Result<(u64, Attr, u64), FsError> {
        let name = op_name(&op);
        match self.client.call_gen(op, caller.clone()).await? {
            (Done::Opened { handle, attr }, generation) => Ok((handle, attr, generation)),
            (other, _) => Err(unexpected(name, &other)),
        }
    }

    /// Closes an agent handle nobody will use; failures only go to the log.
    async fn close_quietly(&self, generation: u64, handle: u64) {
        if let Err(e) = self.call_in(generation, Op::Close { handle }, &None).await {
            tracing::debug!(handle, "closing an unused handle failed: {e}");
        }
    }

    /// A kernel handle open for writing on `id` by `caller` in the current session, and the
    /// unseen version it found (taken: only the first truncation keeps it).
    pub(crate) fn writable_open_of(
        &self,
        id: u64,
        caller: &Option<Caller>,
    ) -> Option<(u64, Option<Attr>)> {
        let current = self.client.generation();
        let mut files = self.files();
        let fhs = files.by_node.get(&id)?.clone();
        // The newest first: the open this truncation follows.
        let fh = fhs.into_iter().rev().find(|fh| {
            files.by_fh.get(fh).is_some_and(|f| {
                f.generation == current
                    && f.flags & libc::O_ACCMODE != libc::O_RDONLY
                    && f.caller == *caller
            })
        })?;
        let unseen = files.by_fh.get_mut(&fh)?.unseen.take();
        Some((fh, unseen))
    }

    /// An agent file handle of the current session open on `id`, if any.
    fn handle_of(&self, id: u64) -> Option<(u64, u64)> {
        let current = self.client.generation();
        let files = self.files();
        files
            .by_node
            .get(&id)?
            .iter()
            .filter_map(|fh| files.by_fh.get(fh))
            .find(|f| f.generation == current)
            .map(|f| (f.handle, f.generation))
    }

    /// The open file behind the kernel's `fh`.
    fn open_file(&self, fh: u64) -> Result<OpenFile, FsError> {
        self.files()
            .by_fh
            .get(&fh)
            .cloned()
            .ok_or_else(|| err!(libc::EBADF, "no open file {fh}"))
    }

    /// The open file behind `fh`, with a handle of the current agent session: a handle of an
    /// earlier session (the stream broke since) is replaced by opening the file again by its
    /// path, with the flags it was opened with (less those that create or truncate).
    async fn live_file(&self, fh: u64) -> Result<OpenFile, FsError> {
        let f = self.open_file(fh)?;
        if f.generation == self.client.generation() {
            return Ok(f);
        }
        let path = self.tree.path(f.id).map_err(|e| {
            err!(
                libc::EIO,
                "the file was open on an agent session that ended, and cannot be opened                  again: {e}"
            )
        })?;
        let flags = f.flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        let (handle, attr, generation) = self
            .call_opened(
                Op::Open {
                    path: path.clone(),
                    flags,
                },
                &f.caller,
            )
            .await?;
        if self.tree.remote_of(f.id) != Some((attr.dev, attr.ino)) {
            self.close_quietly(generation, handle).await;
            return Err(err!(
                libc::EIO,
                "{path} is another file now than the one that was open"
            ));
        }
        let (current, replaced) = {
            let mut files = self.files();
            let Some(entry) = files.by_fh.get_mut(&fh) else {
                return Err(err!(libc::EBADF, "no open file {fh}"));
            };
            let replaced = entry.generation == f.generation;
            if replaced {
                entry.handle = handle;
                entry.generation = generation;
            }
            (entry.clone(), replaced)
        };
        if replaced {
            tracing::debug!(fh, %path, "opened again on the new agent session");
        } else {
            // Another request opened it again first.
            self.close_quietly(generation, handle).await;
        }
        Ok(current)
    }

    /// Where an operation on `id` goes: the kernel's file handle when it is one of ours for
    /// this node (and of the current session), else the path, else (an unlinked, still open
    /// file) any open handle.
    fn node_ref(&self, id: u64, fh: Option<u64>) -> Result<(NodeRef, Option<u64>), FsError> {
        let current = self.client.generation();
        if let Some(f) = fh.and_then(|fh| self.open_file(fh).ok())
            && f.id == id
            && f.generation == current
        {
            return Ok((NodeRef::Handle(f.handle), Some(f.generation)));
        }
        match self.tree.path(id) {
            Ok(p) => Ok((NodeRef::Path(p), None)),
            Err(e) => self
                .handle_of(id)
                .map(|(h, g)| (NodeRef::Handle(h), Some(g)))
                .ok_or(e),
        }
    }

    /// Sends `op` (built around `node`) in the session its handle belongs to, if any.
    async fn call_node(
        &self,
        generation: Option<u64>,
        op: Op,
        caller: &Option<Caller>,
    ) -> Result<Done, FsError> {
        match generation {
            Some(g) => self.call_in(g, op, caller).await,
            None => self.call(op, caller).await,
        }
    }

    /// Records a name from an entry reply and counts the kernel's lookup.
    pub(crate) fn entry(
        &self,
        parent: u64,
        name: &[u8],
        attr: &Attr,
        fresh: bool,
        symlink: Option<Vec<u8>>,
    ) -> NodeAttr {
        let mut t = self.tree.lock();
        let id = t.upsert(parent, name, attr, symlink, fresh, &mut Effects::default());
        t.count_lookup(id);
        NodeAttr::from_remote(id, attr)
    }

    /// [`TreeState::heard_seq`] now: taken before a request whose answer the tree records.
    pub(crate) fn heard_seq(&self) -> u64 {
        self.tree.lock().heard_seq()
    }

    /// [`Core::entry`] for an answer asked for at watcher stamp `asked`: a node a watcher
    /// event set since keeps (and answers with) what the event said, which is newer (a
    /// listing taken between a file's creation and its first write, served after the write's
    /// event, showed it empty for good).
    pub(crate) fn entry_asked(
        &self,
        parent: u64,
        name: &[u8],
        attr: &Attr,
        symlink: Option<Vec<u8>>,
        asked: u64,
    ) -> NodeAttr {
        let mut t = self.tree.lock();
        let newer = t.child(parent, name).filter(|&id| {
            t.heard_after(id, asked) && t.remote_of(id) == Some((attr.dev, attr.ino))
        });
        if let Some(id) = newer
            && let Ok(known) = t.attr(id)
        {
            let known = NodeAttr::from_remote(id, known);
            t.count_lookup(id);
            return known;
        }
        let id = t.upsert(parent, name, attr, symlink, false, &mut Effects::default());
        t.count_lookup(id);
        NodeAttr::from_remote(id, attr)
    }

    /// [`Core::update`] for an answer asked for at watcher stamp `asked` (see
    /// [`Core::entry_asked`]).
    fn update_asked(&self, id: u64, attr: &Attr, asked: u64) -> Change {
        let mut t = self.tree.lock();
        if t.heard_after(id, asked) {
            return Change::None;
        }
        t.update_attr(id, attr, None, &mut Effects::default())
    }

    /// New remote attributes for a node the kernel asked about; the kernel gets them in the
    /// reply, so no invalidation is needed. Returns how the node changed.
    fn update(&self, id: u64, attr: &Attr) -> Change {
        self.tree
            .lock()
            .update_attr(id, attr, None, &mut Effects::default())
    }

    /// `path`, which the tree has as node `id`, is the remote node `attr` now. The kernel is
    /// answered `ESTALE` and looks the name up again: with a whole tree, the name leads to the
    /// new node then (the watcher's word on it may still be on its way, or never come); else it
    /// is forgotten and asked for.
    fn name_moved(&self, id: u64, path: &RelPath, attr: &Attr) {
        let mut t = self.tree.lock();
        let parent = path
            .split_last()
            .and_then(|(p, name)| Some((t.resolve(&p)?, name)));
        match parent {
            Some((parent, name)) if self.whole_tree && t.is_complete(parent) => {
                let mut fx = Effects::default();
                t.upsert(parent, name, attr, None, false, &mut fx);
                t.mark_stale(parent);
                drop(t);
                // The kernel's entry is replaced by the retry; other caches of the old node
                // (its attributes) are the notifier's job, as for any remote change.
                self.inval.send(fx.inval);
            }
            _ => t.drop_first_link(id, &mut Effects::default()),
        }
    }

    /// Registers an agent file handle as one of ours.
    fn add_file(&self, file: OpenFile) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let id = file.id;
        let mut files = self.files();
        files.by_fh.insert(fh, file);
        files.by_node.entry(id).or_default().push(fh);
        fh
    }

    fn remove_file(&self, fh: u64) -> Option<OpenFile> {
        let mut files = self.files();
        let f = files.by_fh.remove(&fh)?;
        if let Some(list) = files.by_node.get_mut(&f.id) {
            list.retain(|&x| x != fh);
            if list.is_empty() {
                files.by_node.remove(&f.id);
            }
        }
        Some(f)
    }

    pub async fn lookup(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
    ) -> Result<NodeAttr, FsError> {
        let parent = self.tree.canon(parent);
        if self.whole_tree {
            check_name(name)?;
            let mut t = self.tree.lock();
            if t.is_complete(parent) {
                match t.child(parent, name) {
                    None => {
                        return Err(err!(
                            libc::ENOENT,
                            "{} does not exist",
                            String::from_utf8_lossy(name)
                        ));
                    }
                    Some(id) if !t.is_stale(id) => {
                        let attr = NodeAttr::from_remote(id, t.attr(id)?);
                        t.count_lookup(id);
                        return Ok(attr);
                    }
                    // Changed here since last seen: ask the remote.
                    Some(_) => {}
                }
            }
        }
        let path = self.tree.child_path(parent, name)?;
        let asked = self.heard_seq();
        match self.call_attr(Op::Lookup { path }, &caller).await {
            Ok(attr) => Ok(self.entry_asked(parent, name, &attr, None, asked)),
            Err(e) if self.offline(&e) => {
                let mut t = self.tree.lock();
                let id = t.child(parent, name).ok_or(e)?;
                let attr = NodeAttr::from_remote(id, t.attr(id)?);
                t.count_lookup(id);
                Ok(attr)
            }
            Err(e) => {
                if e.errno == libc::ENOENT {
                    self.tree.unlink(parent, name);
                }
                Err(e)
            }
        }
    }

    pub fn forget(&self, id: u64, nlookup: u64) {
        let inval = self.tree.forget(id, nlookup);
        self.inval.send(inval);
    }

    /// Attributes of `id`: from the tree when it is current, else from the remote: by an open
    /// handle when there is one (exact even when the file was unlinked or renamed remotely),
    /// else by path. A path that now leads to another inode means the node is stale:
    /// `ESTALE`, which makes the kernel look the name up again.
    pub async fn getattr(&self, caller: Option<Caller>, id: u64) -> Result<NodeAttr, FsError> {
        let id = self.tree.canon(id);
        if self.whole_tree {
            let t = self.tree.lock();
            // A local-only node's attributes are the tree's alone.
            if (!t.is_stale(id) || t.is_local_only(id))
                && let Ok(a) = t.attr(id)
            {
                return Ok(NodeAttr::from_remote(id, a));
            }
        }
        match self.fetch_attr(&caller, id).await {
            Err(e) if self.offline(&e) => {
                // The last attributes known are better than none while the agent is away.
                let t = self.tree.lock();
                t.attr(id)
                    .map(|a| NodeAttr::from_remote(id, a))
                    .map_err(|_| e)
            }
            other => other,
        }
    }

    /// Whether `e` failed for want of the agent, in a mount that can answer from its tree.
    fn offline(&self, e: &FsError) -> bool {
        self.whole_tree && e.errno == libc::EIO && !self.client.is_connected()
    }

    /// Fetches the attributes of `id` from the remote and records them.
    async fn fetch_attr(&self, caller: &Option<Caller>, id: u64) -> Result<NodeAttr, FsError> {
        // A local change to the node while the request was out may have made its answer
        // old (a GETATTR overtaken by a WRITE): ask again rather than record the older size.
        for _ in 0..3 {
            let since = self.mutation_seq();
            let asked = self.heard_seq();
            let attr = self.fetch_attr_once(caller, id).await?;
            if self.update_since(id, &attr, since, asked) {
                return Ok(NodeAttr::from_remote(id, &attr));
            }
        }
        let t = self.tree.lock();
        Ok(NodeAttr::from_remote(id, t.attr(id)?))
    }

    /// Records `attr`, fetched for `id` after local change number `since` and watcher stamp
    /// `asked` ([`TreeState::heard_seq`]), unless a later local change to `id` may have
    /// overtaken it, or a watcher event set it since; `false` then.
    pub(crate) fn update_since(&self, id: u64, attr: &Attr, since: u64, asked: u64) -> bool {
        let mut t = self.tree.lock();
        if t.touched(id) > since || t.heard_after(id, asked) {
            return false;
        }
        t.update_attr(id, attr, None, &mut Effects::default());
        true
    }

    async fn fetch_attr_once(&self, caller: &Option<Caller>, id: u64) -> Result<Attr, FsError> {
        if let Some((h, generation)) = self.handle_of(id) {
            let node = NodeRef::Handle(h);
            match self.call_in(generation, Op::GetAttr { node }, caller).await {
                Ok(Done::Attr(attr)) => return Ok(attr),
                Ok(other) => return Err(unexpected("GetAttr", &other)),
                // The kernel's RELEASE of that handle raced this GETATTR (close() then stat()):
                // the handle is gone, the path is still right.
                Err(e) if e.errno == libc::EBADF => {}
                Err(e) => return Err(e),
            }
        }
        let path = self.tree.path(id)?;
        let attr = self
            .call_attr(
                Op::GetAttr {
                    node: NodeRef::Path(path.clone()),
                },
                caller,
            )
            .await?;
        if id != ROOT_ID && self.tree.remote_of(id) != Some((attr.dev, attr.ino)) {
            self.name_moved(id, &path, &attr);
            return Err(err!(libc::ESTALE, "{path} is another file now"));
        }
        Ok(attr)
    }

    pub async fn setattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> Result<NodeAttr, FsError> {
        let id = self.tree.canon(id);
        if self.lo_node(id) {
            return self.lo_setattr(id, fh, &set);
        }
        if self.wb().is_some() {
            return self.wb_setattr(caller, id, fh, set).await;
        }
        // `open(O_TRUNC)`: the kernel opens, then truncates by path (no handle). Done through
        // the open it follows, the target sees one open and one close for the save, and a
        // version the open found unseen is kept first.
        let fh = match fh {
            Some(fh) => Some(fh),
            None if set
                == (SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                }) =>
            {
                self.truncating_open(&caller, id).await?
            }
            None => None,
        };
        let (node, generation) = self.node_ref(id, fh)?;
        let attr = match self
            .call_node(generation, Op::SetAttr { node, set }, &caller)
            .await?
        {
            Done::Attr(a) => a,
            other => return Err(unexpected("SetAttr", &other)),
        };
        // Recorded as a local change, with the exact result: not stale.
        self.touch(&[id]);
        self.update(id, &attr);
        Ok(NodeAttr::from_remote(id, &attr))
    }

    pub async fn readlink(&self, caller: Option<Caller>, id: u64) -> Result<Vec<u8>, FsError> {
        let id = self.tree.canon(id);
        if self.whole_tree
            && let Some(target) = self.tree.lock().symlink(id)
        {
            return Ok(target.to_vec());
        }
        let path = self.tree.path(id)?;
        let target = self.call_data(Op::Readlink { path }, &caller).await?;
        let mut t = self.tree.lock();
        if let Ok(attr) = t.attr(id).cloned() {
            t.update_attr(id, &attr, Some(target.clone()), &mut Effects::default());
        }
        Ok(target)
    }

    /// `mode` includes the file type; `rdev` is in the kernel's encoding.
    pub async fn mknod(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<NodeAttr, FsError> {
        let parent = self.tree.canon(parent);
        if self.lo_here(parent, name, false) {
            return self.lo_make(&caller, parent, name, mode, user_dev(rdev), None);
        }
        if self.wb().is_some() {
            return self
                .wb_mknod(caller, parent, name, mode, user_dev(rdev))
                .await;
        }
        let path = self.tree.child_path(parent, name)?;
        let op = Op::Mknod {
            path,
            mode,
            rdev: user_dev(rdev),
        };
        let attr = self.call_attr(op, &caller).await?;
        let entry = self.entry(parent, name, &attr, true, None);
        self.touch(&[parent]);
        Ok(entry)
    }

    pub async fn mkdir(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> Result<NodeAttr, FsError> {
        let parent = self.tree.canon(parent);
        if self.lo_here(parent, name, true) {
            return self.lo_make(
                &caller,
                parent,
                name,
                libc::S_IFDIR | (mode & 0o7777),
                0,
                None,
            );
        }
        if self.wb().is_some() {
            return self.wb_mkdir(caller, parent, name, mode).await;
        }
        let path = self.tree.child_path(parent, name)?;
        let op = Op::Mkdir {
            path,
            mode: mode & 0o7777,
        };
        let attr = self.call_attr(op, &caller).await?;
        let entry = self.entry(parent, name, &attr, true, None);
        self.touch(&[parent]);
        Ok(entry)
    }

    pub async fn unlink(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
    ) -> Result<(), FsError> {
        let parent = self.tree.canon(parent);
        if self.lo_child(parent, name) {
            return self.lo_remove(parent, name, false);
        }
        if self.wb().is_some() {
            return self.wb_remove(caller, parent, name, false).await;
        }
        let path = self.tree.child_path(parent, name)?;
        self.call_ok(Op::Unlink { path }, &caller).await?;
        self.removed(parent, name);
        Ok(())
    }

    pub async fn rmdir(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
    ) -> Result<(), FsError> {
        let parent = self.tree.canon(parent);
        if self.lo_child(parent, name) {
            return self.lo_remove(parent, name, true);
        }
        self.lo_check_rmdir(parent, name)?;
        if self.wb().is_some() {
            return self.wb_remove(caller, parent, name, true).await;
        }
        let path = self.tree.child_path(parent, name)?;
        self.call_ok(Op::Rmdir { path }, &caller).await?;
        self.removed(parent, name);
        Ok(())
    }

    /// `name` in `parent` was removed through the mount.
    fn removed(&self, parent: u64, name: &[u8]) {
        let gone = self
            .tree
            .lock()
            .remove(parent, name, &mut Effects::default());
        // The node's other names (hard links) see a new nlink and ctime.
        let others = gone.filter(|&id| self.tree.is_linked(id));
        let mut ids = vec![parent];
        ids.extend(others);
        self.touch(&ids);
    }

    pub async fn symlink(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> Result<NodeAttr, FsError> {
        let parent = self.tree.canon(parent);
        if self.lo_here(parent, name, false) {
            let mode = libc::S_IFLNK | 0o777;
            return self.lo_make(&caller, parent, name, mode, 0, Some(target.to_vec()));
        }
        if self.wb().is_some() {
            return self.wb_symlink(caller, parent, name, target).await;
        }
        let path = self.tree.child_path(parent, name)?;
        let op = Op::Symlink {
            path,
            target: target.to_vec(),
        };
        let attr = self.call_attr(op, &caller).await?;
        let entry = self.entry(parent, name, &attr, true, Some(target.to_vec()));
        self.touch(&[parent]);
        Ok(entry)
    }

    /// `flags`: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`, as `renameat2(2)`.
    pub async fn rename(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> Result<(), FsError> {
        let parent = self.tree.canon(parent);
        let new_parent = self.tree.canon(new_parent);
        if let Some(done) = self
            .lo_rename(&caller, parent, name, new_parent, new_name, flags)
            .await
        {
            return done;
        }
        if self.wb().is_some() {
            return self
                .wb_rename(caller, parent, name, new_parent, new_name, flags)
                .await;
        }
        let from = self.tree.child_path(parent, name)?;
        let to = self.tree.child_path(new_parent, new_name)?;
        if flags & libc::RENAME_EXCHANGE == 0 && self.whole_tree {
            self.keep_their_version(&caller, new_parent, new_name)
                .await?;
        }
        self.call_ok(Op::Rename { from, to, flags }, &caller)
            .await?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let (src, dst) = {
            let mut t = self.tree.lock();
            let src = t.child(parent, name);
            let dst = t.child(new_parent, new_name);
            t.rename(
                parent,
                name,
                new_parent,
                new_name,
                exchange,
                &mut Effects::default(),
            );
            (src, dst)
        };
        let mut ids = vec![parent, new_parent];
        ids.extend(src);
        ids.extend(dst.filter(|&d| self.tree.is_linked(d)));
        self.touch(&ids);
        Ok(())
    }

    pub async fn link(
        &self,
        caller: Option<Caller>,
        id: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> Result<NodeAttr, FsError> {
        let id = self.tree.canon(id);
        let new_parent = self.tree.canon(new_parent);
        if self.lo_node(id) || self.lo_here(new_parent, new_name, false) {
            return Err(err!(
                libc::EXDEV,
                "hard links to or from local-only names are not supported (see `kmount why`)"
            ));
        }
        if self.wb().is_some() {
            return self.wb_link(caller, id, new_parent, new_name).await;
        }
        let from = self.tree.path(id)?;
        let to = self.tree.child_path(new_parent, new_name)?;
        let attr = self.call_attr(Op::Link { from, to }, &caller).await?;
        let entry = self.entry(new_parent, new_name, &attr, false, None);
        self.touch(&[new_parent]);
        Ok(entry)
    }

    /// Opens `id` on the agent; the kernel's file handle is ours.
    pub async fn open(
        &self,
        caller: Option<Caller>,
        id: u64,
        flags: i32,
    ) -> Result<Opened, FsError> {
        let id = self.tree.canon(id);
        if self.lo_node(id) {
            return self.lo_open(id, flags);
        }
        if self.wb().is_some() {
            return self.wb_open(caller, id, flags).await;
        }
        let path = self.tree.path(id)?;
        let asked = self.heard_seq();
        let (handle, attr, generation) = self
            .call_opened(
                Op::Open {
                    path: path.clone(),
                    flags,
                },
                &caller,
            )
            .await?;
        if id != ROOT_ID && self.tree.remote_of(id) != Some((attr.dev, attr.ino)) {
            self.close_quietly(generation, handle).await;
            self.name_moved(id, &path, &attr);
            return Err(err!(libc::ESTALE, "{path} is another file now"));
        }
        // Before the tree takes the version found: was it one the tree did not have?
        let unseen = (flags & libc::O_ACCMODE != libc::O_RDONLY)
            .then(|| self.unseen_version(id, &attr))
            .flatten();
        if let Err(e) = self.tree.opened(id) {
            self.close_quietly(generation, handle).await;
            return Err(e);
        }
        let change = self.update_asked(id, &attr, asked);
        if change != Change::None {
            // The open reply carries no attributes: the kernel keeps those it cached (a mode
            // or size the watcher never reported, which reconciliation then cannot see as a
            // difference: the tree has them now) unless it is told.
            self.inval.send(vec![crate::invalidate::Inval::Inode {
                ino: id,
                data: false,
            }]);
        }
        if flags & libc::O_TRUNC != 0 {
            self.touch(&[id]);
        }
        let fh = self.add_file(OpenFile {
            id,
            handle,
            generation,
            flags,
            caller,
            unseen,
        });
        Ok(Opened {
            fh,
            keep_cache: change != Change::Content,
        })
    }

    pub async fn read(
        &self,
        caller: Option<Caller>,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        if let Some(r) = self.lo_read(fh, offset, size) {
            return r;
        }
        if self.wb().is_some() {
            return self.wb_read(fh, offset, size).await;
        }
        let file = self.live_file(fh).await?;
        let op = Op::Read {
            handle: file.handle,
            offset,
            len: size.min(MAX_IO_LEN),
        };
        match self.call_in(file.generation, op, &caller).await? {
            Done::Data(d) => Ok(d),
            other => Err(unexpected("Read", &other)),
        }
    }

    pub async fn write(
        &self,
        caller: Option<Caller>,
        fh: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u32, FsError> {
        if let Some(r) = self.lo_write(fh, offset, &data) {
            return r;
        }
        if self.wb().is_some() {
            return self.wb_write(caller, fh, offset, data).await;
        }
        let file = self.live_file(fh).await?;
        let op = Op::Write {
            handle: file.handle,
            offset,
            data,
        };
        let result = match self.call_in(file.generation, op, &caller).await? {
            Done::Written(n) => Ok(n),
            other => Err(unexpected("Write", &other)),
        };
        self.touch(&[file.id]);
        result
    }

    /// `close(2)` of one descriptor of an open file. Writes already reached the agent; with a
    /// whole tree, the file's attributes after them are fetched now, so the tree holds them
    /// even when the agent goes away.
    pub async fn flush(&self, fh: u64) -> Result<(), FsError> {
        if self.lo().is_some_and(|lo| lo.file(fh).is_some()) {
            return Ok(());
        }
        if self.wb().is_some() {
            return self.wb_flush(fh).await;
        }
        if !self.whole_tree {
            return Ok(());
        }
        let file = self.open_file(fh)?;
        if !self.tree.lock().is_stale(file.id) || file.generation != self.client.generation() {
            return Ok(());
        }
        let node = NodeRef::Handle(file.handle);
        let since = self.mutation_seq();
        let asked = self.heard_seq();
        match self
            .call_in(file.generation, Op::GetAttr { node }, &None)
            .await
        {
            Ok(Done::Attr(attr)) => {
                self.update_since(file.id, &attr, since, asked);
            }
            Ok(other) => tracing::debug!("the agent answered GetAttr with {other:?}"),
            Err(e) => tracing::debug!("cannot fetch the attributes of a closed file: {e}"),
        }
        Ok(())
    }

    pub async fn release(&self, id: u64, fh: u64) -> Result<(), FsError> {
        let id = self.tree.canon(id);
        if let Some(r) = self.lo_release(id, fh) {
            return r;
        }
        if self.wb().is_some() {
            return self.wb_release(id, fh).await;
        }
        let Some(file) = self.remove_file(fh) else {
            return Err(err!(libc::EBADF, "no open file {fh}"));
        };
        self.tree.closed(id);
        if file.generation != self.client.generation() {
            // Its session ended, and the handle with it.
            return Ok(());
        }
        match self
            .call_in(
                file.generation,
                Op::Close {
                    handle: file.handle,
                },
                &None,
            )
            .await
        {
            Ok(_) => Ok(()),
            // A close cannot fail for the caller once the session that had the handle ended.
            Err(_) if file.generation != self.client.generation() => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn fsync(
        &self,
        caller: Option<Caller>,
        fh: u64,
        datasync: bool,
    ) -> Result<(), FsError> {
        if self.lo().is_some_and(|lo| lo.file(fh).is_some()) {
            // Kept only while the mount lasts: nothing to make durable.
            return Ok(());
        }
        if self.wb().is_some() {
            return self.wb_fsync(caller, fh, datasync).await;
        }
        let file = self.live_file(fh).await?;
        let op = Op::Fsync {
            handle: file.handle,
            datasync,
        };
        match self.call_in(file.generation, op, &caller).await? {
            Done::Ok => Ok(()),
            other => Err(unexpected("Fsync", &other)),
        }
    }

    /// Opens directory `id` for listing; the listing itself is taken at the first readdir.
    pub async fn opendir(&self, caller: Option<Caller>, id: u64) -> Result<u64, FsError> {
        let id = self.tree.canon(id);
        let local = self.whole_tree && self.tree.lock().is_complete(id);
        let asked = self.heard_seq();
        let agent_handle = if local {
            None
        } else {
            let path = self.tree.path(id)?;
            match self
                .client
                .call_gen(Op::OpenDir { path }, caller.clone())
                .await
            {
                Ok((Done::Handle(h), generation)) => Some((h, generation)),
                Ok((other, _)) => return Err(unexpected("OpenDir", &other)),
                Err(e) => return Err(e.into()),
            }
        };
        if let Err(e) = self.tree.opened(id) {
            if let Some((handle, generation)) = agent_handle {
                self.close_quietly(generation, handle).await;
            }
            return Err(e);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let state = DirState {
            id,
            agent_handle,
            listing: None,
            asked,
            served: false,
        };
        self.dirs()
            .insert(fh, Arc::new(tokio::sync::Mutex::new(state)));
        Ok(fh)
    }

    /// Takes the whole listing into `st` (again, on a rewind): from the tree when it is
    /// complete there, else from the agent.
    async fn load_dir(&self, caller: &Option<Caller>, st: &mut DirState) -> Result<(), FsError> {
        if self.whole_tree {
            let t = self.tree.lock();
            if t.is_complete(st.id) {
                st.listing = Some(Listing::Tree(t.listing(st.id)));
                return Ok(());
            }
        }
        let (handle, generation) = match st
            .agent_handle
            .take()
            .filter(|(_, g)| *g == self.client.generation())
        {
            Some(h) => h,
            None => {
                st.asked = self.heard_seq();
                let path = self.tree.path(st.id)?;
                match self
                    .client
                    .call_gen(Op::OpenDir { path }, caller.clone())
                    .await?
                {
                    (Done::Handle(h), generation) => (h, generation),
                    (other, _) => return Err(unexpected("OpenDir", &other)),
                }
            }
        };
        let mut entries = Vec::new();
        let result = loop {
            let op = Op::ReadDir {
                handle,
                max: READDIR_BATCH,
            };
            match self.call_in(generation, op, caller).await {
                Ok(Done::Entries { entries: e, eof }) => {
                    entries.extend(e);
                    if eof {
                        break Ok(());
                    }
                }
                Ok(other) => break Err(unexpected("ReadDir", &other)),
                Err(e) => break Err(e),
            }
        };
        self.close_quietly(generation, handle).await;
        result?;
        st.listing = Some(Listing::Remote(entries));
        Ok(())
    }

    async fn dir_state(
        &self,
        caller: &Option<Caller>,
        fh: u64,
        offset: u64,
    ) -> Result<tokio::sync::OwnedMutexGuard<DirState>, FsError> {
        let state = self
            .dirs()
            .get(&fh)
            .cloned()
            .ok_or_else(|| err!(libc::EBADF, "no directory handle {fh}"))?;
        let mut st = state.lock_owned().await;
        if st.listing.is_none() || (offset == 0 && st.served) {
            self.load_dir(caller, &mut st).await?;
        }
        st.served = true;
        Ok(st)
    }

    /// Hands entries from `offset` on to `add` until it returns true (buffer full).
    /// Offsets: `.` is 0, `..` is 1, snapshot entry `i` is `i + 2`; each item carries the
    /// offset of the one after it.
    pub async fn readdir<F>(
        &self,
        caller: Option<Caller>,
        id: u64,
        fh: u64,
        offset: u64,
        mut add: F,
    ) -> Result<(), FsError>
    where
        F: FnMut(&DirItem<'_>) -> bool + Send,
    {
        let id = self.tree.canon(id);
        let st = self.dir_state(&caller, fh, offset).await?;
        let Some(listing) = st.listing.as_ref() else {
            return Ok(());
        };
        let parent = self.tree.parent_of(id);
        for index in offset..(listing.len() as u64 + 2) {
            let item = match index {
                0 => DirItem {
                    ino: id,
                    offset: 1,
                    kind: libc::S_IFDIR,
                    name: b".",
                    attr: None,
                },
                1 => DirItem {
                    ino: parent,
                    offset: 2,
                    kind: libc::S_IFDIR,
                    name: b"..",
                    attr: None,
                },
                _ => {
                    let i = (index - 2) as usize;
                    match listing {
                        Listing::Remote(entries) => {
                            let e = &entries[i];
                            // An entry that vanished between listing and lstat is left out.
                            let Some(attr) = &e.attr else { continue };
                            DirItem {
                                ino: self.tree.peek(attr),
                                offset: index + 1,
                                kind: attr.file_type(),
                                name: &e.name,
                                attr: None,
                            }
                        }
                        Listing::Tree(entries) => {
                            let e = &entries[i];
                            DirItem {
                                ino: e.id,
                                offset: index + 1,
                                kind: e.kind,
                                name: &e.name,
                                attr: None,
                            }
                        }
                    }
                }
            };
            if add(&item) {
                break;
            }
        }
        Ok(())
    }

    /// Like [`Core::readdir`] with attributes. Every entry `add` accepts (other than `.` and
    /// `..`) counts as a kernel lookup of it.
    pub async fn readdirplus<F>(
        &self,
        caller: Option<Caller>,
        id: u64,
        fh: u64,
        offset: u64,
        mut add: F,
    ) -> Result<(), FsError>
    where
        F: FnMut(&DirItem<'_>) -> bool + Send,
    {
        let id = self.tree.canon(id);
        let st = self.dir_state(&caller, fh, offset).await?;
        let Some(listing) = st.listing.as_ref() else {
            return Ok(());
        };
        if let Listing::Tree(entries) = listing {
            // Nodes changed here since last seen are fetched again first.
            let skip = offset.saturating_sub(2) as usize;
            let stale: Vec<u64> = {
                let t = self.tree.lock();
                entries
                    .iter()
                    .skip(skip)
                    .filter(|e| t.is_stale(e.id))
                    .map(|e| e.id)
                    .collect()
            };
            for stale_id in stale {
                if let Err(e) = self.fetch_attr(&caller, stale_id).await {
                    tracing::debug!(id = stale_id, "cannot refresh a changed node: {e}");
                }
            }
        }
        for index in offset..(listing.len() as u64 + 2) {
            if index < 2 {
                let ino = if index == 0 {
                    id
                } else {
                    self.tree.parent_of(id)
                };
                let item = DirItem {
                    ino,
                    offset: index + 1,
                    kind: libc::S_IFDIR,
                    name: if index == 0 { b"." } else { b".." },
                    attr: Some(NodeAttr::placeholder_dir(ino)),
                };
                if add(&item) {
                    break;
                }
                continue;
            }
            let i = (index - 2) as usize;
            let (name, node_attr): (&[u8], NodeAttr) = match listing {
                Listing::Remote(entries) => {
                    let e = &entries[i];
                    let Some(attr) = &e.attr else { continue };
                    (
                        &e.name,
                        self.entry_asked(id, &e.name, attr, e.symlink.clone(), st.asked),
                    )
                }
                Listing::Tree(entries) => {
                    let e = &entries[i];
                    let mut t = self.tree.lock();
                    // Gone since the listing was taken: left out.
                    let Ok(attr) = t.attr(e.id) else { continue };
                    let node_attr = NodeAttr::from_remote(e.id, attr);
                    t.count_lookup(e.id);
                    (&e.name, node_attr)
                }
            };
            let item = DirItem {
                ino: node_attr.ino,
                offset: index + 1,
                kind: node_attr.kind(),
                name,
                attr: Some(node_attr),
            };
            if add(&item) {
                // Not in the reply, so not a lookup the kernel knows about.
                self.tree.forget(node_attr.ino, 1);
                break;
            }
        }
        Ok(())
    }

    pub async fn releasedir(&self, id: u64, fh: u64) -> Result<(), FsError> {
        let id = self.tree.canon(id);
        let state = self.dirs().remove(&fh);
        let Some(state) = state else {
            return Err(err!(libc::EBADF, "no directory handle {fh}"));
        };
        self.tree.closed(id);
        let handle = state.lock().await.agent_handle.take();
        if let Some((handle, generation)) = handle {
            self.close_quietly(generation, handle).await;
        }
        Ok(())
    }

    pub async fn statfs(&self, caller: Option<Caller>) -> Result<Statfs, FsError> {
        match self.call(Op::Statfs, &caller).await? {
            Done::Statfs(s) => Ok(s),
            other => Err(unexpected("Statfs", &other)),
        }
    }

    pub async fn setxattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<(), FsError> {
        let id = self.tree.canon(id);
        if let Some(r) = self.lo_xattr(id, true) {
            return r.map(|_| ());
        }
        if self.wb().is_some() {
            let (name, value) = (name.to_vec(), value.to_vec());
            return self
                .wb_setxattr(caller, id, |node| Op::SetXattr {
                    node,
                    name,
                    value,
                    flags,
                })
                .await;
        }
        let (node, generation) = self.node_ref(id, None)?;
        let op = Op::SetXattr {
            node,
            name: name.to_vec(),
            value: value.to_vec(),
            flags,
        };
        self.call_node(generation, op, &caller).await?;
        self.touch(&[id]);
        Ok(())
    }

    pub async fn getxattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        name: &[u8],
        size: u32,
    ) -> Result<Xattr, FsError> {
        let id = self.tree.canon(id);
        if let Some(r) = self.lo_xattr(id, false) {
            return r;
        }
        if self.wb_no_caps(id, name) {
            return Err(err!(libc::ENODATA, "no capabilities"));
        }
        if self.wb().is_some() && name != b"security.capability" {
            self.wb_settle_name(id).await?;
        }
        let (node, generation) = self.node_ref(id, None)?;
        let op = Op::GetXattr {
            node,
            name: name.to_vec(),
        };
        let got = self.call_node(generation, op, &caller).await;
        match &got {
            Ok(_) => self.wb_caps_seen(id, name, false),
            Err(e) if e.errno == libc::ENODATA => self.wb_caps_seen(id, name, true),
            Err(_) => {}
        }
        match got? {
            Done::Data(d) => sized(d, size),
            other => Err(unexpected("GetXattr", &other)),
        }
    }

    pub async fn listxattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        size: u32,
    ) -> Result<Xattr, FsError> {
        let id = self.tree.canon(id);
        if self.lo_node(id) {
            return sized(Vec::new(), size);
        }
        if self.wb().is_some() {
            self.wb_settle_name(id).await?;
        }
        let (node, generation) = self.node_ref(id, None)?;
        let op = Op::ListXattr { node };
        match self.call_node(generation, op, &caller).await? {
            Done::Data(d) => sized(d, size),
            other => Err(unexpected("ListXattr", &other)),
        }
    }

    pub async fn removexattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        name: &[u8],
    ) -> Result<(), FsError> {
        let id = self.tree.canon(id);
        if let Some(r) = self.lo_xattr(id, true) {
            return r.map(|_| ());
        }
        if self.wb().is_some() {
            let name = name.to_vec();
            return self
                .wb_setxattr(caller, id, |node| Op::RemoveXattr { node, name })
                .await;
        }
        let (node, generation) = self.node_ref(id, None)?;
        let op = Op::RemoveXattr {
            node,
            name: name.to_vec(),
        };
        self.call_node(generation, op, &caller).await?;
        self.touch(&[id]);
        Ok(())
    }

    /// `access(2)`; the kernel only asks without `default_permissions`.
    pub async fn access(&self, caller: Option<Caller>, id: u64, mask: i32) -> Result<(), FsError> {
        let id = self.tree.canon(id);
        if self.lo_node(id) {
            return Ok(());
        }
        if self.wb().is_some() {
            return self.wb_access(&caller, id, mask);
        }
        let path = self.tree.path(id)?;
        self.call_ok(Op::Access { path, mask }, &caller).await
    }

    /// Creates and opens `name` (`O_EXCL` in `flags` is honoured by the agent).
    pub async fn create(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<Created, FsError> {
        let parent = self.tree.canon(parent);
        if self.lo_here(parent, name, false) {
            return self.lo_create(&caller, parent, name, mode, flags);
        }
        if self.wb().is_some() {
            return self.wb_create(caller, parent, name, mode, flags).await;
        }
        let path = self.tree.child_path(parent, name)?;
        let op = Op::Create {
            path,
            flags,
            mode: mode & 0o7777,
        };
        let (handle, attr, generation) = self.call_opened(op, &caller).await?;
        let attr = self.entry(parent, name, &attr, false, None);
        if let Err(e) = self.tree.opened(attr.ino) {
            self.close_quietly(generation, handle).await;
            return Err(e);
        }
        self.touch(&[parent]);
        let fh = self.add_file(OpenFile {
            id: attr.ino,
            handle,
            generation,
            flags,
            caller,
            unseen: None,
        });
        Ok(Created { attr, fh })
    }

    pub async fn fallocate(
        &self,
        caller: Option<Caller>,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Result<(), FsError> {
        if let Some(r) = self.lo_fallocate(fh, offset, len, mode) {
            return r;
        }
        if self.wb().is_some() {
            return self.wb_fallocate(caller, fh, offset, len, mode).await;
        }
        let file = self.live_file(fh).await?;
        let op = Op::Fallocate {
            handle: file.handle,
            mode,
            offset,
            len,
        };
        match self.call_in(file.generation, op, &caller).await? {
            Done::Ok => {}
            other => return Err(unexpected("Fallocate", &other)),
        }
        self.touch(&[file.id]);
        Ok(())
    }

    /// `SEEK_DATA`/`SEEK_HOLE`; the kernel answers the other kinds itself.
    pub async fn lseek(
        &self,
        caller: Option<Caller>,
        fh: u64,
        offset: i64,
        whence: i32,
    ) -> Result<i64, FsError> {
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(err!(libc::EINVAL, "lseek whence {whence} is the kernel's"));
        }
        if let Some(r) = self.lo_lseek(fh, offset, whence) {
            return r;
        }
        if self.wb().is_some() {
            let offset = u64::try_from(offset).map_err(|_| err!(libc::ENXIO, "negative offset"))?;
            return self.wb_lseek(caller, fh, offset, whence).await;
        }
        let offset = u64::try_from(offset).map_err(|_| err!(libc::ENXIO, "negative offset"))?;
        let file = self.live_file(fh).await?;
        let op = Op::Lseek {
            handle: file.handle,
            offset,
            whence,
        };
        match self.call_in(file.generation, op, &caller).await? {
            Done::Offset(o) => i64::try_from(o).map_err(|_| err!(libc::EOVERFLOW, "offset {o}")),
            other => Err(unexpected("Lseek", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_exactly_both_ways() {
        for ts in [
            Timespec { sec: 0, nsec: 0 },
            Timespec {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
            Timespec { sec: -5, nsec: 7 },
            Timespec {
                sec: -1,
                nsec: 999_999_999,
            },
        ] {
            assert_eq!(timespec(system_time(ts)), ts, "{ts:?}");
        }
    }

    #[test]
    fn device_numbers_round_trip() {
        // makedev(8, 1) and a large one: makedev(0x123, 0x45678).
        for (major, minor) in [(8u64, 1u64), (0x123, 0x45678), (0, 0)] {
            let glibc = ((major & 0xfff) << 8)
                | ((major & !0xfff) << 32)
                | (minor & 0xff)
                | ((minor & !0xff) << 12);
            let kernel = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
            assert_eq!(u64::from(kernel_dev(glibc)), kernel);
            assert_eq!(user_dev(kernel as u32), glibc);
        }
    }

    #[test]
    fn xattr_size_protocol() {
        assert_eq!(sized(b"abc".to_vec(), 0).unwrap(), Xattr::Size(3));
        assert_eq!(
            sized(b"abc".to_vec(), 3).unwrap(),
            Xattr::Data(b"abc".to_vec())
        );
        assert_eq!(sized(b"abc".to_vec(), 2).unwrap_err().errno, libc::ERANGE);
    }

    #[test]
    fn groups_from_proc_status() {
        let status = "Name:\tx\nUid:\t1\t1\t1\t1\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("Name: x\n"), Vec::<u32>::new());
        let mine = process_groups(std::process::id());
        let expected = nix::unistd::getgroups().unwrap();
        assert_eq!(mine.len(), expected.len());
    }
}
