//! The local-first operations over the real agent's stdin/stdout: walks, digests, events,
//! the journal lane. The figures printed here (release build: `cargo test --release -p
//! kmount-agent --test local_first -- --nocapture`) are the ones quoted in the docs.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{Agent, BIN, cpu_time, make_tree, p, shm_tempdir};
use kmount_proto::{
    Done, Event, FromAgent, Op, RelPath, Reply, Request, ToAgent, TreeEntry, WireError,
};

fn request(a: &mut Agent, id: u64, op: Op) {
    a.send(&ToAgent::Request(Request {
        id,
        caller: None,
        op,
    }));
}

/// Frames from the agent, as they arrive.
struct Frames {
    rx: Receiver<(Instant, FromAgent)>,
    events: Vec<(Instant, Event)>,
}

impl Frames {
    fn new(a: &mut Agent) -> Frames {
        Frames {
            rx: a.frames(),
            events: Vec::new(),
        }
    }

    /// The next reply (events meanwhile are kept).
    #[track_caller]
    fn reply(&mut self) -> Reply {
        loop {
            match self.rx.recv_timeout(Duration::from_secs(30)) {
                Ok((_, FromAgent::Reply(r))) => return r,
                Ok((t, FromAgent::Events(ev))) => {
                    self.events.extend(ev.into_iter().map(|e| (t, e)))
                }
                Ok((_, other)) => panic!("unexpected {other:?}"),
                Err(_) => panic!("no reply within 30 s"),
            }
        }
    }

    fn call(&mut self, a: &mut Agent, op: Op) -> Result<Done, WireError> {
        request(a, 1, op);
        let r = self.reply();
        assert_eq!(r.id, 1);
        r.result
    }

    /// Events until one satisfies `want` (5 s at most); returns when it arrived.
    #[track_caller]
    fn event(&mut self, want: impl Fn(&Event) -> bool) -> Instant {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((t, _)) = self.events.iter().find(|(_, e)| want(e)) {
                return *t;
            }
            match self
                .rx
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok((t, FromAgent::Events(ev))) => {
                    self.events.extend(ev.into_iter().map(|e| (t, e)))
                }
                Ok((_, other)) => panic!("unexpected {other:?}"),
                Err(_) => panic!(
                    "timed out waiting for an event; got {:#?}",
                    self.events.iter().map(|(_, e)| e).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Whatever events arrive within `d`.
    fn settle(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while let Ok((t, m)) = self
            .rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            match m {
                FromAgent::Events(ev) => self.events.extend(ev.into_iter().map(|e| (t, e))),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn is_upsert(path: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::Upsert { path: q, .. } if q.as_bytes() == path.as_bytes())
}

fn event_paths(events: &[(Instant, Event)]) -> Vec<String> {
    events
        .iter()
        .map(|(_, e)| match e {
            Event::Upsert { path, .. } => format!("upsert {path}"),
            Event::Remove { path } => format!("remove {path}"),
            Event::Rename { from, to } => format!("rename {from} -> {to}"),
            Event::Rescan { path, .. } => format!("rescan {path}"),
        })
        .collect()
}

/// A whole walk with `inflight` WalkNext requests outstanding; batches in request order.
fn pipelined_walk(a: &mut Agent, f: &mut Frames, max: u32, inflight: u64) -> Vec<TreeEntry> {
    let Ok(Done::Handle(h)) = f.call(a, Op::WalkOpen { path: p("") }) else {
        panic!("walk open")
    };
    let mut next_id = 100u64;
    for _ in 0..inflight {
        request(a, next_id, Op::WalkNext { handle: h, max });
        next_id += 1;
    }
    let mut got: BTreeMap<u64, (Vec<TreeEntry>, bool)> = BTreeMap::new();
    let mut ended_at: Option<u64> = None;
    // Until the end is seen and every request sent is answered.
    while ended_at.is_none() || (got.len() as u64) < next_id - 100 {
        let r = f.reply();
        let Ok(Done::Tree { zstd, count, eof }) = r.result else {
            panic!("{:?}", r.result)
        };
        let batch = kmount_proto::tree::decode_entries(&zstd).unwrap();
        assert_eq!(batch.len(), count as usize);
        if eof && ended_at.is_none_or(|e| r.id < e) {
            ended_at = Some(r.id);
        }
        got.insert(r.id, (batch, eof));
        if ended_at.is_none() {
            request(a, next_id, Op::WalkNext { handle: h, max });
            next_id += 1;
        }
    }
    // Batches after the end are empty; everything before it is the walk, in order.
    let end = ended_at.unwrap();
    for (id, (batch, eof)) in &got {
        if *id > end {
            assert!(batch.is_empty() && *eof, "request {id} after the end");
        }
    }
    got.into_iter()
        .filter(|(id, _)| *id <= end)
        .flat_map(|(_, (b, _))| b)
        .collect()
}

#[test]
fn a_pipelined_walk_arrives_parents_first_in_request_order() {
    let tmp = shm_tempdir();
    make_tree(tmp.path(), 3000);
    let mut a = Agent::spawn(&[], tmp.path());
    a.hello();
    let mut f = Frames::new(&mut a);
    let all = pipelined_walk(&mut a, &mut f, 97, 4);
    let mut seen: HashSet<RelPath> = HashSet::new();
    for e in &all {
        let (parent, _) = e.path.split_last().unwrap();
        assert!(
            parent.is_root() || seen.contains(&parent),
            "{} before its parent",
            e.path
        );
        assert!(seen.insert(e.path.clone()), "{} twice", e.path);
    }
    let files = all
        .iter()
        .filter(|e| e.attr.file_type() == 0o100000)
        .count();
    assert_eq!(files, 3000);
    // Digests over the stream agree with the ones computed from the walk on this side.
    let Ok(Done::Digests(d)) = f.call(
        &mut a,
        Op::Digest {
            path: p(""),
            depth: 0,
        },
    ) else {
        panic!()
    };
    assert_eq!(d[0].digest, digest_of(&all));
    drop(f);
    assert_eq!(a.finish().0.code(), Some(0));
}

/// The root's digest computed from walk entries, as the mount does.
fn digest_of(entries: &[TreeEntry]) -> [u8; 16] {
    use kmount_proto::digest::{Child, dir_digest};
    let mut children: HashMap<RelPath, Vec<&TreeEntry>> = HashMap::new();
    let mut dirs = vec![RelPath::root()];
    for e in entries {
        children
            .entry(e.path.split_last().unwrap().0)
            .or_default()
            .push(e);
        if e.attr.is_dir() {
            dirs.push(e.path.clone());
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let mut out: HashMap<RelPath, [u8; 16]> = HashMap::new();
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
    out[&RelPath::root()]
}

fn journaled(session: u64, seq: u64, op: Op) -> Op {
    Op::Journaled {
        session,
        seq,
        op: Box::new(op),
    }
}

#[test]
fn journaled_requests_apply_in_order_beside_concurrent_ones_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, state) = (tmp.path().join("root"), tmp.path().join("state"));
    fs::create_dir(&root).unwrap();
    fs::create_dir(&state).unwrap();
    let spawn = || {
        let mut cmd = Command::new(BIN);
        cmd.env("TMPDIR", &state).arg(&root);
        let mut a = Agent::spawn_command(cmd);
        a.hello();
        a
    };
    const S: u64 = 0xfeed;
    let mut a = spawn();
    let mut f = Frames::new(&mut a);
    // 300 journaled changes whose result depends on their order, all in flight at once,
    // interleaved with ordinary requests.
    let n = 300u64;
    for seq in 1..=n {
        let op = match seq % 3 {
            0 => Op::PutFile {
                path: p("counter"),
                data: seq.to_string().into_bytes(),
                compressed: false,
                mode: 0o644,
                mtime: None,
                atomic: seq % 2 == 0,
                keep_mode: false,
            },
            1 => Op::Mkdir {
                path: p(&format!("d{seq}")),
                mode: 0o755,
            },
            _ => Op::Rmdir {
                path: p(&format!("d{}", seq - 1)),
            },
        };
        request(&mut a, seq, journaled(S, seq, op));
        request(&mut a, 10_000 + seq, Op::Ping);
    }
    let mut ok = 0;
    for _ in 0..2 * n {
        let r = f.reply();
        assert!(r.result.is_ok(), "request {}: {:?}", r.id, r.result);
        ok += 1;
    }
    assert_eq!(ok, 2 * n);
    assert_eq!(fs::read_to_string(root.join("counter")).unwrap(), "300");
    let dirs: Vec<_> = fs::read_dir(&root).unwrap().collect();
    assert_eq!(
        dirs.len(),
        1,
        "every mkdir was undone by the rmdir after it"
    );
    assert_eq!(
        f.call(&mut a, Op::AppliedSeq { session: S }),
        Ok(Done::Seq(n))
    );
    // A replay of what was applied is harmless; a gap is refused.
    for seq in n - 5..=n {
        let op = Op::Mkdir {
            path: p("replayed"),
            mode: 0o755,
        };
        assert_eq!(f.call(&mut a, journaled(S, seq, op)), Ok(Done::Ok));
    }
    assert!(!root.join("replayed").exists());
    let e = f.call(&mut a, journaled(S, n + 2, Op::Ping)).unwrap_err();
    assert_eq!(e.errno, libc::EPROTO);
    drop(f);
    assert_eq!(a.finish().0.code(), Some(0));
    // A new agent (same state directory) knows where the session stands.
    let mut a = spawn();
    let mut f = Frames::new(&mut a);
    assert_eq!(
        f.call(&mut a, Op::AppliedSeq { session: S }),
        Ok(Done::Seq(n))
    );
    assert_eq!(
        f.call(&mut a, Op::AppliedSeq { session: S + 1 }),
        Ok(Done::Seq(0))
    );
    drop(f);
    assert_eq!(a.finish().0.code(), Some(0));
}

#[test]
fn events_flow_on_stdout_and_the_mounts_own_requests_do_not_echo() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("existing"), b"0123456789").unwrap();
    let mut a = Agent::spawn(&[], tmp.path());
    a.hello();
    let mut f = Frames::new(&mut a);
    assert_eq!(f.call(&mut a, Op::Watch { enable: true }), Ok(Done::Ok));
    fs::write(tmp.path().join("external"), b"x").unwrap();
    f.event(is_upsert("external"));
    f.settle(Duration::from_millis(50));
    f.events.clear();
    // The mount's own changes, journaled and not.
    let ops = vec![
        Op::Mkdir {
            path: p("own"),
            mode: 0o755,
        },
        journaled(
            1,
            1,
            Op::PutFile {
                path: p("own/file"),
                data: b"data".to_vec(),
                compressed: false,
                mode: 0o644,
                mtime: None,
                atomic: true,
                keep_mode: false,
            },
        ),
        journaled(
            1,
            2,
            Op::WritePath {
                path: p("existing"),
                offset: 3,
                data: b"abc".to_vec(),
            },
        ),
        Op::Rename {
            from: p("own/file"),
            to: p("moved"),
            flags: 0,
        },
        Op::Unlink { path: p("moved") },
    ];
    for op in ops {
        let shown = format!("{op:?}");
        f.call(&mut a, op)
            .unwrap_or_else(|e| panic!("{shown}: {e}"));
    }
    fs::write(tmp.path().join("sentinel"), b"s").unwrap();
    f.event(is_upsert("sentinel"));
    f.settle(Duration::from_millis(50));
    let got = event_paths(&f.events);
    assert!(
        got.iter()
            .all(|e| e == "upsert sentinel" || e == "upsert ."),
        "echoes: {got:?}"
    );
    drop(f);
    assert_eq!(a.finish().0.code(), Some(0));
}

#[test]
fn at_the_watch_limit_directories_are_polled_and_the_user_is_told() {
    // A user namespace of our own lets this test lower the watch limit without touching the
    // host's (`/proc/sys/user/max_inotify_watches` is per user namespace).
    let probe = Command::new("unshare")
        .args([
            "-U",
            "-r",
            "sh",
            "-c",
            "echo 8 > /proc/sys/user/max_inotify_watches",
        ])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIPPED at_the_watch_limit_directories_are_polled_and_the_user_is_told: cannot \
             make a user namespace with a lower inotify watch limit here (unshare -U -r)"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..20 {
        fs::create_dir_all(tmp.path().join(format!("d{i}/sub"))).unwrap();
        fs::write(tmp.path().join(format!("d{i}/sub/f")), b"x").unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("unshare");
    cmd.env("TMPDIR", state.path())
        .args([
            "-U",
            "-r",
            "sh",
            "-c",
            "echo 8 > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"",
            BIN,
        ])
        .arg(tmp.path());
    let mut a = Agent::spawn_command(cmd);
    a.hello();
    let mut f = Frames::new(&mut a);
    assert_eq!(f.call(&mut a, Op::Watch { enable: true }), Ok(Done::Ok));
    f.event(|e| matches!(e, Event::Rescan { .. }));
    let rescans: Vec<String> = f
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Rescan { path, reason } => {
                assert!(reason.contains("watch limit"), "{reason}");
                Some(path.to_string())
            }
            _ => None,
        })
        .collect();
    assert!(!rescans.is_empty());
    // A change in an unwatched directory still arrives, by polling.
    let unwatched = rescans
        .iter()
        .find(|p| p.starts_with('d'))
        .expect("some d* directory is unwatched")
        .clone();
    let dir = unwatched.split('/').next().unwrap().to_string();
    let target = format!("{dir}/sub/f");
    let t = Instant::now();
    fs::write(tmp.path().join(&target), b"changed").unwrap();
    f.event(|e| {
        matches!(e, Event::Upsert { path, attr, .. }
            if path.as_bytes() == target.as_bytes() && attr.size == 7)
    });
    eprintln!(
        "a change in an unwatched directory arrived after {:?}",
        t.elapsed()
    );
    // A directory that is watched still reports at once.
    drop(f);
    let (status, err) = a.finish();
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(err.matches("watch limit is reached").count(), 1, "{err}");
    assert!(
        err.contains("fs.inotify.max_user_watches =")
            && err.contains("sysctl fs.inotify.max_user_watches=524288"),
        "{err}"
    );
}

/// The figures: walk and digest CPU time, watcher latency, resident memory, on a
/// 24,000-file tree.
#[test]
fn figures_for_a_24000_file_tree() {
    let tmp = shm_tempdir();
    make_tree(tmp.path(), 24_000);
    let mut a = Agent::spawn(&[], tmp.path());
    a.hello();
    let pid = a.child.id();
    let mut f = Frames::new(&mut a);
    let release = !cfg!(debug_assertions);

    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    let all = pipelined_walk(&mut a, &mut f, 4096, 3);
    let (walk_cpu, walk_wall) = (cpu_time(pid) - cpu0, t0.elapsed());
    assert!(all.len() > 24_000);

    let rounds = 5;
    let cpu0 = cpu_time(pid);
    for _ in 0..rounds {
        let Ok(Done::Digests(d)) = f.call(
            &mut a,
            Op::Digest {
                path: p(""),
                depth: 3,
            },
        ) else {
            panic!()
        };
        assert!(d.len() > 1);
    }
    let digest_cpu = (cpu_time(pid) - cpu0) / rounds;

    let cpu0 = cpu_time(pid);
    assert_eq!(f.call(&mut a, Op::Watch { enable: true }), Ok(Done::Ok));
    let watch_cpu = cpu_time(pid) - cpu0;

    // Latency: one external write at a time, until its event is on stdout.
    let mut lat = Vec::new();
    for i in 0..200 {
        let rel = format!(
            "node_modules/pkg{}/lib/sub{}/file{}.js",
            i % 250,
            i % 8,
            i % 12
        );
        let file = fs::OpenOptions::new()
            .write(true)
            .open(tmp.path().join(&rel))
            .unwrap();
        let t = Instant::now();
        file.write_all_at(b"//", 0).unwrap();
        let arrived =
            f.event(|e| matches!(e, Event::Upsert { path, .. } if path.to_string() == rel));
        lat.push(arrived.saturating_duration_since(t));
        drop(file);
        f.settle(Duration::from_millis(8));
        f.events.clear();
    }
    lat.sort();
    let (p50, p95) = (lat[lat.len() / 2], lat[lat.len() * 95 / 100]);
    let (rss, peak) = (a.mem_kib("VmRSS:"), a.mem_kib("VmHWM:"));
    eprintln!(
        "24,000 files ({} entries), {} build:\n  walk: {walk_cpu:?} agent CPU ({walk_wall:?} wall)\n  \
         digest of the whole tree: {digest_cpu:?} agent CPU each (every 30 s = {:.3}% of a core)\n  \
         watching everything: {watch_cpu:?} agent CPU to start\n  watcher latency over 200 \
         writes: p50 {p50:?}, p95 {p95:?}\n  resident while watching: {rss} KiB (peak {peak} KiB)",
        all.len(),
        if release { "release" } else { "debug" },
        digest_cpu.as_secs_f64() / 30.0 * 100.0,
    );
    assert!(rss < 40 << 10, "resident {rss} KiB");
    assert!(peak < 40 << 10, "peak {peak} KiB");
    if release {
        assert!(walk_cpu < Duration::from_secs(1), "walk {walk_cpu:?}");
        assert!(
            digest_cpu < Duration::from_millis(1500),
            "digest {digest_cpu:?} is over 5% of a core every 30 s"
        );
    }
    assert!(p95 < Duration::from_millis(250), "p95 {p95:?}");
    drop(f);
    assert_eq!(a.finish().0.code(), Some(0));
}

#[test]
fn whole_file_requests_over_the_stream_stay_within_memory_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Agent::spawn(&[], tmp.path());
    a.hello();
    let mut f = Frames::new(&mut a);
    // 24 MiB of text, sent compressed in one PutFile, written streaming.
    let line = b"let x = 1; // some source code that compresses well\n";
    let big: Vec<u8> = line.iter().copied().cycle().take(24 << 20).collect();
    let z = kmount_proto::tree::compress(&big).unwrap();
    let put = Op::PutFile {
        path: p("big.js"),
        data: z,
        compressed: true,
        mode: 0o644,
        mtime: None,
        atomic: true,
        keep_mode: false,
    };
    let Ok(Done::Attr(attr)) = f.call(&mut a, put) else {
        panic!("put failed")
    };
    assert_eq!(attr.size, big.len() as u64);
    assert_eq!(fs::read(tmp.path().join("big.js")).unwrap(), big);
    // Many whole-range reads in flight at once.
    let chunk = 1u32 << 20;
    for i in 0..24u64 {
        request(
            &mut a,
            i,
            Op::ReadPath {
                path: p("big.js"),
                offset: i * u64::from(chunk),
                len: chunk,
            },
        );
    }
    for _ in 0..24 {
        let r = f.reply();
        let Ok(Done::Content {
            attr: got,
            data,
            compressed,
        }) = r.result
        else {
            panic!("{:?}", r.result)
        };
        assert_eq!(got.ino, attr.ino);
        assert!(compressed, "text compresses");
        let data = kmount_proto::tree::decompress(&data, chunk as usize).unwrap();
        let at = (r.id * u64::from(chunk)) as usize;
        assert_eq!(data, &big[at..at + chunk as usize]);
    }
    assert_eq!(
        f.call(
            &mut a,
            Op::WritePath {
                path: p("big.js"),
                offset: 3,
                data: b"Y".to_vec(),
            }
        ),
        Ok(Done::Written(1))
    );
    assert_eq!(
        f.call(
            &mut a,
            Op::FsyncPath {
                path: p("big.js"),
                datasync: true,
            }
        ),
        Ok(Done::Ok)
    );
    assert_eq!(
        f.call(
            &mut a,
            Op::FallocatePath {
                path: p("big.js"),
                mode: libc::FALLOC_FL_KEEP_SIZE,
                offset: 0,
                len: 32 << 20,
            }
        ),
        Ok(Done::Ok)
    );
    let peak = a.mem_kib("VmHWM:");
    eprintln!("agent peak resident set {peak} KiB");
    assert!(peak < 40 << 10, "agent resident set peaked at {peak} KiB");
    drop(f);
    assert_eq!(a.finish().0.code(), Some(0));
    assert_eq!(&fs::read(tmp.path().join("big.js")).unwrap()[..5], b"letYx");
}
