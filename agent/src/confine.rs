//! Confinement: every path the agent touches is resolved beneath the served root without
//! following a single symlink, and every operation then works on (parent directory fd, final
//! name) with no-follow `*at` calls.
//!
//! Invariants:
//! - The root is opened once; all resolution starts from that descriptor.
//! - Intermediate components are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS)`, or, where the kernel lacks `openat2` (older than 5.6, or a seccomp
//!   filter that refuses it), one `openat(O_NOFOLLOW | O_DIRECTORY)` per component. Either way a
//!   symlink anywhere in the path is an error (`ELOOP`/`ENOTDIR`), never followed.
//! - Names come from [`RelPath`], which has no `.`, `..`, empty names or `/` inside a name.
//!   The root itself is addressed as the name `.` relative to the root descriptor.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use kmount_proto::RelPath;

use crate::sys::{self, Errno, SysResult, cstring, cvt};

/// `struct open_how` of `openat2(2)` (libc's is non-exhaustive, so it cannot be built here).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// Which newer syscalls the running kernel offers. Each starts out "available" and is switched
/// off the first time the kernel answers `ENOSYS` (or, for `openat2` and `faccessat2`, when
/// a start-up probe that cannot legitimately fail is refused).
#[derive(Debug)]
pub struct Kernel {
    pub openat2: AtomicBool,
    pub faccessat2: AtomicBool,
    pub fchmodat2: AtomicBool,
    pub xattrat: AtomicBool,
}

impl Kernel {
    pub fn all(on: bool) -> Kernel {
        Kernel {
            openat2: AtomicBool::new(on),
            faccessat2: AtomicBool::new(on),
            fchmodat2: AtomicBool::new(on),
            xattrat: AtomicBool::new(on),
        }
    }
}

/// Calls `new` while the feature is on and `old` otherwise. `ENOSYS` turns the feature off for
/// good; `EPERM` (which a seccomp filter returns for syscalls it does not know, but which can
/// also be the genuine answer) is retried once with `old`, whose answer is then the truth.
pub fn with_fallback<T>(
    flag: &AtomicBool,
    new: impl FnOnce() -> SysResult<T>,
    old: impl FnOnce() -> SysResult<T>,
) -> SysResult<T> {
    if !flag.load(Ordering::Relaxed) {
        return old();
    }
    match new() {
        Err(Errno(libc::ENOSYS)) => {
            flag.store(false, Ordering::Relaxed);
            old()
        }
        Err(Errno(libc::EPERM)) => old(),
        other => other,
    }
}

/// A directory inside the root: the root's own descriptor or one opened beneath it.
#[derive(Debug)]
pub enum DirFd<'a> {
    Root(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl AsRawFd for DirFd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            DirFd::Root(fd) => fd.as_raw_fd(),
            DirFd::Owned(fd) => fd.as_raw_fd(),
        }
    }
}

/// A node named by its parent directory and its final name (`.` for the root itself).
#[derive(Debug)]
pub struct Loc<'a> {
    pub dir: DirFd<'a>,
    pub name: CString,
}

impl Loc<'_> {
    pub fn dirfd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }
    pub fn name(&self) -> &CStr {
        &self.name
    }
    /// `/proc/self/fd/<parent>/<name>`: a path that reaches this node through our own confined
    /// descriptor, for the few calls that only exist in path form. Only the magic link of our
    /// own descriptor is followed; `l*` calls do not follow the final name.
    pub fn proc_path(&self) -> CString {
        let mut p = format!("/proc/self/fd/{}/", self.dirfd()).into_bytes();
        p.extend_from_slice(self.name.as_bytes());
        CString::new(p).expect("names never contain NUL (checked by RelPath and cstring)")
    }
}

/// The served root.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    pub kernel: Kernel,
}

impl Root {
    /// Opens `path` (which must be a directory) as the root and learns which syscalls work.
    pub fn open(path: &Path) -> std::io::Result<Root> {
        Self::open_with(path, Kernel::all(true))
    }

    /// As [`Root::open`], with some newer syscalls switched off from the start (tests use this
    /// to exercise the fallbacks on a kernel that has everything).
    pub fn open_with(path: &Path, kernel: Kernel) -> std::io::Result<Root> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: c is NUL-terminated; the descriptor is ours.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })
        .map_err(|e| std::io::Error::from_raw_os_error(e.0))?;
        let root = Root {
            fd: sys::owned_fd(fd),
            kernel,
        };
        root.probe();
        Ok(root)
    }

    /// Switches off syscalls whose absence cannot be told from a genuine `EPERM` later.
    fn probe(&self) {
        let dot = c".";
        if self.kernel.openat2.load(Ordering::Relaxed)
            && let Err(Errno(libc::ENOSYS | libc::EPERM)) = openat2(
                self.raw(),
                dot,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                0,
            )
        {
            self.kernel.openat2.store(false, Ordering::Relaxed)
        }
        if self.kernel.faccessat2.load(Ordering::Relaxed) {
            // SAFETY: plain syscall with a NUL-terminated name.
            let r = cvt(unsafe {
                libc::syscall(
                    libc::SYS_faccessat2,
                    self.raw(),
                    dot.as_ptr(),
                    libc::F_OK,
                    libc::AT_EACCESS,
                )
            });
            if let Err(Errno(libc::ENOSYS | libc::EPERM)) = r {
                self.kernel.faccessat2.store(false, Ordering::Relaxed);
            }
        }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens the directory `path` (an `O_PATH` descriptor: usable as a `dirfd`, needs no read
    /// permission, exactly like a path walk). The root itself costs no syscall.
    pub fn dir(&self, path: &RelPath) -> SysResult<DirFd<'_>> {
        if path.is_root() {
            return Ok(DirFd::Root(self.fd()));
        }
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        if self.kernel.openat2.load(Ordering::Relaxed) {
            let c = cstring(path.as_bytes())?;
            return openat2(self.raw(), &c, flags, 0).map(DirFd::Owned);
        }
        let mut cur: Option<OwnedFd> = None;
        for name in path.components() {
            let c = cstring(name)?;
            let at = cur.as_ref().map_or(self.raw(), |f| f.as_raw_fd());
            // O_NOFOLLOW with O_PATH would open a symlink itself; O_DIRECTORY then refuses it
            // with ENOTDIR, so a symlink is never traversed.
            cur = Some(sys::openat(at, &c, flags | libc::O_NOFOLLOW, 0)?);
        }
        Ok(DirFd::Owned(
            cur.expect("a non-root path has at least one component"),
        ))
    }

    /// The parent directory of `path` and its final name.
    pub fn locate(&self, path: &RelPath) -> SysResult<Loc<'_>> {
        match path.split_last() {
            None => Ok(Loc {
                dir: DirFd::Root(self.fd()),
                name: c".".to_owned(),
            }),
            Some((parent, name)) => Ok(Loc {
                name: cstring(name)?,
                dir: self.dir(&parent)?,
            }),
        }
    }

    /// `open(2)` of `path` beneath the root; `O_NOFOLLOW` is always added, so a symlink as the
    /// final name is `ELOOP`. `flags` must only hold bits `openat2` knows (it refuses others).
    pub fn open_beneath(&self, path: &RelPath, flags: i32, mode: u32) -> SysResult<OwnedFd> {
        let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        if !path.is_root() && self.kernel.openat2.load(Ordering::Relaxed) {
            let c = cstring(path.as_bytes())?;
            return openat2(self.raw(), &c, flags, mode);
        }
        let loc = self.locate(path)?;
        sys::openat(loc.dirfd(), loc.name(), flags, mode)
    }
}

fn openat2(dir: RawFd, path: &CStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    let how = OpenHow {
        flags: flags as u32 as u64,
        mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            u64::from(mode & 0o7777)
        } else {
            0
        },
        resolve: RESOLVE,
    };
    // EAGAIN asks to retry a lookup that raced with a rename or mount elsewhere; bounded.
    for _ in 0..16 {
        // SAFETY: path is NUL-terminated and `how` is a valid open_how of the size passed.
        let r = cvt(unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        });
        match r {
            Err(Errno(libc::EAGAIN | libc::EINTR)) => continue,
            other => return other.map(|fd| sys::owned_fd(fd as RawFd)),
        }
    }
    Err(Errno(libc::EAGAIN))
}
