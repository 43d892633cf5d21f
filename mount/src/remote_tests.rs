use super::*;
use crate::invalidate::Inval;
use kmount_proto::{Attr, Timespec};

const DEV: u64 = 42;

fn attr(ino: u64, kind: u32) -> Attr {
    Attr {
        ino,
        dev: DEV,
        mode: kind | 0o644,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        blocks: 0,
        blksize: 4096,
        atime: Timespec::default(),
        mtime: Timespec::default(),
        ctime: Timespec::default(),
    }
}

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

fn upsert(path: &str, ino: u64, kind: u32) -> Event {
    Event::Upsert {
        path: p(path),
        attr: attr(ino, kind),
        symlink: None,
    }
}

fn tree() -> Tree {
    let t = Tree::new(&attr(2, libc::S_IFDIR));
    t.lock().set_complete(ROOT_ID, true);
    t
}

fn names(t: &Tree, path: &str) -> Vec<String> {
    let t = t.lock();
    let id = t.resolve(&p(path)).unwrap();
    t.listing(id)
        .into_iter()
        .map(|l| String::from_utf8(l.name).unwrap())
        .collect()
}

#[test]
fn events_build_and_change_the_tree() {
    let t = tree();
    let mut fx = Effects::default();
    let rescans = apply_events(
        &mut t.lock(),
        vec![
            upsert("a", 10, libc::S_IFDIR),
            upsert("a/b", 11, libc::S_IFDIR),
            upsert("a/b/c", 12, libc::S_IFREG),
            upsert("f", 13, libc::S_IFREG),
        ],
        &mut fx,
        None,
    );
    assert!(rescans.is_empty());
    assert_eq!(names(&t, "a/b"), vec!["c"]);
    let rescans = apply_events(
        &mut t.lock(),
        vec![
            Event::Rename {
                from: p("a/b"),
                to: p("b2"),
            },
            Event::Remove { path: p("f") },
        ],
        &mut fx,
        None,
    );
    assert!(rescans.is_empty());
    assert_eq!(names(&t, ""), vec!["a", "b2"]);
    assert_eq!(names(&t, "b2"), vec!["c"]);
    assert!(t.lock().resolve(&p("a/b")).is_none());
}

#[test]
fn what_the_tree_cannot_follow_is_walked_again() {
    let t = tree();
    let mut fx = Effects::default();
    let rescans = apply_events(
        &mut t.lock(),
        vec![
            upsert("a", 10, libc::S_IFDIR),
            // parent unknown
            upsert("x/y/z", 20, libc::S_IFREG),
            // source unknown
            Event::Rename {
                from: p("nowhere"),
                to: p("a/moved"),
            },
            Event::Rescan {
                path: p("a/deep/er"),
                reason: "overflow".into(),
            },
        ],
        &mut fx,
        None,
    );
    // "x/y" and "a" collapse to their known ancestors: the root covers everything.
    assert_eq!(rescans, vec![RelPath::root()]);
    let rescans = minimal_roots(vec![p("a/b"), p("a"), p("c/d"), p("a/b/c"), p("ab")]);
    assert_eq!(rescans, vec![p("a"), p("ab"), p("c/d")]);
}

#[test]
fn only_nodes_the_kernel_holds_are_invalidated() {
    let t = tree();
    let mut fx = Effects::default();
    apply_events(
        &mut t.lock(),
        vec![upsert("f", 13, libc::S_IFREG)],
        &mut fx,
        None,
    );
    // the root is always known: its listing changed
    assert!(fx.inval.contains(&Inval::Inode {
        ino: ROOT_ID,
        data: true
    }));
    let f = t.child(ROOT_ID, b"f").unwrap();
    let mut changed = attr(13, libc::S_IFREG);
    changed.size = 5;
    let mut fx = Effects::default();
    apply_events(
        &mut t.lock(),
        vec![Event::Upsert {
            path: p("f"),
            attr: changed.clone(),
            symlink: None,
        }],
        &mut fx,
        None,
    );
    assert!(fx.inval.is_empty(), "{:?}", fx.inval);
    assert_eq!(fx.stale_content, vec![(DEV, 13)]);
    t.lock().count_lookup(f);
    changed.size = 6;
    let mut fx = Effects::default();
    apply_events(
        &mut t.lock(),
        vec![Event::Upsert {
            path: p("f"),
            attr: changed,
            symlink: None,
        }],
        &mut fx,
        None,
    );
    assert_eq!(fx.inval, vec![Inval::Inode { ino: f, data: true }]);
}

#[test]
fn removals_count_each_entry_once() {
    let t = tree();
    let mut fx = Effects::default();
    let mut build = vec![
        upsert("d", 10, libc::S_IFDIR),
        upsert("x", 11, libc::S_IFREG),
    ];
    for i in 0..50 {
        build.push(upsert(&format!("d/f{i}"), 100 + i, libc::S_IFREG));
    }
    apply_events(&mut t.lock(), build, &mut fx, None);
    // An rm -rf reports every file, then the directory: 51 entries, not 101.
    let mut rm: Vec<Event> = (0..50)
        .map(|i| Event::Remove {
            path: p(&format!("d/f{i}")),
        })
        .collect();
    rm.push(Event::Remove { path: p("d") });
    rm.push(Event::Remove { path: p("d") });
    rm.push(Event::Remove { path: p("missing") });
    assert_eq!(removals_in(&t.lock(), &rm, None), 51);
    rm.push(Event::Remove { path: p("x") });
    assert_eq!(removals_in(&t.lock(), &rm, None), 52);
    assert_eq!(
        removals_in(&t.lock(), &[upsert("y", 12, libc::S_IFREG)], None),
        0
    );
}

/// A file renamed here (`.tmp1` -> `w7`, applied there after a listing or an event was
/// taken) must not be moved back to its old name by that older word, nor lose its new name
/// to another file that got the same inode number.
#[test]
fn observations_older_than_a_local_change_do_not_move_its_node() {
    let t = tree();
    let mut fx = Effects::default();
    apply_events(
        &mut t.lock(),
        vec![
            upsert("d", 10, libc::S_IFDIR),
            upsert("d/.tmp1", 11, libc::S_IFREG),
        ],
        &mut fx,
        None,
    );
    let mut g = t.lock();
    let d = g.resolve(&p("d")).unwrap();
    let since = 5;
    // The local rename, after the observation's `since`.
    g.rename(d, b".tmp1", d, b"w7", false, &mut fx);
    let w7 = g.resolve(&p("d/w7")).unwrap();
    g.mark_touched(w7, since + 1);
    g.mark_touched(d, since + 1);
    let old = upsert("d/.tmp1", 11, libc::S_IFREG);
    assert!(g.takes_changed_node(d, b".tmp1", &attr(11, libc::S_IFREG), since));
    assert_eq!(
        predates_local_change(&g, &old, since),
        Some(vec![p("d/.tmp1")]),
        "looked at again rather than applied"
    );
    // Taken after the change: applied as it is.
    assert!(!g.takes_changed_node(d, b".tmp1", &attr(11, libc::S_IFREG), since + 1));
    assert_eq!(predates_local_change(&g, &old, since + 1), None);
    // A removal of the new name that predates the change is looked at again too.
    let gone = Event::Remove { path: p("d/w7") };
    assert_eq!(
        predates_local_change(&g, &gone, since),
        Some(vec![p("d/w7")])
    );
    assert_eq!(predates_local_change(&g, &gone, since + 1), None);
    // Elsewhere nothing changed: events apply.
    assert_eq!(
        predates_local_change(&g, &upsert("e", 12, libc::S_IFREG), since),
        None
    );
    drop(g);
    assert_eq!(names(&t, "d"), vec!["w7"]);
}

#[test]
fn events_for_paths_with_pending_local_changes_are_kept_to_look_at_later() {
    let t = tree();
    let mut fx = Effects::default();
    let pending = crate::local::PendingSet::new(vec![p("a"), p("d")]);
    let rescans = apply_events(
        &mut t.lock(),
        vec![
            upsert("a", 10, libc::S_IFREG),
            upsert("f", 13, libc::S_IFREG),
            Event::Remove { path: p("d/x") },
            Event::Rename {
                from: p("g"),
                to: p("a"),
            },
        ],
        &mut fx,
        Some(&pending),
    );
    assert!(rescans.is_empty());
    // Only the path no local change covers is applied now.
    assert_eq!(names(&t, ""), vec!["f"]);
    assert_eq!(fx.left_out, vec![p("a"), p("d/x"), p("g"), p("a")]);
}

#[test]
fn a_reported_file_change_with_the_same_attributes_still_drops_its_cached_bytes() {
    let t = tree();
    let mut fx = Effects::default();
    apply_events(
        &mut t.lock(),
        vec![upsert("f", 13, libc::S_IFREG)],
        &mut fx,
        None,
    );
    // Reported again, attributes unchanged (a write within the same clock tick, same size).
    let mut fx = Effects::default();
    apply_events(
        &mut t.lock(),
        vec![upsert("f", 13, libc::S_IFREG)],
        &mut fx,
        None,
    );
    assert_eq!(fx.stale_content, vec![(DEV, 13)]);
    // Not for a directory: its listing is not content.
    let mut fx = Effects::default();
    apply_events(
        &mut t.lock(),
        vec![upsert("d", 14, libc::S_IFDIR)],
        &mut fx,
        None,
    );
    apply_events(
        &mut t.lock(),
        vec![upsert("d", 14, libc::S_IFDIR)],
        &mut fx,
        None,
    );
    assert!(fx.stale_content.is_empty());
}

fn entry(path: &str, ino: u64, kind: u32, size: u64) -> TreeEntry {
    let mut a = attr(ino, kind);
    a.size = size;
    TreeEntry {
        path: p(path),
        attr: a,
        symlink: None,
    }
}

/// A listing taken before a watcher event was applied (a file listed between its creation and
/// its first write, applied after the write's event) keeps what the event said: the file does
/// not go back to empty, and a file the event made is not swept as unseen. A listing taken
/// after the event applies as usual.
#[test]
fn a_walk_older_than_an_event_keeps_what_the_event_said() {
    let t = tree();
    let mut fx = Effects::default();
    apply_events(
        &mut t.lock(),
        vec![
            upsert("d", 10, libc::S_IFDIR),
            upsert("d/f", 11, libc::S_IFREG),
        ],
        &mut fx,
        None,
    );
    let mut g = t.lock();
    let d = g.resolve(&p("d")).unwrap();
    g.set_complete(d, true);
    let asked = g.heard_seq();
    // While the walk is out: f is written (4000 bytes), g is made.
    let mut written = attr(11, libc::S_IFREG);
    written.size = 4000;
    apply_events(
        &mut g,
        vec![
            Event::Upsert {
                path: p("d/f"),
                attr: written,
                symlink: None,
            },
            upsert("d/g", 12, libc::S_IFREG),
        ],
        &mut fx,
        None,
    );
    // The walk saw f empty and no g.
    let mut walk = WalkApply::new(p("d"), d, 0, None, asked);
    walk.batch(&mut g, vec![entry("d/f", 11, libc::S_IFREG, 0)], &mut fx);
    walk.sweep(&mut g, &mut fx);
    let f = g.resolve(&p("d/f")).unwrap();
    assert_eq!(
        g.attr(f).unwrap().size,
        4000,
        "an older listing emptied the file"
    );
    assert!(
        g.resolve(&p("d/g")).is_some(),
        "an older listing swept a new file"
    );
    // A walk asked for now applies what it saw.
    let mut walk = WalkApply::new(p("d"), d, 0, None, g.heard_seq());
    walk.batch(&mut g, vec![entry("d/f", 11, libc::S_IFREG, 7)], &mut fx);
    walk.sweep(&mut g, &mut fx);
    assert_eq!(g.attr(f).unwrap().size, 7);
    assert!(g.resolve(&p("d/g")).is_none());
}

/// An entry a walk leaves alone because a local change of it is not applied yet is kept to be
/// looked at again once it is.
#[test]
fn a_walk_keeps_what_pending_changes_hid_to_look_at_later() {
    let t = tree();
    let mut g = t.lock();
    let mut fx = Effects::default();
    let pending = crate::local::PendingSet::new(vec![p("a")]);
    let mut walk = WalkApply::new(RelPath::root(), ROOT_ID, 0, Some(pending), 0);
    walk.batch(
        &mut g,
        vec![
            entry("a", 10, libc::S_IFREG, 5),
            entry("b", 11, libc::S_IFREG, 5),
        ],
        &mut fx,
    );
    assert!(g.resolve(&p("a")).is_none());
    assert!(g.resolve(&p("b")).is_some());
    assert_eq!(fx.left_out, vec![p("a")]);
}
