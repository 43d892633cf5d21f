//! Local-only nodes: what the ignore rules keep on this side ([`crate::rules`]). Editor swap,
//! backup and temp files by default, `--local-only` and `--exclude` paths made through the
//! mount: they are shown and used like any file, and never sent to the target.
//!
//! They live in the tree like remote nodes, under the device number [`LOCAL_ONLY_DEV`], so
//! names, attributes and listings come from there. A regular file's bytes are a file of its
//! own in a private store directory (mode 0700, removed when the mount ends), named by the
//! node's inode number, so a rename is a change of the tree alone. Directories, symlinks and
//! special files have no bytes and exist in the tree only.
//!
//! Renames across the boundary move the bytes: a local-only file renamed to a synced name (a
//! JetBrains or VS Code save writes `x___jb_tmp___` then renames it over `x`) arrives in the
//! target as one complete file renamed over `x`; a synced file renamed to a local-only name
//! (vim's `x` -> `x~` backup) is copied here and removed from the target, as vim's rename
//! would have done.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use kmount_proto::{Attr, Timespec};

use crate::core::timespec;
pub use crate::tree::LOCAL_ONLY_DEV;

/// First inode number given to local-only nodes: far above what filesystems hand out, so
/// `st_ino` values of the two sides do not meet in practice (node ids are the tree's anyway).
const INO_BASE: u64 = 1 << 62;

/// An open local-only file.
#[derive(Debug, Clone)]
pub struct LocalFile {
    /// The node (kernel inode) it belongs to.
    pub id: u64,
    pub file: Arc<File>,
}

/// The store of local-only file contents and their open handles.
#[derive(Debug)]
pub struct LocalOnly {
    dir: tempfile::TempDir,
    next_ino: AtomicU64,
    /// Kernel file handle -> open file.
    files: Mutex<HashMap<u64, LocalFile>>,
}

impl LocalOnly {
    /// A new, empty store in a private directory below `base` (the system's temporary
    /// directory when `None`).
    pub fn new(base: Option<&Path>) -> io::Result<LocalOnly> {
        let base = base
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base)?;
        let dir = tempfile::Builder::new()
            .prefix("local-only-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&base)?;
        Ok(LocalOnly {
            dir,
            next_ino: AtomicU64::new(INO_BASE),
            files: Mutex::new(HashMap::new()),
        })
    }

    /// Where the bytes are kept.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn files(&self) -> MutexGuard<'_, HashMap<u64, LocalFile>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attributes for a new node of type and mode `mode`, owned by `uid`/`gid`.
    pub fn new_attr(&self, mode: u32, uid: u32, gid: u32, rdev: u64) -> Attr {
        let now = timespec(SystemTime::now());
        let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
        Attr {
            ino: self.next_ino.fetch_add(1, Ordering::Relaxed),
            dev: LOCAL_ONLY_DEV,
            mode,
            nlink: if is_dir { 2 } else { 1 },
            uid,
            gid,
            rdev,
            size: 0,
            blocks: 0,
            blksize: 4096,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    fn path(&self, ino: u64) -> PathBuf {
        self.dir.path().join(format!("{ino:x}"))
    }

    /// Opens the bytes of file `ino` (made when missing) for reading and writing. Of `flags`,
    /// `O_TRUNC` and `O_APPEND` count; the access mode is the kernel's to check.
    pub fn open(&self, ino: u64, flags: i32) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(flags & libc::O_TRUNC != 0)
            .append(flags & libc::O_APPEND != 0)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path(ino))
    }

    /// Registers an open file under the kernel's handle `fh`.
    pub fn add_file(&self, fh: u64, id: u64, file: File) {
        self.files().insert(
            fh,
            LocalFile {
                id,
                file: Arc::new(file),
            },
        );
    }

    /// The open file behind `fh`, when it is a local-only one.
    pub fn file(&self, fh: u64) -> Option<LocalFile> {
        self.files().get(&fh).cloned()
    }

    pub fn remove_file(&self, fh: u64) -> Option<LocalFile> {
        self.files().remove(&fh)
    }

    /// Drops the bytes of file `ino` (open handles keep reading them until closed).
    pub fn remove(&self, ino: u64) {
        match std::fs::remove_file(self.path(ino)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove local-only file {ino:x}: {e}"),
        }
    }

    /// The length of file `ino`.
    pub fn len(&self, ino: u64) -> io::Result<u64> {
        Ok(self.open(ino, 0)?.metadata()?.len())
    }

    /// Sets the length of file `ino`.
    pub fn truncate(&self, ino: u64, size: u64) -> io::Result<()> {
        self.open(ino, 0)?.set_len(size)
    }

    /// Reads up to `len` bytes of file `ino` at `offset`.
    pub fn read_at(&self, ino: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let f = self.open(ino, 0)?;
        read_at(&f, offset, len)
    }

    /// Writes `data` at `offset` into file `ino` (made when missing).
    pub fn write_at(&self, ino: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.open(ino, 0)?.write_all_at(data, offset)
    }
}

/// Up to `len` bytes of `f` at `offset` (fewer only at the end of the file).
pub fn read_at(f: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    // No bigger than what is there: a whole file is read by asking for the most one message
    // holds (16 MiB), which would otherwise be allocated and zeroed every time.
    let there = f.metadata()?.len().saturating_sub(offset);
    let len = len.min(usize::try_from(there).unwrap_or(usize::MAX));
    let mut buf = vec![0; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// `attr` after its file's bytes became `size` long, changed now.
pub fn resized(attr: &Attr, size: u64) -> Attr {
    let now = timespec(SystemTime::now());
    Attr {
        size,
        blocks: size.div_ceil(512),
        mtime: now,
        ctime: now,
        ..attr.clone()
    }
}

/// `attr` with its change time set to now.
pub fn changed(attr: &Attr) -> Attr {
    Attr {
        ctime: timespec(SystemTime::now()),
        ..attr.clone()
    }
}

/// Resolves `SetTime` into a timestamp.
pub fn set_time(t: kmount_proto::SetTime) -> Timespec {
    match t {
        kmount_proto::SetTime::Now => timespec(SystemTime::now()),
        kmount_proto::SetTime::At(ts) => ts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_private_and_removed_with_the_mount() {
        let base = tempfile::tempdir().unwrap();
        let lo = LocalOnly::new(Some(base.path())).unwrap();
        let dir = lo.dir().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let a = lo.new_attr(libc::S_IFREG | 0o644, 1, 2, 0);
        assert_eq!(a.dev, LOCAL_ONLY_DEV);
        lo.write_at(a.ino, 3, b"abc").unwrap();
        assert_eq!(lo.read_at(a.ino, 0, 100).unwrap(), b"\0\0\0abc");
        lo.truncate(a.ino, 4).unwrap();
        assert_eq!(lo.read_at(a.ino, 0, 100).unwrap(), b"\0\0\0a");
        drop(lo);
        assert!(!dir.exists());
    }

    #[test]
    fn inode_numbers_are_distinct() {
        let lo = LocalOnly::new(None).unwrap();
        let a = lo.new_attr(libc::S_IFREG | 0o644, 0, 0, 0);
        let b = lo.new_attr(libc::S_IFDIR | 0o755, 0, 0, 0);
        assert_ne!(a.ino, b.ino);
        assert_eq!(b.nlink, 2);
    }

    #[test]
    fn open_truncates_and_appends_as_asked() {
        let lo = LocalOnly::new(None).unwrap();
        let a = lo.new_attr(libc::S_IFREG | 0o644, 0, 0, 0);
        lo.write_at(a.ino, 0, b"hello").unwrap();
        let f = lo.open(a.ino, libc::O_APPEND).unwrap();
        f.write_all_at(b"!", 0).unwrap();
        assert_eq!(lo.read_at(a.ino, 0, 100).unwrap(), b"hello!");
        drop(lo.open(a.ino, libc::O_TRUNC).unwrap());
        assert_eq!(lo.read_at(a.ino, 0, 100).unwrap(), b"");
    }
}
