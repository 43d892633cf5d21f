//! Whole-operation-by-path requests used by the local-first mount: `PutFile`, `ReadPath`,
//! `FsyncPath`, `WritePath`, `FallocatePath`. Each opens, works and closes in one request, so
//! it can be replayed from the mount's journal without any handle.
//!
//! Invariants:
//! - Only regular files are opened: the name is `lstat`ed first (a directory is `EISDIR`, a
//!   symlink `ELOOP`, anything else `EINVAL`), opened without following a symlink and without
//!   blocking, and checked again through the descriptor (same inode, still regular), so a FIFO
//!   or device swapped in meanwhile is never read or written.
//! - `PutFile` data is decompressed as a stream into the file, never whole in memory, and
//!   stops at [`MAX_PUT_LEN`] bytes (`EFBIG`).
//! - An atomic `PutFile` writes `.NAME.kmount-XXXXXX` beside the target and renames it over;
//!   on any failure the temporary file is removed and the target is untouched.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use kmount_proto::{Done, MAX_FRAME_LEN, MAX_IO_LEN, RelPath, Timespec};

use crate::ops::{Agent, attr};
use crate::sys::{self, Errno, SysResult, cstring, cvt, retry};

/// Largest file one `PutFile` may produce.
pub const MAX_PUT_LEN: u64 = MAX_FRAME_LEN as u64 * 8;
/// Chunk size of streamed decompression.
const CHUNK: usize = 256 << 10;
/// `ReadPath` data is sent compressed when that saves at least a tenth.
const WORTH_COMPRESSING: usize = 512;

fn off(o: u64) -> SysResult<libc::off_t> {
    libc::off_t::try_from(o).map_err(|_| Errno(libc::EINVAL))
}

fn not_regular(mode: u32) -> Option<Errno> {
    match mode & libc::S_IFMT {
        libc::S_IFREG => None,
        libc::S_IFDIR => Some(Errno(libc::EISDIR)),
        libc::S_IFLNK => Some(Errno(libc::ELOOP)),
        _ => Some(Errno(libc::EINVAL)),
    }
}

/// Opens the existing regular file at `path` with `flags` (access mode and the like).
pub fn open_regular(a: &Agent, path: &RelPath, flags: i32) -> SysResult<OwnedFd> {
    let loc = a.root.locate(path)?;
    let st = sys::fstatat(loc.dirfd(), loc.name(), libc::AT_SYMLINK_NOFOLLOW)?;
    if let Some(e) = not_regular(st.st_mode) {
        return Err(e);
    }
    let fd = sys::openat(
        loc.dirfd(),
        loc.name(),
        flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        0,
    )?;
    let again = sys::fstat(fd.as_raw_fd())?;
    if let Some(e) = not_regular(again.st_mode) {
        return Err(e);
    }
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err(Errno(libc::ESTALE)); // replaced between lstat and open
    }
    Ok(fd)
}

/// `pwrite` of all of `data` at `at`; a short count only after partial success.
fn pwrite_all(fd: RawFd, data: &[u8], at: libc::off_t) -> SysResult<usize> {
    let mut done = 0usize;
    while done < data.len() {
        let rest = &data[done..];
        // SAFETY: rest is readable for its length; fd is open.
        let r = retry(|| {
            cvt(unsafe {
                libc::pwrite(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    at + done as libc::off_t,
                )
            })
        });
        match r {
            Ok(0) => break,
            Ok(n) => done += n as usize,
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `pread` of up to `len` bytes at `at`.
fn pread_upto(fd: RawFd, len: usize, at: libc::off_t) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0usize;
    while got < len {
        let rest = &mut buf[got..];
        // SAFETY: rest is writable for its length; fd is open.
        let r = retry(|| {
            cvt(unsafe {
                libc::pread(
                    fd,
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    at + got as libc::off_t,
                )
            })
        });
        match r {
            Ok(0) => break,
            Ok(n) => got += n as usize,
            Err(_) if got > 0 => break,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Writes `data` (zstd when `compressed`) from offset 0 of `fd`, at most [`MAX_PUT_LEN`].
fn write_content(fd: RawFd, data: &[u8], compressed: bool) -> SysResult<()> {
    write_content_limited(fd, data, compressed, MAX_PUT_LEN)
}

/// As [`write_content`], at most `limit` bytes (`EFBIG` beyond).
pub fn write_content_limited(
    fd: RawFd,
    data: &[u8],
    compressed: bool,
    limit: u64,
) -> SysResult<()> {
    if !compressed {
        if data.len() as u64 > limit {
            return Err(Errno(libc::EFBIG));
        }
        return match pwrite_all(fd, data, 0)? {
            n if n == data.len() => Ok(()),
            _ => Err(Errno(libc::EIO)),
        };
    }
    let mut dec =
        zstd::stream::read::Decoder::with_buffer(data).map_err(|_| Errno(libc::EINVAL))?;
    let mut buf = vec![0u8; CHUNK];
    let mut at: u64 = 0;
    loop {
        let n = match dec.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(Errno(libc::EINVAL)), // corrupt or truncated zstd data
        };
        if at + n as u64 > limit {
            return Err(Errno(libc::EFBIG));
        }
        if pwrite_all(fd, &buf[..n], off(at)?)? != n {
            return Err(Errno(libc::EIO));
        }
        at += n as u64;
    }
}

/// Mode, then mtime (atime untouched), through the descriptor.
fn finish_file(fd: RawFd, mode: Option<u32>, mtime: Option<Timespec>) -> SysResult<()> {
    // After the data: writing clears set-id bits.
    if let Some(mode) = mode {
        // SAFETY: fd is open.
        cvt(unsafe { libc::fchmod(fd, mode & 0o7777) })?;
    }
    if let Some(t) = mtime {
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: t.sec,
                tv_nsec: i64::from(t.nsec),
            },
        ];
        // SAFETY: fd is open; times outlives the call.
        cvt(unsafe { libc::futimens(fd, times.as_ptr()) })?;
    }
    Ok(())
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `.NAME.kmount-XXXXXX`, NAME shortened so the whole stays within `NAME_MAX`.
fn temp_name(name: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    let mut x = now
        ^ (pid << 32)
        ^ TEMP_COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(name.len().min(200) + 16);
    out.push(b'.');
    out.extend_from_slice(&name[..name.len().min(200)]);
    out.extend_from_slice(b".kmount-");
    for _ in 0..6 {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        out.push(ALPHABET[(r >> 58) as usize % ALPHABET.len()]);
    }
    out
}

/// How an `Op::PutFile` writes (its fields besides the path and the bytes).
#[derive(Debug, Clone, Copy)]
pub struct Put {
    pub compressed: bool,
    pub mode: u32,
    pub mtime: Option<Timespec>,
    pub atomic: bool,
    pub keep_mode: bool,
}

/// `Op::PutFile`.
pub fn put_file(a: &Agent, path: &RelPath, data: &[u8], how: Put) -> SysResult<Done> {
    let Put {
        compressed,
        mode,
        mtime,
        atomic,
        keep_mode,
    } = how;
    let Some((parent, name)) = path.split_last() else {
        return Err(Errno(libc::EISDIR)); // the root
    };
    let loc = a.root.locate(path)?;
    let dir = loc.dirfd();
    let existed = match sys::fstatat(dir, loc.name(), libc::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            if let Some(e) = not_regular(st.st_mode) {
                return Err(e);
            }
            Some(st.st_mode)
        }
        Err(Errno(libc::ENOENT)) => None,
        Err(e) => return Err(e),
    };
    if !atomic {
        // An existing file saved in place keeps its mode when asked to: no chmod at all (the
        // write clears set-id bits as it would have by itself, and a caller who may write but
        // does not own the file could not chmod it).
        let chmod = !(keep_mode && existed.is_some());
        let fd = sys::openat(
            dir,
            loc.name(),
            libc::O_WRONLY
                | libc::O_CREAT
                | libc::O_TRUNC
                | libc::O_NOFOLLOW
                | libc::O_NONBLOCK
                | libc::O_NOCTTY
                | libc::O_CLOEXEC,
            mode & 0o7777,
        )?;
        let st = sys::fstat(fd.as_raw_fd())?;
        if let Some(e) = not_regular(st.st_mode) {
            return Err(e);
        }
        write_content(fd.as_raw_fd(), data, compressed)?;
        finish_file(fd.as_raw_fd(), chmod.then_some(mode), mtime)?;
        return Ok(Done::Attr(attr(&sys::fstat(fd.as_raw_fd())?)));
    }
    // Atomic: a fresh temporary file beside the target, renamed over it. Its name is claimed
    // as the agent's own before it exists, so the watcher never reports it.
    let (tmp, fd, claim) = {
        let mut tries = 0;
        loop {
            let tmp = temp_name(name);
            let claim = parent
                .join(&tmp)
                .ok()
                .and_then(|p| a.echo.begin_paths(vec![p]));
            let c = cstring(&tmp)?;
            match sys::openat(
                dir,
                &c,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode & 0o7777,
            ) {
                Ok(fd) => break (c, fd, claim),
                Err(e) => {
                    if let Some(claim) = claim {
                        a.echo.finish(&a.root, claim, false);
                    }
                    if e != Errno(libc::EEXIST) || tries == 16 {
                        return Err(e);
                    }
                    tries += 1;
                }
            }
        }
    };
    let result = (|| {
        write_content(fd.as_raw_fd(), data, compressed)?;
        finish_file(fd.as_raw_fd(), Some(mode), mtime)?;
        // SAFETY: both names are NUL-terminated and relative to the same open directory.
        cvt(unsafe { libc::renameat(dir, tmp.as_ptr(), dir, loc.name().as_ptr()) })?;
        sys::fstat(fd.as_raw_fd())
    })();
    if result.is_err() {
        // SAFETY: tmp is NUL-terminated; it is our own temporary file.
        unsafe { libc::unlinkat(dir, tmp.as_ptr(), 0) };
    }
    if let Some(claim) = claim {
        a.echo.finish(&a.root, claim, true);
    }
    Ok(Done::Attr(attr(&result?)))
}

/// `Op::ReadPath`: the bytes and the file's state they belong to. When the file changes while
/// it is read, the read is repeated; if it keeps changing, the state from before the read is
/// returned, so the mount sees an older state than the one its tree has and reads again.
pub fn read_path(a: &Agent, path: &RelPath, offset: u64, len: u32) -> SysResult<Done> {
    if len > MAX_IO_LEN {
        return Err(Errno(libc::EINVAL));
    }
    let at = off(offset)?;
    let fd = open_regular(a, path, libc::O_RDONLY)?;
    let raw = fd.as_raw_fd();
    let mut tries = 0;
    let (data, st) = loop {
        let before = sys::fstat(raw)?;
        let data = pread_upto(raw, len as usize, at)?;
        let after = sys::fstat(raw)?;
        let same = |x: &libc::stat, y: &libc::stat| {
            (
                x.st_size,
                x.st_mtime,
                x.st_mtime_nsec,
                x.st_ctime,
                x.st_ctime_nsec,
            ) == (
                y.st_size,
                y.st_mtime,
                y.st_mtime_nsec,
                y.st_ctime,
                y.st_ctime_nsec,
            )
        };
        tries += 1;
        if same(&before, &after) || tries == 3 {
            break (data, before);
        }
    };
    drop(fd);
    if data.len() >= WORTH_COMPRESSING
        && let Ok(z) = kmount_proto::tree::compress(&data)
        && z.len() * 10 < data.len() * 9
    {
        return Ok(Done::Content {
            attr: attr(&st),
            data: z,
            compressed: true,
        });
    }
    Ok(Done::Content {
        attr: attr(&st),
        data,
        compressed: false,
    })
}

/// `Op::FsyncPath`: the file, then the directory holding its name.
pub fn fsync_path(a: &Agent, path: &RelPath, datasync: bool) -> SysResult<Done> {
    let fd = open_regular(a, path, libc::O_RDONLY)?;
    // SAFETY: fd is open.
    retry(|| {
        cvt(unsafe {
            if datasync {
                libc::fdatasync(fd.as_raw_fd())
            } else {
                libc::fsync(fd.as_raw_fd())
            }
        })
    })?;
    let parent = path.split_last().map(|(p, _)| p).unwrap_or_default();
    let dir = a
        .root
        .open_beneath(&parent, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // SAFETY: dir is open.
    retry(|| cvt(unsafe { libc::fsync(dir.as_raw_fd()) }))?;
    Ok(Done::Ok)
}

/// `Op::WritePath`.
pub fn write_path(a: &Agent, path: &RelPath, offset: u64, data: &[u8]) -> SysResult<Done> {
    let n = u32::try_from(data.len()).map_err(|_| Errno(libc::EINVAL))?;
    let at = off(offset)?;
    let fd = open_regular(a, path, libc::O_WRONLY)?;
    // All or the reason why not: the journal sends it again whole once the cause is gone (a
    // short count taken as success lost the rest of a write on a full disk).
    let mut done = 0usize;
    while done < data.len() {
        match pwrite_all(fd.as_raw_fd(), &data[done..], at + done as libc::off_t)? {
            0 => return Err(Errno(libc::EIO)),
            m => done += m,
        }
    }
    debug_assert!(done <= n as usize);
    Ok(Done::Written(done as u32))
}

/// `Op::FallocatePath`.
pub fn fallocate_path(
    a: &Agent,
    path: &RelPath,
    mode: i32,
    offset: u64,
    len: u64,
) -> SysResult<Done> {
    let (at, len) = (off(offset)?, off(len)?);
    let fd = open_regular(a, path, libc::O_WRONLY)?;
    // SAFETY: fd is open.
    retry(|| cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, at, len) }))?;
    Ok(Done::Ok)
}
