//! Local-only names through a real mount: editor junk (the default rules) and `--exclude`
//! paths made through the mount stay on this side; renames across the boundary move the
//! bytes the way the editor's save meant.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Mounted, Setup};
use kmount_mount::MountOptions;
use kmount_mount::rules::RulesConfig;

fn mounted(rules: RulesConfig, fill: impl FnOnce(&std::path::Path)) -> Option<Mounted> {
    let setup = Setup {
        opts: MountOptions {
            rules,
            ..MountOptions::default()
        },
        ..Setup::default()
    };
    Mounted::new(setup, fill)
}

/// Waits until every change made through the mount is applied in the target.
fn settle(m: &Mounted) {
    m.handle()
        .wait_applied(Duration::from_secs(30))
        .expect("changes made through the mount did not reach the target");
}

/// A mount without or with write-back (its state directory comes with it; [`settle`] before
/// looking at the target).
fn either(
    write_back: bool,
    fill: impl FnOnce(&std::path::Path),
) -> Option<(Mounted, Option<tempfile::TempDir>)> {
    if !write_back {
        return Some((mounted(RulesConfig::default(), fill)?, None));
    }
    let state = tempfile::tempdir().unwrap();
    let m = Mounted::new(Setup::write_back(state.path()), fill)?;
    assert!(
        m.handle().status().write_back,
        "cannot run: the agent keeps no journal; no write-back (fix the machine, do not skip)"
    );
    Some((m, Some(state)))
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn swap_files_stay_here_and_work_like_files() {
    let Some(m) = mounted(RulesConfig::default(), |r| {
        fs::write(r.join("app.js"), "v1\n").unwrap();
    }) else {
        return;
    };
    let swp = m.m(".app.js.swp");
    let mut f = fs::File::create(&swp).unwrap();
    f.write_all(b"swap bytes").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(&swp).unwrap(), b"swap bytes");
    assert_eq!(fs::metadata(&swp).unwrap().len(), 10);
    fs::set_permissions(&swp, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(&swp).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(names(m.mnt.path()), [".app.js.swp", "app.js"]);
    assert!(
        !m.r(".app.js.swp").exists(),
        "the swap file reached the target"
    );
    // Vim's write probe and an emacs lock symlink.
    fs::write(m.m("4913"), "").unwrap();
    std::os::unix::fs::symlink("user@host.1234", m.m(".#app.js")).unwrap();
    assert_eq!(
        fs::read_link(m.m(".#app.js")).unwrap().to_str(),
        Some("user@host.1234")
    );
    assert!(!m.r("4913").exists() && m.r(".#app.js").symlink_metadata().is_err());
    // A reconciliation leaves them alone.
    m.handle().reconcile_now(Duration::from_secs(30)).unwrap();
    assert_eq!(
        names(m.mnt.path()),
        [".#app.js", ".app.js.swp", "4913", "app.js"]
    );
    fs::remove_file(m.m("4913")).unwrap();
    fs::remove_file(m.m(".#app.js")).unwrap();
    fs::remove_file(&swp).unwrap();
    assert_eq!(names(m.mnt.path()), ["app.js"]);
    assert_eq!(names(m.remote.path()), ["app.js"]);
}

#[test]
fn vim_backup_rename_keeps_the_backup_here() {
    vim_backup_rename(false);
}

#[test]
fn vim_backup_rename_keeps_the_backup_here_with_write_back() {
    vim_backup_rename(true);
}

fn vim_backup_rename(write_back: bool) {
    let Some((m, _state)) = either(write_back, |r| {
        fs::write(r.join("app.js"), "v1\n").unwrap();
    }) else {
        return;
    };
    let settled = |m: &Mounted| {
        if write_back {
            settle(m);
        }
    };
    // Vim with writebackup: app.js -> app.js~, write a new app.js, remove app.js~.
    fs::rename(m.m("app.js"), m.m("app.js~")).unwrap();
    settled(&m);
    assert!(!m.r("app.js").exists(), "the rename removes the name there");
    assert!(!m.r("app.js~").exists(), "the backup reached the target");
    assert_eq!(fs::read(m.m("app.js~")).unwrap(), b"v1\n");
    fs::write(m.m("app.js"), "v2\n").unwrap();
    settled(&m);
    assert_eq!(fs::read(m.r("app.js")).unwrap(), b"v2\n");
    assert_eq!(fs::read(m.m("app.js~")).unwrap(), b"v1\n");
    fs::remove_file(m.m("app.js~")).unwrap();
    settled(&m);
    assert_eq!(names(m.mnt.path()), ["app.js"]);
    assert_eq!(names(m.remote.path()), ["app.js"]);
}

#[test]
fn jetbrains_safe_write_arrives_as_one_complete_file() {
    jetbrains_safe_write(false);
}

#[test]
fn jetbrains_safe_write_arrives_as_one_complete_file_with_write_back() {
    jetbrains_safe_write(true);
}

fn jetbrains_safe_write(write_back: bool) {
    let pattern = |len: usize| -> Vec<u8> { (0..len).map(|i| (i * 7 % 251) as u8).collect() };
    let big = pattern(3 * 1024 * 1024 + 17);
    let Some((m, _state)) = either(write_back, |r| {
        fs::write(r.join("small.txt"), "old\n").unwrap();
        fs::write(r.join("big.bin"), "old\n").unwrap();
        fs::set_permissions(r.join("small.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    }) else {
        return;
    };
    let mut saves = vec![("small.txt", b"new contents\n".to_vec()), ("big.bin", big)];
    if write_back {
        // More than one journal record can carry: sent in pieces under a temporary name.
        saves.push(("huge.bin", pattern((16 << 20) + 4099)));
    }
    for (name, data) in &saves {
        let tmp = m.m(&format!("{name}___jb_tmp___"));
        let old = m.m(&format!("{name}___jb_old___"));
        fs::write(&tmp, data).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(!m.r(&format!("{name}___jb_tmp___")).exists());
        if m.m(name).exists() {
            fs::rename(m.m(name), &old).unwrap();
        }
        fs::rename(&tmp, m.m(name)).unwrap();
        if old.exists() {
            fs::remove_file(&old).unwrap();
        }
        assert!(
            fs::read(m.m(name)).unwrap() == *data,
            "{name} through the mount"
        );
        if write_back {
            settle(&m);
        }
        assert!(
            fs::read(m.r(name)).unwrap() == *data,
            "{name} on the target"
        );
        assert!(
            fs::read(m.m(name)).unwrap() == *data,
            "{name} through the mount"
        );
        let mode = fs::metadata(m.r(name)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "{name}'s mode on the target");
    }
    let mut expect: Vec<&str> = saves.iter().map(|(n, _)| *n).collect();
    expect.sort();
    assert_eq!(names(m.remote.path()), expect);
    assert_eq!(names(m.mnt.path()), expect);
    // The node is the target's now: a change there shows through the mount.
    fs::write(m.r("small.txt"), "changed there\n").unwrap();
    m.handle().reconcile_now(Duration::from_secs(30)).unwrap();
    assert_eq!(fs::read(m.m("small.txt")).unwrap(), b"changed there\n");
}

#[test]
fn excluded_paths_made_here_stay_here() {
    let rules = RulesConfig {
        exclude: vec!["build/".into(), "*.log".into()],
        ..RulesConfig::default()
    };
    let Some(m) = mounted(rules, |r| {
        fs::create_dir(r.join("src")).unwrap();
    }) else {
        return;
    };
    fs::create_dir_all(m.m("build/out/deep")).unwrap();
    fs::write(m.m("build/out/deep/a.o"), "object").unwrap();
    fs::write(m.m("src/run.log"), "log line\n").unwrap();
    fs::write(m.m("src/main.rs"), "fn main() {}\n").unwrap();
    assert!(!m.r("build").exists());
    assert!(!m.r("src/run.log").exists());
    assert_eq!(fs::read(m.r("src/main.rs")).unwrap(), b"fn main() {}\n");
    assert_eq!(fs::read(m.m("build/out/deep/a.o")).unwrap(), b"object");
    // A synced directory holding local-only files is not empty.
    let err = fs::remove_dir(m.m("src")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY), "{err}");
    // Moving a local-only directory to a synced name cannot be done by rename.
    let err = fs::rename(m.m("build"), m.m("dist")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{err}");
    // Hard links across the boundary are refused the same way.
    let err = fs::hard_link(m.m("src/main.rs"), m.m("src/main.log")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{err}");
    fs::remove_dir_all(m.m("build")).unwrap();
    fs::remove_file(m.m("src/run.log")).unwrap();
    fs::remove_file(m.m("src/main.rs")).unwrap();
    fs::remove_dir(m.m("src")).unwrap();
    assert_eq!(names(m.remote.path()), Vec::<String>::new());
}

#[test]
fn no_default_ignores_sends_everything() {
    let rules = RulesConfig {
        no_defaults: true,
        ..RulesConfig::default()
    };
    let Some(m) = mounted(rules, |_| {}) else {
        return;
    };
    fs::write(m.m(".x.swp"), "swap").unwrap();
    assert_eq!(fs::read(m.r(".x.swp")).unwrap(), b"swap");
}

#[test]
fn jetbrains_saves_one_after_another_all_arrive() {
    jetbrains_saves(false);
}

#[test]
fn jetbrains_saves_one_after_another_all_arrive_with_write_back() {
    jetbrains_saves(true);
}

/// 200 saves of one file in a row, each read back at once (on ext4 the target gives the new
/// file the old one's inode number, and the kernel forgets the old one meanwhile).
fn jetbrains_saves(write_back: bool) {
    let Some((m, _state)) = either(write_back, |r| {
        fs::write(r.join("app.js"), "v0\n").unwrap();
    }) else {
        return;
    };
    let name = "app.js";
    for i in 1..=200 {
        let data = format!("v{i}\n").repeat(i);
        let tmp = m.m(&format!("{name}___jb_tmp___"));
        let old = m.m(&format!("{name}___jb_old___"));
        fs::write(&tmp, &data).unwrap();
        fs::rename(m.m(name), &old).unwrap();
        fs::rename(&tmp, m.m(name)).unwrap();
        fs::remove_file(&old).unwrap();
        assert_eq!(
            fs::read_to_string(m.m(name)).unwrap(),
            data,
            "save {i} through the mount"
        );
        if !write_back {
            assert_eq!(
                fs::read_to_string(m.r(name)).unwrap(),
                data,
                "save {i} on the target"
            );
        }
    }
    if write_back {
        settle(&m);
        assert_eq!(fs::read_to_string(m.r(name)).unwrap(), "v200\n".repeat(200));
    }
    assert_eq!(names(m.mnt.path()), [name]);
    assert_eq!(names(m.remote.path()), [name]);
}
