//! `Op::RunCommand` (`--on-change`): `sh -c COMMAND` in the served directory, as the agent's
//! user, stdin from `/dev/null`, stdout and stderr captured together (the last
//! [`OUTPUT_KEEP`] bytes), in a process group of its own that is killed as a whole (SIGKILL)
//! when the time is up or the session ends.
//!
//! The serving loop runs each command on a thread of its own ([`crate::serve`]), so other
//! requests keep flowing while it runs.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kmount_proto::{Done, WireError};

use crate::ops::Agent;
use crate::sys::{Errno, cvt};

/// Output kept: the last 64 KiB.
pub const OUTPUT_KEEP: usize = 64 << 10;
/// How often a running command is checked on while it writes nothing.
const TICK: Duration = Duration::from_millis(20);

/// The umask the agent was started with (it works with 0 itself); commands get it back.
static UMASK: AtomicU32 = AtomicU32::new(0o022);

/// Remembers the umask the agent was started with, for the commands it runs.
pub fn remember_umask(mask: u32) {
    UMASK.store(mask, Ordering::Relaxed);
}

/// The process groups of the commands running now.
#[derive(Debug, Default)]
pub struct Commands {
    groups: Mutex<HashSet<i32>>,
    /// The session ended: no new command starts, running ones are killed.
    ended: AtomicBool,
}

impl Commands {
    /// Kills every running command's process group (end of session).
    pub fn kill_all(&self) {
        self.ended.store(true, Ordering::SeqCst);
        for pgid in lock(&self.groups).iter() {
            // SAFETY: plain syscall; a group that is gone already answers ESRCH.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The end of what a command wrote.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > OUTPUT_KEEP {
            let cut = self.bytes.len() - OUTPUT_KEEP;
            self.bytes.drain(..cut);
            self.truncated = true;
        }
    }
}

/// Reads what is in the pipe now; `true` at its end (every writer closed it).
fn drain(r: &OwnedFd, out: &mut Tail) -> bool {
    let mut buf = [0u8; 16 << 10];
    loop {
        // SAFETY: buf is writable for its length; r is open.
        let n = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return true,
            n if n > 0 => out.push(&buf[..n as usize]),
            _ => match Errno::last().0 {
                libc::EINTR => {}
                _ => return false, // EAGAIN: nothing more for now
            },
        }
    }
}

/// Waits until the pipe has something (or ends), at most `wait`.
fn wait_readable(r: &OwnedFd, wait: Duration) {
    let mut fd = libc::pollfd {
        fd: r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut fd, 1, ms) };
}

/// A pipe whose read end does not block (the write end, the command's, does).
fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out-array of two ints.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(|e| io::Error::from_raw_os_error(e.0))?;
    // SAFETY: both descriptors were just made and are ours.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: plain fcntl on our descriptor.
    cvt(unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) })
        .map_err(|e| io::Error::from_raw_os_error(e.0))?;
    Ok((r, w))
}

fn start_error(e: &io::Error) -> WireError {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    let message = if e.kind() == io::ErrorKind::NotFound {
        format!(
            "cannot run the command: there is no 'sh' in the agent's PATH ({}); install a POSIX \
             shell in the target (e.g. busybox) or drop --on-change",
            std::env::var("PATH").unwrap_or_default()
        )
    } else {
        format!("cannot run the command with sh -c in the served directory: {e}")
    };
    WireError::new(errno, message)
}

/// `Op::RunCommand`: runs `command` to its end or until `timeout_ms` have passed.
pub fn run(a: &Agent, command: &str, timeout_ms: u64) -> Result<Done, WireError> {
    let started = Instant::now();
    if a.commands.ended.load(Ordering::SeqCst) {
        return Err(WireError::new(libc::ECANCELED, "the session is ending"));
    }
    let (r, w) = output_pipe().map_err(|e| start_error(&e))?;
    let w2 = w.try_clone().map_err(|e| start_error(&e))?;
    let root = a.root.raw();
    let umask = UMASK.load(Ordering::Relaxed);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::from(w2))
        .process_group(0);
    // SAFETY: fchdir and umask are async-signal-safe; the root descriptor stays open for the
    // agent's life (its O_CLOEXEC only closes it at exec, after the fchdir).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fchdir(root) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::umask(umask as libc::mode_t);
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // Our copies of the pipe's write end close here, so its end means the command's end.
    drop(cmd);
    let mut child = spawned.map_err(|e| start_error(&e))?;
    let pgid = child.id() as i32;
    lock(&a.commands.groups).insert(pgid);
    let deadline = started + Duration::from_millis(timeout_ms);
    let mut out = Tail::default();
    let mut eof = false;
    let mut timed_out = false;
    let status = loop {
        if !eof {
            eof = drain(&r, &mut out);
        }
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let now = Instant::now();
        if now >= deadline || a.commands.ended.load(Ordering::SeqCst) {
            timed_out = now >= deadline;
            // SAFETY: plain syscall on the command's own process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            break child.wait();
        }
        let wait = TICK.min(deadline - now);
        if eof {
            std::thread::sleep(wait);
        } else {
            wait_readable(&r, wait);
        }
    };
    lock(&a.commands.groups).remove(&pgid);
    if !eof {
        drain(&r, &mut out); // what is left; a background process may keep the pipe open
    }
    let status = status.map_err(|e| {
        WireError::new(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("cannot wait for the command: {e}"),
        )
    })?;
    if timed_out {
        out.push(
            format!(
                "\nkmount-agent: the command ran longer than {} ms and was killed with its \
                 process group; make it faster or raise the timeout\n",
                timeout_ms
            )
            .as_bytes(),
        );
    }
    Ok(Done::Command {
        status: status.code(),
        signal: status.signal(),
        output: out.bytes,
        truncated: out.truncated,
        millis: started.elapsed().as_millis() as u64,
    })
}
