//! Bounded hangs: with the remote frozen (the agent stopped) or dead (killed, and new
//! connections refused), what the mount has answers at once, what needs the remote fails
//! within the remote timeout (plus a little), the mount recovers when the remote returns, and
//! it unmounts promptly with the remote gone.

mod common;

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{agent_binary, eventually, find_agent_pid, init_logging, is_mounted};
use kmount_mount::{
    Client, ConnectFuture, Connector, LocalConnector, MountHandle, MountOptions, mount,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(3);
/// What a failing call may take beyond the timeout: the watchdog's ticks, the kernel.
const SLACK: Duration = Duration::from_secs(3);

/// A local agent that can be told to refuse new connections (a node that is down).
struct Gate {
    inner: LocalConnector,
    refuse: Arc<AtomicBool>,
}

impl Connector for Gate {
    fn connect(&self) -> ConnectFuture<'_> {
        if self.refuse.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "the test refuses connections",
                ))
            });
        }
        self.inner.connect()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Field order: the mount goes first.
struct Offline {
    handle: Option<MountHandle>,
    refuse: Arc<AtomicBool>,
    rt: tokio::runtime::Runtime,
    remote: TempDir,
    mnt: TempDir,
    _state: TempDir,
}

impl Offline {
    fn new(write_back: bool) -> Option<Self> {
        init_logging();
        if !Path::new("/dev/fuse").exists() {
            panic!(
                "cannot run: /dev/fuse is missing, no FUSE mount test can run here (the tests need it: fix the machine, do not skip)"
            );
        }
        let remote = tempfile::tempdir().unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        fs::write(remote.path().join("cached.txt"), "cached\n").unwrap();
        fs::write(remote.path().join("uncached.txt"), "uncached\n").unwrap();
        fs::create_dir(remote.path().join("dir")).unwrap();
        for i in 0..10 {
            fs::write(remote.path().join(format!("dir/f{i}")), "x").unwrap();
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let refuse = Arc::new(AtomicBool::new(false));
        let args = vec!["--mountpoint".into(), mnt.path().as_os_str().to_owned()];
        let gate = Gate {
            inner: LocalConnector::new(agent_binary(), remote.path().to_path_buf(), args),
            refuse: refuse.clone(),
        };
        let client = rt.block_on(Client::connect_shared(Arc::new(gate))).unwrap();
        let mut opts = MountOptions {
            remote_timeout: TIMEOUT,
            ..MountOptions::default()
        };
        if write_back {
            opts.cache_dir = Some(state.path().join("cache"));
            opts.journal_dir = Some(state.path().join("journal"));
        }
        let handle = mount(rt.handle().clone(), client, mnt.path(), &opts).unwrap();
        Some(Self {
            handle: Some(handle),
            refuse,
            rt,
            remote,
            mnt,
            _state: state,
        })
    }

    fn m(&self, rel: &str) -> std::path::PathBuf {
        self.mnt.path().join(rel)
    }

    fn agent(&self) -> Pid {
        Pid::from_raw(common::agent_pid(self.remote.path()))
    }

    /// Unmounts with the remote as it is; returns how long it took.
    fn unmount(mut self) -> Duration {
        let started = Instant::now();
        self.handle.take().unwrap().unmount().unwrap();
        let took = started.elapsed();
        assert!(!is_mounted(self.mnt.path()));
        let _ = &self.rt;
        took
    }
}

/// Runs `f` on a thread of its own, so that a hang fails the test instead of stalling it.
fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => (v, started.elapsed()),
        Err(_) => panic!("{what} still hangs after {limit:?}"),
    }
}

fn read(path: std::path::PathBuf) -> io::Result<String> {
    fs::read_to_string(path)
}

/// What the mount answers by itself: attributes, listings, cached contents.
fn local_answers_are_instant(o: &Offline) {
    let (ok, took) = bounded("stat, ls and a cached read", Duration::from_secs(5), {
        let (cached, dir) = (o.m("cached.txt"), o.m("dir"));
        move || {
            fs::metadata(&cached).is_ok()
                && fs::read_dir(&dir).map(|d| d.count()).ok() == Some(10)
                && read(cached).ok().as_deref() == Some("cached\n")
        }
    });
    assert!(ok, "the mount's own answers failed offline");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// A read of a file the mount does not have fails within the timeout; returns how long.
fn remote_read_fails_in_time(o: &Offline) -> Duration {
    let (result, took) = bounded("a read that needs the remote", TIMEOUT * 4, {
        let p = o.m("uncached.txt");
        move || read(p)
    });
    let err = result.expect_err("read a file the mount never had, with the remote away");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO | libc::ETIMEDOUT)),
        "{err}"
    );
    assert!(took < TIMEOUT + SLACK, "failed only after {took:?}");
    took
}

#[test]
fn a_frozen_remote_bounds_what_needs_it_and_the_mount_recovers() {
    let Some(o) = Offline::new(true) else { return };
    assert_eq!(read(o.m("cached.txt")).unwrap(), "cached\n");
    let agent = o.agent();
    o.refuse.store(true, Ordering::SeqCst);
    kill(agent, Signal::SIGSTOP).unwrap();

    local_answers_are_instant(&o);
    let took = remote_read_fails_in_time(&o);
    eprintln!("frozen remote: a read that needs it failed after {took:?}");
    local_answers_are_instant(&o);

    // The agent wakes (it was given up and ended meanwhile, or not) and the node takes
    // connections again: the same read works.
    let _ = kill(agent, Signal::SIGCONT);
    o.refuse.store(false, Ordering::SeqCst);
    let p = o.m("uncached.txt");
    eventually(
        "the read after the remote returned",
        Duration::from_secs(20),
        || read(p.clone()).ok().as_deref() == Some("uncached\n"),
    );
    let took = o.unmount();
    eprintln!("frozen remote, back again: unmounted in {took:?}");
}

#[test]
fn a_dead_remote_bounds_what_needs_it_and_the_mount_recovers() {
    let Some(o) = Offline::new(false) else { return };
    o.refuse.store(true, Ordering::SeqCst);
    kill(o.agent(), Signal::SIGKILL).unwrap();
    eventually("the agent gone", Duration::from_secs(5), || {
        find_agent_pid(o.remote.path()).is_none()
    });
    // Write-through: nothing is cached but names and attributes.
    let (ok, took) = bounded("stat and ls", Duration::from_secs(5), {
        let (f, dir) = (o.m("cached.txt"), o.m("dir"));
        move || {
            fs::metadata(&f).map(|m| m.len()).ok() == Some(7)
                && fs::read_dir(&dir).map(|d| d.count()).ok() == Some(10)
        }
    });
    assert!(ok && took < Duration::from_secs(1), "{took:?}");
    let took = remote_read_fails_in_time(&o);
    eprintln!("dead remote: a read that needs it failed after {took:?}");

    o.refuse.store(false, Ordering::SeqCst);
    let p = o.m("uncached.txt");
    eventually(
        "the read after the remote returned",
        Duration::from_secs(20),
        || read(p.clone()).ok().as_deref() == Some("uncached\n"),
    );
    assert_eq!(read(o.m("cached.txt")).unwrap(), "cached\n");
    o.unmount();
}

#[test]
fn unmount_is_prompt_with_the_remote_frozen() {
    let Some(o) = Offline::new(true) else { return };
    assert_eq!(read(o.m("cached.txt")).unwrap(), "cached\n");
    o.refuse.store(true, Ordering::SeqCst);
    let agent = o.agent();
    kill(agent, Signal::SIGSTOP).unwrap();
    // A read is stuck on the remote when the unmount comes: the file is in use, which the
    // unmount says at once (it does not wait on the remote), and the read itself ends in time.
    let p = o.m("uncached.txt");
    let reader = std::thread::spawn(move || read(p));
    std::thread::sleep(Duration::from_millis(300));
    let unmounter = o.handle.as_ref().unwrap().unmounter();
    let (busy, took) = bounded(
        "unmount with a read in flight",
        Duration::from_secs(10),
        move || unmounter.unmount(),
    );
    eprintln!("unmount with a read in flight: {busy:?} after {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    if let Err(e) = busy {
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    }
    let (read_result, _) = bounded("the stuck read", TIMEOUT + SLACK, move || {
        reader.join().unwrap()
    });
    assert!(read_result.is_err());
    let (took, _) = bounded(
        "unmount with the remote frozen",
        Duration::from_secs(30),
        || o.unmount(),
    );
    eprintln!("frozen remote: unmounted in {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let _ = kill(agent, Signal::SIGCONT);
}

#[test]
fn unmount_is_prompt_with_the_remote_dead() {
    let Some(o) = Offline::new(true) else { return };
    o.refuse.store(true, Ordering::SeqCst);
    kill(o.agent(), Signal::SIGKILL).unwrap();
    eventually("the agent gone", Duration::from_secs(5), || {
        find_agent_pid(o.remote.path()).is_none()
    });
    let (took, _) = bounded(
        "unmount with the remote dead",
        Duration::from_secs(30),
        || o.unmount(),
    );
    eprintln!("dead remote: unmounted in {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}
