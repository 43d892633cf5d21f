//! The journal lane's bookkeeping: `Op::Journaled { session, seq, op }` is applied at most once
//! per (session, seq), strictly in seq order, and `Op::AppliedSeq` says how far a session got.
//!
//! Invariants:
//! - [`crate::serve`] runs every journaled request (and `AppliedSeq`) on one thread, in the
//!   order they arrived; [`Journal::apply`] also serializes them with a lock.
//! - `applied` is the highest seq applied; a seq at or below it answers `Ok` without doing
//!   anything, a seq beyond `applied + 1` is a gap (`EPROTO`).
//! - A failed seq N blocks its session: later seqs answer `ECANCELED` until N is sent again.
//! - `applied` is persisted after every applied record, before its answer (and again lazily,
//!   [`PERSIST_EVERY`], after a failed write, and at exit) to
//!   `<state dir>/kmount-agent-<uid>/sessions/<session>` (written beside, then renamed over),
//!   where the state dir is the first usable of `$TMPDIR`, `/tmp`, `/dev/shm`, `/var/tmp`.
//!   A directory we do not own, or that others may write, is never used.
//! - Applying a journaled change that is already in place is success: replaying a record whose
//!   effect survived while its seq was not yet persisted must not block the session. So an
//!   unlink/rmdir of a missing name, a rename whose source is gone, a mkdir/mknod/symlink/link
//!   whose result already stands there answer success.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kmount_proto::{Done, Op, RelPath, WireError};

use crate::ops::{self, Agent, attr};
use crate::sys::{self, Errno, cstring, cvt};

/// The persisted `applied` lags memory by at most this much (plus the time of one operation).
pub const PERSIST_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct Session {
    applied: u64,
    /// The seq that failed and blocks the session.
    blocked: Option<u64>,
    persisted: u64,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<u64, Session>,
    last_persist: Option<Instant>,
    /// Some session has `applied != persisted`.
    dirty: bool,
}

/// Where session files go; `None` inside when no candidate directory is usable.
#[derive(Debug)]
struct Store {
    dir: PathBuf,
    fd: OwnedFd,
}

#[derive(Debug)]
pub struct Journal {
    state: Mutex<State>,
    store: OnceLock<Option<Store>>,
    /// Candidate base directories, first usable wins.
    bases: Vec<PathBuf>,
}

impl Default for Journal {
    fn default() -> Self {
        let mut bases = Vec::new();
        if let Some(t) = std::env::var_os("TMPDIR").filter(|t| Path::new(t).is_absolute()) {
            bases.push(PathBuf::from(t));
        }
        bases.extend(["/tmp", "/dev/shm", "/var/tmp"].map(PathBuf::from));
        Journal::with_bases(bases)
    }
}

impl Journal {
    pub fn with_bases(bases: Vec<PathBuf>) -> Journal {
        Journal {
            state: Mutex::new(State::default()),
            store: OnceLock::new(),
            bases,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self) -> Option<&Store> {
        self.store
            .get_or_init(|| {
                let found = self.bases.iter().find_map(|b| open_store(b));
                if found.is_none() {
                    eprintln!(
                        "kmount-agent: no private state directory could be made in {}; the \
                         journal position is kept in memory only (a restarted agent replays \
                         from the mount's last acknowledged change)",
                        self.bases
                            .iter()
                            .map(|b| b.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                found
            })
            .as_ref()
    }

    /// The directory session files are kept in, if any.
    #[cfg(test)]
    pub fn store_dir(&self) -> Option<PathBuf> {
        self.store().map(|s| s.dir.clone())
    }

    fn session<'a>(&self, st: &'a mut State, session: u64) -> &'a mut Session {
        st.sessions.entry(session).or_insert_with(|| {
            let applied = self.store().and_then(|s| load(s, session)).unwrap_or(0);
            Session {
                applied,
                blocked: None,
                persisted: applied,
            }
        })
    }

    /// Loads `session`'s persisted position (as the agent itself, before a request runs as
    /// its caller: the state directory is the agent's).
    pub fn prepare(&self, session: u64) {
        let mut st = self.state();
        self.session(&mut st, session);
    }

    /// `Op::AppliedSeq`.
    pub fn applied(&self, session: u64) -> u64 {
        let mut st = self.state();
        self.session(&mut st, session).applied
    }

    /// `Op::Journaled`: runs `op` through `run` when `seq` is the next one.
    pub fn apply(
        &self,
        a: &Agent,
        session: u64,
        seq: u64,
        op: Op,
        run: impl FnOnce(Op) -> Result<Done, WireError>,
    ) -> Result<Done, WireError> {
        if matches!(
            op,
            Op::Journaled { .. }
                | Op::AppliedSeq { .. }
                | Op::Watch { .. }
                | Op::WalkOpen { .. }
                | Op::WalkNext { .. }
        ) {
            return Err(WireError::new(
                libc::EINVAL,
                "this operation cannot be journaled",
            ));
        }
        let mut st = self.state();
        let s = self.session(&mut st, session);
        if seq <= s.applied {
            return Ok(Done::Ok);
        }
        if let Some(n) = s.blocked
            && seq > n
        {
            return Err(WireError::new(
                libc::ECANCELED,
                format!("not applied: seq {n} failed first"),
            ));
        }
        if seq != s.applied + 1 {
            return Err(WireError::new(
                libc::EPROTO,
                format!(
                    "journal of session {session:016x} skipped ahead: got seq {seq}, expected seq {}",
                    s.applied + 1
                ),
            ));
        }
        // Only namespace operations can find their effect already in place; they are small.
        let probe = matches!(
            op,
            Op::Unlink { .. }
                | Op::Rmdir { .. }
                | Op::Rename { .. }
                | Op::Mkdir { .. }
                | Op::Mknod { .. }
                | Op::Symlink { .. }
                | Op::Link { .. }
        )
        .then(|| op.clone());
        let result = match (run(op), probe) {
            (Err(e), Some(probe)) => already_done(a, &probe, e.errno).ok_or(e),
            (result, _) => result,
        };
        let s = self.session(&mut st, session);
        match &result {
            Ok(_) => {
                s.applied = seq;
                s.blocked = None;
                // Saved before the answer goes out: an agent killed after answering must not
                // apply this record again when the mount sends it again with the ones after
                // it (a rename replayed after the create that followed it would move the new
                // file). Only the record being applied when it died can be in doubt, and its
                // replay finds its effect in place ([`already_done`]). Written, not fsynced:
                // the page cache outlives the process; a crash of the whole machine loses the
                // session, which the mount then applies again from its start.
                if let Some(store) = self.store() {
                    match save(store, session, seq) {
                        Ok(()) => s.persisted = seq,
                        Err(e) => {
                            st.dirty = true;
                            eprintln!(
                                "kmount-agent: cannot save the journal position in {}: {e}",
                                store.dir.display()
                            );
                        }
                    }
                } else {
                    st.dirty = true;
                }
            }
            Err(_) => s.blocked = Some(seq),
        }
        result
    }

    /// When the lane should next call [`Journal::persist_due`]; `None` when nothing waits.
    pub fn persist_wait(&self) -> Option<Duration> {
        let st = self.state();
        if !st.dirty {
            return None;
        }
        let due = st.last_persist.map_or(Duration::ZERO, |t| {
            (t + PERSIST_EVERY).saturating_duration_since(Instant::now())
        });
        Some(due)
    }

    /// Persists when something changed and the last write is [`PERSIST_EVERY`] old.
    pub fn persist_due(&self) {
        if self.persist_wait() == Some(Duration::ZERO) {
            self.persist();
        }
    }

    /// Writes every session whose `applied` moved since it was last written.
    pub fn persist(&self) {
        let mut st = self.state();
        if !st.dirty {
            return;
        }
        st.dirty = false;
        st.last_persist = Some(Instant::now());
        let Some(store) = self.store() else { return };
        for (id, s) in st.sessions.iter_mut() {
            if s.applied != s.persisted {
                match save(store, *id, s.applied) {
                    Ok(()) => s.persisted = s.applied,
                    Err(e) => eprintln!(
                        "kmount-agent: cannot save the journal position in {}: {e}",
                        store.dir.display()
                    ),
                }
            }
        }
    }
}

/// The result of a journaled `op` that failed with `errno` because its effect is already in
/// place, if it is.
fn already_done(a: &Agent, op: &Op, errno: i32) -> Option<Done> {
    let lstat = |p: &RelPath| {
        let loc = a.root.locate(p).ok()?;
        sys::fstatat(loc.dirfd(), loc.name(), libc::AT_SYMLINK_NOFOLLOW).ok()
    };
    // No such name (or no such parent directory).
    let gone = |p: &RelPath| {
        let r = a
            .root
            .locate(p)
            .and_then(|loc| sys::fstatat(loc.dirfd(), loc.name(), libc::AT_SYMLINK_NOFOLLOW));
        matches!(r, Err(Errno(libc::ENOENT)))
    };
    match (op, errno) {
        (Op::Unlink { path } | Op::Rmdir { path }, libc::ENOENT) if gone(path) => Some(Done::Ok),
        (Op::Rename { from, flags, .. }, libc::ENOENT)
            if flags & libc::RENAME_EXCHANGE == 0 && gone(from) =>
        {
            Some(Done::Ok)
        }
        (Op::Mkdir { path, .. }, libc::EEXIST) => {
            let st = lstat(path)?;
            (st.st_mode & libc::S_IFMT == libc::S_IFDIR).then(|| Done::Attr(attr(&st)))
        }
        (Op::Mknod { path, mode, .. }, libc::EEXIST) => {
            let st = lstat(path)?;
            (st.st_mode & libc::S_IFMT == mode & libc::S_IFMT).then(|| Done::Attr(attr(&st)))
        }
        (Op::Symlink { path, target }, libc::EEXIST) => {
            let st = lstat(path)?;
            let loc = a.root.locate(path).ok()?;
            let now = sys::readlinkat(loc.dirfd(), loc.name()).ok()?;
            (&now == target).then(|| Done::Attr(attr(&st)))
        }
        (Op::Link { from, to }, libc::EEXIST) => {
            let (f, t) = (lstat(from)?, lstat(to)?);
            ((f.st_dev, f.st_ino) == (t.st_dev, t.st_ino)).then(|| Done::Attr(attr(&t)))
        }
        _ => None,
    }
}

/// `<base>/kmount-agent-<uid>/sessions`, made private, or `None` when `base` does not allow it.
fn open_store(base: &Path) -> Option<Store> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let base_c = CString::new(base.as_os_str().as_bytes()).ok()?;
    let base_fd = sys::openat(
        libc::AT_FDCWD,
        &base_c,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )
    .ok()?;
    let own = private_dir(base_fd.as_raw_fd(), &format!("kmount-agent-{uid}"), uid)?;
    let sessions = private_dir(own.as_raw_fd(), "sessions", uid)?;
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::faccessat(sessions.as_raw_fd(), c".".as_ptr(), libc::W_OK, 0) } != 0 {
        return None;
    }
    Some(Store {
        dir: base.join(format!("kmount-agent-{uid}")).join("sessions"),
        fd: sessions,
    })
}

/// Makes (or opens) the directory `name` in `dir`, owned by `uid` and closed to others.
fn private_dir(dir: libc::c_int, name: &str, uid: u32) -> Option<OwnedFd> {
    let c = cstring(name.as_bytes()).ok()?;
    // SAFETY: name is NUL-terminated.
    match cvt(unsafe { libc::mkdirat(dir, c.as_ptr(), 0o700) }) {
        Ok(_) | Err(Errno(libc::EEXIST)) => {}
        Err(_) => return None,
    }
    let fd = sys::openat(
        dir,
        &c,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )
    .ok()?;
    let st = sys::fstat(fd.as_raw_fd()).ok()?;
    if st.st_uid != uid {
        return None; // someone else's: never trust it
    }
    if st.st_mode & 0o077 != 0 {
        // SAFETY: fd is open.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) }).ok()?;
    }
    Some(fd)
}

fn file_name(session: u64) -> CString {
    CString::new(format!("{session:016x}")).expect("hex digits contain no NUL")
}

fn load(store: &Store, session: u64) -> Option<u64> {
    let fd = sys::openat(
        store.fd.as_raw_fd(),
        &file_name(session),
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )
    .ok()?;
    let mut buf = [0u8; 32];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return None;
    }
    std::str::from_utf8(&buf[..n as usize])
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn save(store: &Store, session: u64, applied: u64) -> Result<(), Errno> {
    let name = file_name(session);
    let tmp = CString::new(format!(".{session:016x}.tmp")).expect("no NUL");
    let dir = store.fd.as_raw_fd();
    let fd = sys::openat(
        dir,
        &tmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0o600,
    )?;
    let text = format!("{applied}\n");
    // SAFETY: text is readable for its length.
    let n = cvt(unsafe { libc::write(fd.as_raw_fd(), text.as_ptr().cast(), text.len()) })?;
    if n as usize != text.len() {
        return Err(Errno(libc::EIO));
    }
    drop(fd);
    // SAFETY: both names are NUL-terminated.
    cvt(unsafe { libc::renameat(dir, tmp.as_ptr(), dir, name.as_ptr()) })?;
    Ok(())
}

/// `Op::Journaled` as [`ops::execute`] runs it.
pub fn journaled(a: &Agent, session: u64, seq: u64, op: Op) -> Result<Done, WireError> {
    a.journal
        .apply(a, session, seq, op, |op| ops::execute(a, op))
}
