//! Running the mount in the background: the command the user typed starts a detached copy of
//! itself in foreground mode, waits until that copy says the mount is ready (or why it is not)
//! through a pipe, prints one line and exits.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};

/// The environment variable through which the background daemon learns its ready-pipe fd.
pub const READY_FD_ENV: &str = "KMOUNT_READY_FD";

/// How the mount runner reports readiness.
pub enum Ready {
    /// Foreground: print the ready line on stdout.
    Stdout,
    /// Background daemon: tell the waiting parent through this pipe.
    Pipe(File),
}

impl Ready {
    /// Picks the pipe when started by [`spawn_background`], else stdout.
    pub fn from_env() -> Ready {
        let fd = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok());
        // SAFETY: `spawn_background` passes a pipe's write end at exactly this fd number, and
        // nothing else in this process uses it; the variable is removed so it is taken once.
        unsafe { std::env::remove_var(READY_FD_ENV) };
        match fd {
            Some(fd) if fd >= 0 => {
                // Children (the agent) must not inherit the pipe: the parent waits for its end.
                // SAFETY: plain fcntl on an fd this process owns.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                Ready::Pipe(unsafe { File::from_raw_fd(fd) })
            }
            _ => Ready::Stdout,
        }
    }

    pub fn is_daemon(&self) -> bool {
        matches!(self, Ready::Pipe(_))
    }

    /// The mount is ready: say so with `line`.
    pub fn ok(&mut self, line: &str) {
        match self {
            Ready::Stdout => println!("{line}"),
            Ready::Pipe(f) => {
                let _ = writeln!(f, "ready {line}");
                // Closing the pipe is what releases the parent.
                *self = Ready::Stdout;
            }
        }
    }

    /// The mount could not be made: tell the parent why (the caller also returns the error).
    pub fn fail(&mut self, err: &anyhow::Error) {
        if let Ready::Pipe(f) = self {
            let _ = writeln!(f, "error {err:#}");
            *self = Ready::Stdout;
        }
    }
}

/// Starts `kmount --foreground ARGS…` detached from the terminal (new session, stdin from
/// /dev/null, output to `log`), waits until it reports, and returns its ready line.
pub fn spawn_background(args: &[&std::ffi::OsStr], log: &Path) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the kmount executable")?;
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("cannot create a pipe to the daemon")?;
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .with_context(|| format!("cannot open the log file {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--foreground")
        .args(args)
        .env(READY_FD_ENV, "3")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let wfd = write_end.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if wfd == 3 {
                let r = libc::fcntl(3, libc::F_SETFD, 0);
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(wfd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("cannot start the kmount daemon")?;
    drop(write_end);
    let mut answer = String::new();
    File::from(read_end)
        .read_to_string(&mut answer)
        .context("cannot read from the kmount daemon")?;
    let answer = answer.trim_end();
    if let Some(line) = answer.strip_prefix("ready ") {
        return Ok(line.to_string());
    }
    if let Some(msg) = answer.strip_prefix("error ") {
        return Err(anyhow!("{msg}"));
    }
    let tail = log_tail(log, 15);
    bail!(
        "the kmount daemon (pid {}) exited before the mount was ready; its log {} ends with:\n{}",
        child.id(),
        log.display(),
        tail
    )
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
