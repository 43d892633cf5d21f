//! The operations of the protocol ([`Op`]), each on the confined root, each answering with the
//! real errno of the call that failed.

use std::ffi::CStr;
use std::fmt::Display;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kmount_proto::{
    Attr, DirEntry, Done, MAX_FRAME_LEN, MAX_IO_LEN, NodeRef, Op, RelPath, SetAttr, SetTime,
    Statfs, Timespec, WireError,
};

use crate::command::Commands;
use crate::confine::{Loc, Root, with_fallback};
use crate::echo::Echo;
use crate::handles::{DirStream, Handle, Handles};
use crate::hide::Hide;
use crate::journal::{self, Journal};
use crate::sys::{self, Errno, SysResult, cstring, cvt, retry};
use crate::walk::{self, Walks};
use crate::watch::Watch;
use crate::xattr::{self, Target};
use crate::{digest, pathops};

/// Everything one session's operations work on.
#[derive(Debug)]
pub struct Agent {
    pub root: Arc<Root>,
    pub handles: Handles,
    pub walks: Walks,
    pub echo: Arc<Echo>,
    pub watch: Watch,
    pub journal: Journal,
    /// The mount's ignore rules (`Op::SetRules`): what this session hides.
    pub hide: Arc<Hide>,
    /// Commands running for `Op::RunCommand`.
    pub commands: Commands,
}

impl Agent {
    pub fn new(root: Root) -> Agent {
        Agent::with_journal(root, Journal::default())
    }

    pub fn with_journal(root: Root, journal: Journal) -> Agent {
        Agent {
            root: Arc::new(root),
            handles: Handles::default(),
            walks: Walks::default(),
            echo: Arc::new(Echo::default()),
            watch: Watch::default(),
            journal,
            hide: Arc::new(Hide::default()),
            commands: Commands::default(),
        }
    }
}

/// Open flags passed through from the mount. `O_CREAT`, `O_EXCL` (except for create),
/// `O_NOCTTY`, `O_DIRECT`, `O_ASYNC`, `O_PATH` and `O_TMPFILE` are dropped; `O_NOFOLLOW` and
/// `O_CLOEXEC` are always added by [`Root::open_beneath`].
const OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_TRUNC
    | libc::O_NONBLOCK
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_NOATIME
    | libc::O_DIRECTORY
    | libc::O_LARGEFILE;

/// Rough upper bound of the encoded bytes of one readdir batch, well inside a frame.
const DIR_BATCH_BYTES: usize = MAX_FRAME_LEN / 4;

/// Runs one operation; what a mutating one leaves behind is recorded for echo suppression.
pub fn execute(a: &Agent, op: Op) -> Result<Done, WireError> {
    let pending = a.echo.begin(a, &op);
    let result = dispatch(a, op);
    if let Some(p) = pending {
        let told = match &result {
            Ok(Done::Attr(at) | Done::Opened { attr: at, .. }) => Some(at),
            _ => None,
        };
        a.echo.finish_told(&a.root, p, result.is_ok(), told);
    }
    result
}

/// `Op::WalkNext` in its place in line (see [`walk`]).
pub fn walk_next(
    a: &Agent,
    handle: u64,
    max: u32,
    ticket: Option<walk::Ticket>,
) -> Result<Done, WireError> {
    walk::next(a, handle, max, ticket).map_err(|e| fail(e, "walk handle", handle))
}

fn watch(a: &Agent, enable: bool) -> Result<Done, WireError> {
    if enable {
        a.watch.enable(&a.root, &a.echo, &a.hide)?;
    } else {
        a.watch.disable(&a.echo);
    }
    Ok(Done::Ok)
}

/// `Op::SetRules`. New rules while the watcher runs restart it (which directories are
/// watched depends on them) and ask the mount to walk everything again.
fn set_rules(a: &Agent, rules: &kmount_proto::rules::RulesConfig) -> Result<Done, WireError> {
    if a.hide.set(rules)? && a.watch.is_running() {
        a.watch.disable(&a.echo);
        a.watch.enable(&a.root, &a.echo, &a.hide)?;
        a.watch.report(vec![kmount_proto::Event::Rescan {
            path: RelPath::root(),
            reason: "the ignore rules changed".into(),
        }]);
    }
    Ok(Done::Ok)
}

fn dispatch(a: &Agent, op: Op) -> Result<Done, WireError> {
    match op {
        Op::SetRules { rules } => set_rules(a, &rules),
        Op::RunCommand {
            command,
            timeout_ms,
        } => crate::command::run(a, &command, timeout_ms),
        Op::Lookup { path } => lookup(a, &path).map_err(|e| fail(e, "lstat", &path)),
        Op::GetAttr { node } => getattr(a, &node).map_err(|e| fail(e, "stat", node_name(&node))),
        Op::SetAttr { node, set } => {
            setattr(a, &node, &set).map_err(|e| fail(e, "setattr", node_name(&node)))
        }
        Op::OpenDir { path } => opendir(a, &path).map_err(|e| fail(e, "opendir", &path)),
        Op::ReadDir { handle, max } => {
            readdir(a, handle, max).map_err(|e| fail(e, "readdir handle", handle))
        }
        Op::Open { path, flags } => open(a, &path, flags).map_err(|e| fail(e, "open", &path)),
        Op::Create { path, flags, mode } => {
            create(a, &path, flags, mode).map_err(|e| fail(e, "create", &path))
        }
        Op::Read {
            handle,
            offset,
            len,
        } => read(a, handle, offset, len).map_err(|e| fail(e, "read handle", handle)),
        Op::Write {
            handle,
            offset,
            data,
        } => write(a, handle, offset, &data).map_err(|e| fail(e, "write handle", handle)),
        Op::Fsync { handle, datasync } => {
            fsync(a, handle, datasync).map_err(|e| fail(e, "fsync handle", handle))
        }
        Op::Fallocate {
            handle,
            mode,
            offset,
            len,
        } => {
            fallocate(a, handle, mode, offset, len).map_err(|e| fail(e, "fallocate handle", handle))
        }
        Op::Close { handle } => close(a, handle).map_err(|e| fail(e, "close handle", handle)),
        Op::Mkdir { path, mode } => mkdir(a, &path, mode).map_err(|e| fail(e, "mkdir", &path)),
        Op::Mknod { path, mode, rdev } => {
            mknod(a, &path, mode, rdev).map_err(|e| fail(e, "mknod", &path))
        }
        Op::Symlink { path, target } => {
            symlink(a, &path, &target).map_err(|e| fail(e, "symlink", &path))
        }
        Op::Readlink { path } => readlink(a, &path).map_err(|e| fail(e, "readlink", &path)),
        Op::Link { from, to } => {
            link(a, &from, &to).map_err(|e| fail(e, "link", format_args!("{from} to {to}")))
        }
        Op::Unlink { path } => remove(a, &path, 0).map_err(|e| fail(e, "unlink", &path)),
        Op::Rmdir { path } => {
            remove(a, &path, libc::AT_REMOVEDIR).map_err(|e| fail(e, "rmdir", &path))
        }
        Op::Rename { from, to, flags } => rename(a, &from, &to, flags)
            .map_err(|e| fail(e, "rename", format_args!("{from} to {to}"))),
        Op::Statfs => statfs(a).map_err(|e| fail(e, "statfs", ".")),
        Op::GetXattr { node, name } => {
            getxattr(a, &node, &name).map_err(|e| fail(e, "getxattr", xattr_name(&node, &name)))
        }
        Op::ListXattr { node } => {
            listxattr(a, &node).map_err(|e| fail(e, "listxattr", node_name(&node)))
        }
        Op::SetXattr {
            node,
            name,
            value,
            flags,
        } => setxattr(a, &node, &name, &value, flags)
            .map_err(|e| fail(e, "setxattr", xattr_name(&node, &name))),
        Op::RemoveXattr { node, name } => removexattr(a, &node, &name)
            .map_err(|e| fail(e, "removexattr", xattr_name(&node, &name))),
        Op::Access { path, mask } => access(a, &path, mask).map_err(|e| fail(e, "access", &path)),
        Op::Ping => Ok(Done::Ok),
        Op::Lseek {
            handle,
            offset,
            whence,
        } => lseek(a, handle, offset, whence).map_err(|e| fail(e, "lseek handle", handle)),
        Op::WalkOpen { path } => walk::open(a, &path).map_err(|e| fail(e, "walk", &path)),
        Op::WalkNext { handle, max } => walk_next(a, handle, max, None),
        Op::Watch { enable } => watch(a, enable),
        Op::Digest { path, depth } => {
            digest::digest(a, &path, depth).map_err(|e| fail(e, "digest", &path))
        }
        Op::Journaled { session, seq, op } => journal::journaled(a, session, seq, *op),
        Op::AppliedSeq { session } => Ok(Done::Seq(a.journal.applied(session))),
        Op::PutFile {
            path,
            data,
            compressed,
            mode,
            mtime,
            atomic,
            keep_mode,
        } => {
            let how = pathops::Put {
                compressed,
                mode,
                mtime,
                atomic,
                keep_mode,
            };
            pathops::put_file(a, &path, &data, how).map_err(|e| fail(e, "write whole file", &path))
        }
        Op::ReadPath { path, offset, len } => {
            pathops::read_path(a, &path, offset, len).map_err(|e| fail(e, "read", &path))
        }
        Op::FsyncPath { path, datasync } => {
            pathops::fsync_path(a, &path, datasync).map_err(|e| fail(e, "fsync", &path))
        }
        Op::WritePath { path, offset, data } => {
            pathops::write_path(a, &path, offset, &data).map_err(|e| fail(e, "write", &path))
        }
        Op::FallocatePath {
            path,
            mode,
            offset,
            len,
        } => pathops::fallocate_path(a, &path, mode, offset, len)
            .map_err(|e| fail(e, "fallocate", &path)),
    }
}

fn fail(e: Errno, what: &str, subject: impl Display) -> WireError {
    WireError::new(e.0, format!("{what} {subject}: {}", e.describe()))
}

fn node_name(node: &NodeRef) -> String {
    match node {
        NodeRef::Path(p) => p.to_string(),
        NodeRef::Handle(h) => format!("handle {h}"),
    }
}

/// An xattr name for a message, cut short when it is absurdly long (a name is at most 255
/// bytes on Linux; the wire allows any length, and the message must not echo a megabyte).
fn xattr_name(node: &NodeRef, name: &[u8]) -> String {
    const SHOWN: usize = 255;
    let shown = String::from_utf8_lossy(&name[..name.len().min(SHOWN)]);
    let more = match name.len() > SHOWN {
        true => format!("... ({} bytes)", name.len()),
        false => String::new(),
    };
    format!("{shown}{more} of {}", node_name(node))
}

// ---- attributes ----------------------------------------------------------------------------

fn ts(sec: i64, nsec: i64) -> Timespec {
    Timespec {
        sec,
        nsec: nsec as u32,
    }
}

/// The wire form of a `stat` result, field for field.
pub fn attr(st: &libc::stat) -> Attr {
    Attr {
        ino: st.st_ino,
        dev: st.st_dev,
        mode: st.st_mode,
        nlink: st.st_nlink,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        blksize: st.st_blksize as u32,
        atime: ts(st.st_atime, st.st_atime_nsec),
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
    }
}

fn stat_loc(loc: &Loc<'_>) -> SysResult<libc::stat> {
    sys::fstatat(loc.dirfd(), loc.name(), libc::AT_SYMLINK_NOFOLLOW)
}

fn lookup(a: &Agent, path: &RelPath) -> SysResult<Done> {
    let loc = a.root.locate(path)?;
    let found = attr(&stat_loc(&loc)?);
    if a.hide.hidden(path, found.is_dir()) {
        return Err(Errno(libc::ENOENT));
    }
    Ok(Done::Attr(found))
}

fn getattr(a: &Agent, node: &NodeRef) -> SysResult<Done> {
    match node {
        NodeRef::Path(p) => lookup(a, p),
        NodeRef::Handle(h) => {
            let h = a.handles.get(*h)?;
            Ok(Done::Attr(attr(&sys::fstat(h.fd())?)))
        }
    }
}

fn utime(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => libc::timespec {
            tv_sec: t.sec,
            tv_nsec: i64::from(t.nsec),
        },
    }
}

/// The `utimensat` argument, or `None` when neither time changes.
fn times(set: &SetAttr) -> Option<[libc::timespec; 2]> {
    if set.atime.is_none() && set.mtime.is_none() {
        return None;
    }
    Some([utime(set.atime), utime(set.mtime)])
}

fn owner(id: Option<u32>) -> u32 {
    id.unwrap_or(u32::MAX) // -1: unchanged
}

fn file_size(size: u64) -> SysResult<libc::off_t> {
    libc::off_t::try_from(size).map_err(|_| Errno(libc::EFBIG))
}

fn setattr(a: &Agent, node: &NodeRef, set: &SetAttr) -> SysResult<Done> {
    match node {
        NodeRef::Handle(h) => {
            let h = a.handles.get(*h)?;
            let fd = h.fd();
            // SAFETY (all calls in this arm): fd stays open while `h` is held; the times
            // array outlives the call.
            if let Some(mode) = set.mode
                && !mode_is_already(&sys::fstat(fd)?, mode, 0o7777)
            {
                cvt(unsafe { libc::fchmod(fd, mode & 0o7777) })?;
            }
            if set.uid.is_some() || set.gid.is_some() {
                cvt(unsafe { libc::fchown(fd, owner(set.uid), owner(set.gid)) })?;
            }
            if let Some(size) = set.size {
                let size = file_size(size)?;
                retry(|| cvt(unsafe { libc::ftruncate(fd, size) }))?;
            }
            if let Some(t) = times(set) {
                cvt(unsafe { libc::futimens(fd, t.as_ptr()) })?;
            }
            Ok(Done::Attr(attr(&sys::fstat(fd)?)))
        }
        NodeRef::Path(p) => {
            let loc = a.root.locate(p)?;
            let (dir, name) = (loc.dirfd(), loc.name());
            if let Some(mode) = set.mode
                && !mode_is_already(&stat_loc(&loc)?, mode, 0o7777)
            {
                chmod(&a.root, &loc, mode & 0o7777)?;
            }
            if set.uid.is_some() || set.gid.is_some() {
                // SAFETY: name is NUL-terminated.
                cvt(unsafe {
                    libc::fchownat(
                        dir,
                        name.as_ptr(),
                        owner(set.uid),
                        owner(set.gid),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            }
            if let Some(size) = set.size {
                truncate(&loc, file_size(size)?)?;
            }
            if let Some(t) = times(set) {
                // SAFETY: name is NUL-terminated; t outlives the call.
                cvt(unsafe {
                    libc::utimensat(dir, name.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                })?;
            }
            made(&loc)
        }
    }
}

/// Whether setting the `bits` of `mode` on a node in state `st` would change nothing but its
/// ctime: a regular file or directory that already has them, owned by the caller or the
/// caller root (so the change could not fail with EPERM) and without set-id bits (which the
/// kernel may clear).
/// Editors change a file they have just written to the mode it has (vim: `fchmod` and a
/// minimal ACL after the last write); done in the container, each is an attribute event a
/// moment after the save's writes, and a watcher that debounces (nodemon) restarted twice
/// when one came late. Skipped, the container sees the save as a local save's writes.
fn mode_is_already(st: &libc::stat, mode: u32, bits: u32) -> bool {
    let kind = st.st_mode & libc::S_IFMT;
    (kind == libc::S_IFREG || kind == libc::S_IFDIR)
        && st.st_mode & (libc::S_ISUID | libc::S_ISGID) == 0
        && mode & (libc::S_ISUID | libc::S_ISGID) == 0
        && st.st_mode & bits == mode & bits
        && [0, st.st_uid].contains(&sys::current_fsuid())
}

/// The permission bits a minimal POSIX access ACL stands for (the value of
/// `system.posix_acl_access`: version 2, then exactly one owner, one group and one other
/// entry, each tag u16, perm u16, id u32, little-endian); None for any other value.
pub(crate) fn minimal_acl_mode(value: &[u8]) -> Option<u32> {
    const USER_OBJ: u16 = 0x01;
    const GROUP_OBJ: u16 = 0x04;
    const OTHER: u16 = 0x20;
    let (version, entries) = value.split_at_checked(4)?;
    if version != 2u32.to_le_bytes() || entries.len() != 3 * 8 {
        return None;
    }
    let mut mode = 0;
    let mut seen = 0u32;
    for e in entries.chunks_exact(8) {
        let perm = u32::from(u16::from_le_bytes([e[2], e[3]]));
        let shift = match u16::from_le_bytes([e[0], e[1]]) {
            USER_OBJ => 6,
            GROUP_OBJ => 3,
            OTHER => 0,
            _ => return None,
        };
        if perm > 7 || seen & (1 << shift) != 0 {
            return None;
        }
        seen |= 1 << shift;
        mode |= perm << shift;
    }
    Some(mode)
}

/// `chmod` of a name without following it: `fchmodat2(AT_SYMLINK_NOFOLLOW)` (Linux 6.6), else
/// through an `O_PATH` descriptor of the node itself.
fn chmod(root: &Root, loc: &Loc<'_>, mode: u32) -> SysResult<()> {
    with_fallback(
        &root.kernel.fchmodat2,
        || {
            // SAFETY: name is NUL-terminated.
            cvt(unsafe {
                libc::syscall(
                    libc::SYS_fchmodat2,
                    loc.dirfd(),
                    loc.name().as_ptr(),
                    mode,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
            .map(drop)
        },
        || chmod_by_fd(loc, mode),
    )
}

fn chmod_by_fd(loc: &Loc<'_>, mode: u32) -> SysResult<()> {
    // O_PATH|O_NOFOLLOW pins the node itself (a symlink stays a symlink) without opening it.
    let node = sys::openat(
        loc.dirfd(),
        loc.name(),
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )?;
    let st = sys::fstat(node.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(Errno(libc::EOPNOTSUPP)); // Linux has no symlink modes
    }
    // The magic link of our own descriptor names exactly the pinned node.
    let proc = cstring(format!("/proc/self/fd/{}", node.as_raw_fd()).as_bytes())?;
    // SAFETY: proc is NUL-terminated.
    match cvt(unsafe { libc::chmod(proc.as_ptr(), mode) }) {
        Err(Errno(libc::ENOENT)) => {}
        other => return other.map(drop),
    }
    // No /proc: reopen for reading (regular files and directories only, which never block
    // nor have side effects on open) and check it is still the same node.
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFDIR {
        return Err(Errno(libc::EOPNOTSUPP));
    }
    let fd = sys::openat(
        loc.dirfd(),
        loc.name(),
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        0,
    )?;
    let again = sys::fstat(fd.as_raw_fd())?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err(Errno(libc::ESTALE));
    }
    // SAFETY: fd is open.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// `truncate(2)` of a name without following it: only regular files are opened (a FIFO or a
/// device is never opened for writing), as `truncate` refuses everything else anyway.
fn truncate(loc: &Loc<'_>, size: libc::off_t) -> SysResult<()> {
    let regular = |st: &libc::stat| match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => Ok(()),
        libc::S_IFDIR => Err(Errno(libc::EISDIR)),
        _ => Err(Errno(libc::EINVAL)),
    };
    regular(&stat_loc(loc)?)?;
    let fd = sys::openat(
        loc.dirfd(),
        loc.name(),
        libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        0,
    )?;
    regular(&sys::fstat(fd.as_raw_fd())?)?;
    // SAFETY: fd is open.
    retry(|| cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })).map(drop)
}

// ---- directories ---------------------------------------------------------------------------

fn opendir(a: &Agent, path: &RelPath) -> SysResult<Done> {
    if a.hide.hidden(path, true) {
        return Err(Errno(libc::ENOENT));
    }
    let fd = a
        .root
        .open_beneath(path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let stream = DirStream::new(fd)?;
    Ok(Done::Handle(
        a.handles.insert(Handle::dir(stream, path.clone())),
    ))
}

fn readdir(a: &Agent, handle: u64, max: u32) -> SysResult<Done> {
    if max == 0 {
        return Err(Errno(libc::EINVAL));
    }
    let h = a.handles.get(handle)?;
    let (mut stream, dir_path) = h.stream()?;
    let hide = a.hide.view();
    let dir = stream.fd();
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    let eof = loop {
        let Some(raw) = stream.next_entry()? else {
            break true;
        };
        if entries.len() >= max as usize || bytes >= DIR_BATCH_BYTES {
            stream.push_back(raw);
            break false;
        }
        let entry = dir_entry(dir, raw.name)?;
        if hide.active()
            && let Ok(path) = dir_path.join(&entry.name)
            && hide.hidden_kind(&path, entry.attr.as_ref().map(Attr::is_dir))
        {
            continue;
        }
        bytes += 160 + entry.name.len() + entry.symlink.as_ref().map_or(0, Vec::len);
        entries.push(entry);
    };
    Ok(Done::Entries { entries, eof })
}

fn dir_entry(dir: RawFd, name: Vec<u8>) -> SysResult<DirEntry> {
    let c = cstring(&name)?;
    // An entry that vanished (or cannot be stat'ed) since it was listed has no attributes.
    let st = sys::fstatat(dir, &c, libc::AT_SYMLINK_NOFOLLOW).ok();
    let symlink = match &st {
        Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => sys::readlinkat(dir, &c).ok(),
        _ => None,
    };
    Ok(DirEntry {
        name,
        attr: st.as_ref().map(attr),
        symlink,
    })
}

fn mkdir(a: &Agent, path: &RelPath, mode: u32) -> SysResult<Done> {
    let loc = a.root.locate(path)?;
    // SAFETY: name is NUL-terminated.
    cvt(unsafe { libc::mkdirat(loc.dirfd(), loc.name().as_ptr(), mode & 0o7777) })?;
    made(&loc)
}

fn mknod(a: &Agent, path: &RelPath, mode: u32, rdev: u64) -> SysResult<Done> {
    let loc = a.root.locate(path)?;
    // SAFETY: name is NUL-terminated.
    cvt(unsafe { libc::mknodat(loc.dirfd(), loc.name().as_ptr(), mode, rdev as libc::dev_t) })?;
    made(&loc)
}

fn symlink(a: &Agent, path: &RelPath, target: &[u8]) -> SysResult<Done> {
    let target = cstring(target)?;
    let loc = a.root.locate(path)?;
    // SAFETY: both strings are NUL-terminated.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), loc.dirfd(), loc.name().as_ptr()) })?;
    made(&loc)
}

fn readlink(a: &Agent, path: &RelPath) -> SysResult<Done> {
    let loc = a.root.locate(path)?;
    Ok(Done::Data(sys::readlinkat(loc.dirfd(), loc.name())?))
}

/// A hard link never follows a symlink at `from` (no `AT_SYMLINK_FOLLOW`), and both parents are
/// resolved beneath the root, so a link can only name a node that is already inside.
fn link(a: &Agent, from: &RelPath, to: &RelPath) -> SysResult<Done> {
    let src = a.root.locate(from)?;
    let dst = a.root.locate(to)?;
    // The node itself, to read its state after linking: the new name may be renamed or
    // removed by someone else at once, and a link that was made must not be reported failed
    // (the mount would send it again and make a second one).
    let node = sys::openat(
        src.dirfd(),
        src.name(),
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )?;
    // SAFETY: names are NUL-terminated.
    cvt(unsafe {
        libc::linkat(
            src.dirfd(),
            src.name().as_ptr(),
            dst.dirfd(),
            dst.name().as_ptr(),
            0,
        )
    })?;
    Ok(Done::Attr(attr(&sys::fstat(node.as_raw_fd())?)))
}

/// The answer to an operation that made or changed the node at `loc`: its state, or plain
/// success when someone else removed or renamed it at once (the operation did happen; failing
/// it would have the mount send it again).
fn made(loc: &Loc<'_>) -> SysResult<Done> {
    match stat_loc(loc) {
        Ok(st) => Ok(Done::Attr(attr(&st))),
        Err(Errno(libc::ENOENT | libc::ENOTDIR)) => Ok(Done::Ok),
        Err(e) => Err(e),
    }
}

fn remove(a: &Agent, path: &RelPath, flags: i32) -> SysResult<Done> {
    let loc = a.root.locate(path)?;
    // SAFETY: name is NUL-terminated.
    cvt(unsafe { libc::unlinkat(loc.dirfd(), loc.name().as_ptr(), flags) })?;
    Ok(Done::Ok)
}

fn rename(a: &Agent, from: &RelPath, to: &RelPath, flags: u32) -> SysResult<Done> {
    let src = a.root.locate(from)?;
    let dst = a.root.locate(to)?;
    // SAFETY: names are NUL-terminated.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            src.dirfd(),
            src.name().as_ptr(),
            dst.dirfd(),
            dst.name().as_ptr(),
            flags,
        )
    })?;
    Ok(Done::Ok)
}

fn statfs(a: &Agent) -> SysResult<Done> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: st is a valid out-pointer.
    cvt(unsafe { libc::fstatvfs(a.root.raw(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs returned 0.
    let st = unsafe { st.assume_init() };
    Ok(Done::Statfs(Statfs {
        blocks: st.f_blocks,
        bfree: st.f_bfree,
        bavail: st.f_bavail,
        files: st.f_files,
        ffree: st.f_ffree,
        bsize: st.f_bsize as u32,
        namelen: st.f_namemax as u32,
        frsize: st.f_frsize as u32,
    }))
}

// ---- files ---------------------------------------------------------------------------------

fn opened(a: &Agent, fd: std::os::fd::OwnedFd) -> SysResult<Done> {
    let attr = attr(&sys::fstat(fd.as_raw_fd())?);
    let handle = a.handles.insert(Handle::File(fd));
    Ok(Done::Opened { handle, attr })
}

fn open(a: &Agent, path: &RelPath, flags: i32) -> SysResult<Done> {
    let fd = a.root.open_beneath(path, flags & OPEN_FLAGS, 0)?;
    opened(a, fd)
}

fn create(a: &Agent, path: &RelPath, flags: i32, mode: u32) -> SysResult<Done> {
    let flags = (flags & (OPEN_FLAGS | libc::O_EXCL)) | libc::O_CREAT;
    let fd = a.root.open_beneath(path, flags, mode & 0o7777)?;
    opened(a, fd)
}

fn offset(off: u64) -> SysResult<libc::off_t> {
    libc::off_t::try_from(off).map_err(|_| Errno(libc::EINVAL))
}

fn read(a: &Agent, handle: u64, off: u64, len: u32) -> SysResult<Done> {
    if len > MAX_IO_LEN {
        return Err(Errno(libc::EINVAL));
    }
    let off = offset(off)?;
    let h = a.handles.get(handle)?;
    let mut buf = vec![0u8; len as usize];
    let mut got = 0usize;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: rest is writable for its length; the fd stays open while `h` is held.
        let r = retry(|| {
            cvt(unsafe {
                libc::pread(
                    h.fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    off + got as libc::off_t,
                )
            })
        });
        match r {
            Ok(0) => break,
            Ok(n) => got += n as usize,
            // What was read is returned; the next read reports the error.
            Err(_) if got > 0 => break,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(Done::Data(buf))
}

fn write(a: &Agent, handle: u64, off: u64, data: &[u8]) -> SysResult<Done> {
    if data.len() > MAX_IO_LEN as usize {
        return Err(Errno(libc::EINVAL));
    }
    let off = offset(off)?;
    let h = a.handles.get(handle)?;
    let mut done = 0usize;
    while done < data.len() {
        let rest = &data[done..];
        // SAFETY: rest is readable for its length; the fd stays open while `h` is held.
        let r = retry(|| {
            cvt(unsafe {
                libc::pwrite(
                    h.fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    off + done as libc::off_t,
                )
            })
        });
        match r {
            Ok(0) => break,
            Ok(n) => done += n as usize,
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(Done::Written(done as u32))
}

fn fsync(a: &Agent, handle: u64, datasync: bool) -> SysResult<Done> {
    let h = a.handles.get(handle)?;
    // SAFETY: the fd stays open while `h` is held.
    retry(|| {
        cvt(unsafe {
            if datasync {
                libc::fdatasync(h.fd())
            } else {
                libc::fsync(h.fd())
            }
        })
    })?;
    Ok(Done::Ok)
}

fn fallocate(a: &Agent, handle: u64, mode: i32, off: u64, len: u64) -> SysResult<Done> {
    let (off, len) = (offset(off)?, offset(len)?);
    let h = a.handles.get(handle)?;
    // SAFETY: the fd stays open while `h` is held.
    retry(|| cvt(unsafe { libc::fallocate(h.fd(), mode, off, len) }))?;
    Ok(Done::Ok)
}

fn lseek(a: &Agent, handle: u64, off: u64, whence: i32) -> SysResult<Done> {
    if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
        return Err(Errno(libc::EINVAL));
    }
    let off = offset(off)?;
    let h = a.handles.get(handle)?;
    // SAFETY: the fd stays open while `h` is held. The file position it moves is never used
    // (all I/O is positional).
    let r = cvt(unsafe { libc::lseek(h.fd(), off, whence) })?;
    Ok(Done::Offset(r as u64))
}

fn close(a: &Agent, handle: u64) -> SysResult<Done> {
    let h = a.handles.remove(handle)?;
    // When no request still uses the handle, close it here so that a deferred write error
    // (NFS, FUSE) reaches the caller; otherwise the last user closes it.
    if let Ok(Handle::File(fd)) = Arc::try_unwrap(h) {
        let raw = fd.into_raw_fd();
        // SAFETY: raw was owned by the handle and is closed exactly once. EINTR still closes.
        match cvt(unsafe { libc::close(raw) }) {
            Ok(_) | Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Done::Ok)
}

// ---- xattrs --------------------------------------------------------------------------------

/// Runs `f` on the xattr target `node` names.
fn with_target<T>(
    a: &Agent,
    node: &NodeRef,
    f: impl FnOnce(Target<'_>) -> SysResult<T>,
) -> SysResult<T> {
    match node {
        NodeRef::Handle(h) => {
            let h = a.handles.get(*h)?;
            f(Target::Fd(h.fd()))
        }
        NodeRef::Path(p) => {
            let loc = a.root.locate(p)?;
            f(Target::At(&loc))
        }
    }
}

fn xname(name: &[u8]) -> SysResult<std::ffi::CString> {
    cstring(name)
}

fn getxattr(a: &Agent, node: &NodeRef, name: &[u8]) -> SysResult<Done> {
    let name = xname(name)?;
    with_target(a, node, |t| xattr::get(&a.root.kernel, t, &name)).map(Done::Data)
}

fn listxattr(a: &Agent, node: &NodeRef) -> SysResult<Done> {
    with_target(a, node, |t| xattr::list(&a.root.kernel, t)).map(Done::Data)
}

fn setxattr(a: &Agent, node: &NodeRef, name: &[u8], value: &[u8], flags: i32) -> SysResult<Done> {
    let name = xname(name)?;
    with_target(a, node, |t| {
        if flags == 0 && acl_changes_nothing(a, t, &name, value)? {
            return Ok(());
        }
        xattr::set(&a.root.kernel, t, &name, value, flags)
    })?;
    Ok(Done::Ok)
}

/// Whether setting `name` to `value` is a minimal access ACL the node already stands for: no
/// ACL of its own and permission bits equal to the ACL's (see [`mode_is_already`]).
fn acl_changes_nothing(a: &Agent, t: Target<'_>, name: &CStr, value: &[u8]) -> SysResult<bool> {
    if name.to_bytes() != b"system.posix_acl_access" {
        return Ok(false);
    }
    let Some(mode) = minimal_acl_mode(value) else {
        return Ok(false);
    };
    let st = match t {
        Target::Fd(fd) => sys::fstat(fd)?,
        Target::At(loc) => stat_loc(loc)?,
    };
    if !mode_is_already(&st, mode, 0o777) {
        return Ok(false);
    }
    match xattr::get(&a.root.kernel, t, name) {
        Err(Errno(libc::ENODATA)) => Ok(true),
        _ => Ok(false),
    }
}

fn removexattr(a: &Agent, node: &NodeRef, name: &[u8]) -> SysResult<Done> {
    let name = xname(name)?;
    with_target(a, node, |t| xattr::remove(&a.root.kernel, t, &name))?;
    Ok(Done::Ok)
}

// ---- access --------------------------------------------------------------------------------

/// `access(2)` as the caller would get it. `AT_EACCESS` makes the kernel check with the
/// thread's filesystem ids, groups and effective capabilities, which is exactly the identity
/// the request runs as (plain `faccessat` would check the real uid: always the agent's).
fn access(a: &Agent, path: &RelPath, mask: i32) -> SysResult<Done> {
    let loc = a.root.locate(path)?;
    if a.root.kernel.faccessat2.load(Ordering::Relaxed) {
        // SAFETY: name is NUL-terminated.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_faccessat2,
                loc.dirfd(),
                loc.name().as_ptr(),
                mask,
                libc::AT_EACCESS | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
    } else {
        access_by_mode(&loc, mask)?;
    }
    Ok(Done::Ok)
}

/// The permission-bit rules of `access(2)` for kernels without `faccessat2` (before 5.8):
/// owner, group or other bits for the thread's filesystem ids; filesystem uid 0 may read and
/// write anything and execute what has any execute bit (or is a directory). ACLs are not seen.
fn access_by_mode(loc: &Loc<'_>, mask: i32) -> SysResult<()> {
    if mask & !(libc::R_OK | libc::W_OK | libc::X_OK) != 0 {
        return Err(Errno(libc::EINVAL));
    }
    let st = stat_loc(loc)?;
    if mask == libc::F_OK {
        return Ok(());
    }
    if mask & libc::W_OK != 0 {
        let mut vfs = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: vfs is a valid out-pointer; the dirfd is open.
        cvt(unsafe { libc::fstatvfs(loc.dirfd(), vfs.as_mut_ptr()) })?;
        // SAFETY: fstatvfs returned 0.
        if unsafe { vfs.assume_init() }.f_flag & libc::ST_RDONLY != 0 {
            return Err(Errno(libc::EROFS));
        }
    }
    let mode = st.st_mode;
    let uid = sys::current_fsuid();
    if uid == 0 {
        let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
        if mask & libc::X_OK != 0 && !is_dir && mode & 0o111 == 0 {
            return Err(Errno(libc::EACCES));
        }
        return Ok(());
    }
    let in_group = st.st_gid == sys::current_fsgid()
        || sys::current_groups()
            .map(|g| g.contains(&st.st_gid))
            .unwrap_or(false);
    let bits = if st.st_uid == uid {
        mode >> 6
    } else if in_group {
        mode >> 3
    } else {
        mode
    } & 7;
    if (mask as u32) & !bits & 7 != 0 {
        return Err(Errno(libc::EACCES));
    }
    Ok(())
}
