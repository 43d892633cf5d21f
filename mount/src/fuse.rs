//! The fuser adapter: converts each kernel request into a [`Core`] call run on the tokio
//! runtime, and the result into the reply. Handlers return at once, so a slow request never
//! holds up the others.

use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use kmount_proto::{SetAttr, SetTime};
use tracing::Instrument;

use crate::core::{Core, DirItem, NodeAttr, Xattr, timespec};
use crate::error::FsError;
use crate::owner::{self, OwnerMap};

/// Capabilities asked of the kernel when it offers them. Left out on purpose:
/// - `FUSE_WRITEBACK_CACHE`: it trusts the local size and mtime over the remote's and breaks
///   `O_APPEND`;
/// - `FUSE_ATOMIC_O_TRUNC`: with it the kernel sends `O_TRUNC` inside FUSE_OPEN and skips its
///   own truncate, and with it the ETXTBSY check of `open(O_RDONLY | O_TRUNC)` on a running
///   executable (pjdfstest open::etxtbsy): the file would be emptied. Without it the kernel
///   truncates with a SETATTR (no handle) after the open; the core runs that truncate through
///   the open it follows, so the target still sees one open and one close per save.
const WANTED: InitFlags = InitFlags::FUSE_DO_READDIRPLUS
    .union(InitFlags::FUSE_READDIRPLUS_AUTO)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_AUTO_INVAL_DATA)
    .union(InitFlags::FUSE_CACHE_SYMLINKS);

const MAX_BACKGROUND: u16 = 64;
const MAX_WRITE: u32 = 1 << 20;
const MAX_READAHEAD: u32 = 1 << 20;
/// The read-ahead set on the mount's backing device after mounting (see
/// `raise_readahead`): enough requests in flight to fill a link with a round trip.
pub(crate) const MAX_READAHEAD_WANTED: u32 = 8 << 20;

/// FUSE requests the mount received, by kind: what the kernel did not answer from its own
/// caches (`kmount status --json`, `fuse_requests`). One relaxed atomic add per request.
#[derive(Debug)]
pub struct RequestCounts([AtomicU64; KIND_NAMES.len()]);

impl Default for RequestCounts {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

macro_rules! request_kinds {
    ($($kind:ident => $name:literal),* $(,)?) => {
        #[derive(Clone, Copy)]
        enum RequestKind { $($kind),* }
        const KIND_NAMES: [&str; [$($name),*].len()] = [$($name),*];
    };
}

request_kinds! {
    Lookup => "lookup",
    Forget => "forget",
    Getattr => "getattr",
    Setattr => "setattr",
    Readlink => "readlink",
    Mknod => "mknod",
    Mkdir => "mkdir",
    Unlink => "unlink",
    Rmdir => "rmdir",
    Symlink => "symlink",
    Rename => "rename",
    Link => "link",
    Open => "open",
    Read => "read",
    Write => "write",
    Flush => "flush",
    Release => "release",
    Fsync => "fsync",
    Opendir => "opendir",
    Readdir => "readdir",
    Readdirplus => "readdirplus",
    Releasedir => "releasedir",
    Fsyncdir => "fsyncdir",
    Statfs => "statfs",
    Setxattr => "setxattr",
    Getxattr => "getxattr",
    Listxattr => "listxattr",
    Removexattr => "removexattr",
    Access => "access",
    Create => "create",
    Fallocate => "fallocate",
    Lseek => "lseek",
    CopyFileRange => "copy_file_range",
}

impl RequestCounts {
    fn add(&self, kind: RequestKind) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The kinds received at least once, with their counts.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        KIND_NAMES
            .iter()
            .zip(&self.0)
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// Listings made without OPENDIR. When the kernel's cached listings are kept (see
/// `FuseFs::keep_dir_cache`), opendir answers ENOSYS: the kernel then takes that as "no
/// opendir support" for the whole connection, sends no more OPENDIR or RELEASEDIR (two
/// requests per directory on every walk and every `git status`), keeps every directory's
/// listing as if FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE had been answered, and lists with handle 0.
/// A listing then runs on a core handle kept here per directory: made at offset 0, used for
/// the later offsets (the same snapshot, as with a handle of its own), dropped at the end of
/// the listing or when the directory is listed from the start again.
///
/// Limits: two listings of one directory at the same moment share one snapshot (one starting
/// over gives the other a fresh snapshot, the same entries unless the directory changed in
/// between); a listing given up before its end keeps its handle until the directory is listed
/// again; an error opening a directory the tree does not hold whole (EACCES from the target)
/// comes with the first getdents rather than with open.
#[derive(Default)]
struct Listings {
    /// directory --> the core handle its current listing runs on
    by_dir: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
}

impl Listings {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, u64>> {
        // No section panics midway, so a poisoned map is still consistent.
        self.by_dir.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The core handle to list `dir` from `offset` with: `fh` itself when the kernel has one,
    /// else the current listing's, or a new one (from the start, or when none is left).
    async fn begin(
        &self,
        core: &Core,
        caller: Option<kmount_proto::Caller>,
        dir: u64,
        fh: u64,
        offset: u64,
    ) -> Result<u64, FsError> {
        if fh != 0 {
            return Ok(fh);
        }
        if offset > 0
            && let Some(&fh) = self.map().get(&dir)
        {
            return Ok(fh);
        }
        self.renew(core, caller, dir).await
    }

    /// A new listing of `dir` (the one before, if any, is dropped): at offset 0, or when the
    /// handle was released by another listing of the same directory meanwhile (EBADF).
    async fn renew(
        &self,
        core: &Core,
        caller: Option<kmount_proto::Caller>,
        dir: u64,
    ) -> Result<u64, FsError> {
        let fh = core.opendir(caller, dir).await?;
        let replaced = self.map().insert(dir, fh);
        if let Some(old) = replaced {
            let _ = core.releasedir(dir, old).await;
        }
        Ok(fh)
    }

    /// The listing of `dir` on `fh` is over.
    async fn done(&self, core: &Core, dir: u64, fh: u64) {
        let mine = {
            let mut map = self.map();
            let mine = map.get(&dir) == Some(&fh);
            if mine {
                map.remove(&dir);
            }
            mine
        };
        if mine {
            let _ = core.releasedir(dir, fh).await;
        }
    }

    /// Lists `dir` from `offset` into `add` (`plus`: with attributes) on the kernel's handle
    /// `fh`, or without one (0) on the listing's own handle, which ends once a call gives
    /// nothing (`any` stayed false).
    #[allow(clippy::too_many_arguments)]
    async fn list<F>(
        &self,
        core: &Core,
        caller: Option<kmount_proto::Caller>,
        dir: u64,
        fh: u64,
        offset: u64,
        plus: bool,
        mut add: F,
        any: &AtomicBool,
    ) -> Result<(), FsError>
    where
        F: FnMut(&DirItem<'_>) -> bool + Send,
    {
        let mut h = self.begin(core, caller.clone(), dir, fh, offset).await?;
        let mut result = read_dir(core, caller.clone(), dir, h, offset, plus, &mut add).await;
        if fh == 0 && result.as_ref().is_err_and(|e| e.errno == libc::EBADF) {
            // Released by another listing of the directory meanwhile.
            h = self.renew(core, caller.clone(), dir).await?;
            result = read_dir(core, caller, dir, h, offset, plus, &mut add).await;
        }
        if fh == 0 && result.is_ok() && !any.load(Ordering::Relaxed) {
            self.done(core, dir, h).await;
        }
        result
    }
}

/// `readdir` (or with `plus`, `readdirplus`) of `dir` on the core handle `h`.
async fn read_dir<F>(
    core: &Core,
    caller: Option<kmount_proto::Caller>,
    dir: u64,
    h: u64,
    offset: u64,
    plus: bool,
    add: &mut F,
) -> Result<(), FsError>
where
    F: FnMut(&DirItem<'_>) -> bool + Send,
{
    if plus {
        core.readdirplus(caller, dir, h, offset, add).await
    } else {
        core.readdir(caller, dir, h, offset, add).await
    }
}

pub(crate) struct FuseFs {
    core: Arc<Core>,
    runtime: tokio::runtime::Handle,
    out: AttrOut,
    /// The user the agent runs as (not root), whose permissions the target applies.
    agent_user: Option<kmount_proto::Caller>,
    /// Directory listings the kernel caches stay cached until invalidated: only when every
    /// remote change reaches the kernel as an invalidation (the whole tree is kept and
    /// watched). Directories are then listed without OPENDIR ([`Listings`]). Without it,
    /// opendir answers `FOPEN_CACHE_DIR` alone, and the kernel drops a directory's cached
    /// listing at each opendir.
    keep_dir_cache: bool,
    listings: Arc<Listings>,
    counts: Arc<RequestCounts>,
}

/// How attributes are handed to the kernel: for how long, and with whose owner.
#[derive(Clone, Copy)]
struct AttrOut {
    ttl: Duration,
    owners: Option<OwnerMap>,
}

/// Whether a name missing from directory `parent` stays missing until the kernel is told
/// otherwise: the tree holds its complete listing, kept current by the watcher.
fn knows_every_name(core: &Core, parent: u64) -> bool {
    core.whole_tree() && {
        let t = core.tree().lock();
        t.is_complete(t.canon(parent))
    }
}

/// The answer to a lookup of a name that does not exist: node id 0 with a TTL, which the
/// kernel keeps as a negative entry for that long instead of asking again (git looks for a
/// `.gitignore` in every directory on every `git status`). The name appearing remotely
/// reaches the kernel as an entry invalidation ([`crate::tree`]); one made here replaces the
/// negative entry in the kernel itself. Only for directories of which
/// [`knows_every_name`].
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

impl AttrOut {
    fn attr(&self, a: &NodeAttr) -> FileAttr {
        fuse_attr(a, self.owners.as_ref())
    }
}

impl FuseFs {
    pub(crate) fn new(
        core: Arc<Core>,
        runtime: tokio::runtime::Handle,
        ttl: Duration,
        owners: Option<OwnerMap>,
        agent_user: Option<(u32, u32, Vec<u32>)>,
        keep_dir_cache: bool,
        counts: Arc<RequestCounts>,
    ) -> Self {
        Self {
            core,
            runtime,
            out: AttrOut { ttl, owners },
            agent_user: agent_user
                .filter(|(uid, _, _)| *uid != 0)
                .map(|(uid, gid, groups)| kmount_proto::Caller { uid, gid, groups }),
            keep_dir_cache,
            listings: Arc::default(),
            counts,
        }
    }

    /// Whom to check an operation for before the core takes it: the agent's user, when the
    /// core answers changes from its local copy (write-back) and would otherwise accept what
    /// the target then refuses. `None` when the target's own answer reaches the caller
    /// (write-through), for an agent running as root, and without an owner map (local
    /// targets, where the kernel or the agent's identity switching check).
    fn enforce(&self) -> Option<kmount_proto::Caller> {
        self.agent_user
            .clone()
            .filter(|_| self.core.write_back().is_some())
    }

    fn caller(&self, req: &Request) -> Option<kmount_proto::Caller> {
        self.core.caller(req.uid(), req.gid(), req.pid())
    }

    /// Answers with `ok` or the error's errno once `fut` is done: at once when it completes
    /// without waiting (an answer from the tree), else from a task on the runtime.
    fn respond<T, R, Fut, Ok>(&self, span: tracing::Span, reply: R, fut: Fut, ok: Ok)
    where
        T: Send + 'static,
        R: ErrorReply + Send + 'static,
        Fut: Future<Output = Result<T, FsError>> + Send + 'static,
        Ok: FnOnce(R, T) + Send + 'static,
    {
        self.run(
            async move {
                match fut.await {
                    Ok(v) => ok(reply, v),
                    Err(e) => {
                        log_error(&e);
                        reply.fail(Errno::from_i32(e.errno));
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Polls `fut` once here; when it must wait (for the agent), it goes on as a task.
    fn run(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut fut = Box::pin(fut);
        let _guard = self.runtime.enter();
        let mut cx = Context::from_waker(Waker::noop());
        if fut.as_mut().poll(&mut cx).is_pending() {
            self.runtime.spawn(fut);
        }
    }
}

fn log_error(e: &FsError) {
    match e.errno {
        libc::EIO | libc::ESTALE => tracing::warn!("{e}"),
        _ => tracing::debug!("{e}"),
    }
}

/// The error half of every fuser reply type.
trait ErrorReply {
    fn fail(self, errno: Errno);
}

macro_rules! error_reply {
    ($($t:ty),*) => {
        $(impl ErrorReply for $t {
            fn fail(self, errno: Errno) {
                self.error(errno)
            }
        })*
    };
}

error_reply!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr
);

fn file_type(kind: u32) -> FileType {
    match kind {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn fuse_attr(a: &NodeAttr, owners: Option<&OwnerMap>) -> FileAttr {
    let (uid, gid) = owner::shown(owners, a.uid, a.gid);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind()),
        perm: a.perm(),
        nlink: a.nlink,
        uid,
        gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// What an `open` with `flags` needs (`O_TRUNC` writes).
fn open_mask(flags: i32) -> i32 {
    let mask = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => libc::R_OK,
        libc::O_WRONLY => libc::W_OK,
        _ => libc::R_OK | libc::W_OK,
    };
    if flags & libc::O_TRUNC != 0 {
        mask | libc::W_OK
    } else {
        mask
    }
}

/// `access(2)` of node `id` for `who` against the tree's attributes (the remote's own owners and
/// modes), as the target will judge the operation; nothing to check without `who`.
async fn permit(
    core: &Core,
    who: &Option<kmount_proto::Caller>,
    id: u64,
    mask: i32,
) -> Result<(), FsError> {
    match who {
        Some(c) if !unsettled(core, id) => core.access(Some(c.clone()), id, mask).await,
        _ => Ok(()),
    }
}

/// Whether node `id` has changes the target has not applied yet. Its attributes may then be the
/// core's guess (a node made while the journal is busy gets the served directory's owner until
/// it settles), so the target's own verdict is waited for instead: a wrong refusal would be
/// worse than a late one.
fn unsettled(core: &Core, id: u64) -> bool {
    core.write_back()
        .is_some_and(|wb| wb.pending_seq(id).is_some())
}

/// What the target checks for a `setattr` by `who` (not root); see [`setattr_rule`].
async fn permit_setattr(
    core: &Core,
    who: &Option<kmount_proto::Caller>,
    id: u64,
    set: &SetAttr,
    by_handle: bool,
) -> Result<(), FsError> {
    let Some(c) = who else { return Ok(()) };
    if unsettled(core, id) {
        return Ok(());
    }
    let a = core.getattr(None, id).await?;
    if setattr_rule(c, &a, set, by_handle)? {
        permit(core, who, id, libc::W_OK).await?;
    }
    Ok(())
}

/// The target's rules for a `setattr` of a node with attributes `a` by `c` (not root): only the
/// owner changes modes, owners (to itself, and groups it is in) and sets explicit times
/// (`EPERM`). `Ok(true)`: write permission is needed too (a truncate by path; times set to
/// now by someone other than the owner).
fn setattr_rule(
    c: &kmount_proto::Caller,
    a: &NodeAttr,
    set: &SetAttr,
    by_handle: bool,
) -> Result<bool, FsError> {
    let owner = a.uid == c.uid;
    let in_group = |g: u32| g == c.gid || c.groups.contains(&g);
    let eperm = |what: &str| Err(crate::err!(libc::EPERM, "{what}: not the owner"));
    if set.mode.is_some() && !owner {
        return eperm("chmod");
    }
    if set.uid.is_some_and(|u| !owner || u != a.uid) {
        return eperm("chown");
    }
    if set
        .gid
        .is_some_and(|g| !owner || (g != a.gid && !in_group(g)))
    {
        return eperm("chgrp");
    }
    let explicit = |t: &Option<SetTime>| matches!(t, Some(SetTime::At(_)));
    if !owner && (explicit(&set.atime) || explicit(&set.mtime)) {
        return eperm("utimes");
    }
    let now = |t: &Option<SetTime>| matches!(t, Some(SetTime::Now));
    let truncate = set.size.is_some() && !by_handle;
    Ok(truncate || (!owner && (now(&set.atime) || now(&set.mtime))))
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(timespec(t)),
    }
}

fn reply_xattr(reply: ReplyXattr, x: Xattr) {
    match x {
        Xattr::Size(n) => reply.size(n),
        Xattr::Data(d) => reply.data(&d),
    }
}

fn bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let offered = config.capabilities();
        let wanted = WANTED & offered;
        if let Err(missing) = config.add_capabilities(wanted) {
            tracing::debug!("kernel refused capabilities {missing:?}");
        }
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            let _ = config.set_max_background(nearest);
        }
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(nearest);
        }
        tracing::debug!(
            abi = %config.kernel_abi(),
            granted = ?wanted,
            not_offered = ?(WANTED - offered),
            "FUSE session initialised"
        );
        Ok(())
    }

    fn destroy(&mut self) {
        // No invalidation may reach the kernel once the session is over.
        self.core.shutdown();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.counts.add(RequestKind::Lookup);
        let span = tracing::debug_span!("lookup", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name, out) =
            (self.core.clone(), self.caller(req), bytes(name), self.out);
        self.run(
            async move {
                match core.lookup(caller, parent.0, &name).await {
                    Ok(a) => reply.entry(&out.ttl, &out.attr(&a), Generation(0)),
                    Err(e) if e.errno == libc::ENOENT && knows_every_name(&core, parent.0) => {
                        reply.entry(&out.ttl, &negative_entry(), Generation(0))
                    }
                    Err(e) => {
                        log_error(&e);
                        reply.error(Errno::from_i32(e.errno));
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Also called for each node of a BATCH_FORGET (fuser's default), and counted so.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.counts.add(RequestKind::Forget);
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.counts.add(RequestKind::Getattr);
        let span = tracing::debug_span!("getattr", req = req.unique().0, ino = ino.0);
        let (core, caller, out) = (self.core.clone(), self.caller(req), self.out);
        self.respond(
            span,
            reply,
            async move { core.getattr(caller, ino.0).await },
            move |r, a| r.attr(&out.ttl, &out.attr(&a)),
        );
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.counts.add(RequestKind::Setattr);
        let span = tracing::debug_span!("setattr", req = req.unique().0, ino = ino.0);
        let (uid, gid) = owner::requested(self.out.owners.as_ref(), uid, gid);
        let set = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        let (core, caller, out) = (self.core.clone(), self.caller(req), self.out);
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit_setattr(&core, &who, ino.0, &set, fh.is_some()).await?;
                core.setattr(caller, ino.0, fh.map(|f| f.0), set).await
            },
            move |r, a| r.attr(&out.ttl, &out.attr(&a)),
        );
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.counts.add(RequestKind::Readlink);
        let span = tracing::debug_span!("readlink", req = req.unique().0, ino = ino.0);
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.readlink(caller, ino.0).await },
            |r, d| r.data(&d),
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.counts.add(RequestKind::Mknod);
        let span = tracing::debug_span!("mknod", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name, out) =
            (self.core.clone(), self.caller(req), bytes(name), self.out);
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit(&core, &who, parent.0, libc::W_OK | libc::X_OK).await?;
                core.mknod(caller, parent.0, &name, mode, rdev).await
            },
            move |r, a| r.entry(&out.ttl, &out.attr(&a), Generation(0)),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.counts.add(RequestKind::Mkdir);
        let span = tracing::debug_span!("mkdir", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name, out) =
            (self.core.clone(), self.caller(req), bytes(name), self.out);
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit(&core, &who, parent.0, libc::W_OK | libc::X_OK).await?;
                core.mkdir(caller, parent.0, &name, mode).await
            },
            move |r, a| r.entry(&out.ttl, &out.attr(&a), Generation(0)),
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.counts.add(RequestKind::Unlink);
        let span = tracing::debug_span!("unlink", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name) = (self.core.clone(), self.caller(req), bytes(name));
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit(&core, &who, parent.0, libc::W_OK | libc::X_OK).await?;
                core.unlink(caller, parent.0, &name).await
            },
            |r, ()| r.ok(),
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.counts.add(RequestKind::Rmdir);
        let span = tracing::debug_span!("rmdir", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name) = (self.core.clone(), self.caller(req), bytes(name));
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit(&core, &who, parent.0, libc::W_OK | libc::X_OK).await?;
                core.rmdir(caller, parent.0, &name).await
            },
            |r, ()| r.ok(),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.counts.add(RequestKind::Symlink);
        let span = tracing::debug_span!("symlink", req = req.unique().0, ino = parent.0, name = ?link_name);
        let (core, caller, out) = (self.core.clone(), self.caller(req), self.out);
        let (name, target) = (bytes(link_name), bytes(target.as_os_str()));
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit(&core, &who, parent.0, libc::W_OK | libc::X_OK).await?;
                core.symlink(caller, parent.0, &name, &target).await
            },
            move |r, a| r.entry(&out.ttl, &out.attr(&a), Generation(0)),
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.counts.add(RequestKind::Rename);
        let span = tracing::debug_span!(
            "rename",
            req = req.unique().0,
            ino = parent.0,
            ?name,
            new_ino = newparent.0,
            ?newname
        );
        let (core, caller) = (self.core.clone(), self.caller(req));
        let (name, newname) = (bytes(name), bytes(newname));
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit(&core, &who, parent.0, libc::W_OK | libc::X_OK).await?;
                permit(&core, &who, newparent.0, libc::W_OK | libc::X_OK).await?;
                core.rename(caller, parent.0, &name, newparent.0, &newname, flags.bits())
                    .await
            },
            |r, ()| r.ok(),
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.counts.add(RequestKind::Link);
        let span = tracing::debug_span!(
            "link",
            req = req.unique().0,
            ino = ino.0,
            new_ino = newparent.0,
            name = ?newname
        );
        let (core, caller, out) = (self.core.clone(), self.caller(req), self.out);
        let name = bytes(newname);
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit(&core, &who, newparent.0, libc::W_OK | libc::X_OK).await?;
                core.link(caller, ino.0, newparent.0, &name).await
            },
            move |r, a| r.entry(&out.ttl, &out.attr(&a), Generation(0)),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.counts.add(RequestKind::Open);
        let span = tracing::debug_span!("open", req = req.unique().0, ino = ino.0, flags = flags.0);
        let (core, caller) = (self.core.clone(), self.caller(req));
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit(&core, &who, ino.0, open_mask(flags.0)).await?;
                core.open(caller, ino.0, flags.0).await
            },
            |r, o| {
                let flags = if o.keep_cache {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                r.opened(FileHandle(o.fh), flags)
            },
        );
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.counts.add(RequestKind::Read);
        let span = tracing::debug_span!(
            "read",
            req = req.unique().0,
            ino = ino.0,
            fh = fh.0,
            offset,
            size
        );
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.read(caller, fh.0, offset, size).await },
            |r, d| r.data(&d),
        );
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.counts.add(RequestKind::Write);
        let span = tracing::debug_span!(
            "write",
            req = req.unique().0,
            ino = ino.0,
            fh = fh.0,
            offset,
            len = data.len()
        );
        let (core, caller, data) = (self.core.clone(), self.caller(req), data.to_vec());
        self.respond(
            span,
            reply,
            async move { core.write(caller, fh.0, offset, data).await },
            |r, n| r.written(n),
        );
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.counts.add(RequestKind::Flush);
        let span = tracing::debug_span!("flush", req = req.unique().0, ino = ino.0, fh = fh.0);
        let core = self.core.clone();
        self.respond(
            span,
            reply,
            async move { core.flush(fh.0).await },
            |r, ()| r.ok(),
        );
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.counts.add(RequestKind::Release);
        let span = tracing::debug_span!("release", req = req.unique().0, ino = ino.0, fh = fh.0);
        let core = self.core.clone();
        self.respond(
            span,
            reply,
            async move { core.release(ino.0, fh.0).await },
            |r, ()| r.ok(),
        );
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.counts.add(RequestKind::Fsync);
        let span = tracing::debug_span!("fsync", req = req.unique().0, ino = ino.0, fh = fh.0);
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.fsync(caller, fh.0, datasync).await },
            |r, ()| r.ok(),
        );
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.counts.add(RequestKind::Opendir);
        let span = tracing::debug_span!("opendir", req = req.unique().0, ino = ino.0);
        if self.keep_dir_cache {
            // Never asked again on this connection; see `Listings`.
            reply.error(Errno::ENOSYS);
            return;
        }
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.opendir(caller, ino.0).await },
            |r, fh| r.opened(FileHandle(fh), FopenFlags::FOPEN_CACHE_DIR),
        );
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.counts.add(RequestKind::Readdir);
        let span = tracing::debug_span!(
            "readdir",
            req = req.unique().0,
            ino = ino.0,
            fh = fh.0,
            offset
        );
        let (core, caller, listings) = (self.core.clone(), self.caller(req), self.listings.clone());
        self.run(
            async move {
                let any = AtomicBool::new(false);
                let add = |item: &DirItem<'_>| {
                    any.store(true, Ordering::Relaxed);
                    reply.add(
                        INodeNo(item.ino),
                        item.offset,
                        file_type(item.kind),
                        OsStr::from_bytes(item.name),
                    )
                };
                let result = listings
                    .list(&core, caller, ino.0, fh.0, offset, false, add, &any)
                    .await;
                match result {
                    Ok(()) => reply.ok(),
                    Err(e) => {
                        log_error(&e);
                        reply.error(Errno::from_i32(e.errno));
                    }
                }
            }
            .instrument(span),
        );
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.counts.add(RequestKind::Readdirplus);
        let span = tracing::debug_span!(
            "readdirplus",
            req = req.unique().0,
            ino = ino.0,
            fh = fh.0,
            offset
        );
        let (core, caller, out, listings) = (
            self.core.clone(),
            self.caller(req),
            self.out,
            self.listings.clone(),
        );
        self.run(
            async move {
                let any = AtomicBool::new(false);
                let add = |item: &DirItem<'_>| match &item.attr {
                    Some(attr) => {
                        any.store(true, Ordering::Relaxed);
                        reply.add(
                            INodeNo(item.ino),
                            item.offset,
                            OsStr::from_bytes(item.name),
                            &out.ttl,
                            &out.attr(attr),
                            Generation(0),
                        )
                    }
                    None => false,
                };
                let result = listings
                    .list(&core, caller, ino.0, fh.0, offset, true, add, &any)
                    .await;
                match result {
                    Ok(()) => reply.ok(),
                    Err(e) => {
                        log_error(&e);
                        reply.error(Errno::from_i32(e.errno));
                    }
                }
            }
            .instrument(span),
        );
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.counts.add(RequestKind::Releasedir);
        let span = tracing::debug_span!("releasedir", req = req.unique().0, ino = ino.0, fh = fh.0);
        let core = self.core.clone();
        self.respond(
            span,
            reply,
            async move { core.releasedir(ino.0, fh.0).await },
            |r, ()| r.ok(),
        );
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.counts.add(RequestKind::Fsyncdir);
        // Directory operations are synchronous in the agent: nothing is pending.
        reply.ok();
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.counts.add(RequestKind::Statfs);
        let span = tracing::debug_span!("statfs", req = req.unique().0, ino = ino.0);
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.statfs(caller).await },
            |r, s| {
                r.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                )
            },
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.counts.add(RequestKind::Setxattr);
        let span = tracing::debug_span!("setxattr", req = req.unique().0, ino = ino.0, ?name);
        let (core, caller, name, value) = (
            self.core.clone(),
            self.caller(req),
            bytes(name),
            value.to_vec(),
        );
        self.respond(
            span,
            reply,
            async move { core.setxattr(caller, ino.0, &name, &value, flags).await },
            |r, ()| r.ok(),
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.counts.add(RequestKind::Getxattr);
        let span = tracing::debug_span!("getxattr", req = req.unique().0, ino = ino.0, ?name, size);
        let (core, caller, name) = (self.core.clone(), self.caller(req), bytes(name));
        self.respond(
            span,
            reply,
            async move { core.getxattr(caller, ino.0, &name, size).await },
            reply_xattr,
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.counts.add(RequestKind::Listxattr);
        let span = tracing::debug_span!("listxattr", req = req.unique().0, ino = ino.0, size);
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.listxattr(caller, ino.0, size).await },
            reply_xattr,
        );
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.counts.add(RequestKind::Removexattr);
        let span = tracing::debug_span!("removexattr", req = req.unique().0, ino = ino.0, ?name);
        let (core, caller, name) = (self.core.clone(), self.caller(req), bytes(name));
        self.respond(
            span,
            reply,
            async move { core.removexattr(caller, ino.0, &name).await },
            |r, ()| r.ok(),
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.counts.add(RequestKind::Access);
        let span = tracing::debug_span!("access", req = req.unique().0, ino = ino.0);
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.access(caller, ino.0, mask.bits()).await },
            |r, ()| r.ok(),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.counts.add(RequestKind::Create);
        let span = tracing::debug_span!("create", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name, out) =
            (self.core.clone(), self.caller(req), bytes(name), self.out);
        let who = self.enforce();
        self.respond(
            span,
            reply,
            async move {
                permit(&core, &who, parent.0, libc::W_OK | libc::X_OK).await?;
                core.create(caller, parent.0, &name, mode, flags).await
            },
            move |r, c| {
                r.created(
                    &out.ttl,
                    &out.attr(&c.attr),
                    Generation(0),
                    FileHandle(c.fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            },
        );
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.counts.add(RequestKind::Fallocate);
        let span = tracing::debug_span!("fallocate", req = req.unique().0, ino = ino.0, fh = fh.0);
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.fallocate(caller, fh.0, offset, length, mode).await },
            |r, ()| r.ok(),
        );
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.counts.add(RequestKind::Lseek);
        let span = tracing::debug_span!("lseek", req = req.unique().0, ino = ino.0, fh = fh.0);
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.lseek(caller, fh.0, offset, whence).await },
            |r, o| r.offset(o),
        );
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.counts.add(RequestKind::CopyFileRange);
        // The kernel falls back to reading and writing.
        reply.error(Errno::ENOSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(uid: u32, gid: u32) -> NodeAttr {
        NodeAttr {
            ino: 7,
            size: 3,
            blocks: 8,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            mode: libc::S_IFREG | 0o644,
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
        }
    }

    #[test]
    fn opens_need_what_their_flags_ask() {
        assert_eq!(open_mask(libc::O_RDONLY), libc::R_OK);
        assert_eq!(open_mask(libc::O_WRONLY | libc::O_APPEND), libc::W_OK);
        assert_eq!(open_mask(libc::O_RDWR), libc::R_OK | libc::W_OK);
        assert_eq!(
            open_mask(libc::O_RDONLY | libc::O_TRUNC),
            libc::R_OK | libc::W_OK
        );
    }

    #[test]
    fn setattr_follows_the_targets_rules_for_its_user() {
        let app = kmount_proto::Caller {
            uid: 1000,
            gid: 1000,
            groups: vec![50],
        };
        let mine = attr(1000, 1000);
        let roots = attr(0, 0);
        let set = |f: fn(&mut SetAttr)| {
            let mut s = SetAttr {
                mode: None,
                uid: None,
                gid: None,
                size: None,
                atime: None,
                mtime: None,
            };
            f(&mut s);
            s
        };
        let errno = |r: Result<bool, FsError>| r.map_err(|e| e.errno);
        let chmod = set(|s| s.mode = Some(0o600));
        assert_eq!(errno(setattr_rule(&app, &mine, &chmod, false)), Ok(false));
        assert_eq!(
            errno(setattr_rule(&app, &roots, &chmod, false)),
            Err(libc::EPERM)
        );
        // chown: only to itself (what a chown to the mapped local user becomes), groups it is in.
        let to_self = set(|s| {
            s.uid = Some(1000);
            s.gid = Some(1000)
        });
        assert_eq!(errno(setattr_rule(&app, &mine, &to_self, false)), Ok(false));
        let give_away = set(|s| s.uid = Some(0));
        assert_eq!(
            errno(setattr_rule(&app, &mine, &give_away, false)),
            Err(libc::EPERM)
        );
        let chgrp = |g| {
            let mut s = set(|_| {});
            s.gid = Some(g);
            s
        };
        assert_eq!(
            errno(setattr_rule(&app, &mine, &chgrp(50), false)),
            Ok(false)
        );
        assert_eq!(
            errno(setattr_rule(&app, &mine, &chgrp(7), false)),
            Err(libc::EPERM)
        );
        assert_eq!(
            errno(setattr_rule(&app, &roots, &to_self, false)),
            Err(libc::EPERM)
        );
        // Times: explicit ones by the owner only; now by the owner, or with write permission.
        let touch_at =
            set(|s| s.mtime = Some(SetTime::At(kmount_proto::Timespec { sec: 1, nsec: 0 })));
        assert_eq!(
            errno(setattr_rule(&app, &mine, &touch_at, false)),
            Ok(false)
        );
        assert_eq!(
            errno(setattr_rule(&app, &roots, &touch_at, false)),
            Err(libc::EPERM)
        );
        let touch_now = set(|s| s.atime = Some(SetTime::Now));
        assert_eq!(
            errno(setattr_rule(&app, &mine, &touch_now, false)),
            Ok(false)
        );
        assert_eq!(
            errno(setattr_rule(&app, &roots, &touch_now, false)),
            Ok(true)
        );
        // A truncate by path needs write permission, also for the owner; by handle the open did.
        let truncate = set(|s| s.size = Some(0));
        assert_eq!(errno(setattr_rule(&app, &mine, &truncate, false)), Ok(true));
        assert_eq!(
            errno(setattr_rule(&app, &roots, &truncate, true)),
            Ok(false)
        );
    }

    #[test]
    fn the_kernel_sees_the_agent_user_as_the_local_user() {
        let map = OwnerMap {
            remote_uid: 1000,
            remote_gid: 1000,
            local_uid: 0,
            local_gid: 0,
        };
        let out = AttrOut {
            ttl: Duration::from_secs(1),
            owners: Some(map),
        };
        let a = out.attr(&attr(1000, 1000));
        assert_eq!((a.uid, a.gid, a.perm, a.ino), (0, 0, 0o644, INodeNo(7)));
        let a = out.attr(&attr(33, 1000));
        assert_eq!((a.uid, a.gid), (33, 0));
        let plain = AttrOut {
            ttl: Duration::from_secs(1),
            owners: None,
        };
        let a = plain.attr(&attr(1000, 1000));
        assert_eq!((a.uid, a.gid), (1000, 1000));
    }
}
