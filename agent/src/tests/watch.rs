//! The watcher and echo suppression, against real directories and real inotify.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, symlink};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmount_proto::{Attr, Done, Event, NodeRef, Op, SetAttr};

use super::*;
use crate::watch::{COALESCE, Sink, Watcher};

pub(super) fn sink() -> (Sink, Receiver<Vec<Event>>) {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let sink: Sink = Arc::new(move |events| tx.lock().unwrap().send(events).is_ok());
    (sink, rx)
}

/// Turns the watcher on with events going to the returned receiver.
fn watching(fx: &Fx) -> Receiver<Vec<Event>> {
    let (sink, rx) = sink();
    fx.agent.watch.set_sink(Some(sink));
    assert_eq!(fx.ok(Op::Watch { enable: true }), Done::Ok);
    assert!(fx.agent.watch.is_running());
    rx
}

/// Events until `done` holds for everything received so far (5 s at most).
#[track_caller]
fn until(rx: &Receiver<Vec<Event>>, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let end = Instant::now() + Duration::from_secs(5);
    let mut all = Vec::new();
    while !done(&all) {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(batch) => all.extend(batch),
            Err(_) => panic!("timed out; got {all:#?}"),
        }
    }
    all
}

/// Whatever arrives within `d`.
fn quiet(rx: &Receiver<Vec<Event>>, d: Duration) -> Vec<Event> {
    let end = Instant::now() + d;
    let mut all = Vec::new();
    while let Ok(b) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        all.extend(b);
    }
    all
}

fn upsert<'a>(events: &'a [Event], path: &str) -> Option<&'a Attr> {
    events.iter().rev().find_map(|e| match e {
        Event::Upsert { path: q, attr, .. } if q.as_bytes() == path.as_bytes() => Some(attr),
        _ => None,
    })
}

/// An `Upsert` of `path` showing exactly its state on disk now.
fn has_current(fx: &Fx, path: &'static str) -> impl Fn(&[Event]) -> bool {
    let local = fx.at(path);
    move |ev| {
        upsert(ev, path).is_some_and(|a| {
            let m = lstat(&local);
            (a.ino, a.size, a.mode, a.ctime.sec, a.ctime.nsec as i64)
                == (m.ino(), m.size(), m.mode(), m.ctime(), m.ctime_nsec())
        })
    }
}

fn has_upsert(path: &'static str) -> impl Fn(&[Event]) -> bool {
    move |ev| upsert(ev, path).is_some()
}

fn removed(events: &[Event], path: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::Remove { path: q } if q.as_bytes() == path.as_bytes()))
}

fn paths(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            Event::Upsert { path, .. } => format!("upsert {path}"),
            Event::Remove { path } => format!("remove {path}"),
            Event::Rename { from, to } => format!("rename {from} -> {to}"),
            Event::Rescan { path, .. } => format!("rescan {path}"),
        })
        .collect()
}

#[track_caller]
fn same_state(a: &Attr, path: &std::path::Path) {
    let m = lstat(path);
    assert_eq!(
        (a.ino, a.size, a.mode, a.nlink),
        (m.ino(), m.size(), m.mode(), m.nlink()),
        "{}",
        path.display()
    );
    assert_eq!(
        (
            a.mtime.sec,
            a.mtime.nsec as i64,
            a.ctime.sec,
            a.ctime.nsec as i64
        ),
        (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()),
        "{}",
        path.display()
    );
}

#[test]
fn changes_by_others_are_reported_with_their_state() {
    let fx = Fx::new();
    let rx = watching(&fx);
    fs::write(fx.at("f"), b"one").unwrap();
    let ev = until(&rx, has_current(&fx, "f"));
    same_state(upsert(&ev, "f").unwrap(), &fx.at("f"));
    assert!(upsert(&ev, "").is_some(), "the directory's own change too");
    fs::write(fx.at("f"), b"three").unwrap();
    let ev = until(&rx, has_current(&fx, "f"));
    assert_eq!(upsert(&ev, "f").unwrap().size, 5);
    fs::set_permissions(
        fx.at("f"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let ev = until(&rx, has_current(&fx, "f"));
    assert_eq!(upsert(&ev, "f").unwrap().mode & 0o7777, 0o600);
    symlink("some/target", fx.at("l")).unwrap();
    let ev = until(&rx, has_upsert("l"));
    let Some(Event::Upsert { symlink, .. }) = ev
        .iter()
        .find(|e| matches!(e, Event::Upsert { path, .. } if path.as_bytes() == b"l"))
    else {
        panic!()
    };
    assert_eq!(symlink.as_deref(), Some(&b"some/target"[..]));
    fs::rename(fx.at("f"), fx.at("g")).unwrap();
    let ev = until(&rx, has_current(&fx, "g"));
    assert!(
        ev.iter().any(|e| matches!(e, Event::Rename { from, to }
            if from.as_bytes() == b"f" && to.as_bytes() == b"g")),
        "{:?}",
        paths(&ev)
    );
    same_state(upsert(&ev, "g").unwrap(), &fx.at("g"));
    fs::remove_file(fx.at("g")).unwrap();
    let ev = until(&rx, |ev| removed(ev, "g"));
    assert!(upsert(&ev, "g").is_none());
    fs::create_dir(fx.at("d")).unwrap();
    until(&rx, has_upsert("d"));
    fs::remove_dir(fx.at("d")).unwrap();
    until(&rx, |ev| removed(ev, "d"));
    // Off: nothing more.
    assert_eq!(fx.ok(Op::Watch { enable: false }), Done::Ok);
    assert!(!fx.agent.watch.is_running());
    fs::write(fx.at("after"), b"x").unwrap();
    assert!(quiet(&rx, Duration::from_millis(100)).is_empty());
}

#[test]
fn new_directories_are_watched_before_they_are_listed() {
    let fx = Fx::new();
    let rx = watching(&fx);
    // A burst: nested directories with files, faster than the watcher can add watches.
    for i in 0..20 {
        let d = fx.at(&format!("a/b{i}/c/d"));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("f"), b"x").unwrap();
        fs::write(fx.at(&format!("a/b{i}/g")), b"y").unwrap();
    }
    let ev = until(&rx, |ev| {
        (0..20).all(|i| {
            upsert(ev, &format!("a/b{i}/c/d/f")).is_some()
                && upsert(ev, &format!("a/b{i}/g")).is_some()
        })
    });
    // Parents come before their children.
    let order = paths(&ev);
    let pos = |s: &str| order.iter().position(|x| x == s).unwrap();
    assert!(pos("upsert a/b3") < pos("upsert a/b3/c/d/f"), "{order:?}");
    // And they are watched: a later change deep inside is reported.
    fs::write(fx.at("a/b7/c/d/late"), b"z").unwrap();
    until(&rx, has_upsert("a/b7/c/d/late"));
}

#[test]
fn renamed_and_moved_directories_are_followed() {
    let fx = Fx::new();
    fs::create_dir_all(fx.at("d/sub")).unwrap();
    fs::create_dir_all(fx.at("m/inner")).unwrap();
    fs::write(fx.at("m/inner/x"), b"x").unwrap();
    let rx = watching(&fx);
    fs::rename(fx.at("d"), fx.at("e")).unwrap();
    let ev = until(&rx, has_upsert("e"));
    assert!(
        ev.iter().any(|e| matches!(e, Event::Rename { from, to }
            if from.as_bytes() == b"d" && to.as_bytes() == b"e")),
        "{:?}",
        paths(&ev)
    );
    fs::write(fx.at("e/sub/f"), b"x").unwrap();
    until(&rx, has_upsert("e/sub/f"));
    // Moved out of the root: removed, and no longer watched.
    fs::rename(fx.at("m"), fx.outside().join("m")).unwrap();
    until(&rx, |ev| removed(ev, "m"));
    fs::write(fx.outside().join("m/inner/y"), b"y").unwrap();
    fs::write(fx.at("sentinel"), b"s").unwrap();
    let ev = until(&rx, has_upsert("sentinel"));
    assert!(
        !paths(&ev).iter().any(|p| p.contains("m/inner")),
        "{:?}",
        paths(&ev)
    );
    // Moved in from outside: everything inside is reported, and then watched.
    fs::create_dir_all(fx.outside().join("n/sub")).unwrap();
    fs::write(fx.outside().join("n/x"), b"x").unwrap();
    fs::write(fx.outside().join("n/sub/y"), b"y").unwrap();
    fs::rename(fx.outside().join("n"), fx.at("n")).unwrap();
    let ev = until(&rx, |ev| {
        ["n", "n/x", "n/sub"]
            .iter()
            .all(|p| upsert(ev, p).is_some())
            && has_current(&fx, "n/sub/y")(ev)
    });
    same_state(upsert(&ev, "n/sub/y").unwrap(), &fx.at("n/sub/y"));
    fs::write(fx.at("n/sub/z"), b"z").unwrap();
    until(&rx, has_upsert("n/sub/z"));
}

#[test]
fn symlinks_are_reported_never_followed() {
    let fx = Fx::new();
    fs::create_dir(fx.outside().join("o")).unwrap();
    symlink(fx.outside(), fx.at("escape")).unwrap();
    let rx = watching(&fx);
    fs::write(fx.outside().join("o/x"), b"x").unwrap();
    fs::write(fx.outside().join("y"), b"y").unwrap();
    fs::write(fx.at("sentinel"), b"s").unwrap();
    let ev = until(&rx, has_upsert("sentinel"));
    assert!(
        !paths(&ev).iter().any(|p| p.contains("escape")),
        "{:?}",
        paths(&ev)
    );
}

/// The agent's own operations, made while watching.
fn own_ops(fx: &Fx) {
    let h = fx.handle(Op::Create {
        path: p("created"),
        flags: libc::O_RDWR | libc::O_EXCL,
        mode: 0o644,
    });
    fx.ok(Op::Write {
        handle: h,
        offset: 0,
        data: b"own bytes".to_vec(),
    });
    fx.ok(Op::SetAttr {
        node: NodeRef::Handle(h),
        set: SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    });
    fx.ok(Op::Close { handle: h });
    fx.ok(Op::Mkdir {
        path: p("dir"),
        mode: 0o755,
    });
    fx.ok(Op::Symlink {
        path: p("dir/link"),
        target: b"../created".to_vec(),
    });
    fx.ok(Op::Link {
        from: p("created"),
        to: p("dir/hard"),
    });
    fx.ok(Op::Rename {
        from: p("created"),
        to: p("dir/renamed"),
        flags: 0,
    });
    fx.ok(Op::SetAttr {
        node: node("dir/renamed"),
        set: SetAttr {
            size: Some(3),
            ..Default::default()
        },
    });
    fx.ok(Op::WritePath {
        path: p("existing"),
        offset: 2,
        data: b"XY".to_vec(),
    });
    for atomic in [true, false] {
        fx.ok(Op::PutFile {
            path: p(if atomic { "put-atomic" } else { "put-inplace" }),
            data: b"put".to_vec(),
            compressed: false,
            mode: 0o644,
            mtime: None,
            atomic,
            keep_mode: false,
        });
    }
    fx.ok(Op::PutFile {
        path: p("existing"),
        data: b"replaced".to_vec(),
        compressed: false,
        mode: 0o644,
        mtime: None,
        atomic: true,
        keep_mode: false,
    });
    fx.ok(Op::Journaled {
        session: 9,
        seq: 1,
        op: Box::new(Op::Mkdir {
            path: p("dir/journaled"),
            mode: 0o700,
        }),
    });
    fx.ok(Op::Unlink {
        path: p("dir/hard"),
    });
    fx.ok(Op::Rmdir {
        path: p("dir/journaled"),
    });
    fx.ok(Op::FallocatePath {
        path: p("put-inplace"),
        mode: 0,
        offset: 0,
        len: 8192,
    });
}

#[test]
fn the_agents_own_changes_do_not_come_back() {
    let fx = Fx::new();
    fs::write(fx.at("existing"), b"0123456789").unwrap();
    let rx = watching(&fx);
    own_ops(&fx);
    // Something from outside afterwards: its events must be the only ones.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(fx.at("sentinel"), b"s").unwrap();
    let ev = until(&rx, has_upsert("sentinel"));
    let ev: Vec<String> = ev
        .into_iter()
        .chain(quiet(&rx, Duration::from_millis(50)))
        .map(|e| paths(&[e]).remove(0))
        .collect();
    assert!(
        ev.iter().all(|e| e == "upsert sentinel" || e == "upsert ."),
        "echoes: {ev:?}"
    );
}

#[test]
fn a_change_by_someone_else_right_after_our_own_is_reported_once_with_its_state() {
    let fx = Fx::new();
    fs::write(fx.at("f"), b"0123456789").unwrap();
    let rx = watching(&fx);
    for round in 0..5 {
        fx.ok(Op::WritePath {
            path: p("f"),
            offset: 0,
            data: b"own".to_vec(),
        });
        // At once, before the watcher's batch is sent.
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(fx.at("f"))
            .unwrap();
        std::io::Write::write_all(&mut f, format!("external {round}").as_bytes()).unwrap();
        drop(f);
        let ev = until(&rx, has_upsert("f"));
        let ev: Vec<Event> = ev
            .into_iter()
            .chain(quiet(&rx, Duration::from_millis(30)))
            .collect();
        let ups: Vec<&Event> = ev
            .iter()
            .filter(|e| matches!(e, Event::Upsert { path, .. } if path.as_bytes() == b"f"))
            .collect();
        assert_eq!(ups.len(), 1, "{:?}", paths(&ev));
        same_state(upsert(&ev, "f").unwrap(), &fx.at("f"));
    }
}

/// A watcher driven by hand on this thread: batches are exactly what happened between steps.
pub(super) fn manual(fx: &Fx) -> (Watcher, Receiver<Vec<Event>>) {
    let (sink, rx) = sink();
    // SAFETY: plain syscall; the descriptor is ours.
    let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    let wake: Arc<OwnedFd> = Arc::new(crate::sys::owned_fd(wake));
    let w = Watcher::start(
        fx.agent.root.clone(),
        fx.agent.echo.clone(),
        fx.agent.hide.clone(),
        sink,
        wake,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    (w, rx)
}

/// One batch: everything that happened since the last step.
pub(super) fn step(w: &mut Watcher, rx: &Receiver<Vec<Event>>) -> Vec<String> {
    let now = Instant::now();
    assert!(w.step(now), "reads what happened");
    assert!(w.step(now + COALESCE), "sends it");
    let mut out = Vec::new();
    while let Ok(b) = rx.try_recv() {
        out.extend(paths(&b));
    }
    out
}

#[test]
fn a_batch_reports_the_end_state_in_an_order_that_replays_correctly() {
    let fx = Fx::new();
    fs::write(fx.at("f"), b"old").unwrap();
    fs::create_dir(fx.at("d")).unwrap();
    let (mut w, rx) = manual(&fx);
    // An editor's atomic save: temporary file, then renamed over the original.
    fs::write(fx.at(".f.swp"), b"new").unwrap();
    fs::rename(fx.at(".f.swp"), fx.at("f")).unwrap();
    assert_eq!(step(&mut w, &rx), ["upsert f", "upsert ."]);
    // Created and removed within one batch: the mount never needs to hear of it.
    fs::write(fx.at("tmp"), b"x").unwrap();
    fs::remove_file(fx.at("tmp")).unwrap();
    assert_eq!(step(&mut w, &rx), ["upsert ."]);
    // A file changed, then its directory renamed: the rename first, then the file by its
    // new name.
    fs::write(fx.at("d/x"), b"x").unwrap();
    fs::rename(fx.at("d"), fx.at("e")).unwrap();
    assert_eq!(
        step(&mut w, &rx),
        ["rename d -> e", "upsert e/x", "upsert e", "upsert ."]
    );
    // A chain of renames replays in order.
    fs::rename(fx.at("f"), fx.at("g")).unwrap();
    fs::rename(fx.at("g"), fx.at("h")).unwrap();
    assert_eq!(
        step(&mut w, &rx),
        ["rename f -> g", "rename g -> h", "upsert .", "upsert h"]
    );
    // The watch of a renamed directory follows it.
    fs::write(fx.at("e/y"), b"y").unwrap();
    assert_eq!(step(&mut w, &rx), ["upsert e/y", "upsert e"]);
    // A new directory with contents, renamed before the batch went out: no rename of a path
    // the mount never saw, just the end state.
    fs::create_dir(fx.at("n")).unwrap();
    fs::write(fx.at("n/a"), b"a").unwrap();
    fs::rename(fx.at("n"), fx.at("m")).unwrap();
    let got = step(&mut w, &rx);
    assert!(!got.iter().any(|e| e.starts_with("rename")), "{got:?}");
    assert!(got.contains(&"upsert m".to_string()), "{got:?}");
    assert!(got.contains(&"upsert m/a".to_string()), "{got:?}");
}

#[test]
fn queue_overflow_asks_for_a_rescan_and_keeps_watching() {
    let fx = Fx::big();
    fs::create_dir(fx.at("d")).unwrap();
    let (mut w, rx) = manual(&fx);
    let max: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Two events per file (create, close-write): more than the queue holds.
    for i in 0..max / 2 + 100 {
        fs::write(fx.at(&format!("d/f{i}")), b"").unwrap();
    }
    let got = step(&mut w, &rx);
    assert!(
        got.iter().any(|e| e == "rescan ."),
        "no rescan among {} events",
        got.len()
    );
    let before = w.watched();
    fs::write(fx.at("d/later"), b"x").unwrap();
    let got = step(&mut w, &rx);
    assert!(got.contains(&"upsert d/later".to_string()), "{got:?}");
    assert_eq!(w.watched(), before);
}

fn exchange(fx: &Fx, a: &str, b: &str) {
    let (ca, cb) = (
        std::ffi::CString::new(fx.at(a).to_str().unwrap()).unwrap(),
        std::ffi::CString::new(fx.at(b).to_str().unwrap()).unwrap(),
    );
    // SAFETY: both paths are NUL-terminated.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
}

#[test]
fn an_exchange_is_reported_as_the_two_new_states() {
    let fx = Fx::new();
    fs::write(fx.at("f"), b"file").unwrap();
    fs::create_dir(fx.at("d")).unwrap();
    fs::write(fx.at("d/inner"), b"x").unwrap();
    fs::write(fx.at("g"), b"other file").unwrap();
    let (mut w, rx) = manual(&fx);
    exchange(&fx, "f", "g");
    let mut got = step(&mut w, &rx);
    got.sort();
    assert_eq!(got, ["upsert .", "upsert f", "upsert g"]);
    // A file and a directory swap: both walked again, and the directory's watch follows it.
    exchange(&fx, "f", "d");
    let got = step(&mut w, &rx);
    assert!(!got.iter().any(|e| e.starts_with("rename")), "{got:?}");
    for want in ["rescan f", "upsert f", "upsert d"] {
        assert!(
            got.contains(&want.to_string()),
            "{want} missing from {got:?}"
        );
    }
    fs::write(fx.at("f/later"), b"x").unwrap();
    let got = step(&mut w, &rx);
    assert!(got.contains(&"upsert f/later".to_string()), "{got:?}");
    // The agent's own exchange is not reported.
    fx.agent.echo.set_enabled(true);
    fx.ok(Op::Rename {
        from: p("f"),
        to: p("g"),
        flags: libc::RENAME_EXCHANGE,
    });
    assert_eq!(step(&mut w, &rx), Vec::<String>::new());
}

/// Closing a handle the agent only read through records nothing: a hard link made by another
/// process while the handle was open (new name, new link count) is still reported.
#[test]
fn closing_a_read_handle_does_not_hide_a_change_made_meanwhile() {
    let fx = Fx::new();
    fs::write(fx.at("f"), b"contents").unwrap();
    fx.agent.echo.set_enabled(true);
    let (mut w, rx) = manual(&fx);
    let h = fx.handle(Op::Open {
        path: p("f"),
        flags: libc::O_RDONLY,
    });
    fs::hard_link(fx.at("f"), fx.at("g")).unwrap();
    fx.ok(Op::Close { handle: h });
    let got = step(&mut w, &rx);
    // (The link count of `f` changes without an event in the directory: the mount learns it
    // from `g`, the same node.)
    assert!(got.contains(&"upsert g".to_string()), "{got:?}");
    // The agent's own write through a handle, closed: still no echo.
    let h = fx.handle(Op::Open {
        path: p("f"),
        flags: libc::O_WRONLY,
    });
    fx.ok(Op::Write {
        handle: h,
        offset: 0,
        data: b"CONT".to_vec(),
    });
    fx.ok(Op::Close { handle: h });
    assert_eq!(step(&mut w, &rx), Vec::<String>::new());
}

/// The container makes a removed name again before the removal's result is recorded: the new
/// file is someone else's doing and must not pass for an echo of the removal.
#[test]
fn a_name_made_again_just_after_an_own_removal_is_not_claimed() {
    let fx = Fx::new();
    fx.agent.echo.set_enabled(true);
    for op in [
        Op::Unlink { path: p("a") },
        Op::Rename {
            from: p("a"),
            to: p("b"),
            flags: 0,
        },
    ] {
        fs::write(fx.at("a"), b"ours").unwrap();
        let pending = fx.agent.echo.begin(&fx.agent, &op).expect("recorded");
        match &op {
            Op::Unlink { .. } => fs::remove_file(fx.at("a")).unwrap(),
            _ => fs::rename(fx.at("a"), fx.at("b")).unwrap(),
        }
        // Someone else, before the agent looks.
        fs::write(fx.at("a"), b"theirs, made again").unwrap();
        fx.agent.echo.finish(&fx.agent.root, pending, true);
        let seen = crate::echo::look(&fx.agent.root, &p("a")).unwrap();
        assert!(matches!(seen, crate::echo::Seen::Present(_)));
        assert!(!fx.agent.echo.is_echo(&p("a"), &seen), "{op:?}");
        fs::remove_file(fx.at("a")).unwrap();
    }
}

/// The container rewrites a file the agent just wrote, before the result is recorded: the
/// mount was told the state the agent's write left (its answer), so the rewrite is someone
/// else's doing and must not pass for an echo (CI: a file written through the mount and
/// rewritten in the container at once kept the mount's bytes for good).
#[test]
fn a_rewrite_just_after_an_own_write_is_not_claimed() {
    let fx = Fx::new();
    fx.agent.echo.set_enabled(true);
    fs::write(fx.at("a"), b"before").unwrap();
    let op = Op::WritePath {
        path: p("a"),
        offset: 0,
        data: b"ours".to_vec(),
    };
    let pending = fx.agent.echo.begin(&fx.agent, &op).expect("recorded");
    fs::write(fx.at("a"), b"ours").unwrap();
    let told = match crate::echo::look(&fx.agent.root, &p("a")).unwrap() {
        crate::echo::Seen::Present(at) => at,
        other => panic!("{other:?}"),
    };
    // Someone else, before the agent records; a different size, so the state differs on any
    // clock.
    fs::write(fx.at("a"), b"theirs, longer").unwrap();
    fx.agent
        .echo
        .finish_told(&fx.agent.root, pending, true, Some(&told));
    let seen = crate::echo::look(&fx.agent.root, &p("a")).unwrap();
    assert!(
        !fx.agent.echo.is_echo(&p("a"), &seen),
        "their rewrite passed for ours"
    );
    assert!(
        fx.agent
            .echo
            .is_echo(&p("a"), &crate::echo::Seen::Present(told)),
        "our own state is not recognised"
    );
}

/// The container removes a name the agent just made before the result is recorded: the
/// absence is someone else's doing and must not pass for an echo.
#[test]
fn a_name_removed_just_after_an_own_link_is_not_claimed() {
    let fx = Fx::new();
    fx.agent.echo.set_enabled(true);
    fs::write(fx.at("a"), b"ours").unwrap();
    let op = Op::Link {
        from: p("a"),
        to: p("b"),
    };
    let pending = fx.agent.echo.begin(&fx.agent, &op).expect("recorded");
    fs::hard_link(fx.at("a"), fx.at("b")).unwrap();
    // Someone else, before the agent looks.
    fs::remove_file(fx.at("b")).unwrap();
    fx.agent.echo.finish(&fx.agent.root, pending, true);
    let seen = crate::echo::look(&fx.agent.root, &p("b")).unwrap();
    assert_eq!(seen, crate::echo::Seen::Absent);
    assert!(!fx.agent.echo.is_echo(&p("b"), &seen));
}

/// A name made through the mount and removed in the container before the watcher's next batch:
/// made and gone within one batch, but the mount knows the name, so its removal (or rename) is
/// reported.
#[test]
fn a_name_made_by_us_and_removed_or_renamed_by_others_within_one_batch_is_reported() {
    let fx = Fx::new();
    fs::write(fx.at("a"), b"x").unwrap();
    let (mut w, rx) = manual(&fx);
    fx.agent.echo.set_enabled(true);
    fx.ok(Op::Link {
        from: p("a"),
        to: p("l"),
    });
    fs::remove_file(fx.at("l")).unwrap();
    let got = step(&mut w, &rx);
    assert!(got.iter().any(|e| e == "remove l"), "{got:?}");
    // Likewise renamed away by others: the mount hears of the rename.
    fx.ok(Op::Link {
        from: p("a"),
        to: p("l"),
    });
    fs::rename(fx.at("l"), fx.at("m")).unwrap();
    let got = step(&mut w, &rx);
    assert!(got.iter().any(|e| e == "rename l -> m"), "{got:?}");
    // One made and removed by others within a batch stays unreported.
    fs::write(fx.at("tmp"), b"x").unwrap();
    fs::remove_file(fx.at("tmp")).unwrap();
    let got = step(&mut w, &rx);
    assert!(!got.iter().any(|e| e.ends_with("tmp")), "{got:?}");
}
