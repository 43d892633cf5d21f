use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmount_proto::{Caller, NodeRef, Op, RelPath, SetAttr};

use super::*;

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

fn write(path: &str, offset: u64, data: &[u8]) -> Op {
    Op::WritePath {
        path: p(path),
        offset,
        data: data.to_vec(),
    }
}

/// A mix of operations, `i` picks one.
fn op(i: u64) -> Op {
    match i % 5 {
        0 => Op::Create {
            path: p(&format!("dir/f{i}")),
            flags: libc::O_WRONLY | libc::O_EXCL,
            mode: 0o644,
        },
        1 => write(
            &format!("dir/f{}", i - 1),
            0,
            &vec![i as u8; (i % 300) as usize],
        ),
        2 => Op::Rename {
            from: p(&format!("dir/f{}", i - 2)),
            to: p(&format!("dir/g{i}")),
            flags: 0,
        },
        3 => Op::SetAttr {
            node: NodeRef::Path(p(&format!("dir/g{}", i - 1))),
            set: SetAttr {
                mode: Some(0o600),
                ..SetAttr::default()
            },
        },
        _ => Op::Mkdir {
            path: p(&format!("d{i}")),
            mode: 0o755,
        },
    }
}

/// Options that never flush by themselves, so tests decide what is committed.
fn manual() -> JournalOptions {
    JournalOptions {
        flush_interval: Duration::from_secs(3600),
        keep_applied: 0,
        ..JournalOptions::default()
    }
}

fn small_segments(bytes: u64) -> JournalOptions {
    JournalOptions {
        segment_bytes: bytes,
        write_buffer: bytes as usize / 4,
        ..manual()
    }
}

fn all_after(j: &Journal, seq: u64) -> Vec<Record> {
    j.records_after(seq).map(|r| r.unwrap()).collect()
}

fn segment_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    list_segments(dir).unwrap()
}

fn envelope_len(caller: &Option<Caller>, op: &Op) -> u64 {
    let body = postcard::to_allocvec(&RecordBodyRef { caller, op }).unwrap();
    segment::REC_HEADER_LEN + body.len() as u64
}

#[test]
fn append_commit_reopen_recovers_exactly_the_committed_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let (j, rec) = Journal::open_with(&dir, manual()).unwrap();
    assert!(rec.new_session);
    assert_eq!((rec.applied, rec.tail, rec.records), (0, 0, 0));
    let session = j.session();
    let caller = Some(Caller {
        uid: 1000,
        gid: 100,
        groups: vec![4, 27],
    });
    let mut expected = Vec::new();
    for i in 1..=200u64 {
        let c = if i % 7 == 0 { caller.clone() } else { None };
        let seq = j.append_as(c.clone(), op(i)).unwrap();
        assert_eq!(seq, i);
        expected.push(Record {
            seq,
            caller: c,
            op: op(i),
        });
    }
    assert_eq!(j.tail(), 200);
    assert_eq!(j.durable(), 0, "nothing is durable before a commit");
    assert!(
        all_after(&j, 0).is_empty(),
        "readers see only durable records"
    );
    j.commit().unwrap();
    assert_eq!(j.durable(), 200);
    assert_eq!(all_after(&j, 0), expected);
    // Appended after the commit and never committed: lost in a crash.
    for i in 201..=210 {
        j.append(op(i)).unwrap();
    }
    j.crash();

    let (j, rec) = Journal::open_with(&dir, manual()).unwrap();
    assert!(!rec.new_session);
    assert_eq!(j.session(), session);
    assert_eq!((rec.applied, rec.tail, rec.records), (0, 200, 200));
    let bytes: u64 = expected
        .iter()
        .map(|r| envelope_len(&r.caller, &r.op))
        .sum();
    assert_eq!(rec.bytes, bytes);
    assert_eq!(j.pending().unwrap(), (200, bytes));
    assert_eq!(all_after(&j, 0), expected);
    assert_eq!(all_after(&j, 150), expected[150..].to_vec());
    // Seqs continue after the last recovered record.
    assert_eq!(j.append(op(1)).unwrap(), 201);
}

#[test]
fn close_commits_everything_appended() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    for i in 1..=50 {
        j.append(op(i)).unwrap();
    }
    drop(j);
    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!(rec.records, 50);
    assert_eq!(all_after(&j, 0).len(), 50);
    j.close().unwrap();
    assert!(matches!(j.append(op(1)), Err(JournalError::Closed)));
}

#[test]
fn the_flusher_commits_within_the_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        flush_interval: Duration::from_millis(20),
        ..JournalOptions::default()
    };
    let (j, _) = Journal::open_with(tmp.path(), opts.clone()).unwrap();
    j.append(op(4)).unwrap();
    let t = Instant::now();
    while j.durable() < 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "never committed");
        std::thread::sleep(Duration::from_millis(5));
    }
    j.crash();
    let (_, rec) = Journal::open_with(tmp.path(), opts).unwrap();
    assert_eq!(rec.records, 1);
}

/// Appends committed records, then damages the end of the last segment in `damage`'s way;
/// the reopened journal must hold exactly the committed records and accept new ones.
fn torn_tail_case(damage: impl Fn(&Path, &[u8])) {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    for i in 1..=30 {
        j.append(op(i)).unwrap();
    }
    j.close().unwrap();
    drop(j);
    let segs = segment_files(tmp.path());
    assert_eq!(segs.len(), 1);
    let seg = &segs[0].1;
    let before = fs::read(seg).unwrap();
    damage(seg, &before);
    let grown = fs::metadata(seg).unwrap().len();
    assert!(grown > before.len() as u64);

    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!(rec.tail, 30);
    assert_eq!(rec.records, 30);
    assert_eq!(rec.truncated_bytes, grown - before.len() as u64);
    assert_eq!(
        fs::read(seg).unwrap(),
        before,
        "cut back to the last good record"
    );
    let got = all_after(&j, 0);
    assert_eq!(got.len(), 30);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, r)| r.op == op(i as u64 + 1))
    );
    assert_eq!(j.append(op(31)).unwrap(), 31);
    j.commit().unwrap();
    drop(j);
    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!((rec.tail, rec.truncated_bytes), (31, 0));
    assert_eq!(all_after(&j, 30)[0].op, op(31));
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn torn_tail_half_a_record_is_cut() {
    torn_tail_case(|seg, before| {
        // The first half of a copy of the last valid record, renumbered as the next one.
        let r = op(31);
        let body = postcard::to_allocvec(&RecordBodyRef {
            caller: &None,
            op: &r,
        })
        .unwrap();
        let mut rec = record_header(body.len() as u32, 31, payload_hash(&body)).to_vec();
        rec.extend_from_slice(&body);
        append_bytes(seg, &rec[..rec.len() / 2]);
        assert!(before.len() > 100);
    });
}

#[test]
fn torn_tail_garbage_is_cut() {
    torn_tail_case(|seg, _| append_bytes(seg, b"\x10\x00\x00\x00garbage that looks like a length"));
}

#[test]
fn torn_tail_zero_blocks_are_cut() {
    torn_tail_case(|seg, _| append_bytes(seg, &[0u8; 4096]));
}

#[test]
fn torn_tail_stale_valid_record_with_wrong_seq_is_cut() {
    torn_tail_case(|seg, before| {
        // A complete, checksummed record, but for seq 5: not the next one.
        let body = postcard::to_allocvec(&RecordBodyRef {
            caller: &None,
            op: &op(5),
        })
        .unwrap();
        let mut rec = record_header(body.len() as u32, 5, payload_hash(&body)).to_vec();
        rec.extend_from_slice(&body);
        append_bytes(seg, &rec);
        assert!(!before.is_empty());
    });
}

#[test]
fn a_flipped_bit_in_the_last_segment_cuts_from_there() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    let mut ends = Vec::new();
    for i in 1..=10 {
        j.append(op(i)).unwrap();
        j.commit().unwrap();
        ends.push(fs::metadata(&segment_files(tmp.path())[0].1).unwrap().len());
    }
    drop(j);
    let seg = segment_files(tmp.path())[0].1.clone();
    let mut b = fs::read(&seg).unwrap();
    // A byte inside record 7's payload.
    let at = ends[5] as usize + 22;
    b[at] ^= 0x01;
    fs::write(&seg, &b).unwrap();
    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!(rec.tail, 6);
    assert_eq!(all_after(&j, 0).len(), 6);
}

#[test]
fn damage_in_an_earlier_segment_is_an_error_not_a_silent_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), small_segments(2048)).unwrap();
    for i in 1..=100 {
        j.append(write("f", i * 100, &[7u8; 100])).unwrap();
        j.commit().unwrap();
    }
    drop(j);
    let segs = segment_files(tmp.path());
    assert!(segs.len() > 3, "{}", segs.len());
    let first = &segs[0].1;
    let mut b = fs::read(first).unwrap();
    b[100] ^= 0xff;
    fs::write(first, &b).unwrap();
    match Journal::open_with(tmp.path(), manual()) {
        Err(e @ JournalError::Corrupt { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("Move") && msg.contains("aside"), "{msg}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn mark_applied_deletes_segments_and_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), small_segments(4096)).unwrap();
    for i in 1..=100 {
        j.append(write(&format!("f{}", i % 3), 0, &[i as u8; 1000]))
            .unwrap();
        if i % 10 == 0 {
            j.commit().unwrap();
        }
    }
    let before = segment_files(tmp.path());
    assert!(before.len() >= 10, "{}", before.len());
    assert_eq!(j.pending_paths(), vec![p("f0"), p("f1"), p("f2")]);
    j.mark_applied(60);
    assert_eq!(j.applied(), 60);
    let (records, bytes) = j.pending().unwrap();
    assert_eq!(records, 40);
    assert_eq!(bytes, 40 * envelope_len(&None, &write("f0", 0, &[0; 1000])));
    // Persisted by close (or by the flusher); segments entirely at or below 60 are gone.
    j.close().unwrap();
    let after = segment_files(tmp.path());
    assert!(after.len() < before.len());
    assert!(after[0].0 <= 61, "the segment holding 61 is kept");
    drop(j);

    let (j, rec) = Journal::open_with(tmp.path(), small_segments(4096)).unwrap();
    assert_eq!((rec.applied, rec.tail, rec.records), (60, 100, 40));
    let got = all_after(&j, 60);
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (61..=100).collect::<Vec<_>>()
    );
    // Everything applied: only the last segment is left, and seqs go on after it.
    j.mark_applied(100);
    j.close().unwrap();
    drop(j);
    assert_eq!(segment_files(tmp.path()).len(), 1);
    let (j, rec) = Journal::open_with(tmp.path(), small_segments(4096)).unwrap();
    assert_eq!(
        (rec.applied, rec.tail, rec.records, rec.bytes),
        (100, 100, 0, 0)
    );
    assert!(rec.pending_paths.is_empty());
    assert!(all_after(&j, 0).is_empty());
    assert_eq!(j.append(op(3)).unwrap(), 101);
    assert_eq!(j.pending().unwrap().0, 1);
}

#[test]
fn applied_is_persisted_lazily_by_the_flusher() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        segment_bytes: 1024,
        flush_interval: Duration::from_millis(10),
        write_buffer: 256,
        keep_applied: 0,
    };
    let (j, _) = Journal::open_with(tmp.path(), opts.clone()).unwrap();
    for i in 1..=40 {
        j.append(write("x", 0, &[i as u8; 200])).unwrap();
    }
    j.commit().unwrap();
    let n = segment_files(tmp.path()).len();
    j.mark_applied(39);
    let t = Instant::now();
    while segment_files(tmp.path()).len() >= n {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "segments never deleted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    j.crash();
    let (_, rec) = Journal::open_with(tmp.path(), opts).unwrap();
    assert_eq!((rec.applied, rec.records), (39, 1));
}

#[test]
fn applied_beyond_the_tail_is_clamped_and_seqs_are_never_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    j.append(op(1)).unwrap();
    j.commit().unwrap();
    j.mark_applied(1000);
    assert_eq!(j.applied(), 1);
    drop(j);
    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!((rec.applied, rec.tail), (1, 1));
    assert_eq!(j.append(op(2)).unwrap(), 2);
}

#[test]
fn group_commit_shares_fsyncs_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    let j = Arc::new(j);
    let threads = 8;
    let per = 1000;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                let mut seqs = Vec::with_capacity(per);
                for i in 0..per {
                    let seq = j
                        .append(write(&format!("t{t}"), (i * 64) as u64, &[t as u8; 64]))
                        .unwrap();
                    j.commit().unwrap();
                    assert!(
                        j.durable() >= seq,
                        "commit returned before {seq} was durable"
                    );
                    seqs.push(seq);
                }
                seqs
            })
        })
        .collect();
    let mut all: Vec<u64> = Vec::new();
    for h in handles {
        let seqs = h.join().unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        all.extend(seqs);
    }
    let elapsed = t0.elapsed();
    all.sort_unstable();
    assert_eq!(all, (1..=(threads * per) as u64).collect::<Vec<_>>());
    let stats = j.stats();
    eprintln!(
        "group commit: {} commits, {} fsyncs, {:.0} commits/s",
        stats.commits,
        stats.fsyncs,
        stats.commits as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(stats.commits, (threads * per) as u64);
    assert!(stats.fsyncs < stats.commits, "{stats:?}");
    let j = Arc::into_inner(j).unwrap();
    j.crash();

    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!(rec.records, (threads * per) as u64);
    // Each thread's writes are in the journal in the order it made them.
    let mut next_offset = [0u64; 8];
    for r in all_after(&j, 0) {
        let Op::WritePath { path, offset, data } = r.op else {
            panic!("unexpected {:?}", r.op)
        };
        let t = (path.as_bytes()[1] - b'0') as usize;
        assert_eq!(offset, next_offset[t]);
        assert_eq!(data, vec![t as u8; 64]);
        next_offset[t] += 64;
    }
    assert!(next_offset.iter().all(|&o| o == (per * 64) as u64));
}

#[test]
fn records_after_streams_across_segments_and_follows_new_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), small_segments(256 << 10)).unwrap();
    // 24 MiB of writes in 96 KiB records: many segments and index granules.
    let chunk = 96 << 10;
    let n = 256u64;
    for i in 0..n {
        j.append(write(
            "big",
            i * chunk as u64,
            &vec![(i % 251) as u8; chunk],
        ))
        .unwrap();
    }
    j.commit().unwrap();
    assert!(j.stats().segments > 50, "{:?}", j.stats());
    let mut r = j.records_after(0);
    let mut count = 0;
    for rec in r.by_ref() {
        let rec = rec.unwrap();
        count += 1;
        let Op::WritePath { offset, data, .. } = &rec.op else {
            panic!()
        };
        assert_eq!(*offset, (rec.seq - 1) * chunk as u64);
        assert!(data.iter().all(|&b| b == ((rec.seq - 1) % 251) as u8));
    }
    assert_eq!(count, n);
    // Caught up: nothing more until more is committed.
    assert!(r.next().is_none());
    j.append(op(1)).unwrap();
    assert!(r.next().is_none(), "not durable yet");
    j.commit().unwrap();
    assert_eq!(r.next().unwrap().unwrap().seq, n + 1);
    assert!(r.next().is_none());
    // Starting in the middle: a seek through the sparse index.
    let mid: Vec<u64> = j
        .records_after(173)
        .take(3)
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(mid, vec![174, 175, 176]);
    // Records known applied are never read back, whether or not their segment is still
    // there; once persisted, their segments are gone.
    j.mark_applied(200);
    assert_eq!(j.records_after(0).next().unwrap().unwrap().seq, 201);
    let segments = j.stats().segments;
    j.close().unwrap();
    assert!(j.stats().segments < segments / 2, "{:?}", j.stats());
    assert_eq!(j.records_after(5).next().unwrap().unwrap().seq, 201);
}

/// The sender's pattern: follow the durable seq, mark records applied as they are "sent",
/// while a writer keeps appending and the flusher deletes applied segments underneath.
#[test]
fn a_follower_sees_every_record_once_while_segments_are_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        segment_bytes: 2048,
        flush_interval: Duration::from_millis(1),
        write_buffer: 512,
        keep_applied: 0,
    };
    let (j, _) = Journal::open_with(tmp.path(), opts).unwrap();
    let j = Arc::new(j);
    let total = 3000u64;
    let writer = {
        let j = j.clone();
        std::thread::spawn(move || {
            for i in 1..=total {
                j.append(write("f", i, &[i as u8; 100])).unwrap();
                if i % 7 == 0 {
                    j.commit().unwrap();
                }
            }
            j.commit().unwrap();
        })
    };
    let mut durable = j.watch_durable();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut reader = j.records_after(0);
    let mut expected = 1;
    let mut max_segments = 0;
    rt.block_on(async {
        while expected <= total {
            for r in reader.by_ref() {
                let r = r.unwrap();
                assert_eq!(r.seq, expected);
                assert_eq!(r.op, write("f", expected, &[expected as u8; 100]));
                expected += 1;
                if expected % 3 == 0 {
                    j.mark_applied(r.seq);
                }
            }
            max_segments = max_segments.max(j.stats().segments);
            if expected <= total {
                tokio::time::timeout(Duration::from_secs(10), durable.changed())
                    .await
                    .expect("no progress")
                    .unwrap();
            }
        }
    });
    writer.join().unwrap();
    j.mark_applied(total);
    j.close().unwrap();
    assert_eq!(segment_files(tmp.path()).len(), 1);
    assert!(j.stats().bytes_written > 300_000);
    assert!(
        max_segments < 100,
        "applied segments are deleted as it goes: {max_segments}"
    );
}

#[test]
fn pending_paths_follow_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert!(rec.pending_paths.is_empty());
    j.append(Op::Create {
        path: p("a"),
        flags: libc::O_EXCL,
        mode: 0o644,
    })
    .unwrap(); // 1
    j.append(Op::Rename {
        from: p("a"),
        to: p("b/c"),
        flags: 0,
    })
    .unwrap(); // 2
    j.append(Op::SetAttr {
        node: NodeRef::Path(p("d")),
        set: SetAttr::default(),
    })
    .unwrap(); // 3
    assert_eq!(j.pending_paths(), vec![p("a"), p("b/c"), p("d")]);
    // Covered: a path named, and what is below it; not what is above or beside it.
    let covers = |path: &str, seq| j.covers_after(&p(path), seq);
    assert!(covers("a", 0) && covers("b/c", 0) && covers("b/c/x", 0) && covers("d/y/z", 0));
    assert!(!covers("b", 0) && !covers("e", 0) && !covers("", 0));
    // After a seq: only the records after it.
    // (a rename names both its paths.)
    assert!(covers("a", 1) && !covers("a", 2) && covers("b/c", 1) && !covers("b/c", 2));
    assert!(covers("d", 2) && !covers("d", 3));
    j.commit().unwrap();
    j.mark_applied(2);
    assert_eq!(j.pending_paths(), vec![p("d")]);
    assert!(!covers("b/c", 0) && !covers("a", 0) && covers("d", 0));
    drop(j);
    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!(rec.pending_paths, vec![p("d")]);
    assert_eq!(j.pending_paths(), vec![p("d")]);
}

#[test]
fn wait_applied_wakes_waiters_and_fails_on_close() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    let j = Arc::new(j);
    for i in 1..=5 {
        j.append(op(i)).unwrap();
    }
    j.commit().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let j2 = j.clone();
        let waiter = tokio::spawn(async move { j2.wait_applied(4).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        j.mark_applied(3);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        let j3 = j.clone();
        std::thread::spawn(move || j3.mark_applied(5))
            .join()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // Already applied: at once.
        j.wait_applied(2).await.unwrap();

        j.append(op(6)).unwrap();
        let j4 = j.clone();
        let waiter = tokio::spawn(async move { j4.wait_applied(6).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        j.close().unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(r, Err(JournalError::Closed)), "{r:?}");
    });
}

#[test]
fn a_second_process_is_refused_and_the_directory_is_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state/journal/x");
    let (j, _) = Journal::open(&dir).unwrap();
    let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // flock is per open file description, so a second open in this process is refused too.
    match Journal::open(&dir) {
        Err(e @ JournalError::Locked { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("pid {}", std::process::id())),
                "{msg}"
            );
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(j);
    Journal::open(&dir).unwrap();
}

#[test]
fn a_damaged_session_file_starts_a_new_session() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    let s1 = j.session();
    j.append(op(1)).unwrap();
    drop(j);
    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!((j.session(), rec.new_session), (s1, false));
    drop(j);
    fs::write(tmp.path().join("session"), b"nonsense").unwrap();
    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert!(rec.new_session);
    assert_ne!(j.session(), s1);
    // The stored record is replayed under the new session, and seqs are not reused.
    assert_eq!(rec.records, 1);
    assert_eq!(j.append(op(2)).unwrap(), 2);
}

#[test]
fn a_segment_torn_at_creation_is_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    j.append(op(1)).unwrap();
    j.mark_applied(1);
    j.close().unwrap();
    drop(j);
    // A crash while the next segment was being created left it empty.
    fs::write(tmp.path().join(segment_name(2)), b"").unwrap();
    let (j, rec) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!((rec.applied, rec.tail), (1, 1));
    assert_eq!(j.append(op(2)).unwrap(), 2);
    j.commit().unwrap();
    drop(j);
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    assert_eq!(all_after(&j, 1).len(), 1);
}

#[test]
fn oversized_records_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_with(tmp.path(), manual()).unwrap();
    let big = write("x", 0, &vec![0u8; MAX_RECORD_LEN as usize + 1]);
    assert!(matches!(j.append(big), Err(JournalError::TooLarge { .. })));
    assert_eq!(j.tail(), 0);
}

#[test]
fn op_paths_names_both_ends() {
    let r = Op::Link {
        from: p("a"),
        to: p("b"),
    };
    assert_eq!(op_paths(&r), vec![&p("a"), &p("b")]);
    let h = Op::SetAttr {
        node: NodeRef::Handle(3),
        set: SetAttr::default(),
    };
    assert!(op_paths(&h).is_empty());
}

/// Throughput of 4 KiB records. Run with
/// `cargo test -p kmount-mount --release journal::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let dir = std::env::var_os("KMOUNT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let data = vec![0x5au8; 4096];

    let (j, _) = Journal::open_with(&tmp.path().join("a"), manual()).unwrap();
    let n = 100_000u64;
    let t = Instant::now();
    for i in 0..n {
        j.append(write("f", i * 4096, &data)).unwrap();
    }
    j.commit().unwrap();
    let e = t.elapsed().as_secs_f64();
    eprintln!(
        "append 4 KiB x {n}, one commit: {:.0} records/s, {:.0} MiB/s",
        n as f64 / e,
        (n * 4096) as f64 / e / 1048576.0
    );
    drop(j);

    let (j, _) = Journal::open_with(&tmp.path().join("b"), manual()).unwrap();
    let n = 2000u64;
    let t = Instant::now();
    for i in 0..n {
        j.append(write("f", i * 4096, &data)).unwrap();
        j.commit().unwrap();
    }
    let e = t.elapsed().as_secs_f64();
    eprintln!(
        "append+commit 4 KiB, 1 thread: {:.0} commits/s ({} fsyncs)",
        n as f64 / e,
        j.stats().fsyncs
    );
    drop(j);

    for threads in [4usize, 8, 32] {
        let (j, _) = Journal::open_with(&tmp.path().join(format!("c{threads}")), manual()).unwrap();
        let j = Arc::new(j);
        let per = 4000 / threads;
        let t = Instant::now();
        let hs: Vec<_> = (0..threads)
            .map(|k| {
                let j = j.clone();
                let data = data.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        j.append(write(&format!("f{k}"), (i * 4096) as u64, &data))
                            .unwrap();
                        j.commit().unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let e = t.elapsed().as_secs_f64();
        let s = j.stats();
        eprintln!(
            "append+commit 4 KiB, {threads} threads: {:.0} commits/s, {} fsyncs for {} commits \
             ({:.0} fsyncs per 1000 commits)",
            s.commits as f64 / e,
            s.fsyncs,
            s.commits,
            s.fsyncs as f64 * 1000.0 / s.commits as f64
        );
    }
}

#[test]
fn applied_records_are_kept_and_can_be_sent_again() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        keep_applied: 1 << 20,
        ..small_segments(2048)
    };
    let (j, _) = Journal::open_with(tmp.path(), opts.clone()).unwrap();
    for i in 1..=40 {
        j.append(op(i)).unwrap();
    }
    j.commit().unwrap();
    j.mark_applied(40);
    j.close().unwrap();
    drop(j);
    // Kept across a reopen (within keep_applied), applied and not pending.
    let (j, rec) = Journal::open_with(tmp.path(), opts).unwrap();
    assert_eq!((rec.applied, rec.records), (40, 0));
    assert_eq!(j.first_retained(), 1);
    assert!(j.pending_paths().is_empty());
    // A target that lost them: pending again, paths included, read again in order.
    assert_eq!(j.rewind_applied(0).unwrap(), 0);
    assert_eq!(j.applied(), 0);
    assert_eq!(j.pending().unwrap().0, 40);
    assert!(!j.pending_paths().is_empty());
    let seqs: Vec<u64> = j.records_after(0).map(|r| r.unwrap().seq).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
}
