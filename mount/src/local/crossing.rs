//! Renames across the local-only boundary ([`crate::local_only`]) on a write-back mount: the
//! outcome the editor meant, as without write-back, made here at once and sent through the
//! journal.
//!
//! - A local-only file renamed to a synced name (a JetBrains or VS Code save: `x___jb_tmp___`
//!   -> `x`) becomes a synced file made here: its bytes go into the content cache (the view
//!   reads them from there) and the journal sends it as one complete file renamed over `x`
//!   (one atomic `PutFile`: a watcher in the target sees `x` replaced once, never a partial
//!   file). A file larger than one record goes as a temporary file beside it, written in
//!   pieces and renamed over it.
//! - A synced file renamed to a local-only name (vim's `x` -> `x~`, JetBrains' `x` ->
//!   `x___jb_old___`) keeps its bytes here (from the cache, or fetched) and its name is
//!   removed there, as the rename would have removed it.

use super::*;
use crate::journal::MAX_PUT_FILE;
use crate::local_ops::{exdev, move_across};

/// What a rename over a name replaced.
struct Replaced {
    /// The remote identity of a synced file that lost its last name (its cached bytes go).
    gone: Option<(u64, u64)>,
    /// A local-only file replaced (its bytes go).
    local: Option<Attr>,
}

impl Core {
    /// A local-only regular file `src` (`name` in `parent`) renamed to the synced `new_name`
    /// in `new_parent`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn wb_lo_upload(
        &self,
        caller: &Option<Caller>,
        src: u64,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
    ) -> Result<(), FsError> {
        self.throttle().await;
        let wb = self.wb().expect("write-back mode");
        let lo = self.lo().expect("local-only store");
        let old = self.tree().lock().attr(src)?.clone();
        if old.file_type() != libc::S_IFREG {
            return Err(exdev("a rename of a directory, symlink or special file"));
        }
        let store = |e: std::io::Error| err!(libc::EIO, "reading the local-only file: {e}");
        let size = lo.len(old.ino).map_err(store)?;
        // A piece at a time (one record's worth): a big file is never whole in memory.
        let piece = |offset: u64| lo.read_at(old.ino, offset, MAX_PUT_FILE).map_err(store);
        let mode = old.mode & 0o7777;
        let mut attr = self.local_attr(libc::S_IFREG | mode, old.uid, old.gid, size, 0);
        attr.atime = old.atime;
        attr.mtime = old.mtime;
        let order = self.order()?;
        let entry = wb.cache.create(
            wb.content_key((attr.dev, attr.ino)),
            Validity::of(&attr),
            size,
        )?;
        // Kept until the remote has the file (adopted).
        entry.pin();
        let replaced = if size <= MAX_PUT_FILE as u64 {
            let data = piece(0)?;
            entry.write_local(0, &data)?;
            self.change_in(&order, |t| {
                let to = t.child_path(new_parent, new_name)?;
                let replaced =
                    take_name(t, src, &attr, None, (parent, name), (new_parent, new_name))?;
                let op = Op::PutFile {
                    path: to,
                    data,
                    compressed: false,
                    mode,
                    mtime: Some(attr.mtime),
                    atomic: true,
                    keep_mode: false,
                };
                Ok((replaced, Some(change(op, caller, vec![src, new_parent]))))
            })?
            .0
        } else {
            // Too big for one record: a temporary name beside it, written in pieces, renamed
            // over it; then the times the file had (the writes moved them).
            let tmp_name = [b".", new_name, format!(".kmount-{:x}", attr.ino).as_bytes()].concat();
            let tmp = self.tree().child_path(new_parent, &tmp_name)?;
            let mut offset = 0;
            while offset < size {
                let data = piece(offset)?;
                if data.is_empty() {
                    break;
                }
                entry.write_local(offset, &data)?;
                let n = data.len() as u64;
                let op = if offset == 0 {
                    Op::PutFile {
                        path: tmp.clone(),
                        data,
                        compressed: false,
                        mode,
                        mtime: None,
                        atomic: false,
                        keep_mode: false,
                    }
                } else {
                    Op::WritePath {
                        path: tmp.clone(),
                        offset,
                        data,
                    }
                };
                self.change_in(&order, |_| Ok(((), Some(change(op, caller, Vec::new())))))?;
                offset += n;
            }
            let replaced = self
                .change_in(&order, |t| {
                    let to = t.child_path(new_parent, new_name)?;
                    let replaced =
                        take_name(t, src, &attr, None, (parent, name), (new_parent, new_name))?;
                    let op = Op::Rename {
                        from: tmp.clone(),
                        to,
                        flags: 0,
                    };
                    Ok((replaced, Some(change(op, caller, vec![new_parent]))))
                })?
                .0;
            self.change_in(&order, |t| {
                let op = Op::SetAttr {
                    node: NodeRef::Path(t.path(src)?),
                    set: SetAttr {
                        mtime: Some(SetTime::At(attr.mtime)),
                        ..SetAttr::default()
                    },
                };
                Ok(((), Some(change(op, caller, vec![src]))))
            })?;
            replaced
        };
        drop(order);
        lo.remove(old.ino);
        self.drop_replaced(replaced);
        // The end of a save, as a close is for one written in place: durable now, and so on
        // its way (the sender sees durable records only; left to the background commit, it
        // would wait up to its interval).
        wb.journal.commit()?;
        tracing::debug!(size, "local-only file renamed to a synced name: journaled");
        Ok(())
    }

    /// A synced file or symlink `src` (`name` in `parent`) renamed to the local-only
    /// `new_name` in `new_parent`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn wb_lo_download(
        &self,
        caller: &Option<Caller>,
        src: u64,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
    ) -> Result<(), FsError> {
        self.throttle().await;
        let wb = self.wb().expect("write-back mode");
        let lo = self.lo().expect("local-only store");
        let (old, symlink) = {
            let t = self.tree().lock();
            (t.attr(src)?.clone(), t.symlink(src).map(<[u8]>::to_vec))
        };
        let kind = old.file_type();
        if kind != libc::S_IFREG && kind != libc::S_IFLNK {
            return Err(exdev("a rename of a directory or special file"));
        }
        if kind == libc::S_IFREG && old.nlink > 1 {
            return Err(exdev("a rename of a file with other hard links"));
        }
        let mut local = lo.new_attr(old.mode, old.uid, old.gid, 0);
        local.atime = old.atime;
        local.mtime = old.mtime;
        local.size = old.size;
        local.blocks = old.blocks;
        if kind == libc::S_IFREG
            && let Err(e) = self.copy_to_store(src, old.size, local.ino).await
        {
            lo.remove(local.ino);
            return Err(e);
        }
        let remote = self.tree().remote_of(src);
        let order = self.order()?;
        let replaced = self.change_in(&order, |t| {
            let from = t.child_path(parent, name)?;
            let replaced = take_name(
                t,
                src,
                &local,
                symlink,
                (parent, name),
                (new_parent, new_name),
            )?;
            Self::dir_changed(t, parent, 0);
            let op = Op::Unlink { path: from };
            Ok((replaced, Some(change(op, caller, vec![parent]))))
        });
        drop(order);
        let replaced = match replaced {
            Ok((r, _)) => r,
            Err(e) => {
                lo.remove(local.ino);
                return Err(e);
            }
        };
        // The bytes are the store's now.
        if let Some(remote) = remote.filter(|_| kind == libc::S_IFREG) {
            wb.cache.remove(&wb.content_key(remote));
        }
        self.drop_replaced(replaced);
        tracing::debug!(
            "synced file renamed to a local-only name: kept here, journaled its removal"
        );
        Ok(())
    }

    /// Copies the `size` bytes of synced file `id` (cached, else fetched) into the local-only
    /// store as file `ino`.
    async fn copy_to_store(&self, id: u64, size: u64, ino: u64) -> Result<(), FsError> {
        let lo = self.lo().expect("local-only store");
        let store = |e: std::io::Error| err!(libc::EIO, "the local-only store: {e}");
        // Made even when empty.
        lo.open(ino, libc::O_TRUNC).map_err(store)?;
        let (entry, _) = self.entry_for(id)?;
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(MAX_PUT_FILE as u64);
            self.fetch(id, &entry, offset, len).await?;
            let data = entry.read(offset, len)?;
            if data.is_empty() {
                break;
            }
            lo.write_at(ino, offset, &data).map_err(store)?;
            offset += data.len() as u64;
        }
        Ok(())
    }

    fn drop_replaced(&self, replaced: Replaced) {
        let wb = self.wb().expect("write-back mode");
        if let Some(remote) = replaced.gone {
            wb.cache.remove(&wb.content_key(remote));
        }
        if let (Some(lo), Some(a)) = (self.lo(), replaced.local)
            && a.file_type() == libc::S_IFREG
        {
            lo.remove(a.ino);
        }
    }
}

fn change(op: Op, caller: &Option<Caller>, nodes: Vec<u64>) -> Change {
    Change {
        op,
        caller: caller.clone(),
        nodes,
    }
}

/// In the tree: node `src` takes identity `attr` (and `symlink`) and moves from `from` to
/// `to`, replacing what was there. Fails when `from` is no longer `src` (a change in between).
fn take_name(
    t: &mut TreeState,
    src: u64,
    attr: &Attr,
    symlink: Option<Vec<u8>>,
    (parent, name): (u64, &[u8]),
    (new_parent, new_name): (u64, &[u8]),
) -> Result<Replaced, FsError> {
    if t.child(parent, name) != Some(src) {
        return Err(err!(
            libc::ENOENT,
            "{} was renamed or removed meanwhile",
            String::from_utf8_lossy(name)
        ));
    }
    let dst = t.child(new_parent, new_name).filter(|&d| d != src);
    let replaced_remote = dst
        .filter(|&d| !t.is_local_only(d))
        .and_then(|d| t.remote_of(d));
    let replaced_local = move_across(
        t,
        (parent, name),
        (new_parent, new_name),
        dst,
        Some((src, attr, symlink)),
    );
    let ts = now();
    if let Some(d) = dst.filter(|_| replaced_remote.is_some())
        && let Ok(mut a) = t.attr(d).cloned()
    {
        a.ctime = ts;
        a.nlink = a.nlink.saturating_sub(1);
        t.update_attr(d, &a, None, &mut Effects::default());
    }
    Core::dir_changed(t, new_parent, 0);
    let gone = dst.filter(|&d| !t.is_linked(d)).and(replaced_remote);
    Ok(Replaced {
        gone,
        local: replaced_local,
    })
}
