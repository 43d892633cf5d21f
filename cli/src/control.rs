//! The daemon's control socket: a Unix socket in the private run directory through which the
//! `kmount` commands talk to a running mount.
//!
//! Protocol: the client sends one command line, the daemon answers one line, `ok [DATA]` or
//! `error: MESSAGE`. Commands (answered in `run.rs`): `ping` (the pid), `wait`, `unmount`,
//! `status` (a [`crate::status::MountStatus`] as JSON), `pending` (a
//! [`crate::unmount::Unapplied`] as JSON), `why JSON` (a [`crate::why::Question`], answered
//! with a [`crate::why::Answer`]), `confirm` (applies a paused mass removal; a
//! [`crate::confirm::Confirmed`]). Only the daemon's own uid (or root) may connect.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A command received on the control socket, with the connection to answer it on.
pub struct ControlRequest {
    pub command: String,
    conn: UnixStream,
}

impl ControlRequest {
    /// Writes the answer line to the client before returning, so a daemon that exits right
    /// after answering (`unmount`) never leaves the client without its answer.
    pub fn answer(mut self, line: &str) {
        if let Err(e) = writeln!(self.conn, "{line}") {
            tracing::debug!("control connection: cannot answer: {e}");
        }
    }
}

/// Listens on `path` and forwards each command to `requests_tx`.
pub fn serve(path: &Path, requests_tx: mpsc::Sender<ControlRequest>) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let requests_tx = requests_tx.clone();
                std::thread::spawn(move || {
                    if let Err(e) = handle(conn, me, requests_tx) {
                        tracing::debug!("control connection: {e:#}");
                    }
                });
            }
        })?;
    Ok(())
}

fn handle(conn: UnixStream, me: u32, requests_tx: mpsc::Sender<ControlRequest>) -> Result<()> {
    let cred = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)?;
    let mut writer = conn.try_clone()?;
    if cred.uid() != me && cred.uid() != 0 {
        writeln!(writer, "error: permission denied (uid {})", cred.uid())?;
        return Ok(());
    }
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let request = ControlRequest {
        command: line.trim().to_string(),
        conn: writer,
    };
    if let Err(mpsc::SendError(request)) = requests_tx.send(request) {
        request.answer("error: the mount is shutting down");
    }
    Ok(())
}

/// Sends `command` to the daemon behind `path` and returns its answer after `ok`.
pub fn request(path: &Path, command: &str, timeout: Duration) -> Result<String> {
    let mut conn = UnixStream::connect(path)
        .with_context(|| format!("cannot reach the kmount daemon at {}", path.display()))?;
    conn.set_read_timeout(Some(timeout))?;
    writeln!(conn, "{command}")?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .context("the kmount daemon did not answer in time")?;
    let line = line.trim_end();
    if let Some(rest) = line.strip_prefix("ok") {
        return Ok(rest.trim().to_string());
    }
    if let Some(rest) = line.strip_prefix("error: ") {
        bail!("{rest}");
    }
    if line.is_empty() {
        bail!("the kmount daemon closed the connection without answering");
    }
    bail!("unexpected answer from the kmount daemon: {line}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_answer() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let (tx, rx) = mpsc::channel();
        serve(&sock, tx).unwrap();
        std::thread::spawn(move || {
            for req in rx {
                let answer = match req.command.as_str() {
                    "ping" => "ok pong".to_string(),
                    other => format!("error: unknown command {other}"),
                };
                req.answer(&answer);
            }
        });
        assert_eq!(
            request(&sock, "ping", Duration::from_secs(5)).unwrap(),
            "pong"
        );
        let e = request(&sock, "bogus", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("unknown command bogus"));
    }
}
