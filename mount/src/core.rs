//! The filesystem, free of FUSE: one async function per operation, answering with plain values
//! or an [`FsError`] carrying the errno for the kernel.
//!
//! Node ids are the kernel's (see [`crate::inode`]); file handles given to the kernel are the
//! agent's own file handles; directory handles are ours, each holding a snapshot of the listing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kmount_proto::{
    Attr, Caller, DirEntry, Done, MAX_IO_LEN, NodeRef, Op, RelPath, SetAttr, Statfs, Timespec,
    features,
};

use crate::client::Client;
use crate::err;
use crate::error::FsError;
use crate::inode::{InodeTable, ROOT_ID};

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
    pub fn from_remote(ino: u64, a: &Attr) -> Self {
        Self {
            ino,
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

struct DirState {
    id: u64,
    /// Open on the agent until the listing has been read.
    agent_handle: Option<u64>,
    entries: Option<Vec<DirEntry>>,
    /// A readdir was answered from `entries`; a later one at offset 0 is a rewind.
    served: bool,
}

/// See the module documentation.
pub struct Core {
    client: Client,
    table: InodeTable,
    identity: bool,
    dirs: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<DirState>>>>,
    next_dir_fh: AtomicU64,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("identity", &self.identity)
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

impl Core {
    /// `root` is the served directory's attributes. With `identity`, requests carry the
    /// caller's uid/gid/groups when the agent offered [`features::IDENTITY`].
    pub fn new(client: Client, root: &Attr, identity: bool) -> Self {
        let identity = identity && client.features() & features::IDENTITY != 0;
        Self {
            client,
            table: InodeTable::new(root),
            identity,
            dirs: Mutex::new(HashMap::new()),
            next_dir_fh: AtomicU64::new(1),
        }
    }

    /// The attributes of the served directory, as [`Core::new`] wants them.
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

    pub fn table(&self) -> &InodeTable {
        &self.table
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether requests run as their callers.
    pub fn identity(&self) -> bool {
        self.identity
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

    async fn call(&self, op: Op, caller: &Option<Caller>) -> Result<Done, FsError> {
        Ok(self.client.call(op, caller.clone()).await?)
    }

    async fn call_attr(&self, op: Op, caller: &Option<Caller>) -> Result<Attr, FsError> {
        let name = op_name(&op);
        match self.call(op, caller).await? {
            Done::Attr(a) => Ok(a),
            other => Err(unexpected(name, &other)),
        }
    }

    async fn call_ok(&self, op: Op, caller: &Option<Caller>) -> Result<(), FsError> {
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

    async fn call_opened(&self, op: Op, caller: &Option<Caller>) -> Result<(u64, Attr), FsError> {
        let name = op_name(&op);
        match self.call(op, caller).await? {
            Done::Opened { handle, attr } => Ok((handle, attr)),
            other => Err(unexpected(name, &other)),
        }
    }

    /// Closes an agent handle nobody will use; failures only go to the log.
    async fn close_quietly(&self, handle: u64) {
        if let Err(e) = self.call_ok(Op::Close { handle }, &None).await {
            tracing::debug!(handle, "closing an unused handle failed: {e}");
        }
    }

    /// Where an operation on `id` goes: the kernel's file handle when it is one of ours for
    /// this node, else the path, else (an unlinked, still open file) any open handle.
    fn node_ref(&self, id: u64, fh: Option<u64>) -> Result<NodeRef, FsError> {
        if let Some(h) = fh.filter(|&h| self.table.has_handle(id, h)) {
            return Ok(NodeRef::Handle(h));
        }
        match self.table.path(id) {
            Ok(p) => Ok(NodeRef::Path(p)),
            Err(e) => self.table.handle_of(id).map(NodeRef::Handle).ok_or(e),
        }
    }

    /// Records a name from an entry reply and counts the kernel's lookup.
    fn entry(&self, parent: u64, name: &[u8], attr: &Attr) -> NodeAttr {
        let id = self.table.remember(parent, name, attr);
        NodeAttr::from_remote(id, attr)
    }

    /// [`Core::entry`] for a node the remote has just made.
    fn new_entry(&self, parent: u64, name: &[u8], attr: &Attr) -> NodeAttr {
        let id = self.table.remember_new(parent, name, attr);
        NodeAttr::from_remote(id, attr)
    }

    pub async fn lookup(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
    ) -> Result<NodeAttr, FsError> {
        let path = self.table.child_path(parent, name)?;
        match self.call_attr(Op::Lookup { path }, &caller).await {
            Ok(attr) => Ok(self.entry(parent, name, &attr)),
            Err(e) => {
                if e.errno == libc::ENOENT {
                    self.table.unlink(parent, name);
                }
                Err(e)
            }
        }
    }

    pub fn forget(&self, id: u64, nlookup: u64) {
        self.table.forget(id, nlookup);
    }

    /// Attributes of `id`: by an open handle when there is one (exact even when the file was
    /// unlinked or renamed remotely), else by path. A path that now leads to another inode
    /// means the node is stale: `ESTALE`, which makes the kernel look the name up again.
    pub async fn getattr(&self, caller: Option<Caller>, id: u64) -> Result<NodeAttr, FsError> {
        if let Some(h) = self.table.handle_of(id) {
            let node = NodeRef::Handle(h);
            let attr = self.call_attr(Op::GetAttr { node }, &caller).await?;
            return Ok(NodeAttr::from_remote(id, &attr));
        }
        let path = self.table.path(id)?;
        let attr = self
            .call_attr(
                Op::GetAttr {
                    node: NodeRef::Path(path.clone()),
                },
                &caller,
            )
            .await?;
        if id != ROOT_ID && self.table.remote_of(id) != Some((attr.dev, attr.ino)) {
            self.table.drop_first_link(id);
            return Err(err!(libc::ESTALE, "{path} is another file now"));
        }
        Ok(NodeAttr::from_remote(id, &attr))
    }

    pub async fn setattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> Result<NodeAttr, FsError> {
        let node = self.node_ref(id, fh)?;
        let attr = self.call_attr(Op::SetAttr { node, set }, &caller).await?;
        Ok(NodeAttr::from_remote(id, &attr))
    }

    pub async fn readlink(&self, caller: Option<Caller>, id: u64) -> Result<Vec<u8>, FsError> {
        let path = self.table.path(id)?;
        self.call_data(Op::Readlink { path }, &caller).await
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
        let path = self.table.child_path(parent, name)?;
        let op = Op::Mknod {
            path,
            mode,
            rdev: user_dev(rdev),
        };
        let attr = self.call_attr(op, &caller).await?;
        Ok(self.new_entry(parent, name, &attr))
    }

    pub async fn mkdir(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> Result<NodeAttr, FsError> {
        let path = self.table.child_path(parent, name)?;
        let op = Op::Mkdir {
            path,
            mode: mode & 0o7777,
        };
        let attr = self.call_attr(op, &caller).await?;
        Ok(self.new_entry(parent, name, &attr))
    }

    pub async fn unlink(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
    ) -> Result<(), FsError> {
        let path = self.table.child_path(parent, name)?;
        self.call_ok(Op::Unlink { path }, &caller).await?;
        self.table.unlink(parent, name);
        Ok(())
    }

    pub async fn rmdir(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
    ) -> Result<(), FsError> {
        let path = self.table.child_path(parent, name)?;
        self.call_ok(Op::Rmdir { path }, &caller).await?;
        self.table.unlink(parent, name);
        Ok(())
    }

    pub async fn symlink(
        &self,
        caller: Option<Caller>,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> Result<NodeAttr, FsError> {
        let path = self.table.child_path(parent, name)?;
        let op = Op::Symlink {
            path,
            target: target.to_vec(),
        };
        let attr = self.call_attr(op, &caller).await?;
        Ok(self.new_entry(parent, name, &attr))
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
        let from = self.table.child_path(parent, name)?;
        let to = self.table.child_path(new_parent, new_name)?;
        self.call_ok(Op::Rename { from, to, flags }, &caller)
            .await?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        self.table
            .rename(parent, name, new_parent, new_name, exchange);
        Ok(())
    }

    pub async fn link(
        &self,
        caller: Option<Caller>,
        id: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> Result<NodeAttr, FsError> {
        let from = self.table.path(id)?;
        let to = self.table.child_path(new_parent, new_name)?;
        let attr = self.call_attr(Op::Link { from, to }, &caller).await?;
        Ok(self.entry(new_parent, new_name, &attr))
    }

    /// Opens `id`; the returned file handle is the agent's.
    pub async fn open(&self, caller: Option<Caller>, id: u64, flags: i32) -> Result<u64, FsError> {
        let path = self.table.path(id)?;
        let (handle, attr) = self
            .call_opened(
                Op::Open {
                    path: path.clone(),
                    flags,
                },
                &caller,
            )
            .await?;
        if id != ROOT_ID && self.table.remote_of(id) != Some((attr.dev, attr.ino)) {
            self.close_quietly(handle).await;
            self.table.drop_first_link(id);
            return Err(err!(libc::ESTALE, "{path} is another file now"));
        }
        if let Err(e) = self.table.opened(id, Some(handle)) {
            self.close_quietly(handle).await;
            return Err(e);
        }
        Ok(handle)
    }

    pub async fn read(
        &self,
        caller: Option<Caller>,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let op = Op::Read {
            handle: fh,
            offset,
            len: size.min(MAX_IO_LEN),
        };
        self.call_data(op, &caller).await
    }

    pub async fn write(
        &self,
        caller: Option<Caller>,
        fh: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u32, FsError> {
        let op = Op::Write {
            handle: fh,
            offset,
            data,
        };
        match self.call(op, &caller).await? {
            Done::Written(n) => Ok(n),
            other => Err(unexpected("Write", &other)),
        }
    }

    /// `close(2)` of one descriptor of an open file. Writes already reached the agent.
    pub async fn flush(&self, _fh: u64) -> Result<(), FsError> {
        Ok(())
    }

    pub async fn release(&self, id: u64, fh: u64) -> Result<(), FsError> {
        self.table.closed(id, Some(fh));
        self.call_ok(Op::Close { handle: fh }, &None).await
    }

    pub async fn fsync(
        &self,
        caller: Option<Caller>,
        fh: u64,
        datasync: bool,
    ) -> Result<(), FsError> {
        self.call_ok(
            Op::Fsync {
                handle: fh,
                datasync,
            },
            &caller,
        )
        .await
    }

    /// Opens directory `id` for listing; the listing itself is read at the first readdir.
    pub async fn opendir(&self, caller: Option<Caller>, id: u64) -> Result<u64, FsError> {
        let path = self.table.path(id)?;
        let handle = match self.call(Op::OpenDir { path }, &caller).await? {
            Done::Handle(h) => h,
            other => return Err(unexpected("OpenDir", &other)),
        };
        if let Err(e) = self.table.opened(id, None) {
            self.close_quietly(handle).await;
            return Err(e);
        }
        let fh = self.next_dir_fh.fetch_add(1, Ordering::Relaxed);
        let state = DirState {
            id,
            agent_handle: Some(handle),
            entries: None,
            served: false,
        };
        self.dirs()
            .insert(fh, Arc::new(tokio::sync::Mutex::new(state)));
        Ok(fh)
    }

    /// Reads the whole listing into `st` (again, on a rewind).
    async fn load_dir(&self, caller: &Option<Caller>, st: &mut DirState) -> Result<(), FsError> {
        let handle = match st.agent_handle.take() {
            Some(h) => h,
            None => {
                let path = self.table.path(st.id)?;
                match self.call(Op::OpenDir { path }, caller).await? {
                    Done::Handle(h) => h,
                    other => return Err(unexpected("OpenDir", &other)),
                }
            }
        };
        let mut entries = Vec::new();
        let result = loop {
            let op = Op::ReadDir {
                handle,
                max: READDIR_BATCH,
            };
            match self.call(op, caller).await {
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
        self.close_quietly(handle).await;
        result?;
        st.entries = Some(entries);
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
        if st.entries.is_none() || (offset == 0 && st.served) {
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
        let st = self.dir_state(&caller, fh, offset).await?;
        let entries = st.entries.as_deref().unwrap_or_default();
        let parent = self.table.parent_of(id);
        for index in offset..(entries.len() as u64 + 2) {
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
                    let e = &entries[(index - 2) as usize];
                    // An entry that vanished between listing and lstat is left out.
                    let Some(attr) = &e.attr else { continue };
                    DirItem {
                        ino: self.table.peek(attr),
                        offset: index + 1,
                        kind: attr.file_type(),
                        name: &e.name,
                        attr: None,
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
        let st = self.dir_state(&caller, fh, offset).await?;
        let entries = st.entries.as_deref().unwrap_or_default();
        for index in offset..(entries.len() as u64 + 2) {
            if index < 2 {
                let ino = if index == 0 {
                    id
                } else {
                    self.table.parent_of(id)
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
            let e = &entries[(index - 2) as usize];
            let Some(attr) = &e.attr else { continue };
            let node_attr = self.entry(id, &e.name, attr);
            let item = DirItem {
                ino: node_attr.ino,
                offset: index + 1,
                kind: attr.file_type(),
                name: &e.name,
                attr: Some(node_attr),
            };
            if add(&item) {
                // Not in the reply, so not a lookup the kernel knows about.
                self.table.forget(node_attr.ino, 1);
                break;
            }
        }
        Ok(())
    }

    pub async fn releasedir(&self, id: u64, fh: u64) -> Result<(), FsError> {
        let state = self.dirs().remove(&fh);
        let Some(state) = state else {
            return Err(err!(libc::EBADF, "no directory handle {fh}"));
        };
        self.table.closed(id, None);
        let handle = state.lock().await.agent_handle.take();
        if let Some(handle) = handle {
            self.close_quietly(handle).await;
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
        let op = Op::SetXattr {
            node: self.node_ref(id, None)?,
            name: name.to_vec(),
            value: value.to_vec(),
            flags,
        };
        self.call_ok(op, &caller).await
    }

    pub async fn getxattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        name: &[u8],
        size: u32,
    ) -> Result<Xattr, FsError> {
        let op = Op::GetXattr {
            node: self.node_ref(id, None)?,
            name: name.to_vec(),
        };
        sized(self.call_data(op, &caller).await?, size)
    }

    pub async fn listxattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        size: u32,
    ) -> Result<Xattr, FsError> {
        let op = Op::ListXattr {
            node: self.node_ref(id, None)?,
        };
        sized(self.call_data(op, &caller).await?, size)
    }

    pub async fn removexattr(
        &self,
        caller: Option<Caller>,
        id: u64,
        name: &[u8],
    ) -> Result<(), FsError> {
        let op = Op::RemoveXattr {
            node: self.node_ref(id, None)?,
            name: name.to_vec(),
        };
        self.call_ok(op, &caller).await
    }

    /// `access(2)`; the kernel only asks without `default_permissions`.
    pub async fn access(&self, caller: Option<Caller>, id: u64, mask: i32) -> Result<(), FsError> {
        let path = self.table.path(id)?;
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
        let path = self.table.child_path(parent, name)?;
        let op = Op::Create {
            path,
            flags,
            mode: mode & 0o7777,
        };
        let (handle, attr) = self.call_opened(op, &caller).await?;
        let attr = self.entry(parent, name, &attr);
        if let Err(e) = self.table.opened(attr.ino, Some(handle)) {
            self.close_quietly(handle).await;
            return Err(e);
        }
        Ok(Created { attr, fh: handle })
    }

    pub async fn fallocate(
        &self,
        caller: Option<Caller>,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Result<(), FsError> {
        let op = Op::Fallocate {
            handle: fh,
            mode,
            offset,
            len,
        };
        self.call_ok(op, &caller).await
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
        let offset = u64::try_from(offset).map_err(|_| err!(libc::ENXIO, "negative offset"))?;
        let op = Op::Lseek {
            handle: fh,
            offset,
            whence,
        };
        match self.call(op, &caller).await? {
            Done::Offset(o) => i64::try_from(o).map_err(|_| err!(libc::EOVERFLOW, "offset {o}")),
            other => Err(unexpected("Lseek", &other)),
        }
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Lookup { .. } => "Lookup",
        Op::GetAttr { .. } => "GetAttr",
        Op::SetAttr { .. } => "SetAttr",
        Op::OpenDir { .. } => "OpenDir",
        Op::ReadDir { .. } => "ReadDir",
        Op::Open { .. } => "Open",
        Op::Create { .. } => "Create",
        Op::Read { .. } => "Read",
        Op::Write { .. } => "Write",
        Op::Fsync { .. } => "Fsync",
        Op::Fallocate { .. } => "Fallocate",
        Op::Close { .. } => "Close",
        Op::Mkdir { .. } => "Mkdir",
        Op::Mknod { .. } => "Mknod",
        Op::Symlink { .. } => "Symlink",
        Op::Readlink { .. } => "Readlink",
        Op::Link { .. } => "Link",
        Op::Unlink { .. } => "Unlink",
        Op::Rmdir { .. } => "Rmdir",
        Op::Rename { .. } => "Rename",
        Op::Statfs => "Statfs",
        Op::GetXattr { .. } => "GetXattr",
        Op::ListXattr { .. } => "ListXattr",
        Op::SetXattr { .. } => "SetXattr",
        Op::RemoveXattr { .. } => "RemoveXattr",
        Op::Access { .. } => "Access",
        Op::Ping => "Ping",
        Op::Lseek { .. } => "Lseek",
        Op::WalkOpen { .. } => "WalkOpen",
        Op::WalkNext { .. } => "WalkNext",
        Op::Watch { .. } => "Watch",
        Op::Digest { .. } => "Digest",
        Op::Journaled { .. } => "Journaled",
        Op::AppliedSeq { .. } => "AppliedSeq",
        Op::PutFile { .. } => "PutFile",
        Op::ReadPath { .. } => "ReadPath",
        Op::FsyncPath { .. } => "FsyncPath",
        Op::WritePath { .. } => "WritePath",
        Op::FallocatePath { .. } => "FallocatePath",
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
