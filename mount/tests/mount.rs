//! Mounts a temporary directory through the real `kmount-agent` and checks what programs see
//! through the mount against the directory itself.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kmount_mount::{Client, ClientError, LocalConnector, MountHandle, MountOptions, mount};
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use tempfile::TempDir;

/// `KMOUNT_LOG=debug` (EnvFilter syntax) shows the mount's log on stderr.
fn init_logging() {
    if let Ok(filter) = std::env::var("KMOUNT_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

fn agent_binary() -> PathBuf {
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

/// A mount of `remote` at `mnt`. Field order matters: the mount goes before the runtime that
/// serves it and before the directories are removed.
struct Mounted {
    handle: Option<MountHandle>,
    rt: tokio::runtime::Runtime,
    remote: TempDir,
    mnt: TempDir,
    /// The content cache and journal (write-back mode); removed last.
    _state: TempDir,
}

impl Mounted {
    /// `None` (with a loud note) when this machine cannot mount FUSE at all.
    fn new(opts: MountOptions) -> Option<Self> {
        Self::with_agent_args(opts, Vec::new())
    }

    fn with_agent_args(mut opts: MountOptions, mut agent_args: Vec<OsString>) -> Option<Self> {
        init_logging();
        // KMOUNT_TEST_MODE: `tree` (the default, as the CLI runs: names and attributes local,
        // changes sent at once), `writeback` (local-first, `kmount --write-back`; its own
        // tests are mount/tests/writeback.rs), `passthrough` (every request to the agent, as
        // with an agent that cannot walk or watch).
        let mode = std::env::var("KMOUNT_TEST_MODE").unwrap_or_else(|_| "tree".into());
        let state = tempfile::tempdir().unwrap();
        match mode.as_str() {
            "passthrough" => opts.whole_tree = false,
            "tree" => {}
            "writeback" => {
                opts.cache_dir = Some(state.path().join("cache"));
                opts.journal_dir = Some(state.path().join("journal"));
            }
            other => panic!("KMOUNT_TEST_MODE={other}: expected writeback, tree or passthrough"),
        }
        if !Path::new("/dev/fuse").exists() {
            panic!(
                "cannot run: /dev/fuse is missing, no FUSE mount test can run here (the tests need it: fix the machine, do not skip)"
            );
        }
        let remote = tempfile::tempdir().unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        agent_args.push("--mountpoint".into());
        agent_args.push(mnt.path().as_os_str().to_owned());
        let connector =
            LocalConnector::new(agent_binary(), remote.path().to_path_buf(), agent_args);
        let client = rt.block_on(Client::connect(&connector)).unwrap();
        let handle = mount(rt.handle().clone(), client, mnt.path(), &opts).unwrap();
        Some(Self {
            handle: Some(handle),
            rt,
            remote,
            mnt,
            _state: state,
        })
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.mnt.path().join(rel)
    }

    /// A path in the served directory. Changes made through the mount reach it in the
    /// background (write-back): they are waited for first, as `kmount wait` does.
    fn r(&self, rel: &str) -> PathBuf {
        if let Some(h) = &self.handle {
            h.wait_applied(Duration::from_secs(20))
                .expect("changes made through the mount did not reach the served directory");
        }
        self.remote.path().join(rel)
    }

    fn unmount(mut self) {
        let handle = self.handle.take().unwrap();
        handle.unmount().unwrap();
        assert!(
            !is_mounted(self.mnt.path()),
            "{} is still mounted",
            self.mnt.path().display()
        );
    }
}

/// Waits until `ok` holds, at most `timeout`. Changes made directly in the served directory
/// reach a mount with a whole tree through the agent's watcher, a few milliseconds later.
fn eventually(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = std::time::Instant::now();
    loop {
        if ok() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: not seen through the mount within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let path = path.canonicalize().unwrap();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap()))
}

fn assert_same_attrs(through: &fs::Metadata, direct: &fs::Metadata, what: &str) {
    assert_eq!(through.ino(), direct.ino(), "{what}: st_ino");
    assert_eq!(through.mode(), direct.mode(), "{what}: st_mode");
    assert_eq!(through.nlink(), direct.nlink(), "{what}: st_nlink");
    assert_eq!(through.uid(), direct.uid(), "{what}: st_uid");
    assert_eq!(through.gid(), direct.gid(), "{what}: st_gid");
    assert_eq!(through.size(), direct.size(), "{what}: st_size");
    assert_eq!(through.mtime(), direct.mtime(), "{what}: mtime s");
    assert_eq!(
        through.mtime_nsec(),
        direct.mtime_nsec(),
        "{what}: mtime ns"
    );
    assert_eq!(through.ctime(), direct.ctime(), "{what}: ctime s");
    assert_eq!(
        through.ctime_nsec(),
        direct.ctime_nsec(),
        "{what}: ctime ns"
    );
}

#[test]
fn create_write_read_rename_stat() {
    let Some(m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    assert!(is_mounted(m.mnt.path()));

    // create + write through the mount, read back both ways
    fs::write(m.m("a.txt"), b"hello, kmount").unwrap();
    assert_eq!(fs::read(m.r("a.txt")).unwrap(), b"hello, kmount");
    assert_eq!(fs::read(m.m("a.txt")).unwrap(), b"hello, kmount");

    // exact times set through the mount reach the directory, and come back exactly
    let atime = TimeSpec::new(1_600_000_000, 111_111_111);
    let mtime = TimeSpec::new(1_700_000_000, 123_456_789);
    utimensat(
        nix::fcntl::AT_FDCWD,
        &m.m("a.txt"),
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    let direct = fs::metadata(m.r("a.txt")).unwrap();
    assert_eq!(
        (direct.mtime(), direct.mtime_nsec()),
        (1_700_000_000, 123_456_789)
    );
    assert_eq!(
        (direct.atime(), direct.atime_nsec()),
        (1_600_000_000, 111_111_111)
    );
    let through = fs::metadata(m.m("a.txt")).unwrap();
    assert_same_attrs(&through, &direct, "a.txt");

    // rename into a new directory keeps the inode
    fs::create_dir(m.m("dir")).unwrap();
    fs::rename(m.m("a.txt"), m.m("dir/b.txt")).unwrap();
    assert!(!m.r("a.txt").exists());
    assert_eq!(fs::read(m.r("dir/b.txt")).unwrap(), b"hello, kmount");
    let through = fs::metadata(m.m("dir/b.txt")).unwrap();
    assert_eq!(through.ino(), direct.ino());
    assert_same_attrs(
        &through,
        &fs::metadata(m.r("dir/b.txt")).unwrap(),
        "dir/b.txt",
    );
    assert_same_attrs(
        &fs::metadata(m.m("dir")).unwrap(),
        &fs::metadata(m.r("dir")).unwrap(),
        "dir",
    );

    // a file made beside the mount shows up with its own inode number and times
    // (the create and the write are two changes: a reader in between sees an empty file, as
    // another process on a local disk would, so the wait is for the content)
    fs::write(m.r("dir/remote.txt"), b"from the other side").unwrap();
    eventually("dir/remote.txt", Duration::from_secs(2), || {
        fs::read(m.m("dir/remote.txt")).is_ok_and(|d| d == b"from the other side")
    });
    assert_same_attrs(
        &fs::metadata(m.m("dir/remote.txt")).unwrap(),
        &fs::metadata(m.r("dir/remote.txt")).unwrap(),
        "dir/remote.txt",
    );

    // listings agree
    let mut names: Vec<_> = fs::read_dir(m.m("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec!["b.txt", "remote.txt"]);
    for e in fs::read_dir(m.m("dir")).unwrap() {
        let e = e.unwrap();
        let direct = fs::metadata(m.r("dir").join(e.file_name())).unwrap();
        assert_eq!(
            e.ino(),
            direct.ino(),
            "readdir d_ino of {:?}",
            e.file_name()
        );
    }

    m.unmount();
}

#[test]
fn overwrite_truncates_append_appends() {
    let Some(m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    fs::write(m.m("f"), b"a long first version").unwrap();
    fs::write(m.m("f"), b"short").unwrap();
    assert_eq!(fs::read(m.r("f")).unwrap(), b"short");
    let mut f = fs::OpenOptions::new().append(true).open(m.m("f")).unwrap();
    f.write_all(b"+more").unwrap();
    drop(f);
    assert_eq!(fs::read(m.r("f")).unwrap(), b"short+more");
    assert_eq!(fs::read(m.m("f")).unwrap(), b"short+more");

    // O_EXCL is honoured
    let err = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.m("f"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));

    // truncate by path and by handle
    let f = fs::OpenOptions::new().write(true).open(m.m("f")).unwrap();
    f.set_len(3).unwrap();
    assert_eq!(fs::read(m.r("f")).unwrap(), b"sho");
    drop(f);
    m.unmount();
}

#[test]
fn hard_links_and_unlinked_open_files() {
    let Some(m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    fs::write(m.m("one"), b"shared").unwrap();
    fs::hard_link(m.m("one"), m.m("two")).unwrap();
    let one = fs::metadata(m.m("one")).unwrap();
    let two = fs::metadata(m.m("two")).unwrap();
    assert_eq!(one.ino(), two.ino());
    assert_eq!(one.ino(), fs::metadata(m.r("one")).unwrap().ino());
    assert_eq!(two.nlink(), 2);

    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.m("one"))
        .unwrap();
    fs::remove_file(m.m("one")).unwrap();
    fs::remove_file(m.m("two")).unwrap();
    assert!(!m.r("one").exists() && !m.r("two").exists());
    // Still usable through the open descriptor, with exact attributes.
    f.write_all(b"!").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "!hared");
    let meta = f.metadata().unwrap();
    assert_eq!(meta.nlink(), 0);
    assert_eq!(meta.size(), 6);
    drop(f);
    m.unmount();
}

#[test]
fn directories_symlinks_xattrs_statfs() {
    let Some(m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    fs::create_dir_all(m.m("a/b/c")).unwrap();
    assert!(m.r("a/b/c").is_dir());
    let err = fs::remove_dir(m.m("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::rename(m.m("a/b"), m.m("b2")).unwrap();
    assert!(m.r("b2/c").is_dir());
    assert!(m.m("b2/c").is_dir());
    fs::remove_dir(m.m("b2/c")).unwrap();
    assert!(!m.r("b2/c").exists());

    std::os::unix::fs::symlink("../target", m.m("a/link")).unwrap();
    assert_eq!(
        fs::read_link(m.r("a/link")).unwrap(),
        Path::new("../target")
    );
    assert_eq!(
        fs::read_link(m.m("a/link")).unwrap(),
        Path::new("../target")
    );
    assert!(fs::symlink_metadata(m.m("a/link")).unwrap().is_symlink());

    fs::set_permissions(m.m("a"), fs::Permissions::from_mode(0o750)).unwrap();
    assert_eq!(fs::metadata(m.r("a")).unwrap().mode() & 0o7777, 0o750);

    // xattrs: set through the mount, visible in the directory; size protocol
    fs::write(m.m("x"), b"").unwrap();
    let path = std::ffi::CString::new(m.m("x").as_os_str().as_encoded_bytes()).unwrap();
    let name = c"user.kmount";
    let value = b"value!";
    // SAFETY: valid NUL-terminated strings and a buffer of the stated length.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
    // SAFETY: size query with a null buffer of length 0.
    let size = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(size, value.len() as isize);
    let mut small = [0u8; 2];
    // SAFETY: buffer of the stated length.
    let rc = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            small.as_mut_ptr().cast(),
            small.len(),
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ERANGE)
    );
    let direct = std::ffi::CString::new(m.r("x").as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: buffer of the stated length.
    let n = unsafe {
        libc::getxattr(
            direct.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], value);

    let through = nix::sys::statvfs::statvfs(m.mnt.path()).unwrap();
    let direct = nix::sys::statvfs::statvfs(m.remote.path()).unwrap();
    assert_eq!(through.blocks(), direct.blocks());
    assert_eq!(through.files(), direct.files());
    m.unmount();
}

#[test]
fn many_files_in_one_directory() {
    let Some(m) = Mounted::new(MountOptions {
        attr_ttl: Duration::from_millis(1),
        ..MountOptions::default()
    }) else {
        return;
    };
    fs::create_dir(m.r("big")).unwrap();
    for i in 0..3000 {
        fs::write(m.r(&format!("big/f{i:04}")), i.to_string()).unwrap();
    }
    eventually("3000 new files", Duration::from_secs(10), || {
        fs::read_dir(m.m("big")).map_or(0, |d| d.count()) == 3000
            && fs::read_to_string(m.m("big/f2999")).is_ok_and(|s| s == "2999")
    });
    let mut names: Vec<String> = fs::read_dir(m.m("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3000);
    assert_eq!(names[0], "f0000");
    assert_eq!(names[2999], "f2999");
    // stat every entry (readdirplus filled the cache; these must agree with the directory)
    for name in names.iter().step_by(97) {
        let through = fs::metadata(m.m(&format!("big/{name}"))).unwrap();
        let direct = fs::metadata(m.r(&format!("big/{name}"))).unwrap();
        assert_same_attrs(&through, &direct, name);
    }
    // parallel readers
    let mnt = m.mnt.path().to_path_buf();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                for i in (t..3000).step_by(8) {
                    let got = fs::read_to_string(mnt.join(format!("big/f{i:04}"))).unwrap();
                    assert_eq!(got, i.to_string());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    m.unmount();
}

#[test]
fn the_agent_refusing_is_reported_verbatim() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let missing = Path::new("/nonexistent/kmount-test-dir");
    let connector = LocalConnector::new(agent_binary(), missing.to_path_buf(), Vec::new());
    let err = rt.block_on(Client::connect(&connector)).unwrap_err();
    assert!(matches!(err, ClientError::Agent(_)), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/kmount-test-dir"),
        "{err}"
    );
}

#[test]
fn dropping_the_handle_unmounts() {
    let Some(mut m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    assert!(is_mounted(m.mnt.path()));
    drop(m.handle.take());
    assert!(!is_mounted(m.mnt.path()));
    let _ = &m.rt;
}

#[test]
fn the_kernel_forgets_every_node_it_was_given() {
    let Some(m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    fs::create_dir(m.r("d")).unwrap();
    for i in 0..200 {
        fs::write(m.r(&format!("d/f{i}")), b"x").unwrap();
    }
    fs::hard_link(m.r("d/f0"), m.r("d/hard")).unwrap();
    eventually("201 new names", Duration::from_secs(5), || {
        fs::read_dir(m.m("d")).map_or(0, |d| d.count()) == 201
    });
    // readdirplus, lookups, creates, links and renames all hand nodes to the kernel
    let listed = fs::read_dir(m.m("d")).unwrap().count();
    assert_eq!(listed, 201);
    for i in (0..200).step_by(3) {
        fs::metadata(m.m(&format!("d/f{i}"))).unwrap();
    }
    fs::write(m.m("d/new"), b"y").unwrap();
    fs::hard_link(m.m("d/new"), m.m("d/new2")).unwrap();
    fs::rename(m.m("d/f1"), m.m("d/f2")).unwrap();
    fs::create_dir(m.m("d/sub")).unwrap();
    let handle = m.handle.as_ref().unwrap();
    assert!(handle.known_nodes() > 200, "{}", handle.known_nodes());

    // Dropping the caches makes the kernel forget every node it holds; the table must then
    // be back to the root alone (a count too low would have dropped nodes early, too high
    // would leak them).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
        if handle.known_nodes() == 1 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(handle.known_nodes(), 1);
    // Everything is still reachable afterwards.
    assert_eq!(fs::read(m.m("d/new2")).unwrap(), b"y");
    assert_eq!(fs::read_dir(m.m("d")).unwrap().count(), 203);
    m.unmount();
}

/// The agent process serving `remote`, a child of this test process.
fn agent_pid(remote: &Path) -> i32 {
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
        if ppid == Some(me.as_str()) && cmdline.windows(remote.len()).any(|w| w == remote) {
            return pid;
        }
    }
    panic!("no agent process serves {}", remote.display());
}

#[test]
fn a_dead_agent_gives_eio_not_a_hang() {
    let Some(m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    fs::write(m.m("f"), b"x").unwrap();
    let whole_tree = m.handle.as_ref().unwrap().whole_tree();
    let pid = agent_pid(m.remote.path());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Something that needs the agent: looking a name up (pass-through), or making a file.
    let (tx, rx) = std::sync::mpsc::channel();
    let (lookup, create) = (m.m("not-cached"), m.m("new-file"));
    std::thread::spawn(move || {
        let _ = tx.send((
            fs::metadata(lookup).map(|_| ()),
            fs::write(create, b"y").map(|_| ()),
        ));
    });
    let (looked_up, created) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the mount hangs after the agent died");
    if whole_tree {
        // Names are answered from the local tree, the agent or not.
        assert_eq!(looked_up.unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert_eq!(fs::metadata(m.m("f")).unwrap().len(), 1);
    } else {
        assert_eq!(looked_up.unwrap_err().raw_os_error(), Some(libc::EIO));
    }
    if m.handle.as_ref().unwrap().status().write_back {
        // Kept in the local journal until an agent takes it.
        created.unwrap();
        assert_eq!(fs::read(m.m("new-file")).unwrap(), b"y");
        let pending = m.handle.as_ref().unwrap().pending().unwrap();
        assert!(pending.records >= 2, "{pending:?}");
        assert!(pending.paths.iter().any(|p| p.as_bytes() == b"new-file"));
    } else {
        assert_eq!(created.unwrap_err().raw_os_error(), Some(libc::EIO));
    }
    m.unmount();
}

#[test]
fn join_returns_after_an_external_unmount() {
    let Some(mut m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    let handle = m.handle.take().unwrap();
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(m.mnt.path())
        .status()
        .unwrap();
    assert!(status.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(handle.join());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("join hangs after the mount went away")
        .unwrap();
    assert!(!is_mounted(m.mnt.path()));
    let _ = &m.rt;
}

#[test]
fn identity_creates_files_as_the_caller() {
    if !nix::unistd::geteuid().is_root() {
        panic!("cannot run: identity needs root (the tests need it: fix the machine, do not skip)");
    }
    let Some(m) = Mounted::with_agent_args(
        MountOptions {
            allow_other: true,
            default_permissions: true,
            identity: true,
            ..MountOptions::default()
        },
        vec!["--identity".into()],
    ) else {
        return;
    };
    fs::set_permissions(m.remote.path(), fs::Permissions::from_mode(0o777)).unwrap();
    eventually("the root's new mode", Duration::from_secs(2), || {
        fs::metadata(m.mnt.path()).unwrap().mode() & 0o777 == 0o777
    });
    fs::create_dir(m.r("private")).unwrap();
    fs::set_permissions(m.r("private"), fs::Permissions::from_mode(0o700)).unwrap();
    let run_as = |script: &str| {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .current_dir(m.mnt.path())
            .uid(4321)
            .gid(4321)
            .output()
            .unwrap()
    };
    let out = run_as("echo hi > mine && mkdir dir && ln -s mine link");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["mine", "dir", "link"] {
        let meta = fs::symlink_metadata(m.r(name)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4321, 4321), "owner of {name}");
    }
    let out = run_as("echo no > private/f");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_as("chown 0 mine");
    assert!(!out.status.success(), "an unprivileged chown must fail");
    m.unmount();
}

#[test]
fn git_status_through_the_mount_trusts_the_index() {
    if std::process::Command::new("git")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!(
            "cannot run: git is not installed (the tests need it: fix the machine, do not skip)"
        );
    }
    let Some(m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    let git = |dir: &Path, args: &[&str]| {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@e",
                "-c",
                "safe.directory=*",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for i in 0..50 {
        let dir = m.r(&format!("src/m{}", i % 5));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("f{i}.rs")), format!("fn f{i}() {{}}\n")).unwrap();
    }
    git(m.remote.path(), &["init", "-q"]);
    git(m.remote.path(), &["add", "-A"]);
    git(m.remote.path(), &["commit", "-q", "-m", "init"]);
    // Let the index stop being "racily clean" so git trusts its stat data.
    std::thread::sleep(Duration::from_millis(1100));
    git(m.remote.path(), &["update-index", "--refresh"]);
    let index = fs::read(m.r(".git/index")).unwrap();

    assert_eq!(git(m.mnt.path(), &["status", "--porcelain"]), "");
    assert!(
        fs::read(m.r(".git/index")).unwrap() == index,
        "git rewrote its index: the mount reports other stat data than the directory"
    );

    fs::write(m.m("src/m1/f1.rs"), b"changed\n").unwrap();
    assert_eq!(
        git(m.mnt.path(), &["status", "--porcelain"]),
        " M src/m1/f1.rs\n"
    );
    m.unmount();
}

#[test]
fn big_io_sparse_files_fifos_and_rename_flags() {
    let Some(m) = Mounted::new(MountOptions::default()) else {
        return;
    };
    // 5 MiB of patterned data, written and read in odd-sized pieces
    let data: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut f = fs::File::create(m.m("big")).unwrap();
    for chunk in data.chunks(300_001) {
        f.write_all(chunk).unwrap();
    }
    drop(f);
    assert!(fs::read(m.r("big")).unwrap() == data, "content differs");
    assert!(fs::read(m.m("big")).unwrap() == data, "content differs");

    // holes: SEEK_DATA / SEEK_HOLE are answered by the remote file
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.m("sparse"))
        .unwrap();
    nix::sys::uio::pwrite(&f, b"end", 10 << 20).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: plain lseek on an open descriptor.
    let data_at = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert_eq!(data_at, 10 << 20, "SEEK_DATA skips the hole");
    // SAFETY: as above.
    let hole_at = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!(hole_at, 0);
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        1 << 20,
    )
    .unwrap();
    assert!(fs::metadata(m.r("sparse")).unwrap().blocks() >= 2048);
    drop(f);

    // a FIFO made through the mount is a FIFO remotely
    nix::unistd::mkfifo(
        &m.m("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::metadata(m.r("pipe")).unwrap().file_type().is_fifo());

    // renameat2 flags
    fs::write(m.m("a"), b"A").unwrap();
    fs::write(m.m("b"), b"B").unwrap();
    let rename2 = |from: &str, to: &str, flags: nix::fcntl::RenameFlags| {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &m.m(from),
            nix::fcntl::AT_FDCWD,
            &m.m(to),
            flags,
        )
    };
    assert_eq!(
        rename2("a", "b", nix::fcntl::RenameFlags::RENAME_NOREPLACE),
        Err(nix::errno::Errno::EEXIST)
    );
    let (ino_a, ino_b) = (
        fs::metadata(m.m("a")).unwrap().ino(),
        fs::metadata(m.m("b")).unwrap().ino(),
    );
    rename2("a", "b", nix::fcntl::RenameFlags::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.r("a")).unwrap(), b"B");
    assert_eq!(fs::read(m.m("a")).unwrap(), b"B");
    assert_eq!(fs::metadata(m.m("a")).unwrap().ino(), ino_b);
    assert_eq!(fs::metadata(m.m("b")).unwrap().ino(), ino_a);
    m.unmount();
}
