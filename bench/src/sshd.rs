//! A throwaway OpenSSH server on 127.0.0.1 for tests and benchmarks: its own host key, its own
//! client key, its own config files in a temporary directory. Nothing reads or writes ~/.ssh:
//! clients use `ssh -F <dir>/ssh_config` (see [`TestSshd::ssh_command`]), which names the
//! host alias [`HOST_ALIAS`].
//!
//! The sshd process is this process's child; dropping the [`TestSshd`] stops it by its PID.

use std::fs;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `Host` name the client configs define.
pub const HOST_ALIAS: &str = "kmount-test";
/// The name the host key is recorded under, whatever port (direct or through a relay) is used.
const HOST_KEY_ALIAS: &str = "kmount-test-sshd";

/// How a client config differs from the working one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Everything right.
    Good,
    /// known_hosts holds another key for the server.
    WrongHostKey,
    /// known_hosts holds nothing for the server.
    UnknownHostKey,
    /// The client key is not in authorized_keys.
    UnauthorizedKey,
}

pub struct TestSshd {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
    user: String,
}

fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(extra.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

fn missing(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{what} is not installed: install openssh-server and openssh-client \
             (scripts/deps.sh --test does)"
        ),
    )
}

fn run(cmd: &mut Command, what: &str) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn keygen(path: &Path) -> io::Result<String> {
    let keygen = find_program("ssh-keygen", &[]).ok_or_else(|| missing("ssh-keygen"))?;
    run(
        Command::new(keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "kmount-test", "-f"])
            .arg(path),
        "ssh-keygen",
    )?;
    let public = fs::read_to_string(path.with_extension("pub"))?;
    Ok(public.trim().to_string())
}

fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

impl TestSshd {
    /// Generates keys and configs in a new temporary directory and starts sshd on a free
    /// port of 127.0.0.1; returns once it accepts connections.
    pub fn start() -> io::Result<TestSshd> {
        let sshd = find_program("sshd", &["/usr/sbin/sshd", "/usr/local/sbin/sshd"])
            .ok_or_else(|| missing("sshd"))?;
        find_program("ssh", &[]).ok_or_else(|| missing("ssh"))?;
        let sftp = [
            "/usr/lib/openssh/sftp-server",
            "/usr/libexec/openssh/sftp-server",
            "/usr/libexec/sftp-server",
        ]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("internal-sftp");
        let dir = tempfile::Builder::new().prefix("kmount-sshd-").tempdir()?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let d = dir.path();
        let host_pub = keygen(&d.join("host_key"))?;
        let other_host_pub = keygen(&d.join("other_host_key"))?;
        let client_pub = keygen(&d.join("client_key"))?;
        keygen(&d.join("stranger_key"))?;
        fs::write(d.join("authorized_keys"), format!("{client_pub}\n"))?;
        let host_key_line = |public: &str| {
            let mut words = public.split_whitespace();
            let (kind, key) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            format!("{HOST_KEY_ALIAS} {kind} {key}\n")
        };
        fs::write(d.join("known_hosts"), host_key_line(&host_pub))?;
        fs::write(d.join("known_hosts.wrong"), host_key_line(&other_host_pub))?;
        fs::write(d.join("known_hosts.empty"), "")?;
        fs::create_dir_all(d.join("remote-tmp"))?;

        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .ok_or_else(|| io::Error::other("cannot find the name of the current user"))?;
        if nix::unistd::geteuid().is_root() {
            // Debian's sshd needs its privilege separation directory.
            fs::create_dir_all("/run/sshd")?;
        }
        let port = free_port()?;
        let config = format!(
            "Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AcceptEnv TMPDIR
Subsystem sftp {sftp}
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
MaxStartups 200
MaxSessions 100
LogLevel ERROR
",
            d = d.display()
        );
        fs::write(d.join("sshd_config"), config)?;
        let log = fs::File::create(d.join("sshd.log"))?;
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut me = TestSshd {
            dir,
            child,
            port,
            user,
        };
        for v in [
            Variant::Good,
            Variant::WrongHostKey,
            Variant::UnknownHostKey,
            Variant::UnauthorizedKey,
        ] {
            me.write_config(v)?;
        }
        me.wait_ready()?;
        Ok(me)
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "sshd exited at once ({status}): {}",
                    self.log()
                )));
            }
            if let Ok(mut s) = TcpStream::connect(self.addr()) {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut banner = [0u8; 4];
                if s.read_exact(&mut banner).is_ok() && &banner == b"SSH-" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "sshd did not accept connections on port {} within 10 s: {}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn config_path(&self, v: Variant) -> PathBuf {
        let name = match v {
            Variant::Good => "ssh_config",
            Variant::WrongHostKey => "ssh_config.wrong-host-key",
            Variant::UnknownHostKey => "ssh_config.unknown-host-key",
            Variant::UnauthorizedKey => "ssh_config.unauthorized-key",
        };
        self.dir.path().join(name)
    }

    fn write_config(&self, v: Variant) -> io::Result<()> {
        let d = self.dir.path();
        let known_hosts = match v {
            Variant::WrongHostKey => "known_hosts.wrong",
            Variant::UnknownHostKey => "known_hosts.empty",
            _ => "known_hosts",
        };
        let key = match v {
            Variant::UnauthorizedKey => "stranger_key",
            _ => "client_key",
        };
        let config = format!(
            "Host {HOST_ALIAS}
  HostName 127.0.0.1
  Port {port}
  User {user}
  IdentityFile {d}/{key}
  IdentitiesOnly yes
  IdentityAgent none
  UserKnownHostsFile {d}/{known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  HostKeyAlias {HOST_KEY_ALIAS}
  UpdateHostKeys no
  PasswordAuthentication no
  KbdInteractiveAuthentication no
  ControlMaster no
  ControlPath none
  SetEnv TMPDIR={d}/remote-tmp
",
            port = self.port,
            user = self.user,
            d = d.display(),
        );
        fs::write(self.config_path(v), config)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temporary directory with the keys and configs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `$TMPDIR` of the sessions clients open (the agent cache lives below it).
    pub fn remote_tmp(&self) -> PathBuf {
        self.dir.path().join("remote-tmp")
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The client config for `v`, to use as `ssh -F PATH`.
    pub fn config(&self, v: Variant) -> PathBuf {
        self.config_path(v)
    }

    /// `ssh -F <config>`: the command line for `KMOUNT_SSH` and sshfs's `ssh_command`.
    pub fn ssh_command(&self, v: Variant) -> String {
        format!("ssh -F {}", self.config_path(v).display())
    }

    /// What sshd logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for TestSshd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssh(sshd: &TestSshd, v: Variant, port: Option<u16>) -> std::process::Output {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(sshd.config(v))
            .args(["-o", "BatchMode=yes"]);
        if let Some(p) = port {
            cmd.arg("-p").arg(p.to_string());
        }
        cmd.arg(HOST_ALIAS)
            .arg("echo ok $TMPDIR")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    #[test]
    fn logs_in_with_its_own_keys_only() {
        let sshd = TestSshd::start().unwrap();
        let out = ssh(&sshd, Variant::Good, None);
        assert!(out.status.success(), "{out:?} {}", sshd.log());
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.trim(),
            format!("ok {}", sshd.remote_tmp().display()),
            "the remote TMPDIR is the test's"
        );
        // Through a relay, the host key still matches (HostKeyAlias).
        let relay =
            crate::delay::DelayRelay::start(sshd.addr(), Duration::from_millis(10)).unwrap();
        let out = ssh(&sshd, Variant::Good, Some(relay.port()));
        assert!(out.status.success(), "{out:?}");
        assert!(relay.bytes_up() > 0);

        for (v, expect) in [
            (Variant::WrongHostKey, "HOST IDENTIFICATION HAS CHANGED"),
            (Variant::UnknownHostKey, "Host key verification failed"),
            (Variant::UnauthorizedKey, "Permission denied"),
        ] {
            let out = ssh(&sshd, v, None);
            assert_eq!(out.status.code(), Some(255), "{v:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(expect), "{v:?}: {err}");
        }
        let pid = sshd.pid();
        drop(sshd);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || {
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                stat.contains(") Z ")
            }
        );
    }
}
