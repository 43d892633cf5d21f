//! Thin, errno-preserving wrappers over the raw Linux calls the agent needs.

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use libc::c_int;

/// A raw Linux errno, exactly as a syscall returned it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's `errno`.
    pub fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }

    /// `strerror` text without the "(os error N)" suffix std adds.
    pub fn describe(self) -> String {
        let mut buf = [0u8; 128];
        // SAFETY: buf is writable for its whole length; the XSI strerror_r NUL-terminates.
        let r = unsafe { libc::strerror_r(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if r != 0 {
            return format!("errno {}", self.0);
        }
        CStr::from_bytes_until_nul(&buf)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("errno {}", self.0))
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({}: {})", self.0, self.describe())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

pub type SysResult<T> = Result<T, Errno>;

/// Maps the C convention (`-1` and `errno`) to a `Result`.
pub fn cvt<T: Copy + PartialEq + From<i8>>(ret: T) -> SysResult<T> {
    if ret == T::from(-1) {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// Runs `f` again for as long as it fails with `EINTR`.
pub fn retry<T>(mut f: impl FnMut() -> SysResult<T>) -> SysResult<T> {
    loop {
        match f() {
            Err(Errno(libc::EINTR)) => {}
            other => return other,
        }
    }
}

/// Bytes as a C string; an inner NUL byte is `EINVAL`, as the kernel would have it.
pub fn cstring(bytes: &[u8]) -> SysResult<CString> {
    CString::new(bytes).map_err(|_| Errno(libc::EINVAL))
}

/// Takes ownership of a descriptor a successful call returned.
pub fn owned_fd(fd: RawFd) -> OwnedFd {
    debug_assert!(fd >= 0);
    // SAFETY: the caller passes a descriptor that was just returned to it and nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

pub fn fstat(fd: RawFd) -> SysResult<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is a valid out-pointer; fstat fills it on success.
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat returned 0, so st is initialised.
    Ok(unsafe { st.assume_init() })
}

pub fn fstatat(dir: RawFd, name: &CStr, flags: c_int) -> SysResult<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: name is NUL-terminated; st is a valid out-pointer.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat returned 0, so st is initialised.
    Ok(unsafe { st.assume_init() })
}

pub fn openat(dir: RawFd, name: &CStr, flags: c_int, mode: u32) -> SysResult<OwnedFd> {
    // SAFETY: name is NUL-terminated; the returned descriptor is owned by us.
    retry(|| cvt(unsafe { libc::openat(dir, name.as_ptr(), flags, mode as libc::c_uint) }))
        .map(owned_fd)
}

/// `readlinkat`, growing the buffer until the whole target fits.
pub fn readlinkat(dir: RawFd, name: &CStr) -> SysResult<Vec<u8>> {
    let mut cap = 256usize;
    loop {
        let mut buf = vec![0u8; cap];
        // SAFETY: buf is writable for cap bytes; name is NUL-terminated.
        let n = cvt(unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), cap) })?
            as usize;
        if n < cap {
            buf.truncate(n);
            return Ok(buf);
        }
        if cap > 1 << 16 {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        cap *= 4;
    }
}

/// The per-thread filesystem uid (`setfsuid(-1)` changes nothing and returns the current one).
pub fn current_fsuid() -> u32 {
    // SAFETY: an invalid id makes setfsuid a pure query.
    unsafe { libc::syscall(libc::SYS_setfsuid, -1i32 as u32 as libc::c_long) as u32 }
}

/// The per-thread filesystem gid.
pub fn current_fsgid() -> u32 {
    // SAFETY: an invalid id makes setfsgid a pure query.
    unsafe { libc::syscall(libc::SYS_setfsgid, -1i32 as u32 as libc::c_long) as u32 }
}

/// The calling thread's supplementary groups.
pub fn current_groups() -> SysResult<Vec<libc::gid_t>> {
    loop {
        // SAFETY: a zero size only asks for the count.
        let n = cvt(unsafe { libc::getgroups(0, std::ptr::null_mut()) })? as usize;
        let mut groups = vec![0; n];
        // SAFETY: groups is writable for n entries.
        match cvt(unsafe { libc::getgroups(n as c_int, groups.as_mut_ptr()) }) {
            Ok(got) => {
                groups.truncate(got as usize);
                return Ok(groups);
            }
            Err(Errno(libc::EINVAL)) => continue, // the list grew in between
            Err(e) => return Err(e),
        }
    }
}
