//! The mass-removal guard on a real mount: a remote that suddenly lacks most of the tree
//! does not empty the mounted view; `confirm_removal` (what `kmount confirm` calls) applies
//! the removal, and the files coming back lifts the hold by itself.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Mounted, Setup, eventually};
use kmount_mount::MountOptions;

/// 5 directories of 100 files and 5 files at the root: 510 entries.
fn fill(root: &Path) {
    for d in 0..5 {
        let dir = root.join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            fs::write(dir.join(format!("f{f}.txt")), format!("{d}/{f}\n")).unwrap();
        }
    }
    for f in 0..5 {
        fs::write(root.join(format!("top{f}.txt")), "top\n").unwrap();
    }
}

/// Entries below `root` (itself excluded). Entries that go while it counts may or may not
/// be counted.
fn count(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            n += 1;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    n
}

fn setup() -> Setup {
    Setup {
        opts: MountOptions {
            reconcile_interval: Duration::from_millis(500),
            ..MountOptions::default()
        },
        reconnect: true,
        ..Setup::default()
    }
}

/// Swaps the served directory for an empty one and restarts the agent on it (a pod replaced
/// by one with a fresh filesystem). Returns where the old contents are.
fn serve_an_empty_directory(m: &Mounted) -> PathBuf {
    let old = m.remote.path().with_extension("old");
    fs::rename(m.remote.path(), &old).unwrap();
    fs::create_dir(m.remote.path()).unwrap();
    let pid = m.agent_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    old
}

fn held(m: &Mounted) -> bool {
    m.handle().held_removal().is_some()
}

#[test]
fn a_fresh_empty_remote_is_held_until_confirmed() {
    let Some(m) = Mounted::new(setup(), fill) else {
        return;
    };
    assert_eq!(count(m.mnt.path()), 510);
    let old = serve_an_empty_directory(&m);
    eventually("the removal held", Duration::from_secs(20), || held(&m));
    let h = m.handle().held_removal().unwrap();
    assert_eq!((h.removing, h.known), (510, 510), "{h:?}");
    // Some reconciliations later, the view is whole.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(held(&m));
    assert_eq!(count(m.mnt.path()), 510, "the mount lost entries");
    assert_eq!(
        fs::read_to_string(m.m("d3/f7.txt")).ok(),
        None,
        "not on the remote"
    );
    assert!(m.m("d3/f7.txt").exists(), "still listed");
    let outcome = m.handle().sync_stats().last_reconcile_outcome.unwrap();
    assert!(outcome.contains("paused"), "{outcome}");
    // A new file on the remote still shows meanwhile.
    fs::write(m.r("new.txt"), "new\n").unwrap();
    eventually("a new remote file", Duration::from_secs(5), || {
        m.m("new.txt").exists()
    });

    let confirmed = m.handle().confirm_removal().unwrap();
    assert_eq!(confirmed.removing, 510);
    eventually("the confirmed removal", Duration::from_secs(10), || {
        count(m.mnt.path()) == 1
    });
    // A reconciliation that surveyed before the confirmation may still end after it (and find
    // the removal again); the next one sees nothing left to hold.
    eventually("the pause to end", Duration::from_secs(10), || !held(&m));
    assert!(
        m.handle().confirm_removal().is_err(),
        "nothing left to confirm"
    );
    fs::remove_dir_all(old).unwrap();
    m.unmount();
}

#[test]
fn the_hold_lifts_when_the_files_come_back() {
    let Some(m) = Mounted::new(setup(), fill) else {
        return;
    };
    let old = serve_an_empty_directory(&m);
    eventually("the removal held", Duration::from_secs(20), || held(&m));
    // The volume shows up late: the same files, in the directory now served.
    for e in fs::read_dir(&old).unwrap() {
        let e = e.unwrap();
        fs::rename(e.path(), m.r(e.file_name().to_str().unwrap())).unwrap();
    }
    eventually("the hold lifted", Duration::from_secs(10), || !held(&m));
    assert_eq!(count(m.mnt.path()), 510);
    assert_eq!(fs::read_to_string(m.m("d3/f7.txt")).unwrap(), "3/7\n");
    // Removals show again as before.
    fs::remove_file(m.r("top0.txt")).unwrap();
    eventually("a remote delete", Duration::from_secs(5), || {
        !m.m("top0.txt").exists()
    });
    fs::remove_dir_all(old).unwrap();
    m.unmount();
}

#[test]
fn a_remote_rm_of_most_files_is_held_and_a_small_one_shows_at_once() {
    let Some(m) = Mounted::new(setup(), |root| {
        fill(root);
        let small = root.join("small");
        fs::create_dir(&small).unwrap();
        for f in 0..50 {
            fs::write(small.join(format!("s{f}")), "s\n").unwrap();
        }
    }) else {
        return;
    };
    assert_eq!(count(m.mnt.path()), 561);
    // rm -rf of a 50-file directory: shown within the watcher's latency.
    fs::remove_dir_all(m.r("small")).unwrap();
    let took = eventually("a small remote rm -rf", Duration::from_secs(5), || {
        !m.m("small").exists()
    });
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!held(&m));
    // Everything else goes: at most 100 entries leave the view before the guard holds.
    for e in fs::read_dir(m.remote.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }
    eventually("the removal held", Duration::from_secs(20), || held(&m));
    std::thread::sleep(Duration::from_millis(1500));
    let left = count(m.mnt.path());
    eprintln!("{left} of 510 entries left in the view while held");
    assert!(
        left >= 510 - 101,
        "only {left} of 510 entries left in the view"
    );
    m.handle().confirm_removal().unwrap();
    eventually("the confirmed removal", Duration::from_secs(10), || {
        count(m.mnt.path()) == 0
    });
    m.unmount();
}
