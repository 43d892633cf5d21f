//! Tree walks and digests against real directories.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;
use std::time::Instant;

use kmount_proto::digest::{Child, dir_digest};
use kmount_proto::{Done, Op, RelPath, TreeEntry};

use super::*;
use crate::walk;

/// Every entry of a walk of `path`, batch by batch.
fn walk_batches(fx: &Fx, path: &str, max: u32) -> Vec<Vec<TreeEntry>> {
    let h = fx.handle(Op::WalkOpen { path: p(path) });
    let mut out = Vec::new();
    loop {
        match fx.ok(Op::WalkNext { handle: h, max }) {
            Done::Tree { zstd, count, eof } => {
                let batch = kmount_proto::tree::decode_entries(&zstd).unwrap();
                assert_eq!(batch.len(), count as usize);
                assert!(batch.len() <= max as usize);
                out.push(batch);
                if eof {
                    break;
                }
            }
            other => panic!("expected Tree, got {other:?}"),
        }
    }
    out
}

pub(super) fn walk_all(fx: &Fx, path: &str, max: u32) -> Vec<TreeEntry> {
    walk_batches(fx, path, max).into_iter().flatten().collect()
}

/// path -> (mode, ino, size, symlink target)
type Model = BTreeMap<String, (u32, u64, u64, Option<Vec<u8>>)>;

/// The tree below `dir` as `lstat` sees it, without following symlinks.
fn model(dir: &Path, prefix: &str) -> Model {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let m = lstat(&e.path());
        let target = m.file_type().is_symlink().then(|| {
            use std::os::unix::ffi::OsStrExt;
            fs::read_link(e.path())
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec()
        });
        out.insert(rel.clone(), (m.mode(), m.ino(), m.size(), target));
        if m.is_dir() {
            out.extend(model(&e.path(), &rel));
        }
    }
    out
}

fn as_model(entries: &[TreeEntry]) -> Model {
    entries
        .iter()
        .map(|e| {
            (
                String::from_utf8(e.path.as_bytes().to_vec()).unwrap(),
                (e.attr.mode, e.attr.ino, e.attr.size, e.symlink.clone()),
            )
        })
        .collect()
}

/// Every directory before its children, every path once.
#[track_caller]
fn assert_parents_first(entries: &[TreeEntry], start: &RelPath) {
    let mut seen: HashSet<&RelPath> = HashSet::new();
    for e in entries {
        let (parent, _) = e.path.split_last().unwrap();
        assert!(
            parent == *start || seen.contains(&parent),
            "{} came before its parent",
            e.path
        );
        assert!(seen.insert(&e.path), "{} twice", e.path);
    }
}

/// Directory digests computed the way the mount computes them: from walk entries only.
pub(super) fn digests_from(entries: &[TreeEntry], start: &RelPath) -> BTreeMap<RelPath, [u8; 16]> {
    let mut children: HashMap<RelPath, Vec<&TreeEntry>> = HashMap::new();
    let mut dirs = vec![start.clone()];
    for e in entries {
        children
            .entry(e.path.split_last().unwrap().0)
            .or_default()
            .push(e);
        if e.attr.is_dir() {
            dirs.push(e.path.clone());
        }
    }
    // Deepest first, so each subdirectory is done before its parent.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let mut out = BTreeMap::new();
    for d in dirs {
        let kids = children.get(&d).map(Vec::as_slice).unwrap_or(&[]);
        let mut list: Vec<Child<'_>> = kids
            .iter()
            .map(|e| Child {
                name: e.path.split_last().unwrap().1,
                attr: &e.attr,
                symlink: e.symlink.as_deref(),
                subdir: e.attr.is_dir().then(|| out[&e.path]),
            })
            .collect();
        let digest = dir_digest(&mut list);
        out.insert(d, digest);
    }
    out
}

pub(super) fn digests(fx: &Fx, path: &str, depth: u32) -> Vec<(RelPath, [u8; 16])> {
    match fx.ok(Op::Digest {
        path: p(path),
        depth,
    }) {
        Done::Digests(d) => d.into_iter().map(|d| (d.path, d.digest)).collect(),
        other => panic!("expected Digests, got {other:?}"),
    }
}

#[test]
fn a_walk_reports_the_whole_tree_parents_first_in_bounded_batches() {
    let fx = Fx::new();
    make_tree(&fx.root(), 600);
    symlink(fx.outside(), fx.at("escape")).unwrap();
    fs::write(fx.outside().join("secret"), b"s").unwrap();
    // SAFETY: path is NUL-terminated.
    let fifo = std::ffi::CString::new(fx.at("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    for (label, kernel) in kernels() {
        let fx2 = Fx::with(kernel());
        make_tree(&fx2.root(), 40);
        let all = walk_all(&fx2, "", 7);
        assert_eq!(as_model(&all), model(&fx2.root(), ""), "{label}");
    }
    let before = fx.agent.handles.count();
    let batches = walk_batches(&fx, "", 50);
    assert!(batches.len() > 10);
    let all: Vec<TreeEntry> = batches.into_iter().flatten().collect();
    assert_parents_first(&all, &RelPath::root());
    assert_eq!(as_model(&all), model(&fx.root(), ""));
    let escape = all.iter().find(|e| e.path == p("escape")).unwrap();
    assert_eq!(escape.attr.file_type(), libc::S_IFLNK);
    assert_eq!(
        escape.symlink.as_deref(),
        Some(fx.outside().to_str().unwrap().as_bytes())
    );
    assert!(
        !all.iter()
            .any(|e| e.path.as_bytes().starts_with(b"escape/"))
    );
    // Exact attributes, as lstat has them.
    for e in all.iter().step_by(37) {
        let m = lstat(&fx.at(std::str::from_utf8(e.path.as_bytes()).unwrap()));
        assert_eq!(
            (e.attr.ino, e.attr.mtime.sec, e.attr.mtime.nsec as i64),
            (m.ino(), m.mtime(), m.mtime_nsec())
        );
        assert_eq!(
            (e.attr.ctime.sec, e.attr.ctime.nsec as i64),
            (m.ctime(), m.ctime_nsec())
        );
    }
    // The last batch closed the handle; a late request still gets a clean end.
    assert_eq!(fx.agent.handles.count(), before);
    let h = match fx.ok(Op::WalkOpen { path: p("") }) {
        Done::Handle(h) => h,
        other => panic!("{other:?}"),
    };
    while !matches!(
        fx.ok(Op::WalkNext {
            handle: h,
            max: 100_000
        }),
        Done::Tree { eof: true, .. }
    ) {}
    assert!(matches!(
        fx.ok(Op::WalkNext { handle: h, max: 10 }),
        Done::Tree {
            count: 0,
            eof: true,
            ..
        }
    ));
    assert_eq!(
        fx.errno(Op::WalkNext {
            handle: 999_999,
            max: 10
        }),
        libc::EBADF
    );
    assert_eq!(fx.errno(Op::WalkNext { handle: h, max: 0 }), libc::EINVAL);
}

#[test]
fn a_walk_of_a_subdirectory_uses_paths_from_the_root() {
    let fx = Fx::new();
    make_tree(&fx.root(), 100);
    let all = walk_all(&fx, "node_modules/pkg0", 1000);
    assert_parents_first(&all, &p("node_modules/pkg0"));
    assert_eq!(
        as_model(&all),
        model(&fx.at("node_modules/pkg0"), "node_modules/pkg0")
    );
    assert!(!all.iter().any(|e| e.path == p("node_modules/pkg0")));
    fs::write(fx.at("file"), b"").unwrap();
    symlink("node_modules", fx.at("link")).unwrap();
    assert_eq!(fx.errno(Op::WalkOpen { path: p("file") }), libc::ENOTDIR);
    assert!([libc::ELOOP, libc::ENOTDIR].contains(&fx.errno(Op::WalkOpen { path: p("link") })));
    assert_eq!(fx.errno(Op::WalkOpen { path: p("nope") }), libc::ENOENT);
    assert_eq!(
        fx.errno(Op::WalkOpen {
            path: p("link/pkg0")
        }),
        libc::ELOOP
    );
}

#[test]
fn a_walk_skips_what_vanishes_and_never_follows_a_swapped_in_symlink() {
    let fx = Fx::new();
    for i in 0..5 {
        fs::create_dir(fx.at(&format!("d{i}"))).unwrap();
        fs::write(fx.at(&format!("d{i}/f")), b"x").unwrap();
    }
    fs::write(fx.outside().join("f"), b"secret").unwrap();
    let h = fx.handle(Op::WalkOpen { path: p("") });
    let Done::Tree {
        zstd,
        count: 5,
        eof: false,
    } = fx.ok(Op::WalkNext { handle: h, max: 5 })
    else {
        panic!("expected the five directories first")
    };
    let first = kmount_proto::tree::decode_entries(&zstd).unwrap();
    assert!(first.iter().all(|e| e.attr.is_dir()));
    // Now, before their turn: one directory vanishes, one becomes a symlink leading out.
    fs::remove_dir_all(fx.at("d3")).unwrap();
    fs::rename(fx.at("d4"), fx.at("d4.old")).unwrap();
    symlink(fx.outside(), fx.at("d4")).unwrap();
    let Done::Tree {
        zstd, eof: true, ..
    } = fx.ok(Op::WalkNext {
        handle: h,
        max: 100,
    })
    else {
        panic!("expected the rest")
    };
    let rest: Vec<String> = kmount_proto::tree::decode_entries(&zstd)
        .unwrap()
        .iter()
        .map(|e| e.path.to_string())
        .collect();
    let mut rest = rest;
    rest.sort();
    assert_eq!(rest, ["d0/f", "d1/f", "d2/f"]);
}

#[test]
fn walk_batches_follow_ticket_order_whatever_order_the_workers_run() {
    let fx = Fx::new();
    for i in 0..6 {
        fs::write(fx.at(&format!("f{i}")), b"").unwrap();
    }
    let reference: Vec<RelPath> = walk_all(&fx, "", 1).into_iter().map(|e| e.path).collect();
    assert_eq!(reference.len(), 6);
    let Done::Handle(h) = fx.ok(Op::WalkOpen { path: p("") }) else {
        panic!()
    };
    let tickets: Vec<_> = (0..8)
        .map(|_| walk::ticket(&fx.agent, h).unwrap())
        .collect();
    let mut tickets: Vec<_> = tickets.into_iter().map(Some).collect();
    // Ticket 2 is abandoned (its request never reached the walk): the others go on.
    drop(tickets[2].take());
    let got = std::sync::Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for (i, t) in tickets.into_iter().enumerate().rev() {
            let Some(t) = t else { continue };
            let (fx, got) = (&fx, &got);
            s.spawn(move || {
                // Later tickets start first.
                std::thread::sleep(std::time::Duration::from_millis(10 * (8 - i as u64)));
                let d = crate::ops::walk_next(&fx.agent, h, 1, Some(t)).unwrap();
                let Done::Tree { zstd, eof, .. } = d else {
                    panic!()
                };
                let e = kmount_proto::tree::decode_entries(&zstd).unwrap();
                got.lock()
                    .unwrap()
                    .insert(i, (e.first().map(|e| e.path.clone()), eof));
            });
        }
    });
    let got = got.into_inner().unwrap();
    let order: Vec<usize> = vec![0, 1, 3, 4, 5, 6];
    for (k, i) in order.iter().enumerate() {
        assert_eq!(got[i].0.as_ref(), reference.get(k), "ticket {i}");
    }
    assert!(got[&6].1, "the batch with the last entry ends the walk");
    assert_eq!(
        got[&7],
        (None, true),
        "a request after the end gets an empty eof"
    );
}

#[test]
fn digests_match_what_the_mount_computes_from_a_walk() {
    let fx = Fx::new();
    make_tree(&fx.root(), 500);
    fs::create_dir_all(fx.at("deep/er/and/deeper")).unwrap();
    fs::write(fx.at("deep/er/and/deeper/f"), b"x").unwrap();
    let all = walk_all(&fx, "", 10_000);
    let expected = digests_from(&all, &RelPath::root());
    let got: BTreeMap<RelPath, [u8; 16]> = digests(&fx, "", u32::MAX).into_iter().collect();
    assert_eq!(got, expected);
    // Sorted by path, the digested directory first; depth limits which ones are listed.
    let d0 = digests(&fx, "", 0);
    assert_eq!(d0, vec![(RelPath::root(), expected[&RelPath::root()])]);
    let d1 = digests(&fx, "", 1);
    let want1: Vec<RelPath> = std::iter::once(RelPath::root())
        .chain(
            all.iter()
                .filter(|e| e.attr.is_dir() && e.path.components().count() == 1)
                .map(|e| e.path.clone()),
        )
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(d1.iter().map(|d| d.0.clone()).collect::<Vec<_>>(), want1);
    // A subtree's digest is the same whether asked for directly or as part of its parent.
    let sub = digests(&fx, "node_modules/pkg1", 0);
    assert_eq!(sub[0].1, expected[&p("node_modules/pkg1")]);
}

#[test]
fn a_change_deep_down_changes_every_ancestor_and_nothing_else() {
    let fx = Fx::new();
    make_tree(&fx.root(), 300);
    let before: BTreeMap<RelPath, [u8; 16]> = digests(&fx, "", 99).into_iter().collect();
    let target = "node_modules/pkg1/lib/sub3/file4.js";
    fs::write(fx.at(target), b"changed!").unwrap();
    let after: BTreeMap<RelPath, [u8; 16]> = digests(&fx, "", 99).into_iter().collect();
    let changed: Vec<String> = before
        .iter()
        .filter(|(k, v)| after[*k] != **v)
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(
        changed,
        [
            ".",
            "node_modules",
            "node_modules/pkg1",
            "node_modules/pkg1/lib",
            "node_modules/pkg1/lib/sub3"
        ]
    );
    // Reading a file (atime) changes nothing.
    let _ = fs::read(fx.at("node_modules/pkg0/lib/sub0/file0.js")).unwrap();
    let again: BTreeMap<RelPath, [u8; 16]> = digests(&fx, "", 99).into_iter().collect();
    assert_eq!(again, after);
    assert_eq!(
        fx.errno(Op::Digest {
            path: p("nope"),
            depth: 0
        }),
        libc::ENOENT
    );
}

/// Not a benchmark, a budget: the agent must walk and digest a 24,000-file tree quickly.
/// (Run with `--release` for the figures in the docs; debug builds are several times slower.)
#[test]
fn walk_and_digest_of_24000_files_stay_fast() {
    let fx = Fx::big();
    make_tree(&fx.root(), 24_000);
    let t = Instant::now();
    let all = walk_all(&fx, "", 4096);
    let walk = t.elapsed();
    assert!(all.len() > 24_000);
    let t = Instant::now();
    let d = digests(&fx, "", 2);
    let digest = t.elapsed();
    assert!(!d.is_empty());
    eprintln!(
        "walk of {} entries: {walk:?}; digest: {digest:?} ({})",
        all.len(),
        if cfg!(debug_assertions) {
            "debug build"
        } else {
            "release build"
        }
    );
    let budget = if cfg!(debug_assertions) { 10 } else { 1 };
    assert!(walk.as_secs() < budget, "walk took {walk:?}");
    assert!(digest.as_secs() < budget, "digest took {digest:?}");
}
