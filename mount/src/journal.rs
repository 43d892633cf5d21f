//! The durable write-back log: every local change as a numbered record on local disk, kept until
//! the agent has applied it.
//!
//! # Directory (mode 0700)
//! - `lock`: `flock`ed by the one process using the journal (a second gets
//!   [`JournalError::Locked`]); holds that process's pid.
//! - `session`: the session id, a random u64 made when the journal is first opened and kept across
//!   restarts, so a new kmount process resumes the session and the agent recognises what it has
//!   already applied.
//! - `applied`: the highest seq known to be applied remotely (lazily persisted: at most every
//!   [`JournalOptions::flush_interval`], and on close).
//! - `seg-<first_seq>.log`: append-only segments of records, a new one every
//!   [`JournalOptions::segment_bytes`]. Format in the `segment` submodule.
//!
//! # Invariants
//! 1. Seqs are dense and increasing: each record's seq is the previous one's plus one, across
//!    segments and restarts. A seq is never used twice within a session.
//! 2. A record for which [`Journal::commit`] returned `Ok` (or that was appended before such a
//!    commit started) survives any crash of kmount or of the machine. After a crash, a torn tail
//!    of the last segment (records appended but not yet committed) is recognised by its checksum
//!    and cut off at the first bad record; everything before it is recovered.
//! 3. Readers ([`Journal::records_after`], hence the sender) see only durable records. So the
//!    agent never applies a record the journal could still lose, and a seq the agent applied is
//!    never reused for another record after a restart.
//! 4. A segment is deleted only after the `applied` file durably says every record in it is
//!    applied; the last segment is never deleted, so the next seq is known after any restart.
//! 5. After an `fsync` failure the journal refuses all further appends and commits
//!    ([`JournalError::Failed`]): the kernel may have dropped the unwritten pages, so a later
//!    successful `fsync` would prove nothing.
//!
//! Memory stays bounded by the write buffer (about [`JournalOptions::write_buffer`]), a sparse
//! index (one entry per 256 KiB of log), and one entry per distinct path with unapplied records;
//! record payloads are read back from disk.

mod coalesce;
mod segment;

#[cfg(test)]
mod coalesce_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kmount_proto::{Caller, NodeRef, Op, RelPath};
use tokio::sync::watch;

pub use coalesce::{Batch, MAX_MERGED_WRITE, MAX_PUT_FILE, coalesce};
pub use segment::MAX_RECORD_LEN;

use segment::{
    Read1, RecordBody, RecordBodyRef, SEG_HEADER_LEN, SegmentReader, decode_state, encode_state,
    parse_segment_name, payload_hash, record_header, segment_header, segment_name,
};

const SESSION_MAGIC: [u8; 8] = *b"KMJSESS1";
const APPLIED_MAGIC: [u8; 8] = *b"KMJAPPL1";
/// One sparse-index entry per this many bytes of segment.
const INDEX_GRANULE: u64 = 256 << 10;
/// Appends fail once this much is buffered because writing it keeps failing.
const MAX_BUFFERED: usize = 256 << 20;

/// One change, as appended and as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// The identity to apply it as (see [`kmount_proto::Request::caller`]).
    pub caller: Option<Caller>,
    pub op: Op,
}

/// Tunables; the defaults are what kmount uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalOptions {
    /// A new segment is started once the current one is at least this long.
    pub segment_bytes: u64,
    /// Appended records are committed, and the applied seq persisted, at most this long after
    /// they happen even when nobody calls [`Journal::commit`].
    pub flush_interval: Duration,
    /// Appends are written to the segment (not yet synced) once this much is buffered.
    pub write_buffer: usize,
    /// Segments whose records are all applied are kept while they add up to at most this
    /// many bytes (the newest first), so that the session's changes can be applied again to
    /// a target that lost them (a replaced pod); see [`Journal::records_from`].
    pub keep_applied: u64,
}

impl Default for JournalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            flush_interval: Duration::from_millis(50),
            write_buffer: 1 << 20,
            keep_applied: 256 << 20,
        }
    }
}

/// What [`Journal::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub session: u64,
    /// The session id was made now (first open, or the `session` file was missing or damaged).
    pub new_session: bool,
    /// Records up to here are known applied.
    pub applied: u64,
    /// The last recovered record (or the seq before the next one).
    pub tail: u64,
    /// Records after `applied`, to replay: read them with `journal.records_after(applied)`.
    pub records: u64,
    /// Their size in the log (envelopes included).
    pub bytes: u64,
    /// Paths named by those records, sorted.
    pub pending_paths: Vec<RelPath>,
    /// Bytes of a torn tail cut off the last segment (records never committed).
    pub truncated_bytes: u64,
}

/// Counters, for tests, status and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JournalStats {
    pub appends: u64,
    /// Calls of [`Journal::commit`] (including the background flusher's).
    pub commits: u64,
    /// `fdatasync` calls on segments.
    pub fsyncs: u64,
    /// Bytes written to segments.
    pub bytes_written: u64,
    /// Segments on disk.
    pub segments: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the journal {dir} is in use by another kmount process{pid}; unmount that mount first \
         (kmount list shows it)"
    )]
    Locked { dir: PathBuf, pid: String },
    #[error(
        "journal segment {path} is damaged at byte {offset} ({reason}); kmount cannot replay the \
         unsent changes safely. Move {dir} aside to start without them (they stay readable there)"
    )]
    Corrupt {
        dir: PathBuf,
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "journal record {seq} in {path} cannot be decoded ({reason}); it was probably written by \
         another kmount version: apply the pending changes with that version, or move {dir} aside"
    )]
    Undecodable {
        dir: PathBuf,
        path: PathBuf,
        seq: u64,
        reason: String,
    },
    #[error("a change of {len} bytes is over the journal's limit of {max} bytes")]
    TooLarge { len: usize, max: u32 },
    #[error("cannot encode a journal record: {0}")]
    Encode(postcard::Error),
    #[error("the journal is closed")]
    Closed,
    #[error(
        "the journal cannot save changes since an earlier failure ({0}); changes made since then \
         are not saved. Free disk space or fix the disk under the journal directory, then unmount \
         and mount again"
    )]
    Failed(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One line naming what a record does, for logs: its operation and paths (and the range of
/// a write), never its bytes.
pub fn summary(op: &Op) -> String {
    let paths: Vec<String> = op_paths(op)
        .iter()
        .map(|p| p.as_bytes().escape_ascii().to_string())
        .collect();
    let mut out = format!("{} {}", crate::client::op_name(op), paths.join(" -> "));
    match op {
        Op::WritePath { offset, data, .. } => {
            out.push_str(&format!(" [{offset}, +{})", data.len()));
        }
        Op::PutFile { data, .. } => out.push_str(&format!(" ({} bytes)", data.len())),
        Op::SetAttr { set, .. } if set.size.is_some() => {
            out.push_str(&format!(" size {}", set.size.unwrap_or_default()));
        }
        _ => {}
    }
    out
}

/// See [`Journal::waiting`].
pub struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Every path an operation names (both ends of a rename or link).
pub fn op_paths(op: &Op) -> Vec<&RelPath> {
    fn node(n: &NodeRef) -> Vec<&RelPath> {
        match n {
            NodeRef::Path(p) => vec![p],
            NodeRef::Handle(_) => Vec::new(),
        }
    }
    match op {
        Op::Lookup { path }
        | Op::OpenDir { path }
        | Op::Open { path, .. }
        | Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Mknod { path, .. }
        | Op::Symlink { path, .. }
        | Op::Readlink { path }
        | Op::Unlink { path }
        | Op::Rmdir { path }
        | Op::Access { path, .. }
        | Op::WalkOpen { path }
        | Op::Digest { path, .. }
        | Op::PutFile { path, .. }
        | Op::ReadPath { path, .. }
        | Op::FsyncPath { path, .. }
        | Op::WritePath { path, .. }
        | Op::FallocatePath { path, .. } => vec![path],
        Op::Link { from, to } | Op::Rename { from, to, .. } => vec![from, to],
        Op::GetAttr { node: n }
        | Op::SetAttr { node: n, .. }
        | Op::GetXattr { node: n, .. }
        | Op::ListXattr { node: n }
        | Op::SetXattr { node: n, .. }
        | Op::RemoveXattr { node: n, .. } => node(n),
        Op::Journaled { op, .. } => op_paths(op),
        Op::ReadDir { .. }
        | Op::SetRules { .. }
        | Op::RunCommand { .. }
        | Op::Read { .. }
        | Op::Write { .. }
        | Op::Fsync { .. }
        | Op::Fallocate { .. }
        | Op::Close { .. }
        | Op::Statfs
        | Op::Ping
        | Op::Lseek { .. }
        | Op::WalkNext { .. }
        | Op::Watch { .. }
        | Op::AppliedSeq { .. } => Vec::new(),
    }
}

/// Locks a mutex whose sections never leave their data half-updated on a panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(crate) fn random_u64() -> io::Result<u64> {
    loop {
        let mut b = [0u8; 8];
        // SAFETY: getrandom writes at most `b.len()` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n as usize == b.len() {
            let v = u64::from_le_bytes(b);
            if v != 0 {
                return Ok(v);
            }
        }
    }
}

/// Writes `path` through a temporary file, fsyncs it, renames it into place and fsyncs the
/// directory: afterwards the old or the new content is there, whole, even after a power cut.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Takes the journal's lock file; holds it as long as the returned file is open.
pub(crate) fn lock_dir(dir: &Path) -> Result<File, (PathBuf, Option<io::Error>, String)> {
    let path = dir.join("lock");
    let mut f = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => return Err((path, Some(e), String::new())),
    };
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let pid = fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|s| format!(" (pid {s})"))
                .unwrap_or_default();
            return Err((path, None, pid));
        }
        return Err((path, Some(e), String::new()));
    }
    let _ = f.set_len(0);
    let _ = f.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0);
    let _ = f.flush();
    Ok(f)
}

pub(crate) fn make_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// One segment as the writer and the readers know it.
#[derive(Debug, Clone)]
struct SegInfo {
    first_seq: u64,
    /// `first_seq - 1` while empty.
    last_seq: u64,
    /// Bytes written (header included).
    len: u64,
    /// (seq, offset) of the first record and then of one record per [`INDEX_GRANULE`].
    index: Vec<(u64, u64)>,
}

impl SegInfo {
    fn empty(first_seq: u64) -> Self {
        Self {
            first_seq,
            last_seq: first_seq - 1,
            len: SEG_HEADER_LEN,
            index: Vec::new(),
        }
    }

    fn note_record(&mut self, seq: u64, offset: u64, total_len: u64) {
        let due = match self.index.last() {
            None => true,
            Some(&(_, at)) => offset >= at + INDEX_GRANULE,
        };
        if due {
            self.index.push((seq, offset));
        }
        self.last_seq = seq;
        self.len = offset + total_len;
    }

    /// Where to start reading to reach `seq`: (seq there, offset).
    fn seek_point(&self, seq: u64) -> (u64, u64) {
        let i = self.index.partition_point(|&(s, _)| s <= seq);
        if i == 0 {
            (self.first_seq, SEG_HEADER_LEN)
        } else {
            self.index[i - 1]
        }
    }
}

/// Appended records not yet written to a segment.
struct BufState {
    next_seq: u64,
    data: Vec<u8>,
    /// (seq, offset in `data`) of each buffered record.
    records: Vec<(u64, usize)>,
    closed: bool,
}

struct FileState {
    segments: Vec<SegInfo>,
    /// The last segment, open for appending.
    current: Arc<File>,
    /// Last seq written to a segment (maybe not yet synced).
    written_seq: u64,
}

struct SyncState {
    running: bool,
}

struct BgState {
    dirty: bool,
    stop: bool,
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    commits: AtomicU64,
    fsyncs: AtomicU64,
    bytes_written: AtomicU64,
}

/// State shared by the journal, its background flusher and its readers.
struct Shared {
    dir: PathBuf,
    session: u64,
    opts: JournalOptions,
    buf: Mutex<BufState>,
    file: Mutex<FileState>,
    sync: Mutex<SyncState>,
    /// committers <--"an fsync finished"-- the committer that ran it
    sync_cv: Condvar,
    durable_tx: watch::Sender<u64>,
    applied_tx: watch::Sender<u64>,
    /// Highest applied seq the `applied` file holds.
    persisted_applied: Mutex<u64>,
    /// Path -> last seq naming it; entries at or below the applied seq are stale.
    paths: Mutex<HashMap<RelPath, u64>>,
    failed: Mutex<Option<String>>,
    bg: Mutex<BgState>,
    /// background flusher <--"work to do / stop"-- appenders, mark_applied, close
    bg_cv: Condvar,
    /// (applied seq, segment, offset) of record `applied + 1`, found by [`Journal::pending`].
    pending_cache: Mutex<Option<(u64, u64, u64)>>,
    counters: Counters,
    /// Callers in [`Journal::wait_applied`] now: the sender holds nothing back for them.
    waiters: std::sync::atomic::AtomicUsize,
}

/// The journal. Cheap to share by reference across threads (`Arc<Journal>`); all methods take
/// `&self`. Dropping it closes it (see [`Journal::close`]).
pub struct Journal {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// Holds the directory's flock while open.
    _lock: Option<File>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.shared.dir)
            .field("session", &self.shared.session)
            .finish_non_exhaustive()
    }
}

/// Reads the records of one segment at open, checking each.
struct Scan {
    info: SegInfo,
    truncated: u64,
}

impl Journal {
    /// Opens (creating when needed) the journal in `dir`, recovering what is there.
    pub fn open(dir: &Path) -> Result<(Journal, Recovery), JournalError> {
        Self::open_with(dir, JournalOptions::default())
    }

    pub fn open_with(
        dir: &Path,
        opts: JournalOptions,
    ) -> Result<(Journal, Recovery), JournalError> {
        make_private_dir(dir).map_err(io_err(dir))?;
        let lock = lock_dir(dir).map_err(|(path, e, pid)| match e {
            Some(source) => JournalError::Io { path, source },
            None => JournalError::Locked {
                dir: dir.to_path_buf(),
                pid,
            },
        })?;
        for stray in ["session.tmp", "applied.tmp"] {
            let _ = fs::remove_file(dir.join(stray));
        }

        let mut segs = list_segments(dir)?;

        let (session, new_session) = match read_state(dir, "session", &SESSION_MAGIC, 1)? {
            Some(v) => (v[0], false),
            None => {
                let s = random_u64().map_err(io_err(dir))?;
                if !segs.is_empty() {
                    tracing::warn!(
                        "journal {}: the session file is missing or damaged; pending changes \
                         are replayed under a new session, some may be applied twice",
                        dir.display()
                    );
                }
                write_durably(dir, "session", &encode_state(&SESSION_MAGIC, &[s]))
                    .map_err(io_err(&dir.join("session")))?;
                (s, true)
            }
        };
        let mut applied = if new_session {
            0
        } else {
            match read_state(dir, "applied", &APPLIED_MAGIC, 2)? {
                Some(v) if v[0] == session => v[1],
                Some(_) => {
                    tracing::warn!(
                        "journal {}: the applied file belongs to another session; replaying \
                         everything still stored",
                        dir.display()
                    );
                    0
                }
                None => 0,
            }
        };
        if let Some(&(first, _)) = segs.first() {
            // Records before the first segment were deleted, which happens only once applied.
            applied = applied.max(first - 1);
        }

        // Segments whose every record is applied (the next one starts at or below applied+1),
        // beyond those kept.
        let done = (0..segs.len().saturating_sub(1))
            .take_while(|&i| segs[i + 1].0 - 1 <= applied)
            .count();
        let sizes: Vec<u64> = segs[..done]
            .iter()
            .map(|(_, p)| fs::metadata(p).map_or(0, |m| m.len()))
            .collect();
        for (_, path) in segs.drain(..beyond_kept(&sizes, opts.keep_applied)) {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }

        let mut paths: HashMap<RelPath, u64> = HashMap::new();
        let mut pending_bytes = 0u64;
        let mut truncated_bytes = 0u64;
        let mut infos: Vec<SegInfo> = Vec::new();
        let count = segs.len();
        for (i, (first, path)) in segs.iter().enumerate() {
            if let Some(prev) = infos.last() {
                let expected = prev.last_seq + 1;
                // A gap is possible only where every missing seq is applied (see below).
                if *first < expected || (*first > expected && *first - 1 > applied) {
                    return Err(JournalError::Corrupt {
                        dir: dir.to_path_buf(),
                        path: path.clone(),
                        offset: 0,
                        reason: format!(
                            "starts at seq {first} while the previous segment ends at {}",
                            prev.last_seq
                        ),
                    });
                }
            }
            let scan = scan_segment(
                dir,
                path,
                *first,
                i + 1 == count,
                applied,
                &mut paths,
                &mut pending_bytes,
            )?;
            truncated_bytes += scan.truncated;
            infos.push(scan.info);
        }

        let last_record = infos.last().map(|s| s.last_seq).unwrap_or(0);
        let tail = last_record.max(applied);
        // The next record must follow the last segment's last record; start a new segment
        // when the applied seq is ahead of every record (or there is no segment yet).
        if infos.last().is_none_or(|s| s.last_seq != tail) {
            let path = dir.join(segment_name(tail + 1));
            create_segment(dir, &path, tail + 1)?;
            infos.push(SegInfo::empty(tail + 1));
        }
        let current_path = dir.join(segment_name(infos.last().expect("one segment").first_seq));
        let current = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&current_path)
            .map_err(io_err(&current_path))?;

        let records = tail - applied;
        let mut pending_paths: Vec<RelPath> = paths.keys().cloned().collect();
        pending_paths.sort();
        if records > 0 || truncated_bytes > 0 {
            tracing::info!(
                "journal {}: session {session:016x}, {records} changes ({pending_bytes} bytes) \
                 to replay after seq {applied}{}",
                dir.display(),
                if truncated_bytes > 0 {
                    format!(", {truncated_bytes} bytes of an uncommitted tail dropped")
                } else {
                    String::new()
                }
            );
        }

        let (durable_tx, _) = watch::channel(tail);
        let (applied_tx, _) = watch::channel(applied);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            session,
            opts,
            buf: Mutex::new(BufState {
                next_seq: tail + 1,
                data: Vec::new(),
                records: Vec::new(),
                closed: false,
            }),
            file: Mutex::new(FileState {
                segments: infos,
                current: Arc::new(current),
                written_seq: tail,
            }),
            sync: Mutex::new(SyncState { running: false }),
            sync_cv: Condvar::new(),
            durable_tx,
            applied_tx,
            persisted_applied: Mutex::new(applied),
            paths: Mutex::new(paths),
            failed: Mutex::new(None),
            bg: Mutex::new(BgState {
                dirty: false,
                stop: false,
            }),
            bg_cv: Condvar::new(),
            pending_cache: Mutex::new(None),
            counters: Counters::default(),
            waiters: std::sync::atomic::AtomicUsize::new(0),
        });
        let s = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("kmount-journal".to_string())
            .spawn(move || s.flusher())
            .map_err(io_err(dir))?;
        let journal = Journal {
            shared,
            flusher: Mutex::new(Some(flusher)),
            _lock: Some(lock),
        };
        let recovery = Recovery {
            session,
            new_session,
            applied,
            tail,
            records,
            bytes: pending_bytes,
            pending_paths,
            truncated_bytes,
        };
        Ok((journal, recovery))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The session id to send with every record (`Op::Journaled::session`).
    pub fn session(&self) -> u64 {
        self.shared.session
    }

    /// Appends `op` (applied as the agent's own user); see [`Journal::append_as`].
    pub fn append(&self, op: Op) -> Result<u64, JournalError> {
        self.append_as(None, op)
    }

    /// Appends `op`, to be applied as `caller`, and returns its seq. Buffered: durable after the
    /// next [`Journal::commit`], or by itself within [`JournalOptions::flush_interval`].
    pub fn append_as(&self, caller: Option<Caller>, op: Op) -> Result<u64, JournalError> {
        let sh = &self.shared;
        sh.check_failed()?;
        let payload = postcard::to_allocvec(&RecordBodyRef {
            caller: &caller,
            op: &op,
        })
        .map_err(JournalError::Encode)?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_RECORD_LEN)
            .ok_or(JournalError::TooLarge {
                len: payload.len(),
                max: MAX_RECORD_LEN,
            })?;
        let ph = payload_hash(&payload);
        let (seq, full) = {
            let mut b = lock(&sh.buf);
            if b.closed {
                return Err(JournalError::Closed);
            }
            if b.data.len() > MAX_BUFFERED {
                drop(b);
                return Err(sh.failure_or_backlog());
            }
            let seq = b.next_seq;
            b.next_seq += 1;
            let off = b.data.len();
            b.data.extend_from_slice(&record_header(len, seq, ph));
            b.data.extend_from_slice(&payload);
            b.records.push((seq, off));
            (seq, b.data.len() >= sh.opts.write_buffer)
        };
        {
            let mut paths = lock(&sh.paths);
            for p in op_paths(&op) {
                let e = paths.entry(p.clone()).or_insert(seq);
                *e = (*e).max(seq);
            }
        }
        sh.counters.appends.fetch_add(1, Ordering::Relaxed);
        if full {
            // Errors stay in the buffer and come back from the next commit.
            if let Err(e) = sh.write_out() {
                tracing::warn!("journal: writing buffered changes failed: {e}");
            }
        }
        sh.wake_flusher();
        Ok(seq)
    }

    /// Makes every record appended before this call durable (written and `fdatasync`ed).
    /// Group commit: a caller arriving while an fsync runs waits for the next one, which
    /// covers it, so concurrent committers share fsyncs.
    pub fn commit(&self) -> Result<(), JournalError> {
        self.shared.commit()
    }

    /// Highest seq known durable.
    pub fn durable(&self) -> u64 {
        *self.shared.durable_tx.borrow()
    }

    /// Records up to `seq` are applied remotely. Persisted lazily; fully applied segments are
    /// then deleted.
    pub fn mark_applied(&self, seq: u64) {
        let sh = &self.shared;
        let tail = lock(&sh.buf).next_seq - 1;
        if seq > tail {
            tracing::warn!("journal: seq {seq} reported applied, but the last record is {tail}");
        }
        let seq = seq.min(tail);
        let changed = sh.applied_tx.send_if_modified(|a| {
            if seq > *a {
                *a = seq;
                true
            } else {
                false
            }
        });
        if changed {
            sh.wake_flusher();
        }
    }

    /// Highest seq known applied remotely.
    pub fn applied(&self) -> u64 {
        *self.shared.applied_tx.borrow()
    }

    /// The last seq appended (0 for none ever).
    pub fn tail(&self) -> u64 {
        lock(&self.shared.buf).next_seq - 1
    }

    /// Records not yet applied, and their size in the log (envelopes included).
    pub fn pending(&self) -> Result<(u64, u64), JournalError> {
        let applied = self.applied();
        let tail = self.tail();
        Ok((tail - applied, self.shared.pending_bytes(applied)?))
    }

    /// Paths named by records not yet applied, sorted (for status and unmount messages).
    pub fn pending_paths(&self) -> Vec<RelPath> {
        self.paths_after(self.applied())
    }

    /// Whether `path` or a directory above it is named by a record after `seq` that is not
    /// applied yet: [`crate::local::PendingSet::covers`] of [`Journal::paths_after`], in a few
    /// lookups instead of a copy of every pending path (asked once per applied record, with
    /// tens of thousands pending).
    pub fn covers_after(&self, path: &RelPath, seq: u64) -> bool {
        let applied = seq.max(self.applied());
        let paths = lock(&self.shared.paths);
        let mut cur = path.clone();
        loop {
            if paths.get(&cur).is_some_and(|&s| s > applied) {
                return true;
            }
            match cur.split_last() {
                Some((parent, _)) => cur = parent,
                None => return false,
            }
        }
    }

    /// Paths named by records after `seq`, sorted.
    pub fn paths_after(&self, seq: u64) -> Vec<RelPath> {
        let applied = seq.max(self.applied());
        let mut v: Vec<RelPath> = lock(&self.shared.paths)
            .iter()
            .filter(|&(_, &seq)| seq > applied)
            .map(|(p, _)| p.clone())
            .collect();
        v.sort();
        v
    }

    /// Reads the durable records after `seq` that are not known applied, in order, from disk.
    /// Returns `None` when it has caught up with the durable seq; calling `next` again later
    /// continues with records made durable since.
    pub fn records_after(&self, seq: u64) -> RecordReader {
        RecordReader {
            shared: self.shared.clone(),
            next: seq.max(self.applied()) + 1,
            cur: None,
        }
    }

    /// The first seq whose record is still stored (applied or not): records from it on can be
    /// read again with [`Journal::records_from`].
    pub fn first_retained(&self) -> u64 {
        lock(&self.shared.file)
            .segments
            .first()
            .map_or(1, |s| s.first_seq)
    }

    /// Reads the durable records from `seq` on (from the first retained one when `seq` is
    /// older), applied ones included: to apply the session's changes again.
    pub fn records_from(&self, seq: u64) -> RecordReader {
        RecordReader {
            shared: self.shared.clone(),
            next: seq.max(self.first_retained()).max(1),
            cur: None,
        }
    }

    /// Declares the records after `seq` (down to the first one still stored) not applied any
    /// more: the target lost them (a replaced pod), so they are sent again and count as
    /// pending meanwhile (their paths too). Returns the seq the applied one now is.
    pub fn rewind_applied(&self, seq: u64) -> Result<u64, JournalError> {
        let sh = &self.shared;
        let applied = self.applied();
        let to = seq
            .max(self.first_retained().saturating_sub(1))
            .min(applied);
        if to == applied {
            return Ok(applied);
        }
        let mut found: Vec<(RelPath, u64)> = Vec::new();
        for r in self.records_from(to + 1) {
            let r = r?;
            if r.seq > applied {
                break;
            }
            for p in op_paths(&r.op) {
                found.push((p.clone(), r.seq));
            }
        }
        {
            let mut paths = lock(&sh.paths);
            for (p, seq) in found {
                let e = paths.entry(p).or_insert(seq);
                *e = (*e).max(seq);
            }
        }
        // Durably first: a restart during the replay must send them again too.
        let mut persisted = lock(&sh.persisted_applied);
        write_durably(
            &sh.dir,
            "applied",
            &encode_state(&APPLIED_MAGIC, &[sh.session, to]),
        )
        .map_err(io_err(&sh.dir.join("applied")))?;
        *persisted = to;
        sh.applied_tx.send_replace(to);
        *lock(&sh.pending_cache) = None;
        Ok(to)
    }

    /// Waits until every record up to `seq` is applied remotely. Fails when the journal closes
    /// first.
    pub async fn wait_applied(&self, seq: u64) -> Result<(), JournalError> {
        let _waiting = self.waiting();
        let mut rx = self.shared.applied_tx.subscribe();
        let closed = self.watch_closed();
        tokio::select! {
            r = rx.wait_for(|&a| a >= seq) => r.map(|_| ()).map_err(|_| JournalError::Closed),
            () = closed => {
                if *self.shared.applied_tx.borrow() >= seq {
                    Ok(())
                } else {
                    Err(JournalError::Closed)
                }
            }
        }
    }

    async fn watch_closed(&self) {
        let mut rx = self.shared.durable_tx.subscribe();
        while !lock(&self.shared.buf).closed {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether someone waits for records to be applied (`fsync`, `kmount wait`, unmount).
    /// Counts as someone waiting for records to be applied ([`Journal::has_waiters`]) until
    /// dropped: the sender then holds nothing back.
    pub fn waiting(&self) -> Waiting<'_> {
        self.shared
            .waiters
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Waiting(&self.shared.waiters)
    }

    pub fn has_waiters(&self) -> bool {
        self.shared
            .waiters
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
    }

    /// The applied seq, as it changes.
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }

    /// The durable seq, as it changes (the sender waits on it for new records).
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.shared.durable_tx.subscribe()
    }

    pub fn stats(&self) -> JournalStats {
        let c = &self.shared.counters;
        JournalStats {
            appends: c.appends.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            segments: lock(&self.shared.file).segments.len() as u64,
        }
    }

    /// Stops appends, commits what was appended, persists the applied seq and deletes applied
    /// segments. Later appends fail with [`JournalError::Closed`]; reading still works.
    pub fn close(&self) -> Result<(), JournalError> {
        lock(&self.shared.buf).closed = true;
        {
            let mut bg = lock(&self.shared.bg);
            bg.stop = true;
        }
        self.shared.bg_cv.notify_all();
        if let Some(t) = lock(&self.flusher).take() {
            let _ = t.join();
        }
        let r = self.shared.commit();
        let p = self.shared.persist_applied();
        // Wakes `wait_applied` callers so they see the journal closed.
        self.shared.durable_tx.send_modify(|_| {});
        r.and(p)
    }

    /// Test hook: simulates a crash. Nothing more is written; records still in the buffer are
    /// lost (exactly as when the process dies) and the lock is released.
    #[cfg(test)]
    fn crash(mut self) {
        lock(&self.shared.buf).closed = true;
        lock(&self.shared.bg).stop = true;
        self.shared.bg_cv.notify_all();
        if let Some(t) = lock(&self.flusher).take() {
            let _ = t.join();
        }
        lock(&self.shared.buf).data.clear();
        self._lock = None;
        // A dead process runs no destructors.
        std::mem::forget(self);
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if lock(&self.flusher).is_none() && lock(&self.shared.buf).closed {
            return;
        }
        if let Err(e) = self.close() {
            tracing::error!("journal {}: closing failed: {e}", self.shared.dir.display());
        }
    }
}

impl Shared {
    fn check_failed(&self) -> Result<(), JournalError> {
        match &*lock(&self.failed) {
            Some(m) => Err(JournalError::Failed(m.clone())),
            None => Ok(()),
        }
    }

    fn failure_or_backlog(&self) -> JournalError {
        match &*lock(&self.failed) {
            Some(m) => JournalError::Failed(m.clone()),
            None => JournalError::Failed(format!(
                "more than {} MiB of changes could not be written to {}",
                MAX_BUFFERED >> 20,
                self.dir.display()
            )),
        }
    }

    fn fail(&self, what: String) -> JournalError {
        tracing::error!("journal {}: {what}", self.dir.display());
        let mut f = lock(&self.failed);
        if f.is_none() {
            *f = Some(what.clone());
        }
        JournalError::Failed(what)
    }

    fn wake_flusher(&self) {
        let mut bg = lock(&self.bg);
        if !bg.dirty {
            bg.dirty = true;
            self.bg_cv.notify_all();
        }
    }

    fn seg_path(&self, first_seq: u64) -> PathBuf {
        self.dir.join(segment_name(first_seq))
    }

    /// Writes the buffered records to the current segment (starting a new segment first when
    /// it is full). Returns the last seq written and the file holding it, which the caller may
    /// fsync: an earlier segment is fsynced when the next one is started.
    fn write_out(&self) -> Result<(u64, Arc<File>), JournalError> {
        let mut fs = lock(&self.file);
        let (chunk, recs) = {
            let mut b = lock(&self.buf);
            (std::mem::take(&mut b.data), std::mem::take(&mut b.records))
        };
        let Some(&(first, _)) = recs.first() else {
            return Ok((fs.written_seq, fs.current.clone()));
        };
        let put_back = |chunk: Vec<u8>, recs: Vec<(u64, usize)>| {
            let mut b = lock(&self.buf);
            let shift = chunk.len();
            let mut data = chunk;
            data.extend_from_slice(&b.data);
            let mut records = recs;
            records.extend(b.records.iter().map(|&(s, o)| (s, o + shift)));
            b.data = data;
            b.records = records;
        };
        let cur = fs.segments.last().expect("one segment");
        if cur.len >= self.opts.segment_bytes
            && cur.last_seq >= cur.first_seq
            && let Err(e) = self.rotate(&mut fs, first)
        {
            put_back(chunk, recs);
            return Err(e);
        }
        let at = fs.segments.last().expect("one segment").len;
        let path = self.seg_path(fs.segments.last().expect("one segment").first_seq);
        if let Err(e) = fs.current.write_all_at(&chunk, at) {
            // Nothing after `at` counts; cut any partial write so the next one lands there.
            let _ = fs.current.set_len(at);
            put_back(chunk, recs);
            return Err(JournalError::Io { path, source: e });
        }
        let seg = fs.segments.last_mut().expect("one segment");
        for (i, &(seq, off)) in recs.iter().enumerate() {
            let end = recs.get(i + 1).map_or(chunk.len(), |&(_, o)| o);
            seg.note_record(seq, at + off as u64, (end - off) as u64);
        }
        let last = recs.last().expect("non-empty").0;
        fs.written_seq = last;
        self.counters
            .bytes_written
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok((last, fs.current.clone()))
    }

    /// Finishes the current segment (fsync) and starts `seg-<first_seq>.log`.
    fn rotate(&self, fs: &mut FileState, first_seq: u64) -> Result<(), JournalError> {
        if let Err(e) = fs.current.sync_data() {
            return Err(self.fail(format!("fsync of a journal segment failed: {e}")));
        }
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        let path = self.seg_path(first_seq);
        create_segment(&self.dir, &path, first_seq)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        fs.current = Arc::new(file);
        fs.segments.push(SegInfo::empty(first_seq));
        tracing::debug!("journal: new segment {}", path.display());
        Ok(())
    }

    fn commit(&self) -> Result<(), JournalError> {
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.check_failed()?;
        let target = lock(&self.buf).next_seq - 1;
        let mut s = lock(&self.sync);
        loop {
            if *self.durable_tx.borrow() >= target {
                return Ok(());
            }
            if s.running {
                s = self.sync_cv.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.running = true;
            drop(s);
            let result = self.write_out().and_then(|(written, file)| {
                if written <= *self.durable_tx.borrow() {
                    return Ok(written);
                }
                match file.sync_data() {
                    Ok(()) => {
                        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                        Ok(written)
                    }
                    Err(e) => Err(self.fail(format!("fsync of a journal segment failed: {e}"))),
                }
            });
            s = lock(&self.sync);
            s.running = false;
            self.sync_cv.notify_all();
            match result {
                Ok(written) => {
                    self.durable_tx.send_if_modified(|d| {
                        if written > *d {
                            *d = written;
                            true
                        } else {
                            false
                        }
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the applied seq to the `applied` file when it moved, then deletes the segments
    /// it covers (never the last).
    fn persist_applied(&self) -> Result<(), JournalError> {
        let applied = *self.applied_tx.borrow();
        let mut persisted = lock(&self.persisted_applied);
        if applied <= *persisted {
            return Ok(());
        }
        write_durably(
            &self.dir,
            "applied",
            &encode_state(&APPLIED_MAGIC, &[self.session, applied]),
        )
        .map_err(io_err(&self.dir.join("applied")))?;
        *persisted = applied;
        drop(persisted);
        let doomed: Vec<u64> = {
            let mut fs = lock(&self.file);
            let n = fs.segments.len();
            let sizes: Vec<u64> = fs.segments[..n - 1]
                .iter()
                .take_while(|s| s.last_seq <= applied)
                .map(|s| s.len)
                .collect();
            let k = beyond_kept(&sizes, self.opts.keep_applied);
            fs.segments.drain(..k).map(|s| s.first_seq).collect()
        };
        for first in doomed {
            let path = self.seg_path(first);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!("journal: cannot delete {}: {e}", path.display());
            }
        }
        lock(&self.paths).retain(|_, seq| *seq > applied);
        Ok(())
    }

    /// The background flusher: commits appended records and persists the applied seq, each at
    /// most [`JournalOptions::flush_interval`] after it changed.
    fn flusher(self: Arc<Self>) {
        loop {
            let mut bg = lock(&self.bg);
            while !bg.dirty && !bg.stop {
                bg = self.bg_cv.wait(bg).unwrap_or_else(|p| p.into_inner());
            }
            if bg.stop {
                return;
            }
            let (mut bg, _) = self
                .bg_cv
                .wait_timeout_while(bg, self.opts.flush_interval, |b| !b.stop)
                .unwrap_or_else(|p| p.into_inner());
            if bg.stop {
                return;
            }
            bg.dirty = false;
            drop(bg);
            if lock(&self.buf).next_seq - 1 > *self.durable_tx.borrow()
                && let Err(e) = self.commit()
            {
                tracing::warn!("journal: background commit failed: {e}");
            }
            if let Err(e) = self.persist_applied() {
                tracing::warn!("journal: saving the applied seq failed: {e}");
            }
        }
    }

    /// The segment holding `seq` and a reader positioned on that record; for the first stored
    /// record when `seq` is before it; `None` when `seq` is after every written record.
    fn locate(&self, seq: u64) -> Result<Option<(u64, SegmentReader)>, JournalError> {
        self.locate_retrying(seq, 3)
    }

    fn locate_retrying(
        &self,
        seq: u64,
        retries: u32,
    ) -> Result<Option<(u64, SegmentReader)>, JournalError> {
        let (info, file_len) = {
            let fs = lock(&self.file);
            let first = fs.segments.first().expect("one segment").first_seq;
            let seq = seq.max(first);
            let Some(info) = fs
                .segments
                .iter()
                .find(|s| s.first_seq <= seq && seq <= s.last_seq)
            else {
                return Ok(None);
            };
            (info.clone(), info.len)
        };
        let seq = seq.max(info.first_seq);
        let path = self.seg_path(info.first_seq);
        let (at_seq, offset) = info.seek_point(seq);
        let file = match File::open(&path) {
            Ok(f) => f,
            // Deleted since the list was read: all its records were applied meanwhile, and the
            // list no longer has it.
            Err(e) if e.kind() == io::ErrorKind::NotFound && retries > 0 => {
                return self.locate_retrying(seq, retries - 1);
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut r = SegmentReader::new(file, offset, file_len).map_err(io_err(&path))?;
        let mut cur = at_seq;
        while cur < seq {
            match r.skip().map_err(io_err(&path))? {
                Some(s) => cur = s + 1,
                None => return Ok(None),
            }
        }
        Ok(Some((info.first_seq, r)))
    }

    /// Log bytes of the records after `applied`: from the position of record `applied + 1`
    /// (found once per applied seq; records never move) to the end, plus the buffer.
    fn pending_bytes(&self, applied: u64) -> Result<u64, JournalError> {
        let cached = *lock(&self.pending_cache);
        let pos = match cached {
            Some((a, first, offset)) if a == applied => Some((first, offset)),
            _ => {
                let pos = self
                    .locate(applied + 1)?
                    .map(|(first, r)| (first, r.offset));
                if let Some((first, offset)) = pos {
                    *lock(&self.pending_cache) = Some((applied, first, offset));
                }
                pos
            }
        };
        let written = match pos {
            None => 0,
            Some((first, offset)) => lock(&self.file)
                .segments
                .iter()
                .filter(|s| s.first_seq >= first)
                .map(|s| {
                    if s.first_seq == first {
                        s.len - offset
                    } else {
                        s.len - SEG_HEADER_LEN
                    }
                })
                .sum(),
        };
        Ok(written + lock(&self.buf).data.len() as u64)
    }
}

/// Lists `seg-*.log` files, sorted by first seq.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        if let Some(first) = e.file_name().to_str().and_then(parse_segment_name) {
            if first == 0 {
                continue;
            }
            v.push((first, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

fn read_state(
    dir: &Path,
    name: &str,
    magic: &[u8; 8],
    count: usize,
) -> Result<Option<Vec<u64>>, JournalError> {
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(b) => {
            let v = decode_state(magic, &b, count);
            if v.is_none() {
                tracing::warn!("journal: {} is damaged; ignoring it", path.display());
            }
            Ok(v)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JournalError::Io { path, source: e }),
    }
}

fn create_segment(dir: &Path, path: &Path, first_seq: u64) -> Result<(), JournalError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(&segment_header(first_seq))
        .map_err(io_err(path))?;
    f.sync_data().map_err(io_err(path))?;
    sync_dir(dir).map_err(io_err(dir))
}

/// Reads one segment at open. A problem in the last segment is a torn tail (cut off); in any
/// other segment, which was fsynced before the next one was started, it is damage.
fn scan_segment(
    dir: &Path,
    path: &Path,
    first: u64,
    is_last: bool,
    applied: u64,
    paths: &mut HashMap<RelPath, u64>,
    pending_bytes: &mut u64,
) -> Result<Scan, JournalError> {
    let corrupt = |offset: u64, reason: String| JournalError::Corrupt {
        dir: dir.to_path_buf(),
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(is_last)
        .open(path)
        .map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut header = [0u8; SEG_HEADER_LEN as usize];
    let header_ok = file_len >= SEG_HEADER_LEN
        && file.read_exact_at(&mut header, 0).is_ok()
        && header == segment_header(first);
    if !header_ok {
        let torn_creation = file_len < SEG_HEADER_LEN || header.iter().all(|&b| b == 0);
        if is_last && torn_creation {
            tracing::warn!(
                "journal: {} was being created at a crash; starting it again",
                path.display()
            );
            file.set_len(0).map_err(io_err(path))?;
            file.write_all_at(&segment_header(first), 0)
                .map_err(io_err(path))?;
            file.sync_data().map_err(io_err(path))?;
            return Ok(Scan {
                info: SegInfo::empty(first),
                truncated: file_len,
            });
        }
        return Err(corrupt(0, "bad segment header".to_string()));
    }
    let mut info = SegInfo::empty(first);
    let mut r = SegmentReader::new(
        file.try_clone().map_err(io_err(path))?,
        SEG_HEADER_LEN,
        file_len,
    )
    .map_err(io_err(path))?;
    let mut expected = first;
    loop {
        let offset = r.offset;
        let bad = match r.next().map_err(io_err(path))? {
            Read1::End => break,
            Read1::Bad(why) => why.to_string(),
            Read1::Record(rec) if rec.seq != expected => {
                format!("seq {} where {expected} was expected", rec.seq)
            }
            Read1::Record(rec) => {
                if rec.seq > applied {
                    let body: RecordBody = kmount_proto::decode(&rec.payload).map_err(|e| {
                        JournalError::Undecodable {
                            dir: dir.to_path_buf(),
                            path: path.to_path_buf(),
                            seq: rec.seq,
                            reason: e.to_string(),
                        }
                    })?;
                    for p in op_paths(&body.op) {
                        let e = paths.entry(p.clone()).or_insert(rec.seq);
                        *e = (*e).max(rec.seq);
                    }
                    *pending_bytes += rec.total_len;
                }
                info.note_record(rec.seq, offset, rec.total_len);
                expected += 1;
                continue;
            }
        };
        if !is_last {
            return Err(corrupt(offset, bad));
        }
        let dropped = file_len - offset;
        tracing::warn!(
            "journal: {}: {bad} at byte {offset}; dropping the last {dropped} bytes (changes \
             never committed)",
            path.display()
        );
        file.set_len(offset).map_err(io_err(path))?;
        file.sync_data().map_err(io_err(path))?;
        return Ok(Scan {
            info,
            truncated: dropped,
        });
    }
    Ok(Scan { info, truncated: 0 })
}

/// Of fully applied segments of these sizes (oldest first), how many to delete so that the
/// newest ones kept add up to at most `keep` bytes.
fn beyond_kept(sizes: &[u64], keep: u64) -> usize {
    let mut kept = 0u64;
    for (i, len) in sizes.iter().enumerate().rev() {
        kept = kept.saturating_add(*len);
        if kept > keep {
            return i + 1;
        }
    }
    0
}

/// Reads durable records from disk; see [`Journal::records_after`].
pub struct RecordReader {
    shared: Arc<Shared>,
    /// Seq of the next record to return.
    next: u64,
    /// The segment being read (its first seq) and the reader on it.
    cur: Option<(u64, SegmentReader)>,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordReader")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl RecordReader {
    /// Seq of the record the next call returns (when there is one).
    pub fn position(&self) -> u64 {
        self.next
    }

    fn read_next(&mut self) -> Result<Option<Record>, JournalError> {
        let durable = *self.shared.durable_tx.borrow();
        let mut relocated = false;
        loop {
            if self.next > durable {
                return Ok(None);
            }
            if self.cur.is_none() {
                match self.shared.locate(self.next)? {
                    Some(found) => {
                        self.cur = Some(found);
                        relocated = true;
                    }
                    None => return Ok(None),
                }
            }
            let (first, r) = self.cur.as_mut().expect("set above");
            let path = self.shared.seg_path(*first);
            let offset = r.offset;
            match r.next().map_err(io_err(&path))? {
                Read1::Record(rec) if rec.seq < self.next => continue,
                Read1::Record(rec) => {
                    let body: RecordBody = kmount_proto::decode(&rec.payload).map_err(|e| {
                        JournalError::Undecodable {
                            dir: self.shared.dir.clone(),
                            path: path.clone(),
                            seq: rec.seq,
                            reason: e.to_string(),
                        }
                    })?;
                    self.next = rec.seq + 1;
                    return Ok(Some(Record {
                        seq: rec.seq,
                        caller: body.caller,
                        op: body.op,
                    }));
                }
                Read1::End => {
                    // The end of this segment as it was when located: the record is further on
                    // (the segment grew) or in the next segment; locate it again, once.
                    self.cur = None;
                    if relocated {
                        return Ok(None);
                    }
                }
                Read1::Bad(why) => {
                    self.cur = None;
                    return Err(JournalError::Corrupt {
                        dir: self.shared.dir.clone(),
                        path,
                        offset,
                        reason: why.to_string(),
                    });
                }
            }
        }
    }
}

impl Iterator for RecordReader {
    type Item = Result<Record, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.read_next().transpose()
    }
}
