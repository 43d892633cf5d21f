//! ssh targets end to end: a real `sshd` (started here, on 127.0.0.1, with its own keys and
//! configs; nothing touches ~/.ssh), the real `kmount` reaching it with the system `ssh`
//! through `KMOUNT_SSH="ssh -F <config>"`, the agent installed into the remote's `$TMPDIR`.
//!
//! Needs `sshd` and `ssh` (openssh-server, openssh-client: `scripts/deps.sh --test`); without
//! them the tests fail saying so.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kmount_bench::delay::DelayRelay;
use kmount_bench::sshd::{HOST_ALIAS, TestSshd, Variant};
use kmount_tests::{
    CmdOutput, MOUNT_TIMEOUT, UNMOUNT_TIMEOUT, agent_bin, force_unmount, is_mounted, kmount_cmd,
    logs_in, mounts_under, require_fuse, run_timeout, temp_dir,
};

fn start_sshd() -> TestSshd {
    TestSshd::start().unwrap_or_else(|e| panic!("cannot start the test sshd: {e}"))
}

/// A directory served over ssh and a mountpoint, with kmount's state kept apart.
struct Setup {
    remote: PathBuf,
    mnt: PathBuf,
    state: PathBuf,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        require_fuse();
        let dir = temp_dir();
        let remote = dir.path().join("remote");
        let mnt = dir.path().join("mnt");
        let state = dir.path().join("state");
        fs::create_dir(&remote).unwrap();
        fs::create_dir(&mnt).unwrap();
        Setup {
            remote,
            mnt,
            state,
            dir,
        }
    }

    fn kmount(&self, ssh: &str) -> Command {
        let mut cmd = kmount_cmd();
        cmd.env("KMOUNT_STATE_DIR", &self.state)
            .env("KMOUNT_SSH", ssh)
            .env("KMOUNT_LOG", "info");
        cmd
    }

    /// `kmount TARGET MNT`.
    fn mount(&self, ssh: &str, target: &str) -> CmdOutput {
        run_timeout(
            self.kmount(ssh).arg(target).arg(&self.mnt),
            MOUNT_TIMEOUT * 2,
        )
    }

    fn unmount(&self) {
        let out = run_timeout(
            self.kmount("ssh").arg("unmount").arg(&self.mnt),
            UNMOUNT_TIMEOUT,
        );
        let cleanup = force_unmount(&self.mnt);
        assert!(
            out.success() && cleanup.is_empty(),
            "`kmount unmount` failed: {out}\n{cleanup}"
        );
    }

    /// Nothing of this test is left mounted.
    fn assert_nothing_mounted(&self) {
        let left = mounts_under(self.dir.path());
        for m in &left {
            force_unmount(m);
        }
        assert!(left.is_empty(), "left mounted: {left:?}");
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for m in mounts_under(self.dir.path()) {
            let _ = run_timeout(self.kmount("ssh").arg("unmount").arg(&m), UNMOUNT_TIMEOUT);
            force_unmount(&m);
        }
    }
}

fn target(port: u16, path: &Path) -> String {
    format!("ssh://{HOST_ALIAS}:{port}{}", path.display())
}

#[test]
fn mount_over_ssh_installs_the_agent_once_and_works_through_a_slow_link() {
    let sshd = start_sshd();
    let relay = DelayRelay::start(sshd.addr(), Duration::from_millis(10)).unwrap();
    let s = Setup::new();
    fs::write(s.remote.join("hello.txt"), b"hello from the remote\n").unwrap();
    fs::create_dir(s.remote.join("dir")).unwrap();
    let ssh = sshd.ssh_command(Variant::Good);
    let agent_size = fs::metadata(agent_bin()).unwrap().len();

    // First mount: the agent is sent.
    let up_before = relay.bytes_up();
    let out = s.mount(&ssh, &target(relay.port(), &s.remote));
    assert!(
        out.success(),
        "mount failed: {out}\n{}\n{}",
        logs_in(&s.state),
        sshd.log()
    );
    assert!(is_mounted(&s.mnt), "{out}");
    assert!(out.stdout.contains("mounted"), "{out}");
    let sent = relay.bytes_up() - up_before;
    assert!(
        sent >= agent_size,
        "the first mount sent {sent} bytes, less than the agent ({agent_size})"
    );
    let cached: Vec<_> = walk(&sshd.remote_tmp())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kmount-agent"))
        .collect();
    assert_eq!(cached.len(), 1, "one cached agent: {cached:?}");
    assert_eq!(fs::metadata(&cached[0]).unwrap().len(), agent_size);
    assert!(
        cached[0].parent().unwrap().metadata().unwrap().mode() & 0o077 == 0,
        "the cache directory is private"
    );

    // Reads, writes, stat, rename through the mount land in the remote directory.
    assert_eq!(
        fs::read(s.mnt.join("hello.txt")).unwrap(),
        b"hello from the remote\n"
    );
    let m = fs::metadata(s.mnt.join("hello.txt")).unwrap();
    let r = fs::metadata(s.remote.join("hello.txt")).unwrap();
    assert_eq!((m.len(), m.ino(), m.mtime()), (r.len(), r.ino(), r.mtime()));
    assert!(fs::metadata(s.mnt.join("dir")).unwrap().is_dir());
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(s.mnt.join("dir/new.bin"), &payload).unwrap();
    fs::rename(s.mnt.join("dir/new.bin"), s.mnt.join("renamed.bin")).unwrap();
    assert_eq!(fs::read(s.mnt.join("renamed.bin")).unwrap(), payload);
    s.unmount();
    assert_eq!(fs::read(s.remote.join("renamed.bin")).unwrap(), payload);
    assert!(!s.remote.join("dir/new.bin").exists());
    s.assert_nothing_mounted();

    // Second mount: the cached agent is used, the binary is not sent again.
    let up_before = relay.bytes_up();
    let out = s.mount(&ssh, &target(relay.port(), &s.remote));
    assert!(
        out.success(),
        "second mount failed: {out}\n{}",
        logs_in(&s.state)
    );
    let sent = relay.bytes_up() - up_before;
    assert!(
        sent < agent_size / 4,
        "the second mount sent {sent} bytes: the agent ({agent_size} bytes) was sent again"
    );
    assert_eq!(fs::read(s.mnt.join("renamed.bin")).unwrap(), payload);
    fs::write(s.mnt.join("second.txt"), b"2").unwrap();
    s.unmount();
    assert_eq!(fs::read(s.remote.join("second.txt")).unwrap(), b"2");
    s.assert_nothing_mounted();
}

#[test]
fn scp_form_and_direct_port() {
    // `user@host:path` goes through ssh's own config for the port (no relay here).
    let sshd = start_sshd();
    let s = Setup::new();
    fs::write(s.remote.join("a"), b"a").unwrap();
    let target = format!("{}@{HOST_ALIAS}:{}", sshd.user(), s.remote.display());
    let out = s.mount(&sshd.ssh_command(Variant::Good), &target);
    assert!(out.success(), "{out}\n{}", logs_in(&s.state));
    assert_eq!(fs::read(s.mnt.join("a")).unwrap(), b"a");
    let list = run_timeout(s.kmount("ssh").arg("list"), Duration::from_secs(10));
    assert!(list.stdout.contains(&target), "{list}");
    s.unmount();
    s.assert_nothing_mounted();
}

/// The `ssh` processes the kmount daemon of `mnt` runs (children of the daemon).
fn ssh_children_of_daemon(mnt: &Path) -> Vec<i32> {
    let mnt = mnt.to_string_lossy().into_owned();
    let cmdline = |pid: &str| -> Vec<String> {
        fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    };
    let ppid = |pid: &str| -> Option<String> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?
            .1
            .split(' ')
            .nth(1)
            .map(String::from)
    };
    let pids: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .collect();
    let daemons: Vec<&String> = pids
        .iter()
        .filter(|p| {
            let args = cmdline(p);
            args.first().is_some_and(|a| a.ends_with("kmount")) && args.contains(&mnt)
        })
        .collect();
    pids.iter()
        .filter(|p| {
            cmdline(p).first().is_some_and(|a| a == "ssh")
                && ppid(p).is_some_and(|pp| daemons.contains(&&pp))
        })
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_cut_ssh_connection_is_reconnected_with_the_cached_agent() {
    let sshd = start_sshd();
    let s = Setup::new();
    fs::write(s.remote.join("a"), b"a").unwrap();
    let out = s.mount(
        &sshd.ssh_command(Variant::Good),
        &target(sshd.port(), &s.remote),
    );
    assert!(out.success(), "{out}\n{}", logs_in(&s.state));
    assert_eq!(fs::read(s.mnt.join("a")).unwrap(), b"a");
    let ssh = ssh_children_of_daemon(&s.mnt);
    assert_eq!(ssh.len(), 1, "one ssh session: {ssh:?}");
    // Cut the stream: kill the daemon's ssh (a process of this test's own mount).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ssh[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if fs::write(s.mnt.join("after.txt"), b"after").is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the mount did not come back within 60 s:\n{}",
            logs_in(&s.state)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // With write-back the write above may be taken before the session is back: wait for it.
    let mut again = ssh_children_of_daemon(&s.mnt);
    while !(again.len() == 1 && again != ssh) {
        assert!(
            std::time::Instant::now() < deadline,
            "no new ssh session within 60 s: {again:?}\n{}",
            logs_in(&s.state)
        );
        std::thread::sleep(Duration::from_millis(200));
        again = ssh_children_of_daemon(&s.mnt);
    }
    s.unmount();
    assert_eq!(fs::read(s.remote.join("after.txt")).unwrap(), b"after");
    s.assert_nothing_mounted();
}

/// `kmount` fails with a message containing every one of `expect`, and mounts nothing.
fn assert_fails(s: &Setup, ssh: &str, target: &str, expect: &[&str]) {
    let out = s.mount(ssh, target);
    assert!(!out.success(), "`kmount {target}` succeeded: {out}");
    for e in expect {
        assert!(
            out.stderr.contains(e),
            "`kmount {target}`: the error does not say {e:?}:\n{out}"
        );
    }
    assert!(!is_mounted(&s.mnt));
    s.assert_nothing_mounted();
}

#[test]
fn ssh_failures_are_explained_and_leave_nothing_mounted() {
    let sshd = start_sshd();
    let s = Setup::new();
    let good = target(sshd.port(), &s.remote);

    assert_fails(
        &s,
        &sshd.ssh_command(Variant::WrongHostKey),
        &good,
        &["host key", "has changed", "ssh-keygen -R"],
    );
    assert_fails(
        &s,
        &sshd.ssh_command(Variant::UnknownHostKey),
        &good,
        &["host key", "not known", "true`"],
    );
    assert_fails(
        &s,
        &sshd.ssh_command(Variant::UnauthorizedKey),
        &good,
        &["could not log in", "publickey", "without asking"],
    );
    // The agent itself says the directory is missing.
    let missing = s.dir.path().join("no-such-dir");
    assert_fails(
        &s,
        &sshd.ssh_command(Variant::Good),
        &target(sshd.port(), &missing),
        &["no-such-dir", "check that the directory exists"],
    );
    // Nothing listens on the port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_fails(
        &s,
        &sshd.ssh_command(Variant::Good),
        &target(closed, &s.remote),
        &["refused the connection", &closed.to_string()],
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
