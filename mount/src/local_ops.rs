//! The filesystem operations on local-only nodes ([`crate::local_only`]): answered here, from
//! the tree and the local store, with no round trip; and the renames that cross between
//! local-only and synced names, which move the bytes.
//!
//! Conflicts. A save that replaces a file (`open(O_TRUNC)`, a rename over it) first checks that
//! the target's file is still the version kmount last saw (inode, size, mtime). When it is not
//! (changed in the container, the watcher's word still on its way or lost), the file changed
//! on both sides: the local save keeps the name (it is what the user just did and what the app
//! should run), and the container's version is kept beside it in the mount only, as
//! `NAME.kmount-conflict-YYYYMMDD-HHMMSS` (local-only: never sent, so it sets off no watcher in
//! the container). A warning goes to the log and `kmount status` counts it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use kmount_proto::rules::Class;
use kmount_proto::{Attr, Caller, Done, MAX_IO_LEN, Op, RelPath, SetAttr};

use crate::core::{Core, Created, NodeAttr, Opened, Xattr};
use crate::err;
use crate::error::FsError;
use crate::local::Conflict;
use crate::local_only::{self, LocalOnly};
use crate::tree::{Effects, TreeState};

fn io(what: &str) -> impl FnOnce(std::io::Error) -> FsError + '_ {
    move |e| {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        err!(errno, "local-only store: {what}: {e}")
    }
}

pub(crate) fn exdev(what: &str) -> FsError {
    err!(
        libc::EXDEV,
        "{what} crosses between local-only and synced names (see `kmount why`)"
    )
}

/// What a rename touches, as far as local-only nodes go.
enum Crossing {
    /// Neither side is local-only: the remote's business.
    None,
    /// Both sides local-only: the tree's alone.
    Local,
    /// A local-only file to a synced name: its bytes go to the remote.
    Upload,
    /// A synced file to a local-only name: its bytes come here, the remote file goes.
    Download,
}

impl Core {
    pub(crate) fn lo(&self) -> Option<&LocalOnly> {
        self.local_only.as_ref()
    }

    /// Whether node `id` is local-only.
    pub(crate) fn lo_node(&self, id: u64) -> bool {
        self.lo().is_some() && self.tree.lock().is_local_only(id)
    }

    /// Whether `name` in `parent` is a local-only node.
    pub(crate) fn lo_child(&self, parent: u64, name: &[u8]) -> bool {
        if self.lo().is_none() {
            return false;
        }
        let t = self.tree.lock();
        t.child(parent, name).is_some_and(|id| t.is_local_only(id))
    }

    /// Whether a node named `name` in `parent` belongs on this side: the parent is
    /// local-only, or the rules exclude the path or keep it local.
    pub(crate) fn lo_here(&self, parent: u64, name: &[u8], is_dir: bool) -> bool {
        if self.lo().is_none() {
            return false;
        }
        if self.tree.lock().is_local_only(parent) {
            return true;
        }
        let Ok(path) = self.tree.child_path(parent, name) else {
            return false;
        };
        self.client
            .rules()
            .class(Path::new(OsStr::from_bytes(path.as_bytes())), is_dir)
            != Class::Synced
    }

    /// The owner of a node made here: the caller (when requests carry it), else the agent's
    /// user (shown as the local user where owners are mapped), else this process's user.
    fn lo_owner(&self, caller: &Option<Caller>) -> (u32, u32) {
        if let Some(c) = caller {
            return (c.uid, c.gid);
        }
        self.client.agent_user().unwrap_or_else(|| {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        })
    }

    fn lo_set(&self, id: u64, attr: &Attr) {
        self.tree
            .lock()
            .update_attr(id, attr, None, &mut Effects::default());
    }

    fn lo_attr(&self, id: u64) -> Result<Attr, FsError> {
        self.tree.lock().attr(id).cloned()
    }

    /// Makes node `name` in `parent` of type and mode `mode` (a directory, symlink, or
    /// special file; regular files come from [`Core::lo_create`]).
    pub(crate) fn lo_make(
        &self,
        caller: &Option<Caller>,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        symlink: Option<Vec<u8>>,
    ) -> Result<NodeAttr, FsError> {
        let lo = self.lo().expect("local-only store");
        let path = self.tree.child_path(parent, name)?;
        if self.tree.lock().child(parent, name).is_some() {
            return Err(err!(libc::EEXIST, "{path} exists"));
        }
        let (uid, gid) = self.lo_owner(caller);
        let mut attr = lo.new_attr(mode, uid, gid, rdev);
        if let Some(t) = &symlink {
            attr.size = t.len() as u64;
        }
        tracing::debug!(%path, "made local-only");
        Ok(self.entry(parent, name, &attr, true, symlink))
    }

    pub(crate) fn lo_create(
        &self,
        caller: &Option<Caller>,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<Created, FsError> {
        let lo = self.lo().expect("local-only store");
        let path = self.tree.child_path(parent, name)?;
        if let Some(id) = self.tree.lock().child(parent, name) {
            if flags & libc::O_EXCL != 0 {
                return Err(err!(libc::EEXIST, "{path} exists"));
            }
            let opened = self.lo_open(id, flags)?;
            let attr = {
                let mut t = self.tree.lock();
                t.count_lookup(id);
                NodeAttr::from_remote(id, t.attr(id)?)
            };
            return Ok(Created {
                attr,
                fh: opened.fh,
            });
        }
        let (uid, gid) = self.lo_owner(caller);
        let attr = lo.new_attr(libc::S_IFREG | (mode & 0o7777), uid, gid, 0);
        let file = lo.open(attr.ino, libc::O_TRUNC).map_err(io("create"))?;
        let entry = self.entry(parent, name, &attr, true, None);
        self.tree.opened(entry.ino)?;
        let fh = self.alloc_fh();
        lo.add_file(fh, entry.ino, file);
        tracing::debug!(%path, "made local-only");
        Ok(Created { attr: entry, fh })
    }

    pub(crate) fn lo_open(&self, id: u64, flags: i32) -> Result<Opened, FsError> {
        let lo = self.lo().expect("local-only store");
        let attr = self.lo_attr(id)?;
        if attr.file_type() != libc::S_IFREG {
            return Err(err!(libc::EINVAL, "not a regular file"));
        }
        let file = lo.open(attr.ino, flags).map_err(io("open"))?;
        if flags & libc::O_TRUNC != 0 && attr.size != 0 {
            self.lo_set(id, &local_only::resized(&attr, 0));
        }
        self.tree.opened(id)?;
        let fh = self.alloc_fh();
        lo.add_file(fh, id, file);
        Ok(Opened {
            fh,
            keep_cache: true,
        })
    }

    pub(crate) fn lo_read(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Option<Result<Vec<u8>, FsError>> {
        let f = self.lo()?.file(fh)?;
        Some(local_only::read_at(&f.file, offset, size as usize).map_err(io("read")))
    }

    pub(crate) fn lo_write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Option<Result<u32, FsError>> {
        let f = self.lo()?.file(fh)?;
        Some((|| {
            f.file.write_all_at(data, offset).map_err(io("write"))?;
            let len = f.file.metadata().map_err(io("stat"))?.len();
            let attr = self.lo_attr(f.id)?;
            self.lo_set(f.id, &local_only::resized(&attr, len));
            Ok(data.len() as u32)
        })())
    }

    /// `close()` of a local-only file, when `fh` is one.
    pub(crate) fn lo_release(&self, id: u64, fh: u64) -> Option<Result<(), FsError>> {
        self.lo()?.remove_file(fh)?;
        self.tree.closed(id);
        Some(Ok(()))
    }

    pub(crate) fn lo_fallocate(
        &self,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Option<Result<(), FsError>> {
        let f = self.lo()?.file(fh)?;
        Some((|| {
            let r = unsafe { libc::fallocate(f.file.as_raw_fd(), mode, offset as i64, len as i64) };
            if r != 0 {
                return Err(io("fallocate")(std::io::Error::last_os_error()));
            }
            let len = f.file.metadata().map_err(io("stat"))?.len();
            let attr = self.lo_attr(f.id)?;
            self.lo_set(f.id, &local_only::resized(&attr, len));
            Ok(())
        })())
    }

    pub(crate) fn lo_lseek(
        &self,
        fh: u64,
        offset: i64,
        whence: i32,
    ) -> Option<Result<i64, FsError>> {
        let f = self.lo()?.file(fh)?;
        let r = unsafe { libc::lseek(f.file.as_raw_fd(), offset, whence) };
        Some(if r < 0 {
            Err(io("lseek")(std::io::Error::last_os_error()))
        } else {
            Ok(r)
        })
    }

    pub(crate) fn lo_setattr(
        &self,
        id: u64,
        fh: Option<u64>,
        set: &SetAttr,
    ) -> Result<NodeAttr, FsError> {
        let lo = self.lo().expect("local-only store");
        let mut a = self.lo_attr(id)?;
        if let Some(size) = set.size {
            if a.file_type() == libc::S_IFDIR {
                return Err(err!(libc::EISDIR, "a directory has no size to set"));
            }
            match fh.and_then(|fh| lo.file(fh)) {
                Some(f) => f.file.set_len(size).map_err(io("truncate"))?,
                None => lo.truncate(a.ino, size).map_err(io("truncate"))?,
            }
            a = local_only::resized(&a, size);
        }
        if let Some(m) = set.mode {
            a.mode = (a.mode & libc::S_IFMT) | (m & 0o7777);
        }
        if let Some(uid) = set.uid {
            a.uid = uid;
        }
        if let Some(gid) = set.gid {
            a.gid = gid;
        }
        if let Some(t) = set.atime {
            a.atime = local_only::set_time(t);
        }
        if let Some(t) = set.mtime {
            a.mtime = local_only::set_time(t);
        }
        let a = local_only::changed(&a);
        self.lo_set(id, &a);
        Ok(NodeAttr::from_remote(id, &a))
    }

    /// Removes local-only `name` from `parent` (a directory only when `dir`).
    pub(crate) fn lo_remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<(), FsError> {
        let lo = self.lo().expect("local-only store");
        let mut t = self.tree.lock();
        let id = t
            .child(parent, name)
            .ok_or_else(|| err!(libc::ENOENT, "no such local-only node"))?;
        check_removable(&t, id, dir)?;
        let attr = t.attr(id)?.clone();
        t.remove(parent, name, &mut Effects::default());
        drop(t);
        if attr.file_type() == libc::S_IFREG {
            lo.remove(attr.ino);
        }
        Ok(())
    }

    /// A synced directory that still holds local-only nodes is not empty.
    pub(crate) fn lo_check_rmdir(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        if self.lo().is_none() {
            return Ok(());
        }
        let t = self.tree.lock();
        if let Some(id) = t.child(parent, name)
            && t.child_names(id)
                .iter()
                .any(|n| t.child(id, n).is_some_and(|c| t.is_local_only(c)))
        {
            return Err(err!(
                libc::ENOTEMPTY,
                "{} holds local-only files",
                String::from_utf8_lossy(name)
            ));
        }
        Ok(())
    }

    pub(crate) fn lo_xattr(&self, id: u64, set: bool) -> Option<Result<Xattr, FsError>> {
        if !self.lo_node(id) {
            return None;
        }
        Some(if set {
            Err(err!(
                libc::ENOTSUP,
                "local-only files keep no extended attributes"
            ))
        } else {
            Err(err!(libc::ENODATA, "no such attribute"))
        })
    }

    /// Before a save replaces the synced file `name` in `parent` (node `id`): keeps the
    /// target's version under a conflict name when it is not the one kmount last saw.
    pub(crate) async fn keep_their_version(
        &self,
        caller: &Option<Caller>,
        parent: u64,
        name: &[u8],
    ) -> Result<(), FsError> {
        if self.lo().is_none() {
            return Ok(());
        }
        let known = {
            let t = self.tree.lock();
            let Some(known) = t.child(parent, name).and_then(|id| seen_version(&t, id)) else {
                return Ok(());
            };
            known
        };
        let path = self.tree.child_path(parent, name)?;
        let op = Op::GetAttr {
            node: kmount_proto::NodeRef::Path(path.clone()),
        };
        let theirs = match self.call_attr(op, caller).await {
            Ok(a) => a,
            Err(e) if e.errno == libc::ENOENT => return Ok(()),
            Err(e) => return Err(e),
        };
        if theirs.file_type() != libc::S_IFREG || same_version(&theirs, &known) {
            return Ok(());
        }
        self.save_their_version(caller, parent, name, &theirs).await
    }

    /// `attr`, the target's attributes of file `id`, found by an open for writing: `Some` when
    /// that is a version the tree did not have (and the node is not one changed here).
    pub(crate) fn unseen_version(&self, id: u64, attr: &Attr) -> Option<Attr> {
        self.lo()?;
        let known = seen_version(&self.tree.lock(), id)?;
        (attr.file_type() == libc::S_IFREG && !same_version(attr, &known)).then(|| attr.clone())
    }

    /// The truncation of an `open(O_TRUNC)` (a size-0 SETATTR without a handle) of `id`:
    /// the open it follows (writable, same caller, this session), whose unseen version, if
    /// any, is kept first. Its kernel handle, to truncate through.
    pub(crate) async fn truncating_open(
        &self,
        caller: &Option<Caller>,
        id: u64,
    ) -> Result<Option<u64>, FsError> {
        let Some((fh, unseen)) = self.writable_open_of(id, caller) else {
            return Ok(None);
        };
        let link = self.tree.lock().parent_and_name(id);
        if let (Some(theirs), Some((parent, name))) = (unseen, link) {
            self.save_their_version(caller, parent, &name, &theirs)
                .await?;
        }
        Ok(Some(fh))
    }

    /// Keeps the target's version `theirs` of `name` in `parent` as a local-only conflict
    /// copy, before a save replaces it.
    async fn save_their_version(
        &self,
        caller: &Option<Caller>,
        parent: u64,
        name: &[u8],
        theirs: &Attr,
    ) -> Result<(), FsError> {
        let Some(lo) = self.lo() else {
            return Ok(());
        };
        let path = self.tree.child_path(parent, name)?;
        let stamp = chrono_stamp(std::time::SystemTime::now());
        let saved_name = [name, format!(".kmount-conflict-{stamp}").as_bytes()].concat();
        let saved_as = self.tree.child_path(parent, &saved_name)?;
        let (uid, gid) = (theirs.uid, theirs.gid);
        let mut attr = lo.new_attr(theirs.mode, uid, gid, 0);
        attr.mtime = theirs.mtime;
        attr.atime = theirs.atime;
        match self.copy_here(caller, &path, attr.ino).await {
            Ok(size) => {
                attr.size = size;
                attr.blocks = size.div_ceil(512);
            }
            Err(e) => {
                lo.remove(attr.ino);
                return Err(err!(
                    e.errno,
                    "{path} changed in the target too, and its version could not be kept \
                     ({e}); the save was not made"
                ));
            }
        }
        let mut fx = Effects::default();
        {
            let mut t = self.tree.lock();
            if t.child(parent, &saved_name).is_some() {
                // The same second twice: the newer copy replaces the older.
                t.remove(parent, &saved_name, &mut fx);
            }
            t.upsert(parent, &saved_name, &attr, None, true, &mut fx);
        }
        self.invalidator().send(fx.inval);
        tracing::warn!(
            "conflict: {path} changed in the target since kmount last saw it, and is replaced \
             by a save made here; the target's version is kept here as {saved_as} (never sent)"
        );
        self.conflicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Conflict {
                path,
                saved_as,
                at: std::time::SystemTime::now(),
            });
        Ok(())
    }

    /// `rename` when it involves a local-only node or name; `None` when it does not.
    pub(crate) async fn lo_rename(
        &self,
        caller: &Option<Caller>,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> Option<Result<(), FsError>> {
        self.lo()?;
        let (src, dst, src_local, src_dir, dst_local) = {
            let t = self.tree.lock();
            let src = t.child(parent, name)?;
            let dst = t.child(new_parent, new_name);
            (
                src,
                dst,
                t.is_local_only(src),
                t.is_dir(src),
                dst.is_some_and(|d| t.is_local_only(d)),
            )
        };
        let to_local = self.lo_here(new_parent, new_name, src_dir);
        let crossing = match (src_local, to_local) {
            (false, false) if !dst_local => Crossing::None,
            (true, true) => Crossing::Local,
            (true, false) => Crossing::Upload,
            (false, true) => Crossing::Download,
            (false, false) => return Some(Err(exdev("renaming over a local-only file"))),
        };
        if matches!(crossing, Crossing::None) {
            return None;
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Some(Err(exdev("an exchange")));
        }
        if let Some(d) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Some(Err(err!(libc::EEXIST, "the target name exists")));
            }
            if d == src {
                return Some(Ok(()));
            }
            if let Err(e) = check_replace(&self.tree.lock(), src_dir, d) {
                return Some(Err(e));
            }
            if !dst_local && matches!(crossing, Crossing::Local) {
                return Some(Err(exdev("renaming over a synced file")));
            }
        }
        Some(match crossing {
            Crossing::Local => {
                self.lo_move((parent, name), (new_parent, new_name), dst, None);
                Ok(())
            }
            Crossing::Upload => {
                self.lo_upload(caller, src, parent, name, new_parent, new_name, dst)
                    .await
            }
            Crossing::Download => {
                self.lo_download(caller, src, parent, name, new_parent, new_name, dst)
                    .await
            }
            Crossing::None => unreachable!(),
        })
    }

    /// Renames in the tree, the node first taking identity `becomes` (attributes and symlink
    /// target) when it crossed the boundary; the bytes of a replaced local-only file go.
    fn lo_move(
        &self,
        (parent, name): (u64, &[u8]),
        (new_parent, new_name): (u64, &[u8]),
        dst: Option<u64>,
        becomes: Option<(u64, &Attr, Option<Vec<u8>>)>,
    ) {
        let replaced = move_across(
            &mut self.tree.lock(),
            (parent, name),
            (new_parent, new_name),
            dst,
            becomes,
        );
        if let (Some(lo), Some(a)) = (self.lo(), replaced)
            && a.file_type() == libc::S_IFREG
        {
            lo.remove(a.ino);
        }
    }

    /// A local-only file renamed to a synced name: written to the remote as one complete file
    /// renamed over the name, then the node is the remote's.
    #[allow(clippy::too_many_arguments)]
    async fn lo_upload(
        &self,
        caller: &Option<Caller>,
        src: u64,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        dst: Option<u64>,
    ) -> Result<(), FsError> {
        if self.write_back.is_some() {
            return self
                .wb_lo_upload(caller, src, parent, name, new_parent, new_name)
                .await;
        }
        let lo = self.lo().expect("local-only store");
        let attr = self.lo_attr(src)?;
        if attr.file_type() != libc::S_IFREG {
            return Err(exdev("a rename of a directory, symlink or special file"));
        }
        let to = self.tree.child_path(new_parent, new_name)?;
        if dst.is_some() {
            self.keep_their_version(caller, new_parent, new_name)
                .await?;
        }
        let chunk = MAX_IO_LEN as u64;
        let first = lo
            .read_at(attr.ino, 0, chunk as usize)
            .map_err(io("read"))?;
        let whole = attr.size <= chunk;
        let remote = if whole {
            self.put(caller, &to, first, &attr, true).await?
        } else {
            // Too big for one message: a temporary name beside it, written in pieces, then
            // renamed over it.
            let tmp_name = [b".", new_name, format!(".kmount-{:x}", attr.ino).as_bytes()].concat();
            let tmp = self.tree.child_path(new_parent, &tmp_name)?;
            self.put(caller, &tmp, first, &attr, false).await?;
            let mut offset = chunk;
            loop {
                let data = lo
                    .read_at(attr.ino, offset, chunk as usize)
                    .map_err(io("read"))?;
                if data.is_empty() {
                    break;
                }
                let n = data.len() as u64;
                let op = Op::WritePath {
                    path: tmp.clone(),
                    offset,
                    data,
                };
                if let Err(e) = self.call(op, caller).await {
                    let _ = self.call_ok(Op::Unlink { path: tmp.clone() }, caller).await;
                    return Err(e);
                }
                offset += n;
            }
            let op = Op::Rename {
                from: tmp.clone(),
                to: to.clone(),
                flags: 0,
            };
            if let Err(e) = self.call_ok(op, caller).await {
                let _ = self.call_ok(Op::Unlink { path: tmp }, caller).await;
                return Err(e);
            }
            let got = self
                .call_attr(Op::Lookup { path: to.clone() }, caller)
                .await?;
            // The times the local file had.
            let set = SetAttr {
                mtime: Some(kmount_proto::SetTime::At(attr.mtime)),
                ..SetAttr::default()
            };
            let node = kmount_proto::NodeRef::Path(to.clone());
            match self.call(Op::SetAttr { node, set }, caller).await {
                Ok(Done::Attr(a)) => a,
                _ => got,
            }
        };
        self.lo_move(
            (parent, name),
            (new_parent, new_name),
            dst,
            Some((src, &remote, None)),
        );
        lo.remove(attr.ino);
        // A change made here, as a rename through the remote is: listings and lookups asked
        // before it leave the new name alone.
        self.touch(&[parent, new_parent, src]);
        tracing::debug!(%to, "local-only file renamed to a synced name: sent");
        Ok(())
    }

    /// Writes `data` as the whole file `path` there, with `attr`'s mode and mtime.
    pub(crate) async fn put(
        &self,
        caller: &Option<Caller>,
        path: &RelPath,
        data: Vec<u8>,
        attr: &Attr,
        atomic: bool,
    ) -> Result<Attr, FsError> {
        let op = Op::PutFile {
            path: path.clone(),
            data,
            compressed: false,
            mode: attr.mode & 0o7777,
            mtime: Some(attr.mtime),
            atomic,
            keep_mode: false,
        };
        self.call_attr(op, caller).await
    }

    /// A synced file renamed to a local-only name (vim's `x` -> `x~`): its bytes are copied
    /// here and the remote file is removed, as the rename would have removed its name there.
    #[allow(clippy::too_many_arguments)]
    async fn lo_download(
        &self,
        caller: &Option<Caller>,
        src: u64,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        dst: Option<u64>,
    ) -> Result<(), FsError> {
        if self.write_back.is_some() {
            return self
                .wb_lo_download(caller, src, parent, name, new_parent, new_name)
                .await;
        }
        let lo = self.lo().expect("local-only store");
        let from = self.tree.child_path(parent, name)?;
        // The file's name goes from the target: a version made there that kmount has not
        // shown yet would go with it.
        self.keep_their_version(caller, parent, name).await?;
        let old = self.lo_attr(src)?;
        let kind = old.file_type();
        let symlink = self.tree.lock().symlink(src).map(<[u8]>::to_vec);
        if kind != libc::S_IFREG && kind != libc::S_IFLNK {
            return Err(exdev("a rename of a directory or special file"));
        }
        let mut local = lo.new_attr(old.mode, old.uid, old.gid, 0);
        local.atime = old.atime;
        local.mtime = old.mtime;
        local.size = old.size;
        local.blocks = old.blocks;
        if kind == libc::S_IFREG {
            let copied = self.copy_here(caller, &from, local.ino).await;
            match copied {
                Ok(size) => {
                    local.size = size;
                    local.blocks = size.div_ceil(512);
                }
                Err(e) => {
                    lo.remove(local.ino);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self
            .call_ok(Op::Unlink { path: from.clone() }, caller)
            .await
        {
            lo.remove(local.ino);
            return Err(e);
        }
        self.lo_move(
            (parent, name),
            (new_parent, new_name),
            dst,
            Some((src, &local, symlink)),
        );
        // The node is local-only now: touched, it would be looked up there.
        self.touch(&[parent, new_parent]);
        tracing::debug!(%from, "synced file renamed to a local-only name: kept here, removed there");
        Ok(())
    }

    /// Copies the remote file at `path` into the store as file `ino`; returns its size.
    async fn copy_here(
        &self,
        caller: &Option<Caller>,
        path: &RelPath,
        ino: u64,
    ) -> Result<u64, FsError> {
        let lo = self.lo().expect("local-only store");
        let mut offset = 0u64;
        loop {
            let op = Op::ReadPath {
                path: path.clone(),
                offset,
                len: MAX_IO_LEN,
            };
            let data = match self.call(op, caller).await? {
                Done::Content {
                    data, compressed, ..
                } => {
                    if compressed {
                        kmount_proto::tree::decompress(&data, MAX_IO_LEN as usize).map_err(|e| {
                            err!(libc::EIO, "a compressed read of {path} is malformed: {e}")
                        })?
                    } else {
                        data
                    }
                }
                other => {
                    return Err(err!(
                        libc::EIO,
                        "the agent answered ReadPath with {other:?}"
                    ));
                }
            };
            if data.is_empty() {
                lo.truncate(ino, offset).map_err(io("truncate"))?;
                return Ok(offset);
            }
            lo.write_at(ino, offset, &data).map_err(io("write"))?;
            offset += data.len() as u64;
            if data.len() < MAX_IO_LEN as usize {
                lo.truncate(ino, offset).map_err(io("truncate"))?;
                return Ok(offset);
            }
        }
    }
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn chrono_stamp(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The version of regular file `id` kmount last showed, when there is one to compare with: not
/// for a local-only node, one changed here since (stale), or one open here (a program writing
/// it through the mount).
fn seen_version(t: &TreeState, id: u64) -> Option<Attr> {
    if t.is_local_only(id) || t.is_stale(id) || t.is_open(id) {
        return None;
    }
    t.attr(id)
        .ok()
        .filter(|a| a.file_type() == libc::S_IFREG)
        .cloned()
}

/// The same version of a file: inode, size and mtime.
fn same_version(a: &Attr, b: &Attr) -> bool {
    a.ino == b.ino && a.size == b.size && a.mtime == b.mtime
}

fn check_removable(t: &TreeState, id: u64, dir: bool) -> Result<(), FsError> {
    match (dir, t.is_dir(id)) {
        (true, false) => Err(err!(libc::ENOTDIR, "not a directory")),
        (false, true) => Err(err!(libc::EISDIR, "a directory")),
        (true, true) if !t.child_names(id).is_empty() => {
            Err(err!(libc::ENOTEMPTY, "the directory is not empty"))
        }
        _ => Ok(()),
    }
}

/// [`Core::lo_move`] in the tree: returns the attributes of a local-only file `dst` replaced.
pub(crate) fn move_across(
    t: &mut TreeState,
    (parent, name): (u64, &[u8]),
    (new_parent, new_name): (u64, &[u8]),
    dst: Option<u64>,
    becomes: Option<(u64, &Attr, Option<Vec<u8>>)>,
) -> Option<Attr> {
    let replaced = dst
        .filter(|&d| t.is_local_only(d))
        .and_then(|d| t.attr(d).ok().cloned());
    if let Some((src, attr, symlink)) = becomes {
        t.rebind(src, attr);
        t.update_attr(src, attr, symlink, &mut Effects::default());
    }
    t.rename(
        parent,
        name,
        new_parent,
        new_name,
        false,
        &mut Effects::default(),
    );
    replaced
}

fn check_replace(t: &TreeState, src_dir: bool, dst: u64) -> Result<(), FsError> {
    match (src_dir, t.is_dir(dst)) {
        (true, false) => Err(err!(libc::ENOTDIR, "the target is not a directory")),
        (false, true) => Err(err!(libc::EISDIR, "the target is a directory")),
        (true, true) if !t.child_names(dst).is_empty() => {
            Err(err!(libc::ENOTEMPTY, "the target is not empty"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn conflict_stamps_are_utc_dates() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(chrono_stamp(at(0)), "19700101-000000");
        assert_eq!(chrono_stamp(at(951_782_400)), "20000229-000000");
        assert_eq!(chrono_stamp(at(1_795_699_845)), "20261126-133045");
    }
}
