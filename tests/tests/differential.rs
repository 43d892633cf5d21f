//! Differential test: the same random sequence of file-system operations (by path, and through
//! handles kept open across steps) applied to a kmount mount and to a plain reference directory
//! must give the same result (success, the same data, or the same errno) at every step, and leave the same observable tree: names, types, modes,
//! sizes, contents, symlink targets, link counts, hard-link groups, and mtimes where they were
//! set explicitly. At the end of each case the mount is unmounted and the backing directory
//! must match the reference too.
//!
//! `PROPTEST_CASES` sets the number of cases (default 32); failures are saved in
//! `tests/proptest-regressions/` and replayed first on the next run.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kmount_tests::{
    Content, Mode, Mounted, TreeSnap, check, cstr, errno_name, renameat2, tree_snapshot,
    tree_snapshot_diff, ts, utimensat,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

/// Times at or after this are "now-ish"; explicitly set times are generated well before it, so
/// a node whose mtime is still before it must show exactly the time that was set.

#[derive(Debug, Clone, Copy)]
enum Time {
    Omit,
    Now,
    At(i64, i64),
}

impl Time {
    fn timespec(self) -> libc::timespec {
        match self {
            Time::Omit => ts(0, libc::UTIME_OMIT),
            Time::Now => ts(0, libc::UTIME_NOW),
            Time::At(s, ns) => ts(s, ns),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        path: String,
        excl: bool,
        trunc: bool,
        mode: Mode,
    },
    Write {
        path: String,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Read {
        path: String,
        offset: u64,
        len: usize,
    },
    Truncate {
        path: String,
        size: u64,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: Mode,
    },
    Rmdir {
        path: String,
    },
    Chmod {
        path: String,
        mode: Mode,
    },
    Utimens {
        path: String,
        atime: Time,
        mtime: Time,
        nofollow: bool,
    },
    /// Opens `path` into handle slot `slot` (closing what was there), read-only or read-write.
    Open {
        slot: usize,
        path: String,
        write: bool,
        append: bool,
    },
    FdWrite {
        slot: usize,
        offset: u64,
        len: usize,
        seed: u8,
    },
    FdRead {
        slot: usize,
        offset: u64,
        len: usize,
    },
    FdTruncate {
        slot: usize,
        size: u64,
    },
    /// `fstat`: type, mode, size (not of directories) and link count.
    FdStat {
        slot: usize,
    },
    Close {
        slot: usize,
    },
}

/// Number of handle slots of [`Op::Open`].
const SLOTS: usize = 3;

/// One side of the comparison: a root directory and the handles open in it.
struct Side {
    root: PathBuf,
    fds: Vec<Option<File>>,
}

impl Side {
    fn new(root: &Path) -> Self {
        Side {
            root: root.to_path_buf(),
            fds: (0..SLOTS).map(|_| None).collect(),
        }
    }
}

/// What an operation returned: data for reads, nothing for the rest, or the errno.
#[derive(PartialEq, Eq)]
struct Outcome(Result<Option<Vec<u8>>, i32>);

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Ok(None) => write!(f, "Ok"),
            Ok(Some(d)) => write!(f, "Ok({:?})", Content(d.clone())),
            Err(e) => write!(f, "Err({})", errno_name(*e)),
        }
    }
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("error without errno: {e}"))
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(7)) ^ (i >> 8) as u8)
        .collect()
}

fn read_fully(f: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut buf[got..], offset + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

fn apply(side: &mut Side, op: &Op) -> Outcome {
    let root = side.root.clone();
    let p = |rel: &str| root.join(rel);
    let fds = &mut side.fds;
    let ebadf = || std::io::Error::from_raw_os_error(libc::EBADF);
    let mut run = || -> std::io::Result<Option<Vec<u8>>> {
        match op {
            Op::Create {
                path,
                excl,
                trunc,
                mode,
            } => {
                let mut o = OpenOptions::new();
                o.write(true).mode(mode.0);
                if *excl {
                    o.create_new(true);
                } else {
                    o.create(true).truncate(*trunc);
                }
                o.open(p(path)).map(|_| None)
            }
            Op::Write {
                path,
                offset,
                len,
                seed,
            } => {
                let f = OpenOptions::new().write(true).open(p(path))?;
                f.write_all_at(&data(*len, *seed), *offset)?;
                Ok(None)
            }
            Op::Read { path, offset, len } => {
                let f = OpenOptions::new().read(true).open(p(path))?;
                read_fully(&f, *offset, *len).map(Some)
            }
            Op::Truncate { path, size } => {
                check(unsafe { libc::truncate(cstr(&p(path)).as_ptr(), *size as i64) })?;
                Ok(None)
            }
            Op::Rename { from, to, flags } => renameat2(&p(from), &p(to), *flags).map(|_| None),
            Op::Link { from, to } => fs::hard_link(p(from), p(to)).map(|_| None),
            Op::Symlink { target, path } => {
                std::os::unix::fs::symlink(target, p(path)).map(|_| None)
            }
            Op::Unlink { path } => fs::remove_file(p(path)).map(|_| None),
            Op::Mkdir { path, mode } => fs::DirBuilder::new()
                .mode(mode.0)
                .create(p(path))
                .map(|_| None),
            Op::Rmdir { path } => fs::remove_dir(p(path)).map(|_| None),
            Op::Chmod { path, mode } => {
                fs::set_permissions(p(path), fs::Permissions::from_mode(mode.0)).map(|_| None)
            }
            Op::Utimens {
                path,
                atime,
                mtime,
                nofollow,
            } => {
                let flags = if *nofollow {
                    libc::AT_SYMLINK_NOFOLLOW
                } else {
                    0
                };
                utimensat(&p(path), atime.timespec(), mtime.timespec(), flags).map(|_| None)
            }
            Op::Open {
                slot,
                path,
                write,
                append,
            } => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(*write)
                    .append(*append)
                    .open(p(path))?;
                fds[*slot] = Some(f);
                Ok(None)
            }
            Op::FdWrite {
                slot,
                offset,
                len,
                seed,
            } => {
                let f = fds[*slot].as_ref().ok_or_else(ebadf)?;
                f.write_all_at(&data(*len, *seed), *offset)?;
                Ok(None)
            }
            Op::FdRead { slot, offset, len } => {
                let f = fds[*slot].as_ref().ok_or_else(ebadf)?;
                read_fully(f, *offset, *len).map(Some)
            }
            Op::FdTruncate { slot, size } => {
                let f = fds[*slot].as_ref().ok_or_else(ebadf)?;
                f.set_len(*size)?;
                Ok(None)
            }
            Op::FdStat { slot } => {
                let md = fds[*slot].as_ref().ok_or_else(ebadf)?.metadata()?;
                let size = if md.is_dir() { None } else { Some(md.size()) };
                let text = format!("mode {:o} size {size:?} nlink {}", md.mode(), md.nlink());
                Ok(Some(text.into_bytes()))
            }
            Op::Close { slot } => fds[*slot].take().map(|_| None).ok_or_else(ebadf),
        }
    };
    Outcome(run().map_err(errno))
}

fn snapshot(root: &Path) -> Result<TreeSnap, String> {
    tree_snapshot(root, true)
}

fn diff(mount: &TreeSnap, reference: &TreeSnap) -> String {
    tree_snapshot_diff(mount, reference)
}

/// Names the operations pick from. `d` and `d/e` start as directories and `a`, `d/a`,
/// `d/e/b` as files (see [`populate`]), so most operations find what they need; the rest make
/// and remove things around them.
const POOL: &[&str] = &[
    "a", "b", "c", "d", "e", "d/a", "d/b", "d/c", "d/e", "d/e/a", "d/e/b", "e/a", "e/b",
];

/// The starting tree of every case, made in the backing dir (before mounting) and in the
/// reference dir alike.
fn populate(root: &Path) {
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::write(root.join("a"), data(100, 1)).unwrap();
    fs::write(root.join("d/a"), data(5000, 2)).unwrap();
    fs::write(root.join("d/e/b"), b"").unwrap();
}

fn path() -> impl Strategy<Value = String> {
    prop::sample::select(POOL).prop_map(str::to_string)
}

fn time() -> impl Strategy<Value = Time> {
    prop_oneof![
        1 => Just(Time::Omit),
        1 => Just(Time::Now),
        3 => (1_000_000_000i64..1_100_000_000, 0i64..1_000_000_000).prop_map(|(s, ns)| Time::At(s, ns)),
    ]
}

fn slot() -> impl Strategy<Value = usize> {
    0..SLOTS
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0u64..5000, 1 => 0u64..300_000]
}

fn op() -> impl Strategy<Value = Op> {
    let file_mode = prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o666, 0o400]).prop_map(Mode);
    let dir_mode =
        prop::sample::select(vec![0o755u32, 0o700, 0o777, 0o1777, 0o2775]).prop_map(Mode);
    let chmod_mode = prop::sample::select(vec![
        0o644u32, 0o600, 0o755, 0o700, 0o444, 0o000, 0o777, 0o1777, 0o2755, 0o4755,
    ])
    .prop_map(Mode);
    let rename_flags = prop_oneof![
        6 => Just(0u32),
        1 => Just(libc::RENAME_NOREPLACE),
        1 => Just(libc::RENAME_EXCHANGE),
    ];
    let target = prop_oneof![4 => path(), 1 => Just("nowhere".to_string())];
    prop_oneof![
        4 => (path(), any::<bool>(), any::<bool>(), file_mode)
            .prop_map(|(path, excl, trunc, mode)| Op::Create { path, excl, trunc, mode }),
        6 => (path(), offset(), 1usize..20_000, any::<u8>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        3 => (path(), offset(), 1usize..70_000)
            .prop_map(|(path, offset, len)| Op::Read { path, offset, len }),
        2 => (path(), offset()).prop_map(|(path, size)| Op::Truncate { path, size }),
        4 => (path(), path(), rename_flags)
            .prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        2 => (path(), path()).prop_map(|(from, to)| Op::Link { from, to }),
        2 => (target, path()).prop_map(|(target, path)| Op::Symlink { target, path }),
        2 => path().prop_map(|path| Op::Unlink { path }),
        2 => (path(), dir_mode).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        1 => path().prop_map(|path| Op::Rmdir { path }),
        2 => (path(), chmod_mode).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        2 => (path(), time(), time(), any::<bool>())
            .prop_map(|(path, atime, mtime, nofollow)| Op::Utimens { path, atime, mtime, nofollow }),
        3 => (slot(), path(), any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(slot, path, write, append)| Op::Open { slot, path, write: write || append, append }),
        4 => (slot(), offset(), 1usize..20_000, any::<u8>())
            .prop_map(|(slot, offset, len, seed)| Op::FdWrite { slot, offset, len, seed }),
        2 => (slot(), offset(), 1usize..70_000)
            .prop_map(|(slot, offset, len)| Op::FdRead { slot, offset, len }),
        1 => (slot(), offset()).prop_map(|(slot, size)| Op::FdTruncate { slot, size }),
        2 => slot().prop_map(|slot| Op::FdStat { slot }),
        1 => slot().prop_map(|slot| Op::Close { slot }),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

fn history(ops: &[Op], upto: usize) -> String {
    ops[..=upto]
        .iter()
        .enumerate()
        .map(|(i, op)| format!("  {i:>2}: {op:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn run_case(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut m = Mounted::with_backing(populate);
    let reference = m.dir().join("reference");
    fs::create_dir(&reference).unwrap();
    populate(&reference);
    fs::set_permissions(&reference, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o755)).unwrap();

    let mut want_side = Side::new(&reference);
    let mut got_side = Side::new(&m.mnt);
    for (i, op) in ops.iter().enumerate() {
        let want = apply(&mut want_side, op);
        let got = apply(&mut got_side, op);
        prop_assert_eq!(
            &got,
            &want,
            "step {} gave a different result through the mount than on a plain directory; \
             operations:\n{}",
            i,
            history(ops, i)
        );
        let expected = snapshot(&reference).map_err(TestCaseError::fail)?;
        let seen = snapshot(&m.mnt).map_err(|e| {
            TestCaseError::fail(format!(
                "after step {i}, walking the mount failed: {e}; operations:\n{}",
                history(ops, i)
            ))
        })?;
        if seen != expected {
            return Err(TestCaseError::fail(format!(
                "after step {i} the mount differs from the reference:\n{}operations:\n{}",
                diff(&seen, &expected),
                history(ops, i)
            )));
        }
    }

    // Unmounting flushes everything: the backing directory must now hold the same tree.
    drop((want_side, got_side));
    m.unmount();
    let expected = snapshot(&reference).map_err(TestCaseError::fail)?;
    let backing = snapshot(&m.backing).map_err(TestCaseError::fail)?;
    if backing != expected {
        return Err(TestCaseError::fail(format!(
            "after unmount the backing dir differs from the reference:\n{}operations:\n{}",
            diff(&backing, &expected),
            history(ops, ops.len().saturating_sub(1))
        )));
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config {
        cases: cases(),
        max_shrink_iters: 300,
        // Relative to the package root (cargo runs tests there): tests/proptest-regressions/.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/differential.txt"
        ))),
        ..Config::default()
    })]

    #[test]
    fn mount_matches_plain_directory(ops in prop::collection::vec(op(), 1..=64)) {
        run_case(&ops)?;
    }
}
