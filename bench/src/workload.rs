//! The workloads, each run the same way for every contender. Every measurement also checks
//! its result (entry counts, file digests, `git status` output, file contents on the remote),
//! so a fast wrong answer is reported as wrong, never as fast.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::tree::{DIGEST_INIT, digest};

/// How one timed run ended.
#[derive(Debug, Clone)]
pub enum Run {
    Ok(Duration),
    /// Did not finish within the cap; it was killed.
    Capped(Duration),
    /// Finished with a wrong result (after this long), or failed (`None`).
    Wrong(String, Option<Duration>),
}

impl Run {
    pub fn is_capped(&self) -> bool {
        matches!(self, Run::Capped(_))
    }
}

/// Runs `cmd` (stdin null, stdout captured), killing it after `cap`. Returns the wall time
/// and its stdout.
pub fn run_capped(
    cmd: &mut Command,
    cap: Duration,
) -> io::Result<(Result<Duration, Duration>, String, String)> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| io::Error::other("no stderr"))?;
    let pid = child.id();
    // waiter thread --exit--> here
    let (done_tx, done_rx) = mpsc::channel();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = done_tx.send(Instant::now());
        status
    });
    let result = match done_rx.recv_timeout(cap) {
        Ok(end) => Ok(end - start),
        Err(_) => {
            // SAFETY-free: kill by the PID of our own child, which has not been reaped (the
            // waiter has not returned).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(start.elapsed())
        }
    };
    let status = waiter
        .join()
        .map_err(|_| io::Error::other("waiter thread panicked"))??;
    let out = out_thread.join().unwrap_or_default();
    let err = err_thread.join().unwrap_or_default();
    if result.is_ok() && !status.success() {
        return Ok((
            Err(Duration::ZERO),
            out,
            format!("exited with {status}: {}", err.trim()),
        ));
    }
    Ok((result, out, err))
}

/// A timed child run whose stdout must equal `expect` (after trimming).
pub fn timed(cmd: &mut Command, cap: Duration, check: impl Fn(&str) -> Result<(), String>) -> Run {
    match run_capped(cmd, cap) {
        Ok((Ok(d), out, _)) => match check(&out) {
            Ok(()) => Run::Ok(d),
            Err(e) => Run::Wrong(e, Some(d)),
        },
        Ok((Err(d), _, err)) if d.is_zero() => Run::Wrong(err, None),
        Ok((Err(d), _, _)) => Run::Capped(d),
        Err(e) => Run::Wrong(format!("cannot run {cmd:?}: {e}"), None),
    }
}

/// `kmount-bench walk DIR` (in a child process): readdir + lstat of every entry, like
/// `find DIR -printf '%s'`. Prints the number of entries and their total size.
pub fn walk_main(dir: &Path) -> io::Result<()> {
    let (mut entries, mut bytes) = (0u64, 0u64);
    walk(dir, &mut entries, &mut bytes)?;
    println!("{entries} {bytes}");
    Ok(())
}

fn walk(dir: &Path, entries: &mut u64, bytes: &mut u64) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        let meta = fs::symlink_metadata(&path)?;
        *entries += 1;
        *bytes += meta.len();
        if meta.is_dir() {
            walk(&path, entries, bytes)?;
        }
    }
    Ok(())
}

/// `kmount-bench read FILE` (in a child process): reads it whole with 1 MiB reads, prints
/// its size and digest.
pub fn read_main(file: &Path) -> io::Result<()> {
    let mut f = fs::File::open(file)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut state) = (0u64, DIGEST_INIT);
    loop {
        // Fill the whole buffer (or reach the end), so the digest sees the same chunks as
        // the generator's.
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        state = digest(&buf[..filled], state);
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    println!("{size} {state}");
    Ok(())
}

fn self_cmd(sub: &str, arg: &Path) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("kmount-bench"));
    let mut c = Command::new(exe);
    c.arg(sub).arg(arg);
    c
}

pub fn walk_tree(repo: &Path, expect_entries: u64, cap: Duration) -> Run {
    timed(&mut self_cmd("walk", repo), cap, |out| {
        let n: u64 = out
            .split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or(0);
        if n == expect_entries {
            Ok(())
        } else {
            Err(format!("the walk saw {n} entries, not {expect_entries}"))
        }
    })
}

pub fn read_big(file: &Path, size: u64, digest: u64, cap: Duration) -> Run {
    timed(&mut self_cmd("read", file), cap, |out| {
        let expect = format!("{size} {digest}");
        if out.trim() == expect {
            Ok(())
        } else {
            Err(format!("read {:?}, expected {expect}", out.trim()))
        }
    })
}

pub fn git_status(repo: &Path, cap: Duration) -> Run {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(repo)
        .args(["-c", "safe.directory=*", "status", "--porcelain"]);
    timed(&mut cmd, cap, |out| {
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(format!(
                "git status is not clean: {}",
                out.lines().take(5).collect::<Vec<_>>().join("; ")
            ))
        }
    })
}

/// Extracts `archive` into `dest` (through the contender) and waits until every file is in
/// `remote_dest` (the same directory seen directly on the remote) with its size.
pub fn untar(
    archive: &Path,
    dest: &Path,
    remote_dest: &Path,
    files: &[(PathBuf, u64)],
    cap: Duration,
) -> Run {
    if let Err(e) = fs::create_dir_all(dest) {
        return Run::Wrong(format!("cannot create {}: {e}", dest.display()), None);
    }
    let start = Instant::now();
    let mut cmd = Command::new("tar");
    cmd.arg("-xf").arg(archive).arg("-C").arg(dest);
    match run_capped(&mut cmd, cap) {
        Ok((Ok(_), _, _)) => {}
        Ok((Err(d), _, err)) if d.is_zero() => return Run::Wrong(format!("tar: {err}"), None),
        Ok((Err(d), _, _)) => return Run::Capped(d),
        Err(e) => return Run::Wrong(format!("cannot run tar: {e}"), None),
    }
    let mut pending: Vec<&(PathBuf, u64)> = files.iter().collect();
    loop {
        pending.retain(|(p, size)| {
            fs::symlink_metadata(remote_dest.join(p)).map_or(true, |m| m.len() != *size)
        });
        if pending.is_empty() {
            return Run::Ok(start.elapsed());
        }
        if start.elapsed() > cap {
            return Run::Capped(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An inotify watch on one directory.
struct Inotify {
    fd: i32,
}

impl Inotify {
    fn watch(dir: &Path) -> io::Result<Inotify> {
        // SAFETY: plain syscalls on an fd this struct owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let me = Inotify { fd };
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let mask = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_MODIFY | libc::IN_CREATE;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(me)
    }

    /// Waits up to `timeout` for events; returns the names of entries with a close-after-write
    /// or moved-in event.
    fn wait(&self, timeout: Duration) -> io::Result<Vec<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut names = Vec::new();
        let mut buf = [0u8; 64 << 10];
        loop {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off + 16 <= n as usize {
                let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap_or([0; 4]));
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap_or([0; 4]))
                    as usize;
                let name = &buf[off + 16..(off + 16 + len).min(n as usize)];
                let name: Vec<u8> = name.iter().copied().take_while(|&b| b != 0).collect();
                if mask & (libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) != 0 {
                    names.push(name);
                }
                off += 16 + len;
            }
        }
        Ok(names)
    }
}

impl Drop for Inotify {
    fn drop(&mut self) {
        // SAFETY: closing the fd this struct owns, once.
        unsafe { libc::close(self.fd) };
    }
}

/// Latency samples of one kind.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    pub samples: Vec<Duration>,
    /// Samples that did not complete within the cap.
    pub capped: usize,
    pub wrong: Option<String>,
}

/// Saves a file through the contender (`mount_dir`) the way an editor saves in place, and
/// measures until the remote (`remote_dir`, watched with inotify) has a close-after-write or
/// rename event for it *and* the new content.
pub fn save_to_event(
    mount_dir: &Path,
    remote_dir: &Path,
    samples: usize,
    cap: Duration,
) -> Latencies {
    let mut out = Latencies::default();
    let watch = match Inotify::watch(remote_dir) {
        Ok(w) => w,
        Err(e) => {
            out.wrong = Some(format!("inotify on {}: {e}", remote_dir.display()));
            return out;
        }
    };
    let name = "saved.txt";
    for i in 0..samples {
        let content = format!("save {i} {}\n", "x".repeat(100 + i * 7));
        let _ = watch.wait(Duration::ZERO);
        let start = Instant::now();
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(mount_dir.join(name))
            .and_then(|mut f| f.write_all(content.as_bytes()));
        if let Err(e) = written {
            out.wrong = Some(format!("save through the mount failed: {e}"));
            return out;
        }
        loop {
            let left = cap.saturating_sub(start.elapsed());
            if left.is_zero() {
                out.capped += 1;
                break;
            }
            let names = match watch.wait(left) {
                Ok(n) => n,
                Err(e) => {
                    out.wrong = Some(format!("inotify: {e}"));
                    return out;
                }
            };
            if names.iter().any(|n| n == name.as_bytes())
                && fs::read(remote_dir.join(name)).is_ok_and(|c| c == content.as_bytes())
            {
                out.samples.push(start.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    out
}

/// Changes a file on the remote (`remote_dir`) and measures until the contender
/// (`mount_dir`) shows the new content.
pub fn remote_to_visible(
    mount_dir: &Path,
    remote_dir: &Path,
    samples: usize,
    cap: Duration,
) -> Latencies {
    let mut out = Latencies::default();
    let name = "remote.txt";
    if let Err(e) = fs::write(remote_dir.join(name), b"initial\n") {
        out.wrong = Some(format!("cannot write on the remote: {e}"));
        return out;
    }
    // The mount has seen the file before the first change.
    let _ = fs::read(mount_dir.join(name));
    for i in 0..samples {
        // Lengths differ every time, so a stale size cannot pass for the new content.
        let content = format!("change {i} {}\n", "y".repeat(50 + i * 13));
        let start = Instant::now();
        if let Err(e) = fs::write(remote_dir.join(name), content.as_bytes()) {
            out.wrong = Some(format!("cannot write on the remote: {e}"));
            return out;
        }
        loop {
            if fs::read(mount_dir.join(name)).is_ok_and(|c| c == content.as_bytes()) {
                out.samples.push(start.elapsed());
                break;
            }
            if start.elapsed() > cap {
                out.capped += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Spread the changes over the mount's cache periods.
        std::thread::sleep(Duration::from_millis(137));
    }
    out
}
