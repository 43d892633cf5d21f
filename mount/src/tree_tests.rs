use super::*;
use kmount_proto::Timespec;

const DEV: u64 = 42;
const F: u32 = libc::S_IFREG;
const D: u32 = libc::S_IFDIR;

fn attr(ino: u64, kind: u32) -> Attr {
    attr_on(DEV, ino, kind)
}

fn attr_on(dev: u64, ino: u64, kind: u32) -> Attr {
    Attr {
        ino,
        dev,
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

/// A tree in pass-through mode: nothing is complete, nodes live while the kernel holds them.
fn table() -> Tree {
    Tree::new(&attr(2, D))
}

/// A tree in whole-tree mode.
fn complete() -> Tree {
    let t = table();
    t.lock().set_complete(ROOT_ID, true);
    t
}

fn path(t: &Tree, id: u64) -> String {
    t.path(id).unwrap().to_string()
}

fn up(t: &Tree, parent: u64, name: &str, a: &Attr) -> (u64, Effects) {
    let mut fx = Effects::default();
    let id = t
        .lock()
        .upsert(parent, name.as_bytes(), a, None, false, &mut fx);
    (id, fx)
}

// --- the engine's inode-table rules, unchanged ---

#[test]
fn node_ids_are_remote_inode_numbers() {
    let t = table();
    let d = t.remember(ROOT_ID, b"d", &attr(100, D));
    assert_eq!(d, 100);
    let f = t.remember(d, b"f", &attr(101, F));
    assert_eq!(f, 101);
    assert_eq!(path(&t, f), "d/f");
    assert_eq!(path(&t, ROOT_ID), ".");
    assert_eq!(t.parent_of(f), d);
    assert_eq!(t.parent_of(ROOT_ID), ROOT_ID);
}

#[test]
fn lookup_counts_and_forget() {
    let t = table();
    for _ in 0..3 {
        assert_eq!(t.remember(ROOT_ID, b"f", &attr(7, F)), 7);
    }
    assert_eq!(t.lookup_count(7), Some(3));
    t.forget(7, 2);
    assert_eq!(t.lookup_count(7), Some(1));
    t.forget(7, 1);
    assert_eq!(t.lookup_count(7), None, "dropped at zero");
    assert_eq!(t.len(), 1);
    assert!(t.child(ROOT_ID, b"f").is_none());
    // The root is never dropped.
    t.forget(ROOT_ID, 100);
    assert_eq!(path(&t, ROOT_ID), ".");
}

#[test]
fn open_files_keep_a_forgotten_node() {
    let t = table();
    let f = t.remember(ROOT_ID, b"f", &attr(7, F));
    t.opened(f).unwrap();
    t.unlink(ROOT_ID, b"f");
    t.forget(f, 1);
    assert_eq!(t.lookup_count(f), Some(0));
    assert!(!t.is_linked(f));
    assert_eq!(t.path(f).unwrap_err().errno, libc::ENOENT);
    t.closed(f);
    assert_eq!(t.lookup_count(f), None);
    assert_eq!(t.opened(f).unwrap_err().errno, libc::ESTALE);
}

#[test]
fn hard_links_share_one_node() {
    let t = table();
    let d = t.remember(ROOT_ID, b"d", &attr(100, D));
    let two = Attr {
        nlink: 2,
        ..attr(7, F)
    };
    let a = t.remember(ROOT_ID, b"a", &two);
    let b = t.remember(d, b"b", &two);
    assert_eq!(a, b);
    assert_eq!(t.lookup_count(a), Some(2));
    assert_eq!(path(&t, a), "d/b", "the most recently confirmed name first");
    t.unlink(d, b"b");
    assert_eq!(path(&t, a), "a");
    t.unlink(ROOT_ID, b"a");
    assert!(t.path(a).is_err());
    assert_eq!(
        t.lookup_count(a),
        Some(2),
        "unlink does not drop kernel references"
    );
}

#[test]
fn rename_moves_the_link_and_drops_the_replaced_target() {
    let t = table();
    let d = t.remember(ROOT_ID, b"d", &attr(100, D));
    let f = t.remember(d, b"f", &attr(101, F));
    let g = t.remember(ROOT_ID, b"g", &attr(102, F));
    t.rename(d, b"f", ROOT_ID, b"g", false);
    assert_eq!(path(&t, f), "g");
    assert_eq!(t.child(ROOT_ID, b"g"), Some(f));
    assert_eq!(t.child(d, b"f"), None);
    assert!(t.path(g).is_err(), "the replaced target lost its name");
    t.forget(g, 1);
    assert_eq!(t.lookup_count(g), None);

    // Renaming a directory moves everything below it.
    let e = t.remember(d, b"e", &attr(103, F));
    t.rename(ROOT_ID, b"d", ROOT_ID, b"d2", false);
    assert_eq!(path(&t, e), "d2/e");
}

#[test]
fn rename_exchange_swaps() {
    let t = table();
    let a = t.remember(ROOT_ID, b"a", &attr(10, F));
    let d = t.remember(ROOT_ID, b"d", &attr(11, D));
    t.rename(ROOT_ID, b"a", ROOT_ID, b"d", true);
    assert_eq!(path(&t, a), "d");
    assert_eq!(path(&t, d), "a");
    assert_eq!(t.child(ROOT_ID, b"a"), Some(d));
    assert_eq!(t.child(ROOT_ID, b"d"), Some(a));
}

#[test]
fn rename_between_links_of_one_inode_changes_nothing() {
    let t = table();
    let two = Attr {
        nlink: 2,
        ..attr(10, F)
    };
    let a = t.remember(ROOT_ID, b"a", &two);
    t.remember(ROOT_ID, b"b", &two);
    t.rename(ROOT_ID, b"a", ROOT_ID, b"b", false);
    assert_eq!(t.child(ROOT_ID, b"a"), Some(a));
    assert_eq!(t.child(ROOT_ID, b"b"), Some(a));
}

#[test]
fn synthetic_ids_for_ambiguous_inode_numbers() {
    let t = table();
    // Inode 1 would be the root's node id.
    let one = t.remember(ROOT_ID, b"one", &attr(1, F));
    assert!(one >= SYNTHETIC_BASE);
    // Another filesystem: its numbers may repeat ours.
    let other = t.remember(ROOT_ID, b"mnt", &attr_on(DEV + 1, 50, D));
    assert!(other >= SYNTHETIC_BASE);
    assert_ne!(one, other);
    let same = t.remember(ROOT_ID, b"x", &attr(50, F));
    assert_eq!(same, 50, "same number on the root's device stays itself");
    // The number was reused for a different file type while the old node is alive.
    let reused = t.remember(ROOT_ID, b"y", &attr(50, D));
    assert!(reused >= SYNTHETIC_BASE);
    assert_eq!(path(&t, reused), "y");
    assert_eq!(path(&t, 50), "x");
    assert_eq!(t.peek(&attr(50, D)), reused);
    // A second name for the root (a bind mount) is not the root.
    let alias = t.remember(ROOT_ID, b"self", &attr(2, D));
    assert_ne!(alias, ROOT_ID);
    assert_eq!(path(&t, ROOT_ID), ".");
    // Forgetting the synthetic nodes frees them.
    t.forget(reused, 1);
    assert_eq!(t.lookup_count(reused), None);
    assert_eq!(t.lookup_count(50), Some(1));
}

#[test]
fn a_name_moves_to_the_node_the_remote_now_has_there() {
    let t = table();
    let old = t.remember(ROOT_ID, b"f", &attr(7, F));
    let new = t.remember(ROOT_ID, b"f", &attr(8, F));
    assert_eq!(t.child(ROOT_ID, b"f"), Some(new));
    assert!(t.path(old).is_err());
    // A directory seen under a new name moved: the old name is gone.
    let d = t.remember(ROOT_ID, b"d", &attr(9, D));
    t.remember(ROOT_ID, b"e", &attr(9, D));
    assert_eq!(path(&t, d), "e");
    assert_eq!(t.child(ROOT_ID, b"d"), None);
}

#[test]
fn a_reused_inode_number_does_not_alias_a_dead_node() {
    let t = table();
    // unlinked but still open (or not yet forgotten) in the kernel
    let old = t.remember(ROOT_ID, b"old", &attr(7, F));
    t.opened(old).unwrap();
    t.unlink(ROOT_ID, b"old");
    let new = t.remember(ROOT_ID, b"new", &attr(7, F));
    assert_ne!(new, old);
    assert!(new >= SYNTHETIC_BASE);
    assert_eq!(path(&t, new), "new");
    // a directory made where a removed one's number is still held by the kernel
    let d = t.remember(ROOT_ID, b"d", &attr(9, D));
    let d2 = t.remember_new(ROOT_ID, b"e", &attr(9, D));
    assert_ne!(d, d2);
    assert_eq!(path(&t, d), "d");
    assert_eq!(path(&t, d2), "e");
    // Once the old nodes are gone, the number is the node id again.
    t.closed(old);
    t.forget(old, 1);
    t.forget(new, 1);
    assert_eq!(t.remember(ROOT_ID, b"again", &attr(7, F)), 7);
}

#[test]
fn drop_first_link_after_a_stale_answer() {
    let t = table();
    let f = t.remember(ROOT_ID, b"f", &attr(7, F));
    t.drop_first_link(f);
    assert_eq!(t.child(ROOT_ID, b"f"), None);
    assert_eq!(t.lookup_count(f), Some(1));
}

// --- whole-tree mode ---

#[test]
fn a_complete_tree_keeps_nodes_the_kernel_never_saw() {
    let t = complete();
    let (d, _) = up(&t, ROOT_ID, "d", &attr(100, D));
    let (f, _) = up(&t, d, "f", &attr(101, F));
    assert!(
        t.lock().is_complete(d),
        "a directory in a complete one is complete"
    );
    assert_eq!(t.lookup_count(f), Some(0));
    assert_eq!(t.kernel_len(), 1, "only the root is held by the kernel");
    assert_eq!(path(&t, f), "d/f");
    // A lookup and its forget leave the node in the model.
    t.lock().count_lookup(f);
    t.forget(f, 1);
    assert_eq!(t.lookup_count(f), Some(0));
    assert_eq!(
        t.lock().resolve(&RelPath::new(b"d/f".to_vec()).unwrap()),
        Some(f)
    );
}

#[test]
fn removing_a_directory_takes_its_subtree_out_of_the_model() {
    let t = complete();
    let (d, _) = up(&t, ROOT_ID, "d", &attr(100, D));
    let (e, _) = up(&t, d, "e", &attr(101, D));
    let (f, _) = up(&t, e, "f", &attr(102, F));
    let (g, _) = up(&t, d, "g", &attr(103, F));
    // g has a second name outside the subtree
    let (g2, _) = up(&t, ROOT_ID, "g2", &attr(103, F));
    assert_eq!(g, g2);
    t.lock().count_lookup(f); // the kernel holds f
    t.lock().count_lookup(d);
    let mut fx = Effects::default();
    t.lock().remove(ROOT_ID, b"d", &mut fx);
    assert!(
        t.lock()
            .resolve(&RelPath::new(b"d".to_vec()).unwrap())
            .is_none()
    );
    assert_eq!(t.lookup_count(e), None, "dropped: nobody holds it");
    assert_eq!(t.lookup_count(f), Some(1), "kept while the kernel holds it");
    assert!(t.path(f).is_err(), "but without a name");
    assert_eq!(path(&t, g), "g2", "a hard link outside survives");
    assert!(fx.inval.contains(&Inval::Delete {
        parent: ROOT_ID,
        child: d,
        name: b"d".to_vec()
    }));
    assert!(fx.inval.contains(&Inval::Inode {
        ino: ROOT_ID,
        data: true
    }));
    t.forget(f, 1);
    t.forget(d, 1);
    assert_eq!(t.len(), 2, "root and g");
}

#[test]
fn attribute_updates_say_what_changed() {
    let t = complete();
    let (f, fx) = up(&t, ROOT_ID, "f", &attr(7, F));
    assert!(fx.refresh.contains(&ROOT_ID), "the parent's times changed");
    let mut a = attr(7, F);
    a.atime.sec = 5;
    let mut fx = Effects::default();
    assert_eq!(t.lock().update_attr(f, &a, None, &mut fx), Change::Attr);
    assert!(fx.inval.is_empty(), "the kernel does not hold f");
    t.lock().count_lookup(f);
    a.size = 10;
    let mut fx = Effects::default();
    assert_eq!(t.lock().update_attr(f, &a, None, &mut fx), Change::Content);
    assert_eq!(fx.inval, vec![Inval::Inode { ino: f, data: true }]);
    assert_eq!(fx.stale_content, vec![(DEV, 7)]);
    // while open: attributes only
    t.opened(f).unwrap();
    a.size = 11;
    let mut fx = Effects::default();
    t.lock().update_attr(f, &a, None, &mut fx);
    assert_eq!(
        fx.inval,
        vec![Inval::Inode {
            ino: f,
            data: false
        }]
    );
    let mut fx = Effects::default();
    assert_eq!(t.lock().update_attr(f, &a, None, &mut fx), Change::None);
    assert!(fx.is_empty());
}

#[test]
fn a_replaced_name_is_invalidated_not_deleted() {
    let t = complete();
    let (old, _) = up(&t, ROOT_ID, "f", &attr(7, F));
    t.lock().count_lookup(old);
    let (new, fx) = up(&t, ROOT_ID, "f", &attr(8, F));
    assert_ne!(old, new);
    assert!(fx.inval.contains(&Inval::Entry {
        parent: ROOT_ID,
        name: b"f".to_vec()
    }));
    assert!(!fx.inval.iter().any(|i| matches!(i, Inval::Delete { .. })));
    // remote rename over it: both names invalidated
    let (tmp, _) = up(&t, ROOT_ID, "tmp", &attr(9, F));
    let mut fx = Effects::default();
    t.lock()
        .rename(ROOT_ID, b"tmp", ROOT_ID, b"f", false, &mut fx);
    assert_eq!(t.child(ROOT_ID, b"f"), Some(tmp));
    assert_eq!(t.child(ROOT_ID, b"tmp"), None);
    for n in ["tmp", "f"] {
        assert!(fx.inval.contains(&Inval::Entry {
            parent: ROOT_ID,
            name: n.as_bytes().to_vec()
        }));
    }
}

#[test]
fn retain_children_removes_what_a_new_listing_lacks() {
    let t = complete();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        up(&t, ROOT_ID, n, &attr(10 + i as u64, F));
    }
    let keep: HashSet<Vec<u8>> = [b"b".to_vec()].into_iter().collect();
    t.lock()
        .retain_children(ROOT_ID, &keep, &mut Effects::default());
    let names: Vec<_> = t
        .lock()
        .listing(ROOT_ID)
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, vec![b"b".to_vec()]);
    assert_eq!(t.len(), 2);
}

#[test]
fn digests_match_a_direct_computation() {
    let t = complete();
    let (d, _) = up(&t, ROOT_ID, "d", &attr(100, D));
    let (_, _) = up(&t, d, "f", &attr(101, F));
    let mut fx = Effects::default();
    t.lock().upsert(
        ROOT_ID,
        b"l",
        &attr(102, libc::S_IFLNK),
        Some(b"d/f".to_vec()),
        false,
        &mut fx,
    );
    let all = t.lock().digests(ROOT_ID, &RelPath::root(), 5);
    assert_eq!(all.len(), 2);
    let fa = attr(101, F);
    let inner = dir_digest(&mut [Child {
        name: b"f",
        attr: &fa,
        symlink: None,
        subdir: None,
    }]);
    assert_eq!(all[1].path.as_bytes(), b"d");
    assert_eq!(all[1].digest, inner);
    let da = attr(100, D);
    let la = attr(102, libc::S_IFLNK);
    let outer = dir_digest(&mut [
        Child {
            name: b"d",
            attr: &da,
            symlink: None,
            subdir: Some(inner),
        },
        Child {
            name: b"l",
            attr: &la,
            symlink: Some(b"d/f"),
            subdir: None,
        },
    ]);
    assert_eq!(all[0].path, RelPath::root());
    assert_eq!(all[0].digest, outer);
    // depth 0: only the directory itself, same digest
    let top = t.lock().digests(ROOT_ID, &RelPath::root(), 0);
    assert_eq!(top.len(), 1);
    assert_eq!(top[0].digest, outer);
}

#[test]
fn a_moved_directory_keeps_its_subtree() {
    let t = complete();
    let (d, _) = up(&t, ROOT_ID, "d", &attr(100, D));
    let (f, _) = up(&t, d, "f", &attr(101, F));
    // The watcher saw the directory under a new name before the old one's removal.
    let (e, _) = up(&t, ROOT_ID, "e", &attr(100, D));
    assert_eq!(e, d);
    assert_eq!(path(&t, f), "e/f");
    assert!(t.lock().is_complete(e));
    assert_eq!(t.child(ROOT_ID, b"d"), None);
}

#[test]
fn a_directory_given_a_dead_files_number_takes_it_once_the_kernel_forgets_the_file() {
    let t = complete();
    let (file, _) = up(&t, ROOT_ID, "gone.txt", &attr(300, F));
    assert_eq!(file, 300);
    t.lock().count_lookup(file);
    // Removed remotely; ext4 gives its number to a new directory at once.
    t.lock()
        .remove(ROOT_ID, b"gone.txt", &mut Effects::default());
    let (dir, _) = up(&t, ROOT_ID, "dist", &attr(300, D));
    assert!(dir >= SYNTHETIC_BASE, "the kernel still holds node 300");
    let (child, _) = up(&t, dir, "bundle.js", &attr(301, F));
    t.lock().count_lookup(dir);
    let inval = t.forget(file, 1);
    assert_eq!(
        t.child(ROOT_ID, b"dist"),
        Some(300),
        "renumbered to its st_ino"
    );
    assert_eq!(path(&t, child), "dist/bundle.js");
    assert_eq!(
        t.canon(dir),
        300,
        "the kernel's old id forwards to the new one"
    );
    assert!(
        inval.iter().any(
            |i| matches!(i, Inval::Entry { parent, name } if *parent == ROOT_ID && name == b"dist")
        ),
        "{inval:?}"
    );
    // A request that took the old id before the renumber reaches the node (a JetBrains save:
    // the kernel forgot the old file while an open of the new one was under way).
    let t2 = t.lock();
    assert_eq!(t2.path(dir).unwrap().to_string(), "dist");
    assert_eq!(t2.child(dir, b"bundle.js"), Some(child));
    assert!(t2.is_complete(dir) == t2.is_complete(300));
    drop(t2);
    assert_eq!(
        t.lookup_count(dir),
        Some(1),
        "the kernel's reference stays with the old id"
    );
    assert_eq!(t.lookup_count(300), Some(0));
    t.lock().count_lookup(300);
    t.forget(dir, 1);
    assert_eq!(t.lookup_count(dir), None, "forgotten");
    assert_eq!(t.canon(dir), dir);
    assert_eq!(t.lookup_count(300), Some(1));
    assert_eq!(t.child(ROOT_ID, b"dist"), Some(300));
}

#[test]
fn a_file_with_one_link_has_one_name() {
    let t = complete();
    let (a, _) = up(&t, ROOT_ID, "a", &attr(40, F));
    // The remote says the same file (nlink 1) is at b now: it moved.
    let (b, fx) = up(&t, ROOT_ID, "b", &attr(40, F));
    assert_eq!(a, b);
    assert_eq!(t.child(ROOT_ID, b"a"), None);
    assert_eq!(path(&t, a), "b");
    let _ = fx;
    // With two links it is a hard link.
    let two = Attr {
        nlink: 2,
        ..attr(40, F)
    };
    up(&t, ROOT_ID, "c", &two);
    assert_eq!(t.child(ROOT_ID, b"b"), Some(a));
    assert_eq!(t.child(ROOT_ID, b"c"), Some(a));
}

/// A change's reply about a file, asked for before a watcher event about that file was
/// applied: the event wins unless the reply saw a later change time (the event was read
/// before the change was made). CI: a hard link made here and renamed there at once showed
/// the link's change time, not the rename's, for good.
#[test]
fn a_reply_older_than_an_event_does_not_undo_it() {
    let t = complete();
    let at = |ctime: i64, nlink: u64| Attr {
        ctime: Timespec {
            sec: ctime,
            nsec: 0,
        },
        nlink,
        ..attr(10, F)
    };
    let (f, _) = up(&t, ROOT_ID, "f", &at(100, 1));
    let asked = t.lock().heard_seq();
    assert!(
        !t.lock().heard_newer(f, &at(101, 2), asked),
        "nothing heard since"
    );
    // The rename there, heard while the link's reply was on its way.
    {
        let mut g = t.lock();
        let stamp = g.hear();
        g.update_attr(f, &at(103, 2), None, &mut Effects::default());
        g.set_heard(f, stamp);
    }
    let g = t.lock();
    assert!(g.heard_newer(f, &at(101, 2), asked), "the reply is older");
    assert!(
        g.heard_newer(f, &at(103, 2), asked),
        "a tie goes to the event"
    );
    assert!(!g.heard_newer(f, &at(104, 2), asked), "the reply is newer");
    assert!(
        !g.heard_newer(f, &attr_on(DEV, 11, F), asked),
        "another remote file"
    );
    let later = g.heard_seq();
    assert!(
        !g.heard_newer(f, &at(101, 2), later),
        "asked after the event"
    );
}
