//! The mount keeps up with the remote: changes made directly in the served directory reach
//! the kernel's caches through the watcher and invalidations; reconciliation finds what the
//! watcher missed; a killed agent is replaced and the mount catches up.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::{Mounted, Setup, eventually, snapshot};
use kmount_mount::MountOptions;
use kmount_proto::Op;

/// Changes made remotely reach a mount whose kernel cached the old state; how long each
/// took is printed.
#[test]
fn remote_changes_reach_the_mount_quickly() {
    let Some(m) = Mounted::new(Setup::default(), |r| {
        fs::write(r.join("f"), b"one").unwrap();
        fs::create_dir(r.join("d")).unwrap();
        fs::write(r.join("d/g"), b"gone soon").unwrap();
        fs::write(r.join("mode"), b"").unwrap();
        fs::write(r.join("moved"), b"moving").unwrap();
    }) else {
        return;
    };
    if !m.handle().whole_tree() {
        panic!(
            "cannot run: the agent does not walk and watch; nothing is pushed (the tests need it: fix the machine, do not skip)"
        );
    }
    // The kernel caches all of it (1 h TTLs): only invalidations can change what it shows.
    assert_eq!(fs::read(m.m("f")).unwrap(), b"one");
    assert_eq!(fs::metadata(m.m("d/g")).unwrap().len(), 9);
    assert!(fs::metadata(m.m("new")).is_err());
    fs::metadata(m.m("mode")).unwrap();
    fs::read_dir(m.m("d")).unwrap().count();
    fs::read(m.m("moved")).unwrap();
    let bound = Duration::from_secs(2);
    let mut report = Vec::new();

    // write in place (same inode)
    let mut f = fs::OpenOptions::new().write(true).open(m.r("f")).unwrap();
    f.set_len(0).unwrap();
    f.write_all(b"two, longer").unwrap();
    drop(f);
    let t = eventually("a rewritten file", bound, || {
        fs::read(m.m("f")).is_ok_and(|d| d == b"two, longer")
    });
    assert_eq!(fs::metadata(m.m("f")).unwrap().len(), 11);
    report.push(("write", t));

    // create
    fs::write(m.r("new"), b"fresh").unwrap();
    let t = eventually("a new file", bound, || {
        fs::read(m.m("new")).is_ok_and(|d| d == b"fresh")
    });
    report.push(("create", t));

    // delete
    fs::remove_file(m.r("d/g")).unwrap();
    let t = eventually("a deleted file", bound, || {
        !m.m("d/g").exists() && fs::read_dir(m.m("d")).unwrap().count() == 0
    });
    report.push(("delete", t));

    // rename
    fs::rename(m.r("moved"), m.r("d/arrived")).unwrap();
    let t = eventually("a renamed file", bound, || {
        !m.m("moved").exists() && fs::read(m.m("d/arrived")).is_ok_and(|d| d == b"moving")
    });
    report.push(("rename", t));

    // chmod
    fs::set_permissions(m.r("mode"), fs::Permissions::from_mode(0o600)).unwrap();
    let t = eventually("a chmod", bound, || {
        fs::metadata(m.m("mode")).unwrap().mode() & 0o7777 == 0o600
    });
    report.push(("chmod", t));

    // mkdir -p deep, with a file at the bottom
    fs::create_dir_all(m.r("a/b/c/d/e/f/g")).unwrap();
    fs::write(m.r("a/b/c/d/e/f/g/leaf"), b"deep").unwrap();
    let t = eventually("mkdir -p", bound, || {
        fs::read(m.m("a/b/c/d/e/f/g/leaf")).is_ok_and(|d| d == b"deep")
    });
    report.push(("mkdir -p", t));

    // an editor's atomic save: write a temporary file, rename it over the original
    fs::write(m.r(".f.tmp"), b"saved atomically").unwrap();
    fs::rename(m.r(".f.tmp"), m.r("f")).unwrap();
    let t = eventually("an atomic save", bound, || {
        fs::read(m.m("f")).is_ok_and(|d| d == b"saved atomically")
    });
    assert_eq!(
        fs::metadata(m.m("f")).unwrap().ino(),
        fs::metadata(m.r("f")).unwrap().ino()
    );
    report.push(("atomic save", t));

    for (what, t) in &report {
        println!(
            "remote change -> visible through the mount: {what:12} {:7.1} ms",
            t.as_secs_f64() * 1e3
        );
    }
    // Every change arrived as a pushed invalidation, not by a cache expiring.
    assert!(m.handle().invalidations_sent() > 0);
    assert_eq!(snapshot(m.mnt.path()), snapshot(m.remote.path()));
    m.unmount();
}

/// With the watcher off, changes are found by comparing digests: on request and periodically.
#[test]
fn reconciliation_finds_what_the_watcher_missed() {
    let Some(m) = Mounted::new(
        Setup {
            opts: MountOptions {
                reconcile_interval: Duration::from_millis(300),
                ..MountOptions::default()
            },
            ..Setup::default()
        },
        |r| {
            for d in ["src", "src/deep/er", "docs", "old"] {
                fs::create_dir_all(r.join(d)).unwrap();
            }
            for i in 0..50 {
                fs::write(r.join(format!("src/f{i}")), i.to_string()).unwrap();
            }
            fs::write(r.join("src/deep/er/x"), b"x").unwrap();
            fs::write(r.join("docs/readme"), b"read me").unwrap();
            fs::write(r.join("old/a"), b"a").unwrap();
        },
    ) else {
        return;
    };
    if !m.handle().whole_tree() {
        panic!(
            "cannot run: the agent does not walk and watch (the tests need it: fix the machine, do not skip)"
        );
    }
    let outcome = m.handle().reconcile_now(Duration::from_secs(10)).unwrap();
    assert!(outcome.equal, "a fresh mount is in sync: {outcome:?}");

    // Turn the watcher off behind the mount's back.
    let client = m.client.clone();
    let done =
        m.rt.block_on(client.call(Op::Watch { enable: false }, None))
            .unwrap();
    assert_eq!(done, kmount_proto::Done::Ok);
    // Cache the old state in the kernel.
    assert_eq!(fs::read(m.m("src/f7")).unwrap(), b"7");
    fs::metadata(m.m("src/deep/er/x")).unwrap();

    fs::write(m.r("src/f7"), b"seven").unwrap();
    fs::write(m.r("src/deep/er/y"), b"new deep").unwrap();
    fs::remove_file(m.r("src/deep/er/x")).unwrap();
    fs::remove_dir_all(m.r("old")).unwrap();
    fs::create_dir_all(m.r("brand/new/tree")).unwrap();
    fs::write(m.r("brand/new/tree/leaf"), b"leaf").unwrap();
    fs::rename(m.r("docs/readme"), m.r("docs/README")).unwrap();
    fs::set_permissions(m.r("src/f1"), fs::Permissions::from_mode(0o640)).unwrap();

    let started = Instant::now();
    let outcome = m.handle().reconcile_now(Duration::from_secs(10)).unwrap();
    println!(
        "reconciliation after changes with the watcher off: {outcome} in {:.1} ms ({} digest \
         requests)",
        started.elapsed().as_secs_f64() * 1e3,
        outcome.digest_requests
    );
    assert!(!outcome.equal);
    assert!(outcome.relisted >= 3, "{outcome:?}");
    assert!(
        outcome.relisted < 10,
        "only differing directories: {outcome:?}"
    );
    assert_eq!(fs::read(m.m("src/f7")).unwrap(), b"seven");
    assert_eq!(fs::read(m.m("brand/new/tree/leaf")).unwrap(), b"leaf");
    assert!(!m.m("old").exists());
    assert!(!m.m("src/deep/er/x").exists());
    assert_eq!(snapshot(m.mnt.path()), snapshot(m.remote.path()));
    let outcome = m.handle().reconcile_now(Duration::from_secs(10)).unwrap();
    assert!(outcome.equal, "in sync after repairing: {outcome:?}");

    // The periodic reconciliation catches the next one by itself (the kernel cached the old
    // size; only the tree and an invalidation can change it).
    assert_eq!(fs::metadata(m.m("docs/README")).unwrap().len(), 7);
    fs::write(m.r("docs/README"), b"changed again").unwrap();
    let t = eventually(
        "a change with the watcher off",
        Duration::from_secs(5),
        || fs::metadata(m.m("docs/README")).unwrap().len() == 13,
    );
    println!(
        "change with the watcher off -> visible by periodic reconciliation (every 300 ms): \
         {:.0} ms",
        t.as_secs_f64() * 1e3
    );
    // The counter goes up once the repair is complete, which may be just after it shows.
    eventually("the repair counted", Duration::from_secs(5), || {
        m.handle().sync_stats().reconcile_repairs >= 2
    });
    m.unmount();
}

/// A killed agent is replaced (a new process through the connector); cached names keep
/// working meanwhile, and the mount catches up with what changed.
#[test]
fn a_killed_agent_is_replaced_and_the_mount_catches_up() {
    let Some(m) = Mounted::new(
        Setup {
            reconnect: true,
            ..Setup::default()
        },
        |r| {
            fs::write(r.join("kept"), b"still here").unwrap();
            fs::create_dir(r.join("dir")).unwrap();
        },
    ) else {
        return;
    };
    let whole_tree = m.handle().whole_tree();
    // A file open across the reconnection.
    let mut open = fs::File::open(m.m("kept")).unwrap();
    let old_pid = m.agent_pid();
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    if whole_tree {
        // Names and attributes come from the tree while the agent is away.
        assert_eq!(fs::metadata(m.m("kept")).unwrap().len(), 10);
        assert!(m.m("dir").is_dir());
    }
    // Changed while no agent watched.
    fs::write(m.r("dir/while-away"), b"missed by the watcher").unwrap();
    // Something that needs the agent waits for the new one.
    fs::write(m.m("dir/after"), b"written after the reconnection").unwrap();
    println!(
        "agent killed -> a write through the mount succeeded after {:.0} ms",
        killed.elapsed().as_secs_f64() * 1e3
    );
    assert_ne!(m.agent_pid(), old_pid, "a new agent serves the mount");
    assert_eq!(
        fs::read(m.r("dir/after")).unwrap(),
        b"written after the reconnection"
    );
    // The open file is opened again on the new agent.
    let mut s = String::new();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    let t = eventually(
        "a change made while the agent was away",
        Duration::from_secs(5),
        || fs::read(m.m("dir/while-away")).is_ok_and(|d| d == b"missed by the watcher"),
    );
    println!("caught up with a change made while disconnected after {t:?}");
    if whole_tree {
        // The watcher is on again.
        fs::write(m.r("dir/later"), b"later").unwrap();
        eventually(
            "a change after the reconnection",
            Duration::from_secs(2),
            || m.m("dir/later").exists(),
        );
    }
    drop(open);
    m.unmount();
}
