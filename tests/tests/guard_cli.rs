//! `kmount confirm` and a paused mass removal in `kmount status`, and `--remote-timeout` with
//! the target gone, through the real binary against local-directory mounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kmount_tests::*;

/// A scratch directory with its own `KMOUNT_STATE_DIR`; on drop every mount of that state is
/// taken down.
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

    fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }

    fn kmount(&self) -> Command {
        let mut cmd = kmount_cmd();
        cmd.env("KMOUNT_STATE_DIR", &self.state)
            .current_dir(self.dir.path());
        cmd
    }

    fn run(&self, args: &[&str]) -> CmdOutput {
        run_timeout(self.kmount().args(args), MOUNT_TIMEOUT)
    }

    /// Mounts `src` (filled by `fill`) at a new mountpoint with `flags`.
    fn mount(&self, flags: &[&str], fill: impl FnOnce(&Path)) -> (PathBuf, PathBuf) {
        let src = self.mkdir("src");
        fill(&src);
        let mnt = self.mkdir("mnt");
        let out = run_timeout(self.kmount().args(flags).arg(&src).arg(&mnt), MOUNT_TIMEOUT);
        assert!(
            out.success(),
            "kmount failed: {out}{}",
            logs_in(&self.state)
        );
        (src, mnt)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = run_timeout(
            self.kmount().args(["unmount", "--all", "--force"]),
            UNMOUNT_TIMEOUT,
        );
        for mnt in mounts_under(self.dir.path()) {
            eprintln!("cleaned up {}: {}", mnt.display(), force_unmount(&mnt));
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fill(root: &Path) {
    for d in 0..5 {
        let dir = root.join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            fs::write(dir.join(format!("f{f}")), "x").unwrap();
        }
    }
}

fn entries(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(list) = fs::read_dir(&dir) else {
            continue;
        };
        for e in list.flatten() {
            n += 1;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    n
}

/// The pid of the agent serving `src` (a descendant of a kmount this test started).
fn agent_of(src: &Path) -> Option<i32> {
    let want = src.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let stat = fs::read_to_string(e.path().join("stat")).ok()?;
        (cmdline.windows(12).any(|w| w == b"kmount-agent")
            && cmdline.windows(want.len()).any(|w| w == want)
            && !stat.contains(") Z "))
        .then_some(pid)
    })
}

#[test]
fn confirm_refuses_what_is_not_a_kmount_mount() {
    let s = Scratch::new();
    let plain = s.mkdir("plain");
    let out = s.run(&["confirm", plain.to_str().unwrap()]);
    assert_eq!(out.status.and_then(|st| st.code()), Some(1), "{out}");
    assert!(out.stderr.contains("is not a kmount mount"), "{out}");
    assert!(out.stderr.contains("nothing is mounted"), "{out}");
    let out = s.run(&["confirm"]);
    assert_eq!(out.status.and_then(|st| st.code()), Some(2), "{out}");
    assert!(out.stderr.contains("MOUNTPOINT"), "{out}");
}

#[test]
fn a_paused_removal_shows_in_status_and_confirm_applies_it() {
    let s = Scratch::new();
    let (src, mnt) = s.mount(&["--reconcile-interval", "500ms"], fill);
    let m = mnt.to_str().unwrap();
    assert_eq!(entries(&mnt), 505);
    // Nothing to confirm yet.
    let out = s.run(&["confirm", m]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("no removal is paused"), "{out}");
    let out = s.run(&["status", m, "--json"]);
    assert!(out.stdout.contains("\"paused_removal\": null"), "{out}");

    // The target loses everything (behind the mount's back).
    for d in 0..5 {
        fs::remove_dir_all(src.join(format!("d{d}"))).unwrap();
    }
    wait_until("the pause in status", Duration::from_secs(20), || {
        s.run(&["status", m]).stdout.contains("PAUSED")
    });
    let out = s.run(&["status", m]);
    // At most 100 entries of a removal the watcher reports leave the view before the pause.
    assert!(
        out.stdout.contains("entries; they stay in the mount"),
        "{out}"
    );
    assert!(out.stdout.contains(&format!("kmount confirm {m}")), "{out}");
    let out = s.run(&["status", m, "--json"]);
    assert!(out.stdout.contains("\"paused_removal\": {"), "{out}");
    assert!(out.stdout.contains("\"entries\": "), "{out}");
    let log = s.run(&["logs", m]);
    assert!(
        log.stdout.contains("WARN") && log.stdout.contains("kmount confirm MOUNTPOINT"),
        "{log}"
    );
    assert!(entries(&mnt) >= 505 - 101, "the view lost too much");

    let out = s.run(&["confirm", m]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("confirmed"), "{out}");
    wait_until("the removal applied", Duration::from_secs(10), || {
        entries(&mnt) == 0
    });
    let out = s.run(&["status", m, "--json"]);
    assert!(out.stdout.contains("\"paused_removal\": null"), "{out}");
    let out = s.run(&["unmount", m]);
    assert!(out.success(), "{out}");
}

#[test]
fn with_the_target_gone_reads_fail_in_time_and_unmount_is_prompt() {
    let s = Scratch::new();
    let (src, mnt) = s.mount(&["--remote-timeout", "2s"], |root| {
        fs::write(root.join("f"), "f\n").unwrap();
    });
    let m = mnt.to_str().unwrap();
    // The target goes away for good: the served directory is gone and its agent ended.
    let agent = agent_of(&src).expect("the agent of the mount");
    fs::rename(&src, src.with_extension("gone")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("reconnecting", Duration::from_secs(10), || {
        s.run(&["status", m]).stdout.contains("reconnecting")
    });
    // Names and attributes still answer; the contents need the target.
    assert_eq!(fs::metadata(mnt.join("f")).unwrap().len(), 2);
    let started = Instant::now();
    let err = fs::read(mnt.join("f")).unwrap_err();
    let took = started.elapsed();
    eprintln!("target gone: a read failed after {took:?}: {err}");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    let log = s.run(&["logs", m]);
    assert!(log.stdout.contains("did not come back within 2 s"), "{log}");

    let started = Instant::now();
    let out = run_timeout(s.kmount().args(["unmount", m]), UNMOUNT_TIMEOUT);
    let took = started.elapsed();
    eprintln!("target gone: kmount unmount took {took:?}");
    assert!(out.success(), "{out}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn write_back_unmount_with_the_target_gone_says_what_is_not_sent_in_time() {
    let s = Scratch::new();
    let (src, mnt) = s.mount(&["--write-back", "--remote-timeout", "2s"], |root| {
        fs::write(root.join("f"), "f\n").unwrap();
    });
    let m = mnt.to_str().unwrap();
    let agent = agent_of(&src).expect("the agent of the mount");
    fs::rename(&src, src.with_extension("gone")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Local-first: the save is accepted (journaled) with the target away.
    fs::write(mnt.join("new.txt"), "kept\n").unwrap();
    let started = Instant::now();
    let out = run_timeout(s.kmount().args(["unmount", m]), UNMOUNT_TIMEOUT);
    let took = started.elapsed();
    eprintln!(
        "write-back, target gone: kmount unmount answered after {took:?}: {}",
        out.stderr.trim()
    );
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("unreachable"), "{out}");
    assert!(out.stderr.contains("new.txt"), "{out}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        is_mounted(&mnt),
        "kept mounted: the change is not in the target"
    );
    let out = run_timeout(s.kmount().args(["unmount", "--force", m]), UNMOUNT_TIMEOUT);
    assert!(out.success(), "{out}");
    assert!(!is_mounted(&mnt));
}
