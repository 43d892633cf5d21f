//! Reconciliation: finds what the watcher missed (changes while it was off, a lost stream, an
//! overflow it did not report) by comparing directory digests ([`kmount_proto::digest`]) of the
//! remote with the same digests computed over the tree, descending only into directories that
//! differ, and listing again only those.
//!
//! It runs inside the remote task ([`crate::remote::run`]), so events that arrive meanwhile are
//! applied after it, in order.
//!
//! It goes in two passes: the first lists the directories that differ and counts what their
//! listings would remove, without changing anything; the mass-removal guard
//! ([`crate::guard`]) decides on that count; the second applies the listings (taken once, by
//! the first pass), with or without the removals.

use std::collections::{HashMap, HashSet};
use std::time::{Instant, SystemTime};

use kmount_proto::{DirEntry, Done, Op, RelPath};

use crate::core::Core;
use crate::err;
use crate::error::FsError;
use crate::guard::Verdict;
use crate::remote;
use crate::tree::Effects;

/// Levels of digests asked for at once.
const DEPTH: u32 = 2;
/// Entries asked for per `ReadDir`.
const LIST_BATCH: u32 = 4096;

/// What one reconciliation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The whole tree was equal at the start.
    pub equal: bool,
    /// `Op::Digest` requests sent.
    pub digest_requests: u64,
    /// Directories listed again.
    pub relisted: u64,
    /// Directories found new and walked.
    pub walked: u64,
    /// Directories left alone because they changed locally meanwhile.
    pub skipped: u64,
    /// Entries missing on the remote whose removal the guard holds ([`crate::guard`]).
    pub held: u64,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.equal {
            return f.write_str("in sync");
        }
        write!(
            f,
            "repaired: {} director{} listed again, {} walked, {} left for later",
            self.relisted,
            if self.relisted == 1 { "y" } else { "ies" },
            self.walked,
            self.skipped
        )?;
        if self.held > 0 {
            write!(
                f,
                "; the removal of {} entries missing on the remote is paused",
                self.held
            )?;
        }
        Ok(())
    }
}

struct Digests {
    remote: HashMap<RelPath, [u8; 16]>,
    /// Directories whose subdirectories' remote digests are in `remote`.
    expanded: HashSet<RelPath>,
}

fn depth_below(path: &RelPath, of: &RelPath) -> u32 {
    (path.components().count() - of.components().count()) as u32
}

impl Digests {
    async fn fetch(
        &mut self,
        core: &Core,
        path: &RelPath,
        out: &mut Outcome,
    ) -> Result<(), FsError> {
        out.digest_requests += 1;
        let done = core
            .client()
            .call(
                Op::Digest {
                    path: path.clone(),
                    depth: DEPTH,
                },
                None,
            )
            .await?;
        let Done::Digests(list) = done else {
            return Err(err!(libc::EIO, "the agent answered Digest with {done:?}"));
        };
        for d in list {
            if depth_below(&d.path, path) < DEPTH {
                self.expanded.insert(d.path.clone());
            }
            self.remote.insert(d.path, d.digest);
        }
        self.expanded.insert(path.clone());
        Ok(())
    }
}

/// The local digest of the directory at `path`, if the tree has it.
fn local_digest(core: &Core, path: &RelPath) -> Option<[u8; 16]> {
    let t = core.tree().lock();
    let id = t.resolve(path)?;
    t.is_dir(id).then(|| t.digests(id, path, 0)[0].digest)
}

/// Remote listings taken by the first pass, for the second.
struct Listings {
    /// The local-change sequence number before the first listing was taken.
    since: u64,
    by_dir: HashMap<RelPath, Vec<DirEntry>>,
}

/// Compares the whole tree with the remote and repairs what differs.
pub async fn reconcile(core: &Core) -> Result<Outcome, FsError> {
    let mut out = Outcome::default();
    let root = RelPath::root();
    let mut digests = Digests {
        remote: HashMap::new(),
        expanded: HashSet::new(),
    };
    digests.fetch(core, &root, &mut out).await?;
    if digests.remote.get(&root) == local_digest(core, &root).as_ref() {
        out.equal = true;
        core.sync_stats(|s| {
            s.guard.check_reconciliation(0, 0);
            s.guard.settled();
        });
        return Ok(out);
    }
    let (removing, mut listings) = survey(core, &mut digests, &mut out).await?;
    let known = core.tree().lock().counts().nodes;
    let verdict = core.sync_stats(|s| s.guard.check_reconciliation(removing, known));
    let remove = verdict == Verdict::Apply;
    if !remove {
        out.held = removing;
    }
    let mut queue = vec![root];
    let mut visited = HashSet::new();
    while let Some(dir) = queue.pop() {
        if !visited.insert(dir.clone()) {
            continue;
        }
        if !digests.expanded.contains(&dir) {
            if gone(digests.fetch(core, &dir, &mut out).await)? {
                continue;
            }
            if digests.remote.get(&dir) == local_digest(core, &dir).as_ref() {
                continue;
            }
        }
        let Some(new_dirs) = relist(core, &dir, &mut listings, remove, &mut out).await? else {
            continue;
        };
        for path in new_dirs {
            out.walked += 1;
            match remote::rescan(core, &path).await {
                Ok(again) if !again.is_empty() => remote::rescan_all(core, again).await,
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot walk the new directory {path}: {e}"),
            }
        }
        let subdirs: Vec<RelPath> = {
            let t = core.tree().lock();
            let Some(id) = t.resolve(&dir) else { continue };
            t.listing(id)
                .into_iter()
                .filter(|l| l.kind == libc::S_IFDIR)
                .filter_map(|l| dir.join(&l.name).ok())
                .collect()
        };
        for sub in subdirs {
            match digests.remote.get(&sub) {
                Some(remote) if Some(*remote) == local_digest(core, &sub) => {}
                // Differs, or not fetched yet (below the levels asked for): look closer.
                _ => queue.push(sub),
            }
        }
    }
    if remove {
        core.sync_stats(|s| s.guard.settled());
    }
    Ok(out)
}

/// Whether a request about a directory found it gone on the remote (its parent's listing
/// says so; with a removal held, the tree still has it); other errors stay errors.
fn gone(result: Result<(), FsError>) -> Result<bool, FsError> {
    match result {
        Ok(()) => Ok(false),
        Err(e) if matches!(e.errno, libc::ENOENT | libc::ENOTDIR) => Ok(true),
        Err(e) => Err(e),
    }
}

/// The first pass: lists every directory that differs (descending only into those the remote
/// has too) and counts the entries their listings would remove. Changes nothing.
async fn survey(
    core: &Core,
    digests: &mut Digests,
    out: &mut Outcome,
) -> Result<(u64, Listings), FsError> {
    let mut listings = Listings {
        since: core.mutation_seq(),
        by_dir: HashMap::new(),
    };
    let pending = core.pending_set().unwrap_or_default();
    let mut removing = 0;
    let mut queue = vec![RelPath::root()];
    let mut visited = HashSet::new();
    while let Some(dir) = queue.pop() {
        if !visited.insert(dir.clone()) {
            continue;
        }
        if !digests.expanded.contains(&dir) {
            if gone(digests.fetch(core, &dir, out).await)? {
                continue;
            }
            if digests.remote.get(&dir) == local_digest(core, &dir).as_ref() {
                continue;
            }
        }
        let entries = match list(core, &dir).await {
            Ok(e) => e,
            Err(e) if matches!(e.errno, libc::ENOENT | libc::ENOTDIR) => continue,
            Err(e) => return Err(e),
        };
        let remote_dirs: HashSet<&[u8]> = entries
            .iter()
            .filter(|e| e.attr.as_ref().is_some_and(|a| a.is_dir()))
            .map(|e| e.name.as_slice())
            .collect();
        let mut subdirs = Vec::new();
        {
            let t = core.tree().lock();
            let Some(id) = t.resolve(&dir).filter(|&id| t.is_complete(id)) else {
                continue;
            };
            if t.touched(id) <= listings.since {
                let keep = keep_names(&t, id, &dir, &entries, &pending, listings.since);
                removing += remote::removal_count(&t, id, &keep);
            }
            for l in t.listing(id) {
                if l.kind == libc::S_IFDIR
                    && remote_dirs.contains(l.name.as_slice())
                    && let Ok(sub) = dir.join(&l.name)
                {
                    subdirs.push(sub);
                }
            }
        }
        for sub in subdirs {
            match digests.remote.get(&sub) {
                Some(remote) if Some(*remote) == local_digest(core, &sub) => {}
                _ => queue.push(sub),
            }
        }
        listings.by_dir.insert(dir, entries);
    }
    Ok((removing, listings))
}

/// The names of directory `id` (at `dir`) a listing of it (`entries`, taken after local
/// change `since`) keeps: those listed, those with local changes not yet applied, those made
/// locally after the listing was taken.
fn keep_names(
    t: &crate::tree::TreeState,
    id: u64,
    dir: &RelPath,
    entries: &[DirEntry],
    pending: &crate::local::PendingSet,
    since: u64,
) -> HashSet<Vec<u8>> {
    let mut keep: HashSet<Vec<u8>> = remote::pending_children(t, id, dir, pending)
        .into_iter()
        .collect();
    keep.extend(
        entries
            .iter()
            .filter(|e| e.attr.is_some())
            .map(|e| e.name.clone()),
    );
    for name in t.child_names(id) {
        if !keep.contains(&name) && t.child(id, &name).is_some_and(|c| t.touched(c) > since) {
            keep.insert(name);
        }
    }
    keep
}

/// How often a directory changed here while it was being listed is listed again at once.
const RELIST_TRIES: usize = 4;

/// Lists `dir` on the remote and applies the listing (not below it). Returns the directories
/// that are new (to be walked), or `None` when `dir` was left alone. A listing that a local
/// change of the directory overtook is taken again at once, a few times, rather than left to
/// the next reconciliation (a file made in the container while the agent was away stayed
/// unseen that long when a write through the mount landed in its directory meanwhile).
async fn relist(
    core: &Core,
    dir: &RelPath,
    listings: &mut Listings,
    remove: bool,
    out: &mut Outcome,
) -> Result<Option<Vec<RelPath>>, FsError> {
    for _ in 0..RELIST_TRIES {
        if let Some(done) = relist_once(core, dir, listings, remove, out).await? {
            return Ok(done);
        }
    }
    out.skipped += 1;
    Ok(None)
}

/// [`relist`] once: `None` when a local change of `dir` overtook the listing.
async fn relist_once(
    core: &Core,
    dir: &RelPath,
    listings: &mut Listings,
    remove: bool,
    out: &mut Outcome,
) -> Result<Option<Option<Vec<RelPath>>>, FsError> {
    let (since, listed) = match listings.by_dir.remove(dir) {
        Some(entries) => (listings.since, Ok(entries)),
        None => {
            let since = core.mutation_seq();
            (since, list(core, dir).await)
        }
    };
    let entries = match listed {
        Ok(e) => e,
        Err(e) if matches!(e.errno, libc::ENOENT | libc::ENOTDIR) => {
            // Gone since the digests were taken: its parent's listing says so.
            return Ok(Some(None));
        }
        Err(e) => return Err(e),
    };
    let mut fx = Effects::default();
    let mut new_dirs = Vec::new();
    {
        let mut t = core.tree().lock();
        let Some(id) = t.resolve(dir).filter(|&id| t.is_complete(id)) else {
            return Ok(Some(None));
        };
        if t.touched(id) > since {
            return Ok(None);
        }
        out.relisted += 1;
        let pending = core.pending_set().unwrap_or_default();
        let mut keep: HashSet<Vec<u8>> = remote::pending_children(&t, id, dir, &pending)
            .into_iter()
            .collect();
        for e in entries {
            let Some(attr) = e.attr else { continue };
            keep.insert(e.name.clone());
            let existing = t.child(id, &e.name);
            if existing.is_some_and(|c| t.touched(c) > since)
                || t.takes_changed_node(id, &e.name, &attr, since)
                || dir.join(&e.name).is_ok_and(|p| pending.covers(&p))
            {
                continue;
            }
            let got = t.upsert(id, &e.name, &attr, e.symlink, false, &mut fx);
            if attr.is_dir() && existing != Some(got) {
                new_dirs.extend(dir.join(&e.name).ok());
            }
        }
        // Names made locally after the listing was taken stay.
        for name in t.child_names(id) {
            if !keep.contains(&name) && t.child(id, &name).is_some_and(|c| t.touched(c) > since) {
                keep.insert(name);
            }
        }
        if remove {
            if tracing::enabled!(tracing::Level::DEBUG) {
                let gone: Vec<String> = t
                    .child_names(id)
                    .into_iter()
                    .filter(|n| !keep.contains(n))
                    .map(|n| n.escape_ascii().to_string())
                    .collect();
                tracing::debug!(?dir, ?gone, "removing what the listing lacks");
            }
            t.retain_children(id, &keep, &mut fx);
        }
        fx.inval.extend(t.take_deferred());
    }
    fx.dedup();
    core.invalidator().send(std::mem::take(&mut fx.inval));
    core.note_stale_content(&fx.stale_content);
    let (more, _) = remote::refresh(core, &fx.refresh).await;
    core.invalidator().send(more.inval);
    Ok(Some(Some(new_dirs)))
}

/// The remote listing of `dir`.
async fn list(core: &Core, dir: &RelPath) -> Result<Vec<DirEntry>, FsError> {
    let (done, generation) = core
        .client()
        .call_gen(Op::OpenDir { path: dir.clone() }, None)
        .await?;
    let Done::Handle(handle) = done else {
        return Err(err!(libc::EIO, "the agent answered OpenDir with {done:?}"));
    };
    let mut entries = Vec::new();
    let result = loop {
        let op = Op::ReadDir {
            handle,
            max: LIST_BATCH,
        };
        match core.client().call_in(generation, op, None).await {
            Ok(Done::Entries { entries: e, eof }) => {
                entries.extend(e);
                if eof {
                    break Ok(());
                }
            }
            Ok(other) => break Err(err!(libc::EIO, "the agent answered ReadDir with {other:?}")),
            Err(e) => break Err(FsError::from(e)),
        }
    };
    let _ = core
        .client()
        .call_in(generation, Op::Close { handle }, None)
        .await;
    result.map(|()| entries)
}

/// Runs [`reconcile`] and records its outcome for status.
pub async fn reconcile_and_record(core: &Core) -> Result<Outcome, FsError> {
    let started = Instant::now();
    let result = reconcile(core).await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let outcome = match &result {
        Ok(o) if o.equal => {
            tracing::debug!("reconciliation: in sync ({ms:.0} ms)");
            o.to_string()
        }
        Ok(o) => {
            tracing::info!("reconciliation: {o} ({ms:.0} ms)");
            o.to_string()
        }
        Err(e) => {
            tracing::warn!("reconciliation failed: {e}");
            format!("failed: {e}")
        }
    };
    core.sync_stats(|s| {
        s.last_reconcile = Some(SystemTime::now());
        if matches!(&result, Ok(o) if !o.equal) {
            s.reconcile_repairs += 1;
        }
        s.last_reconcile_outcome = Some(outcome);
    });
    result
}
