//! Extended attributes of a node named by (parent fd, name) or of an open handle.
//!
//! By name they use the `*xattrat` calls (Linux 6.13) with `AT_SYMLINK_NOFOLLOW`; on older
//! kernels the `l*xattr` calls on `/proc/self/fd/<parent>/<name>`, which reach the node through
//! our own confined descriptor and do not follow the final name either.

use std::ffi::CStr;
use std::os::fd::RawFd;

use crate::confine::{Kernel, Loc, with_fallback};
use crate::sys::{Errno, SysResult, cvt};

// The `*xattrat` syscalls have the same numbers on every architecture.
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

/// `struct xattr_args` of the `*xattrat` calls.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// What an xattr call addresses.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Fd(RawFd),
    At(&'a Loc<'a>),
}

/// How often a value that keeps growing between the size query and the read is retried.
const GROWTH_RETRIES: usize = 8;

fn ptr_len(buf: &mut [u8]) -> (*mut libc::c_void, usize) {
    if buf.is_empty() {
        (std::ptr::null_mut(), 0)
    } else {
        (buf.as_mut_ptr().cast(), buf.len())
    }
}

fn get_raw(k: &Kernel, t: Target<'_>, name: &CStr, buf: &mut [u8]) -> SysResult<usize> {
    let (ptr, len) = ptr_len(buf);
    // SAFETY (all calls below): names are NUL-terminated; ptr/len describe a writable buffer or
    // are null/0 for a size query; the args struct matches the kernel's layout and size.
    let r = match t {
        Target::Fd(fd) => cvt(unsafe { libc::fgetxattr(fd, name.as_ptr(), ptr, len) }),
        Target::At(loc) => with_fallback(
            &k.xattrat,
            || {
                let args = XattrArgs {
                    value: ptr as u64,
                    size: len as u32,
                    flags: 0,
                };
                cvt(unsafe {
                    libc::syscall(
                        SYS_GETXATTRAT,
                        loc.dirfd(),
                        loc.name().as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        name.as_ptr(),
                        &args as *const XattrArgs,
                        std::mem::size_of::<XattrArgs>(),
                    )
                } as isize)
            },
            || {
                let p = loc.proc_path();
                cvt(unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), ptr, len) })
            },
        ),
    }?;
    Ok(r as usize)
}

fn list_raw(k: &Kernel, t: Target<'_>, buf: &mut [u8]) -> SysResult<usize> {
    let (ptr, len) = ptr_len(buf);
    // SAFETY: as get_raw.
    let r = match t {
        Target::Fd(fd) => cvt(unsafe { libc::flistxattr(fd, ptr.cast(), len) }),
        Target::At(loc) => with_fallback(
            &k.xattrat,
            || {
                cvt(unsafe {
                    libc::syscall(
                        SYS_LISTXATTRAT,
                        loc.dirfd(),
                        loc.name().as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        ptr,
                        len,
                    )
                } as isize)
            },
            || {
                let p = loc.proc_path();
                cvt(unsafe { libc::llistxattr(p.as_ptr(), ptr.cast(), len) })
            },
        ),
    }?;
    Ok(r as usize)
}

/// Reads a whole variable-size answer: asks for the size, then fetches, again if it grew.
fn whole(mut call: impl FnMut(&mut [u8]) -> SysResult<usize>) -> SysResult<Vec<u8>> {
    for _ in 0..GROWTH_RETRIES {
        let size = call(&mut [])?;
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno(libc::ERANGE)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno(libc::ERANGE))
}

/// The whole value of `name`.
pub fn get(k: &Kernel, t: Target<'_>, name: &CStr) -> SysResult<Vec<u8>> {
    whole(|buf| get_raw(k, t, name, buf))
}

/// All names, each NUL-terminated, as `listxattr(2)` returns them.
pub fn list(k: &Kernel, t: Target<'_>) -> SysResult<Vec<u8>> {
    whole(|buf| list_raw(k, t, buf))
}

pub fn set(k: &Kernel, t: Target<'_>, name: &CStr, value: &[u8], flags: i32) -> SysResult<()> {
    let ptr: *const libc::c_void = if value.is_empty() {
        std::ptr::null()
    } else {
        value.as_ptr().cast()
    };
    // SAFETY: as get_raw; value is readable for its length.
    match t {
        Target::Fd(fd) => {
            cvt(unsafe { libc::fsetxattr(fd, name.as_ptr(), ptr, value.len(), flags) })
        }
        Target::At(loc) => with_fallback(
            &k.xattrat,
            || {
                let args = XattrArgs {
                    value: ptr as u64,
                    size: value.len() as u32,
                    flags: flags as u32,
                };
                cvt(unsafe {
                    libc::syscall(
                        SYS_SETXATTRAT,
                        loc.dirfd(),
                        loc.name().as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        name.as_ptr(),
                        &args as *const XattrArgs,
                        std::mem::size_of::<XattrArgs>(),
                    )
                } as libc::c_int)
            },
            || {
                let p = loc.proc_path();
                cvt(unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), ptr, value.len(), flags) })
            },
        ),
    }
    .map(drop)
}

pub fn remove(k: &Kernel, t: Target<'_>, name: &CStr) -> SysResult<()> {
    // SAFETY: as get_raw.
    match t {
        Target::Fd(fd) => cvt(unsafe { libc::fremovexattr(fd, name.as_ptr()) }),
        Target::At(loc) => with_fallback(
            &k.xattrat,
            || {
                cvt(unsafe {
                    libc::syscall(
                        SYS_REMOVEXATTRAT,
                        loc.dirfd(),
                        loc.name().as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        name.as_ptr(),
                    )
                } as libc::c_int)
            },
            || {
                let p = loc.proc_path();
                cvt(unsafe { libc::lremovexattr(p.as_ptr(), name.as_ptr()) })
            },
        ),
    }
    .map(drop)
}
