//! A save over a file the target changed since kmount last saw it keeps both versions: the
//! save keeps the name, the target's version stays in the mount only as
//! `NAME.kmount-conflict-…`. The agent's watcher is off here, so the target's change stays
//! unseen until the save.

mod common;

use std::fs;
use std::time::Duration;

use common::{Mounted, Setup};

fn blind(fill: impl FnOnce(&std::path::Path)) -> Option<Mounted> {
    // Every test of this file wants the agent blind; the agent inherits the variable.
    unsafe { std::env::set_var("KMOUNT_AGENT_NO_WATCH", "1") };
    Mounted::new(Setup::default(), fill)
}

fn conflict_copies(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let prefix = format!("{name}.kmount-conflict-");
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    v.sort();
    v
}

/// Changes the file in the target so that its size and mtime differ from what the mount saw.
fn change_there(m: &Mounted, name: &str, text: &str) {
    std::thread::sleep(Duration::from_millis(20));
    fs::write(m.r(name), text).unwrap();
}

#[test]
fn a_save_over_an_unseen_version_keeps_both() {
    let Some(m) = blind(|r| fs::write(r.join("app.js"), "v1\n").unwrap()) else {
        return;
    };
    assert_eq!(fs::read_to_string(m.m("app.js")).unwrap(), "v1\n");
    change_there(&m, "app.js", "changed in the container\n");
    fs::write(m.m("app.js"), "saved here\n").unwrap();
    assert_eq!(fs::read_to_string(m.r("app.js")).unwrap(), "saved here\n");
    let copies = conflict_copies(m.mnt.path(), "app.js");
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(
        fs::read_to_string(&copies[0]).unwrap(),
        "changed in the container\n"
    );
    assert!(
        conflict_copies(m.remote.path(), "app.js").is_empty(),
        "the conflict copy reached the target"
    );
    let status = m.handle().status();
    assert_eq!(status.conflicts.len(), 1);
    assert_eq!(status.conflicts[0].path.to_string(), "app.js");
    // Reconciliation leaves the copy alone.
    m.handle().reconcile_now(Duration::from_secs(30)).unwrap();
    assert_eq!(conflict_copies(m.mnt.path(), "app.js").len(), 1);
}

#[test]
fn a_save_over_the_version_seen_is_no_conflict() {
    let Some(m) = blind(|r| fs::write(r.join("app.js"), "v1\n").unwrap()) else {
        return;
    };
    assert_eq!(fs::read_to_string(m.m("app.js")).unwrap(), "v1\n");
    for i in 0..3 {
        fs::write(m.m("app.js"), format!("save {i}\n")).unwrap();
    }
    assert_eq!(fs::read_to_string(m.r("app.js")).unwrap(), "save 2\n");
    assert!(conflict_copies(m.mnt.path(), "app.js").is_empty());
    assert!(m.handle().status().conflicts.is_empty());
}

#[test]
fn a_rename_over_an_unseen_version_keeps_both() {
    let Some(m) = blind(|r| fs::write(r.join("main.py"), "v1\n").unwrap()) else {
        return;
    };
    assert_eq!(fs::read_to_string(m.m("main.py")).unwrap(), "v1\n");
    change_there(&m, "main.py", "print('container')\n");
    // VS Code's atomic save: a temporary file renamed over the original.
    fs::write(m.m("main.py.tmp-save"), "print('here')\n").unwrap();
    fs::rename(m.m("main.py.tmp-save"), m.m("main.py")).unwrap();
    assert_eq!(
        fs::read_to_string(m.r("main.py")).unwrap(),
        "print('here')\n"
    );
    let copies = conflict_copies(m.mnt.path(), "main.py");
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(
        fs::read_to_string(&copies[0]).unwrap(),
        "print('container')\n"
    );
}

#[test]
fn a_jetbrains_save_over_an_unseen_version_keeps_both() {
    let Some(m) = blind(|r| fs::write(r.join("Main.kt"), "v1\n").unwrap()) else {
        return;
    };
    assert_eq!(fs::read_to_string(m.m("Main.kt")).unwrap(), "v1\n");
    change_there(&m, "Main.kt", "container edit\n");
    fs::write(m.m("Main.kt___jb_tmp___"), "ide edit\n").unwrap();
    fs::rename(m.m("Main.kt"), m.m("Main.kt___jb_old___")).unwrap();
    fs::rename(m.m("Main.kt___jb_tmp___"), m.m("Main.kt")).unwrap();
    fs::remove_file(m.m("Main.kt___jb_old___")).unwrap();
    assert_eq!(fs::read_to_string(m.r("Main.kt")).unwrap(), "ide edit\n");
    let copies = conflict_copies(m.mnt.path(), "Main.kt");
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(fs::read_to_string(&copies[0]).unwrap(), "container edit\n");
}
