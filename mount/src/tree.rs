//! The local model of the remote tree: every node the mount knows, with its remote attributes,
//! symlink target and (for directories) children, and the kernel's references to it.
//!
//! Invariants:
//! - The root is node [`ROOT_ID`], always present, never named by a link.
//! - A node id is the remote `st_ino` whenever that is unambiguous (same `st_dev` as the root,
//!   not 1, not already the id of another live node), so `stat` through the mount shows the
//!   remote's inode numbers. Otherwise it is synthetic, from [`SYNTHETIC_BASE`] up.
//! - Hard links share one node; `links` holds every (parent, name) naming it, the most recently
//!   confirmed first; a directory has at most one. Each link is in its parent's `children` and
//!   each `children` entry is a link of its node: the two agree exactly.
//! - A directory is *complete* when its `children` are its whole remote listing (it was walked,
//!   or made since). Names missing from a complete directory do not exist remotely, so lookups
//!   in it are answered here, negative ones included. An incomplete directory only knows the
//!   names the kernel has looked up (the pass-through mode of agents without a tree walk).
//! - `nlookup` counts the kernel's references (every entry reply). A node stays while the
//!   kernel holds it, while it is open, or while it is linked from a complete directory; after
//!   that it is dropped.
//!
//! Everything sits behind one `std::sync::Mutex`, held only for short sections with no `.await`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use kmount_proto::digest::{Child, dir_digest};
use kmount_proto::{Attr, DirDigest, RelPath};

use crate::err;
use crate::error::FsError;
use crate::invalidate::Inval;

/// `FUSE_ROOT_ID`.
pub const ROOT_ID: u64 = 1;

/// First synthetic node id; remote inode numbers this large do not occur in practice.
pub const SYNTHETIC_BASE: u64 = 1 << 63;

/// `st_dev` of local-only nodes ([`crate::local_only`]): kept on this side, never on the
/// remote, so listings, walks and digests of the remote leave them alone.
pub const LOCAL_ONLY_DEV: u64 = u64::MAX - 1;

/// Deepest path walked before concluding the links form a loop.
const MAX_DEPTH: usize = 4096;

type Link = (u64, Vec<u8>);

#[derive(Debug, Clone)]
struct Node {
    /// Remote (st_dev, st_ino).
    remote: (u64, u64),
    attr: Attr,
    symlink: Option<Vec<u8>>,
    links: Vec<Link>,
    /// Directories only: name -> node id.
    children: BTreeMap<Vec<u8>, u64>,
    complete: bool,
    nlookup: u64,
    /// Open files and directories on this node.
    open: u32,
    /// `attr` may be out of date (a local change the remote applied without telling us the
    /// result); fetch it again before answering with it.
    stale: bool,
    /// Sequence number of the last local change to this node (or, for a directory, to its
    /// entries). A listing taken before it may lack that change and must not overwrite it.
    touched: u64,
    /// Stamp of the last watcher event that set this node ([`TreeState::hear`]). An answer
    /// asked for before it (a listing, a lookup, an open) may predate the change the event
    /// reported and must not overwrite it: the watcher reports any later change too.
    heard: u64,
}

impl Node {
    fn new(attr: &Attr, symlink: Option<Vec<u8>>) -> Self {
        Self {
            remote: (attr.dev, attr.ino),
            attr: attr.clone(),
            symlink,
            links: Vec::new(),
            children: BTreeMap::new(),
            complete: false,
            nlookup: 0,
            open: 0,
            stale: false,
            touched: 0,
            heard: 0,
        }
    }

    fn kind(&self) -> u32 {
        self.attr.file_type()
    }

    fn is_dir(&self) -> bool {
        self.attr.is_dir()
    }
}

/// What a change of the tree means outside it, collected while applying remote changes.
#[derive(Debug, Default)]
pub struct Effects {
    /// For the kernel, in order.
    pub inval: Vec<Inval>,
    /// Remote files (st_dev, st_ino) whose cached contents are no longer theirs.
    pub stale_content: Vec<(u64, u64)>,
    /// Nodes whose attributes the remote changed as a side effect (a directory that gained or
    /// lost an entry, the other links of an unlinked file); fetch them again.
    pub refresh: Vec<u64>,
    /// Paths whose remote changes were left out because local changes of them were not
    /// applied yet; looked at again once they are ([`crate::local`]'s settle).
    pub left_out: Vec<RelPath>,
}

impl Effects {
    /// Drops repeated invalidations and refreshes, keeping the first of each.
    pub fn dedup(&mut self) {
        let mut seen = HashSet::new();
        self.inval.retain(|i| seen.insert(i.clone()));
        let mut seen = HashSet::new();
        self.refresh.retain(|id| seen.insert(*id));
        let mut seen = HashSet::new();
        self.stale_content.retain(|k| seen.insert(*k));
    }

    pub fn is_empty(&self) -> bool {
        self.inval.is_empty() && self.stale_content.is_empty() && self.refresh.is_empty()
    }
}

/// How an attribute update changed a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// Metadata only (mode, owner, ctime, nlink, ...).
    Attr,
    /// Size, mtime or symlink target: cached contents are stale.
    Content,
}

fn classify(
    old: &Attr,
    old_link: &Option<Vec<u8>>,
    new: &Attr,
    new_link: &Option<Vec<u8>>,
) -> Change {
    if old.size != new.size || old.mtime != new.mtime || old_link != new_link {
        Change::Content
    } else if old != new {
        Change::Attr
    } else {
        Change::None
    }
}

/// One entry of a directory listing taken from the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: Vec<u8>,
    pub id: u64,
    /// `S_IFMT` bits.
    pub kind: u32,
}

/// Counts for progress lines and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeCounts {
    /// Nodes in the model (the root excluded).
    pub nodes: u64,
    /// Sum of the sizes of the regular files.
    pub bytes: u64,
}

/// An id the kernel still holds after its node was renumbered.
#[derive(Debug, Clone, Copy)]
struct Alias {
    /// The node it stands for now.
    to: u64,
    /// The kernel's references to the old id, dropped by `FORGET`.
    nlookup: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Tree {
    inner: Mutex<TreeState>,
}

/// The tree while locked; see [`Tree::lock`].
#[derive(Debug)]
pub struct TreeState {
    nodes: HashMap<u64, Node>,
    by_remote: HashMap<(u64, u64), u64>,
    /// Renumbered ids the kernel still holds ([`TreeState::renumber`]). They are no nodes:
    /// every request naming one reaches the successor, even when it was renumbered while the
    /// request was under way (only the kernel's reference count stays with the old id).
    aliases: HashMap<u64, Alias>,
    root_dev: u64,
    next_synthetic: u64,
    /// Invalidations of changes the tree made by itself (renumbering a node when the id its
    /// inode number calls for became free); taken by [`TreeState::take_deferred`].
    deferred: Vec<Inval>,
    /// The last stamp [`TreeState::hear`] gave out.
    heard: u64,
}

impl Tree {
    /// A tree holding only the root, whose remote attributes are `root`. The root starts
    /// incomplete (nothing is known below it).
    pub fn new(root: &Attr) -> Self {
        let mut nodes = HashMap::new();
        let mut node = Node::new(root, None);
        node.nlookup = 1;
        nodes.insert(ROOT_ID, node);
        let mut by_remote = HashMap::new();
        by_remote.insert((root.dev, root.ino), ROOT_ID);
        Self {
            inner: Mutex::new(TreeState {
                nodes,
                by_remote,
                aliases: HashMap::new(),
                root_dev: root.dev,
                next_synthetic: SYNTHETIC_BASE,
                deferred: Vec::new(),
                heard: 0,
            }),
        }
    }

    /// Locks the tree for a short section with no `.await`.
    pub fn lock(&self) -> MutexGuard<'_, TreeState> {
        // No section panics midway, so a poisoned tree is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `name` in `parent` is the remote node `attr`, and counts one kernel lookup
    /// of it. Returns its node id.
    pub fn remember(&self, parent: u64, name: &[u8], attr: &Attr) -> u64 {
        let mut t = self.lock();
        let id = t.upsert(parent, name, attr, None, false, &mut Effects::default());
        t.count_lookup(id);
        id
    }

    /// Like [`Tree::remember`] for a node the remote has just made (mkdir, mknod, symlink): a
    /// live node with the same remote inode number is a dead file whose number was reused, so
    /// the new one gets a node of its own.
    pub fn remember_new(&self, parent: u64, name: &[u8], attr: &Attr) -> u64 {
        let mut t = self.lock();
        let id = t.upsert(parent, name, attr, None, true, &mut Effects::default());
        t.count_lookup(id);
        id
    }

    /// The node id `attr` has or would get, without recording anything.
    pub fn peek(&self, attr: &Attr) -> u64 {
        self.lock().peek(attr)
    }

    /// The kernel dropped `n` references to `id`; returns invalidations to send.
    pub fn forget(&self, id: u64, n: u64) -> Vec<Inval> {
        let mut t = self.lock();
        t.forget(id, n);
        t.take_deferred()
    }

    /// See [`TreeState::canon`].
    pub fn canon(&self, id: u64) -> u64 {
        let t = self.lock();
        if t.aliases.is_empty() {
            id
        } else {
            t.canon(id)
        }
    }

    pub fn path(&self, id: u64) -> Result<RelPath, FsError> {
        self.lock().path(id)
    }

    pub fn child_path(&self, parent: u64, name: &[u8]) -> Result<RelPath, FsError> {
        Ok(self.path(parent)?.join(name)?)
    }

    /// `name` in `parent` no longer exists.
    pub fn unlink(&self, parent: u64, name: &[u8]) {
        self.lock().remove(parent, name, &mut Effects::default());
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        exchange: bool,
    ) {
        self.lock().rename(
            parent,
            name,
            new_parent,
            new_name,
            exchange,
            &mut Effects::default(),
        );
    }

    pub fn opened(&self, id: u64) -> Result<(), FsError> {
        self.lock().opened(id)
    }

    pub fn closed(&self, id: u64) {
        self.lock().closed(id);
    }

    pub fn remote_of(&self, id: u64) -> Option<(u64, u64)> {
        self.lock().remote_of(id)
    }

    pub fn is_linked(&self, id: u64) -> bool {
        self.lock().is_linked(id)
    }

    pub fn parent_of(&self, id: u64) -> u64 {
        self.lock().parent_of(id)
    }

    pub fn drop_first_link(&self, id: u64) {
        self.lock().drop_first_link(id, &mut Effects::default());
    }

    pub fn lookup_count(&self, id: u64) -> Option<u64> {
        self.lock().lookup_count(id)
    }

    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.lock().child(parent, name)
    }

    /// Nodes in the tree, the root included.
    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    /// Never true: the root is always there.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Nodes the kernel holds references to, the root included.
    pub fn kernel_len(&self) -> usize {
        let t = self.lock();
        t.nodes.values().filter(|n| n.nlookup > 0).count() + t.aliases.len()
    }
}

impl TreeState {
    fn node(&self, id: u64) -> Result<&Node, FsError> {
        let id = self.live(id);
        self.nodes
            .get(&id)
            .ok_or_else(|| err!(libc::ESTALE, "node {id} is not known"))
    }

    /// Remote attributes of `id`.
    pub fn attr(&self, id: u64) -> Result<&Attr, FsError> {
        Ok(&self.node(id)?.attr)
    }

    pub fn symlink(&self, id: u64) -> Option<&[u8]> {
        let id = self.live(id);
        self.nodes.get(&id).and_then(|n| n.symlink.as_deref())
    }

    pub fn contains(&self, id: u64) -> bool {
        let id = self.live(id);
        self.nodes.contains_key(&id)
    }

    /// Whether node `id` is local-only ([`LOCAL_ONLY_DEV`]).
    pub fn is_local_only(&self, id: u64) -> bool {
        let id = self.live(id);
        self.nodes
            .get(&id)
            .is_some_and(|n| n.remote.0 == LOCAL_ONLY_DEV)
    }

    pub fn is_dir(&self, id: u64) -> bool {
        let id = self.live(id);
        self.nodes.get(&id).is_some_and(Node::is_dir)
    }

    pub fn is_complete(&self, id: u64) -> bool {
        let id = self.live(id);
        self.nodes.get(&id).is_some_and(|n| n.complete)
    }

    pub fn is_stale(&self, id: u64) -> bool {
        let id = self.live(id);
        self.nodes.get(&id).is_some_and(|n| n.stale)
    }

    /// The attributes of `id` may be outdated; the next reader fetches them again.
    pub fn mark_stale(&mut self, id: u64) {
        let id = self.live(id);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.stale = true;
        }
    }

    /// A local change to `id` (sequence number `seq`): its attributes must be fetched again and
    /// remote listings older than `seq` must leave it alone.
    pub fn touch(&mut self, id: u64, seq: u64) {
        let id = self.live(id);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.stale = true;
            n.touched = n.touched.max(seq);
        }
    }

    /// A local change to `id` (sequence number `seq`) whose result the tree already holds
    /// (write-back): remote listings and events older than `seq` must leave it alone, but its
    /// attributes need not be fetched.
    pub fn mark_touched(&mut self, id: u64, seq: u64) {
        let id = self.live(id);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.touched = n.touched.max(seq);
        }
    }

    /// A new stamp for nodes a run of watcher events sets ([`TreeState::set_heard`]).
    pub fn hear(&mut self) -> u64 {
        self.heard += 1;
        self.heard
    }

    /// The last stamp given out: taken when a request is sent, it tells later whether a
    /// watcher event set a node while the answer was on its way ([`TreeState::heard_after`]).
    pub fn heard_seq(&self) -> u64 {
        self.heard
    }

    pub fn set_heard(&mut self, id: u64, stamp: u64) {
        let id = self.live(id);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.heard = n.heard.max(stamp);
        }
    }

    /// Whether a watcher event set `id` after `asked` ([`TreeState::heard_seq`] when an answer
    /// about it was asked for): the event is newer than the answer.
    pub fn heard_after(&self, id: u64, asked: u64) -> bool {
        let id = self.live(id);
        self.nodes.get(&id).is_some_and(|n| n.heard > asked)
    }

    /// Whether what a watcher event said about `id` after `asked` is at least as new as
    /// `attr`, an answer about the same remote file asked for at `asked` that the remote gave
    /// after changing it (a change's own reply): the event's change time is not earlier. The
    /// event may have been read before the change was made (then its time is earlier) or
    /// after, with a change of its own (a rename or a chmod there right after ours). A tie
    /// (timestamps are as coarse as the kernel's clock tick) goes to the event, as for other
    /// answers ([`TreeState::heard_after`]).
    pub fn heard_newer(&self, id: u64, attr: &Attr, asked: u64) -> bool {
        let id = self.live(id);
        self.nodes.get(&id).is_some_and(|n| {
            n.heard > asked && n.remote == (attr.dev, attr.ino) && n.attr.ctime >= attr.ctime
        })
    }

    /// Names in directory `id` whose nodes a watcher event set after `asked`.
    pub fn children_heard_after(&self, id: u64, asked: u64) -> Vec<Vec<u8>> {
        let id = self.live(id);
        self.nodes.get(&id).map_or_else(Vec::new, |n| {
            n.children
                .iter()
                .filter(|(_, c)| self.heard_after(**c, asked))
                .map(|(name, _)| name.clone())
                .collect()
        })
    }

    /// Sequence number of the last local change to `id` (0: none).
    pub fn touched(&self, id: u64) -> u64 {
        let id = self.live(id);
        self.nodes.get(&id).map_or(0, |n| n.touched)
    }

    /// Marks directory `id` complete: its children are its whole listing from now on.
    pub fn set_complete(&mut self, id: u64, complete: bool) {
        let id = self.live(id);
        if let Some(n) = self.nodes.get_mut(&id).filter(|n| n.is_dir()) {
            n.complete = complete;
        }
    }

    /// Whether the kernel holds a reference to `id` (so invalidations for it matter).
    pub fn kernel_knows(&self, id: u64) -> bool {
        let id = self.live(id);
        id == ROOT_ID || self.nodes.get(&id).is_some_and(|n| n.nlookup > 0)
    }

    pub fn is_open(&self, id: u64) -> bool {
        let id = self.live(id);
        self.nodes.get(&id).is_some_and(|n| n.open > 0)
    }

    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let parent = self.live(parent);
        self.nodes.get(&parent)?.children.get(name).copied()
    }

    pub fn count_lookup(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.nlookup += 1;
        }
    }

    pub fn lookup_count(&self, id: u64) -> Option<u64> {
        match self.nodes.get(&id) {
            Some(n) => Some(n.nlookup),
            None => self.aliases.get(&id).map(|a| a.nlookup),
        }
    }

    /// The kernel dropped `n` references to `id`.
    pub fn forget(&mut self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.nlookup = node.nlookup.saturating_sub(n);
            self.maybe_drop(id);
        } else if let Some(alias) = self.aliases.get_mut(&id) {
            alias.nlookup = alias.nlookup.saturating_sub(n);
            if alias.nlookup == 0 {
                self.aliases.remove(&id);
            }
        }
    }

    /// A file or directory was opened on `id`.
    pub fn opened(&mut self, id: u64) -> Result<(), FsError> {
        let id = self.live(id);
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| err!(libc::ESTALE, "node {id} is not known"))?;
        node.open += 1;
        Ok(())
    }

    /// The counterpart of [`TreeState::opened`].
    pub fn closed(&mut self, id: u64) {
        let id = self.live(id);
        if let Some(node) = self.nodes.get_mut(&id) {
            node.open = node.open.saturating_sub(1);
            self.maybe_drop(id);
        }
    }

    pub fn remote_of(&self, id: u64) -> Option<(u64, u64)> {
        let id = self.live(id);
        self.nodes.get(&id).map(|n| n.remote)
    }

    /// Whether any name is known for `id` (the root always has its path).
    pub fn is_linked(&self, id: u64) -> bool {
        let id = self.live(id);
        id == ROOT_ID || self.nodes.get(&id).is_some_and(|n| !n.links.is_empty())
    }

    /// The first name of `id`: its parent and the name there.
    pub fn parent_and_name(&self, id: u64) -> Option<(u64, Vec<u8>)> {
        let id = self.live(id);
        self.nodes.get(&id).and_then(|n| n.links.first()).cloned()
    }

    /// Parent of `id` through its first link; the root is its own parent.
    pub fn parent_of(&self, id: u64) -> u64 {
        let id = self.live(id);
        self.nodes
            .get(&id)
            .and_then(|n| n.links.first())
            .map_or(ROOT_ID, |l| l.0)
    }

    /// Whether [`TreeState::upsert`] of `name` in `parent` with `attr` would take a node that
    /// was changed here after `since` from another name (a node moves to the name a remote
    /// observation shows it under). Such an observation may predate the change (the listing
    /// of a directory taken before a local rename arrived there shows the file under its old
    /// name) or be of another file that got the same inode number; applied, it would take
    /// the name the local change gave the node out of the view.
    pub fn takes_changed_node(&self, parent: u64, name: &[u8], attr: &Attr, since: u64) -> bool {
        let Some(&id) = self.by_remote.get(&(attr.dev, attr.ino)) else {
            return false;
        };
        id != ROOT_ID
            && self.child(parent, name) != Some(id)
            && self.nodes.get(&id).is_some_and(|n| {
                n.touched > since && !n.links.is_empty() && n.kind() == attr.file_type()
            })
    }

    /// The node id `attr` has or would get, without recording anything (for plain readdir).
    pub fn peek(&self, attr: &Attr) -> u64 {
        match self.by_remote.get(&(attr.dev, attr.ino)) {
            Some(&id) if id != ROOT_ID && self.nodes[&id].kind() == attr.file_type() => id,
            _ => attr.ino,
        }
    }

    /// The node at `path`, following children maps from the root.
    pub fn resolve(&self, path: &RelPath) -> Option<u64> {
        let mut cur = ROOT_ID;
        for name in path.components() {
            cur = self.child(cur, name)?;
        }
        Some(cur)
    }

    /// The path of `id` beneath the root, through its first link at each step.
    pub fn path(&self, id: u64) -> Result<RelPath, FsError> {
        let id = self.live(id);
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

    pub fn child_path(&self, parent: u64, name: &[u8]) -> Result<RelPath, FsError> {
        Ok(self.path(parent)?.join(name)?)
    }

    /// The children of directory `id`, in name order.
    pub fn listing(&self, id: u64) -> Vec<Listed> {
        let id = self.live(id);
        let Some(dir) = self.nodes.get(&id) else {
            return Vec::new();
        };
        dir.children
            .iter()
            .map(|(name, &child)| Listed {
                name: name.clone(),
                id: child,
                kind: self.nodes.get(&child).map_or(0, Node::kind),
            })
            .collect()
    }

    /// Names of the children of `id`.
    pub fn child_names(&self, id: u64) -> Vec<Vec<u8>> {
        let id = self.live(id);
        self.nodes
            .get(&id)
            .map(|n| n.children.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Nodes in the model below the root and the bytes of its regular files.
    pub fn counts(&self) -> TreeCounts {
        let mut c = TreeCounts::default();
        for (id, n) in &self.nodes {
            if *id == ROOT_ID || n.links.is_empty() {
                continue;
            }
            c.nodes += 1;
            if n.kind() == libc::S_IFREG {
                c.bytes += n.attr.size;
            }
        }
        c
    }

    /// Records that `name` in `parent` is the remote node `attr` (with `symlink` as its target)
    /// and returns its node id. The node already there is kept when it is the same remote
    /// node; otherwise the name moves to the node `attr` belongs to. `fresh`: the remote has
    /// just made this node, so an existing node with its inode number is a dead one.
    pub fn upsert(
        &mut self,
        parent: u64,
        name: &[u8],
        attr: &Attr,
        symlink: Option<Vec<u8>>,
        fresh: bool,
        fx: &mut Effects,
    ) -> u64 {
        let parent = self.live(parent);
        let key = (attr.dev, attr.ino);
        if let Some(old) = self.child(parent, name) {
            let same = !fresh
                && self
                    .nodes
                    .get(&old)
                    .is_some_and(|n| n.remote == key && n.kind() == attr.file_type());
            if same {
                self.update_attr(old, attr, symlink, fx);
                if let Some(node) = self.nodes.get_mut(&old) {
                    // The most recently confirmed name first.
                    let link = (parent, name.to_vec());
                    if let Some(i) = node.links.iter().position(|l| *l == link) {
                        let l = node.links.remove(i);
                        node.links.insert(0, l);
                    }
                }
                return old;
            }
            self.unlink_name(parent, name, true, fx);
        } else {
            if self.kernel_knows(parent) {
                // The kernel may hold a negative entry for the name (lookups of missing
                // names are cached, see `fuse::negative_entry`).
                fx.inval.push(Inval::Entry {
                    parent,
                    name: name.to_vec(),
                });
                fx.inval.push(Inval::Inode {
                    ino: parent,
                    data: true,
                });
            }
            fx.refresh.push(parent);
        }
        let (id, existed) = self.node_for(attr, &symlink, fresh);
        if existed {
            self.update_attr(id, attr, symlink, fx);
        } else if attr.is_dir() {
            // A directory first seen in a complete directory is complete too: walks list
            // parents before children, the watcher reports what appears in a new directory,
            // and one made here starts empty.
            let complete = self.is_complete(parent);
            self.set_complete(id, complete);
        }
        self.add_link(id, (parent, name.to_vec()), fx);
        id
    }

    /// New attributes for `id` (the same remote node); queues what the change means.
    pub fn update_attr(
        &mut self,
        id: u64,
        attr: &Attr,
        symlink: Option<Vec<u8>>,
        fx: &mut Effects,
    ) -> Change {
        let id = self.live(id);
        let kernel_knows = self.kernel_knows(id);
        let Some(node) = self.nodes.get_mut(&id) else {
            return Change::None;
        };
        node.stale = false;
        let symlink = if node.kind() == libc::S_IFLNK && symlink.is_none() {
            // A symlink's target never changes in place; callers without it keep ours.
            node.symlink.clone()
        } else {
            symlink
        };
        let change = classify(&node.attr, &node.symlink, attr, &symlink);
        if change == Change::None {
            return change;
        }
        node.attr = attr.clone();
        node.symlink = symlink;
        if kernel_knows {
            fx.inval.push(Inval::Inode {
                ino: id,
                // A directory's "data" is its cached listing, which an attribute update does
                // not change; an open file's pages are dropped by the kernel itself when it
                // sees the new size or mtime.
                data: change == Change::Content && !node.is_dir() && node.open == 0,
            });
        }
        if change == Change::Content {
            fx.stale_content.push(node.remote);
        }
        change
    }

    /// The remote reports a change of regular file `id` that its attributes do not show (a
    /// write within the same clock tick as the last one, same size): its cached bytes may be
    /// stale all the same.
    pub fn content_may_have_changed(&mut self, id: u64, fx: &mut Effects) {
        let id = self.live(id);
        let kernel_knows = self.kernel_knows(id);
        let Some(node) = self.nodes.get(&id) else {
            return;
        };
        if node.kind() != libc::S_IFREG || fx.stale_content.contains(&node.remote) {
            return;
        }
        fx.stale_content.push(node.remote);
        if kernel_knows && node.open == 0 {
            fx.inval.push(Inval::Inode {
                ino: id,
                data: true,
            });
        }
    }

    /// Removes the name `name` from `parent`; returns the node it named. A directory's whole
    /// subtree leaves the model (nodes the kernel still holds stay, without names).
    pub fn remove(&mut self, parent: u64, name: &[u8], fx: &mut Effects) -> Option<u64> {
        let parent = self.live(parent);
        let id = self.child(parent, name)?;
        self.unlink_name(parent, name, false, fx);
        Some(id)
    }

    /// `rename(parent/name, new_parent/new_name)`; `exchange` for `RENAME_EXCHANGE`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        exchange: bool,
        fx: &mut Effects,
    ) {
        let (parent, new_parent) = (self.live(parent), self.live(new_parent));
        let from = (parent, name.to_vec());
        let to = (new_parent, new_name.to_vec());
        let src = self.child(parent, name);
        let dst = self.child(new_parent, new_name);
        if src.is_some() && src == dst {
            // Two links of one inode: rename does nothing (and exchange swaps identical names).
            return;
        }
        for (dir, n) in [(parent, name), (new_parent, new_name)] {
            if self.kernel_knows(dir) {
                fx.inval.push(Inval::Entry {
                    parent: dir,
                    name: n.to_vec(),
                });
                fx.inval.push(Inval::Inode {
                    ino: dir,
                    data: true,
                });
            }
            fx.refresh.push(dir);
        }
        for id in [src, dst].into_iter().flatten() {
            if self.kernel_knows(id) {
                fx.inval.push(Inval::Inode {
                    ino: id,
                    data: false,
                });
            }
            fx.refresh.push(id);
        }
        if exchange {
            if let Some(p) = self.nodes.get_mut(&parent) {
                p.children.remove(name);
            }
            if let Some(p) = self.nodes.get_mut(&new_parent) {
                p.children.remove(new_name);
            }
            if let Some(s) = src {
                self.replace_link(s, &from, to.clone());
            }
            if let Some(d) = dst {
                self.replace_link(d, &to, from.clone());
            }
        } else {
            if dst.is_some() {
                self.unlink_name(new_parent, new_name, true, fx);
            }
            if let Some(s) = src {
                if let Some(p) = self.nodes.get_mut(&parent) {
                    p.children.remove(name);
                }
                self.replace_link(s, &from, to);
            }
        }
    }

    /// Drops the first link of `id`: the remote has another file under that name now.
    pub fn drop_first_link(&mut self, id: u64, fx: &mut Effects) {
        let id = self.live(id);
        let Some(link) = self.nodes.get(&id).and_then(|n| n.links.first().cloned()) else {
            return;
        };
        if self.child(link.0, &link.1) == Some(id) {
            self.unlink_name(link.0, &link.1, true, fx);
        } else if let Some(node) = self.nodes.get_mut(&id) {
            node.links.remove(0);
            self.maybe_drop(id);
        }
    }

    /// Node `id`, made here, now exists remotely as `attr`: it takes that remote identity
    /// (its node id stays: the kernel knows it by that).
    pub fn rebind(&mut self, id: u64, attr: &Attr) {
        let id = self.live(id);
        let key = (attr.dev, attr.ino);
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut node.remote, key);
        if self.by_remote.get(&old) == Some(&id) {
            self.by_remote.remove(&old);
        }
        if self.by_remote.get(&key) != Some(&ROOT_ID) {
            self.by_remote.insert(key, id);
        }
    }

    /// Gives node `id` (not open) the node id its remote inode number calls for, when that
    /// differs and is free: a node made here got a synthetic id, and `stat` should show the
    /// remote's number once the node exists there. Its names (and a directory's children)
    /// move to the new id; the names are invalidated, so the kernel looks them up again. The
    /// old id, while the kernel still holds it, forwards to the new one ([`TreeState::canon`]).
    /// Returns the new id.
    pub fn renumber(&mut self, id: u64, fx: &mut Effects) -> Option<u64> {
        let node = self.nodes.get(&id)?;
        let (dev, ino) = node.remote;
        if node.open > 0
            || dev != self.root_dev
            || ino <= ROOT_ID
            || ino >= SYNTHETIC_BASE
            || ino == id
            || self.nodes.contains_key(&ino)
            || node.links.is_empty()
        {
            return None;
        }
        let mut new = self.nodes.remove(&id)?;
        let held = std::mem::take(&mut new.nlookup);
        for (parent, name) in &new.links {
            if let Some(p) = self.nodes.get_mut(parent) {
                p.children.insert(name.clone(), ino);
            }
            if self.kernel_knows(*parent) {
                fx.inval.push(Inval::Entry {
                    parent: *parent,
                    name: name.clone(),
                });
            }
        }
        for (name, child) in &new.children {
            if let Some(c) = self.nodes.get_mut(child) {
                for link in c.links.iter_mut() {
                    if link.0 == id && link.1 == *name {
                        link.0 = ino;
                    }
                }
            }
        }
        self.nodes.insert(ino, new);
        self.by_remote.insert((dev, ino), ino);
        if held > 0 {
            self.aliases.insert(
                id,
                Alias {
                    to: ino,
                    nlookup: held,
                },
            );
        }
        Some(ino)
    }

    /// [`TreeState::canon`] for ids that are not nodes (cheap when nothing was renumbered).
    /// Every method that takes an id from a request resolves it here, under the same lock
    /// as its use: a request that resolved the id before a renumber still reaches the node.
    fn live(&self, id: u64) -> u64 {
        if self.aliases.is_empty() || self.nodes.contains_key(&id) {
            id
        } else {
            self.canon(id)
        }
    }

    /// The node an id stands for: itself, or for an id the kernel still holds after
    /// [`TreeState::renumber`], its successor.
    pub fn canon(&self, id: u64) -> u64 {
        let mut cur = id;
        for _ in 0..16 {
            match self.aliases.get(&cur) {
                Some(a) => cur = a.to,
                None => break,
            }
        }
        cur
    }

    /// Removes every child of directory `dir` whose name is not in `keep` (after a fresh
    /// listing of it).
    /// Local-only children stay: the remote never lists them.
    pub fn retain_children(&mut self, dir: u64, keep: &HashSet<Vec<u8>>, fx: &mut Effects) {
        let dir = self.live(dir);
        for name in self.child_names(dir) {
            let local = self
                .child(dir, &name)
                .is_some_and(|id| self.is_local_only(id));
            if !keep.contains(&name) && !local {
                self.unlink_name(dir, &name, false, fx);
            }
        }
    }

    /// The node for remote `attr`, created (no links, no lookups) when new; `true` when it
    /// existed already.
    fn node_for(&mut self, attr: &Attr, symlink: &Option<Vec<u8>>, fresh: bool) -> (u64, bool) {
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
            if id != ROOT_ID && node.kind() == kind && !fresh && !node.links.is_empty() {
                return (id, true);
            }
            // A dead file (no names, not open here) whose remote inode number came back for a
            // new file: the kernel holds no open file on it and only has yet to FORGET it.
            // The new file takes over its id, so it reports the remote's own st_ino (git's
            // lockfile dance reuses inode numbers at once), and its lookup count, which that
            // FORGET will take back. Not for directories: a deleted one may still be some
            // process's working directory.
            if id != ROOT_ID
                && id == attr.ino
                && node.kind() == kind
                && kind != libc::S_IFDIR
                && node.links.is_empty()
                && node.open == 0
            {
                let mut node = Node::new(attr, symlink.clone());
                node.nlookup = self.nodes[&id].nlookup;
                self.nodes.insert(id, node);
                return (id, false);
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
        self.nodes.insert(id, Node::new(attr, symlink.clone()));
        if self.by_remote.get(&key) != Some(&ROOT_ID) {
            self.by_remote.insert(key, id);
        }
        (id, false)
    }

    /// Makes `link` name `id` (first in its list). The name must be free.
    fn add_link(&mut self, id: u64, link: Link, fx: &mut Effects) {
        let (parent, name) = link.clone();
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.links.retain(|l| *l != link);
        let moved: Vec<Link> = if node.is_dir() || node.attr.nlink == 1 {
            // A directory has one name, and so has a file whose link count says so: a new
            // one means it moved (the word on the old name may never come: a remote
            // create-and-rename at a name this side had just removed looks like an echo of
            // that removal to the agent).
            std::mem::take(&mut node.links)
        } else {
            Vec::new()
        };
        node.links.insert(0, link);
        for (old_parent, old_name) in moved {
            if self.child(old_parent, &old_name) == Some(id) {
                tracing::debug!(
                    id,
                    old_parent,
                    old_name = %old_name.escape_ascii(),
                    parent,
                    name = %name.escape_ascii(),
                    "a node moves to the name the remote shows it under"
                );
                if let Some(p) = self.nodes.get_mut(&old_parent) {
                    p.children.remove(&old_name);
                }
                if self.kernel_knows(old_parent) {
                    fx.inval.push(Inval::Entry {
                        parent: old_parent,
                        name: old_name,
                    });
                    fx.inval.push(Inval::Inode {
                        ino: old_parent,
                        data: true,
                    });
                }
                fx.refresh.push(old_parent);
            }
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children.insert(name, id);
        }
    }

    /// Replaces `from` by `to` in the links of `id`, putting it first, and enters it in the
    /// new parent's children.
    fn replace_link(&mut self, id: u64, from: &Link, to: Link) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.links.retain(|l| l != from && *l != to);
            node.links.insert(0, to.clone());
        }
        if let Some(p) = self.nodes.get_mut(&to.0) {
            p.children.insert(to.1, id);
        }
    }

    /// Takes `name` out of `parent`. `replaced`: the name still exists remotely (as another
    /// node), so the kernel is told to look it up again rather than that it was deleted.
    fn unlink_name(&mut self, parent: u64, name: &[u8], replaced: bool, fx: &mut Effects) {
        let Some(id) = self
            .nodes
            .get_mut(&parent)
            .and_then(|p| p.children.remove(name))
        else {
            return;
        };
        let link = (parent, name.to_vec());
        let (is_dir, other_links) = match self.nodes.get_mut(&id) {
            Some(node) => {
                node.links.retain(|l| *l != link);
                let other_links = !node.links.is_empty();
                if !other_links {
                    // Gone from the remote but perhaps still open here: `fstat` on it must
                    // say so (nlink 0, ctime of the unlink), as a local disk does.
                    node.attr.nlink = 0;
                    node.attr.ctime = crate::core::timespec(std::time::SystemTime::now());
                }
                (node.is_dir(), other_links)
            }
            None => (false, false),
        };
        if self.kernel_knows(parent) {
            if replaced || other_links || !self.kernel_knows(id) {
                fx.inval.push(Inval::Entry {
                    parent,
                    name: name.to_vec(),
                });
            } else {
                fx.inval.push(Inval::Delete {
                    parent,
                    child: id,
                    name: name.to_vec(),
                });
            }
            fx.inval.push(Inval::Inode {
                ino: parent,
                data: true,
            });
        }
        fx.refresh.push(parent);
        if other_links {
            // nlink and ctime of the remaining names changed.
            fx.refresh.push(id);
            if self.kernel_knows(id) {
                fx.inval.push(Inval::Inode {
                    ino: id,
                    data: false,
                });
            }
        }
        if let Some(node) = self.nodes.get(&id) {
            fx.stale_content
                .extend((!other_links).then_some(node.remote));
        }
        if is_dir {
            self.detach_subtree(id);
        }
        self.maybe_drop(id);
    }

    /// Takes every node below directory `dir` out of the model: their names inside the subtree
    /// are forgotten, directories become incomplete.
    fn detach_subtree(&mut self, dir: u64) {
        let mut dirs = vec![dir];
        let mut dropped = Vec::new();
        while let Some(d) = dirs.pop() {
            let children = match self.nodes.get_mut(&d) {
                Some(n) => {
                    n.complete = false;
                    std::mem::take(&mut n.children)
                }
                None => continue,
            };
            for (name, child) in children {
                let link = (d, name);
                if let Some(node) = self.nodes.get_mut(&child) {
                    node.links.retain(|l| *l != link);
                    if node.is_dir() {
                        dirs.push(child);
                    }
                }
                dropped.push(child);
            }
        }
        for id in dropped {
            self.maybe_drop(id);
        }
    }

    fn in_model(&self, node: &Node) -> bool {
        node.links.iter().any(|(p, _)| self.is_complete(*p))
    }

    fn maybe_drop(&mut self, id: u64) {
        let mut freed = Vec::new();
        let mut work = vec![id];
        while let Some(id) = work.pop() {
            let Some(node) = self.nodes.get(&id) else {
                continue;
            };
            if id == ROOT_ID || node.nlookup > 0 || node.open > 0 || self.in_model(node) {
                continue;
            }
            let Some(node) = self.nodes.remove(&id) else {
                continue;
            };
            for (parent, name) in &node.links {
                if let Some(p) = self.nodes.get_mut(parent)
                    && p.children.get(name) == Some(&id)
                {
                    p.children.remove(name);
                }
            }
            for (name, child) in node.children {
                let link = (id, name);
                if let Some(c) = self.nodes.get_mut(&child) {
                    c.links.retain(|l| *l != link);
                    work.push(child);
                }
            }
            if self.by_remote.get(&node.remote) == Some(&id) {
                self.by_remote.remove(&node.remote);
            }
            freed.push(id);
        }
        // A node that got a synthetic id because its inode number was still taken (ext4
        // gave a dead file's number to a new directory) takes its own number now.
        for id in freed {
            if let Some(&successor) = self.by_remote.get(&(self.root_dev, id))
                && successor >= SYNTHETIC_BASE
            {
                let mut fx = Effects::default();
                if self.renumber(successor, &mut fx).is_some() {
                    self.deferred.extend(fx.inval);
                }
            }
        }
    }

    /// Invalidations of changes the tree made by itself since last asked.
    pub fn take_deferred(&mut self) -> Vec<Inval> {
        std::mem::take(&mut self.deferred)
    }

    /// Digests ([`kmount_proto::digest`]) of directory `dir` (at `path`) and of every
    /// directory below it down to `depth` levels, as the agent's `Op::Digest` computes them.
    pub fn digests(&self, dir: u64, path: &RelPath, depth: u32) -> Vec<DirDigest> {
        let mut out = Vec::new();
        self.digest_into(dir, Some((path.clone(), depth)), &mut out, 0);
        out
    }

    /// The digest of `dir`; when `report` is given, pushes it (and those of subdirectories
    /// down to the given depth) onto `out`.
    fn digest_into(
        &self,
        dir: u64,
        report: Option<(RelPath, u32)>,
        out: &mut Vec<DirDigest>,
        level: usize,
    ) -> [u8; 16] {
        let Some(node) = self.nodes.get(&dir) else {
            return [0; 16];
        };
        let slot = report.as_ref().map(|(path, _)| {
            out.push(DirDigest {
                path: path.clone(),
                digest: [0; 16],
            });
            out.len() - 1
        });
        let mut subdirs: Vec<Option<[u8; 16]>> = Vec::with_capacity(node.children.len());
        for (name, &child) in &node.children {
            let sub = match self.nodes.get(&child) {
                // Not the remote's: its digest leaves them out.
                Some(c) if c.remote.0 == LOCAL_ONLY_DEV => None,
                Some(c) if c.is_dir() && level < MAX_DEPTH => {
                    let sub_report = match &report {
                        Some((path, depth)) if *depth > 0 => {
                            path.join(name).ok().map(|p| (p, depth - 1))
                        }
                        _ => None,
                    };
                    Some(self.digest_into(child, sub_report, out, level + 1))
                }
                Some(c) if c.is_dir() => Some([0; 16]),
                _ => None,
            };
            subdirs.push(sub);
        }
        let mut children: Vec<Child<'_>> = node
            .children
            .iter()
            .zip(subdirs)
            .filter_map(|((name, &child), subdir)| {
                let c = self.nodes.get(&child)?;
                if c.remote.0 == LOCAL_ONLY_DEV {
                    return None;
                }
                Some(Child {
                    name,
                    attr: &c.attr,
                    symlink: c.symlink.as_deref(),
                    subdir,
                })
            })
            .collect();
        let digest = dir_digest(&mut children);
        if let Some(i) = slot {
            out[i].digest = digest;
        }
        digest
    }
}

#[cfg(test)]
#[path = "tree_tests.rs"]
mod tests;
