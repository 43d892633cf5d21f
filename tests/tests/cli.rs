//! The `kmount` command line: bad input is refused with a clear message and leaves nothing
//! mounted; `list`, `unmount`, `unmount --all`, foreground mode and signals.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kmount_tests::*;

/// A scratch directory with its own `KMOUNT_STATE_DIR`; on drop, anything still mounted below
/// it is taken down (so a failing test leaves nothing behind).
struct Scratch {
    dir: tempfile::TempDir,
    state: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        require_fuse();
        let dir = temp_dir();
        let state = dir.path().join("state");
        Scratch { dir, state }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }

    fn kmount(&self) -> Command {
        let mut cmd = kmount_cmd();
        cmd.env("KMOUNT_STATE_DIR", &self.state);
        cmd
    }

    fn run(&self, args: &[&Path]) -> CmdOutput {
        run_timeout(self.kmount().args(args), MOUNT_TIMEOUT)
    }

    fn list(&self) -> CmdOutput {
        let out = run_timeout(self.kmount().arg("list"), MOUNT_TIMEOUT);
        assert!(out.success(), "kmount list failed: {out}");
        out
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut left = mounts_under(self.dir.path());
        left.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for mnt in &left {
            let cleanup = force_unmount(mnt);
            eprintln!("cleaned up a mount left at {}: {cleanup}", mnt.display());
        }
        if !left.is_empty() && !std::thread::panicking() {
            panic!("mounts were left behind: {left:?}");
        }
    }
}

/// kmount refused: non-zero exit, a message on stderr naming `mentions`, no panic, and nothing
/// mounted below the scratch dir nor listed by `kmount list`.
#[track_caller]
fn assert_refused(s: &Scratch, out: &CmdOutput, mentions: &Path) {
    assert!(out.status.is_some(), "kmount hung: {out}");
    assert!(!out.success(), "kmount accepted bad input: {out}");
    let err = out.stderr.trim();
    assert!(!err.is_empty(), "no message on stderr: {out}");
    assert!(!err.contains("panicked"), "kmount panicked: {out}");
    let name = mentions.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(&*name),
        "the message does not name the offending path {}: {out}",
        mentions.display()
    );
    let left = mounts_under(s.dir.path());
    assert!(
        left.is_empty(),
        "something was mounted anyway: {left:?}\n{out}"
    );
    let list = s.list();
    assert!(
        !list.stdout.contains(&*s.dir.path().to_string_lossy()),
        "kmount list shows a mount after a refused one:\n{list}"
    );
}

#[test]
fn missing_mountpoint() {
    let s = Scratch::new();
    let target = s.mkdir("target");
    let mnt = s.path("no-such-mnt");
    let out = s.run(&[&target, &mnt]);
    assert_refused(&s, &out, &mnt);
    assert!(!mnt.exists(), "kmount created the mountpoint");
}

#[test]
fn non_empty_mountpoint() {
    let s = Scratch::new();
    let target = s.mkdir("target");
    let mnt = s.mkdir("mnt");
    fs::write(mnt.join("precious"), b"keep me").unwrap();
    let out = s.run(&[&target, &mnt]);
    assert_refused(&s, &out, &mnt);
    assert_eq!(fs::read(mnt.join("precious")).unwrap(), b"keep me");
}

#[test]
fn mountpoint_is_a_file() {
    let s = Scratch::new();
    let target = s.mkdir("target");
    let mnt = s.path("file");
    fs::write(&mnt, b"x").unwrap();
    let out = s.run(&[&target, &mnt]);
    assert_refused(&s, &out, &mnt);
}

#[test]
fn already_mounted_mountpoint() {
    // The existing mount serves an empty dir, so the mountpoint looks empty: only the "already
    // mounted" check can refuse this.
    let m = Mounted::new();
    let other = m.dir().join("other");
    fs::create_dir(&other).unwrap();
    let out = run_timeout(m.kmount().arg(&other).arg(&m.mnt), MOUNT_TIMEOUT);
    assert!(out.status.is_some(), "kmount hung: {out}");
    assert!(
        !out.success(),
        "kmount mounted over an existing mount: {out}"
    );
    assert!(
        out.stderr.contains("mnt"),
        "the message does not name the mountpoint: {out}"
    );
    let stacked = mounts().iter().filter(|i| i.mount_point == m.mnt).count();
    assert_eq!(stacked, 1, "mounts stacked at {}", m.mnt.display());
    // The first mount still works.
    fs::write(m.m("f"), b"still here").unwrap();
    assert_eq!(fs::read(m.b("f")).unwrap(), b"still here");
}

#[test]
fn missing_target() {
    let s = Scratch::new();
    let target = s.path("no-such-target");
    let mnt = s.mkdir("mnt");
    let out = s.run(&[&target, &mnt]);
    assert_refused(&s, &out, &target);
}

#[test]
fn target_is_a_file() {
    let s = Scratch::new();
    let target = s.path("target-file");
    fs::write(&target, b"x").unwrap();
    let mnt = s.mkdir("mnt");
    let out = s.run(&[&target, &mnt]);
    assert_refused(&s, &out, &target);
}

#[test]
fn target_contains_mountpoint() {
    let s = Scratch::new();
    let target = s.mkdir("target");
    let mnt = s.mkdir("target/inner-mnt");
    let out = s.run(&[&target, &mnt]);
    assert_refused(&s, &out, &mnt);
    // The same through a symlink to the target.
    let link = s.path("link-to-target");
    symlink(&target, &link).unwrap();
    let out = s.run(&[&link, &mnt]);
    assert_refused(&s, &out, &mnt);
}

#[test]
fn mountpoint_contains_target() {
    let s = Scratch::new();
    let mnt = s.mkdir("outer-mnt");
    let target = s.mkdir("outer-mnt/target");
    let out = s.run(&[&target, &mnt]);
    assert_refused(&s, &out, &mnt);
}

#[test]
fn target_is_the_mountpoint() {
    let s = Scratch::new();
    let same = s.mkdir("same");
    let out = s.run(&[&same, &same]);
    assert_refused(&s, &out, &same);
}

#[test]
fn fusermount3_missing_from_path() {
    let s = Scratch::new();
    let target = s.mkdir("target");
    let mnt = s.mkdir("mnt");
    let out = run_timeout(
        s.kmount()
            .env("PATH", s.mkdir("empty-path"))
            .arg(&target)
            .arg(&mnt),
        MOUNT_TIMEOUT,
    );
    assert!(
        !out.success(),
        "kmount mounted without fusermount3 on PATH: {out}"
    );
    assert!(
        out.stderr.contains("fusermount3"),
        "the message does not name fusermount3: {out}"
    );
    assert!(mounts_under(s.dir.path()).is_empty());
}

#[test]
fn unmount_of_something_not_mounted() {
    let s = Scratch::new();
    let dir = s.mkdir("plain-dir");
    let out = run_timeout(s.kmount().arg("unmount").arg(&dir), MOUNT_TIMEOUT);
    assert!(
        !out.success(),
        "unmount of a plain directory succeeded: {out}"
    );
    assert!(
        out.stderr.contains("plain-dir"),
        "the message does not name the path: {out}"
    );
}

/// Parses `kmount list` rows that mention `mnt`: returns the row and its pid (the last number).
fn list_row(out: &CmdOutput, target: &Path, mnt: &Path) -> (String, u32) {
    let mnt_s = mnt.to_string_lossy();
    let target_s = target.to_string_lossy();
    let row = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == mnt_s))
        .unwrap_or_else(|| panic!("kmount list does not show {mnt_s}:\n{out}"));
    assert!(
        row.split_whitespace().any(|w| w == target_s),
        "kmount list row does not show the target {target_s}: {row}"
    );
    let pid = row
        .split_whitespace()
        .filter_map(|w| w.parse::<u32>().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no pid in the kmount list row: {row}"));
    (row.to_string(), pid)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true)
}

#[test]
fn mount_prints_one_line_and_list_shows_it() {
    let m = Mounted::new();
    assert_eq!(
        m.ready_output.stdout.lines().count(),
        1,
        "kmount should print exactly one line when the mount is ready: {}",
        m.ready_output
    );
    let out = run_timeout(m.kmount().arg("list"), MOUNT_TIMEOUT);
    assert!(out.success(), "kmount list failed: {out}");
    let (row, pid) = list_row(&out, &m.backing, &m.mnt);
    assert!(
        pid_alive(pid),
        "pid {pid} from `{row}` is not a live process"
    );
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, kmount_bin(), "pid {pid} from `{row}` is not kmount");
}

#[test]
fn relative_paths() {
    let s = Scratch::new();
    s.mkdir("src");
    s.mkdir("mnt");
    fs::write(s.path("src/f"), b"relative").unwrap();
    let out = run_timeout(
        s.kmount()
            .current_dir(s.dir.path())
            .args(["./src", "./mnt"]),
        MOUNT_TIMEOUT,
    );
    assert!(out.success(), "kmount ./src ./mnt failed: {out}");
    assert!(is_mounted(&s.path("mnt")));
    assert_eq!(fs::read(s.path("mnt/f")).unwrap(), b"relative");
    let (_, pid) = list_row(&s.list(), &s.path("src"), &s.path("mnt"));
    let out = run_timeout(
        s.kmount()
            .current_dir(s.dir.path())
            .args(["unmount", "./mnt"]),
        UNMOUNT_TIMEOUT,
    );
    assert!(out.success(), "kmount unmount ./mnt failed: {out}");
    assert!(!is_mounted(&s.path("mnt")));
    assert!(
        !pid_alive(pid),
        "the daemon {pid} is still running after unmount"
    );
}

#[test]
fn unmount_all() {
    let s = Scratch::new();
    let mut pids = Vec::new();
    for i in 0..3 {
        let target = s.mkdir(&format!("target{i}"));
        let mnt = s.mkdir(&format!("mnt{i}"));
        let out = s.run(&[&target, &mnt]);
        assert!(out.success(), "mount {i} failed: {out}");
        fs::write(mnt.join("written"), format!("through mount {i}")).unwrap();
    }
    let listed = s.list();
    for i in 0..3 {
        let (_, pid) = list_row(
            &listed,
            &s.path(&format!("target{i}")),
            &s.path(&format!("mnt{i}")),
        );
        pids.push(pid);
    }
    let out = run_timeout(s.kmount().args(["unmount", "--all"]), UNMOUNT_TIMEOUT);
    assert!(out.success(), "kmount unmount --all failed: {out}");
    for i in 0..3 {
        let mnt = s.path(&format!("mnt{i}"));
        assert!(
            !is_mounted(&mnt),
            "{} still mounted after --all",
            mnt.display()
        );
        assert_eq!(
            fs::read_to_string(s.path(&format!("target{i}/written"))).unwrap(),
            format!("through mount {i}")
        );
    }
    for pid in pids {
        assert!(
            !pid_alive(pid),
            "daemon {pid} still running after unmount --all"
        );
    }
    let listed = s.list();
    assert!(
        !listed.stdout.contains(&*s.dir.path().to_string_lossy()),
        "kmount list still shows mounts:\n{listed}"
    );
}

/// `kmount -f` in the foreground, ended by `signal`: unmounts cleanly and exits 0.
fn foreground_until(signal: nix::sys::signal::Signal) {
    let s = Scratch::new();
    let target = s.mkdir("target");
    let mnt = s.mkdir("mnt");
    let stderr = tempfile::tempfile().unwrap();
    let mut child = s
        .kmount()
        .arg("-f")
        .arg(&target)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.try_clone().unwrap())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // reader thread --first stdout line--> test
    let (line_tx, line_rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = line_tx.send(line);
    });
    let line = match line_rx.recv_timeout(MOUNT_TIMEOUT) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kmount -f printed no ready line within {MOUNT_TIMEOUT:?}");
        }
    };
    assert!(
        !line.trim().is_empty(),
        "kmount -f exited before it was ready"
    );
    assert!(
        is_mounted(&mnt),
        "kmount -f said `{}` but nothing is mounted",
        line.trim()
    );
    fs::write(mnt.join("f"), b"before the signal").unwrap();

    nix::sys::signal::kill(pid, signal).unwrap();
    let deadline = Instant::now() + UNMOUNT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kmount -f did not exit within {UNMOUNT_TIMEOUT:?} of {signal}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    {
        use std::io::{Read, Seek};
        let mut f = stderr;
        f.rewind().unwrap();
        f.read_to_string(&mut err).unwrap();
    }
    assert!(
        status.success(),
        "kmount -f exited with {status} after {signal}; stderr:\n{err}"
    );
    assert!(!is_mounted(&mnt), "still mounted after {signal}");
    assert_eq!(fs::read(target.join("f")).unwrap(), b"before the signal");
}

#[test]
fn foreground_sigint_unmounts() {
    foreground_until(nix::sys::signal::Signal::SIGINT);
}

#[test]
fn foreground_sigterm_unmounts() {
    foreground_until(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn agent_is_found_next_to_kmount() {
    let s = Scratch::new();
    let next_to = kmount_bin().parent().unwrap().join("kmount-agent");
    assert!(
        next_to.is_file(),
        "{} is missing: kmount looks for its agent there (run `cargo build --workspace`)",
        next_to.display()
    );
    let target = s.mkdir("target");
    let mnt = s.mkdir("mnt");
    fs::write(target.join("f"), b"served").unwrap();
    let out = run_timeout(
        s.kmount().env_remove("KMOUNT_AGENT").arg(&target).arg(&mnt),
        MOUNT_TIMEOUT,
    );
    assert!(out.success(), "kmount without KMOUNT_AGENT failed: {out}");
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"served");
    let out = run_timeout(s.kmount().arg("unmount").arg(&mnt), UNMOUNT_TIMEOUT);
    assert!(out.success(), "unmount failed: {out}");
}

#[test]
fn agent_version() {
    let out = run_timeout(Command::new(agent_bin()).arg("--version"), MOUNT_TIMEOUT);
    assert!(out.success(), "kmount-agent --version failed: {out}");
    let words: Vec<&str> = out.stdout.split_whitespace().collect();
    assert!(
        words.len() == 4 && words[0] == "kmount-agent" && words[2] == "protocol",
        "expected `kmount-agent <version> protocol <N>`, got {:?}",
        out.stdout
    );
    assert!(
        words[3].parse::<u32>().is_ok(),
        "protocol is not a number: {:?}",
        out.stdout
    );
}

#[test]
fn unmount_after_the_daemon_was_killed() {
    let mut m = Mounted::new();
    fs::write(m.m("f"), b"x").unwrap();
    let out = run_timeout(m.kmount().arg("list"), MOUNT_TIMEOUT);
    let (_, pid) = list_row(&out, &m.backing, &m.mnt);
    // The daemon is this test's own descendant (started by `kmount` above).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Wait until it is reaped (its parent is init), not merely a zombie.
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc_dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !proc_dir.exists(),
        "daemon {pid} still exists 10 s after SIGKILL"
    );
    // A mount whose daemon is gone: kmount says so, and `kmount unmount` cleans it up.
    let listed = run_timeout(m.kmount().arg("list"), MOUNT_TIMEOUT);
    assert!(
        listed.stdout.contains("stale") || !listed.stdout.contains(&*m.mnt.to_string_lossy()),
        "kmount list shows a dead mount as live:\n{listed}"
    );
    m.unmount();
    // The mountpoint is usable again.
    let again = Mounted::with_backing(|b| fs::write(b.join("g"), b"y").unwrap());
    assert_eq!(fs::read(again.m("g")).unwrap(), b"y");
}

/// An agent of another protocol version (here a script that says hello as version 9) is
/// refused at once with both versions named and what to do; nothing is mounted.
#[test]
fn an_agent_of_another_protocol_version_is_refused_naming_both() {
    let s = Scratch::new();
    let target = s.mkdir("target");
    let mnt = s.mkdir("mnt");
    let impostor = s.path("kmount-agent-9");
    // The frame: length 16, then `FromAgent::Hello`: variant 0, magic, version 9, features 0,
    // software "impostor" (8 bytes). Then it waits for the mount to give up.
    fs::write(
        &impostor,
        "#!/bin/sh\nprintf '\\020\\000\\000\\000\\000KMNT\\011\\000\\010impostor'\nexec cat >/dev/null\n",
    )
    .unwrap();
    fs::set_permissions(
        &impostor,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = run_timeout(
        s.kmount()
            .env("KMOUNT_AGENT", &impostor)
            .arg(&target)
            .arg(&mnt),
        MOUNT_TIMEOUT,
    );
    assert!(out.status.is_some(), "kmount hung: {out}");
    assert!(
        !out.success(),
        "kmount accepted an agent of version 9: {out}"
    );
    let err = &out.stderr;
    // Ours, as the real agent states it: `kmount-agent <version> protocol <N>`.
    let real = run_timeout(Command::new(agent_bin()).arg("--version"), MOUNT_TIMEOUT);
    let ours = format!("version {}", real.stdout.split_whitespace().nth(3).unwrap());
    assert!(err.contains(&ours), "our version is not named: {out}");
    assert_eq!(err.matches("version 9").count(), 1, "named not once: {out}");
    assert!(err.contains("impostor"), "its software is not named: {out}");
    assert!(err.contains("same release"), "no advice: {out}");
    assert!(
        mounts_under(s.dir.path()).is_empty(),
        "mounted anyway: {out}"
    );
}
