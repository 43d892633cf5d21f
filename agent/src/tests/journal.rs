//! The journal's rules: at most once per (session, seq), in order, blocked after a failure,
//! persisted privately.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use kmount_proto::{Done, Op};

use super::*;
use crate::journal::Journal;

const S: u64 = 0x5e55_1011;

fn j(seq: u64, op: Op) -> Op {
    Op::Journaled {
        session: S,
        seq,
        op: Box::new(op),
    }
}

fn mkdir(path: &str) -> Op {
    Op::Mkdir {
        path: p(path),
        mode: 0o755,
    }
}

fn applied(fx: &Fx) -> u64 {
    match fx.ok(Op::AppliedSeq { session: S }) {
        Done::Seq(n) => n,
        other => panic!("{other:?}"),
    }
}

#[test]
fn seqs_apply_once_in_order_and_replays_do_nothing() {
    let fx = Fx::new();
    assert_eq!(applied(&fx), 0);
    assert!(matches!(fx.ok(j(1, mkdir("a"))), Done::Attr(_)));
    assert!(matches!(fx.ok(j(2, mkdir("b"))), Done::Attr(_)));
    assert_eq!(applied(&fx), 2);
    // Replays answer Ok and do nothing: the directory removed meanwhile stays removed.
    fs::remove_dir(fx.at("a")).unwrap();
    assert_eq!(fx.ok(j(1, mkdir("a"))), Done::Ok);
    assert!(!fx.at("a").exists());
    // A gap is a protocol error naming the seq expected; nothing happens.
    let e = fx.run(j(4, mkdir("d"))).unwrap_err();
    assert_eq!(e.errno, libc::EPROTO);
    assert!(e.message.contains("expected seq 3"), "{}", e.message);
    assert!(!fx.at("d").exists());
    // Another session has its own numbering.
    let other = Op::Journaled {
        session: S + 1,
        seq: 1,
        op: Box::new(mkdir("o")),
    };
    assert!(matches!(fx.ok(other), Done::Attr(_)));
    assert_eq!(applied(&fx), 2);
    // Nested journaling and walks make no sense in a journal.
    assert_eq!(fx.errno(j(3, j(1, mkdir("x")))), libc::EINVAL);
    assert_eq!(fx.errno(j(3, Op::WalkOpen { path: p("") })), libc::EINVAL);
}

#[test]
fn a_failure_blocks_the_session_until_that_seq_succeeds() {
    let fx = Fx::new();
    fx.ok(j(1, mkdir("a")));
    let e = fx.run(j(2, mkdir("missing/b"))).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT, "the op's own errno");
    for seq in [3, 4] {
        let e = fx.run(j(seq, mkdir(&format!("later{seq}")))).unwrap_err();
        assert_eq!(e.errno, libc::ECANCELED);
        assert_eq!(e.message, "not applied: seq 2 failed first");
    }
    assert!(!fx.at("later3").exists());
    assert_eq!(applied(&fx), 1);
    // Fixed on the remote side; seq 2 comes again and the session moves on.
    fs::create_dir(fx.at("missing")).unwrap();
    fx.ok(j(2, mkdir("missing/b")));
    fx.ok(j(3, mkdir("later3")));
    assert_eq!(applied(&fx), 3);
}

#[test]
fn changes_already_in_place_count_as_applied() {
    let fx = Fx::new();
    fs::create_dir(fx.at("dir")).unwrap();
    fs::write(fx.at("file"), b"x").unwrap();
    std::os::unix::fs::symlink("target", fx.at("link")).unwrap();
    fs::hard_link(fx.at("file"), fx.at("hard")).unwrap();
    let ops = [
        Op::Unlink { path: p("gone") },
        Op::Unlink {
            path: p("gone-dir/x"),
        },
        Op::Rmdir { path: p("gone") },
        Op::Rename {
            from: p("gone"),
            to: p("file2"),
            flags: 0,
        },
        mkdir("dir"),
        Op::Symlink {
            path: p("link"),
            target: b"target".to_vec(),
        },
        Op::Link {
            from: p("file"),
            to: p("hard"),
        },
    ];
    for (i, op) in ops.into_iter().enumerate() {
        let shown = format!("{op:?}");
        fx.run(j(i as u64 + 1, op))
            .unwrap_or_else(|e| panic!("{shown}: {e}"));
    }
    // But a different thing in the way is a real conflict.
    let e = fx.run(j(8, mkdir("file"))).unwrap_err();
    assert_eq!(e.errno, libc::EEXIST);
    let e = fx
        .run(j(
            8,
            Op::Symlink {
                path: p("link"),
                target: b"elsewhere".to_vec(),
            },
        ))
        .unwrap_err();
    assert_eq!(e.errno, libc::EEXIST);
}

#[test]
fn the_position_is_persisted_privately_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    fs::create_dir(&base).unwrap();
    fs::set_permissions(&base, fs::Permissions::from_mode(0o1777)).unwrap();
    let fx = Fx::new();
    let journal = Journal::with_bases(vec![base.clone()]);
    let run = |j: &Journal, seq: u64| {
        j.apply(&fx.agent, 77, seq, Op::Ping, |_| Ok(Done::Ok))
            .unwrap()
    };
    assert_eq!(journal.applied(77), 0);
    run(&journal, 1);
    run(&journal, 2);
    // Saved with each applied record, before its answer: nothing left to persist later.
    assert_eq!(journal.persist_wait(), None);
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = base.join(format!("kmount-agent-{uid}"));
    for d in [&dir, &dir.join("sessions")] {
        assert_eq!(lstat(d).mode() & 0o777, 0o700, "{}", d.display());
    }
    let file = dir.join("sessions").join(format!("{:016x}", 77));
    assert_eq!(fs::read_to_string(&file).unwrap(), "2\n");
    // A new agent (same state directory) knows where the session stood.
    let again = Journal::with_bases(vec![base.clone()]);
    assert_eq!(again.applied(77), 2);
    assert_eq!(again.applied(78), 0);
    // The next one is saved as it is applied (a killed agent must not apply it again).
    run(&journal, 3);
    assert_eq!(fs::read_to_string(&file).unwrap(), "3\n");
}

#[test]
fn a_state_directory_owned_by_someone_else_is_never_used() {
    if !is_root() {
        eprintln!("skipped: needs root to plant a directory owned by another user");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (evil, good) = (tmp.path().join("evil"), tmp.path().join("good"));
    fs::create_dir(&evil).unwrap();
    fs::create_dir(&good).unwrap();
    let planted = evil.join("kmount-agent-0");
    fs::create_dir(&planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    // A symlink in place of the directory is not followed either.
    let linked = tmp.path().join("linked");
    fs::create_dir(&linked).unwrap();
    std::os::unix::fs::symlink(&good, linked.join("kmount-agent-0")).unwrap();
    let journal = Journal::with_bases(vec![evil.clone(), linked.clone(), good.clone()]);
    assert_eq!(
        journal.store_dir(),
        Some(good.join("kmount-agent-0/sessions"))
    );
    assert!(!planted.join("sessions").exists());
    // Our own directory with loose permissions is tightened.
    let loose = tmp.path().join("loose");
    fs::create_dir_all(loose.join("kmount-agent-0")).unwrap();
    fs::set_permissions(
        loose.join("kmount-agent-0"),
        fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let j2 = Journal::with_bases(vec![loose.clone()]);
    assert!(j2.store_dir().is_some());
    assert_eq!(lstat(&loose.join("kmount-agent-0")).mode() & 0o777, 0o700);
}
