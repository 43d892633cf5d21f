//! kmount's local state is the user's alone: every directory it creates for a mount (records
//! and control sockets, logs, the write-back journal and content cache, the store of
//! local-only files) is mode 0700, so other local users can neither read what was written
//! through the mount nor reach the control socket.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kmount_tests::*;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every directory at or below `dir`.
fn dirs_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(dirs_below(&e.path()));
            }
        }
    }
    out
}

fn local_only_stores(base: &Path) -> Vec<PathBuf> {
    dirs_below(base)
        .into_iter()
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("local-only-"))
        })
        .collect()
}

#[test]
fn every_state_directory_is_private_after_a_mount() {
    for write_back in [false, true] {
        let tmpdir = temp_dir();
        let label = if write_back {
            "write-back"
        } else {
            "write-through"
        };
        let mut m = Mounted::with_args(
            |b| fs::write(b.join("f"), b"remote").unwrap(),
            &[],
            &[
                ("KMOUNT_WRITE_BACK", if write_back { "1" } else { "0" }),
                ("TMPDIR", tmpdir.path().to_str().unwrap()),
            ],
        );
        // Use it: a change, a local-only file (an editor's swap file), a read.
        fs::write(m.m("g"), b"local change").unwrap();
        fs::write(m.m(".g.swp"), b"swap").unwrap();
        assert_eq!(fs::read(m.m("f")).unwrap(), b"remote");

        let run = m.state.join("run");
        let logs = m.state.join("logs");
        let mut expected = vec![run.clone(), logs.clone()];
        let sockets: Vec<PathBuf> = fs::read_dir(&run)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
            .map(|e| e.path())
            .collect();
        assert_eq!(sockets.len(), 1, "{label}: control sockets {sockets:?}");
        let stores = if write_back {
            let mounts = m.state.join("mounts");
            let session = fs::read_dir(&mounts)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path();
            expected.extend([
                mounts,
                session.clone(),
                session.join("cache"),
                session.join("journal"),
            ]);
            local_only_stores(&session.join("cache"))
        } else {
            local_only_stores(tmpdir.path())
        };
        assert_eq!(stores.len(), 1, "{label}: local-only stores {stores:?}");
        expected.extend(stores);
        for dir in &expected {
            assert_eq!(
                mode(dir),
                0o700,
                "{label}: {} is not private (mode {:o})",
                dir.display(),
                mode(dir)
            );
        }
        // Nothing below them is open to others either (a directory made later, inside one
        // of these, could still be entered by nobody else, but should not say otherwise).
        let open: Vec<String> = dirs_below(&m.state)
            .into_iter()
            .filter(|d| mode(d) & 0o077 != 0)
            .map(|d| format!("{} {:o}", d.display(), mode(&d)))
            .collect();
        assert!(
            open.is_empty(),
            "{label}: directories open to others: {open:?}"
        );
        m.unmount();
    }
}
