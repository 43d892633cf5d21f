//! The "everyday use" commands against real local-directory mounts, through the real binary:
//! `status`, `logs`, `why`, `unmount --force`, the mount flags (`--exclude`, `--local-only`,
//! `--no-default-ignores`, `--on-change`, `--bwlimit`), `kmount.toml` with `up`/`down`,
//! `doctor`, `completions`, `man`, and the bad input of each (exit code, message, nothing
//! mounted).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kmount_tests::*;

/// A scratch directory with its own `KMOUNT_STATE_DIR`. On drop every mount of that state is
/// unmounted (`kmount unmount --all --force`), and anything still mounted below the directory
/// is taken down and fails the test.
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
        cmd.env("KMOUNT_STATE_DIR", &self.state)
            .current_dir(self.dir.path());
        cmd
    }

    /// `kmount ARGS…`, waited for.
    fn run(&self, args: &[&str]) -> CmdOutput {
        run_timeout(self.kmount().args(args), MOUNT_TIMEOUT)
    }

    /// Mounts `<name>-src` at `<name>-mnt` with `flags`; returns (backing, mountpoint).
    fn mount(&self, name: &str, flags: &[&str]) -> (PathBuf, PathBuf) {
        let src = self.mkdir(&format!("{name}-src"));
        let mnt = self.mkdir(&format!("{name}-mnt"));
        let out = run_timeout(self.kmount().args(flags).arg(&src).arg(&mnt), MOUNT_TIMEOUT);
        assert!(
            out.success(),
            "kmount {flags:?} failed: {out}{}",
            logs_in(&self.state)
        );
        assert!(
            is_mounted(&mnt),
            "nothing mounted at {}: {out}",
            mnt.display()
        );
        (src, mnt)
    }

    fn daemon_pid(&self, mnt: &Path) -> u32 {
        let out = self.run(&["list"]);
        let m = mnt.to_string_lossy();
        let row = out
            .stdout
            .lines()
            .find(|l| l.split_whitespace().any(|w| w == m))
            .unwrap_or_else(|| panic!("kmount list does not show {m}: {out}"));
        row.split_whitespace()
            .filter_map(|w| w.parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no pid in {row}"))
    }

    /// Nothing of this scratch dir is mounted, and `kmount list` shows none of it.
    #[track_caller]
    fn assert_nothing_mounted(&self, context: &CmdOutput) {
        let left = mounts_under(self.dir.path());
        assert!(left.is_empty(), "left mounted: {left:?}\n{context}");
        let list = self.run(&["list"]);
        assert!(
            !list.stdout.contains(&*self.dir.path().to_string_lossy()),
            "kmount list shows a mount:\n{list}\nafter:\n{context}"
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = run_timeout(
            self.kmount().args(["unmount", "--all", "--force"]),
            UNMOUNT_TIMEOUT,
        );
        let mut left = mounts_under(self.dir.path());
        left.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for mnt in &left {
            eprintln!("cleaned up {}: {}", mnt.display(), force_unmount(mnt));
        }
        if !left.is_empty() && !std::thread::panicking() {
            panic!("mounts were left behind: {left:?}");
        }
    }
}

/// Refused: exit `code`, stderr naming every word of `mentions`, no panic, nothing mounted.
#[track_caller]
fn assert_refused(s: &Scratch, out: &CmdOutput, code: i32, mentions: &[&str]) {
    assert_eq!(
        out.status.and_then(|st| st.code()),
        Some(code),
        "wrong exit: {out}"
    );
    assert!(!out.stderr.contains("panicked"), "kmount panicked: {out}");
    for m in mentions {
        assert!(
            out.stderr.contains(m),
            "the message does not say {m:?}: {out}"
        );
    }
    s.assert_nothing_mounted(out);
}

fn pid_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) != Some("Z"))
        .unwrap_or(false)
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// The ready line

#[test]
fn ready_line_names_the_target_and_counts_files() {
    let s = Scratch::new();
    let src = s.mkdir("r-src");
    let mnt = s.mkdir("r-mnt");
    for i in 0..3 {
        fs::write(src.join(format!("f{i}")), b"x").unwrap();
    }
    let out = run_timeout(s.kmount().arg(&src).arg(&mnt), MOUNT_TIMEOUT);
    assert!(out.success(), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line when ready: {out}");
    let line = lines[0];
    assert!(line.contains(&*src.to_string_lossy()), "{line}");
    assert!(line.contains(&*mnt.to_string_lossy()), "{line}");
    assert!(
        line.contains(": 3 files in "),
        "no file count and time: {line}"
    );
}

// ---------------------------------------------------------------------------------------------
// status

#[test]
fn status_text_and_json() {
    let s = Scratch::new();
    let (src, mnt) = s.mount(
        "st",
        &[
            "--on-change",
            "true",
            "--bwlimit",
            "2M",
            "--exclude",
            "*.log",
        ],
    );
    fs::write(mnt.join("f"), b"hello").unwrap();
    let pid = s.daemon_pid(&mnt);

    let out = s.run(&["status", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    for want in [
        &*src.to_string_lossy(),
        &*mnt.to_string_lossy(),
        "connected",
        &pid.to_string(),
        "write-through",
        "not applied     0 change(s)",
        "conflicts       0",
        "2M/s",
        "\"true\"",
    ] {
        assert!(out.stdout.contains(want), "status lacks {want:?}:\n{out}");
    }

    let out = s.run(&["status", "--json", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    let j = &out.stdout;
    assert!(j.contains("\"schema\": \"kmount.status\""), "{j}");
    assert!(j.contains("\"version\": 1"), "{j}");
    // The documented keys (README, `kmount status --help`); renaming one is a new version.
    for key in [
        "mounts",
        "target",
        "mountpoint",
        "pid",
        "state",
        "state_detail",
        "write_back",
        "pending_changes",
        "pending_bytes",
        "last_reconcile",
        "last_reconcile_outcome",
        "conflicts",
        "recent_errors",
        "files",
        "bytes",
        "cache_bytes",
        "cache_limit_bytes",
        "bwlimit",
        "on_change",
        "command",
        "runs",
        "failures",
        "running",
        "last_run",
        "last_status",
        "last_error",
    ] {
        assert!(j.contains(&format!("\"{key}\":")), "no key {key}: {j}");
    }
    assert!(j.contains("\"state\": \"connected\""), "{j}");
    assert!(j.contains(&format!("\"pid\": {pid}")), "{j}");
    assert!(j.contains("\"bwlimit\": 2097152"), "{j}");
    assert!(j.contains("\"command\": \"true\""), "{j}");
    assert!(j.contains("\"pending_changes\": 0"), "{j}");
}

#[test]
fn status_without_mountpoint_shows_every_mount() {
    let s = Scratch::new();
    let (_, a) = s.mount("a", &[]);
    let (_, b) = s.mount("b", &[]);
    let out = s.run(&["status"]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains(&*a.to_string_lossy()), "{out}");
    assert!(out.stdout.contains(&*b.to_string_lossy()), "{out}");
    let out = s.run(&["status", "--json"]);
    assert_eq!(
        out.stdout.matches("\"state\": \"connected\"").count(),
        2,
        "{out}"
    );
}

#[test]
fn status_of_a_dead_daemon_says_stopped() {
    let s = Scratch::new();
    let (_, mnt) = s.mount("dead", &[]);
    let pid = s.daemon_pid(&mnt);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the daemon to die", Duration::from_secs(10), || {
        !pid_alive(pid)
    });
    let out = s.run(&["status", "--json", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("\"state\": \"stopped\""), "{out}");
    assert!(out.stdout.contains("kmount unmount"), "no next step: {out}");
    let out = s.run(&["unmount", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}");
}

#[test]
fn status_of_something_not_mounted() {
    let s = Scratch::new();
    let plain = s.mkdir("plain");
    let out = s.run(&["status", plain.to_str().unwrap()]);
    assert_refused(&s, &out, 1, &["plain", "not a kmount mount"]);
    let out = s.run(&["status"]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("no kmount mounts"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// logs

#[test]
fn logs_print_and_follow_until_the_mount_ends() {
    let s = Scratch::new();
    let (_, mnt) = s.mount("lg", &[]);
    let out = s.run(&["logs", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains("mounted"),
        "the log lacks the ready line: {out}"
    );
    // Without MOUNTPOINT: the only mount.
    let only = s.run(&["logs"]);
    assert_eq!(only.stdout, out.stdout);
    // Private: the directory 0700, the file 0600.
    let logs = s.state.join("logs");
    assert_eq!(
        fs::metadata(&logs).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for e in fs::read_dir(&logs).unwrap().flatten() {
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", e.path().display());
    }

    let out_file = s.path("follow.out");
    let mut follow = s
        .kmount()
        .args(["logs", "-f"])
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(follow.try_wait().unwrap().is_none(), "logs -f ended early");
    let out = s.run(&["unmount", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = follow.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = follow.kill();
            let _ = follow.wait();
            panic!("kmount logs -f did not end with the mount");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    let followed = fs::read_to_string(&out_file).unwrap();
    assert!(
        followed.contains("was unmounted"),
        "logs -f missed what the mount logged at its end:\n{followed}"
    );
}

#[test]
fn kmount_log_debug_raises_the_level() {
    let s = Scratch::new();
    let src = s.mkdir("d-src");
    let mnt = s.mkdir("d-mnt");
    let out = run_timeout(
        s.kmount().env("KMOUNT_LOG", "debug").arg(&src).arg(&mnt),
        MOUNT_TIMEOUT,
    );
    assert!(out.success(), "{out}");
    fs::write(mnt.join("f"), b"x").unwrap();
    let log = s.run(&["logs", mnt.to_str().unwrap()]);
    assert!(log.stdout.contains("DEBUG"), "no debug lines:\n{log}");
}

#[test]
fn logs_of_something_never_mounted() {
    let s = Scratch::new();
    let plain = s.mkdir("never");
    let out = s.run(&["logs", plain.to_str().unwrap()]);
    assert_refused(&s, &out, 1, &["never", "no log"]);
    let out = s.run(&["logs"]);
    assert_refused(&s, &out, 1, &["nothing is mounted"]);
}

// ---------------------------------------------------------------------------------------------
// why and the ignore flags

/// `kmount why ARG` run from the scratch dir: (exit code, stdout).
fn why(s: &Scratch, args: &[&str]) -> (i32, String, CmdOutput) {
    let mut a = vec!["why"];
    a.extend_from_slice(args);
    let out = s.run(&a);
    let code = out.status.and_then(|st| st.code()).unwrap_or(-1);
    (code, out.stdout.clone(), out)
}

#[test]
fn why_names_the_rule_like_check_ignore() {
    let s = Scratch::new();
    let (_, mnt) = s.mount(
        "w",
        &[
            "--exclude",
            "node_modules/",
            "--local-only",
            "*.tmp",
            "--exclude",
            "*.log",
        ],
    );
    fs::create_dir(mnt.join("src")).unwrap();
    let m = mnt.to_str().unwrap();

    let (code, out, full) = why(&s, &[&format!("{m}/web/node_modules/")]);
    assert_eq!(code, 0, "{full}");
    assert_eq!(
        out,
        format!("--exclude:1:node_modules/\t{m}/web/node_modules/\texcluded\n")
    );
    // Without the slash and not in the mount (a rule may hide it): tried as a directory too.
    let (code, out, full) = why(&s, &[&format!("{m}/web/node_modules")]);
    assert_eq!(code, 0, "{full}");
    assert!(out.ends_with("\texcluded\n"), "{full}");
    let (code, out, full) = why(&s, &[&format!("{m}/x.log")]);
    assert_eq!(code, 0, "{full}");
    assert!(out.starts_with("--exclude:2:*.log\t"), "{full}");
    let (code, out, full) = why(&s, &[&format!("{m}/a.tmp")]);
    assert_eq!(code, 0, "{full}");
    assert!(out.starts_with("--local-only:1:*.tmp\t"), "{full}");
    assert!(out.trim_end().ends_with("\tlocal-only"), "{full}");
    // The built-in editor patterns.
    let (code, out, full) = why(&s, &[&format!("{m}/src/.main.rs.swp")]);
    assert_eq!(code, 0, "{full}");
    assert!(out.starts_with("default:"), "{full}");
    // Synced: exit 1, as check-ignore.
    let (code, out, full) = why(&s, &[&format!("{m}/src/main.rs")]);
    assert_eq!(code, 1, "{full}");
    assert!(out.contains("synced"), "{full}");
    // Relative to the current directory, and relative to a mount's root with --mount.
    let (code, _, full) = why(&s, &["w-mnt/a.tmp"]);
    assert_eq!(code, 0, "{full}");
    let (code, out, full) = why(&s, &["--mount", m, "deep/node_modules/"]);
    assert_eq!(code, 0, "{full}");
    assert!(out.contains("excluded"), "{full}");
}

#[test]
fn no_default_ignores_drops_the_editor_patterns() {
    let s = Scratch::new();
    let (_, mnt) = s.mount("nd", &["--no-default-ignores"]);
    let (code, out, full) = why(&s, &[&format!("{}/.x.swp", mnt.display())]);
    assert_eq!(code, 1, "{full}");
    assert!(out.contains("synced"), "{full}");
}

#[test]
fn why_errors_exit_2() {
    let s = Scratch::new();
    let outside = s.mkdir("outside");
    let (code, _, out) = why(&s, &[outside.join("f").to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.stderr.contains("not in a kmount mount"), "{out}");
    let (code, _, out) = why(&s, &["--mount", outside.to_str().unwrap(), "f"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.stderr.contains("outside"), "{out}");
}

#[test]
fn why_reads_kmountignore() {
    let s = Scratch::new();
    let src = s.mkdir("ki-src");
    fs::write(
        src.join(".kmountignore"),
        "# secrets\nsecret/\n[local-only]\n*.bak\n",
    )
    .unwrap();
    let mnt = s.mkdir("ki-mnt");
    let out = run_timeout(s.kmount().arg(&src).arg(&mnt), MOUNT_TIMEOUT);
    assert!(out.success(), "{out}");
    let (code, out, full) = why(&s, &[&format!("{}/secret/", mnt.display())]);
    assert_eq!(code, 0, "{full}");
    assert!(out.contains(".kmountignore:2:secret/"), "{full}");
    let (code, out, full) = why(&s, &[&format!("{}/a.bak", mnt.display())]);
    assert_eq!(code, 0, "{full}");
    assert!(out.contains(".kmountignore:4:*.bak"), "{full}");
}

#[test]
fn excluded_paths_are_hidden_and_local_only_stay_local() {
    let s = Scratch::new();
    let src = s.mkdir("h-src");
    fs::create_dir_all(src.join("node_modules/pkg")).unwrap();
    fs::write(src.join("node_modules/pkg/index.js"), b"x").unwrap();
    fs::write(src.join("kept"), b"k").unwrap();
    let mnt = s.mkdir("h-mnt");
    let out = run_timeout(
        s.kmount()
            .args(["--exclude", "node_modules/", "--local-only", "*.tmp"])
            .arg(&src)
            .arg(&mnt),
        MOUNT_TIMEOUT,
    );
    assert!(out.success(), "{out}");
    assert!(mnt.join("kept").exists());
    assert!(
        !mnt.join("node_modules").exists(),
        "an excluded directory is shown"
    );
    fs::write(mnt.join("scratch.tmp"), b"local").unwrap();
    assert_eq!(fs::read(mnt.join("scratch.tmp")).unwrap(), b"local");
    let out = s.run(&["wait", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    assert!(
        !src.join("scratch.tmp").exists(),
        "a local-only file reached the target"
    );
    // The target's excluded files are left alone.
    assert_eq!(
        fs::read(src.join("node_modules/pkg/index.js")).unwrap(),
        b"x"
    );
}

#[test]
fn bad_patterns_are_refused_before_mounting() {
    let s = Scratch::new();
    let src = s.mkdir("bp-src");
    let mnt = s.mkdir("bp-mnt");
    for (flag, pattern) in [("--exclude", "a{b"), ("--local-only", "[z-a]")] {
        let out = run_timeout(
            s.kmount().args([flag, pattern]).arg(&src).arg(&mnt),
            MOUNT_TIMEOUT,
        );
        assert_refused(&s, &out, 1, &[flag, pattern, "fix the pattern"]);
    }
}

// ---------------------------------------------------------------------------------------------
// --on-change and --bwlimit

#[test]
fn on_change_reaches_the_mount() {
    let s = Scratch::new();
    let (_, mnt) = s.mount("oc", &["--on-change", "echo 'built' > /dev/null"]);
    let out = s.run(&["status", "--json", mnt.to_str().unwrap()]);
    assert!(
        out.stdout
            .contains(r#""command": "echo 'built' > /dev/null""#),
        "{out}"
    );
}

#[test]
fn on_change_runs_after_a_batch_of_changes() {
    let s = Scratch::new();
    let (src, mnt) = s.mount("ocr", &["--on-change", "date >> .ran"]);
    fs::write(mnt.join("f"), b"x").unwrap();
    wait_until("the command to run", Duration::from_secs(20), || {
        src.join(".ran").exists()
    });
    let out = s.run(&["status", "--json", mnt.to_str().unwrap()]);
    assert!(out.stdout.contains("\"runs\": 1"), "{out}");
}

#[test]
fn bwlimit_slows_the_traffic_to_the_target() {
    let s = Scratch::new();
    let (src, mnt) = s.mount("bw", &["--bwlimit", "256K"]);
    let data = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    fs::write(mnt.join("big"), &data).unwrap();
    let took = start.elapsed();
    // 1 MiB at 256 KiB/s: about 4 s (one burst of 25.6 KiB passes at once).
    assert!(
        took >= Duration::from_millis(3000),
        "1 MiB went through --bwlimit 256K in {took:?}"
    );
    assert_eq!(fs::read(src.join("big")).unwrap(), data);
    let out = s.run(&["status", mnt.to_str().unwrap()]);
    assert!(out.stdout.contains("256K/s each way"), "{out}");
}

#[test]
fn bad_bwlimit_is_refused() {
    let s = Scratch::new();
    let src = s.mkdir("bb-src");
    let mnt = s.mkdir("bb-mnt");
    for bad in ["fast", "5X", "-1M", "10"] {
        let out = run_timeout(
            s.kmount().args(["--bwlimit", bad]).arg(&src).arg(&mnt),
            MOUNT_TIMEOUT,
        );
        assert_refused(&s, &out, 2, &["--bwlimit", bad]);
    }
}

// ---------------------------------------------------------------------------------------------
// unmount --force

#[test]
fn unmount_force_when_the_daemon_hangs() {
    let s = Scratch::new();
    let (_, mnt) = s.mount("hang", &[]);
    let pid = s.daemon_pid(&mnt);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let start = Instant::now();
    let out = run_timeout(
        s.kmount().args(["unmount", "--force"]).arg(&mnt),
        Duration::from_secs(30),
    );
    assert!(out.success(), "{out}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    assert!(out.stdout.contains("forced"), "{out}");
    assert!(!is_mounted(&mnt));
    wait_until("the daemon to end", Duration::from_secs(10), || {
        !pid_alive(pid)
    });
    s.assert_nothing_mounted(&out);
}

#[test]
fn unmount_force_of_something_not_mounted() {
    let s = Scratch::new();
    let plain = s.mkdir("plain-dir");
    let out = s.run(&["unmount", "--force", plain.to_str().unwrap()]);
    assert_refused(&s, &out, 1, &["plain-dir", "not a kmount mount"]);
}

#[test]
fn unmount_force_when_the_daemon_is_gone() {
    let s = Scratch::new();
    let (_, mnt) = s.mount("gone", &[]);
    let pid = s.daemon_pid(&mnt);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the daemon to die", Duration::from_secs(10), || {
        !pid_alive(pid)
    });
    let out = s.run(&["unmount", "--force", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    s.assert_nothing_mounted(&out);
}

#[test]
fn unmount_force_lists_unapplied_changes_and_the_next_mount_sends_them() {
    let s = Scratch::new();
    let (src, mnt) = s.mount("wb", &["--write-back"]);
    let pid = s.daemon_pid(&mnt);
    // The agent (the daemon's child) stops answering: changes stay in the journal.
    let agent: u32 = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("the daemon has no agent child")
        .parse()
        .unwrap();
    let agent_pid = nix::unistd::Pid::from_raw(agent as i32);
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    fs::write(mnt.join("unsent.txt"), b"keep me").unwrap();
    let out = run_timeout(
        s.kmount().args(["unmount", "--force"]).arg(&mnt),
        Duration::from_secs(30),
    );
    let _ = nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGCONT);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("not applied"), "{out}");
    assert!(out.stdout.contains("unsent.txt"), "{out}");
    assert!(!is_mounted(&mnt));
    assert!(!src.join("unsent.txt").exists());
    // The next mount of the same target at the same place sends it.
    let again = run_timeout(
        s.kmount().arg("--write-back").arg(&src).arg(&mnt),
        MOUNT_TIMEOUT,
    );
    assert!(again.success(), "{again}");
    let out = s.run(&["wait", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    assert_eq!(fs::read(src.join("unsent.txt")).unwrap(), b"keep me");
}

// ---------------------------------------------------------------------------------------------
// kmount.toml: up / down

fn write_toml(s: &Scratch, text: &str) {
    fs::write(s.path("kmount.toml"), text).unwrap();
}

#[test]
fn up_and_down_with_every_key() {
    let s = Scratch::new();
    s.mkdir("one");
    s.mkdir("two");
    fs::write(s.path("one/a"), b"1").unwrap();
    write_toml(
        &s,
        r#"
[[mount]]
target = "./one"
mountpoint = "m1"
exclude = ["*.log", "node_modules/"]
local_only = ["build/"]
on_change = "true"

[[mount]]
target = "./two"
mountpoint = "nested/m2"
"#,
    );
    let sub = s.mkdir("deep/below");
    let out = run_timeout(s.kmount().current_dir(&sub).arg("up"), MOUNT_TIMEOUT * 2);
    assert!(out.success(), "{out}");
    assert!(is_mounted(&s.path("m1")));
    assert!(is_mounted(&s.path("nested/m2")));
    assert_eq!(fs::read(s.path("m1/a")).unwrap(), b"1");
    let (code, out, full) = why(&s, &["m1/node_modules/"]);
    assert_eq!(code, 0, "{full}");
    assert!(out.starts_with("--exclude:2:node_modules/"), "{full}");
    let (code, _, full) = why(&s, &["m1/build/"]);
    assert_eq!(code, 0, "{full}");
    let st = s.run(&["status", "--json", "m1"]);
    assert!(st.stdout.contains("\"command\": \"true\""), "{st}");
    // Again: already mounted, nothing changes.
    let out = s.run(&["up"]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("already mounted"), "{out}");
    let out = s.run(&["down"]);
    assert!(out.success(), "{out}");
    s.assert_nothing_mounted(&out);
}

#[test]
fn up_undoes_its_mounts_when_an_entry_fails() {
    let s = Scratch::new();
    s.mkdir("good");
    let busy = s.mkdir("busy");
    fs::write(busy.join("precious"), b"x").unwrap();
    write_toml(
        &s,
        r#"
[[mount]]
target = "./good"
mountpoint = "fresh/m1"

[[mount]]
target = "./good"
mountpoint = "busy"
"#,
    );
    let out = s.run(&["up"]);
    assert_refused(&s, &out, 1, &["#2", "busy", "nothing was left mounted"]);
    assert!(
        !s.path("fresh").exists(),
        "the mountpoint up created is left behind"
    );
}

#[test]
fn broken_kmount_toml_names_the_line() {
    let s = Scratch::new();
    s.mkdir("src");
    for (text, mentions) in [
        (
            "[[mount]]\ntarget = \"./src\"\nmountpoint = \"m\"\nbogus = 1\n",
            vec!["kmount.toml:4", "bogus"],
        ),
        (
            "[[mount]]\ntarget = \"./src\"\nmountpoint = \"m\"\nexclude = \"*.log\"\n",
            vec!["kmount.toml:4"],
        ),
        (
            "[[mount]]\ntarget = \"./src\"\nmountpoint = \"m\"\n\n[[mount]]\ntarget = \"deploy/:/x\"\nmountpoint = \"n\"\n",
            vec!["kmount.toml:5", "#2", "deploy/"],
        ),
        (
            "[[mount]]\ntarget = \"./src\"\nmountpoint = \"m\"\nexclude = [\"a{b\"]\n",
            vec!["kmount.toml:1", "a{b"],
        ),
        ("[[mount]\n", vec!["kmount.toml:1"]),
    ] {
        write_toml(&s, text);
        let out = s.run(&["up"]);
        let m: Vec<&str> = mentions.iter().map(|m| &**m).collect();
        assert_refused(&s, &out, 1, &m);
        assert!(
            !s.path("m").exists(),
            "up made a mountpoint for a broken file"
        );
    }
    fs::remove_file(s.path("kmount.toml")).unwrap();
    let out = s.run(&["up"]);
    assert_refused(&s, &out, 1, &["no kmount.toml", "[[mount]]"]);
}

// ---------------------------------------------------------------------------------------------
// Bad input on the mount command line

#[test]
fn bad_mount_command_lines() {
    let s = Scratch::new();
    let src = s.mkdir("src");
    let mnt = s.mkdir("mnt");
    let (src_s, mnt_s) = (src.to_str().unwrap(), mnt.to_str().unwrap());
    let cases: &[(&[&str], i32, &[&str])] = &[
        (
            &["deploy/:/x", mnt_s],
            1,
            &["deploy/", "names no deployment"],
        ),
        (&[src_s], 2, &["MOUNTPOINT"]),
        (&["--bogus", src_s, mnt_s], 2, &["--bogus"]),
        (
            &["--reconcile-interval", "soon", src_s, mnt_s],
            2,
            &["soon"],
        ),
        (
            &["-n", "dev", src_s, mnt_s],
            1,
            &["--namespace", "Kubernetes"],
        ),
        (&["srcdir", mnt_s], 1, &["./srcdir"]),
    ];
    for (args, code, mentions) in cases {
        let out = s.run(args);
        assert_refused(&s, &out, *code, mentions);
    }
}

// ---------------------------------------------------------------------------------------------
// doctor, completions, man

#[test]
fn doctor_checks_the_machine() {
    require_fuse();
    let out = run_timeout(kmount_cmd().arg("doctor"), MOUNT_TIMEOUT);
    assert!(
        out.success(),
        "doctor fails on a machine that mounts: {out}"
    );
    for check in [
        "/dev/fuse",
        "fusermount3",
        "user_allow_other",
        "inotify limits",
        "kmount-agent",
    ] {
        assert!(out.stdout.contains(check), "doctor skips {check}: {out}");
    }
}

#[test]
fn doctor_checks_the_way_to_a_target() {
    let s = Scratch::new();
    // An ssh host that cannot exist (.invalid never resolves).
    let out = run_timeout(
        s.kmount().args(["doctor", "me@kmount-test.invalid:/srv"]),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.and_then(|c| c.code()), Some(1), "{out}");
    assert!(out.stdout.contains("FAIL  ssh"), "{out}");
    // A context in a kubeconfig that does not exist.
    let out = run_timeout(
        s.kmount().args([
            "doctor",
            "--context",
            "nope",
            "--kubeconfig",
            s.path("no-kubeconfig").to_str().unwrap(),
        ]),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.and_then(|c| c.code()), Some(1), "{out}");
    assert!(out.stdout.contains("FAIL  kubeconfig"), "{out}");
    let out = s.run(&["doctor", "deploy/:/x"]);
    assert_refused(&s, &out, 1, &["deploy/"]);
}

#[test]
fn completions_and_man_cover_the_new_commands() {
    let out = run_timeout(kmount_cmd().args(["completions", "bash"]), MOUNT_TIMEOUT);
    assert!(out.success(), "{out}");
    for word in [
        "status",
        "logs",
        "why",
        "--bwlimit",
        "--exclude",
        "--on-change",
        "--force",
    ] {
        assert!(out.stdout.contains(word), "bash completion lacks {word}");
    }
    let out = run_timeout(kmount_cmd().arg("man"), MOUNT_TIMEOUT);
    assert!(out.success(), "{out}");
    for word in [
        "bwlimit",
        "local\\-only",
        "no\\-default\\-ignores",
        "KMOUNT STATUS",
        "KMOUNT LOGS",
        "KMOUNT WHY",
        "KMOUNT UNMOUNT",
        "\\-\\-force",
        "KMOUNT UP",
    ] {
        assert!(out.stdout.contains(word), "the man page lacks {word}");
    }
}

#[test]
fn a_foreground_mount_logs_to_its_file_too() {
    use std::io::{BufRead, BufReader};
    let s = Scratch::new();
    let src = s.mkdir("fg-src");
    let mnt = s.mkdir("fg-mnt");
    let mut child = s
        .kmount()
        .arg("-f")
        .arg(&src)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("mounted"), "no ready line: {line:?}");
    let out = s.run(&["logs", mnt.to_str().unwrap()]);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + UNMOUNT_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kmount -f did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("mounted"), "{out}");
}

#[test]
fn a_terminal_sees_progress_and_what_was_reached() {
    let s = Scratch::new();
    let src = s.mkdir("tty-src");
    let mnt = s.mkdir("tty-mnt");
    assert!(
        Path::new("/usr/bin/script").is_file(),
        "this test needs `script` (util-linux) to give kmount a terminal: apt-get install bsdutils"
    );
    // `script` gives kmount a terminal on stdout and stderr; without one (every other test)
    // kmount prints the ready line only.
    let line = format!(
        "{} {} {}",
        kmount_bin().display(),
        src.display(),
        mnt.display()
    );
    let out = run_timeout(
        Command::new("/usr/bin/script")
            .args(["-qec", &line, "/dev/null"])
            .env("KMOUNT_STATE_DIR", &s.state)
            .env("KMOUNT_AGENT", agent_bin()),
        MOUNT_TIMEOUT,
    );
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains("kmount: connected to the agent"),
        "{out}"
    );
    assert!(out.stdout.contains("kmount: mounted "), "{out}");
    assert!(is_mounted(&mnt));
}

#[test]
fn status_counts_unapplied_changes_while_wait_waits() {
    let s = Scratch::new();
    let (src, mnt) = s.mount("pend", &["--write-back"]);
    let pid = s.daemon_pid(&mnt);
    let agent: i32 = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("the daemon has no agent child")
        .parse()
        .unwrap();
    let agent = nix::unistd::Pid::from_raw(agent);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    fs::write(mnt.join("later.txt"), b"soon").unwrap();
    let mut waiting = s
        .kmount()
        .arg("wait")
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The daemon answers status while `wait` waits.
    let started = Instant::now();
    let out = run_timeout(
        s.kmount().args(["status", "--json"]).arg(&mnt),
        Duration::from_secs(8),
    );
    let _ = nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT);
    assert!(out.success(), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "status waited for wait"
    );
    assert!(out.stdout.contains("\"write_back\": true"), "{out}");
    assert!(!out.stdout.contains("\"pending_changes\": 0,"), "{out}");
    let text = s.run(&["status", mnt.to_str().unwrap()]);
    assert!(text.stdout.contains("write-back"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = waiting.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = waiting.kill();
            panic!("kmount wait did not return once the agent was back");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert_eq!(fs::read(src.join("later.txt")).unwrap(), b"soon");
    let out = s.run(&["status", "--json", mnt.to_str().unwrap()]);
    assert!(out.stdout.contains("\"pending_changes\": 0,"), "{out}");
}

#[test]
fn over_ssh_doctor_checks_the_host_and_the_ready_line_names_it() {
    use kmount_bench::sshd::{HOST_ALIAS, TestSshd, Variant};
    let sshd = TestSshd::start().unwrap_or_else(|e| panic!("cannot start the test sshd: {e}"));
    let s = Scratch::new();
    let remote = s.mkdir("remote");
    let mnt = s.mkdir("ssh-mnt");
    let target = format!("ssh://{HOST_ALIAS}:{}{}", sshd.port(), remote.display());

    let doctor = |v: Variant| {
        run_timeout(
            s.kmount()
                .env("KMOUNT_SSH", sshd.ssh_command(v))
                .args(["doctor", &target]),
            Duration::from_secs(60),
        )
    };
    let out = doctor(Variant::Good);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("ok    ssh"), "{out}");
    let out = doctor(Variant::UnauthorizedKey);
    assert_eq!(out.status.and_then(|c| c.code()), Some(1), "{out}");
    assert!(out.stdout.contains("FAIL  ssh"), "{out}");
    assert!(
        out.stdout.contains("without a password"),
        "no next step: {out}"
    );

    let out = run_timeout(
        s.kmount()
            .env("KMOUNT_SSH", sshd.ssh_command(Variant::Good))
            .arg(&target)
            .arg(&mnt),
        MOUNT_TIMEOUT * 2,
    );
    assert!(out.success(), "{out}");
    assert!(
        out.stdout
            .contains(&format!("via kmount-agent on {HOST_ALIAS}")),
        "the ready line does not say what it reached: {out}"
    );
    let out = s.run(&["status", "--json", mnt.to_str().unwrap()]);
    assert!(out.stdout.contains("\"state\": \"connected\""), "{out}");
}

/// A vim session through the mount: its swap file is there for vim (and `kmount why` names
/// the built-in rule that keeps it here) while the target never sees it, and the save arrives.
#[test]
fn a_vim_session_leaves_no_swap_file_in_the_target() {
    let s = Scratch::new();
    let (src, mnt) = s.mount("vim", &[]);
    fs::write(src.join("app.js"), "let a = 1;\n".repeat(50)).unwrap();
    wait_until("app.js in the mount", Duration::from_secs(10), || {
        mnt.join("app.js").exists()
    });
    let out = s.mkdir("vim-out");
    let o = out.to_str().unwrap();
    let b = src.to_str().unwrap();
    // While vim holds the swap file: is it readable in the mount, present in the target, and
    // what does `kmount why` say of it (run by vim itself, with this test's environment).
    let probe = format!(
        "call writefile([string(filereadable(swapname('%'))), \
         string(filereadable('{b}/' . fnamemodify(swapname('%'), ':t'))), \
         fnamemodify(swapname('%'), ':t')], '{o}/probe') | \
         call writefile(systemlist('{kmount} why ' . shellescape(swapname('%'))), '{o}/why')",
        kmount = kmount_bin().display()
    );
    let vim = Command::new("vim")
        .current_dir(&mnt)
        .env("KMOUNT_STATE_DIR", &s.state)
        .env("KMOUNT_AGENT", agent_bin())
        .args([
            "-u",
            "NONE",
            "-i",
            "NONE",
            "-N",
            "-es",
            "-c",
            "set swapfile directory=.",
            "-c",
            "preserve",
            "-c",
            &probe,
            "-c",
            "%s/a = 1/a = 2/",
            "-c",
            "wq",
            "app.js",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("vim is not installed: apt-get install -y vim (or scripts/deps.sh --test)");
    assert!(vim.status.success(), "vim failed: {vim:?}");
    let probe = fs::read_to_string(out.join("probe")).unwrap();
    let lines: Vec<&str> = probe.lines().collect();
    assert_eq!(
        lines[0], "1",
        "vim's swap file is not readable in the mount: {probe}"
    );
    assert_eq!(lines[1], "0", "the swap file reached the target: {probe}");
    assert_eq!(lines[2], ".app.js.swp");
    let why = fs::read_to_string(out.join("why")).unwrap();
    assert!(
        why.starts_with("default:") && why.contains(".swp\t") && why.ends_with("\tlocal-only\n"),
        "kmount why on the swap file: {why:?}"
    );
    assert_eq!(
        fs::read_to_string(src.join("app.js")).unwrap(),
        "let a = 2;\n".repeat(50)
    );
    let mut left: Vec<String> = fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["app.js"], "vim left files in the target");
}

// ---------------------------------------------------------------------------------------------
// process death: nothing `close()` accepted is lost

/// The agent process serving `daemon` (its child).
fn agent_of(daemon: u32) -> nix::unistd::Pid {
    let pid = *children_of(daemon)
        .first()
        .expect("the daemon has no agent child");
    nix::unistd::Pid::from_raw(pid as i32)
}

/// Files of every size class, each written whole by one `fs::write` (returned: accepted), and
/// then some renamed and some rewritten: the expected final contents by name.
fn accepted_workload(mnt: &Path, round: u64) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut want = std::collections::BTreeMap::new();
    for i in 0..40u64 {
        let len = match i % 4 {
            0 => 0,
            1 => 100,
            2 => 70_000,
            _ => 1 << 20,
        };
        let name = format!("f{round}-{i}");
        let data = pattern(len as usize, round * 100 + i);
        fs::write(mnt.join(&name), &data).unwrap();
        want.insert(name, data);
    }
    for i in (0..40u64).step_by(5) {
        let from = format!("f{round}-{i}");
        let to = format!("moved{round}-{i}");
        fs::rename(mnt.join(&from), mnt.join(&to)).unwrap();
        let data = want.remove(&from).unwrap();
        want.insert(to, data);
    }
    for i in (1..40u64).step_by(7) {
        let name = format!("f{round}-{i}");
        let data = pattern(5_000, 9_000 + round * 100 + i);
        fs::write(mnt.join(&name), &data).unwrap();
        want.insert(name, data);
    }
    want
}

#[track_caller]
fn assert_landed(src: &Path, want: &std::collections::BTreeMap<String, Vec<u8>>) {
    for (name, data) in want {
        let got = fs::read(src.join(name))
            .unwrap_or_else(|e| panic!("{name}, accepted by close(), is not in the target: {e}"));
        assert!(
            got == *data,
            "{name}: {} bytes in the target, {} accepted",
            got.len(),
            data.len()
        );
    }
}

/// The daemon is SIGKILLed while every change it accepted is still in its journal (the agent
/// is frozen): `kmount list` and `unmount` cope with the dead mount, and mounting the same
/// target again sends everything.
#[test]
fn a_killed_daemon_loses_nothing_close_accepted() {
    let s = Scratch::new();
    let (src, mnt) = s.mount("killed", &["--write-back"]);
    let pid = s.daemon_pid(&mnt);
    let agent = agent_of(pid);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let want = accepted_workload(&mnt, 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the daemon to die", Duration::from_secs(10), || {
        !pid_alive(pid)
    });
    let _ = nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGKILL);
    // Frozen before the first write: none of it can have reached the target.
    assert!(want.keys().all(|n| !src.join(n).exists()));
    let listed = s.run(&["list"]);
    assert!(listed.success(), "{listed}");
    let out = s.run(&["unmount", mnt.to_str().unwrap()]);
    assert!(out.success(), "unmount of a dead daemon's mount: {out}");
    assert!(!is_mounted(&mnt));
    let again = run_timeout(
        s.kmount().arg("--write-back").arg(&src).arg(&mnt),
        MOUNT_TIMEOUT,
    );
    assert!(again.success(), "{again}");
    let out = s.run(&["wait", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}{}", logs_in(&s.state));
    assert_landed(&src, &want);
    // And the mount shows them as they are.
    for (name, data) in &want {
        assert!(
            fs::read(mnt.join(name)).unwrap() == *data,
            "{name} through the mount"
        );
    }
}

/// The agent is SIGKILLed three times while files are being written through a write-back
/// mount: the mount reconnects (a new agent) and every accepted file arrives whole.
#[test]
fn a_killed_agent_mid_workload_loses_nothing() {
    let s = Scratch::new();
    let (src, mnt) = s.mount("agentkill", &["--write-back"]);
    let pid = s.daemon_pid(&mnt);
    let mut want = std::collections::BTreeMap::new();
    for round in 0..3u64 {
        let writer = {
            let mnt = mnt.clone();
            std::thread::spawn(move || accepted_workload(&mnt, round))
        };
        std::thread::sleep(Duration::from_millis(150));
        let t = Instant::now();
        while children_of(pid).is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "round {round}: no agent serves the mount after 20 s:\n{}",
                logs_in(&s.state)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nix::sys::signal::kill(agent_of(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        want.extend(writer.join().unwrap());
    }
    let out = s.run(&["wait", mnt.to_str().unwrap()]);
    assert!(out.success(), "{out}{}", logs_in(&s.state));
    assert_landed(&src, &want);
    let log = logs_in(&s.state);
    assert!(
        log.matches("reconnected").count() >= 3,
        "three agents killed, fewer reconnections logged:\n{log}"
    );
}
