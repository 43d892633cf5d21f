//! Real programs working in a kmount mount: git, sqlite3 (WAL), vim, tar, cp -a, truncate + dd.
//! Needs the programs installed (`scripts/deps.sh --test`); a missing one fails the test with
//! the command that installs it.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kmount_tests::*;

const TIMEOUT: Duration = Duration::from_secs(300);

fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    if !found {
        panic!(
            "{program} is not installed, so this test cannot run: install it with \
             `apt-get install -y {package}` (or run scripts/deps.sh --test)"
        );
    }
}

/// Runs `program args..` in `cwd` and returns its stdout; panics with the output on failure.
fn run(cwd: &Path, program: &str, args: &[&str]) -> String {
    let out = run_timeout(
        Command::new(program)
            .args(args)
            .current_dir(cwd)
            // A hermetic git: no user or system configuration.
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "kmount test")
            .env("GIT_AUTHOR_EMAIL", "test@kmount.invalid")
            .env("GIT_COMMITTER_NAME", "kmount test")
            .env("GIT_COMMITTER_EMAIL", "test@kmount.invalid")
            .env("HOME", cwd),
        TIMEOUT,
    );
    if !out.success() {
        panic!(
            "`{program} {}` in {} failed: {out}",
            args.join(" "),
            cwd.display()
        );
    }
    out.stdout
}

fn git(cwd: &Path, args: &[&str]) -> String {
    run(cwd, "git", args)
}

#[test]
fn git_init_commit_branch_checkout_status() {
    require("git", "git");
    let m = Mounted::new();
    let repo = m.m("repo");
    fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    fs::create_dir_all(repo.join("src/deep")).unwrap();
    for i in 0..50 {
        fs::write(
            repo.join(format!("src/file{i}.txt")),
            format!("line {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    fs::write(repo.join("src/deep/bin"), pattern(200_000, 1)).unwrap();
    symlink("src/file1.txt", repo.join("link")).unwrap();
    fs::write(repo.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(repo.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    assert_eq!(
        git(&repo, &["status", "--porcelain"]),
        "",
        "status after the first commit"
    );

    git(&repo, &["checkout", "-q", "-b", "feature"]);
    fs::write(repo.join("src/file0.txt"), "changed on feature\n").unwrap();
    fs::remove_file(repo.join("src/file2.txt")).unwrap();
    fs::write(repo.join("new.txt"), "new\n").unwrap();
    assert_eq!(
        git(&repo, &["status", "--porcelain"]),
        " M src/file0.txt\n D src/file2.txt\n?? new.txt\n"
    );
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "feature work"]);
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");

    git(&repo, &["checkout", "-q", "main"]);
    assert_eq!(
        fs::read_to_string(repo.join("src/file0.txt")).unwrap(),
        "line 0\n"
    );
    assert!(repo.join("src/file2.txt").exists());
    assert!(!repo.join("new.txt").exists());
    assert_eq!(
        git(&repo, &["status", "--porcelain"]),
        "",
        "status after checkout main"
    );
    git(&repo, &["checkout", "-q", "feature"]);
    assert_eq!(
        fs::read_to_string(repo.join("src/file0.txt")).unwrap(),
        "changed on feature\n"
    );
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");
    git(&repo, &["fsck", "--strict", "--no-progress"]);
    assert_eq!(
        git(&repo, &["rev-list", "--count", "HEAD"]).trim(),
        "2",
        "commits on feature"
    );
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn git_clone_into_mount() {
    require("git", "git");
    let m = Mounted::new();
    let src = m.dir().join("origin");
    fs::create_dir(&src).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    for c in 0..5 {
        for i in 0..20 {
            fs::write(src.join(format!("f{i}")), format!("commit {c} file {i}\n")).unwrap();
        }
        git(&src, &["add", "-A"]);
        git(&src, &["commit", "-q", "-m", &format!("commit {c}")]);
    }
    let origin = src.to_str().unwrap();
    git(&m.mnt, &["clone", "-q", origin, "clone"]);
    let clone = m.m("clone");
    assert_eq!(git(&clone, &["status", "--porcelain"]), "");
    git(&clone, &["fsck", "--strict", "--no-progress"]);
    assert_eq!(git(&clone, &["rev-list", "--count", "HEAD"]).trim(), "5");
    assert_eq!(
        git(&clone, &["rev-parse", "HEAD"]),
        git(&src, &["rev-parse", "HEAD"])
    );
    assert_eq!(
        fs::read_to_string(clone.join("f7")).unwrap(),
        "commit 4 file 7\n"
    );
    // And back: a clone out of the mount.
    let out = m.dir().join("out");
    git(
        m.dir(),
        &[
            "clone",
            "-q",
            clone.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(git(&out, &["rev-list", "--count", "HEAD"]).trim(), "5");
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn sqlite_wal() {
    require("sqlite3", "sqlite3");
    let mut m = Mounted::new();
    let mut sql =
        String::from("PRAGMA journal_mode=WAL;\nCREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);\n");
    for tx in 0..10 {
        sql.push_str("BEGIN;\n");
        for i in 0..100 {
            sql.push_str(&format!(
                "INSERT INTO t(v) VALUES ('tx {tx} row {i} {}');\n",
                "x".repeat(i)
            ));
        }
        sql.push_str("COMMIT;\n");
    }
    sql.push_str("PRAGMA integrity_check;\nSELECT count(*) FROM t;\n");
    let script = m.dir().join("script.sql");
    fs::write(&script, &sql).unwrap();
    let out = run(
        &m.mnt,
        "sqlite3",
        &["-bail", "db.sqlite", &format!(".read {}", script.display())],
    );
    assert_eq!(out, "wal\nok\n1000\n");

    // Reopened: still WAL, intact, all rows.
    let out = run(
        &m.mnt,
        "sqlite3",
        &[
            "db.sqlite",
            "PRAGMA journal_mode; PRAGMA integrity_check; SELECT count(*), sum(length(v)) FROM t;",
        ],
    );
    let expected_len: usize = (0..10)
        .flat_map(|tx| (0..100).map(move |i| format!("tx {tx} row {i} {}", "x".repeat(i)).len()))
        .sum();
    assert_eq!(out, format!("wal\nok\n1000|{expected_len}\n"));

    // Another connection writes while one reads (WAL's point: readers and a writer at once).
    let out = run(
        &m.mnt,
        "sqlite3",
        &[
            "db.sqlite",
            "BEGIN; SELECT count(*) FROM t; INSERT INTO t(v) VALUES ('late'); COMMIT; SELECT count(*) FROM t;",
        ],
    );
    assert_eq!(out, "1000\n1001\n");

    m.unmount();
    // The backing copy is a complete database.
    let out = run(
        &m.backing,
        "sqlite3",
        &[
            "db.sqlite",
            "PRAGMA integrity_check; SELECT count(*) FROM t;",
        ],
    );
    assert_eq!(out, "ok\n1001\n");
}

#[test]
fn vim_saves_with_swap_file() {
    require("vim", "vim");
    let m = Mounted::new();
    let original: String = (0..200)
        .map(|i| format!("a line {i} with an a\n"))
        .collect();
    fs::write(m.m("file.txt"), &original).unwrap();
    fs::set_permissions(m.m("file.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    // `cquit` (exit 1) unless vim really has a swap file for the buffer in the mount.
    run(
        &m.mnt,
        "vim",
        &[
            "-u",
            "NONE",
            "-i",
            "NONE",
            "-N",
            "-es",
            "-c",
            "set swapfile directory=.",
            "-c",
            "preserve",
            "-c",
            "if swapname('%') !~ 'file.txt.swp$' || !filereadable(swapname('%')) | cquit | endif",
            "-c",
            "%s/a/b/g",
            "-c",
            "wq",
            "file.txt",
        ],
    );
    let expected = original.replace('a', "b");
    assert_eq!(fs::read_to_string(m.m("file.txt")).unwrap(), expected);
    assert_eq!(fs::read_to_string(m.b("file.txt")).unwrap(), expected);
    assert_eq!(perm(&m.m("file.txt")), 0o640, "vim kept the mode");
    let mut left: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec!["file.txt"],
        "swap or backup files left in the mount"
    );
    let mut left_b: Vec<String> = fs::read_dir(&m.backing)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left_b.sort();
    assert_eq!(
        left_b,
        vec!["file.txt"],
        "swap or backup files left in the backing dir"
    );
    assert_same_tree(&m.mnt, &m.backing);
}

/// A tree with files of several sizes, modes, an exact mtime, owners (as root), nested dirs,
/// symlinks, hard links, an xattr and 255-byte names.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("small"), b"small file\n").unwrap();
    fs::write(root.join("dir/medium"), pattern(100_000, 1)).unwrap();
    fs::write(root.join("dir/sub/big"), pattern(3 << 20, 2)).unwrap();
    fs::write(root.join("dir/sub/deeper/x"), b"x").unwrap();
    let long = "L".repeat(255);
    fs::write(root.join(&long), b"long name").unwrap();
    fs::create_dir(root.join("d".repeat(255))).unwrap();
    fs::write(
        root.join("d".repeat(255)).join("e".repeat(255)),
        b"long in long",
    )
    .unwrap();
    fs::hard_link(root.join("small"), root.join("dir/hardlink-to-small")).unwrap();
    fs::hard_link(root.join("small"), root.join("dir/sub/second-hardlink")).unwrap();
    symlink("../small", root.join("dir/rel-link")).unwrap();
    symlink("/nonexistent/dangling", root.join("dangling")).unwrap();
    symlink("dir/sub", root.join("dir-link")).unwrap();
    fs::write(root.join("script"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("script"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("dir/medium"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(
        root.join("dir/sub/deeper"),
        fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    set_xattr(&root.join("dir/medium"), "user.origin", b"kmount test", 0).unwrap();
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(root.join("dir/medium"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(root.join("dangling"), Some(42), Some(43)).unwrap();
    }
    utimensat(
        &root.join("small"),
        ts(1_000_000_000, 1),
        ts(1_000_000_000, 123_456_789),
        0,
    )
    .unwrap();
    // Directory mtimes last: creating entries changes them.
    utimensat(
        &root.join("dir/sub"),
        ts(1_100_000_000, 0),
        ts(1_100_000_000, 5),
        0,
    )
    .unwrap();
}

fn assert_hard_links_preserved(root: &Path) {
    let names = ["small", "dir/hardlink-to-small", "dir/sub/second-hardlink"];
    let inos: Vec<u64> = names.iter().map(|n| ino(&root.join(n))).collect();
    assert!(
        inos.iter().all(|i| *i == inos[0]),
        "hard links under {} have inodes {inos:?}",
        root.display()
    );
    assert_eq!(fs::symlink_metadata(root.join("small")).unwrap().nlink(), 3);
}

#[test]
fn tar_out_of_and_into_the_mount() {
    require("tar", "tar");
    let m = Mounted::new();
    make_tree(&m.m("src"));
    run(
        &m.mnt,
        "tar",
        &[
            "--format=posix",
            "--xattrs",
            "--xattrs-include=user.*",
            "-C",
            "src",
            "-cf",
            "tree.tar",
            ".",
        ],
    );
    fs::create_dir(m.m("dst")).unwrap();
    run(
        &m.mnt,
        "tar",
        &[
            "--xattrs",
            "--xattrs-include=user.*",
            "--same-owner",
            "-p",
            "-C",
            "dst",
            "-xf",
            "tree.tar",
        ],
    );
    assert_same_tree_with(&m.m("src"), &m.m("dst"), Fields::COPY);
    assert_hard_links_preserved(&m.m("dst"));
    assert_hard_links_preserved(&m.b("dst"));
    // tar lists what it archived from the mount the same way it lists the backing dir.
    let listed = run(&m.mnt, "tar", &["-tf", "tree.tar"]);
    assert!(
        listed.contains(&"L".repeat(255)),
        "tar listing lacks the long name:\n{listed}"
    );
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn cp_a_tree_into_the_mount() {
    let m = Mounted::new();
    let src = m.dir().join("src");
    make_tree(&src);
    run(
        m.dir(),
        "cp",
        &["-a", src.to_str().unwrap(), m.m("dst").to_str().unwrap()],
    );
    assert_same_tree_with(&src, &m.m("dst"), Fields::COPY);
    assert_hard_links_preserved(&m.m("dst"));
    assert_hard_links_preserved(&m.b("dst"));
    assert_same_tree(&m.mnt, &m.backing);
    // And out again.
    let back = m.dir().join("back");
    run(
        m.dir(),
        "cp",
        &["-a", m.m("dst").to_str().unwrap(), back.to_str().unwrap()],
    );
    assert_same_tree_with(&src, &back, Fields::COPY);
    assert_hard_links_preserved(&back);
}

#[test]
fn sparse_file_with_truncate_and_dd() {
    let m = Mounted::new();
    run(&m.mnt, "truncate", &["-s", "1G", "sparse"]);
    let tail = pattern(4096, 3);
    fs::write(m.dir().join("tail"), &tail).unwrap();
    let input = format!("if={}", m.dir().join("tail").display());
    run(
        &m.mnt,
        "dd",
        &[
            &input,
            "of=sparse",
            "bs=4096",
            "seek=262143",
            "count=1",
            "conv=notrunc,fsync",
            "status=none",
        ],
    );
    for p in [m.m("sparse"), m.b("sparse")] {
        let md = fs::symlink_metadata(&p).unwrap();
        assert_eq!(md.len(), 1 << 30, "{} size", p.display());
        assert!(
            md.blocks() < 2048,
            "{} is not sparse: {} blocks",
            p.display(),
            md.blocks()
        );
    }
    // Read back with dd, and through a plain handle; a hole reads as zeros.
    let readback = m.dir().join("readback");
    let output = format!("of={}", readback.display());
    run(
        &m.mnt,
        "dd",
        &[
            "if=sparse",
            &output,
            "bs=4096",
            "skip=262143",
            "count=1",
            "status=none",
        ],
    );
    assert_eq!(fs::read(&readback).unwrap(), tail);
    let f = fs::File::open(m.m("sparse")).unwrap();
    let mut buf = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, (1 << 30) - 4096).unwrap();
    assert_eq!(buf, tail);
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 300 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "a hole does not read as zeros");
    let backing_tail = {
        let g = fs::File::open(m.b("sparse")).unwrap();
        let mut t = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&g, &mut t, (1 << 30) - 4096).unwrap();
        t
    };
    assert_eq!(backing_tail, tail);
}
