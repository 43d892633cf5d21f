//! ssh targets: `user@host:/path`, `host:path`, `ssh://user@host:port/path`.
//!
//! The system `ssh` client carries the stream, so `~/.ssh/config`, agents, ProxyJump and host
//! aliases work as they do for `ssh` itself. It runs in batch mode: kmount never prompts, and a
//! login that would need a password or a host-key confirmation fails with a message saying
//! what to run once by hand.
//!
//! `KMOUNT_SSH` replaces the `ssh` command (split on whitespace, e.g.
//! `KMOUNT_SSH="ssh -F /path/to/config"`); its options come first, so they override kmount's.

use std::ffi::OsString;
use std::io;
use std::process::{ExitStatus, Stdio};

use anyhow::{Result, bail};
use kmount_mount::{BoxedStream, ConnectFuture, Connector, StderrTail};
use tokio::process::Command;

use crate::install::{ExecFuture, Installer, LocalAgent, RemoteShell, sh_quote};

/// Options kmount always passes (after the user's own, which win).
const SSH_OPTIONS: &[&str] = &[
    "-T",
    "-e",
    "none",
    "-o",
    "BatchMode=yes",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=2",
    "-o",
    "ConnectTimeout=20",
    "-o",
    "LogLevel=ERROR",
];

/// Runs scripts on a host through the system `ssh`.
#[derive(Debug, Clone)]
pub struct SshShell {
    program: OsString,
    /// From `KMOUNT_SSH`, placed before kmount's own options.
    user_args: Vec<OsString>,
    destination: String,
    port: Option<u16>,
}

impl SshShell {
    pub fn new(destination: &str, port: Option<u16>) -> Result<SshShell> {
        let (program, user_args) = match std::env::var("KMOUNT_SSH") {
            Ok(v) if !v.trim().is_empty() => {
                let mut words = v.split_whitespace().map(OsString::from);
                let program = words.next().unwrap_or_else(|| "ssh".into());
                (program, words.collect())
            }
            _ => ("ssh".into(), Vec::new()),
        };
        let program_path = std::path::Path::new(&program);
        let found = if program_path.components().count() > 1 {
            program_path.is_file()
        } else {
            crate::preflight::find_in_path(&program.to_string_lossy()).is_some()
        };
        if !found {
            bail!(
                "{} was not found: kmount reaches ssh targets through the OpenSSH client; \
                 install it (sudo apt-get install openssh-client){}",
                program.to_string_lossy(),
                if std::env::var_os("KMOUNT_SSH").is_some() {
                    " or fix KMOUNT_SSH"
                } else {
                    ""
                }
            );
        }
        Ok(SshShell {
            program,
            user_args,
            destination: destination.to_string(),
            port,
        })
    }

    /// The host part of the destination, for messages.
    fn host(&self) -> &str {
        self.destination
            .rsplit_once('@')
            .map_or(self.destination.as_str(), |(_, h)| h)
    }

    /// `ssh [-p PORT] DEST` as the user would type it.
    fn ssh_words(&self) -> String {
        match self.port {
            Some(p) => format!("ssh -p {p} {}", self.destination),
            None => format!("ssh {}", self.destination),
        }
    }

    pub fn command(&self, remote_command: &str) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.user_args).args(SSH_OPTIONS);
        if let Some(port) = self.port {
            cmd.arg("-p").arg(port.to_string());
        }
        cmd.arg("--").arg(&self.destination).arg(remote_command);
        cmd
    }
}

impl RemoteShell for SshShell {
    fn exec<'a>(&'a self, script: &'a str) -> ExecFuture<'a> {
        Box::pin(async move {
            // The remote login shell parses this line; `sh -c` then runs the script whatever
            // that shell is.
            let remote = format!("exec /bin/sh -c {}", sh_quote(script));
            let mut child = self
                .command(&remote)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Its own process group: a Ctrl-C meant for kmount must not cut the stream
                // before kmount has unmounted cleanly.
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot run {}: {e}", self.program.to_string_lossy()),
                    )
                })?;
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(io::Error::other("ssh's stdio pipes were not created"));
            };
            Ok(BoxedStream {
                reader: Box::new(stdout),
                writer: Box::new(stdin),
                child: Some(child),
                stderr: Some(StderrTail::spawn(stderr)),
            })
        })
    }

    fn describe(&self) -> String {
        match self.port {
            Some(p) => format!("{} (ssh, port {p})", self.destination),
            None => format!("{} (ssh)", self.destination),
        }
    }

    fn transport_error(&self, status: Option<ExitStatus>, stderr: &str) -> Option<String> {
        explain_ssh_failure(
            status.and_then(|s| s.code()),
            stderr,
            self.host(),
            &self.ssh_words(),
            self.port,
        )
    }
}

/// Turns ssh's exit code and error output into a message saying what to do.
pub fn explain_ssh_failure(
    code: Option<i32>,
    stderr: &str,
    host: &str,
    ssh_words: &str,
    port: Option<u16>,
) -> Option<String> {
    let has = |s: &str| stderr.contains(s);
    let first_line = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED") || has("Host key for") && has("has changed") {
        return Some(format!(
            "the host key of {host} has changed since it was last accepted: this can be an attack, \
             or the host was reinstalled. If you know why it changed, remove the old key with \
             `ssh-keygen -R {host}` and accept the new one with `{ssh_words} true`"
        ));
    }
    if has("Host key verification failed") || has("host key is known") {
        let keyscan = match port {
            Some(p) => format!("ssh-keyscan -p {p} {host} >> ~/.ssh/known_hosts"),
            None => format!("ssh-keyscan {host} >> ~/.ssh/known_hosts"),
        };
        return Some(format!(
            "the host key of {host} is not known, and kmount does not ask (it runs ssh in batch \
             mode): connect once with `{ssh_words} true` and accept the key, or add it with \
             `{keyscan}` after checking its fingerprint"
        ));
    }
    if has("Permission denied") || has("Too many authentication failures") {
        return Some(format!(
            "ssh could not log in to {host} ({}): kmount needs a login without a password \
             prompt; check that `{ssh_words} true` works without asking anything (load your key \
             with ssh-add, or install one with `ssh-copy-id {host}`)",
            first_line.trim()
        ));
    }
    if has("Could not resolve hostname") || has("Name or service not known") {
        return Some(format!(
            "cannot resolve the host name {host}: check the spelling, or add a `Host {host}` \
             entry with its HostName to ~/.ssh/config"
        ));
    }
    let port_text = port.map_or("22".to_string(), |p| p.to_string());
    if has("Connection refused") {
        return Some(format!(
            "{host} refused the connection on port {port_text}: is sshd running there, and on \
             that port?"
        ));
    }
    if has("timed out") {
        return Some(format!(
            "the connection to {host} (port {port_text}) timed out: check that the host is up \
             and reachable (VPN, firewall, ProxyJump in ~/.ssh/config)"
        ));
    }
    if has("No route to host") || has("Network is unreachable") {
        return Some(format!(
            "{host} is unreachable ({}): check the network, VPN or ProxyJump settings",
            first_line.trim()
        ));
    }
    if has("Connection closed by") || has("kex_exchange_identification") {
        return Some(format!(
            "{host} closed the connection before login ({}): its sshd may be refusing \
             connections (MaxStartups, AllowUsers, a firewall); try `{ssh_words} true`",
            first_line.trim()
        ));
    }
    if code == Some(255) {
        return Some(format!(
            "ssh to {host} failed: {}; try `{ssh_words} true` to see why",
            if stderr.trim().is_empty() {
                "no error output"
            } else {
                stderr.trim()
            }
        ));
    }
    if code == Some(127) && has("/bin/sh") {
        return Some(format!(
            "{host} has no /bin/sh, which kmount needs to start its agent there"
        ));
    }
    None
}

/// The path the agent serves, as given to it on the remote: relative paths (and `~/...`) are
/// relative to the login directory, which is where ssh starts commands.
pub fn remote_root(path: &str) -> String {
    match path {
        "" | "~" | "~/" => ".".to_string(),
        p => match p.strip_prefix("~/") {
            Some(rest) => rest.to_string(),
            None => p.to_string(),
        },
    }
}

/// An ssh target: who to log in as where, and the directory there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// `user@host` or `host` (an alias from ~/.ssh/config is fine), as given to ssh.
    pub destination: String,
    pub port: Option<u16>,
    /// Absolute, or relative to the login directory (empty: the login directory itself).
    pub path: String,
}

impl SshTarget {
    /// Parses `ssh://[user@]host[:port][/path]` and `[user]@host:[path]`. `None`: not an ssh
    /// target (a bare `host:/path` is left to the Kubernetes form `NAME:/path`, as kubectl cp
    /// reads it; write `ssh://host/path` for an ssh host alias without a user).
    pub fn parse(arg: &str) -> Option<Result<SshTarget>> {
        if let Some(rest) = arg.strip_prefix("ssh://") {
            return Some(Self::parse_url(arg, rest));
        }
        let at = arg.find('@')?;
        let colon_before_at = arg[..at].contains(':') || arg[..at].contains('/');
        if colon_before_at {
            return None;
        }
        let (user, rest) = (&arg[..at], &arg[at + 1..]);
        let (host, path) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            (host, after.strip_prefix(':')?)
        } else {
            rest.split_once(':')?
        };
        Some(Self::build(arg, user, host, None, path))
    }

    fn parse_url(arg: &str, rest: &str) -> Result<SshTarget> {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (u, h),
            None => ("", authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let Some((host, after)) = v6.split_once(']') else {
                bail!("'{arg}': the IPv6 address lacks its closing ']'");
            };
            (host, after.strip_prefix(':'))
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => bail!("'{arg}': '{p}' is not a port number (1-65535)"),
            },
        };
        // `ssh://host/~/src` names a directory relative to the login directory.
        let path = match path.strip_prefix("/~") {
            Some(r) if r.is_empty() || r.starts_with('/') => format!("~{r}"),
            _ => path.to_string(),
        };
        Self::build(arg, user, host, port, &path)
    }

    fn build(arg: &str, user: &str, host: &str, port: Option<u16>, path: &str) -> Result<Self> {
        if host.is_empty() {
            bail!("'{arg}' names no host; write it as user@host:/path or ssh://user@host/path");
        }
        let bad = |s: &str| s.starts_with('-') || s.chars().any(|c| c.is_whitespace() || c == '\0');
        if bad(host) || bad(user) {
            bail!("'{arg}': the user or host name is not valid for ssh");
        }
        if arg.contains('@') && !arg.starts_with("ssh://") && user.is_empty() {
            bail!("'{arg}' names no user before '@'; write user@host:/path, or ssh://host/path");
        }
        if path.contains('\0') {
            bail!("the remote path in '{arg}' contains a NUL byte");
        }
        // `~` and `~/x` are the login directory and x in it: stored as "" and "x".
        let path = match path.strip_prefix('~') {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
            _ => path,
        };
        let destination = if user.is_empty() {
            host.to_string()
        } else {
            format!("{user}@{host}")
        };
        Ok(SshTarget {
            destination,
            port,
            path: path.to_string(),
        })
    }

    /// The target as the user would type it again (it parses back to the same target).
    pub fn to_string_form(&self) -> String {
        let (user, host) = match self.destination.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, self.destination.as_str()),
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let user_at = user.map(|u| format!("{u}@")).unwrap_or_default();
        match (self.port, user) {
            (None, Some(_)) => format!("{user_at}{host}:{}", self.path),
            (port, _) => {
                let port = port.map(|p| format!(":{p}")).unwrap_or_default();
                let path = if self.path.starts_with('/') {
                    self.path.clone()
                } else if self.path.is_empty() {
                    String::new()
                } else {
                    format!("/~/{}", self.path)
                };
                format!("ssh://{user_at}{host}{port}{path}")
            }
        }
    }
}

/// A [`Connector`] that runs the agent on a host through ssh, installing it there when needed.
/// Each connect is a new ssh session, so reconnects call it again.
#[derive(Debug)]
pub struct SshConnector {
    shell: SshShell,
    installer: Installer,
    args: Vec<String>,
}

impl SshConnector {
    pub fn new(target: &SshTarget) -> Result<SshConnector> {
        let shell = SshShell::new(&target.destination, target.port)?;
        let agent = LocalAgent::load(&crate::connect::agent_binary()?)?;
        Ok(SshConnector {
            shell,
            installer: Installer::new(agent),
            args: vec!["--".to_string(), remote_root(&target.path)],
        })
    }
}

impl Connector for SshConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let launched = self
                .installer
                .launch(&self.shell, &self.args)
                .await
                .map_err(|e| io::Error::other(format!("{e:#}")))?;
            tracing::debug!(
                "{}: agent {} ({:?})",
                self.shell.describe(),
                launched.path,
                launched.outcome
            );
            Ok(launched.stream)
        })
    }

    fn describe(&self) -> String {
        format!("kmount-agent on {}", self.shell.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explain(code: i32, stderr: &str) -> String {
        explain_ssh_failure(Some(code), stderr, "box", "ssh -p 2222 me@box", Some(2222))
            .unwrap_or_default()
    }

    #[test]
    fn ssh_failures_say_what_to_do() {
        let e = explain(255, "Host key verification failed.\r\n");
        assert!(
            e.contains("not known") && e.contains("ssh -p 2222 me@box true"),
            "{e}"
        );
        assert!(e.contains("ssh-keyscan -p 2222 box"), "{e}");
        let e = explain(
            255,
            "@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n",
        );
        assert!(e.contains("ssh-keygen -R box"), "{e}");
        let e = explain(255, "me@box: Permission denied (publickey).\n");
        assert!(
            e.contains("could not log in") && e.contains("(publickey)"),
            "{e}"
        );
        let e = explain(
            255,
            "ssh: Could not resolve hostname box: Name or service not known",
        );
        assert!(e.contains("cannot resolve"), "{e}");
        let e = explain(
            255,
            "ssh: connect to host box port 2222: Connection refused",
        );
        assert!(e.contains("refused the connection on port 2222"), "{e}");
        let e = explain(
            255,
            "ssh: connect to host box port 22: Connection timed out",
        );
        assert!(e.contains("timed out"), "{e}");
        let e = explain(255, "something new");
        assert!(e.contains("something new"), "{e}");
        assert!(
            explain_ssh_failure(Some(1), "ls: x: no such file", "box", "ssh box", None).is_none()
        );
    }

    fn parse(arg: &str) -> Option<SshTarget> {
        SshTarget::parse(arg).map(|r| r.unwrap())
    }

    fn t(destination: &str, port: Option<u16>, path: &str) -> Option<SshTarget> {
        Some(SshTarget {
            destination: destination.into(),
            port,
            path: path.into(),
        })
    }

    #[test]
    fn target_forms() {
        assert_eq!(parse("me@box:/srv/app"), t("me@box", None, "/srv/app"));
        assert_eq!(parse("me@box:src"), t("me@box", None, "src"));
        assert_eq!(parse("me@box:"), t("me@box", None, ""));
        assert_eq!(parse("me@[::1]:/x"), t("me@::1", None, "/x"));
        assert_eq!(
            parse("ssh://me@box:2222/srv"),
            t("me@box", Some(2222), "/srv")
        );
        assert_eq!(parse("ssh://box/srv"), t("box", None, "/srv"));
        assert_eq!(parse("ssh://box"), t("box", None, ""));
        assert_eq!(parse("ssh://box/~/src"), t("box", None, "src"));
        assert_eq!(parse("me@box:~/src"), t("me@box", None, "src"));
        assert_eq!(parse("me@box:~"), t("me@box", None, ""));
        assert_eq!(parse("ssh://me@[::1]:22/x"), t("me@::1", Some(22), "/x"));
        // Not ssh: Kubernetes forms and local paths.
        assert_eq!(parse("deploy/app:/app"), None);
        assert_eq!(parse("app:/app"), None);
        assert_eq!(parse("me@box"), None);
        assert!(SshTarget::parse("ssh://box:0/x").unwrap().is_err());
        assert!(SshTarget::parse("ssh://box:http/x").unwrap().is_err());
        assert!(SshTarget::parse("@box:/x").unwrap().is_err());
        assert!(SshTarget::parse("me@-oProxyCommand=x:/x").unwrap().is_err());
        assert!(SshTarget::parse("ssh:///x").unwrap().is_err());
    }

    #[test]
    fn target_round_trips() {
        for arg in [
            "me@box:/srv/app",
            "me@box:src",
            "me@box:",
            "me@[::1]:/x",
            "ssh://me@box:2222/srv",
            "ssh://box/srv",
            "ssh://box",
            "ssh://box/~/src",
            "ssh://box:2200/~",
            "ssh://[::1]:22/x",
        ] {
            let target = parse(arg).unwrap();
            let again = target.to_string_form();
            assert_eq!(parse(&again).as_ref(), Some(&target), "{arg} -> {again}");
        }
        let rel = SshTarget {
            destination: "box".into(),
            port: Some(1),
            path: "src".into(),
        };
        assert_eq!(parse(&rel.to_string_form()), Some(rel));
    }

    #[test]
    fn remote_roots() {
        assert_eq!(remote_root(""), ".");
        assert_eq!(remote_root("~"), ".");
        assert_eq!(remote_root("~/src/app"), "src/app");
        assert_eq!(remote_root("src"), "src");
        assert_eq!(remote_root("/srv/app"), "/srv/app");
    }

    #[test]
    fn command_line_puts_user_options_first() {
        let shell = SshShell {
            program: "ssh".into(),
            user_args: vec!["-F".into(), "/cfg".into()],
            destination: "me@box".into(),
            port: Some(2222),
        };
        let cmd = shell.command("true");
        let args: Vec<String> = cmd
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&args[..2], ["-F", "/cfg"]);
        assert!(args.contains(&"BatchMode=yes".to_string()));
        let n = args.len();
        assert_eq!(&args[n - 5..], ["-p", "2222", "--", "me@box", "true"]);
    }
}
