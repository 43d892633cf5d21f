//! A mount of a temporary directory through the real `kmount-agent`, for tests that need more
//! control than `mount.rs`'s harness: a directory filled before mounting, a client kept for
//! sending requests beside the mount, reconnection through a kept connector, remounting.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmount_mount::client::Connector;
use kmount_mount::{Client, LocalConnector, MountHandle, MountOptions, mount};
use tempfile::TempDir;

/// `KMOUNT_LOG=debug` (EnvFilter syntax) shows the mount's log on stderr.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("KMOUNT_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KMOUNT_AGENT") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/kmount-agent");
    assert!(
        p.exists(),
        "the agent binary {} is missing: run `cargo build -p kmount-agent` first (or set \
         KMOUNT_AGENT)",
        p.display()
    );
    p
}

/// Wraps the connector a mount uses (e.g. in a fault injector).
pub type WrapConnector = Arc<dyn Fn(LocalConnector) -> Arc<dyn Connector> + Send + Sync>;

/// How to mount.
#[derive(Default, Clone)]
pub struct Setup {
    pub opts: MountOptions,
    /// Replace a broken stream through the connector (a new agent process).
    pub reconnect: bool,
    /// The connector to use instead of the plain local one (implies `reconnect`).
    pub wrap: Option<WrapConnector>,
}

impl Setup {
    /// Local-first: the content cache and the journal in `state`.
    pub fn write_back(state: &Path) -> Self {
        Self {
            opts: MountOptions {
                cache_dir: Some(state.join("cache")),
                journal_dir: Some(state.join("journal")),
                ..MountOptions::default()
            },
            reconnect: false,
            wrap: None,
        }
    }
}

/// Field order matters: the mount goes before the runtime that serves it and before the
/// directories are removed.
pub struct Mounted {
    pub handle: Option<MountHandle>,
    /// The mount's client (a clone): requests beside the mount's own.
    pub client: Client,
    pub rt: tokio::runtime::Runtime,
    pub remote: TempDir,
    pub mnt: TempDir,
}

impl Mounted {
    /// `None` (with a loud note) when this machine cannot mount FUSE at all. `fill` populates
    /// the served directory before the mount starts.
    pub fn new(setup: Setup, fill: impl FnOnce(&Path)) -> Option<Self> {
        init_logging();
        if !Path::new("/dev/fuse").exists() {
            panic!(
                "cannot run: /dev/fuse is missing, no FUSE mount test can run here (the tests need it: fix the machine, do not skip)"
            );
        }
        let remote = tempfile::tempdir().unwrap();
        let mnt = tempfile::tempdir().unwrap();
        fill(remote.path());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (handle, client) = mount_at(&rt, remote.path(), mnt.path(), &setup);
        Some(Self {
            handle: Some(handle),
            client,
            rt,
            remote,
            mnt,
        })
    }

    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.path().join(rel)
    }

    pub fn r(&self, rel: &str) -> PathBuf {
        self.remote.path().join(rel)
    }

    pub fn handle(&self) -> &MountHandle {
        self.handle.as_ref().unwrap()
    }

    /// Unmounts (unless done already) and mounts the same directory again at the same place.
    pub fn remount(&mut self, setup: &Setup) {
        if let Some(h) = self.handle.take() {
            h.unmount().unwrap();
        }
        let (handle, client) = mount_at(&self.rt, self.remote.path(), self.mnt.path(), setup);
        self.handle = Some(handle);
        self.client = client;
    }

    pub fn unmount(mut self) {
        let handle = self.handle.take().unwrap();
        handle.unmount().unwrap();
        assert!(
            !is_mounted(self.mnt.path()),
            "{} is still mounted",
            self.mnt.path().display()
        );
    }

    /// The agent process currently serving this mount.
    pub fn agent_pid(&self) -> i32 {
        agent_pid(self.remote.path())
    }
}

fn mount_at(
    rt: &tokio::runtime::Runtime,
    remote: &Path,
    mnt: &Path,
    setup: &Setup,
) -> (MountHandle, Client) {
    let args = vec!["--mountpoint".into(), mnt.as_os_str().to_owned()];
    let connector = LocalConnector::new(agent_binary(), remote.to_path_buf(), args);
    let client = if let Some(wrap) = &setup.wrap {
        rt.block_on(Client::connect_shared(wrap(connector)))
    } else if setup.reconnect {
        rt.block_on(Client::connect_shared(Arc::new(connector)))
    } else {
        rt.block_on(Client::connect(&connector))
    }
    .unwrap();
    let handle = mount(rt.handle().clone(), client.clone(), mnt, &setup.opts).unwrap();
    (handle, client)
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let path = path.canonicalize().unwrap();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap()))
}

/// Waits until `ok` holds, at most `timeout`; returns how long it took.
pub fn eventually(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if ok() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: not seen through the mount within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The agent process serving `remote`, a child of this test process.
pub fn agent_pid(remote: &Path) -> i32 {
    find_agent_pid(remote).unwrap_or_else(|| panic!("no agent process serves {}", remote.display()))
}

/// [`agent_pid`], or `None` (between a kill and the reconnection).
pub fn find_agent_pid(remote: &Path) -> Option<i32> {
    let me = std::process::id().to_string();
    for entry in fs::read_dir("/proc").unwrap() {
        let entry = entry.unwrap();
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat.rsplit(')').next().unwrap().split_whitespace().nth(1);
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let remote = remote.as_os_str().as_encoded_bytes();
        if ppid == Some(me.as_str())
            && !stat.contains(") Z ")
            && cmdline.windows(remote.len()).any(|w| w == remote)
        {
            return Some(pid);
        }
    }
    None
}

/// Every path below `root` with its type, size, mode and contents (regular files) or target
/// (symlinks), for comparing two trees.
pub fn snapshot(root: &Path) -> Vec<(String, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let what = if meta.is_dir() {
                stack.push(path.clone());
                format!("dir {mode:o}")
            } else if meta.file_type().is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else {
                let data = fs::read(&path).unwrap();
                format!("file {mode:o} {} {:x}", data.len(), xxhash(&data))
            };
            out.push((rel, what));
        }
    }
    out.sort();
    out
}

fn xxhash(data: &[u8]) -> u64 {
    // FNV-1a: enough to tell contents apart in a test.
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
