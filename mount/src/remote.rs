//! Keeping the tree current with the remote: the walk that builds it, the watcher's events
//! that update it, and the re-walks (rescans) that repair it.
//!
//! One task ([`run`]) applies everything that comes from the remote, one thing at a time:
//! while it waits for a walk or a listing, events queue up behind it and are applied after it,
//! in order. Events state each node's state after the change, so replaying those that arrived
//! during a walk over the walk's snapshot ends at the newest state.
//!
//! Every change is published in the tree before its invalidations are queued for the notifier
//! thread ([`crate::invalidate`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kmount_proto::tree::decode_entries;
use kmount_proto::{Attr, Done, Event, NodeRef, Op, RelPath, TreeEntry};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::client::{Client, ClientEvent};
use crate::core::Core;
use crate::err;
use crate::error::FsError;
use crate::guard::{self, Guard, Verdict};
use crate::local::PendingSet;
use crate::tree::{Effects, ROOT_ID, Tree, TreeState};

/// Entries asked for per `WalkNext`.
const WALK_BATCH: u32 = 4096;
/// `WalkNext` requests in flight at once.
const WALK_IN_FLIGHT: usize = 3;
/// Attribute refreshes in flight at once.
const REFRESH_IN_FLIGHT: usize = 16;

/// How far a walk has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkProgress {
    /// Nodes seen so far.
    pub files: u64,
    /// Bytes of the regular files among them.
    pub bytes: u64,
    /// The walk is complete.
    pub done: bool,
}

/// Called with a [`WalkProgress`] after every batch of a walk.
pub type ProgressFn = dyn Fn(WalkProgress) + Send + Sync;

/// Counters of the remote side, for status.
#[derive(Debug, Clone, Default)]
pub struct SyncStats {
    /// Change events applied.
    pub events: u64,
    /// Subtrees walked again.
    pub rescans: u64,
    /// When the last reconciliation finished, and what it found.
    pub last_reconcile: Option<SystemTime>,
    pub last_reconcile_outcome: Option<String>,
    /// Reconciliations that found differences.
    pub reconcile_repairs: u64,
    /// The mass-removal guard: whether a removal is held, and its settings.
    pub guard: Guard,
    /// Changes that waited for the write-back backlog to shrink (flow control), and how long
    /// they waited in all.
    pub throttled: u64,
    pub throttled_ms: u64,
}

/// Applies one walk's entries to the tree.
struct WalkApply {
    at: RelPath,
    at_id: u64,
    /// Local changes with a higher sequence number than this happened after the walk began.
    since: u64,
    /// Directories of this walk: path -> node id.
    dirs: HashMap<Vec<u8>, u64>,
    /// Names seen per directory.
    seen: HashMap<u64, HashSet<Vec<u8>>>,
    /// Directories changed locally during the walk: their listing is left as it is.
    skip: HashSet<u64>,
    /// Entries whose parent has not come yet, by parent path.
    orphans: HashMap<Vec<u8>, Vec<TreeEntry>>,
    progress: WalkProgress,
    /// Paths with local changes not yet applied: the local state stands.
    pending: Option<PendingSet>,
    /// [`TreeState::heard_seq`] when the walk began: nodes a watcher event set since keep
    /// what it said (the walk may have seen them before that change).
    asked: u64,
}

impl WalkApply {
    fn new(at: RelPath, at_id: u64, since: u64, pending: Option<PendingSet>, asked: u64) -> Self {
        let mut dirs = HashMap::new();
        dirs.insert(at.as_bytes().to_vec(), at_id);
        Self {
            at,
            at_id,
            since,
            dirs,
            seen: HashMap::new(),
            skip: HashSet::new(),
            orphans: HashMap::new(),
            progress: WalkProgress::default(),
            pending,
            asked,
        }
    }

    fn batch(&mut self, t: &mut TreeState, entries: Vec<TreeEntry>, fx: &mut Effects) {
        let mut work: Vec<TreeEntry> = entries;
        work.reverse();
        while let Some(e) = work.pop() {
            let Some((parent_path, name)) = e.path.split_last() else {
                continue;
            };
            let Some(&parent) = self.dirs.get(parent_path.as_bytes()) else {
                self.orphans
                    .entry(parent_path.as_bytes().to_vec())
                    .or_default()
                    .push(e);
                continue;
            };
            let name = name.to_vec();
            self.progress.files += 1;
            if e.attr.file_type() == libc::S_IFREG {
                self.progress.bytes += e.attr.size;
            }
            self.seen.entry(parent).or_default().insert(name.clone());
            let existing = t.child(parent, &name);
            let id = if self.pending.as_ref().is_some_and(|p| p.covers(&e.path)) {
                // Changed locally and not yet applied: the local state stands, and what the
                // walk saw is looked at again once it is applied (the remote may have changed
                // it after the local change landed: a file removed here and made there).
                let kept = existing.filter(|&id| t.is_dir(id) && e.attr.is_dir());
                if kept.is_none() {
                    fx.left_out.push(e.path.clone());
                }
                kept
            } else if self.skip.contains(&parent) || t.touched(parent) > self.since {
                // Changed here during the walk: only nodes that are still what the walk saw
                // are kept up to date.
                self.skip.insert(parent);
                match existing {
                    Some(id)
                        if t.remote_of(id) == Some((e.attr.dev, e.attr.ino))
                            && t.touched(id) <= self.since =>
                    {
                        t.update_attr(id, &e.attr, e.symlink.clone(), fx);
                        Some(id)
                    }
                    other => other.filter(|&id| t.is_dir(id) && e.attr.is_dir()),
                }
            } else if existing.is_some_and(|id| t.touched(id) > self.since)
                || t.takes_changed_node(parent, &name, &e.attr, self.since)
            {
                existing
            } else if let Some(id) = existing.filter(|&id| {
                t.heard_after(id, self.asked) && t.remote_of(id) == Some((e.attr.dev, e.attr.ino))
            }) {
                // A watcher event set it while the walk was out: the event is newer.
                Some(id)
            } else {
                Some(t.upsert(parent, &name, &e.attr, e.symlink.clone(), false, fx))
            };
            if let Some(id) = id.filter(|&id| t.is_dir(id)) {
                let path = e.path.as_bytes().to_vec();
                if let Some(waiting) = self.orphans.remove(&path) {
                    work.extend(waiting.into_iter().rev());
                }
                self.dirs.insert(path, id);
            }
        }
    }

    /// Removes what the walk did not see (a re-walk of an existing subtree). Names it did not
    /// see but keeps for their local changes not yet applied are looked at again once those
    /// are applied (a hard link made here and removed there while its record's answer was
    /// on its way stayed in the view).
    fn sweep(&self, t: &mut TreeState, fx: &mut Effects) {
        for (dir, keep) in self.sweep_plan(t) {
            if let (Some(pending), Ok(path)) = (&self.pending, t.path(dir)) {
                let seen = self.seen.get(&dir);
                for name in pending_children(t, dir, &path, pending) {
                    if !seen.is_some_and(|s| s.contains(&name))
                        && let Ok(child) = path.join(&name)
                    {
                        fx.left_out.push(child);
                    }
                }
            }
            t.retain_children(dir, &keep, fx);
        }
    }

    /// The directories [`WalkApply::sweep`] trims, with the names each keeps.
    fn sweep_plan(&self, t: &TreeState) -> Vec<(u64, HashSet<Vec<u8>>)> {
        let mut plan = Vec::new();
        for (path, &dir) in &self.dirs {
            if self.skip.contains(&dir) || t.touched(dir) > self.since || !t.is_dir(dir) {
                continue;
            }
            let mut keep = self.seen.get(&dir).cloned().unwrap_or_default();
            // Made (by the watcher's word) while the walk was out: the walk may predate them.
            keep.extend(t.children_heard_after(dir, self.asked));
            if let Some(pending) = &self.pending
                && let Ok(path) = RelPath::new(path.clone())
            {
                keep.extend(pending_children(t, dir, &path, pending));
            }
            plan.push((dir, keep));
        }
        plan
    }

    /// Entries [`WalkApply::sweep`] would remove (subtrees counted whole).
    fn sweep_count(&self, t: &TreeState) -> u64 {
        self.sweep_plan(t)
            .iter()
            .map(|(dir, keep)| removal_count(t, *dir, keep))
            .sum()
    }
}

/// Entries that [`TreeState::retain_children`] of `dir` with `keep` removes (subtrees counted
/// whole; local-only children stay).
pub fn removal_count(t: &TreeState, dir: u64, keep: &HashSet<Vec<u8>>) -> u64 {
    t.listing(dir)
        .into_iter()
        .filter(|l| !keep.contains(&l.name) && !t.is_local_only(l.id))
        .map(|l| guard::subtree_size(t, l.id))
        .sum()
}

/// Names in directory `dir` (at `path`) whose local changes are not applied yet: a listing of
/// the remote must not remove them.
pub fn pending_children(
    t: &TreeState,
    dir: u64,
    path: &RelPath,
    pending: &PendingSet,
) -> Vec<Vec<u8>> {
    t.child_names(dir)
        .into_iter()
        .filter(|name| path.join(name).is_ok_and(|p| pending.touches(&p)))
        .collect()
}

/// Walks the subtree at `at` (the whole tree for the root) and applies it to `tree`.
/// `since`: the local-change sequence number when the walk began (nodes changed locally since
/// are left alone). `sweep`: remove what the walk did not find (off for the first walk).
/// `pending`: paths with local changes not yet applied, left as they are.
pub async fn walk(
    client: &Client,
    tree: &Tree,
    at: &RelPath,
    since: u64,
    sweep: bool,
    progress: Option<&ProgressFn>,
    pending: Option<PendingSet>,
) -> Result<Effects, FsError> {
    let always: &SweepGuard<'_> = &|_, _| true;
    walk_inner(
        client,
        tree,
        at,
        since,
        sweep.then_some(always),
        progress,
        pending,
    )
    .await
}

/// Asked, with the tree and the number of entries a sweep would remove, whether to sweep.
type SweepGuard<'a> = dyn Fn(&TreeState, u64) -> bool + Send + Sync + 'a;

/// [`walk`], the sweep subject to `sweep` (none: no sweep).
async fn walk_inner(
    client: &Client,
    tree: &Tree,
    at: &RelPath,
    since: u64,
    sweep: Option<&SweepGuard<'_>>,
    progress: Option<&ProgressFn>,
    pending: Option<PendingSet>,
) -> Result<Effects, FsError> {
    let (at_id, asked) = {
        let t = tree.lock();
        let at_id = t
            .resolve(at)
            .ok_or_else(|| err!(libc::ENOENT, "{at} is not in the tree"))?;
        (at_id, t.heard_seq())
    };
    let (done, generation) = client
        .call_gen(Op::WalkOpen { path: at.clone() }, None)
        .await?;
    let handle = match done {
        Done::Handle(h) => h,
        other => {
            return Err(err!(
                libc::EIO,
                "the agent answered WalkOpen with {other:?}"
            ));
        }
    };
    let mut apply = WalkApply::new(at.clone(), at_id, since, pending, asked);
    let mut fx = Effects::default();
    let mut in_flight = JoinSet::new();
    let next = |set: &mut JoinSet<_>| {
        let c = client.clone();
        set.spawn(async move {
            c.call_in(
                generation,
                Op::WalkNext {
                    handle,
                    max: WALK_BATCH,
                },
                None,
            )
            .await
        });
    };
    for _ in 0..WALK_IN_FLIGHT {
        next(&mut in_flight);
    }
    let mut eof = false;
    while let Some(joined) = in_flight.join_next().await {
        let result = joined.map_err(|e| err!(libc::EIO, "a walk task failed: {e}"))?;
        match result {
            Ok(Done::Tree {
                zstd, eof: last, ..
            }) => {
                let entries = decode_entries(&zstd)
                    .map_err(|e| err!(libc::EIO, "a walk batch of {at} is malformed: {e}"))?;
                apply.batch(&mut tree.lock(), entries, &mut fx);
                if last {
                    eof = true;
                } else if !eof {
                    next(&mut in_flight);
                }
                if let Some(p) = progress {
                    p(apply.progress);
                }
            }
            // Requests sent after the last batch find the walk closed.
            Err(_) if eof => {}
            Ok(other) => {
                return Err(err!(
                    libc::EIO,
                    "the agent answered WalkNext with {other:?}"
                ));
            }
            Err(e) => return Err(FsError::from(e)),
        }
    }
    if !eof {
        return Err(err!(libc::EIO, "the walk of {at} ended early"));
    }
    if !apply.orphans.is_empty() {
        let n: usize = apply.orphans.values().map(Vec::len).sum();
        tracing::warn!(
            "the walk of {} listed {n} entries under directories it did not list",
            apply.at
        );
    }
    if let Some(allowed) = sweep {
        let mut t = tree.lock();
        let removing = apply.sweep_count(&t);
        if removing == 0 || allowed(&t, removing) {
            apply.sweep(&mut t, &mut fx);
        }
    }
    apply.progress.done = true;
    if let Some(p) = progress {
        p(apply.progress);
    }
    tracing::debug!(
        at = %apply.at,
        at_id = apply.at_id,
        files = apply.progress.files,
        bytes = apply.progress.bytes,
        "walk complete"
    );
    fx.dedup();
    // Walked directories' own attributes are fresh.
    let walked: HashSet<u64> = apply.dirs.values().copied().collect();
    fx.refresh
        .retain(|id| !walked.contains(id) || *id == apply.at_id);
    if apply.at_id == ROOT_ID || at.is_root() {
        fx.refresh.retain(|id| *id != ROOT_ID);
    }
    Ok(fx)
}

/// The deepest ancestor of `path` (itself included) that is a directory in the tree.
fn known_ancestor(t: &TreeState, path: &RelPath) -> RelPath {
    let mut cur = path.clone();
    loop {
        if let Some(id) = t.resolve(&cur)
            && t.is_dir(id)
        {
            return cur;
        }
        match cur.split_last() {
            Some((parent, _)) => cur = parent,
            None => return RelPath::root(),
        }
    }
}

/// The complete directory `path` names, if any.
fn complete_dir(t: &TreeState, path: &RelPath) -> Option<u64> {
    t.resolve(path).filter(|&id| t.is_complete(id))
}

/// Applies watcher events to the tree; returns the paths to walk again. Events for paths with
/// local changes not yet applied (`pending`) are left out: the local state is newer.
pub fn apply_events(
    t: &mut TreeState,
    events: Vec<Event>,
    fx: &mut Effects,
    pending: Option<&PendingSet>,
) -> Vec<RelPath> {
    let mut rescans = Vec::new();
    let stamp = t.hear();
    for event in events {
        if let Some(p) = pending {
            let skip = match &event {
                Event::Upsert { path, .. } | Event::Remove { path } => p.covers(path),
                Event::Rename { from, to } => p.covers(from) || p.covers(to),
                Event::Rescan { .. } => false,
            };
            if skip {
                tracing::debug!(?event, "left out: the path has local changes not yet sent");
                // The remote may have changed it again after our change landed (a file
                // removed here and made again there at once): looked at once they are.
                match event {
                    Event::Upsert { path, .. } | Event::Remove { path } => fx.left_out.push(path),
                    Event::Rename { from, to } => fx.left_out.extend([from, to]),
                    Event::Rescan { .. } => {}
                }
                continue;
            }
        }
        match event {
            Event::Upsert {
                path,
                attr,
                symlink,
            } => {
                let Some((parent_path, name)) = path.split_last() else {
                    t.update_attr(ROOT_ID, &attr, None, fx);
                    t.set_heard(ROOT_ID, stamp);
                    continue;
                };
                match complete_dir(t, &parent_path) {
                    Some(parent) => {
                        let id = t.upsert(parent, name, &attr, symlink, false, fx);
                        t.set_heard(id, stamp);
                        // The watcher reports only what someone else did: a file's bytes may
                        // have changed even when its attributes look the same.
                        t.content_may_have_changed(id, fx);
                    }
                    None => rescans.push(known_ancestor(t, &parent_path)),
                }
            }
            Event::Remove { path } => {
                let Some((parent_path, name)) = path.split_last() else {
                    tracing::warn!("the agent reports the served directory itself removed");
                    continue;
                };
                if let Some(parent) = t.resolve(&parent_path) {
                    t.remove(parent, name, fx);
                }
            }
            Event::Rename { from, to } => {
                let (Some((from_parent, from_name)), Some((to_parent, to_name))) =
                    (from.split_last(), to.split_last())
                else {
                    rescans.push(RelPath::root());
                    continue;
                };
                let src_parent = t.resolve(&from_parent);
                let src = src_parent.and_then(|p| t.child(p, from_name));
                match (src_parent, src, complete_dir(t, &to_parent)) {
                    (Some(sp), Some(s), Some(tp)) if t.child(tp, to_name) == Some(s) => {
                        // Both names lead to one node here, but the remote moved one to the
                        // other (a rename between two links of one file changes nothing and
                        // reports nothing): the tree had put the node under the new name
                        // already (a request found it there first). The old name goes.
                        t.remove(sp, from_name, fx);
                    }
                    (Some(sp), Some(_), Some(tp)) => {
                        t.rename(sp, from_name, tp, to_name, false, fx);
                    }
                    (sp, _, _) => {
                        // Not followable from what the tree has: the source is gone anyway,
                        // the destination is found by walking its directory again.
                        if let Some(sp) = sp {
                            t.remove(sp, from_name, fx);
                        }
                        rescans.push(known_ancestor(t, &to_parent));
                    }
                }
            }
            Event::Rescan { path, reason } => {
                tracing::info!("walking {path} again: {reason}");
                rescans.push(known_ancestor(t, &path));
            }
        }
    }
    minimal_roots(rescans)
}

/// Drops paths that lie under another path of the list, and duplicates.
fn minimal_roots(mut paths: Vec<RelPath>) -> Vec<RelPath> {
    paths.sort();
    paths.dedup();
    let mut out: Vec<RelPath> = Vec::new();
    for p in paths {
        let covered = out.iter().any(|q| {
            q.is_root()
                || p.as_bytes() == q.as_bytes()
                || (p.as_bytes().starts_with(q.as_bytes())
                    && p.as_bytes().get(q.as_bytes().len()) == Some(&b'/'))
        });
        if !covered {
            out.push(p);
        }
    }
    out
}

/// Fetches the attributes of `ids` again (pipelined) and applies them; returns what that
/// changed and the paths found to be other nodes now (to walk again).
pub async fn refresh(core: &Core, ids: &[u64]) -> (Effects, Vec<RelPath>) {
    let mut fx = Effects::default();
    let mut rescans = Vec::new();
    let mut set = JoinSet::new();
    let mut pending = ids.iter().copied();
    // A node changed here after this is not overwritten by an answer that may predate that.
    let since = core.mutation_seq();
    let mut spawn_next = |set: &mut JoinSet<_>| {
        for id in pending.by_ref() {
            let Ok(path) = core.tree().path(id) else {
                continue;
            };
            let client = core.client().clone();
            set.spawn(async move {
                let r = client
                    .call(
                        Op::GetAttr {
                            node: NodeRef::Path(path.clone()),
                        },
                        None,
                    )
                    .await;
                (id, path, r)
            });
            return;
        }
    };
    for _ in 0..REFRESH_IN_FLIGHT {
        spawn_next(&mut set);
    }
    while let Some(joined) = set.join_next().await {
        spawn_next(&mut set);
        let Ok((id, path, result)) = joined else {
            continue;
        };
        // Anything else: gone since, and its removal event follows.
        if let Ok(Done::Attr(attr)) = result {
            let mut t = core.tree().lock();
            if t.remote_of(id) == Some((attr.dev, attr.ino)) {
                if t.touched(id) <= since {
                    t.update_attr(id, &attr, None, &mut fx);
                }
            } else if t.contains(id) {
                rescans.push(path.split_last().map_or(RelPath::root(), |(p, _)| p));
            }
        }
    }
    (fx, rescans)
}

/// Walks `path` again and applies the difference; a path that no longer exists is removed.
/// What local changes not yet applied kept it from applying is looked at again once they are
/// ([`Core::look_again_once_applied`]); returned: such paths whose changes are applied now,
/// to look at again at once.
pub async fn rescan(core: &Core, path: &RelPath) -> Result<Vec<RelPath>, FsError> {
    // An answer that a local change overtook is not applied; the lookup is made again (the
    // change was made here: the path's remote state may be news all the same).
    for attempt in 1..=RESCAN_ATTEMPTS {
        if let Rescanned::Done(left_out) = rescan_once(core, path).await? {
            return Ok(core.look_again_once_applied(left_out));
        }
        tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
    }
    if core.pending_covers(path) {
        return Ok(core.look_again_once_applied(vec![path.clone()]));
    }
    tracing::debug!(%path, "left for the next reconciliation: it keeps changing here");
    Ok(Vec::new())
}

/// Lookups of a path [`rescan`] makes while local changes overtake their answers.
const RESCAN_ATTEMPTS: u64 = 4;

#[derive(Debug, PartialEq, Eq)]
enum Rescanned {
    /// Applied, but for these paths: local changes of them are not applied yet.
    Done(Vec<RelPath>),
    /// A local change overtook the answer: nothing applied.
    Overtaken,
}

async fn rescan_once(core: &Core, path: &RelPath) -> Result<Rescanned, FsError> {
    let since = core.mutation_seq();
    if core.pending_covers(path) {
        // Its local state is newer; looked at again once its changes are applied.
        return Ok(Rescanned::Done(vec![path.clone()]));
    }
    let mut fx = Effects::default();
    if let Some((parent_path, name)) = path.split_last() {
        let asked = core.heard_seq();
        let got = core
            .client()
            .call(Op::Lookup { path: path.clone() }, None)
            .await;
        // `None`: a directory, walked below.
        let single = {
            let mut t = core.tree().lock();
            let parent = complete_dir(&t, &parent_path);
            // Changed here while the answer was on its way (or a change of it was in flight):
            // the answer may predate that change, which stands.
            let changed =
                |t: &TreeState, id: Option<u64>| id.is_some_and(|id| t.touched(id) > since);
            let node = parent.and_then(|p| t.child(p, name));
            if changed(&t, node)
                || (node.is_none() && changed(&t, parent))
                || core.pending_covers(path)
            {
                return Ok(Rescanned::Overtaken);
            }
            // A watcher event set the node while the answer was on its way: the event is
            // newer (a file rewritten in the container while it was looked up: the lookup saw
            // it emptied, the event the new bytes).
            let heard = node.filter(|&id| t.heard_after(id, asked));
            let gone = matches!(&got, Err(e)
                if matches!(FsError::from(e.clone()).errno, libc::ENOENT | libc::ENOTDIR));
            match (got, parent) {
                (Ok(Done::Attr(attr)), Some(parent))
                    if t.takes_changed_node(parent, name, &attr, since) =>
                {
                    Some(Ok(Rescanned::Overtaken))
                }
                (Ok(Done::Attr(attr)), Some(parent)) => {
                    if heard.is_none_or(|id| t.remote_of(id) != Some((attr.dev, attr.ino))) {
                        t.upsert(parent, name, &attr, None, false, &mut fx);
                    }
                    (!attr.is_dir()).then(|| Ok(Rescanned::Done(Vec::new())))
                }
                (Err(_), Some(parent)) if gone => {
                    if heard.is_none() {
                        let removing = t
                            .child(parent, name)
                            .map_or(0, |c| guard::subtree_size(&t, c));
                        if guard_once(core, &t, removing) == Verdict::Apply {
                            t.remove(parent, name, &mut fx);
                        }
                    }
                    Some(Ok(Rescanned::Done(Vec::new())))
                }
                (Err(e), _) => Some(Err(e.into())),
                (Ok(Done::Attr(_)), None) => Some(Err(err!(
                    libc::ENOENT,
                    "the parent of {path} is not in the tree"
                ))),
                (Ok(other), _) => Some(Err(err!(
                    libc::EIO,
                    "the agent answered Lookup with {other:?}"
                ))),
            }
        };
        if let Some(result) = single {
            rescanned(core, std::mem::take(&mut fx)).await;
            return result;
        }
    }
    let allowed = |t: &TreeState, removing: u64| guard_once(core, t, removing) == Verdict::Apply;
    let walked = walk_inner(
        core.client(),
        core.tree(),
        path,
        since,
        Some(&allowed),
        None,
        core.pending_set(),
    )
    .await?;
    fx.inval.extend(walked.inval);
    fx.refresh.extend(walked.refresh);
    fx.stale_content.extend(walked.stale_content);
    rescanned(core, fx).await;
    core.sync_stats(|s| s.rescans += 1);
    Ok(Rescanned::Done(walked.left_out))
}

/// Carries out what a rescan changed in the tree: the kernel forgets what it cached, stale
/// cached contents go, and nodes whose attributes moved with it are fetched (the other names
/// of a file whose one name went: their link count and change time).
async fn rescanned(core: &Core, mut fx: Effects) {
    fx.dedup();
    core.invalidator().send(std::mem::take(&mut fx.inval));
    core.note_stale_content(&fx.stale_content);
    let (more, _) = refresh(core, &fx.refresh).await;
    core.invalidator().send(more.inval);
}

/// Asks the guard about a rescan removing `removing` entries from the tree `t`.
fn guard_once(core: &Core, t: &TreeState, removing: u64) -> Verdict {
    if removing == 0 {
        return Verdict::Apply;
    }
    core.sync_stats(|s| s.guard.check_once(removing, || t.counts().nodes))
}

/// Entries the `Remove` events among `events` would take out of the tree: subtrees whole,
/// each entry once (an `rm -rf` reports every file and then their directory).
fn removals_in(t: &TreeState, events: &[Event], pending: Option<&PendingSet>) -> u64 {
    let removed: Vec<RelPath> = events
        .iter()
        .filter_map(|e| match e {
            Event::Remove { path } if !pending.is_some_and(|p| p.covers(path)) => {
                Some(path.clone())
            }
            _ => None,
        })
        .collect();
    let all: HashSet<&RelPath> = removed.iter().collect();
    let under_another = |path: &RelPath| {
        let mut cur = path.split_last().map(|(parent, _)| parent);
        while let Some(p) = cur {
            if all.contains(&p) {
                return true;
            }
            cur = p.split_last().map(|(parent, _)| parent);
        }
        false
    };
    removed
        .iter()
        .collect::<HashSet<_>>()
        .into_iter()
        .filter(|path| !under_another(path))
        .filter_map(|path| t.resolve(path))
        .filter(|&id| id != ROOT_ID)
        .map(|id| guard::subtree_size(t, id))
        .sum()
}

/// Walks the given paths again, repeating with the paths those walks could not resolve.
pub(crate) async fn rescan_all(core: &Core, paths: Vec<RelPath>) {
    let mut todo = minimal_roots(paths);
    let mut rounds = 0;
    while let Some(path) = todo.pop() {
        match rescan(core, &path).await {
            Ok(again) if rounds < 64 && !again.is_empty() => {
                rounds += 1;
                todo.extend(again);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("cannot walk {path} again: {e}");
                if e.errno == libc::ENOENT
                    && rounds < 64
                    && let Some((parent, _)) = path.split_last()
                {
                    rounds += 1;
                    todo.push(parent);
                }
            }
        }
    }
}

/// Whether `event`, which arrived when the local-change sequence number was `since`, may
/// predate a change made here since: the node it names was changed here after that, or (for a
/// name the tree does not have, or a rename's destination) its directory was. The agent sends
/// an event before the reply of an own operation that changed its path after the look
/// ([`ClientEvent::Changes`]), but the change counts as made here only once that reply is
/// handled, or later: applied, the event could undo it in the view (a name made again here
/// shown removed, and the next save of it refused by the remote with `EEXIST`). The paths
/// returned are looked at again instead.
fn predates_local_change(t: &TreeState, event: &Event, since: u64) -> Option<Vec<RelPath>> {
    let changed = |p: &RelPath| t.resolve(p).is_some_and(|id| t.touched(id) > since);
    let dir_changed = |p: &RelPath| p.split_last().is_some_and(|(dir, _)| changed(&dir));
    let takes_changed = |path: &RelPath, attr: &Attr| {
        path.split_last().is_some_and(|(dir, name)| {
            t.resolve(&dir)
                .is_some_and(|d| t.takes_changed_node(d, name, attr, since))
        })
    };
    let stale = match event {
        Event::Upsert { path, attr, .. } => {
            takes_changed(path, attr)
                || match t.resolve(path) {
                    Some(id) => t.touched(id) > since,
                    None => dir_changed(path),
                }
        }
        Event::Remove { path } => changed(path),
        Event::Rename { from, to } => changed(from) || changed(to) || dir_changed(to),
        Event::Rescan { .. } => false,
    };
    stale.then(|| match event {
        Event::Upsert { path, .. } | Event::Remove { path } => vec![path.clone()],
        Event::Rename { from, to } => vec![from.clone(), to.clone()],
        Event::Rescan { .. } => Vec::new(),
    })
}

/// Applies a run of events that arrived when the local-change sequence number was `since`
/// (or later), then their side effects (invalidations, refreshes, rescans).
pub async fn handle_events(core: &Core, events: Vec<Event>, since: u64) {
    let n = events.len() as u64;
    tracing::debug!(?events, since, "remote changes");
    let mut fx = Effects::default();
    let pending = core.pending_set().filter(|p| !p.is_empty());
    let mut again = Vec::new();
    let rescans = {
        let mut t = core.tree().lock();
        let events: Vec<Event> = events
            .into_iter()
            .filter(|e| match predates_local_change(&t, e, since) {
                Some(paths) => {
                    tracing::debug!(event = ?e, "looked at again: it may predate a local change");
                    again.extend(paths);
                    false
                }
                None => true,
            })
            .collect();
        let removing = removals_in(&t, &events, pending.as_ref());
        let verdict = if removing == 0 {
            Verdict::Apply
        } else {
            core.sync_stats(|s| s.guard.check_burst(Instant::now(), removing))
        };
        let events = match verdict {
            Verdict::Apply => events,
            // The next reconciliation applies them, once the hold ends.
            Verdict::Hold => events
                .into_iter()
                .filter(|e| !matches!(e, Event::Remove { .. }))
                .collect(),
        };
        let rescans = apply_events(&mut t, events, &mut fx, pending.as_ref());
        fx.inval.extend(t.take_deferred());
        rescans
    };
    fx.dedup();
    tracing::debug!(inval = ?fx.inval, ?rescans, "applied remote changes");
    core.invalidator().send(std::mem::take(&mut fx.inval));
    core.note_stale_content(&fx.stale_content);
    let due = core.look_again_once_applied(std::mem::take(&mut fx.left_out));
    core.sync_stats(|s| s.events += n);
    let (more, refreshed) = refresh(core, &fx.refresh).await;
    core.invalidator().send(more.inval);
    again.extend(refreshed);
    again.extend(rescans);
    again.extend(due);
    if !again.is_empty() {
        rescan_all(core, again).await;
    }
}

/// Turns the watcher on.
pub async fn enable_watch(client: &Client) -> Result<(), FsError> {
    match client.call(Op::Watch { enable: true }, None).await? {
        Done::Ok => Ok(()),
        other => Err(err!(libc::EIO, "the agent answered Watch with {other:?}")),
    }
}

/// Settings of the remote task.
#[derive(Debug, Clone)]
pub struct RemoteSettings {
    pub reconcile_interval: Duration,
}

/// Requests to the remote task (`mount handle --commands--> remote task`).
#[derive(Debug)]
pub enum RemoteCommand {
    /// Reconcile now; the outcome goes back on the sender.
    Reconcile(std::sync::mpsc::Sender<Result<crate::reconcile::Outcome, FsError>>),
    /// Walk these paths again (their local changes from an earlier run have landed).
    Rescan(Vec<RelPath>),
    /// The user confirmed a held mass removal ([`crate::guard`]): reconcile now.
    Confirmed,
}

/// The remote task: applies changes and connection events from `events_rx` and reconciles
/// periodically, until `shutdown` turns true.
pub async fn run(
    core: Arc<Core>,
    mut events_rx: mpsc::Receiver<ClientEvent>,
    mut commands_rx: mpsc::Receiver<RemoteCommand>,
    mut shutdown: watch::Receiver<bool>,
    settings: RemoteSettings,
) {
    let start = tokio::time::Instant::now() + settings.reconcile_interval;
    let mut tick = tokio::time::interval_at(
        start,
        settings.reconcile_interval.max(Duration::from_millis(10)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        enum Wake {
            Stop,
            Event(ClientEvent),
            Reconcile,
            Judge,
            Command(RemoteCommand),
        }
        // A burst of remote removals waits for a reconciliation to judge it ([`guard`]).
        let judge_at = core.sync_stats(|s| s.guard.judge_at());
        let judge = async {
            match judge_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => Wake::Stop,
            ev = events_rx.recv() => ev.map_or(Wake::Stop, Wake::Event),
            Some(cmd) = commands_rx.recv() => Wake::Command(cmd),
            _ = tick.tick() => Wake::Reconcile,
            _ = judge => Wake::Judge,
        };
        let work = async {
            let first = match wake {
                Wake::Stop => return false,
                Wake::Event(ev) => ev,
                Wake::Reconcile => {
                    if core.client().is_connected() {
                        let _ = crate::reconcile::reconcile_and_record(&core).await;
                    }
                    return true;
                }
                Wake::Judge => {
                    // Once: when it cannot run now, the reconciliation after the reconnection
                    // or the next periodic one judges.
                    core.sync_stats(|s| s.guard.judged());
                    if core.client().is_connected() {
                        let _ = crate::reconcile::reconcile_and_record(&core).await;
                    }
                    return true;
                }
                Wake::Command(RemoteCommand::Rescan(paths)) => {
                    rescan_all(&core, paths).await;
                    return true;
                }
                Wake::Command(RemoteCommand::Confirmed) => {
                    let _ = crate::reconcile::reconcile_and_record(&core).await;
                    return true;
                }
                Wake::Command(RemoteCommand::Reconcile(reply)) => {
                    // Changes already queued go first, so the comparison sees them applied.
                    let mut queued = Vec::new();
                    while let Ok(ev) = events_rx.try_recv() {
                        queued.push(ev);
                    }
                    apply_queued(&core, queued).await;
                    let _ = reply.send(crate::reconcile::reconcile_and_record(&core).await);
                    return true;
                }
            };
            // Take everything already queued, so consecutive change batches apply as one.
            let mut queued = vec![first];
            while let Ok(more) = events_rx.try_recv() {
                queued.push(more);
            }
            apply_queued(&core, queued).await;
            true
        };
        // The mount's end cuts short work that waits on a remote that does not answer.
        let mut stop = shutdown.clone();
        let go_on = tokio::select! {
            go_on = work => go_on,
            _ = stop.wait_for(|s| *s) => false,
        };
        if !go_on {
            break;
        }
    }
    tracing::debug!("the remote task ends");
}

/// Applies queued client events in order, runs of change batches as one.
async fn apply_queued(core: &Core, queued: Vec<ClientEvent>) {
    let mut changes = Vec::new();
    // The earliest arrival of the run: every change in it is judged against that.
    let mut first = u64::MAX;
    for ev in queued {
        match ev {
            ClientEvent::Changes { events, since } => {
                first = first.min(since);
                changes.extend(events);
            }
            other => {
                if !changes.is_empty() {
                    handle_events(core, std::mem::take(&mut changes), first).await;
                    first = u64::MAX;
                }
                handle_link_event(core, other).await;
            }
        }
    }
    if !changes.is_empty() {
        handle_events(core, changes, first).await;
    }
}

async fn handle_link_event(core: &Core, ev: ClientEvent) {
    match ev {
        ClientEvent::Changes { events, since } => handle_events(core, events, since).await,
        ClientEvent::Overflow => {
            tracing::warn!("remote changes were dropped; walking the whole tree again");
            rescan_all(core, vec![RelPath::root()]).await;
        }
        ClientEvent::Disconnected(reason) => {
            tracing::warn!("lost the agent ({reason}); serving from the local copy meanwhile");
        }
        ClientEvent::Reconnected { generation } => {
            let started = Instant::now();
            if let Err(e) = enable_watch(core.client()).await {
                tracing::warn!("cannot turn the watcher on again after reconnecting: {e}");
            }
            let _ = crate::reconcile::reconcile_and_record(core).await;
            tracing::info!(
                generation,
                "caught up with the remote after reconnecting in {:.0} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
        }
    }
}

#[cfg(test)]
#[path = "remote_tests.rs"]
mod tests;
