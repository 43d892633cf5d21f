//! Local-first mounts: changes land in the journal at once and reach the remote in order;
//! contents are served from the on-disk cache, across remounts, and never stale.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::{Mounted, Setup, eventually, snapshot};

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
        .collect()
}

fn settle(m: &Mounted) {
    m.handle()
        .wait_applied(Duration::from_secs(20))
        .expect("changes made through the mount did not reach the served directory");
}

#[test]
fn a_second_mount_serves_cached_content_without_fetching() {
    let state = tempfile::tempdir().unwrap();
    let setup = Setup::write_back(state.path());
    let big = pattern(3 << 20, 7);
    let Some(mut m) = Mounted::new(setup.clone(), |r| {
        fs::write(r.join("small"), b"a small file").unwrap();
        fs::create_dir(r.join("d")).unwrap();
        fs::write(r.join("d/big"), &big).unwrap();
    }) else {
        return;
    };
    if !m.handle().status().write_back {
        panic!(
            "cannot run: the agent keeps no journal lane; no write-back (the tests need it: fix the machine, do not skip)"
        );
    }
    assert_eq!(fs::read(m.m("small")).unwrap(), b"a small file");
    assert!(fs::read(m.m("d/big")).unwrap() == big);
    let first = m.handle().requests_sent("ReadPath");
    assert!(first >= 4, "the first mount fetched ({first} ReadPath)");
    // Written through the mount: cached too, as the remote has it once applied.
    fs::write(m.m("written"), b"made here").unwrap();
    settle(&m);

    m.remount(&setup);
    assert_eq!(m.handle().requests_sent("ReadPath"), 0);
    assert_eq!(fs::read(m.m("small")).unwrap(), b"a small file");
    assert!(fs::read(m.m("d/big")).unwrap() == big);
    assert_eq!(fs::read(m.m("written")).unwrap(), b"made here");
    assert_eq!(
        m.handle().requests_sent("ReadPath"),
        0,
        "the second mount read everything from the cache"
    );
    let status = m.handle().status();
    assert!(status.cache_usage >= big.len() as u64, "{status:?}");
    m.unmount();
}

#[test]
fn a_file_changed_while_unmounted_is_not_served_stale() {
    let state = tempfile::tempdir().unwrap();
    let setup = Setup::write_back(state.path());
    let Some(mut m) = Mounted::new(setup.clone(), |r| {
        fs::write(r.join("f"), b"version one").unwrap();
        fs::write(r.join("g"), b"unchanged").unwrap();
    }) else {
        return;
    };
    if !m.handle().status().write_back {
        panic!(
            "cannot run: the agent keeps no journal lane; no write-back (the tests need it: fix the machine, do not skip)"
        );
    }
    assert_eq!(fs::read(m.m("f")).unwrap(), b"version one");
    assert_eq!(fs::read(m.m("g")).unwrap(), b"unchanged");
    m.handle.take().unwrap().unmount().unwrap();
    // Same size, same inode: only the times tell the versions apart.
    let mut f = fs::OpenOptions::new().write(true).open(m.r("f")).unwrap();
    f.write_all(b"version two").unwrap();
    drop(f);
    m.remount(&setup);
    assert_eq!(fs::read(m.m("f")).unwrap(), b"version two");
    assert_eq!(fs::read(m.m("g")).unwrap(), b"unchanged");
    assert_eq!(
        m.handle().requests_sent("ReadPath"),
        1,
        "only the changed file is fetched again"
    );
    m.unmount();
}

#[test]
fn the_journal_delivers_changes_in_order() {
    let state = tempfile::tempdir().unwrap();
    let Some(m) = Mounted::new(Setup::write_back(state.path()), |r| {
        fs::write(r.join("existing"), b"old").unwrap();
    }) else {
        return;
    };
    if !m.handle().status().write_back {
        panic!(
            "cannot run: the agent keeps no journal lane; no write-back (the tests need it: fix the machine, do not skip)"
        );
    }
    let started = Instant::now();
    // Orders that only work when applied in order.
    fs::write(m.m("a"), b"first content of a").unwrap();
    fs::rename(m.m("a"), m.m("b")).unwrap();
    fs::write(m.m("a"), b"second a").unwrap();
    fs::create_dir_all(m.m("x/y/z")).unwrap();
    fs::rename(m.m("b"), m.m("x/y/z/b")).unwrap();
    fs::write(m.m("tmp"), b"short-lived").unwrap();
    fs::remove_file(m.m("tmp")).unwrap();
    fs::write(m.m("existing"), b"new content").unwrap();
    std::os::unix::fs::symlink("x/y", m.m("link")).unwrap();
    fs::hard_link(m.m("a"), m.m("a2")).unwrap();
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(m.m("log"))
        .unwrap();
    for i in 0..100 {
        writeln!(log, "line {i}").unwrap();
    }
    drop(log);
    fs::rename(m.m("x"), m.m("x2")).unwrap();
    let local = started.elapsed();
    let pending = m.handle().pending().unwrap();
    println!(
        "{} operations done locally in {:.1} ms; {} records pending",
        12 + 100,
        local.as_secs_f64() * 1e3,
        pending.records
    );
    settle(&m);
    println!(
        "all applied remotely {:.1} ms after the first",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(fs::read(m.r("a")).unwrap(), b"second a");
    assert_eq!(fs::read(m.r("x2/y/z/b")).unwrap(), b"first content of a");
    assert!(!m.r("tmp").exists());
    assert_eq!(fs::read(m.r("existing")).unwrap(), b"new content");
    assert_eq!(fs::read_link(m.r("link")).unwrap().to_str(), Some("x/y"));
    assert_eq!(
        fs::metadata(m.r("a2")).unwrap().ino(),
        fs::metadata(m.r("a")).unwrap().ino()
    );
    assert_eq!(fs::read_to_string(m.r("log")).unwrap().lines().count(), 100);
    assert_eq!(snapshot(m.mnt.path()), snapshot(m.remote.path()));
    assert_eq!(m.handle().pending().unwrap().records, 0);
    m.unmount();
}

#[test]
fn fsync_returns_once_the_remote_has_the_data() {
    let state = tempfile::tempdir().unwrap();
    let Some(m) = Mounted::new(Setup::write_back(state.path()), |_| {}) else {
        return;
    };
    if !m.handle().status().write_back {
        panic!(
            "cannot run: the agent keeps no journal lane; no write-back (the tests need it: fix the machine, do not skip)"
        );
    }
    let mut f = fs::File::create(m.m("durable")).unwrap();
    f.write_all(&pattern(200_000, 3)).unwrap();
    f.sync_all().unwrap();
    // No waiting here: fsync did.
    assert!(fs::read(m.remote.path().join("durable")).unwrap() == pattern(200_000, 3));
    drop(f);
    m.unmount();
}

#[test]
fn killing_the_agent_mid_workload_loses_nothing() {
    let state = tempfile::tempdir().unwrap();
    let mut setup = Setup::write_back(state.path());
    setup.reconnect = true;
    let Some(m) = Mounted::new(setup, |r| {
        fs::create_dir(r.join("work")).unwrap();
    }) else {
        return;
    };
    if !m.handle().status().write_back {
        panic!(
            "cannot run: the agent keeps no journal lane; no write-back (the tests need it: fix the machine, do not skip)"
        );
    }
    let mnt = m.mnt.path().to_path_buf();
    let writer = std::thread::spawn(move || {
        for i in 0..300 {
            let dir = mnt.join(format!("work/d{}", i % 7));
            fs::create_dir_all(&dir).unwrap();
            fs::write(
                dir.join(format!("f{i}")),
                pattern(10_000 + i * 37, i as u32),
            )
            .unwrap();
            if i % 10 == 0 {
                fs::rename(dir.join(format!("f{i}")), dir.join(format!("r{i}"))).unwrap();
            }
            if i % 13 == 0 && i > 0 {
                let _ = fs::remove_file(dir.join(format!("f{}", i - 1)));
            }
        }
    });
    // Kill the agent twice while the workload runs.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(150));
        if let Some(pid) = common::find_agent_pid(m.remote.path()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    writer
        .join()
        .expect("the workload failed while the agent was killed");
    settle(&m);
    assert_eq!(snapshot(m.mnt.path()), snapshot(m.remote.path()));
    let status = m.handle().status();
    assert!(status.blocked.is_none(), "{status:?}");
    m.unmount();
}

#[test]
fn flush_and_unmount_waits_and_status_tells_what_is_pending() {
    let state = tempfile::tempdir().unwrap();
    let Some(mut m) = Mounted::new(Setup::write_back(state.path()), |_| {}) else {
        return;
    };
    if !m.handle().status().write_back {
        panic!(
            "cannot run: the agent keeps no journal lane; no write-back (the tests need it: fix the machine, do not skip)"
        );
    }
    for i in 0..50 {
        fs::write(m.m(&format!("f{i}")), pattern(50_000, i)).unwrap();
    }
    let status = m.handle().status();
    assert!(status.write_back && status.whole_tree);
    assert!(status.tail_seq >= 100, "{status:?}");
    let handle = m.handle.take().unwrap();
    handle
        .flush_and_unmount(Duration::from_secs(30))
        .expect("everything applied, then unmounted");
    assert!(!common::is_mounted(m.mnt.path()));
    for i in 0..50 {
        assert!(fs::read(m.remote.path().join(format!("f{i}"))).unwrap() == pattern(50_000, i));
    }
    eventually("nothing left", Duration::from_secs(1), || true);
}

/// The target removes a file while a change to it is still in the journal (the agent was
/// frozen): the local version wins; the file is made there again, whole, and the journal goes
/// on (it stayed blocked on the write's ENOENT before).
#[test]
fn a_file_removed_in_the_target_while_its_change_is_pending_is_made_again() {
    let state = tempfile::tempdir().unwrap();
    let mut setup = Setup::write_back(state.path());
    setup.reconnect = true;
    let m = Mounted::new(setup, |r| {
        fs::write(r.join("f"), b"first").unwrap();
    })
    .unwrap();
    fs::write(m.m("f"), pattern(50_000, 1)).unwrap();
    settle(&m);
    let agent = nix::unistd::Pid::from_raw(m.agent_pid());
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mine = pattern(60_000, 2);
    {
        let f = fs::OpenOptions::new().write(true).open(m.m("f")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &mine[..10_000], 0).unwrap();
    }
    fs::OpenOptions::new()
        .append(true)
        .open(m.m("f"))
        .unwrap()
        .write_all(&mine[50_000..])
        .unwrap();
    fs::write(m.m("after"), b"a later change").unwrap();
    fs::remove_file(m.r("f")).unwrap();
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).unwrap();
    settle(&m);
    let mut want = pattern(50_000, 1);
    want[..10_000].copy_from_slice(&mine[..10_000]);
    want.extend_from_slice(&mine[50_000..]);
    assert!(
        fs::read(m.r("f")).unwrap() == want,
        "the target's f is not the local version"
    );
    assert!(fs::read(m.m("f")).unwrap() == want, "the mount's f changed");
    assert_eq!(fs::read(m.r("after")).unwrap(), b"a later change");
    assert!(m.handle().status().blocked.is_none());
    m.unmount();
}

/// Writers faster than the remote (every reply delayed): the backlog of changes not yet
/// applied stays near the flow-control limit, because changes wait for the sender once it is
/// reached, and everything written arrives. Without flow control the backlog grows with the
/// writers' lead (here to thousands of records).
#[test]
fn writers_faster_than_the_remote_wait_for_the_backlog() {
    use kmount_mount::client::Connector;
    use kmount_mount::fault::{Faults, FaultyConnector};
    use std::sync::Arc;

    const LIMIT: u64 = 100;
    const WRITERS: usize = 4;
    const FILES: u32 = 150;
    let state = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let mut setup = Setup::write_back(state.path());
    setup.opts.backlog_limit = LIMIT;
    let f = faults.clone();
    setup.wrap = Some(Arc::new(move |c| {
        Arc::new(FaultyConnector::new(Arc::new(c), f.clone())) as Arc<dyn Connector>
    }));
    let Some(m) = Mounted::new(setup, |r| {
        for w in 0..WRITERS {
            fs::create_dir(r.join(format!("w{w}"))).unwrap();
        }
    }) else {
        return;
    };
    assert!(
        m.handle().status().write_back,
        "the mount is not write-back"
    );
    faults.delay(Duration::from_millis(20));
    let mnt = m.mnt.path().to_path_buf();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                for i in 0..FILES {
                    fs::write(mnt.join(format!("w{w}/f{i}")), pattern(100, i)).unwrap();
                }
            })
        })
        .collect();
    let mut most = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        let st = m.handle().status();
        most = most.max(st.tail_seq.saturating_sub(st.applied_seq));
        std::thread::sleep(Duration::from_millis(2));
    }
    for w in writers {
        w.join().unwrap();
    }
    let st = m.handle().status();
    println!(
        "MEASURE backlog: at most {most} records (limit {LIMIT}); {} changes waited, {} ms in all",
        st.sync.throttled, st.sync.throttled_ms
    );
    assert!(
        st.sync.throttled > 0,
        "no change ever waited for the backlog"
    );
    // Each writer may have one change past the check when the backlog shrinks.
    assert!(
        most <= LIMIT + 4 * WRITERS as u64,
        "the backlog grew to {most} records, limit {LIMIT}"
    );
    faults.delay(Duration::ZERO);
    settle(&m);
    assert_eq!(snapshot(m.mnt.path()), snapshot(m.remote.path()));
    for w in 0..WRITERS {
        for i in (0..FILES).step_by(37) {
            assert_eq!(
                fs::read(m.r(&format!("w{w}/f{i}"))).unwrap(),
                pattern(100, i)
            );
        }
    }
}
