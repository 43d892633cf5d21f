//! Running the mount in the background: the command the user typed starts a detached copy of
//! itself in foreground mode, waits until that copy says the mount is ready (or why it is not)
//! through a pipe, prints one line and exits.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
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

    /// A step of a long phase (connecting, reading the tree): on a terminal, the user sees
    /// it on stderr while waiting; in the log it is a plain line.
    pub fn progress(&mut self, text: &str) {
        tracing::info!("{text}");
        match self {
            Ready::Stdout => {
                if std::io::stderr().is_terminal() {
                    eprintln!("kmount: {text}");
                }
            }
            Ready::Pipe(f) => {
                let _ = writeln!(f, "progress {text}");
            }
        }
    }

    /// A [`kmount_mount::Progress`] that reports the walk of the tree (at most twice a second).
    pub fn walk_progress(&self) -> kmount_mount::Progress {
        let out: Option<File> = match self {
            Ready::Pipe(f) => f.try_clone().ok(),
            Ready::Stdout => None,
        };
        let to_stderr = out.is_none() && std::io::stderr().is_terminal();
        // (pipe copy, last report, the first walk is done)
        let out = std::sync::Mutex::new((out, std::time::Instant::now(), false));
        kmount_mount::Progress::new(move |p| {
            let mut guard = out.lock().unwrap_or_else(|e| e.into_inner());
            let (file, last, finished) = &mut *guard;
            // Only the first walk (the mount's) is shown; later rescans are not.
            if p.done || *finished {
                *file = None;
                *finished = true;
                return;
            }
            if last.elapsed() < std::time::Duration::from_millis(500) {
                return;
            }
            *last = std::time::Instant::now();
            let text = format!(
                "reading the tree: {} files, {} so far",
                p.files,
                crate::status::human_bytes(p.bytes)
            );
            let sent = file
                .as_mut()
                .map(|f| writeln!(f, "progress {text}").is_ok());
            match sent {
                Some(true) => {}
                Some(false) => *file = None,
                None if to_stderr => eprintln!("kmount: {text}"),
                None => {}
            }
        })
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
    crate::logs::rotate(log);
    let child = cmd.spawn().context("cannot start the kmount daemon")?;
    drop(write_end);
    // Progress lines until the ready or error line; the daemon may keep a copy of the pipe
    // open after that, so reading stops there.
    let show = std::io::stderr().is_terminal();
    let mut lines = BufReader::new(File::from(read_end)).lines();
    while let Some(line) = lines.next() {
        let line = line.context("cannot read from the kmount daemon")?;
        if let Some(text) = line.strip_prefix("progress ") {
            if show {
                eprintln!("kmount: {text}");
            }
        } else if let Some(line) = line.strip_prefix("ready ") {
            return Ok(line.to_string());
        } else if let Some(msg) = line.strip_prefix("error ") {
            // The rest of a multi-line message follows, up to the daemon's exit.
            let mut msg = msg.to_string();
            for more in lines.map_while(Result::ok) {
                msg.push('\n');
                msg.push_str(&more);
            }
            return Err(anyhow!("{msg}"));
        }
    }
    let tail = log_tail(log, 15);
    bail!(
        "the kmount daemon (pid {}) exited before the mount was ready; its log {} ends with:\n{}\n\
         (`kmount logs {}` shows all of it)",
        child.id(),
        log.display(),
        tail,
        args.last()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default()
    )
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
