//! The inode table: which FUSE node ids the kernel knows, and the names they go by.
//!
//! Invariants:
//! - The root is node [`ROOT_ID`], always present, never named by a link.
//! - A node id is the remote `st_ino` whenever that is unambiguous (same `st_dev` as the root,
//!   not 1, not already the id of another live node), so `stat` through the mount shows the
//!   remote's inode numbers. Otherwise it is synthetic, from [`SYNTHETIC_BASE`] up.
//! - Hard links share one node; `links` holds every (parent, name) known to name it, the most
//!   recently confirmed first. `names` is the reverse map and agrees with `links` exactly.
//! - `nlookup` counts the kernel's references (every entry reply); a node is dropped when the
//!   kernel has forgotten it and no handle is open on it.
//!
//! Everything sits behind one `std::sync::Mutex`, held only for short sections with no `.await`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use kmount_proto::{Attr, RelPath};

use crate::err;
use crate::error::FsError;

/// `FUSE_ROOT_ID`.
pub const ROOT_ID: u64 = 1;

/// First synthetic node id; remote inode numbers this large do not occur in practice.
pub const SYNTHETIC_BASE: u64 = 1 << 63;

/// Deepest path walked before concluding the links form a loop.
const MAX_DEPTH: usize = 4096;

type Link = (u64, Vec<u8>);

#[derive(Debug)]
struct Node {
    /// Remote (st_dev, st_ino).
    remote: (u64, u64),
    /// `S_IFMT` bits.
    kind: u32,
    links: Vec<Link>,
    nlookup: u64,
    /// Open files and directories on this node.
    open: u32,
    /// Agent file handles open on this node (a subset of `open`), usable for fstat.
    handles: Vec<u64>,
}

#[derive(Debug)]
struct Inner {
    nodes: HashMap<u64, Node>,
    by_remote: HashMap<(u64, u64), u64>,
    names: HashMap<Link, u64>,
    root_dev: u64,
    next_synthetic: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct InodeTable {
    inner: Mutex<Inner>,
}

impl InodeTable {
    /// A table holding only the root, whose remote attributes are `root`.
    pub fn new(root: &Attr) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_ID,
            Node {
                remote: (root.dev, root.ino),
                kind: root.file_type(),
                links: Vec::new(),
                nlookup: 1,
                open: 0,
                handles: Vec::new(),
            },
        );
        let mut by_remote = HashMap::new();
        by_remote.insert((root.dev, root.ino), ROOT_ID);
        Self {
            inner: Mutex::new(Inner {
                nodes,
                by_remote,
                names: HashMap::new(),
                root_dev: root.dev,
                next_synthetic: SYNTHETIC_BASE,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No section panics midway, so a poisoned table is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `name` in `parent` is the remote node `attr`, and counts one kernel lookup
    /// of it. Returns its node id.
    pub fn remember(&self, parent: u64, name: &[u8], attr: &Attr) -> u64 {
        self.record(parent, name, attr, false)
    }

    /// Like [`InodeTable::remember`] for a node the remote has just made (mkdir, mknod,
    /// symlink): a live node with the same remote inode number is a dead file whose number was
    /// reused, so the new one gets a node of its own.
    pub fn remember_new(&self, parent: u64, name: &[u8], attr: &Attr) -> u64 {
        self.record(parent, name, attr, true)
    }

    fn record(&self, parent: u64, name: &[u8], attr: &Attr, fresh: bool) -> u64 {
        let mut t = self.lock();
        let link = (parent, name.to_vec());
        let known = t.names.get(&link).copied().filter(|id| {
            !fresh
                && t.nodes
                    .get(id)
                    .is_some_and(|n| n.remote == (attr.dev, attr.ino) && n.kind == attr.file_type())
        });
        let id = match known {
            Some(id) => id,
            None => t.node_for(attr, fresh),
        };
        t.add_link(id, link);
        if let Some(node) = t.nodes.get_mut(&id) {
            node.nlookup += 1;
        }
        id
    }

    /// The node id `attr` has or would get, without recording anything (for plain readdir).
    pub fn peek(&self, attr: &Attr) -> u64 {
        let t = self.lock();
        match t.by_remote.get(&(attr.dev, attr.ino)) {
            Some(&id) if id != ROOT_ID && t.nodes[&id].kind == attr.file_type() => id,
            _ => attr.ino,
        }
    }

    /// The kernel dropped `n` references to `id`.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut t = self.lock();
        if let Some(node) = t.nodes.get_mut(&id) {
            node.nlookup = node.nlookup.saturating_sub(n);
            t.maybe_drop(id);
        }
    }

    /// The path of `id` beneath the root, through its first link at each step.
    pub fn path(&self, id: u64) -> Result<RelPath, FsError> {
        self.lock().path(id)
    }

    /// The path of `name` in directory `parent`.
    pub fn child_path(&self, parent: u64, name: &[u8]) -> Result<RelPath, FsError> {
        Ok(self.path(parent)?.join(name)?)
    }

    /// `name` in `parent` no longer exists.
    pub fn unlink(&self, parent: u64, name: &[u8]) {
        let mut t = self.lock();
        if let Some(id) = t.names.remove(&(parent, name.to_vec())) {
            let link = (parent, name.to_vec());
            if let Some(node) = t.nodes.get_mut(&id) {
                node.links.retain(|l| *l != link);
            }
            t.maybe_drop(id);
        }
    }

    /// A successful `rename(parent/name, new_parent/new_name)`; `exchange` for `RENAME_EXCHANGE`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        exchange: bool,
    ) {
        let mut t = self.lock();
        let from = (parent, name.to_vec());
        let to = (new_parent, new_name.to_vec());
        let src = t.names.get(&from).copied();
        let dst = t.names.get(&to).copied();
        if src.is_some() && src == dst {
            // Two links of one inode: rename does nothing (and exchange swaps identical names).
            return;
        }
        if exchange {
            t.names.remove(&from);
            t.names.remove(&to);
            if let Some(s) = src {
                t.replace_link(s, &from, to.clone());
                t.names.insert(to.clone(), s);
            }
            if let Some(d) = dst {
                t.replace_link(d, &to, from.clone());
                t.names.insert(from, d);
            }
        } else {
            if let Some(d) = dst {
                t.names.remove(&to);
                if let Some(node) = t.nodes.get_mut(&d) {
                    node.links.retain(|l| *l != to);
                }
                t.maybe_drop(d);
            }
            if let Some(s) = src {
                t.names.remove(&from);
                t.replace_link(s, &from, to.clone());
                t.names.insert(to, s);
            }
        }
    }

    /// A file (with its agent handle) or directory (`None`) was opened on `id`.
    pub fn opened(&self, id: u64, handle: Option<u64>) -> Result<(), FsError> {
        let mut t = self.lock();
        let node = t
            .nodes
            .get_mut(&id)
            .ok_or_else(|| err!(libc::ESTALE, "node {id} is not known"))?;
        node.open += 1;
        node.handles.extend(handle);
        Ok(())
    }

    /// The counterpart of [`InodeTable::opened`].
    pub fn closed(&self, id: u64, handle: Option<u64>) {
        let mut t = self.lock();
        if let Some(node) = t.nodes.get_mut(&id) {
            node.open = node.open.saturating_sub(1);
            if let Some(h) = handle {
                node.handles.retain(|&x| x != h);
            }
            t.maybe_drop(id);
        }
    }

    /// An agent file handle open on `id`, if any.
    pub fn handle_of(&self, id: u64) -> Option<u64> {
        self.lock()
            .nodes
            .get(&id)
            .and_then(|n| n.handles.first().copied())
    }

    /// Whether `handle` is an agent file handle open on `id`.
    pub fn has_handle(&self, id: u64, handle: u64) -> bool {
        self.lock()
            .nodes
            .get(&id)
            .is_some_and(|n| n.handles.contains(&handle))
    }

    /// Remote (st_dev, st_ino) of `id`.
    pub fn remote_of(&self, id: u64) -> Option<(u64, u64)> {
        self.lock().nodes.get(&id).map(|n| n.remote)
    }

    /// Whether any name is known for `id` (the root always has its path).
    pub fn is_linked(&self, id: u64) -> bool {
        id == ROOT_ID
            || self
                .lock()
                .nodes
                .get(&id)
                .is_some_and(|n| !n.links.is_empty())
    }

    /// Parent of `id` through its first link; the root is its own parent.
    pub fn parent_of(&self, id: u64) -> u64 {
        self.lock()
            .nodes
            .get(&id)
            .and_then(|n| n.links.first())
            .map_or(ROOT_ID, |l| l.0)
    }

    /// Drops the first link of `id`: the remote has another file under that name now.
    pub fn drop_first_link(&self, id: u64) {
        let mut t = self.lock();
        let Some(link) = t.nodes.get(&id).and_then(|n| n.links.first().cloned()) else {
            return;
        };
        if t.names.get(&link) == Some(&id) {
            t.names.remove(&link);
        }
        if let Some(node) = t.nodes.get_mut(&id) {
            node.links.remove(0);
        }
        t.maybe_drop(id);
    }

    /// The kernel's reference count on `id`, `None` when the node is not in the table.
    pub fn lookup_count(&self, id: u64) -> Option<u64> {
        self.lock().nodes.get(&id).map(|n| n.nlookup)
    }

    /// The node `name` in `parent` names, if known.
    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.lock().names.get(&(parent, name.to_vec())).copied()
    }

    /// Number of nodes, the root included.
    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    /// Never true: the root is always there.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Inner {
    /// The node for remote `attr`, created (with no links, no lookups) when new.
    fn node_for(&mut self, attr: &Attr, fresh: bool) -> u64 {
        let key = (attr.dev, attr.ino);
        let kind = attr.file_type();
        if let Some(&id) = self.by_remote.get(&key) {
            // The root is only reached by its own path; any other name for it is an alias
            // (a bind mount) and gets a node of its own. So does an inode number the remote
            // reused while the kernel still holds the old node: seen for a different file
            // type, for a node that lost all its names (unlinked, possibly still open), or
            // for a file just made. Sharing the kernel's inode of a dead file would mix the
            // two files' caches.
            let node = &self.nodes[&id];
            if id != ROOT_ID && node.kind == kind && !fresh && !node.links.is_empty() {
                return id;
            }
        }
        let id = if attr.dev == self.root_dev
            && attr.ino > ROOT_ID
            && attr.ino < SYNTHETIC_BASE
            && !self.nodes.contains_key(&attr.ino)
        {
            attr.ino
        } else {
            self.next_synthetic += 1;
            self.next_synthetic
        };
        self.nodes.insert(
            id,
            Node {
                remote: key,
                kind,
                links: Vec::new(),
                nlookup: 0,
                open: 0,
                handles: Vec::new(),
            },
        );
        if self.by_remote.get(&key) != Some(&ROOT_ID) {
            self.by_remote.insert(key, id);
        }
        id
    }

    /// Makes `link` name `id` (first in its list), taking it from any node it named before.
    fn add_link(&mut self, id: u64, link: Link) {
        if let Some(old) = self.names.insert(link.clone(), id)
            && old != id
        {
            if let Some(node) = self.nodes.get_mut(&old) {
                node.links.retain(|l| *l != link);
            }
            self.maybe_drop(old);
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.links.retain(|l| *l != link);
        if node.kind == libc::S_IFDIR {
            // A directory has one name; a new one means it moved.
            for stale in std::mem::take(&mut node.links) {
                if self.names.get(&stale) == Some(&id) {
                    self.names.remove(&stale);
                }
            }
            node.links.push(link);
        } else {
            node.links.insert(0, link);
        }
    }

    /// Replaces `from` by `to` in the links of `id`, putting it first.
    fn replace_link(&mut self, id: u64, from: &Link, to: Link) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.links.retain(|l| l != from && *l != to);
            node.links.insert(0, to);
        }
    }

    fn maybe_drop(&mut self, id: u64) {
        let Some(node) = self.nodes.get(&id) else {
            return;
        };
        if id == ROOT_ID || node.nlookup > 0 || node.open > 0 {
            return;
        }
        let Some(node) = self.nodes.remove(&id) else {
            return;
        };
        for link in node.links {
            if self.names.get(&link) == Some(&id) {
                self.names.remove(&link);
            }
        }
        if self.by_remote.get(&node.remote) == Some(&id) {
            self.by_remote.remove(&node.remote);
        }
    }

    fn path(&self, id: u64) -> Result<RelPath, FsError> {
        let mut names: Vec<&[u8]> = Vec::new();
        let mut cur = id;
        while cur != ROOT_ID {
            if names.len() > MAX_DEPTH {
                return Err(err!(libc::ELOOP, "node {id}: its parent links form a loop"));
            }
            let node = self
                .nodes
                .get(&cur)
                .ok_or_else(|| err!(libc::ESTALE, "node {cur} is no longer known"))?;
            let (parent, name) = node
                .links
                .first()
                .ok_or_else(|| err!(libc::ENOENT, "node {cur} has been removed"))?;
            names.push(name);
            cur = *parent;
        }
        let mut bytes = Vec::new();
        for name in names.iter().rev() {
            if !bytes.is_empty() {
                bytes.push(b'/');
            }
            bytes.extend_from_slice(name);
        }
        Ok(RelPath::new(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmount_proto::Timespec;

    const DEV: u64 = 42;

    fn attr(ino: u64, kind: u32) -> Attr {
        attr_on(DEV, ino, kind)
    }

    fn attr_on(dev: u64, ino: u64, kind: u32) -> Attr {
        Attr {
            ino,
            dev,
            mode: kind | 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            size: 0,
            blocks: 0,
            blksize: 4096,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
        }
    }

    const F: u32 = libc::S_IFREG;
    const D: u32 = libc::S_IFDIR;

    fn table() -> InodeTable {
        InodeTable::new(&attr(2, D))
    }

    fn path(t: &InodeTable, id: u64) -> String {
        t.path(id).unwrap().to_string()
    }

    #[test]
    fn node_ids_are_remote_inode_numbers() {
        let t = table();
        let d = t.remember(ROOT_ID, b"d", &attr(100, D));
        assert_eq!(d, 100);
        let f = t.remember(d, b"f", &attr(101, F));
        assert_eq!(f, 101);
        assert_eq!(path(&t, f), "d/f");
        assert_eq!(path(&t, ROOT_ID), ".");
        assert_eq!(t.parent_of(f), d);
        assert_eq!(t.parent_of(ROOT_ID), ROOT_ID);
    }

    #[test]
    fn lookup_counts_and_forget() {
        let t = table();
        for _ in 0..3 {
            assert_eq!(t.remember(ROOT_ID, b"f", &attr(7, F)), 7);
        }
        assert_eq!(t.lookup_count(7), Some(3));
        t.forget(7, 2);
        assert_eq!(t.lookup_count(7), Some(1));
        t.forget(7, 1);
        assert_eq!(t.lookup_count(7), None, "dropped at zero");
        assert_eq!(t.len(), 1);
        assert!(t.child(ROOT_ID, b"f").is_none());
        // The root is never dropped.
        t.forget(ROOT_ID, 100);
        assert_eq!(path(&t, ROOT_ID), ".");
    }

    #[test]
    fn open_handles_keep_a_forgotten_node() {
        let t = table();
        let f = t.remember(ROOT_ID, b"f", &attr(7, F));
        t.opened(f, Some(55)).unwrap();
        t.unlink(ROOT_ID, b"f");
        t.forget(f, 1);
        assert_eq!(t.lookup_count(f), Some(0));
        assert_eq!(
            t.handle_of(f),
            Some(55),
            "still addressable through its handle"
        );
        assert!(!t.is_linked(f));
        assert_eq!(t.path(f).unwrap_err().errno, libc::ENOENT);
        t.closed(f, Some(55));
        assert_eq!(t.lookup_count(f), None);
        assert_eq!(t.opened(f, None).unwrap_err().errno, libc::ESTALE);
    }

    #[test]
    fn hard_links_share_one_node() {
        let t = table();
        let d = t.remember(ROOT_ID, b"d", &attr(100, D));
        let a = t.remember(ROOT_ID, b"a", &attr(7, F));
        let b = t.remember(d, b"b", &attr(7, F));
        assert_eq!(a, b);
        assert_eq!(t.lookup_count(a), Some(2));
        assert_eq!(path(&t, a), "d/b", "the most recently confirmed name first");
        t.unlink(d, b"b");
        assert_eq!(path(&t, a), "a");
        t.unlink(ROOT_ID, b"a");
        assert!(t.path(a).is_err());
        assert_eq!(
            t.lookup_count(a),
            Some(2),
            "unlink does not drop kernel references"
        );
    }

    #[test]
    fn rename_moves_the_link_and_drops_the_replaced_target() {
        let t = table();
        let d = t.remember(ROOT_ID, b"d", &attr(100, D));
        let f = t.remember(d, b"f", &attr(101, F));
        let g = t.remember(ROOT_ID, b"g", &attr(102, F));
        t.rename(d, b"f", ROOT_ID, b"g", false);
        assert_eq!(path(&t, f), "g");
        assert_eq!(t.child(ROOT_ID, b"g"), Some(f));
        assert_eq!(t.child(d, b"f"), None);
        assert!(t.path(g).is_err(), "the replaced target lost its name");
        t.forget(g, 1);
        assert_eq!(t.lookup_count(g), None);

        // Renaming a directory moves everything below it.
        let e = t.remember(d, b"e", &attr(103, F));
        t.rename(ROOT_ID, b"d", ROOT_ID, b"d2", false);
        assert_eq!(path(&t, e), "d2/e");
    }

    #[test]
    fn rename_exchange_swaps() {
        let t = table();
        let a = t.remember(ROOT_ID, b"a", &attr(10, F));
        let d = t.remember(ROOT_ID, b"d", &attr(11, D));
        t.rename(ROOT_ID, b"a", ROOT_ID, b"d", true);
        assert_eq!(path(&t, a), "d");
        assert_eq!(path(&t, d), "a");
        assert_eq!(t.child(ROOT_ID, b"a"), Some(d));
        assert_eq!(t.child(ROOT_ID, b"d"), Some(a));
    }

    #[test]
    fn rename_between_links_of_one_inode_changes_nothing() {
        let t = table();
        let a = t.remember(ROOT_ID, b"a", &attr(10, F));
        t.remember(ROOT_ID, b"b", &attr(10, F));
        t.rename(ROOT_ID, b"a", ROOT_ID, b"b", false);
        assert_eq!(t.child(ROOT_ID, b"a"), Some(a));
        assert_eq!(t.child(ROOT_ID, b"b"), Some(a));
    }

    #[test]
    fn synthetic_ids_for_ambiguous_inode_numbers() {
        let t = table();
        // Inode 1 would be the root's node id.
        let one = t.remember(ROOT_ID, b"one", &attr(1, F));
        assert!(one >= SYNTHETIC_BASE);
        // Another filesystem: its numbers may repeat ours.
        let other = t.remember(ROOT_ID, b"mnt", &attr_on(DEV + 1, 50, D));
        assert!(other >= SYNTHETIC_BASE);
        assert_ne!(one, other);
        let same = t.remember(ROOT_ID, b"x", &attr(50, F));
        assert_eq!(same, 50, "same number on the root's device stays itself");
        // The number was reused for a different file type while the old node is alive.
        let reused = t.remember(ROOT_ID, b"y", &attr(50, D));
        assert!(reused >= SYNTHETIC_BASE);
        assert_eq!(path(&t, reused), "y");
        assert_eq!(path(&t, 50), "x");
        assert_eq!(t.peek(&attr(50, D)), reused);
        // A second name for the root (a bind mount) is not the root.
        let alias = t.remember(ROOT_ID, b"self", &attr(2, D));
        assert_ne!(alias, ROOT_ID);
        assert_eq!(path(&t, ROOT_ID), ".");
        // Forgetting the synthetic nodes frees them.
        t.forget(reused, 1);
        assert_eq!(t.lookup_count(reused), None);
        assert_eq!(t.lookup_count(50), Some(1));
    }

    #[test]
    fn a_name_moves_to_the_node_the_remote_now_has_there() {
        let t = table();
        let old = t.remember(ROOT_ID, b"f", &attr(7, F));
        let new = t.remember(ROOT_ID, b"f", &attr(8, F));
        assert_eq!(t.child(ROOT_ID, b"f"), Some(new));
        assert!(t.path(old).is_err());
        // A directory seen under a new name moved: the old name is gone.
        let d = t.remember(ROOT_ID, b"d", &attr(9, D));
        t.remember(ROOT_ID, b"e", &attr(9, D));
        assert_eq!(path(&t, d), "e");
        assert_eq!(t.child(ROOT_ID, b"d"), None);
    }

    #[test]
    fn a_reused_inode_number_does_not_alias_a_dead_node() {
        let t = table();
        // unlinked but still open (or not yet forgotten) in the kernel
        let old = t.remember(ROOT_ID, b"old", &attr(7, F));
        t.opened(old, Some(1)).unwrap();
        t.unlink(ROOT_ID, b"old");
        let new = t.remember(ROOT_ID, b"new", &attr(7, F));
        assert_ne!(new, old);
        assert!(new >= SYNTHETIC_BASE);
        assert_eq!(t.handle_of(old), Some(1));
        assert_eq!(path(&t, new), "new");
        // a directory made where a removed one's number is still held by the kernel
        let d = t.remember(ROOT_ID, b"d", &attr(9, D));
        let d2 = t.remember_new(ROOT_ID, b"e", &attr(9, D));
        assert_ne!(d, d2);
        assert_eq!(path(&t, d), "d");
        assert_eq!(path(&t, d2), "e");
        // Once the old nodes are gone, the number is the node id again.
        t.closed(old, Some(1));
        t.forget(old, 1);
        t.forget(new, 1);
        assert_eq!(t.remember(ROOT_ID, b"again", &attr(7, F)), 7);
    }

    #[test]
    fn drop_first_link_after_a_stale_answer() {
        let t = table();
        let f = t.remember(ROOT_ID, b"f", &attr(7, F));
        t.drop_first_link(f);
        assert_eq!(t.child(ROOT_ID, b"f"), None);
        assert_eq!(t.lookup_count(f), Some(1));
    }
}
