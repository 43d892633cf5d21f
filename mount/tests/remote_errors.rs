//! Errors the remote reports after `close()` returned (write-back): ENOSPC, EROFS and EACCES
//! reach `fsync()` callers as that errno, the data stays in the journal (status shows the
//! change the remote refuses), and it goes through once the cause is fixed.
//!
//! The served directory is a small tmpfs this test mounts (root only): full, then grown; read
//! only, then writable again; or the agent runs as a user who may not write there. (EDQUOT
//! would need a quota-enabled filesystem, which this kernel's tmpfs is not; it takes the same
//! path: the agent's errno, unchanged.)

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Mounted, Setup};

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
        .collect()
}

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, opts: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount {opts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a write-back view of a fresh 1 MiB tmpfs.
fn mounted(state: &Path) -> (Mounted, Tmpfs) {
    let mut tmpfs = None;
    let m = Mounted::new(Setup::write_back(state), |r| {
        tmpfs = Some(Tmpfs::mount(r, "1m"));
    })
    .expect("this machine cannot mount FUSE: the remote-error tests cannot run");
    assert!(m.handle().status().write_back, "not a write-back mount");
    (m, tmpfs.unwrap())
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn enospc_reaches_fsync_and_the_data_goes_through_once_space_is_freed() {
    let state = tempfile::tempdir().unwrap();
    let (m, tmpfs) = mounted(state.path());
    let big = pattern(3 << 20, 1);
    // close() returns once the data is in the local journal: the remote's lack of space
    // cannot be known yet.
    fs::write(m.m("big"), &big).unwrap();
    fs::write(m.m("after"), b"written after the big one").unwrap();
    // fsync() waits for the remote, and gets its errno.
    let f = fs::OpenOptions::new().write(true).open(m.m("big")).unwrap();
    let started = Instant::now();
    let err = f.sync_all().expect_err("fsync succeeded on a full remote");
    assert_eq!(
        errno_of(&err),
        libc::ENOSPC,
        "fsync: {err} after {:?}",
        started.elapsed()
    );
    // Shown in status, kept in the journal.
    let st = m.handle().status();
    let blocked = st.blocked.as_ref().expect("status shows no refused change");
    assert_eq!(blocked.errno, libc::ENOSPC, "{blocked:?}");
    assert!(st.pending.records > 0, "{st:?}");
    // The mount still shows what was written.
    assert!(fs::read(m.m("big")).unwrap() == big);
    // Space is made: it goes through, in order, whole.
    tmpfs.remount("size=16m");
    m.handle()
        .wait_applied(Duration::from_secs(60))
        .expect("the changes did not go through once the remote had space");
    assert!(fs::read(m.r("big")).unwrap() == big, "big arrived damaged");
    assert_eq!(
        fs::read(m.r("after")).unwrap(),
        b"written after the big one"
    );
    f.sync_all().expect("fsync once everything is applied");
    assert!(m.handle().status().blocked.is_none());
    drop(f);
    m.unmount();
}

#[test]
fn erofs_reaches_fsync_and_the_data_goes_through_once_writable() {
    let state = tempfile::tempdir().unwrap();
    let (m, tmpfs) = mounted(state.path());
    fs::write(m.m("first"), b"before").unwrap();
    m.handle().wait_applied(Duration::from_secs(20)).unwrap();
    tmpfs.remount("ro");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.m("first"))
        .unwrap();
    f.write_all(b"changed while the remote was read-only")
        .unwrap();
    let err = f
        .sync_all()
        .expect_err("fsync succeeded on a read-only remote");
    assert_eq!(errno_of(&err), libc::EROFS, "fsync: {err}");
    drop(f);
    // close() then fsync() through another descriptor: the same answer.
    let g = fs::File::open(m.m("first")).unwrap();
    let err = g
        .sync_all()
        .expect_err("fsync of a later descriptor succeeded");
    assert_eq!(errno_of(&err), libc::EROFS, "fsync: {err}");
    assert_eq!(fs::read(m.r("first")).unwrap(), b"before");
    tmpfs.remount("rw");
    g.sync_all()
        .expect("fsync once the remote is writable again");
    assert_eq!(
        fs::read(m.r("first")).unwrap(),
        b"changed while the remote was read-only"
    );
    drop(g);
    m.unmount();
}

/// The agent runs as a user the target refuses (as a container's non-root user would): the
/// EACCES of a create in a directory it may not write reaches `fsync`, and the file goes
/// through once the directory is opened to it.
#[test]
fn eacces_reaches_fsync_and_the_data_goes_through_once_allowed() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    let wrapper_dir = tempfile::tempdir().unwrap();
    let wrapper = wrapper_dir.path().join("agent-as-nobody");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups {} \"$@\"\n",
            common::agent_binary().display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    // A process another test forks while the wrapper is open for writing inherits that
    // descriptor until it execs: executing the wrapper meanwhile fails with ETXTBSY. Once it
    // runs, nobody holds it open for writing any more.
    for attempt in 0.. {
        match std::process::Command::new(&wrapper)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 100 => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot run {}: {e}", wrapper.display()),
            Ok(_) => break,
        }
    }
    let mut setup = Setup::write_back(state.path());
    let w = wrapper.clone();
    setup.wrap = Some(std::sync::Arc::new(
        move |c: kmount_mount::LocalConnector| {
            std::sync::Arc::new(c.with_agent(w.clone()))
                as std::sync::Arc<dyn kmount_mount::client::Connector>
        },
    ));
    let m = Mounted::new(setup, |r| {
        fs::set_permissions(r, fs::Permissions::from_mode(0o777)).unwrap();
        fs::create_dir(r.join("locked")).unwrap();
        fs::set_permissions(r.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
    })
    .expect("this machine cannot mount FUSE: the remote-error tests cannot run");
    assert!(m.handle().status().write_back, "not a write-back mount");
    // The mount (root here) takes it; the target's user may not.
    fs::write(
        m.m("locked/new"),
        b"made where the target's user may not write",
    )
    .unwrap();
    let f = fs::File::open(m.m("locked/new")).unwrap();
    let err = f
        .sync_all()
        .expect_err("fsync succeeded though the target refuses");
    assert_eq!(errno_of(&err), libc::EACCES, "fsync: {err}");
    let st = m.handle().status();
    assert_eq!(
        st.blocked.as_ref().map(|b| b.errno),
        Some(libc::EACCES),
        "{st:?}"
    );
    // Opened to it: the same descriptor's fsync now succeeds, and the file is there.
    fs::set_permissions(m.r("locked"), fs::Permissions::from_mode(0o777)).unwrap();
    f.sync_all().expect("fsync once the target allows it");
    assert_eq!(
        fs::read(m.r("locked/new")).unwrap(),
        b"made where the target's user may not write"
    );
    drop(f);
    m.unmount();
}
