//! Open files and directory streams, by the handle number given to the mount.
//!
//! Invariants: handle numbers start at 1 and are never reused within a session; a handle that
//! is closed while a request still uses it stays open until that request finishes (requests
//! hold an `Arc`), so a descriptor number is never reused under a running operation.

use std::collections::HashMap;
use std::ffi::CStr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kmount_proto::RelPath;

use crate::sys::{Errno, SysResult};
use crate::walk::WalkHandle;

/// One entry as `readdir` returned it.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub name: Vec<u8>,
    /// `d_type` (`DT_DIR`, ...; `DT_UNKNOWN` when the filesystem does not say).
    pub kind: u8,
}

/// A `DIR*` stream with one entry of look-ahead (so a full batch can still report `eof`).
#[derive(Debug)]
pub struct DirStream {
    dir: NonNull<libc::DIR>,
    pending: Option<RawEntry>,
}

// SAFETY: a DIR* may be used from any thread as long as only one uses it at a time, which the
// Mutex around every DirStream guarantees.
unsafe impl Send for DirStream {}

impl DirStream {
    /// Takes over `fd` (a directory opened for reading).
    pub fn new(fd: OwnedFd) -> SysResult<DirStream> {
        let raw = fd.into_raw_fd();
        // SAFETY: raw is an open directory descriptor; on success the DIR owns it.
        match NonNull::new(unsafe { libc::fdopendir(raw) }) {
            Some(dir) => Ok(DirStream { dir, pending: None }),
            None => {
                let e = Errno::last();
                // SAFETY: fdopendir failed, so raw is still ours to close.
                unsafe { libc::close(raw) };
                Err(e)
            }
        }
    }

    /// The next entry other than `.` and `..`; `None` at the end.
    pub fn next_entry(&mut self) -> SysResult<Option<RawEntry>> {
        if let Some(e) = self.pending.take() {
            return Ok(Some(e));
        }
        loop {
            // SAFETY: errno is thread-local; resetting it tells end-of-stream from failure.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: self.dir is a live stream, used by one thread at a time (&mut self).
            let ent = unsafe { libc::readdir64(self.dir.as_ptr()) };
            if ent.is_null() {
                let e = Errno::last();
                return if e.0 == 0 { Ok(None) } else { Err(e) };
            }
            // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated; it stays
            // valid until the next readdir on this stream, and we copy it before that.
            let (name, kind) = unsafe { (CStr::from_ptr((*ent).d_name.as_ptr()), (*ent).d_type) };
            let name = name.to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            return Ok(Some(RawEntry {
                name: name.to_vec(),
                kind,
            }));
        }
    }

    /// Puts one entry back, to be returned by the next [`DirStream::next_entry`].
    pub fn push_back(&mut self, e: RawEntry) {
        debug_assert!(self.pending.is_none());
        self.pending = Some(e);
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: self.dir is a live stream.
        unsafe { libc::dirfd(self.dir.as_ptr()) }
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: the stream is live and closed exactly once, here.
        unsafe { libc::closedir(self.dir.as_ptr()) };
    }
}

#[derive(Debug)]
pub enum Handle {
    File(OwnedFd),
    Dir {
        /// The stream's descriptor, for fstat/fsync/xattrs without taking the lock.
        fd: RawFd,
        stream: Mutex<DirStream>,
        /// The directory's path when it was opened (to judge its entries by the ignore rules).
        path: RelPath,
    },
    /// A tree walk ([`crate::walk`]); it has no descriptor of its own (`EBADF` for file ops).
    Walk(WalkHandle),
}

impl Handle {
    pub fn dir(stream: DirStream, path: RelPath) -> Handle {
        Handle::Dir {
            fd: stream.fd(),
            stream: Mutex::new(stream),
            path,
        }
    }

    pub fn fd(&self) -> RawFd {
        match self {
            Handle::File(f) => f.as_raw_fd(),
            Handle::Dir { fd, .. } => *fd,
            Handle::Walk(_) => -1,
        }
    }

    /// The directory stream and the directory's path; `ENOTDIR` for a file handle.
    pub fn stream(&self) -> SysResult<(MutexGuard<'_, DirStream>, &RelPath)> {
        match self {
            Handle::File(_) | Handle::Walk(_) => Err(Errno(libc::ENOTDIR)),
            // A panic while listing leaves the stream usable: it only holds a position.
            Handle::Dir { stream, path, .. } => {
                Ok((stream.lock().unwrap_or_else(|p| p.into_inner()), path))
            }
        }
    }
}

#[derive(Debug)]
pub struct Handles {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<Handle>>>,
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            next: AtomicU64::new(1),
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl Handles {
    fn map(&self) -> MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        // The map is consistent after any panic (single inserts and removes).
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, h: Handle) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(id, Arc::new(h));
        id
    }

    /// `EBADF` for a handle that was never given out or is closed.
    pub fn get(&self, id: u64) -> SysResult<Arc<Handle>> {
        self.map().get(&id).cloned().ok_or(Errno(libc::EBADF))
    }

    /// Takes a handle out of the table; it closes when the last user drops it.
    pub fn remove(&self, id: u64) -> SysResult<Arc<Handle>> {
        self.map().remove(&id).ok_or(Errno(libc::EBADF))
    }

    /// How many handles are open.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.map().len()
    }
}
