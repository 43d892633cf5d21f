//! The fuser adapter: converts each kernel request into a [`Core`] call run on the tokio
//! runtime, and the result into the reply. Handlers return at once, so a slow request never
//! holds up the others.

use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
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

use crate::core::{Core, NodeAttr, Xattr, timespec};
use crate::error::FsError;
use crate::owner::{self, OwnerMap};

/// Capabilities asked of the kernel when it offers them. Left out on purpose:
/// - `FUSE_WRITEBACK_CACHE`: it trusts the local size and mtime over the remote's and breaks
///   `O_APPEND`;
/// - `FUSE_ATOMIC_O_TRUNC`: with it the kernel sends `O_TRUNC` inside FUSE_OPEN, before its own
///   checks (ETXTBSY for a running executable, LSM truncate hooks), so a failing
///   `open(O_TRUNC)` would already have emptied the file. Without it the kernel truncates with
///   a SETATTR after those checks.
const WANTED: InitFlags = InitFlags::FUSE_DO_READDIRPLUS
    .union(InitFlags::FUSE_READDIRPLUS_AUTO)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_AUTO_INVAL_DATA)
    .union(InitFlags::FUSE_CACHE_SYMLINKS);

const MAX_BACKGROUND: u16 = 64;
const MAX_WRITE: u32 = 1 << 20;
const MAX_READAHEAD: u32 = 1 << 20;

pub(crate) struct FuseFs {
    core: Arc<Core>,
    runtime: tokio::runtime::Handle,
    out: AttrOut,
}

/// How attributes are handed to the kernel: for how long, and with whose owner.
#[derive(Clone, Copy)]
struct AttrOut {
    ttl: Duration,
    owners: Option<OwnerMap>,
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
    ) -> Self {
        Self {
            core,
            runtime,
            out: AttrOut { ttl, owners },
        }
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
        let span = tracing::debug_span!("lookup", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name, out) =
            (self.core.clone(), self.caller(req), bytes(name), self.out);
        self.respond(
            span,
            reply,
            async move { core.lookup(caller, parent.0, &name).await },
            move |r, a| r.entry(&out.ttl, &out.attr(&a), Generation(0)),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
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
        self.respond(
            span,
            reply,
            async move { core.setattr(caller, ino.0, fh.map(|f| f.0), set).await },
            move |r, a| r.attr(&out.ttl, &out.attr(&a)),
        );
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
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
        let span = tracing::debug_span!("mknod", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name, out) =
            (self.core.clone(), self.caller(req), bytes(name), self.out);
        self.respond(
            span,
            reply,
            async move { core.mknod(caller, parent.0, &name, mode, rdev).await },
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
        let span = tracing::debug_span!("mkdir", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name, out) =
            (self.core.clone(), self.caller(req), bytes(name), self.out);
        self.respond(
            span,
            reply,
            async move { core.mkdir(caller, parent.0, &name, mode).await },
            move |r, a| r.entry(&out.ttl, &out.attr(&a), Generation(0)),
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let span = tracing::debug_span!("unlink", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name) = (self.core.clone(), self.caller(req), bytes(name));
        self.respond(
            span,
            reply,
            async move { core.unlink(caller, parent.0, &name).await },
            |r, ()| r.ok(),
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let span = tracing::debug_span!("rmdir", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name) = (self.core.clone(), self.caller(req), bytes(name));
        self.respond(
            span,
            reply,
            async move { core.rmdir(caller, parent.0, &name).await },
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
        let span = tracing::debug_span!("symlink", req = req.unique().0, ino = parent.0, name = ?link_name);
        let (core, caller, out) = (self.core.clone(), self.caller(req), self.out);
        let (name, target) = (bytes(link_name), bytes(target.as_os_str()));
        self.respond(
            span,
            reply,
            async move { core.symlink(caller, parent.0, &name, &target).await },
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
        self.respond(
            span,
            reply,
            async move {
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
        let span = tracing::debug_span!(
            "link",
            req = req.unique().0,
            ino = ino.0,
            new_ino = newparent.0,
            name = ?newname
        );
        let (core, caller, out) = (self.core.clone(), self.caller(req), self.out);
        let name = bytes(newname);
        self.respond(
            span,
            reply,
            async move { core.link(caller, ino.0, newparent.0, &name).await },
            move |r, a| r.entry(&out.ttl, &out.attr(&a), Generation(0)),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let span = tracing::debug_span!("open", req = req.unique().0, ino = ino.0, flags = flags.0);
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.respond(
            span,
            reply,
            async move { core.open(caller, ino.0, flags.0).await },
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
        let span = tracing::debug_span!("opendir", req = req.unique().0, ino = ino.0);
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
        let span = tracing::debug_span!(
            "readdir",
            req = req.unique().0,
            ino = ino.0,
            fh = fh.0,
            offset
        );
        let (core, caller) = (self.core.clone(), self.caller(req));
        self.run(
            async move {
                let result = core
                    .readdir(caller, ino.0, fh.0, offset, |item| {
                        reply.add(
                            INodeNo(item.ino),
                            item.offset,
                            file_type(item.kind),
                            OsStr::from_bytes(item.name),
                        )
                    })
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
        let span = tracing::debug_span!(
            "readdirplus",
            req = req.unique().0,
            ino = ino.0,
            fh = fh.0,
            offset
        );
        let (core, caller, out) = (self.core.clone(), self.caller(req), self.out);
        self.run(
            async move {
                let result = core
                    .readdirplus(caller, ino.0, fh.0, offset, |item| match &item.attr {
                        Some(attr) => reply.add(
                            INodeNo(item.ino),
                            item.offset,
                            OsStr::from_bytes(item.name),
                            &out.ttl,
                            &out.attr(attr),
                            Generation(0),
                        ),
                        None => false,
                    })
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
        // Directory operations are synchronous in the agent: nothing is pending.
        reply.ok();
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
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
        let span = tracing::debug_span!("create", req = req.unique().0, ino = parent.0, ?name);
        let (core, caller, name, out) =
            (self.core.clone(), self.caller(req), bytes(name), self.out);
        self.respond(
            span,
            reply,
            async move { core.create(caller, parent.0, &name, mode, flags).await },
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
