//! Tree walks (`Op::WalkOpen`, `Op::WalkNext`): the whole subtree below a directory, in
//! batches of [`TreeEntry`], every directory before its children.
//!
//! Invariants:
//! - Breadth first: a directory's entry is emitted when its parent is listed, and the directory
//!   itself is listed later, so parents always come first. At most one directory is open per
//!   walk; the directories still to list are kept as paths and opened beneath the root (no
//!   symlink followed) when their turn comes.
//! - An entry that vanishes or cannot be `lstat`ed between listing and `lstat` is skipped; a
//!   directory that vanished, was replaced by a symlink or cannot be read before its turn
//!   contributes no children (its own entry was already sent). [`crate::digest`] treats such
//!   directories the same way, so equal trees give equal digests on both ends.
//! - Batches are answered in the order the `WalkNext` requests arrived on the stream (a
//!   [`Ticket`] taken by the reader thread fixes each request's turn), so a mount that keeps
//!   several requests in flight can apply the replies in request order.
//! - The batch with `eof` closes the handle. A `WalkNext` still in flight for a finished walk,
//!   or arriving for one of the recently finished walks, answers an empty batch with `eof`.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kmount_proto::{Done, MAX_FRAME_LEN, RelPath, TreeEntry};

use crate::handles::{DirStream, Handle, RawEntry};
use crate::hide::View;
use crate::ops::{Agent, attr};
use crate::sys::{self, Errno, SysResult, cstring};

/// Raw (uncompressed) bytes of one batch at most: well inside a frame and inside
/// [`kmount_proto::tree::MAX_TREE_BATCH_BYTES`].
const BATCH_BYTES: usize = MAX_FRAME_LEN / 8;
/// How many finished walk handles still answer "empty, eof" instead of `EBADF`.
const FINISHED_KEPT: usize = 64;

/// The state of one walk, owned by its [`Handle::Walk`].
#[derive(Debug)]
pub struct WalkHandle {
    state: Mutex<WalkState>,
    tickets: Mutex<Tickets>,
    turn: Condvar,
}

#[derive(Debug)]
struct WalkState {
    /// Directories whose entry was emitted and whose children are still to list.
    queue: VecDeque<RelPath>,
    /// The directory being listed.
    current: Option<(RelPath, DirStream)>,
    finished: bool,
}

/// Request order: `issued` tickets were handed out, batches for tickets below `served` are done.
#[derive(Debug, Default)]
struct Tickets {
    issued: u64,
    served: u64,
    /// Tickets dropped before their turn (their request never reached the walk).
    abandoned: BTreeSet<u64>,
}

impl Tickets {
    fn advance(&mut self) {
        self.served += 1;
        while self.abandoned.remove(&self.served) {
            self.served += 1;
        }
    }
}

/// One `WalkNext` request's place in line, taken in arrival order by the reader thread.
#[derive(Debug)]
pub struct Ticket {
    handle: Arc<Handle>,
    n: u64,
}

impl Ticket {
    fn walk(&self) -> &WalkHandle {
        match &*self.handle {
            Handle::Walk(w) => w,
            _ => unreachable!("tickets are only issued for walk handles"),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let w = self.walk();
        let mut t = lock(&w.tickets);
        if t.served == self.n {
            t.advance();
            w.turn.notify_all();
        } else {
            t.abandoned.insert(self.n);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Walk state stays consistent across a panic (a panicking batch is simply lost).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Recently finished walks, so that late requests get a clean "eof".
#[derive(Debug, Default)]
pub struct Walks {
    finished: Mutex<VecDeque<u64>>,
}

impl Walks {
    fn finish(&self, id: u64) {
        let mut f = lock(&self.finished);
        if f.len() == FINISHED_KEPT {
            f.pop_front();
        }
        f.push_back(id);
    }

    fn is_finished(&self, id: u64) -> bool {
        lock(&self.finished).contains(&id)
    }
}

/// A turn for a `WalkNext` on `handle`, or `None` when it is not a walk (the request then
/// fails on its own).
pub fn ticket(a: &Agent, handle: u64) -> Option<Ticket> {
    let h = a.handles.get(handle).ok()?;
    let Handle::Walk(w) = &*h else { return None };
    let n = {
        let mut t = lock(&w.tickets);
        t.issued += 1;
        t.issued - 1
    };
    Some(Ticket { handle: h, n })
}

/// `Op::WalkOpen`: the start directory is opened at once, so a bad path fails here.
pub fn open(a: &Agent, path: &RelPath) -> SysResult<Done> {
    if a.hide.hidden(path, true) {
        return Err(Errno(libc::ENOENT));
    }
    let fd = a
        .root
        .open_beneath(path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let stream = DirStream::new(fd)?;
    let walk = WalkHandle {
        state: Mutex::new(WalkState {
            queue: VecDeque::new(),
            current: Some((path.clone(), stream)),
            finished: false,
        }),
        tickets: Mutex::new(Tickets::default()),
        turn: Condvar::new(),
    };
    Ok(Done::Handle(a.handles.insert(Handle::Walk(walk))))
}

/// `Op::WalkNext`. With a ticket, waits for the requests that arrived before it.
pub fn next(a: &Agent, id: u64, max: u32, ticket: Option<Ticket>) -> SysResult<Done> {
    if max == 0 {
        return Err(Errno(libc::EINVAL));
    }
    let handle = match &ticket {
        Some(t) => t.handle.clone(),
        None => match a.handles.get(id) {
            Ok(h) => h,
            Err(_) if a.walks.is_finished(id) => return encode(Vec::new(), true),
            Err(e) => return Err(e),
        },
    };
    let Handle::Walk(walk) = &*handle else {
        return Err(Errno(libc::EBADF));
    };
    if let Some(t) = &ticket {
        let mut tickets = lock(&walk.tickets);
        while tickets.served != t.n {
            tickets = walk.turn.wait(tickets).unwrap_or_else(|p| p.into_inner());
        }
    }
    let (entries, eof) = {
        let mut state = lock(&walk.state);
        if state.finished {
            (Vec::new(), true)
        } else {
            let batch = produce(a, &mut state, max as usize);
            if batch.1 {
                // The handle closes with the last batch; late requests still get an eof.
                a.walks.finish(id);
                let _ = a.handles.remove(id);
            }
            batch
        }
    };
    drop(ticket); // the next request's turn
    encode(entries, eof)
}

fn encode(entries: Vec<TreeEntry>, eof: bool) -> SysResult<Done> {
    let zstd = kmount_proto::tree::encode_entries(&entries).map_err(|_| Errno(libc::EIO))?;
    Ok(Done::Tree {
        zstd,
        count: entries.len() as u32,
        eof,
    })
}

/// Up to `max` entries; `true` when the walk is complete.
fn produce(a: &Agent, st: &mut WalkState, max: usize) -> (Vec<TreeEntry>, bool) {
    let hide = a.hide.view();
    let mut out = Vec::with_capacity(max.min(4096));
    let mut bytes = 0usize;
    while out.len() < max && bytes < BATCH_BYTES {
        let Some((dir, stream)) = st.current.as_mut() else {
            let Some(next) = st.queue.pop_front() else {
                st.finished = true;
                return (out, true);
            };
            // Vanished, replaced by a symlink or unreadable: no children to report.
            if let Ok(fd) = a
                .root
                .open_beneath(&next, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                && let Ok(stream) = DirStream::new(fd)
            {
                st.current = Some((next, stream));
            }
            continue;
        };
        let raw = match stream.next_entry() {
            Ok(Some(raw)) => raw,
            Ok(None) | Err(_) => {
                st.current = None;
                continue;
            }
        };
        let Some(entry) = visible_entry(stream.fd(), dir, &raw, &hide) else {
            continue;
        };
        if entry.attr.is_dir() {
            st.queue.push_back(entry.path.clone());
        }
        bytes += 96 + entry.path.as_bytes().len() + entry.symlink.as_ref().map_or(0, Vec::len);
        out.push(entry);
    }
    // A full batch still says eof when nothing is left, sparing the mount one round trip.
    if let Some((_, stream)) = st.current.as_mut() {
        match stream.next_entry() {
            Ok(Some(raw)) => stream.push_back(raw),
            Ok(None) | Err(_) => st.current = None,
        }
    }
    if st.current.is_none() && st.queue.is_empty() {
        st.finished = true;
        return (out, true);
    }
    (out, false)
}

/// [`tree_entry`] of `raw` unless the ignore rules hide it. A hidden entry whose kind the
/// directory listing gives is not even `lstat`ed (a hidden directory is never looked into).
pub fn visible_entry(
    dir: libc::c_int,
    dir_path: &RelPath,
    raw: &RawEntry,
    hide: &View,
) -> Option<TreeEntry> {
    if !hide.active() {
        return tree_entry(dir, dir_path, &raw.name);
    }
    let listed = match raw.kind {
        libc::DT_DIR => Some(true),
        libc::DT_UNKNOWN => None,
        _ => Some(false),
    };
    if let Some(is_dir) = listed
        && hide.hidden(&dir_path.join(&raw.name).ok()?, is_dir)
    {
        return None;
    }
    let e = tree_entry(dir, dir_path, &raw.name)?;
    if listed != Some(e.attr.is_dir()) && hide.hidden(&e.path, e.attr.is_dir()) {
        return None;
    }
    Some(e)
}

/// The entry `name` of the open directory `dir` (at `dir_path`), or `None` when it vanished,
/// cannot be `lstat`ed, or its path would exceed `PATH_MAX`.
pub fn tree_entry(dir: libc::c_int, dir_path: &RelPath, name: &[u8]) -> Option<TreeEntry> {
    let path = dir_path.join(name).ok()?;
    let c = cstring(name).ok()?;
    let st = sys::fstatat(dir, &c, libc::AT_SYMLINK_NOFOLLOW).ok()?;
    let symlink = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        Some(sys::readlinkat(dir, &c).ok()?)
    } else {
        None
    };
    Some(TreeEntry {
        path,
        attr: attr(&st),
        symlink,
    })
}
