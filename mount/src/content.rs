//! The on-disk content cache: the bytes of remote files, kept across remounts.
//!
//! # Directory (mode 0700)
//! - `lock`: `flock`ed by the one process using the cache ([`ContentError::Locked`]).
//! - `<id>.data`: the cached bytes of one file, sparse (`set_len`, never zero-filled), always
//!   exactly as long as the entry's size.
//! - `<id>.meta`: its sidecar, rewritten atomically (write, rename): the key, the
//!   [`Validity`] of the remote version the bytes belong to, the present byte ranges, last use,
//!   pinned, and the flags below, with a checksum.
//!
//! Entries are keyed by an opaque [`CacheKey`] chosen by the core (remote `dev-ino`, or a local
//! key for a file not yet on the remote; [`ContentCache::rekey`] renames). The file names use a
//! random id, so a rekey rewrites only the sidecar.
//!
//! # Never serving wrong bytes
//! Invariants (each entry):
//! 1. A range is marked present only after its bytes were written to the data file, and a
//!    sidecar is written from the in-memory state, so a sidecar never claims a byte the data
//!    file (as the kernel has it) lacks. Bytes fetched from the remote only fill ranges not
//!    present: they never overwrite a local write.
//! 2. `local`: the bytes may differ from the remote version named by the validity (local writes
//!    not yet known applied). It is persisted *before* the first local write's bytes, and
//!    cleared by [`Entry::set_validity`]. An entry whose sidecar says `local` is dropped when the
//!    cache is opened: after a crash, the journal (not the cache) is the record of unapplied
//!    changes, and the cache may hold bytes whose journal record was lost.
//! 3. `synced`: the data file was fsynced after its last write. Before the first write to a
//!    synced entry, a sidecar saying "not synced" is made durable (fsync, rename, fsync dir).
//!    An entry last written during another boot (a power cut loses unsynced pages) is kept only
//!    if it is synced. [`ContentCache::sync`] (also run when the cache is dropped) syncs.
//! 4. When in doubt, drop: an unreadable, damaged or inconsistent sidecar (wrong checksum, data
//!    file missing or of the wrong length, ranges out of bounds, a key claimed twice) loses the
//!    entry, never serves its bytes.
//!
//! # Concurrency
//! `ContentCache` and [`Entry`] are cheap clones over `Arc`s. Reads use `pread` with no lock
//! held; writers of one entry are serialised by that entry's own lock; the index lock is held
//! only for map operations, never during I/O. An [`Entry`] handle counts as "open": open and
//! pinned entries are never evicted.
//!
//! # Eviction
//! Usage is the number of bytes present over all entries. Whenever a write makes usage exceed
//! the limit (and when the last handle of an entry is dropped while over it), least recently
//! used entries that are neither pinned nor open are removed until usage is within the limit.

mod ranges;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kmount_proto::{Attr, Timespec};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::journal::{lock_dir, make_private_dir, random_u64, sync_dir};
use ranges::RangeSet;

/// Unit of fetching: [`Entry::missing`] reports whole chunks (the last one up to EOF).
pub const CHUNK: u64 = 1 << 20;
/// How often a mount makes its cache durable ([`ContentCache::sync`]).
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

const META_MAGIC: [u8; 8] = *b"KMCACHE1";

/// The name of a cached file, chosen by the core.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CacheKey(pub String);

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which remote version cached bytes belong to: equal validity, same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Validity {
    pub size: u64,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub ino: u64,
}

impl Validity {
    pub fn of(attr: &Attr) -> Self {
        Self {
            size: attr.size,
            mtime: attr.mtime,
            ctime: attr.ctime,
            ino: attr.ino,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// Eviction keeps usage (bytes present) at or below this, pinned and open entries aside.
    pub limit_bytes: u64,
    /// The boot the cache is written in; `None`: the system's (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("content cache file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the content cache {dir} is in use by another kmount process{pid} (the same target is \
         mounted twice); unmount the other mount, or point this one at another cache directory"
    )]
    Locked { dir: PathBuf, pid: String },
    #[error("bytes {}..{} are not in the cache", .range.start, .range.end)]
    Missing { range: Range<u64> },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Locks a mutex whose sections never leave their data half-updated on a panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a sidecar holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Sidecar {
    id: u64,
    key: CacheKey,
    validity: Validity,
    size: u64,
    present: Vec<(u64, u64)>,
    last_use: u64,
    pinned: bool,
    local: bool,
    synced: bool,
    boot_id: Option<String>,
}

fn encode_sidecar(s: &Sidecar) -> Vec<u8> {
    let mut out = META_MAGIC.to_vec();
    out = postcard::to_extend(s, out).expect("a Vec grows as needed");
    let h = xxh3_64(&out);
    out.extend_from_slice(&h.to_le_bytes());
    out
}

fn decode_sidecar(b: &[u8]) -> Option<Sidecar> {
    if b.len() < META_MAGIC.len() + 8 || b[..8] != META_MAGIC {
        return None;
    }
    let (body, h) = b.split_at(b.len() - 8);
    if xxh3_64(body) != u64::from_le_bytes(h.try_into().ok()?) {
        return None;
    }
    kmount_proto::decode(&body[8..]).ok()
}

#[derive(Debug)]
struct EntryState {
    key: CacheKey,
    validity: Validity,
    size: u64,
    present: RangeSet,
    /// See the module documentation (invariant 2).
    local: bool,
    /// See the module documentation (invariant 3).
    synced: bool,
    /// Writes between their gate ([`EntryInner::begin_write`]) and their end.
    writes_in_flight: u32,
    /// Counts finished data writes.
    data_gen: u64,
    /// Counts changes of what the sidecar records.
    version: u64,
    /// Evicted or removed: never persisted again, not counted in usage.
    removed: bool,
}

struct EntryInner {
    id: u64,
    data_path: PathBuf,
    meta_path: PathBuf,
    state: Mutex<EntryState>,
    /// Serialises writers of this entry (fetch fills, local writes, truncation).
    io: Mutex<()>,
    /// The `version` last written to the sidecar; held while writing or deleting the sidecar.
    persisted: Mutex<u64>,
    /// Open while any handle is.
    file: Mutex<Option<Arc<File>>>,
    /// Live [`Entry`] handles.
    open: AtomicUsize,
    pinned: AtomicBool,
    last_use: AtomicU64,
}

impl EntryInner {
    fn sidecar(&self, st: &EntryState, boot_id: &Option<String>) -> Sidecar {
        Sidecar {
            id: self.id,
            key: st.key.clone(),
            validity: st.validity,
            size: st.size,
            present: st.present.to_vec(),
            last_use: self.last_use.load(Ordering::Relaxed),
            pinned: self.pinned.load(Ordering::Relaxed),
            local: st.local,
            synced: st.synced,
            boot_id: boot_id.clone(),
        }
    }

    /// Writes the sidecar if it changed since last written; with `durable`, fsyncs it and the
    /// directory too.
    fn persist(&self, shared: &Shared, durable: bool) -> Result<(), ContentError> {
        let mut persisted = lock(&self.persisted);
        let (version, bytes) = {
            let st = lock(&self.state);
            if st.removed || (st.version == *persisted && !durable) {
                return Ok(());
            }
            (
                st.version,
                encode_sidecar(&self.sidecar(&st, &shared.boot_id)),
            )
        };
        let tmp = self.meta_path.with_extension("meta.tmp");
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            if durable {
                f.sync_all()?;
            }
            drop(f);
            fs::rename(&tmp, &self.meta_path)?;
            if durable {
                sync_dir(&shared.dir)?;
            }
            Ok(())
        };
        write().map_err(io_err(&self.meta_path))?;
        *persisted = version;
        Ok(())
    }

    fn file(&self) -> Result<Arc<File>, ContentError> {
        let mut f = lock(&self.file);
        if let Some(f) = &*f {
            return Ok(f.clone());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.data_path)
            .map_err(io_err(&self.data_path))?;
        let file = Arc::new(file);
        *f = Some(file.clone());
        Ok(file)
    }

    /// The gate every data write passes before touching the data file: records that a write is
    /// in flight, and persists what must be on disk before its bytes are (invariants 2 and 3).
    fn begin_write(&self, shared: &Shared, local: bool) -> Result<(), ContentError> {
        let (was_synced, must_persist) = {
            let mut st = lock(&self.state);
            let was_synced = st.synced;
            let newly_local = local && !st.local;
            st.synced = false;
            st.local |= local;
            st.writes_in_flight += 1;
            if was_synced || newly_local {
                st.version += 1;
            }
            (was_synced, was_synced || newly_local)
        };
        if must_persist && let Err(e) = self.persist(shared, was_synced) {
            self.end_write(shared, |_| {});
            return Err(e);
        }
        Ok(())
    }

    /// Ends a write begun with [`EntryInner::begin_write`]; `update` changes the state to match
    /// the bytes written. Keeps the cache's usage in step.
    fn end_write(&self, shared: &Shared, update: impl FnOnce(&mut EntryState)) {
        let mut st = lock(&self.state);
        let before = st.present.total();
        update(&mut st);
        st.writes_in_flight -= 1;
        st.data_gen += 1;
        st.version += 1;
        let after = st.present.total();
        if !st.removed {
            if after >= before {
                shared.usage.fetch_add(after - before, Ordering::Relaxed);
            } else {
                shared.usage.fetch_sub(before - after, Ordering::Relaxed);
            }
        }
    }

    /// Marks the entry removed and deletes its files (sidecar first, so a crash in between
    /// leaves only an orphan data file, which the next open deletes).
    fn delete(&self, shared: &Shared) {
        let _persisted = lock(&self.persisted);
        {
            let mut st = lock(&self.state);
            if st.removed {
                return;
            }
            st.removed = true;
            shared
                .usage
                .fetch_sub(st.present.total(), Ordering::Relaxed);
        }
        for p in [&self.meta_path, &self.data_path] {
            if let Err(e) = fs::remove_file(p)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!("content cache: cannot delete {}: {e}", p.display());
            }
        }
    }
}

struct Shared {
    dir: PathBuf,
    boot_id: Option<String>,
    limit: AtomicU64,
    /// Bytes present over all entries not removed.
    usage: AtomicU64,
    /// Logical clock for least-recently-used order.
    clock: AtomicU64,
    index: Mutex<HashMap<CacheKey, Arc<EntryInner>>>,
    lock: Mutex<Option<File>>,
}

impl Shared {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn data_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.data"))
    }

    fn meta_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.meta"))
    }

    /// Removes `key` if it still maps to `inner`.
    fn remove_if_same(&self, key: &CacheKey, inner: &Arc<EntryInner>) {
        let removed = {
            let mut idx = lock(&self.index);
            match idx.get(key) {
                Some(e) if Arc::ptr_eq(e, inner) => idx.remove(key),
                _ => None,
            }
        };
        if let Some(e) = removed {
            e.delete(self);
        }
    }

    /// Evicts least recently used, unpinned, unopened entries until usage is at most the
    /// limit. Returns the bytes freed.
    fn evict(&self) -> u64 {
        let limit = self.limit.load(Ordering::Relaxed);
        if self.usage.load(Ordering::Relaxed) <= limit {
            return 0;
        }
        let victims: Vec<Arc<EntryInner>> = {
            let mut idx = lock(&self.index);
            let mut candidates: Vec<(u64, CacheKey, u64)> = idx
                .iter()
                .filter(|(_, e)| {
                    e.open.load(Ordering::Acquire) == 0 && !e.pinned.load(Ordering::Acquire)
                })
                .map(|(k, e)| {
                    (
                        e.last_use.load(Ordering::Relaxed),
                        k.clone(),
                        lock(&e.state).present.total(),
                    )
                })
                .collect();
            candidates.sort();
            let mut over = self.usage.load(Ordering::Relaxed).saturating_sub(limit);
            let mut out = Vec::new();
            for (_, key, bytes) in candidates {
                if over == 0 {
                    break;
                }
                if let Some(e) = idx.remove(&key) {
                    out.push(e);
                }
                over = over.saturating_sub(bytes);
            }
            out
        };
        let mut freed = 0;
        for e in victims {
            freed += lock(&e.state).present.total();
            tracing::debug!(key = %lock(&e.state).key, "content cache: evicting");
            e.delete(self);
        }
        freed
    }

    fn entries(&self) -> Vec<Arc<EntryInner>> {
        lock(&self.index).values().cloned().collect()
    }

    fn flush(&self) -> Result<(), ContentError> {
        let mut first_err = None;
        for e in self.entries() {
            if let Err(err) = e.persist(self, false) {
                tracing::warn!("content cache: {err}");
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn syncfs(&self) -> Result<(), ContentError> {
        let d = File::open(&self.dir).map_err(io_err(&self.dir))?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(io_err(&self.dir)(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), ContentError> {
        let snapshot: Vec<(Arc<EntryInner>, u64)> = self
            .entries()
            .into_iter()
            .filter_map(|e| {
                let g = {
                    let st = lock(&e.state);
                    (!st.synced && !st.local && st.writes_in_flight == 0).then_some(st.data_gen)
                };
                g.map(|g| (e, g))
            })
            .collect();
        if snapshot.is_empty() {
            return self.flush();
        }
        self.syncfs()?;
        for (e, g) in &snapshot {
            let mut st = lock(&e.state);
            // Only if no write began since the snapshot (a write in flight, or one finished,
            // may have bytes the syncfs did not cover).
            if !st.removed && !st.local && st.writes_in_flight == 0 && st.data_gen == *g {
                st.synced = true;
                st.version += 1;
            }
        }
        self.flush()?;
        self.syncfs()
    }
}

/// Closing the cache writes the sidecars that changed, without syncing: entries are good for
/// the rest of this boot as they are, and [`ContentCache::sync`] (run in the background while
/// mounted) makes them good across a reboot. A `syncfs` at close waited for every dirty page
/// of the whole filesystem: on a busy disk an unmount took over 30 s.
impl Drop for Shared {
    fn drop(&mut self) {
        if lock(&self.lock).is_none() {
            return;
        }
        if let Err(e) = self.flush() {
            tracing::warn!("content cache {}: {e}", self.dir.display());
        }
    }
}

/// The cache. Clones share it.
#[derive(Clone)]
pub struct ContentCache {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ContentCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentCache")
            .field("dir", &self.shared.dir)
            .field("usage", &self.usage())
            .finish_non_exhaustive()
    }
}

/// A handle on one cached file. While any handle exists the entry is "open" and never evicted.
pub struct Entry {
    inner: Arc<EntryInner>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.inner.state);
        f.debug_struct("Entry")
            .field("key", &st.key)
            .field("size", &st.size)
            .field("present", &st.present.total())
            .finish_non_exhaustive()
    }
}

fn system_boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl ContentCache {
    /// Opens (creating when needed) the cache in `dir`, keeping usage at most `limit_bytes`.
    pub fn open(dir: &Path, limit_bytes: u64) -> Result<ContentCache, ContentError> {
        Self::open_with(
            dir,
            CacheOptions {
                limit_bytes,
                boot_id: None,
            },
        )
    }

    pub fn open_with(dir: &Path, opts: CacheOptions) -> Result<ContentCache, ContentError> {
        make_private_dir(dir).map_err(io_err(dir))?;
        let lock_file = lock_dir(dir).map_err(|(path, e, pid)| match e {
            Some(source) => ContentError::Io { path, source },
            None => ContentError::Locked {
                dir: dir.to_path_buf(),
                pid,
            },
        })?;
        let boot_id = opts.boot_id.or_else(system_boot_id);
        let shared = Shared {
            dir: dir.to_path_buf(),
            boot_id,
            limit: AtomicU64::new(opts.limit_bytes),
            usage: AtomicU64::new(0),
            clock: AtomicU64::new(0),
            index: Mutex::new(HashMap::new()),
            lock: Mutex::new(Some(lock_file)),
        };
        let loaded = load(&shared)?;
        let usage: u64 = loaded
            .values()
            .map(|e| lock(&e.state).present.total())
            .sum();
        let clock = loaded
            .values()
            .map(|e| e.last_use.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        shared.usage.store(usage, Ordering::Relaxed);
        shared.clock.store(clock, Ordering::Relaxed);
        tracing::debug!(
            "content cache {}: {} entries, {usage} bytes",
            dir.display(),
            loaded.len()
        );
        *lock(&shared.index) = loaded;
        let cache = ContentCache {
            shared: Arc::new(shared),
        };
        cache.shared.evict();
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    fn handle(&self, inner: Arc<EntryInner>) -> Entry {
        Entry {
            inner,
            shared: self.shared.clone(),
        }
    }

    /// Takes a handle on `key`'s entry (counted open under the index lock, so eviction cannot
    /// pick it meanwhile).
    fn take(&self, key: &CacheKey) -> Option<Entry> {
        let inner = {
            let idx = lock(&self.shared.index);
            let e = idx.get(key)?.clone();
            e.open.fetch_add(1, Ordering::AcqRel);
            e
        };
        let entry = self.handle(inner);
        if let Err(e) = entry.inner.file() {
            tracing::warn!("content cache: dropping {key}: {e}");
            let inner = entry.inner.clone();
            drop(entry);
            self.shared.remove_if_same(key, &inner);
            return None;
        }
        entry.touch();
        Some(entry)
    }

    /// The entry for `key` if it holds bytes of the remote version `validity`. An entry of any
    /// other version is dropped (its bytes are stale), local changes included.
    pub fn get(&self, key: &CacheKey, validity: &Validity) -> Option<Entry> {
        let entry = self.take(key)?;
        let (theirs, local) = {
            let st = lock(&entry.inner.state);
            (st.validity, st.local)
        };
        if theirs == *validity {
            return Some(entry);
        }
        if local {
            tracing::warn!(
                "content cache: {key} has local changes but the remote version changed; \
                 dropping the cached bytes"
            );
        } else {
            tracing::debug!("content cache: {key} is stale; dropping it");
        }
        let inner = entry.inner.clone();
        drop(entry);
        self.shared.remove_if_same(key, &inner);
        None
    }

    /// The entry for `key` whatever version it holds (for files with local changes, whose
    /// validity the core tracks itself).
    pub fn lookup(&self, key: &CacheKey) -> Option<Entry> {
        self.take(key)
    }

    /// A new, empty entry of `size` bytes for `key`, replacing any entry `key` had.
    pub fn create(
        &self,
        key: CacheKey,
        validity: Validity,
        size: u64,
    ) -> Result<Entry, ContentError> {
        let sh = &self.shared;
        let (id, file) = loop {
            let id = random_u64().map_err(io_err(&sh.dir))?;
            let path = sh.data_path(id);
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(f) => break (id, f),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path)(e)),
            }
        };
        let data_path = sh.data_path(id);
        if let Err(e) = file.set_len(size) {
            let _ = fs::remove_file(&data_path);
            return Err(io_err(&data_path)(e));
        }
        let inner = Arc::new(EntryInner {
            id,
            data_path,
            meta_path: sh.meta_path(id),
            state: Mutex::new(EntryState {
                key: key.clone(),
                validity,
                size,
                present: RangeSet::default(),
                local: false,
                synced: false,
                writes_in_flight: 0,
                data_gen: 0,
                version: 1,
                removed: false,
            }),
            io: Mutex::new(()),
            persisted: Mutex::new(0),
            file: Mutex::new(Some(Arc::new(file))),
            open: AtomicUsize::new(1),
            pinned: AtomicBool::new(false),
            last_use: AtomicU64::new(sh.tick()),
        });
        let replaced = lock(&sh.index).insert(key, inner.clone());
        if let Some(old) = replaced {
            old.delete(sh);
        }
        Ok(self.handle(inner))
    }

    /// Renames `old`'s entry to `new` (replacing any entry `new` had). False when `old` has
    /// none.
    pub fn rekey(&self, old: &CacheKey, new: CacheKey) -> Result<bool, ContentError> {
        let sh = &self.shared;
        let (inner, replaced) = {
            let mut idx = lock(&sh.index);
            let Some(inner) = idx.remove(old) else {
                return Ok(false);
            };
            let replaced = idx.insert(new.clone(), inner.clone());
            (inner, replaced)
        };
        if let Some(r) = replaced.filter(|r| !Arc::ptr_eq(r, &inner)) {
            r.delete(sh);
        }
        {
            let mut st = lock(&inner.state);
            st.key = new;
            st.version += 1;
        }
        // At once: a stale key on disk would name the entry wrongly after a crash.
        inner.persist(sh, false)?;
        Ok(true)
    }

    /// Drops `key`'s entry and its files. Open handles keep reading and writing their (now
    /// unnamed) file.
    pub fn remove(&self, key: &CacheKey) -> bool {
        let removed = lock(&self.shared.index).remove(key);
        match removed {
            Some(e) => {
                e.delete(&self.shared);
                true
            }
            None => false,
        }
    }

    /// Bytes present over all entries.
    pub fn usage(&self) -> u64 {
        self.shared.usage.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.shared.limit.load(Ordering::Relaxed)
    }

    /// Changes the limit and evicts down to it.
    pub fn set_limit(&self, limit_bytes: u64) {
        self.shared.limit.store(limit_bytes, Ordering::Relaxed);
        self.shared.evict();
    }

    /// Evicts down to the limit now; returns the bytes freed.
    pub fn evict(&self) -> u64 {
        self.shared.evict()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        lock(&self.shared.index).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, key: &CacheKey) -> bool {
        lock(&self.shared.index).contains_key(key)
    }

    /// Keys of pinned entries, sorted (pins survive restarts; the core unpins what it no
    /// longer needs).
    pub fn pinned_keys(&self) -> Vec<CacheKey> {
        let mut v: Vec<CacheKey> = lock(&self.shared.index)
            .iter()
            .filter(|(_, e)| e.pinned.load(Ordering::Relaxed))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// Writes every changed sidecar (no fsync): what a crash of kmount would otherwise lose is
    /// only which ranges are present.
    pub fn flush(&self) -> Result<(), ContentError> {
        self.shared.flush()
    }

    /// Makes the cache durable: data synced (`syncfs`), then sidecars marked synced and
    /// written, then synced, so the entries survive a reboot. Run now and then while mounted
    /// (see [`SYNC_EVERY`]); closing only writes sidecars.
    pub fn sync(&self) -> Result<(), ContentError> {
        self.shared.sync()
    }

    /// Test hook: a crash of kmount. Nothing more is written, the lock is released.
    #[cfg(test)]
    fn crash(self) {
        *lock(&self.shared.lock) = None;
        std::mem::forget(self);
    }
}

impl Clone for Entry {
    fn clone(&self) -> Self {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        Entry {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.inner.open.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        // The last handle: save what changed, close the file, and make room if needed.
        if let Err(e) = self.inner.persist(&self.shared, false) {
            tracing::warn!("content cache: {e}");
        }
        {
            let mut f = lock(&self.inner.file);
            if self.inner.open.load(Ordering::Acquire) == 0 {
                *f = None;
            }
        }
        self.shared.evict();
    }
}

impl Entry {
    fn touch(&self) {
        self.inner
            .last_use
            .store(self.shared.tick(), Ordering::Relaxed);
    }

    pub fn key(&self) -> CacheKey {
        lock(&self.inner.state).key.clone()
    }

    pub fn validity(&self) -> Validity {
        lock(&self.inner.state).validity
    }

    /// Size of the cached file (changed by local writes and [`Entry::set_len`]).
    pub fn size(&self) -> u64 {
        lock(&self.inner.state).size
    }

    /// Bytes present.
    pub fn present_bytes(&self) -> u64 {
        lock(&self.inner.state).present.total()
    }

    /// Whether every byte of the file is present.
    pub fn is_complete(&self) -> bool {
        let st = lock(&self.inner.state);
        st.present.contains(0..st.size)
    }

    /// Whether the bytes may differ from the remote version (local writes not yet applied).
    pub fn has_local_changes(&self) -> bool {
        lock(&self.inner.state).local
    }

    /// The [`CHUNK`]s overlapping `offset..offset + len` (clipped to the size) that are not
    /// wholly present, in order; the last chunk ends at the end of the file.
    pub fn missing(&self, offset: u64, len: u64) -> Vec<Range<u64>> {
        let st = lock(&self.inner.state);
        let end = offset.saturating_add(len).min(st.size);
        if offset >= end {
            return Vec::new();
        }
        (offset / CHUNK..end.div_ceil(CHUNK))
            .map(|c| c * CHUNK..((c + 1) * CHUNK).min(st.size))
            .filter(|r| !st.present.contains(r.clone()))
            .collect()
    }

    /// Stores bytes fetched from the remote at `offset`. Only ranges not yet present are
    /// written (a local write is never overwritten); bytes past the size are ignored.
    pub fn write_fetched(&self, offset: u64, bytes: &[u8]) -> Result<(), ContentError> {
        let inner = &self.inner;
        let _io = lock(&inner.io);
        let holes = {
            let st = lock(&inner.state);
            let end = offset.saturating_add(bytes.len() as u64).min(st.size);
            if offset >= end {
                return Ok(());
            }
            st.present.missing(offset..end)
        };
        if holes.is_empty() {
            return Ok(());
        }
        let file = inner.file()?;
        inner.begin_write(&self.shared, false)?;
        let mut done = Vec::with_capacity(holes.len());
        let mut result = Ok(());
        for h in holes {
            let part = &bytes[(h.start - offset) as usize..(h.end - offset) as usize];
            if let Err(e) = file.write_all_at(part, h.start) {
                result = Err(io_err(&inner.data_path)(e));
                break;
            }
            done.push(h);
        }
        inner.end_write(&self.shared, |st| {
            for h in done {
                st.present.insert(h);
            }
        });
        self.touch();
        self.shared.evict();
        result
    }

    /// A local write: afterwards the bytes are present (and the file at least this long; a gap
    /// past the old end reads as zeros).
    pub fn write_local(&self, offset: u64, bytes: &[u8]) -> Result<(), ContentError> {
        let inner = &self.inner;
        let _io = lock(&inner.io);
        let file = inner.file()?;
        inner.begin_write(&self.shared, true)?;
        let end = offset + bytes.len() as u64;
        let result = file
            .write_all_at(bytes, offset)
            .map_err(io_err(&inner.data_path));
        let ok = result.is_ok();
        inner.end_write(&self.shared, |st| {
            if ok && !bytes.is_empty() {
                st.present.insert(offset.min(st.size)..end);
                st.size = st.size.max(end);
            } else if !ok {
                // Which bytes landed is unknown.
                st.present.remove(offset..end);
            }
        });
        if !ok {
            // The data file may have grown: keep it exactly as long as the entry.
            let size = lock(&inner.state).size;
            let _ = file.set_len(size);
        }
        self.touch();
        self.shared.evict();
        result
    }

    /// A local truncate or extension; bytes past the old end read as zeros.
    pub fn set_len(&self, len: u64) -> Result<(), ContentError> {
        let inner = &self.inner;
        let _io = lock(&inner.io);
        let file = inner.file()?;
        inner.begin_write(&self.shared, true)?;
        let result = file.set_len(len).map_err(io_err(&inner.data_path));
        let ok = result.is_ok();
        inner.end_write(&self.shared, |st| {
            if ok {
                if len < st.size {
                    st.present.remove(len..st.size);
                } else {
                    st.present.insert(st.size..len);
                }
                st.size = len;
            }
        });
        self.touch();
        self.shared.evict();
        result
    }

    /// Reads `len` bytes at `offset` (fewer at the end of the file). Every byte asked for must
    /// be present, else [`ContentError::Missing`] names the first missing range.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ContentError> {
        let inner = &self.inner;
        let end = {
            let st = lock(&inner.state);
            let end = offset.saturating_add(len).min(st.size);
            if offset >= end {
                return Ok(Vec::new());
            }
            if let Some(m) = st.present.missing(offset..end).into_iter().next() {
                return Err(ContentError::Missing { range: m });
            }
            end
        };
        let file = inner.file()?;
        let mut buf = vec![0u8; (end - offset) as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&inner.data_path)(e)),
            }
        }
        // Short only when a concurrent truncation shrank the file meanwhile.
        buf.truncate(got);
        self.touch();
        Ok(buf)
    }

    /// After the remote applied our changes: the bytes are those of the remote version `v`.
    pub fn set_validity(&self, v: Validity) {
        let mut st = lock(&self.inner.state);
        st.validity = v;
        st.local = false;
        st.version += 1;
    }

    /// Pinned entries are never evicted.
    pub fn pin(&self) {
        self.set_pinned(true);
    }

    pub fn unpin(&self) {
        self.set_pinned(false);
        self.shared.evict();
    }

    fn set_pinned(&self, pinned: bool) {
        if self.inner.pinned.swap(pinned, Ordering::AcqRel) != pinned {
            lock(&self.inner.state).version += 1;
        }
    }

    pub fn is_pinned(&self) -> bool {
        self.inner.pinned.load(Ordering::Acquire)
    }

    /// Writes this entry's sidecar now if it changed.
    pub fn flush(&self) -> Result<(), ContentError> {
        self.inner.persist(&self.shared, false)
    }
}

/// Reads the directory at open: keeps every entry whose sidecar passes the checks of the module
/// documentation (invariant 4), deletes the rest and any orphan file.
fn load(sh: &Shared) -> Result<HashMap<CacheKey, Arc<EntryInner>>, ContentError> {
    let dir = &sh.dir;
    let mut metas: Vec<(u64, PathBuf)> = Vec::new();
    let mut datas: HashSet<u64> = HashSet::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            let _ = fs::remove_file(e.path());
            continue;
        }
        let parse = |stem: &str| {
            u64::from_str_radix(stem, 16)
                .ok()
                .filter(|_| stem.len() == 16)
        };
        if let Some(id) = name.strip_suffix(".meta").and_then(parse) {
            metas.push((id, e.path()));
        } else if let Some(id) = name.strip_suffix(".data").and_then(parse) {
            datas.insert(id);
        }
    }
    metas.sort();

    let mut keep: HashMap<CacheKey, Vec<Arc<EntryInner>>> = HashMap::new();
    let mut used: HashSet<u64> = HashSet::new();
    for (id, meta_path) in metas {
        let data_path = sh.data_path(id);
        let verdict = check_entry(sh, id, &meta_path, &data_path, datas.contains(&id));
        match verdict {
            Ok(inner) => {
                used.insert(id);
                let key = lock(&inner.state).key.clone();
                keep.entry(key).or_default().push(Arc::new(inner));
            }
            Err(why) => {
                tracing::info!("content cache: dropping {}: {why}", meta_path.display());
                let _ = fs::remove_file(&meta_path);
                let _ = fs::remove_file(&data_path);
            }
        }
    }
    for id in datas.difference(&used) {
        let _ = fs::remove_file(sh.data_path(*id));
    }
    let mut out = HashMap::new();
    for (key, mut v) in keep {
        if v.len() == 1 {
            out.insert(key, v.pop().expect("one"));
        } else {
            tracing::info!(
                "content cache: {} entries claim {key}; dropping them",
                v.len()
            );
            for e in v {
                let _ = fs::remove_file(&e.meta_path);
                let _ = fs::remove_file(&e.data_path);
            }
        }
    }
    Ok(out)
}

fn check_entry(
    sh: &Shared,
    id: u64,
    meta_path: &Path,
    data_path: &Path,
    has_data: bool,
) -> Result<EntryInner, String> {
    let bytes = fs::read(meta_path).map_err(|e| e.to_string())?;
    let s = decode_sidecar(&bytes).ok_or("damaged sidecar")?;
    if s.id != id {
        return Err(format!("sidecar of {:016x} under another name", s.id));
    }
    if !has_data {
        return Err("no data file".into());
    }
    let len = fs::metadata(data_path).map_err(|e| e.to_string())?.len();
    if len != s.size {
        return Err(format!(
            "data file is {len} bytes, the sidecar says {}",
            s.size
        ));
    }
    if s.local {
        return Err("it had local changes (the journal holds them)".into());
    }
    let same_boot = sh.boot_id.is_some() && s.boot_id == sh.boot_id;
    if !same_boot && !s.synced {
        return Err("written in another boot and never synced".into());
    }
    let present = RangeSet::from_stored(&s.present, s.size).ok_or("bad ranges")?;
    Ok(EntryInner {
        id,
        data_path: data_path.to_path_buf(),
        meta_path: meta_path.to_path_buf(),
        state: Mutex::new(EntryState {
            key: s.key,
            validity: s.validity,
            size: s.size,
            present,
            local: false,
            synced: s.synced,
            writes_in_flight: 0,
            data_gen: 0,
            version: 0,
            removed: false,
        }),
        io: Mutex::new(()),
        persisted: Mutex::new(0),
        file: Mutex::new(None),
        open: AtomicUsize::new(0),
        pinned: AtomicBool::new(s.pinned),
        last_use: AtomicU64::new(s.last_use),
    })
}
