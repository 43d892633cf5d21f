//! Coalescing: unit cases, and a property test that applying the coalesced batches to a scratch
//! directory gives the same tree as applying the raw records, from the start and from any
//! point the agent may have applied up to.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kmount_proto::{Caller, NodeRef, Op, RelPath, SetAttr, SetTime, Timespec};
use proptest::prelude::*;

use super::{Batch, MAX_MERGED_WRITE, Record, coalesce};

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

fn records(ops: Vec<Op>) -> Vec<Record> {
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Record {
            seq: 100 + i as u64,
            caller: None,
            op,
        })
        .collect()
}

fn create(path: &str, flags: i32, mode: u32) -> Op {
    Op::Create {
        path: p(path),
        flags: libc::O_WRONLY | libc::O_CREAT | flags,
        mode,
    }
}

fn write(path: &str, offset: u64, data: &[u8]) -> Op {
    Op::WritePath {
        path: p(path),
        offset,
        data: data.to_vec(),
    }
}

fn chmod(path: &str, mode: u32) -> Op {
    Op::SetAttr {
        node: NodeRef::Path(p(path)),
        set: SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        },
    }
}

fn set_mtime(path: &str, t: Option<SetTime>, atime: Option<SetTime>) -> Op {
    Op::SetAttr {
        node: NodeRef::Path(p(path)),
        set: SetAttr {
            mtime: t,
            atime,
            ..SetAttr::default()
        },
    }
}

fn ranges(b: &[Batch]) -> Vec<(u64, u64)> {
    b.iter().map(|b| (b.first_seq, b.seq)).collect()
}

/// The content a PutFile carries, decompressed.
fn put_data(op: &Op) -> (Vec<u8>, u32, Option<Timespec>) {
    match op {
        Op::PutFile {
            data,
            compressed,
            mode,
            mtime,
            atomic,
            ..
        } => {
            assert!(!atomic);
            let d = if *compressed {
                kmount_proto::tree::decompress(data, 1 << 30).unwrap()
            } else {
                data.clone()
            };
            (d, *mode, *mtime)
        }
        other => panic!("expected PutFile, got {other:?}"),
    }
}

#[test]
fn create_then_sequential_writes_become_one_put_file() {
    let text = b"fn main() { println!(\"hello\"); }\n".repeat(40);
    let r = records(vec![
        create("src/main.rs", libc::O_TRUNC, 0o100644),
        write("src/main.rs", 0, &text[..500]),
        write("src/main.rs", 500, &text[500..]),
        chmod("src/main.rs", 0o755),
        set_mtime(
            "src/main.rs",
            Some(SetTime::At(Timespec { sec: 5, nsec: 6 })),
            None,
        ),
    ]);
    let b = coalesce(&r);
    assert_eq!(ranges(&b), vec![(100, 104)]);
    let (data, mode, mtime) = put_data(&b[0].op);
    assert_eq!(data, text);
    assert_eq!(mode, 0o755);
    assert_eq!(mtime, Some(Timespec { sec: 5, nsec: 6 }));
    match &b[0].op {
        Op::PutFile {
            compressed, data, ..
        } => {
            assert!(*compressed, "repetitive text compresses");
            assert!(data.len() < text.len() / 4);
        }
        _ => unreachable!(),
    }
    // Incompressible bytes go raw.
    let mut x = 0x9e3779b97f4a7c15u64;
    let noise: Vec<u8> = (0..4000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let b = coalesce(&records(vec![
        create("x", libc::O_EXCL, 0o600),
        write("x", 0, &noise),
    ]));
    assert!(matches!(
        &b[0].op,
        Op::PutFile {
            compressed: false,
            mode: 0o600,
            mtime: None,
            ..
        }
    ));
    assert_eq!(put_data(&b[0].op).0, noise);
}

#[test]
fn what_does_not_become_a_put_file() {
    // No O_EXCL/O_TRUNC: the file might have had longer content.
    let b = coalesce(&records(vec![create("x", 0, 0o644), write("x", 0, b"ab")]));
    assert_eq!(ranges(&b), vec![(100, 100), (101, 101)]);
    // Set-id bits: writes may clear them, PutFile would not.
    let b = coalesce(&records(vec![
        create("x", libc::O_EXCL, 0o4755),
        write("x", 0, b"ab"),
    ]));
    assert_eq!(ranges(&b), vec![(100, 100), (101, 101)]);
    // A first write not at 0.
    let b = coalesce(&records(vec![
        create("x", libc::O_EXCL, 0o644),
        write("x", 1, b"ab"),
    ]));
    assert_eq!(ranges(&b), vec![(100, 100), (101, 101)]);
    // A create alone stays a create.
    let b = coalesce(&records(vec![create("x", libc::O_EXCL, 0o644)]));
    assert!(matches!(b[0].op, Op::Create { .. }));
    // Another path's write right after the create.
    let b = coalesce(&records(vec![
        create("x", libc::O_EXCL, 0o644),
        write("y", 0, b"ab"),
    ]));
    assert_eq!(ranges(&b), vec![(100, 100), (101, 101)]);
}

#[test]
fn setattr_after_writes_is_absorbed_but_a_later_write_ends_the_run() {
    let b = coalesce(&records(vec![
        create("x", libc::O_EXCL, 0o644),
        write("x", 0, b"abc"),
        chmod("x", 0o600),
        write("x", 3, b"def"),
        write("x", 6, b"ghi"),
    ]));
    assert_eq!(ranges(&b), vec![(100, 102), (103, 104)]);
    assert_eq!(put_data(&b[0].op), (b"abc".to_vec(), 0o600, None));
    assert_eq!(b[1].op, write("x", 3, b"defghi"));
    // atime (PutFile has none) and "now" mtimes.
    let b = coalesce(&records(vec![
        create("x", libc::O_EXCL, 0o644),
        write("x", 0, b"abc"),
        set_mtime("x", Some(SetTime::At(Timespec { sec: 1, nsec: 0 })), None),
        set_mtime("x", Some(SetTime::Now), None),
        set_mtime("x", None, Some(SetTime::Now)),
    ]));
    assert_eq!(ranges(&b), vec![(100, 103), (104, 104)]);
    assert_eq!(put_data(&b[0].op).2, None, "the later 'now' wins");
}

#[test]
fn contiguous_writes_merge_up_to_the_limit() {
    let block = vec![1u8; 1 << 20];
    let mut ops = Vec::new();
    for i in 0..10u64 {
        ops.push(write("big", i << 20, &block));
    }
    let b = coalesce(&records(ops));
    // 4 + 4 + 2 MiB.
    assert_eq!(ranges(&b), vec![(100, 103), (104, 107), (108, 109)]);
    for (batch, (off, len)) in b.iter().zip([(0u64, 4usize), (4, 4), (8, 2)]) {
        match &batch.op {
            Op::WritePath { offset, data, .. } => {
                assert_eq!(*offset, off << 20);
                assert_eq!(data.len(), len << 20);
                assert!(data.len() <= MAX_MERGED_WRITE);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn non_sequential_writes_are_not_merged() {
    let b = coalesce(&records(vec![
        write("f", 0, b"aaaa"),
        write("f", 8, b"bbbb"), // gap
        write("f", 12, b"cc"),
        write("f", 10, b"dd"), // backwards
        write("f", 11, b"ee"), // overlapping
    ]));
    assert_eq!(
        ranges(&b),
        vec![(100, 100), (101, 102), (103, 103), (104, 104)]
    );
}

#[test]
fn interleaved_other_path_ops_keep_their_place() {
    let r = records(vec![
        create("a", libc::O_EXCL, 0o644),
        write("a", 0, b"1"),
        Op::Mkdir {
            path: p("b"),
            mode: 0o755,
        },
        write("a", 1, b"2"),
        write("c", 0, b"x"),
        write("a", 2, b"3"),
    ]);
    let b = coalesce(&r);
    assert_eq!(
        ranges(&b),
        vec![(100, 101), (102, 102), (103, 103), (104, 104), (105, 105)]
    );
    assert!(matches!(b[0].op, Op::PutFile { .. }));
    assert!(matches!(b[1].op, Op::Mkdir { .. }));
    assert_eq!(b[2].op, write("a", 1, b"2"));
}

#[test]
fn a_rename_between_writes_splits_the_run() {
    let b = coalesce(&records(vec![
        write("a", 0, b"12"),
        write("a", 2, b"34"),
        Op::Rename {
            from: p("a"),
            to: p("b"),
            flags: 0,
        },
        write("a", 4, b"56"),
    ]));
    assert_eq!(ranges(&b), vec![(100, 101), (102, 102), (103, 103)]);
    assert_eq!(b[0].op, write("a", 0, b"1234"));
}

#[test]
fn different_callers_and_seq_gaps_split_runs() {
    let alice = Some(Caller {
        uid: 1000,
        gid: 1000,
        groups: vec![],
    });
    let mut r = records(vec![
        write("a", 0, b"1"),
        write("a", 1, b"2"),
        write("a", 2, b"3"),
        write("a", 3, b"4"),
    ]);
    r[1].caller = alice.clone();
    r[3].seq += 1; // 103 is missing
    let b = coalesce(&r);
    assert_eq!(
        ranges(&b),
        vec![(100, 100), (101, 101), (102, 102), (104, 104)]
    );
    assert_eq!(b[1].caller, alice);
}

#[test]
fn writes_without_a_caller_join_the_run_of_the_file_they_write() {
    let who = |uid| {
        Some(Caller {
            uid,
            gid: uid,
            groups: vec![],
        })
    };
    // With identity: the create as the caller, the writes through its open file without one.
    let mut r = records(vec![
        create("a", libc::O_EXCL, 0o644),
        write("a", 0, b"1"),
        write("a", 1, b"2"),
        write("a", 2, b"3"),
    ]);
    r[0].caller = who(1000);
    r[3].caller = who(1001);
    let b = coalesce(&r);
    assert_eq!(ranges(&b), vec![(100, 102), (103, 103)]);
    assert_eq!(b[0].caller, who(1000));
    assert_eq!(put_data(&b[0].op).0, b"12");
    check_partition(&r, &b);
}

#[test]
fn batches_partition_the_input_in_order() {
    let r = records(vec![
        create("a", libc::O_EXCL, 0o644),
        write("a", 0, b"x"),
        write("b", 0, b"x"),
        write("b", 1, b"x"),
        Op::Unlink { path: p("a") },
    ]);
    let b = coalesce(&r);
    check_partition(&r, &b);
}

fn check_partition(r: &[Record], b: &[Batch]) {
    let mut next = r.first().map(|r| r.seq);
    let mut i = 0;
    for batch in b {
        assert_eq!(
            Some(batch.first_seq),
            next,
            "batches are contiguous and in order"
        );
        assert!(batch.first_seq <= batch.seq);
        // Every covered record is one of the input's, in order.
        while i < r.len() && r[i].seq <= batch.seq {
            assert!(r[i].seq >= batch.first_seq);
            // A write journaled without a caller joins its file's run.
            if !matches!(r[i].op, Op::WritePath { .. }) || r[i].caller.is_some() {
                assert_eq!(r[i].caller, batch.caller);
            }
            i += 1;
        }
        next = r.get(i).map(|r| r.seq);
    }
    assert_eq!(i, r.len(), "every record is covered");
}

// ---- applying operations to a scratch directory, as the agent would ----

fn full(root: &Path, p: &RelPath) -> PathBuf {
    root.join(OsStr::from_bytes(p.as_bytes()))
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn set_times(path: &Path, atime: Option<SetTime>, mtime: Option<SetTime>) -> Result<(), i32> {
    let ts = |t: Option<SetTime>| match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => libc::timespec {
            tv_sec: t.sec,
            tv_nsec: i64::from(t.nsec),
        },
    };
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let times = [ts(atime), ts(mtime)];
    // SAFETY: a valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(errno(io::Error::last_os_error()))
    }
}

fn open_new_or_existing(path: &Path, flags: i32, mode: u32) -> Result<fs::File, i32> {
    let existed = fs::symlink_metadata(path).is_ok();
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .create_new(flags & libc::O_EXCL != 0)
        .truncate(flags & libc::O_TRUNC != 0)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(errno)?;
    if !existed {
        // The agent runs with umask 0.
        f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
            .map_err(errno)?;
    }
    Ok(f)
}

fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    match op {
        Op::Create { path, flags, mode } => {
            open_new_or_existing(&full(root, path), *flags, *mode).map(drop)
        }
        Op::WritePath { path, offset, data } => {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(full(root, path))
                .map_err(errno)?;
            f.write_all_at(data, *offset).map_err(errno)
        }
        Op::SetAttr {
            node: NodeRef::Path(path),
            set,
        } => {
            let f = full(root, path);
            if let Some(m) = set.mode {
                fs::set_permissions(&f, fs::Permissions::from_mode(m & 0o7777)).map_err(errno)?;
            }
            assert!(set.uid.is_none() && set.gid.is_none());
            if let Some(size) = set.size {
                OpenOptions::new()
                    .write(true)
                    .open(&f)
                    .and_then(|h| h.set_len(size))
                    .map_err(errno)?;
            }
            if set.atime.is_some() || set.mtime.is_some() {
                set_times(&f, set.atime, set.mtime)?;
            }
            Ok(())
        }
        Op::PutFile {
            path,
            data,
            compressed,
            mode,
            mtime,
            atomic,
            keep_mode,
        } => {
            let data = if *compressed {
                kmount_proto::tree::decompress(data, 1 << 30).map_err(|_| libc::EINVAL)?
            } else {
                data.clone()
            };
            let f = full(root, path);
            if *atomic {
                // As the agent does it: a new file beside it, renamed over it.
                assert!(!keep_mode);
                let tmp = f.with_file_name(".put.tmp");
                fs::write(&tmp, &data).map_err(errno)?;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
                if let Some(t) = mtime {
                    set_times(&tmp, None, Some(SetTime::At(*t)))?;
                }
                return fs::rename(&tmp, &f).map_err(|e| {
                    let _ = fs::remove_file(&tmp);
                    errno(e)
                });
            }
            let existed = f.symlink_metadata().is_ok();
            let h = open_new_or_existing(&f, libc::O_TRUNC, *mode)?;
            h.write_all_at(&data, 0).map_err(errno)?;
            if !(*keep_mode && existed) {
                h.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            if let Some(t) = mtime {
                set_times(&f, None, Some(SetTime::At(*t)))?;
            }
            Ok(())
        }
        Op::Rename { from, to, flags: 0 } => {
            fs::rename(full(root, from), full(root, to)).map_err(errno)
        }
        Op::Unlink { path } => fs::remove_file(full(root, path)).map_err(errno),
        Op::Mkdir { path, mode } => {
            let f = full(root, path);
            fs::create_dir(&f).map_err(errno)?;
            fs::set_permissions(&f, fs::Permissions::from_mode(mode & 0o7777)).map_err(errno)
        }
        Op::Rmdir { path } => fs::remove_dir(full(root, path)).map_err(errno),
        other => panic!("the test applier does not do {other:?}"),
    }
}

/// Times at or after this are "now" (from a write), compared only loosely.
const EXPLICIT_BEFORE: i64 = 1_500_000_000;

#[derive(Debug, PartialEq, Eq)]
struct NodeState {
    kind: u32,
    perm: u32,
    size: u64,
    content: Option<Vec<u8>>,
    /// Only explicit (old) mtimes; a write's "now" differs between runs.
    mtime: Option<(i64, i64)>,
}

fn snapshot(root: &Path) -> BTreeMap<String, NodeState> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, NodeState>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for path in names {
            let m = fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let content = m.is_file().then(|| fs::read(&path).unwrap());
            out.insert(
                rel,
                NodeState {
                    kind: m.mode() & libc::S_IFMT,
                    perm: m.mode() & 0o7777,
                    size: if m.is_dir() { 0 } else { m.size() },
                    content,
                    mtime: (m.mtime() < EXPLICIT_BEFORE).then(|| (m.mtime(), m.mtime_nsec())),
                },
            );
            if m.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

// ---- random operation sequences ----

const FILES: [&str; 4] = ["a", "b", "d/a", "d/b"];

#[derive(Debug, Clone)]
enum Tail {
    Mode(u32),
    Mtime(i64),
    MtimeNow,
    Atime(i64),
    Size(u64),
}

#[derive(Debug, Clone)]
enum Action {
    /// Create (unlinking first when the path exists) then write sequentially from
    /// `first_offset`, then set attributes, then maybe write more.
    NewFile {
        file: usize,
        excl: bool,
        trunc: bool,
        mode: u32,
        first_offset: u64,
        writes: Vec<Vec<u8>>,
        tail: Vec<Tail>,
        more: Vec<Vec<u8>>,
    },
    /// Writes, each starting `back` bytes before the previous one ended.
    Writes {
        file: usize,
        offset: u64,
        back: u64,
        chunks: Vec<Vec<u8>>,
    },
    Attr {
        file: usize,
        tail: Tail,
    },
    /// A save in place of an existing file: truncate to 0 (`open(O_TRUNC)`), write from 0 on,
    /// then set attributes.
    Save {
        file: usize,
        chunks: Vec<Vec<u8>>,
        tail: Vec<Tail>,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Unlink {
        file: usize,
    },
    Mkdir,
    Rmdir,
}

impl Action {
    /// Actions that only change their own file, so they can be interleaved with another such
    /// action on a different file without changing each other's preconditions.
    fn own_file(&self) -> Option<usize> {
        match self {
            Action::NewFile { file, .. }
            | Action::Writes { file, .. }
            | Action::Attr { file, .. }
            | Action::Save { file, .. } => Some(*file),
            _ => None,
        }
    }
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), any::<u8>()], 0..300),
        1 => (any::<u8>(), 1000usize..3000).prop_map(|(b, n)| vec![b; n]),
    ]
}

fn tail() -> impl Strategy<Value = Tail> {
    prop_oneof![
        prop_oneof![
            Just(0o644u32),
            Just(0o600),
            Just(0o755),
            Just(0o4755),
            Just(0o444)
        ]
        .prop_map(Tail::Mode),
        (1_000_000_000i64..1_100_000_000).prop_map(Tail::Mtime),
        Just(Tail::MtimeNow),
        (1_000_000_000i64..1_100_000_000).prop_map(Tail::Atime),
        (0u64..800).prop_map(Tail::Size),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    let file = 0..FILES.len();
    prop_oneof![
        4 => (
            file.clone(),
            any::<bool>(),
            any::<bool>(),
            prop_oneof![Just(0o644u32), Just(0o600), Just(0o755), Just(0o2755)],
            prop_oneof![9 => Just(0u64), 1 => 1u64..100],
            proptest::collection::vec(bytes(), 0..5),
            proptest::collection::vec(tail(), 0..3),
            proptest::collection::vec(bytes(), 0..2),
        )
            .prop_map(|(file, excl, trunc, mode, first_offset, writes, tail, more)| {
                Action::NewFile { file, excl, trunc, mode, first_offset, writes, tail, more }
            }),
        2 => (
            file.clone(),
            0u64..700,
            prop_oneof![3 => Just(0u64), 1 => 1u64..4],
            proptest::collection::vec(bytes(), 1..4),
        )
            .prop_map(|(file, offset, back, chunks)| Action::Writes { file, offset, back, chunks }),
        1 => (file.clone(), tail()).prop_map(|(file, tail)| Action::Attr { file, tail }),
        2 => (
            file.clone(),
            proptest::collection::vec(bytes(), 0..4),
            proptest::collection::vec(tail(), 0..2),
        )
            .prop_map(|(file, chunks, tail)| Action::Save { file, chunks, tail }),
        1 => (file.clone(), file.clone()).prop_map(|(from, to)| Action::Rename { from, to }),
        1 => file.prop_map(|file| Action::Unlink { file }),
        1 => Just(Action::Mkdir),
        1 => Just(Action::Rmdir),
    ]
}

fn tail_op(path: &str, t: &Tail) -> Op {
    let at = |s: i64| Some(SetTime::At(Timespec { sec: s, nsec: 123 }));
    match t {
        Tail::Mode(m) => chmod(path, *m),
        Tail::Mtime(s) => set_mtime(path, at(*s), None),
        Tail::MtimeNow => set_mtime(path, Some(SetTime::Now), None),
        Tail::Atime(s) => set_mtime(path, at(*s + 1), at(*s)),
        Tail::Size(n) => Op::SetAttr {
            node: NodeRef::Path(p(path)),
            set: SetAttr {
                size: Some(*n),
                ..SetAttr::default()
            },
        },
    }
}

/// The operations for `a`, as the core would journal them given the state of `root`.
fn expand(root: &Path, a: &Action) -> Vec<Op> {
    let mut ops = Vec::new();
    match a {
        Action::NewFile {
            file,
            excl,
            trunc,
            mode,
            first_offset,
            writes,
            tail,
            more,
        } => {
            let path = FILES[*file];
            if fs::symlink_metadata(full(root, &p(path))).is_ok() {
                // A journaled Create always names a path absent at that point.
                ops.push(Op::Unlink { path: p(path) });
            }
            let mut flags = 0;
            if *excl {
                flags |= libc::O_EXCL;
            }
            if *trunc {
                flags |= libc::O_TRUNC;
            }
            ops.push(create(path, flags, *mode));
            let mut off = *first_offset;
            for w in writes {
                ops.push(write(path, off, w));
                off += w.len() as u64;
            }
            ops.extend(tail.iter().map(|t| tail_op(path, t)));
            for w in more {
                ops.push(write(path, off, w));
                off += w.len() as u64;
            }
        }
        Action::Writes {
            file,
            offset,
            back,
            chunks,
        } => {
            let mut off = *offset;
            for c in chunks {
                ops.push(write(FILES[*file], off, c));
                off = (off + c.len() as u64).saturating_sub(*back);
            }
        }
        Action::Attr { file, tail } => ops.push(tail_op(FILES[*file], tail)),
        Action::Save { file, chunks, tail } => {
            let path = FILES[*file];
            if fs::symlink_metadata(full(root, &p(path))).is_ok_and(|m| m.is_file()) {
                ops.push(Op::SetAttr {
                    node: NodeRef::Path(p(path)),
                    set: SetAttr {
                        size: Some(0),
                        ..SetAttr::default()
                    },
                });
                let mut off = 0;
                for c in chunks {
                    ops.push(write(path, off, c));
                    off += c.len() as u64;
                }
                ops.extend(tail.iter().map(|t| tail_op(path, t)));
            }
        }
        Action::Rename { from, to } => ops.push(Op::Rename {
            from: p(FILES[*from]),
            to: p(FILES[*to]),
            flags: 0,
        }),
        Action::Unlink { file } => ops.push(Op::Unlink {
            path: p(FILES[*file]),
        }),
        Action::Mkdir => ops.push(Op::Mkdir {
            path: p("d"),
            mode: 0o755,
        }),
        Action::Rmdir => ops.push(Op::Rmdir { path: p("d") }),
    }
    ops
}

/// Merges two op lists, keeping each one's order; `mask` picks the source of each slot.
fn interleave(a: Vec<Op>, b: Vec<Op>, mut mask: u64) -> Vec<Op> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    while a.peek().is_some() || b.peek().is_some() {
        let take_a = b.peek().is_none() || (a.peek().is_some() && mask & 1 == 0);
        mask = mask.rotate_right(1);
        out.push(if take_a { a.next() } else { b.next() }.unwrap());
    }
    out
}

fn run(root: &Path, ops: impl IntoIterator<Item = Op>) {
    for op in ops {
        let _ = apply(root, &op);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn coalesced_batches_give_the_same_tree(
        start_with_dir in any::<bool>(),
        actions in proptest::collection::vec((action(), any::<bool>(), any::<u64>()), 1..24),
        split in any::<prop::sample::Index>(),
    ) {
        let raw_dir = tempfile::tempdir().unwrap();
        let raw = raw_dir.path();
        let mut ops = Vec::new();
        if start_with_dir {
            ops.push(Op::Mkdir { path: p("d"), mode: 0o755 });
            run(raw, ops.clone());
        }
        // Expand against the raw directory as it is at that point, applying as we go.
        let mut i = 0;
        while i < actions.len() {
            let (a, mix, mask) = &actions[i];
            let group = match actions.get(i + 1) {
                Some((b, _, _)) if *mix
                    && a.own_file().is_some()
                    && b.own_file().is_some()
                    && a.own_file() != b.own_file() =>
                {
                    i += 2;
                    interleave(expand(raw, a), expand(raw, b), *mask)
                }
                _ => {
                    i += 1;
                    expand(raw, a)
                }
            };
            run(raw, group.clone());
            ops.extend(group);
        }
        let recs = records(ops);
        let want = snapshot(raw);

        // From the start.
        let batches = coalesce(&recs);
        check_partition(&recs, &batches);
        prop_assert!(batches.len() <= recs.len());
        let co_dir = tempfile::tempdir().unwrap();
        run(co_dir.path(), batches.iter().map(|b| b.op.clone()));
        prop_assert_eq!(&snapshot(co_dir.path()), &want);

        // From any point the agent may have applied up to: raw records to there, then the
        // rest coalesced afresh (what the sender does after a reconnect).
        let k = split.index(recs.len() + 1);
        let resumed_dir = tempfile::tempdir().unwrap();
        run(resumed_dir.path(), recs[..k].iter().map(|r| r.op.clone()));
        let rest = coalesce(&recs[k..]);
        check_partition(&recs[k..], &rest);
        run(resumed_dir.path(), rest.into_iter().map(|b| b.op));
        prop_assert_eq!(&snapshot(resumed_dir.path()), &want);
    }
}

#[test]
fn a_save_in_place_becomes_one_put_file_keeping_the_mode() {
    let trunc = Op::SetAttr {
        node: NodeRef::Path(p("f")),
        set: SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
    };
    let b = coalesce(&records(vec![
        trunc.clone(),
        write("f", 0, b"hello "),
        write("f", 6, b"world"),
    ]));
    assert_eq!(ranges(&b), vec![(100, 102)]);
    match &b[0].op {
        Op::PutFile {
            atomic: false,
            keep_mode: true,
            ..
        } => {}
        other => panic!("expected an in-place PutFile keeping the mode, got {other:?}"),
    }
    assert_eq!(put_data(&b[0].op).0, b"hello world");
    // With a chmod after it, the mode is the chmod's.
    let b = coalesce(&records(vec![
        trunc.clone(),
        write("f", 0, b"x"),
        chmod("f", 0o600),
    ]));
    assert_eq!(ranges(&b), vec![(100, 102)]);
    assert!(matches!(
        b[0].op,
        Op::PutFile {
            mode: 0o600,
            keep_mode: false,
            ..
        }
    ));
    // A truncation alone stays one.
    let b = coalesce(&records(vec![trunc.clone(), chmod("f", 0o600)]));
    assert_eq!(ranges(&b), vec![(100, 100), (101, 101)]);
}

#[test]
fn a_file_removed_and_made_again_is_replaced_in_one_step() {
    let put = |atomic| Op::PutFile {
        path: p("x"),
        data: b"new".to_vec(),
        compressed: false,
        mode: 0o640,
        mtime: None,
        atomic,
        keep_mode: false,
    };
    // JetBrains with write-back: `x` -> `x___jb_old___` (local-only), tmp -> `x`.
    let b = coalesce(&records(vec![Op::Unlink { path: p("x") }, put(true)]));
    assert_eq!(ranges(&b), vec![(100, 101)]);
    assert_eq!(b[0].op, put(true));
    // vim with write-back: `x` -> `x~` (local-only), then a new `x` written.
    let b = coalesce(&records(vec![
        Op::Unlink { path: p("x") },
        create("x", libc::O_EXCL, 0o640),
        write("x", 0, b"new"),
    ]));
    assert_eq!(ranges(&b), vec![(100, 102)]);
    assert!(
        matches!(&b[0].op, Op::PutFile { path, data, mode: 0o640, atomic: true, .. }
            if path == &p("x") && data == b"new"),
        "{:?}",
        b[0].op
    );
    // Not merged: another path, an in-place PutFile, a Create without a write.
    for next in [
        Op::PutFile {
            path: p("y"),
            data: b"new".to_vec(),
            compressed: false,
            mode: 0o640,
            mtime: None,
            atomic: true,
            keep_mode: false,
        },
        put(false),
        create("x", libc::O_EXCL, 0o640),
    ] {
        let b = coalesce(&records(vec![Op::Unlink { path: p("x") }, next]));
        assert_eq!(ranges(&b), vec![(100, 100), (101, 101)]);
    }
}
