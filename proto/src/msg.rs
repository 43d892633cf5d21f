//! Messages. Enums only grow at the end (postcard encodes the variant index).

use serde::{Deserialize, Serialize};

use crate::frame::ProtoError;
use crate::{MAGIC, PROTOCOL_VERSION, RelPath};

/// First message each way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// [`crate::features`] bits the sender supports (the agent: that it offers).
    pub features: u64,
    /// Free text naming the sender's software and version, for error messages.
    pub software: String,
}

impl Hello {
    pub fn new(features: u64, software: impl Into<String>) -> Self {
        Self {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            features,
            software: software.into(),
        }
    }

    /// Checks the peer's hello against ours.
    pub fn check_peer(&self, theirs: &Hello) -> Result<(), ProtoError> {
        if theirs.magic != MAGIC {
            return Err(ProtoError::BadMagic {
                expected: "hello",
                got: theirs.magic.to_vec(),
            });
        }
        if theirs.version != self.version {
            return Err(ProtoError::VersionMismatch {
                ours: self.version,
                theirs: theirs.version,
                theirs_software: theirs.software.clone(),
            });
        }
        Ok(())
    }
}

/// mount --> agent
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToAgent {
    Hello(Hello),
    Request(Request),
}

/// agent --> mount
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromAgent {
    Hello(Hello),
    Reply(Reply),
    /// The agent cannot go on (its root vanished, a broken stream); the text says why.
    Fatal(String),
    /// Changes under the root since the last batch, coalesced over a few milliseconds, in the
    /// order they happened. Only sent after `Op::Watch { enable: true }`.
    Events(Vec<Event>),
    /// The effective uid and gid the agent runs as, and its supplementary groups (sent once,
    /// after the hellos, when both announced [`crate::features::RUNS_AS`]); the mount may show
    /// that user's files as the local user's, and check operations as the target will.
    RunsAs {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
    },
}

/// The identity a request runs as, when [`crate::features::IDENTITY`] was negotiated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the mount, unique among requests in flight; echoed in the [`Reply`].
    pub id: u64,
    pub caller: Option<Caller>,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub result: Result<Done, WireError>,
}

/// A failure, as the errno the operation got in the agent, with a human-readable note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Linux errno, e.g. 2 for ENOENT.
    pub errno: i32,
    pub message: String,
}

impl WireError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl std::error::Error for WireError {}

/// Seconds and nanoseconds since the epoch, as in `struct timespec` (ordered by time).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// The result of `lstat`/`fstat` in the agent, exactly as the remote filesystem has it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attr {
    pub ino: u64,
    pub dev: u64,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub blksize: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

impl Attr {
    /// `S_IFMT` bits of [`Attr::mode`].
    pub fn file_type(&self) -> u32 {
        self.mode & 0o170000
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == 0o040000
    }
}

/// What an operation addresses: a path beneath the root, or a handle the agent gave out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRef {
    Path(RelPath),
    Handle(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    /// The agent's current time (`UTIME_NOW`).
    Now,
    At(Timespec),
}

/// Attribute changes; `None` leaves an attribute as it is (`UTIME_OMIT` for times).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SetAttr {
    /// Permission bits only (`0o7777`).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// One directory entry (never `.` or `..`). `attr` is `None` when the entry vanished between
/// listing and `lstat`. `symlink` is the target for symlinks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub attr: Option<Attr>,
    pub symlink: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Operations. Paths are relative to the served root ([`RelPath`]); the agent never follows a
/// symlink while resolving one (the kernel on the mount side resolves symlinks itself), so no
/// message can reach outside the root. Modes are used as given: the mount side's kernel has
/// applied the caller's umask already, and the agent runs with umask 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `lstat` of a path. -> [`Done::Attr`]
    Lookup { path: RelPath },
    /// `lstat`/`fstat`. -> [`Done::Attr`]
    GetAttr { node: NodeRef },
    /// chmod, chown, truncate, utimensat, in that order; -> [`Done::Attr`] after.
    SetAttr { node: NodeRef, set: SetAttr },
    /// Opens a directory for listing. -> [`Done::Handle`]
    OpenDir { path: RelPath },
    /// Next batch of at most `max` entries. -> [`Done::Entries`]
    ReadDir { handle: u64, max: u32 },
    /// `open(2)` of an existing node with these flags (`O_CREAT`/`O_EXCL` ignored, `O_NOFOLLOW`
    /// implied). -> [`Done::Opened`]
    Open { path: RelPath, flags: i32 },
    /// `open(2)` with `O_CREAT` (and `O_EXCL` when given). -> [`Done::Opened`]
    Create {
        path: RelPath,
        flags: i32,
        mode: u32,
    },
    /// `pread`; a short or empty result means end of file. -> [`Done::Data`]
    Read { handle: u64, offset: u64, len: u32 },
    /// `pwrite` of all of `data`. -> [`Done::Written`]
    Write {
        handle: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// `fsync`/`fdatasync`. -> [`Done::Ok`]
    Fsync { handle: u64, datasync: bool },
    /// `fallocate(2)` with its mode bits (keep-size, punch-hole, ...). -> [`Done::Ok`]
    Fallocate {
        handle: u64,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// Closes a file or directory handle. -> [`Done::Ok`]
    Close { handle: u64 },
    /// -> [`Done::Attr`] of the new directory.
    Mkdir { path: RelPath, mode: u32 },
    /// FIFOs, sockets, device nodes, regular files. -> [`Done::Attr`]
    Mknod { path: RelPath, mode: u32, rdev: u64 },
    /// -> [`Done::Attr`] of the new link.
    Symlink {
        path: RelPath,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// -> [`Done::Data`] with the target.
    Readlink { path: RelPath },
    /// Hard link `to` naming the node at `from`. -> [`Done::Attr`]
    Link { from: RelPath, to: RelPath },
    /// -> [`Done::Ok`]
    Unlink { path: RelPath },
    /// -> [`Done::Ok`]
    Rmdir { path: RelPath },
    /// `renameat2` with its flags (`RENAME_NOREPLACE` 1, `RENAME_EXCHANGE` 2). -> [`Done::Ok`]
    Rename {
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
    /// Of the filesystem holding the root. -> [`Done::Statfs`]
    Statfs,
    /// The whole value. -> [`Done::Data`]
    GetXattr {
        node: NodeRef,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    /// NUL-terminated names, as `listxattr(2)`. -> [`Done::Data`]
    ListXattr { node: NodeRef },
    /// `flags`: `XATTR_CREATE` 1, `XATTR_REPLACE` 2. -> [`Done::Ok`]
    SetXattr {
        node: NodeRef,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        flags: i32,
    },
    /// -> [`Done::Ok`]
    RemoveXattr {
        node: NodeRef,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    /// `faccessat(2)` with `R_OK`/`W_OK`/`X_OK` bits. -> [`Done::Ok`]
    Access { path: RelPath, mask: i32 },
    /// Liveness check. -> [`Done::Ok`]
    Ping,
    /// `lseek(2)` with `SEEK_DATA` (3) or `SEEK_HOLE` (4). -> [`Done::Offset`]
    Lseek {
        handle: u64,
        offset: u64,
        whence: i32,
    },
    /// Starts a walk of the subtree at `path` (the whole tree for the root), which is not
    /// itself included. -> [`Done::Handle`]
    WalkOpen { path: RelPath },
    /// Next batch of a walk: at most `max` entries, every directory before its children.
    /// -> [`Done::Tree`]; its `eof` ends the walk (the handle is then closed by the agent).
    WalkNext { handle: u64, max: u32 },
    /// Starts (`true`) or stops reporting changes made under the root by anything other than
    /// this session's own requests, as [`FromAgent::Events`]. -> [`Done::Ok`]
    Watch { enable: bool },
    /// [`crate::digest`] of the directory `path` and of every directory below it down to
    /// `depth` levels (0: only `path`). -> [`Done::Digests`]
    Digest { path: RelPath, depth: u32 },
    /// A change from the mount's write-back journal. The agent applies `op` at most once per
    /// (`session`, `seq`): seqs of one session arrive in increasing order, and a seq at or
    /// below the highest one applied answers [`Done::Ok`] without doing anything, so a replay
    /// after a reconnect is harmless. -> the result of `op`.
    Journaled {
        session: u64,
        seq: u64,
        #[serde(deserialize_with = "nesting::op")]
        op: Box<Op>,
    },
    /// The highest seq applied for `session` (0 when the agent knows none). -> [`Done::Seq`]
    AppliedSeq { session: u64 },
    /// Writes a whole regular file in one short burst. `data` is zstd-compressed when
    /// `compressed`. `atomic`: write a temporary file beside `path` and rename it over `path`
    /// (as editors save); otherwise create or truncate `path` and write in place. Then sets
    /// `mode` and, when given, `mtime`. -> [`Done::Attr`] of the file afterwards.
    PutFile {
        path: RelPath,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        compressed: bool,
        mode: u32,
        mtime: Option<Timespec>,
        atomic: bool,
        /// With `atomic: false`, a file already at `path` keeps its mode: `mode` applies only
        /// when the file is made (the save of an existing file: `open(O_TRUNC)` and writes).
        keep_mode: bool,
    },
    /// Reads up to `len` bytes at `offset` of the regular file at `path` in one round trip
    /// (open, pread, fstat, close). -> [`Done::Content`]; `attr` is the file's state when read,
    /// so the mount can tell which version the bytes belong to.
    ReadPath {
        path: RelPath,
        offset: u64,
        len: u32,
    },
    /// Opens the regular file at `path`, `fsync`s it (`fdatasync` when `datasync`) and the
    /// directory holding it, and closes it. -> [`Done::Ok`]
    FsyncPath { path: RelPath, datasync: bool },
    /// `pwrite` of all of `data` at `offset` into the existing regular file at `path` (opened
    /// without following a symlink, written, closed). Repeating it is harmless, which the
    /// journal's replay relies on. -> [`Done::Written`]
    WritePath {
        path: RelPath,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// `fallocate(2)` on the regular file at `path`. -> [`Done::Ok`]
    FallocatePath {
        path: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// The mount's ignore rules, for this session (sent again after every reconnect, before
    /// the walk and the watcher start). From then on every path the rules class as excluded or
    /// local-only ([`crate::rules::Class`]) is hidden: left out of walks, listings, digests
    /// and events, and `ENOENT` to lookups. A new `SetRules` replaces the previous one.
    /// -> [`Done::Ok`]; an invalid pattern is `EINVAL` with the pattern named.
    SetRules { rules: crate::rules::RulesConfig },
    /// Runs `command` with `sh -c` in the root directory as the agent's user, stdin from
    /// `/dev/null`, stdout and stderr together. Killed (its process group) after `timeout_ms`.
    /// -> [`Done::Command`].
    RunCommand { command: String, timeout_ms: u64 },
}

/// Successful results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Done {
    Ok,
    Attr(Attr),
    Handle(u64),
    Opened {
        handle: u64,
        attr: Attr,
    },
    Entries {
        entries: Vec<DirEntry>,
        eof: bool,
    },
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    Written(u32),
    Statfs(Statfs),
    Offset(u64),
    /// A batch of [`TreeEntry`]s, encoded with [`crate::tree::encode_entries`] (postcard, then
    /// zstd). `count` entries; `eof` when the walk is complete.
    Tree {
        #[serde(with = "serde_bytes")]
        zstd: Vec<u8>,
        count: u32,
        eof: bool,
    },
    Digests(Vec<DirDigest>),
    Seq(u64),
    /// File bytes with the file's attributes; `data` is zstd-compressed when `compressed`
    /// (the agent compresses when that makes it clearly smaller).
    Content {
        attr: Attr,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        compressed: bool,
    },
    /// How an [`Op::RunCommand`] ended: `status` its exit code (`None` when a signal ended it,
    /// `signal` then names it, as with a timeout), `output` its stdout and stderr together,
    /// the last 64 KiB when longer (`truncated`), `millis` how long it ran.
    Command {
        status: Option<i32>,
        signal: Option<i32>,
        #[serde(with = "serde_bytes")]
        output: Vec<u8>,
        truncated: bool,
        millis: u64,
    },
}

/// One node found by a walk: its path from the root, its attributes, its symlink target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    pub path: RelPath,
    pub attr: Attr,
    pub symlink: Option<Vec<u8>>,
}

/// The digest of one directory ([`crate::digest::dir_digest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirDigest {
    pub path: RelPath,
    pub digest: [u8; 16],
}

/// A change seen by the agent's watcher, with the node's state after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// `path` was created or changed; `attr` and `symlink` are its state now.
    Upsert {
        path: RelPath,
        attr: Attr,
        symlink: Option<Vec<u8>>,
    },
    /// `path` (and everything below it) is gone.
    Remove { path: RelPath },
    /// `from` was renamed to `to` (replacing whatever `to` was).
    Rename { from: RelPath, to: RelPath },
    /// Something under `path` changed in a way the watcher could not follow (queue overflow,
    /// watch limit, unreadable directory): walk it again. `reason` is for the log.
    Rescan { path: RelPath, reason: String },
}

/// Bounds the decoder's recursion through `Op::Journaled`, the only message that contains
/// itself. A level costs a frame 3 bytes, so without a bound one frame could nest millions of
/// levels and overflow the decoding thread's stack (an abort, not an error).
mod nesting {
    use std::cell::Cell;

    use serde::{Deserialize, Deserializer};

    use super::Op;

    /// Deepest accepted nesting of `Op::Journaled` (the agent refuses any; a few levels still
    /// decode so that it can say so with a reply rather than a broken stream).
    pub const MAX_DEPTH: usize = 4;

    thread_local! {
        /// `Op::Journaled` levels being decoded on this thread.
        static DEPTH: Cell<usize> = const { Cell::new(0) };
    }

    struct Level;

    impl Drop for Level {
        fn drop(&mut self) {
            DEPTH.with(|d| d.set(d.get() - 1));
        }
    }

    pub fn op<'de, D: Deserializer<'de>>(d: D) -> Result<Box<Op>, D::Error> {
        let depth = DEPTH.with(Cell::get);
        if depth >= MAX_DEPTH {
            return Err(crate::frame::invalid(format!(
                "journaled operations nested more than {MAX_DEPTH} deep"
            )));
        }
        DEPTH.with(|d| d.set(depth + 1));
        let _level = Level;
        Op::deserialize(d).map(Box::new)
    }
}

pub use nesting::MAX_DEPTH as MAX_JOURNALED_NESTING;
