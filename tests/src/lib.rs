//! Harness for kmount's mounted integration tests.
//!
//! Every mounted test goes through the real `kmount` binary, which runs the real `kmount-agent`
//! serving a temporary directory (the "backing" directory: the remote is a directory, so nothing
//! needs mocking). [`Mounted`] owns one such mount and always takes it down again on drop, also
//! when the test fails, so a failing test never leaves a mount behind.
//!
//! The binaries are found through `KMOUNT_BIN` / `KMOUNT_AGENT`, else in the workspace's
//! `target/debug/`; build them first with `cargo build --workspace`.
//!
//! The FUSE tier needs `/dev/fuse` and `fusermount3`; where either is missing every mounted test
//! panics with a message saying so (a tier that cannot run fails loudly, never passes silently).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long `kmount TARGET MOUNTPOINT` may take to report the mount ready.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `kmount unmount` may take (it flushes everything first).
pub const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(60);

fn workspace_target_debug(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("debug")
        .join(name)
}

fn locate(env_var: &str, name: &str) -> PathBuf {
    let path = match std::env::var_os(env_var) {
        Some(p) => PathBuf::from(p),
        None => workspace_target_debug(name),
    };
    if !path.is_file() {
        panic!(
            "{name} not found at {} (set {env_var} to override): run `cargo build --workspace` first",
            path.display()
        );
    }
    path.canonicalize()
        .unwrap_or_else(|e| panic!("canonicalize {}: {e}", path.display()))
}

/// The `kmount` binary under test (`KMOUNT_BIN`, else `target/debug/kmount`).
pub fn kmount_bin() -> PathBuf {
    locate("KMOUNT_BIN", "kmount")
}

/// The `kmount-agent` binary under test (`KMOUNT_AGENT`, else `target/debug/kmount-agent`).
pub fn agent_bin() -> PathBuf {
    locate("KMOUNT_AGENT", "kmount-agent")
}

/// A `kmount` command that uses the agent under test.
pub fn kmount_cmd() -> Command {
    let mut cmd = Command::new(kmount_bin());
    cmd.env("KMOUNT_AGENT", agent_bin());
    cmd
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Panics unless the FUSE tier can run here: `/dev/fuse` and `fusermount3` must exist.
pub fn require_fuse() {
    let mut missing = Vec::new();
    if !Path::new("/dev/fuse").exists() {
        missing.push(
            "/dev/fuse does not exist (load the module: `modprobe fuse`; in a container, \
             run it with `--device /dev/fuse --cap-add SYS_ADMIN`)",
        );
    }
    if !in_path("fusermount3") {
        missing.push(
            "fusermount3 is not in PATH (install it: `apt-get install -y fuse3` or \
             `dnf install -y fuse3`)",
        );
    }
    if !missing.is_empty() {
        panic!(
            "the mounted FUSE test tier cannot run on this machine:\n  - {}\n\
             Fix the above and run the tests again; these tests never pass without FUSE.",
            missing.join("\n  - ")
        );
    }
}

/// The result of a command run with [`run_timeout`].
#[derive(Debug)]
pub struct CmdOutput {
    /// `None` when the command did not finish in time (it was killed).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "{s}")?,
            None => write!(f, "timed out (killed)")?,
        }
        write!(
            f,
            "\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `cmd` with stdin from /dev/null and stdout/stderr captured into anonymous files (not
/// pipes: a daemon that inherits them must not keep us waiting for EOF), killing it after
/// `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let mut out = tempfile::tempfile().expect("create a temp file for stdout");
    let mut err = tempfile::tempfile().expect("create a temp file for stderr");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup stdout file"))
        .stderr(err.try_clone().expect("dup stderr file"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
    };
    let read_all = |f: &mut fs::File| {
        let mut s = Vec::new();
        f.seek(SeekFrom::Start(0)).expect("rewind output file");
        f.read_to_end(&mut s).expect("read output file");
        String::from_utf8_lossy(&s).into_owned()
    };
    CmdOutput {
        status,
        stdout: read_all(&mut out),
        stderr: read_all(&mut err),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

fn unescape_mountinfo(field: &str) -> PathBuf {
    // The kernel writes space, tab, newline and backslash as `\ooo` (three octal digits).
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'\\')
            .then(|| b.get(i + 1..i + 4))
            .flatten()
            .and_then(|oct| u8::from_str_radix(std::str::from_utf8(oct).ok()?, 8).ok());
        if let Some(v) = escaped {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// All mounts visible to this process.
pub fn mounts() -> Vec<MountInfo> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountInfo {
                mount_point: unescape_mountinfo(fields.get(4)?),
                fs_type: fields.get(sep + 1)?.to_string(),
                source: fields.get(sep + 2)?.to_string(),
            })
        })
        .collect()
}

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mounts().iter().any(|m| m.mount_point == path)
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Takes down a mount at exactly `mnt` without kmount's help: `fusermount3 -u`, then
/// `umount -l`. Returns what it had to do, for the error message.
pub fn force_unmount(mnt: &Path) -> String {
    let mut log = String::new();
    if !is_mounted(mnt) {
        return log;
    }
    let out = run_timeout(
        Command::new("fusermount3").arg("-u").arg(mnt),
        Duration::from_secs(10),
    );
    log.push_str(&format!("fusermount3 -u {}: {out}\n", mnt.display()));
    if is_mounted(mnt) {
        let out = run_timeout(
            Command::new("umount").arg("-l").arg(mnt),
            Duration::from_secs(10),
        );
        log.push_str(&format!("umount -l {}: {out}\n", mnt.display()));
    }
    log
}

/// A live kmount mount of a fresh temp directory: `<tmp>/backing` served at `<tmp>/mnt`, with
/// kmount's state (records, control sockets, logs) in `<tmp>/state` (`KMOUNT_STATE_DIR`), so
/// that mounts of parallel tests, and of the user, never see each other.
///
/// Dropping it runs `kmount unmount MNT` (falling back to `fusermount3 -u` / `umount -l` on
/// that exact mountpoint); if kmount fails to unmount, the drop panics after cleaning up, so the
/// test fails.
pub struct Mounted {
    /// `<tmp>/backing`: the directory the agent serves.
    pub backing: PathBuf,
    /// `<tmp>/mnt`: the mountpoint.
    pub mnt: PathBuf,
    /// `<tmp>/state`: `KMOUNT_STATE_DIR` of every kmount command of this mount.
    pub state: PathBuf,
    /// What `kmount` printed when the mount was ready.
    pub ready_output: CmdOutput,
    mounted: bool,
    // Dropped after `Drop::drop` has unmounted.
    dir: tempfile::TempDir,
}

impl Mounted {
    /// Mounts an empty backing directory.
    pub fn new() -> Self {
        Self::with_backing(|_| {})
    }

    /// Lets `setup` fill the backing directory, then mounts it.
    pub fn with_backing(setup: impl FnOnce(&Path)) -> Self {
        Self::with_args(setup, &[], &[])
    }

    /// Like [`Mounted::with_backing`], with extra `kmount` options (given before the target)
    /// and environment variables for the daemon and the agent it starts (`KMOUNT_LOG`, test
    /// switches such as `KMOUNT_AGENT_NO_WATCH`).
    pub fn with_args(setup: impl FnOnce(&Path), args: &[&str], envs: &[(&str, &str)]) -> Self {
        require_fuse();
        let dir = temp_dir();
        let root = dir.path().to_path_buf();
        let backing = root.join("backing");
        let mnt = root.join("mnt");
        let state = root.join("state");
        fs::create_dir(&backing).expect("create backing dir");
        fs::create_dir(&mnt).expect("create mountpoint");
        setup(&backing);
        let out = run_timeout(
            kmount_cmd()
                .env("KMOUNT_STATE_DIR", &state)
                .envs(envs.iter().copied())
                .args(args)
                .arg(&backing)
                .arg(&mnt),
            MOUNT_TIMEOUT,
        );
        if !out.success() {
            let cleanup = force_unmount(&mnt);
            panic!(
                "`kmount {} {}` failed: {out}\n{cleanup}{}",
                backing.display(),
                mnt.display(),
                logs_in(&state)
            );
        }
        if !is_mounted(&mnt) {
            panic!(
                "`kmount {} {}` exited 0 but nothing is mounted at the mountpoint: {out}{}",
                backing.display(),
                mnt.display(),
                logs_in(&state)
            );
        }
        Mounted {
            backing,
            mnt,
            state,
            ready_output: out,
            mounted: true,
            dir,
        }
    }

    /// A `kmount` command using this mount's state directory.
    pub fn kmount(&self) -> Command {
        let mut cmd = kmount_cmd();
        cmd.env("KMOUNT_STATE_DIR", &self.state);
        cmd
    }

    /// The daemon logs of this mount, for failure messages.
    pub fn logs(&self) -> String {
        logs_in(&self.state)
    }

    /// The temp directory holding `backing/` and `mnt/`; tests may add siblings.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `rel` through the mount.
    pub fn m(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `rel` in the backing directory. Changes made through a write-back mount reach it in
    /// the background: they are waited for first (`kmount wait`).
    pub fn b(&self, rel: impl AsRef<Path>) -> PathBuf {
        // A write-back mount keeps its journal and cache under `<state>/mounts`.
        if self.mounted && self.state.join("mounts").exists() {
            let out = run_timeout(self.kmount().arg("wait").arg(&self.mnt), MOUNT_TIMEOUT);
            assert!(
                out.success(),
                "`kmount wait {}` failed: {out}{}",
                self.mnt.display(),
                self.logs()
            );
        }
        self.backing.join(rel)
    }

    /// `kmount unmount MNT`, which must exit 0 and leave nothing mounted there. After this the
    /// backing directory holds everything written through the mount.
    pub fn unmount(&mut self) {
        if let Err(msg) = self.try_unmount() {
            let cleanup = force_unmount(&self.mnt);
            panic!("{msg}\n{cleanup}");
        }
    }

    fn try_unmount(&mut self) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        // With this mount's state directory: without it, `kmount unmount` cannot reach the
        // daemon to flush its journal first.
        let out = run_timeout(self.kmount().arg("unmount").arg(&self.mnt), UNMOUNT_TIMEOUT);
        if !out.success() {
            return Err(format!(
                "`kmount unmount {}` failed: {out}",
                self.mnt.display()
            ));
        }
        if is_mounted(&self.mnt) {
            return Err(format!(
                "`kmount unmount {}` exited 0 but the mount is still there: {out}",
                self.mnt.display()
            ));
        }
        Ok(())
    }
}

impl Default for Mounted {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(msg) = self.try_unmount() {
            let cleanup = force_unmount(&self.mnt);
            if thread::panicking() {
                eprintln!("while cleaning up after a failed test: {msg}\n{cleanup}");
            } else {
                panic!("{msg}\n{cleanup}");
            }
        }
    }
}

/// The kmount daemon logs under a `KMOUNT_STATE_DIR`, each headed by its name (empty if none).
pub fn logs_in(state: &Path) -> String {
    let mut out = String::new();
    let Ok(dir) = fs::read_dir(state.join("logs")) else {
        return out;
    };
    for entry in dir.flatten() {
        let text = fs::read_to_string(entry.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        out.push_str(&format!(
            "\n--- daemon log {} (last lines) ---\n",
            entry.path().display()
        ));
        for line in tail.into_iter().rev() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A fresh temp directory, world-traversable (0755) so tests can act as other users in it.
pub fn temp_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kmount-test.")
        .tempdir()
        .expect("create temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    dir
}

// ---------------------------------------------------------------------------------------------
// syscalls

/// `path` as a C string.
pub fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// The errno of a failed result, for messages and comparisons; panics on success.
#[track_caller]
pub fn errno_of<T: fmt::Debug>(r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("error without errno: {e}")),
    }
}

/// Asserts that `r` failed with `errno`.
#[track_caller]
pub fn assert_errno<T: fmt::Debug>(r: io::Result<T>, errno: i32, what: &str) {
    match r {
        Ok(v) => panic!(
            "{what}: expected errno {errno} ({}), got Ok({v:?})",
            errno_name(errno)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: expected errno {errno} ({}), got {e}",
            errno_name(errno)
        ),
    }
}

/// The name of an errno, e.g. `ENOENT`.
pub fn errno_name(errno: i32) -> String {
    nix::errno::Errno::from_raw(errno).to_string()
}

/// Converts a libc return value (-1 = error) to a result.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)`.
pub fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (f, t) = (cstr(from), cstr(to));
    // SAFETY: both are valid NUL-terminated strings that outlive the call.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// `lsetxattr`.
pub fn set_xattr(path: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (p, n) = (cstr(path), CString::new(name).expect("xattr name"));
    // SAFETY: valid C strings and a valid buffer of `value.len()` bytes.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `lgetxattr` of the whole value.
pub fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cstr(path), CString::new(name).expect("xattr name"));
    loop {
        // SAFETY: a size query with a null buffer.
        let size = check_size(unsafe {
            libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0)
        })?;
        let mut buf = vec![0u8; size + 1];
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        match check_size(unsafe {
            libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        }) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            // Grew between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `llistxattr`, as a sorted list of names.
pub fn list_xattrs(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = cstr(path);
    loop {
        // SAFETY: a size query with a null buffer.
        let size = check_size(unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; size + 1];
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        match check_size(unsafe {
            libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        }) {
            Ok(len) => {
                buf.truncate(len);
                let mut names: Vec<Vec<u8>> = buf
                    .split(|b| *b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect();
                names.sort();
                return Ok(names);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `lremovexattr`.
pub fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cstr(path), CString::new(name).expect("xattr name"));
    // SAFETY: valid C strings.
    check(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
}

/// All extended attributes of `path` (not following a symlink), name -> value. Attributes of
/// the `security.*` namespace are left out: the kernel may synthesise them (SELinux labels).
pub fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let names = list_xattrs(path).unwrap_or_else(|e| panic!("listxattr {}: {e}", path.display()));
    names
        .into_iter()
        .filter(|n| !n.starts_with(b"security."))
        .map(|n| {
            let name = String::from_utf8(n.clone()).expect("utf-8 xattr name");
            let value = get_xattr(path, &name)
                .unwrap_or_else(|e| panic!("getxattr {} {name}: {e}", path.display()));
            (n, value)
        })
        .collect()
}

/// `utimensat(AT_FDCWD, path, times, flags)` with raw timespecs (`UTIME_NOW`/`UTIME_OMIT`
/// allowed in `tv_nsec`).
pub fn utimensat(
    path: &Path,
    atime: libc::timespec,
    mtime: libc::timespec,
    flags: i32,
) -> io::Result<()> {
    let p = cstr(path);
    let times = [atime, mtime];
    // SAFETY: a valid C string and an array of two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

/// A timespec.
pub fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// Deterministic, position-dependent test data (no two nearby 4 KiB blocks alike).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// comparing nodes and trees

/// File type, from `st_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn of_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            other => panic!("unknown file type {other:o}"),
        }
    }
}

/// File contents, printed as length and a short prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Content(pub Vec<u8>);

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = &self.0[..self.0.len().min(16)];
        write!(f, "{} bytes {:02x?}..", self.0.len(), head)
    }
}

/// Times before this were set explicitly (utimensat); later ones by the file system.
pub const RECENT: i64 = 1_500_000_000;

/// A modification time as a reference comparison can use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mtime {
    /// Still exactly the time an explicit utimensat set.
    Explicit(i64, i64),
    /// Set by the file system to the current time at some point.
    Recent,
}

/// `st_mode`, printed in octal.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0o{:o}", self.0)
    }
}

/// One node of a [`TreeSnap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapNode {
    pub kind: Kind,
    pub mode: Mode,
    pub nlink: u64,
    /// Not for directories (file-system specific).
    pub size: Option<u64>,
    pub content: Option<Content>,
    pub target: Option<String>,
    /// Only when asked for ([`tree_snapshot`]).
    pub mtime: Option<Mtime>,
}

/// Every node below a directory by relative path, and the hard-link groups, for the
/// differential tests' "same as a plain directory" comparisons.
#[derive(Debug, PartialEq, Eq)]
pub struct TreeSnap {
    pub nodes: BTreeMap<String, SnapNode>,
    pub link_groups: BTreeSet<BTreeSet<String>>,
}

/// Snapshot of the tree at `root` (the root itself as ""); with `mtimes`, modification times
/// too ([`Mtime`]).
pub fn tree_snapshot(root: &Path, mtimes: bool) -> Result<TreeSnap, String> {
    let mut nodes = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let path = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let err = |what: &str, e: io::Error| format!("{what} {}: {e}", path.display());
        let md = fs::symlink_metadata(&path).map_err(|e| err("lstat", e))?;
        let kind = Kind::of_mode(md.mode());
        let mut node = SnapNode {
            kind,
            mode: Mode(md.mode()),
            nlink: md.nlink(),
            size: (kind != Kind::Dir).then_some(md.size()),
            content: None,
            target: None,
            mtime: mtimes.then(|| {
                if md.mtime() < RECENT {
                    Mtime::Explicit(md.mtime(), md.mtime_nsec())
                } else {
                    Mtime::Recent
                }
            }),
        };
        match kind {
            Kind::File => {
                node.content = Some(Content(fs::read(&path).map_err(|e| err("read", e))?));
            }
            Kind::Symlink => {
                let t = fs::read_link(&path).map_err(|e| err("readlink", e))?;
                node.target = Some(t.to_string_lossy().into_owned());
            }
            Kind::Dir => {
                for e in fs::read_dir(&path).map_err(|e| err("readdir", e))? {
                    let name = e.map_err(|e| err("readdir", e))?.file_name();
                    let name = name.to_string_lossy();
                    stack.push(if rel.is_empty() {
                        name.into_owned()
                    } else {
                        format!("{rel}/{name}")
                    });
                }
            }
            _ => {}
        }
        if kind != Kind::Dir {
            by_ino.entry(md.ino()).or_default().insert(rel.clone());
        }
        nodes.insert(rel, node);
    }
    let link_groups = by_ino.into_values().filter(|g| g.len() > 1).collect();
    Ok(TreeSnap { nodes, link_groups })
}

/// What differs between two snapshots, a line per path (empty when equal).
pub fn tree_snapshot_diff(mount: &TreeSnap, reference: &TreeSnap) -> String {
    let mut out = String::new();
    let paths: BTreeSet<&String> = mount.nodes.keys().chain(reference.nodes.keys()).collect();
    for p in paths {
        match (mount.nodes.get(p), reference.nodes.get(p)) {
            (Some(a), Some(b)) if a != b => out.push_str(&format!(
                "  {p:?}:\n    mount:     {a:?}\n    reference: {b:?}\n"
            )),
            (Some(a), None) => out.push_str(&format!("  {p:?}: only in the mount: {a:?}\n")),
            (None, Some(b)) => out.push_str(&format!("  {p:?}: only in the reference: {b:?}\n")),
            _ => {}
        }
    }
    if mount.link_groups != reference.link_groups {
        out.push_str(&format!(
            "  hard-link groups: mount {:?}, reference {:?}\n",
            mount.link_groups, reference.link_groups
        ));
    }
    out
}

/// What a comparison looks at besides type, mode, nlink, uid, gid, size, mtime, contents,
/// symlink target and xattrs (always compared).
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    /// `st_ino` (only meaningful between a mount and its backing directory).
    pub ino: bool,
    /// `st_ctime` in ns (not preserved by copies).
    pub ctime: bool,
    /// `st_size` of directories (file-system specific).
    pub dir_size: bool,
    /// `st_mtime` of directories (copies may not restore it).
    pub dir_mtime: bool,
}

impl Fields {
    /// A mount against its backing directory: everything.
    pub const MOUNT_VS_BACKING: Fields = Fields {
        ino: true,
        ctime: true,
        dir_size: true,
        dir_mtime: true,
    };
    /// A copy against its original (`cp -a`, tar): no inode numbers, ctimes or dir sizes.
    pub const COPY: Fields = Fields {
        ino: false,
        ctime: false,
        dir_size: false,
        dir_mtime: true,
    };
}

/// The observable state of one node, read with `lstat` and friends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub kind: Kind,
    /// Full `st_mode`.
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub size: Option<u64>,
    pub mtime: Option<(i64, i64)>,
    pub ctime: Option<(i64, i64)>,
    pub ino: Option<u64>,
    pub rdev: u64,
    pub content: Option<Content>,
    pub target: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Reads the [`NodeInfo`] of `path` (never following a final symlink).
pub fn node_info(path: &Path, fields: Fields) -> NodeInfo {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let kind = Kind::of_mode(md.mode());
    let content = (kind == Kind::File).then(|| {
        Content(fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
    });
    let target = (kind == Kind::Symlink).then(|| {
        fs::read_link(path)
            .unwrap_or_else(|e| panic!("readlink {}: {e}", path.display()))
            .into_os_string()
            .into_encoded_bytes()
    });
    let is_dir = kind == Kind::Dir;
    NodeInfo {
        kind,
        mode: md.mode(),
        nlink: md.nlink(),
        uid: md.uid(),
        gid: md.gid(),
        size: (!is_dir || fields.dir_size).then_some(md.size()),
        mtime: (!is_dir || fields.dir_mtime).then_some((md.mtime(), md.mtime_nsec())),
        ctime: fields.ctime.then_some((md.ctime(), md.ctime_nsec())),
        ino: fields.ino.then_some(md.ino()),
        rdev: md.rdev(),
        content,
        target,
        xattrs: xattrs(path),
    }
}

/// Asserts that `mnt_path` (through the mount) and `backing_path` look the same: every
/// [`NodeInfo`] field, including the inode number and ctime.
#[track_caller]
pub fn assert_same_node(mnt_path: &Path, backing_path: &Path) {
    let m = node_info(mnt_path, Fields::MOUNT_VS_BACKING);
    let b = node_info(backing_path, Fields::MOUNT_VS_BACKING);
    if m != b {
        panic!(
            "{} (through the mount) differs from {} (backing):\n{}",
            mnt_path.display(),
            backing_path.display(),
            diff_nodes(&m, &b)
        );
    }
}

fn diff_nodes(a: &NodeInfo, b: &NodeInfo) -> String {
    let mut out = String::new();
    macro_rules! field {
        ($name:ident, $fmt:literal) => {
            if a.$name != b.$name {
                out.push_str(&format!(
                    concat!("  ", stringify!($name), ": ", $fmt, " vs ", $fmt, "\n"),
                    a.$name, b.$name
                ));
            }
        };
    }
    field!(kind, "{:?}");
    field!(mode, "{:o}");
    field!(nlink, "{}");
    field!(uid, "{}");
    field!(gid, "{}");
    field!(size, "{:?}");
    field!(mtime, "{:?}");
    field!(ctime, "{:?}");
    field!(ino, "{:?}");
    field!(rdev, "{}");
    field!(content, "{:?}");
    field!(target, "{:?}");
    field!(xattrs, "{:?}");
    if let (Some(ca), Some(cb)) = (&a.content, &b.content)
        && ca != cb
    {
        let first = ca.0.iter().zip(&cb.0).position(|(x, y)| x != y);
        out.push_str(&format!("  first differing byte: {first:?}\n"));
    }
    out
}

/// A whole tree: relative path -> node, plus the hard-link groups (relative paths sharing an
/// inode, groups of two or more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub nodes: BTreeMap<PathBuf, NodeInfo>,
    pub link_groups: BTreeSet<BTreeSet<PathBuf>>,
}

/// Walks `root` (not following symlinks) and reads every node. The root itself is `""`.
pub fn tree(root: &Path, fields: Fields) -> Tree {
    let mut nodes = BTreeMap::new();
    let mut by_ino: BTreeMap<(u64, u64), BTreeSet<PathBuf>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let mut info = node_info(&path, fields);
        if rel.as_os_str().is_empty() {
            // The root's inode number is checked on its own (tests/posix_ops.rs
            // `root_ino_matches_backing`), so that one difference does not mask all others.
            info.ino = None;
        }
        let md =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        if info.kind != Kind::Dir {
            by_ino
                .entry((md.dev(), md.ino()))
                .or_default()
                .insert(rel.clone());
        } else {
            for entry in
                fs::read_dir(&path).unwrap_or_else(|e| panic!("readdir {}: {e}", path.display()))
            {
                let entry = entry.unwrap_or_else(|e| panic!("readdir {}: {e}", path.display()));
                stack.push(rel.join(entry.file_name()));
            }
        }
        nodes.insert(rel, info);
    }
    let link_groups = by_ino.into_values().filter(|g| g.len() > 1).collect();
    Tree { nodes, link_groups }
}

/// Asserts that two trees look the same; the message lists every difference.
#[track_caller]
pub fn assert_same_tree_with(a_root: &Path, b_root: &Path, fields: Fields) {
    let a = tree(a_root, fields);
    let b = tree(b_root, fields);
    if a == b {
        return;
    }
    let mut out = String::new();
    let paths: BTreeSet<&PathBuf> = a.nodes.keys().chain(b.nodes.keys()).collect();
    for p in paths {
        match (a.nodes.get(p), b.nodes.get(p)) {
            (Some(x), Some(y)) if x != y => {
                out.push_str(&format!("{}:\n{}", p.display(), diff_nodes(x, y)))
            }
            (Some(_), None) => out.push_str(&format!("{}: only in the first tree\n", p.display())),
            (None, Some(_)) => out.push_str(&format!("{}: only in the second tree\n", p.display())),
            _ => {}
        }
    }
    if a.link_groups != b.link_groups {
        out.push_str(&format!(
            "hard-link groups differ:\n  {:?}\n  vs\n  {:?}\n",
            a.link_groups, b.link_groups
        ));
    }
    panic!(
        "{} and {} differ:\n{out}",
        a_root.display(),
        b_root.display()
    );
}

/// Asserts that the tree at `mnt_root` (through the mount) and `backing_root` look the same,
/// including inode numbers and ctimes.
#[track_caller]
pub fn assert_same_tree(mnt_root: &Path, backing_root: &Path) {
    wait_for_write_back(mnt_root);
    assert_same_tree_with(mnt_root, backing_root, Fields::MOUNT_VS_BACKING)
}

/// For a [`Mounted`] write-back mount at `mnt` (its state beside it, with a `mounts`
/// directory): `kmount wait`, so that the backing directory has every change made through it.
fn wait_for_write_back(mnt: &Path) {
    let Some(state) = mnt.parent().map(|p| p.join("state")) else {
        return;
    };
    if !state.join("mounts").exists() || !is_mounted(mnt) {
        return;
    }
    let out = run_timeout(
        kmount_cmd()
            .env("KMOUNT_STATE_DIR", &state)
            .arg("wait")
            .arg(mnt),
        MOUNT_TIMEOUT,
    );
    assert!(
        out.success(),
        "`kmount wait {}` failed: {out}",
        mnt.display()
    );
}

/// This process's umask (read from /proc, without changing it).
pub fn current_umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .expect("Umask: line in /proc/self/status");
    u32::from_str_radix(line.trim(), 8).expect("octal umask")
}

/// `st_mode & 0o7777` of `path` (not following a symlink).
pub fn perm(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// `st_ino` of `path` (not following a symlink).
pub fn ino(path: &Path) -> u64 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
        .ino()
}

/// The child processes of `daemon`, of any of its threads (a reconnection spawns the new
/// agent from whichever thread runs it).
pub fn children_of(daemon: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{daemon}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect::<Vec<u32>>()
        })
        .filter(|c| {
            // Not a zombie (a killed agent not yet reaped).
            fs::read_to_string(format!("/proc/{c}/stat")).is_ok_and(|s| !s.contains(") Z "))
        })
        .collect()
}
