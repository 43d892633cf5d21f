//! The real `kmount-agent` binary, driven over its stdin/stdout.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{Agent, BIN, is_root, p};
use kmount_proto::{
    Caller, Done, FromAgent, Hello, MAX_FRAME_LEN, Op, PROTOCOL_VERSION, Request, ToAgent, encode,
    features,
};

#[test]
fn a_session_pipelines_requests_and_ends_cleanly_at_eof() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), vec![b'z'; 1 << 20]).unwrap();
    let mut a = Agent::spawn(&[], tmp.path());
    let h = a.hello();
    assert_eq!(h.features & features::IDENTITY, 0);
    let local_first = features::TREE | features::WATCH | features::JOURNAL;
    assert_eq!(h.features & local_first, local_first);

    // Open a file, then fire many independent requests at once: reads at different offsets,
    // lookups, mkdirs, pings, an error. Replies may come in any order.
    let Ok(Done::Opened { handle, attr }) = a.call(Op::Open {
        path: p("f"),
        flags: libc::O_RDONLY,
    }) else {
        panic!("open failed")
    };
    assert_eq!(attr.size, 1 << 20);
    let mut expect: HashMap<u64, &str> = HashMap::new();
    let mut id = 100;
    for i in 0..16u64 {
        id += 1;
        a.request(
            id,
            None,
            Op::Read {
                handle,
                offset: i * 65536,
                len: 65536,
            },
        );
        expect.insert(id, "read");
    }
    for i in 0..8 {
        id += 1;
        a.request(
            id,
            None,
            Op::Mkdir {
                path: p(&format!("d{i}")),
                mode: 0o755,
            },
        );
        expect.insert(id, "mkdir");
        id += 1;
        a.request(id, None, Op::Ping);
        expect.insert(id, "ping");
    }
    id += 1;
    a.request(id, None, Op::Lookup { path: p("missing") });
    expect.insert(id, "missing");
    id += 1;
    a.request(id, None, Op::Statfs);
    expect.insert(id, "statfs");
    // Close the input at once: everything in flight must still be answered.
    a.close_stdin();
    let mut answered = 0;
    while let Some(msg) = a.recv() {
        let FromAgent::Reply(r) = msg else {
            panic!("unexpected {msg:?}")
        };
        let kind = expect.remove(&r.id).expect("one reply per request id");
        answered += 1;
        match (kind, r.result) {
            ("read", Ok(Done::Data(d))) => assert_eq!(d, vec![b'z'; 65536]),
            ("mkdir", Ok(Done::Attr(a))) => assert!(a.is_dir()),
            ("ping", Ok(Done::Ok)) => {}
            ("statfs", Ok(Done::Statfs(s))) => assert!(s.blocks > 0),
            ("missing", Err(e)) => {
                assert_eq!(e.errno, libc::ENOENT);
                assert!(e.message.contains("missing"), "{}", e.message);
            }
            (kind, other) => panic!("{kind}: {other:?}"),
        }
    }
    assert_eq!(answered, 34);
    assert!(expect.is_empty());
    let (status, err) = a.finish();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    for i in 0..8 {
        assert!(tmp.path().join(format!("d{i}")).is_dir());
    }
}

#[test]
fn big_writes_and_reads_stay_within_memory_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Agent::spawn(&[], tmp.path());
    a.hello();
    let Ok(Done::Opened { handle, .. }) = a.call(Op::Create {
        path: p("big"),
        flags: libc::O_RDWR,
        mode: 0o644,
    }) else {
        panic!("create failed")
    };
    let chunk = 4 << 20;
    let count = 16u64;
    for i in 0..count {
        let data = vec![i as u8; chunk];
        a.request(
            i,
            None,
            Op::Write {
                handle,
                offset: i * chunk as u64,
                data,
            },
        );
    }
    for _ in 0..count {
        let r = a.reply();
        assert_eq!(r.result, Ok(Done::Written(chunk as u32)));
    }
    for i in 0..count {
        a.request(
            i,
            None,
            Op::Read {
                handle,
                offset: i * chunk as u64,
                len: chunk as u32,
            },
        );
    }
    for _ in 0..count {
        let r = a.reply();
        let Ok(Done::Data(d)) = r.result else {
            panic!("{:?}", r.result)
        };
        assert_eq!(d.len(), chunk);
        assert!(d.iter().all(|&b| b == r.id as u8));
    }
    let (rss, peak) = (a.mem_kib("VmRSS:"), a.mem_kib("VmHWM:"));
    eprintln!("agent resident set {rss} KiB, peak {peak} KiB");
    assert!(
        rss < 16 << 10,
        "agent resident set is {rss} KiB after the burst"
    );
    assert!(peak < 40 << 10, "agent resident set peaked at {peak} KiB");
    assert_eq!(a.call(Op::Close { handle }), Ok(Done::Ok));
    let (status, _) = a.finish();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        std::fs::metadata(tmp.path().join("big")).unwrap().len(),
        count * chunk as u64
    );
}

/// This process's supplementary groups, as the agent (a child with the same credentials)
/// reports its own.
fn own_groups() -> Vec<u32> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
    line["Groups:".len()..]
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect()
}

#[test]
fn the_agent_says_who_it_runs_as_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Agent::spawn(&[], tmp.path());
    let Some(FromAgent::Hello(h)) = a.recv() else {
        panic!("no hello")
    };
    assert_ne!(h.features & features::RUNS_AS, 0);
    a.send(&ToAgent::Hello(Hello::new(features::RUNS_AS, "owner test")));
    a.request(1, None, Op::Ping);
    // SAFETY: geteuid and getegid cannot fail.
    let me = unsafe { (libc::geteuid(), libc::getegid()) };
    let Some(FromAgent::RunsAs { uid, gid, groups }) = a.recv() else {
        panic!("no RunsAs")
    };
    assert_eq!((uid, gid), me);
    let mut want = own_groups();
    let mut groups = groups;
    want.sort_unstable();
    groups.sort_unstable();
    assert_eq!(groups, want);
    let Some(FromAgent::Reply(r)) = a.recv() else {
        panic!("no reply to the ping")
    };
    assert_eq!((r.id, r.result), (1, Ok(Done::Ok)));
    a.close_stdin();
    assert_eq!(a.recv(), None);

    // A mount that does not ask is not told.
    let mut a = Agent::spawn(&[], tmp.path());
    a.hello();
    assert_eq!(a.call(Op::Ping), Ok(Done::Ok));
}

#[test]
fn version_mismatch_is_fatal_and_names_both_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Agent::spawn(&[], tmp.path());
    let Some(FromAgent::Hello(_)) = a.recv() else {
        panic!("no hello")
    };
    let mut theirs = Hello::new(0, "kmount 9.9");
    theirs.version = PROTOCOL_VERSION + 1;
    a.send(&ToAgent::Hello(theirs));
    let Some(FromAgent::Fatal(msg)) = a.recv() else {
        panic!("no fatal")
    };
    assert!(msg.contains(&PROTOCOL_VERSION.to_string()), "{msg}");
    assert!(msg.contains(&(PROTOCOL_VERSION + 1).to_string()), "{msg}");
    assert!(msg.contains("kmount 9.9"), "{msg}");
    let (status, err) = a.finish();
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("version"), "{err}");
}

#[test]
fn malformed_frames_are_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let garbage: Vec<u8> = [&5u32.to_le_bytes()[..], &[0xff; 5]].concat();
    let oversized = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes().to_vec();
    let second_hello = encode(&ToAgent::Hello(Hello::new(0, "again"))).unwrap();
    for (what, bytes) in [
        ("garbage", garbage),
        ("oversized", oversized),
        ("second hello", second_hello),
    ] {
        let mut a = Agent::spawn(&[], tmp.path());
        a.hello();
        assert_eq!(a.call(Op::Ping), Ok(Done::Ok));
        a.send_raw(&bytes);
        let Some(FromAgent::Fatal(msg)) = a.recv() else {
            panic!("{what}: no fatal")
        };
        assert!(!msg.is_empty());
        let (status, _) = a.finish();
        assert_eq!(status.code(), Some(1), "{what}");
    }
    // A frame cut in the middle by the end of the stream is malformed too.
    let mut a = Agent::spawn(&[], tmp.path());
    a.hello();
    let frame = encode(&ToAgent::Request(Request {
        id: 1,
        caller: None,
        op: Op::Ping,
    }))
    .unwrap();
    a.send_raw(&frame[..frame.len() - 1]);
    a.close_stdin();
    let Some(FromAgent::Fatal(msg)) = a.recv() else {
        panic!("truncated: no fatal")
    };
    assert!(msg.contains("middle of a frame"), "{msg}");
    assert_eq!(a.finish().0.code(), Some(1));
}

#[test]
fn refuses_to_serve_with_hello_then_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("served");
    let mnt = root.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let mnt_s = mnt.to_str().unwrap().to_owned();
    let root_s = root.to_str().unwrap().to_owned();
    let missing = tmp.path().join("missing");
    let cases: Vec<(Vec<&str>, &Path, &str)> = vec![
        (vec![], &missing, "cannot serve"),
        (vec![], &file, "not a directory"),
        (
            vec!["--mountpoint", &mnt_s],
            &root,
            "contains the mountpoint",
        ),
        (vec!["--mountpoint", &root_s], &mnt, "inside the mountpoint"),
        (vec!["--bogus"], &root, "unknown option"),
    ];
    for (args, path, expected) in cases {
        let mut a = Agent::spawn(&args, path);
        let Some(FromAgent::Hello(_)) = a.recv() else {
            panic!("{expected}: no hello")
        };
        let Some(FromAgent::Fatal(msg)) = a.recv() else {
            panic!("{expected}: no fatal")
        };
        assert!(msg.contains(expected), "{msg}");
        let (status, err) = a.finish();
        assert_eq!(status.code(), Some(2), "{expected}");
        assert!(err.contains(expected), "{err}");
    }
}

#[test]
fn version_flag() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        s.trim(),
        format!(
            "kmount-agent {} protocol {}",
            env!("CARGO_PKG_VERSION"),
            PROTOCOL_VERSION
        )
    );
}

#[test]
fn identity_over_the_wire() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("r");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mut a = Agent::spawn(&["--identity"], &root);
    let h = a.hello();
    if !is_root() {
        assert_eq!(h.features & features::IDENTITY, 0);
        eprintln!("skipped the rest: identity switching needs root");
        return;
    }
    assert_eq!(h.features & features::IDENTITY, features::IDENTITY);
    let nobody = Caller {
        uid: 65534,
        gid: 65534,
        groups: vec![],
    };
    a.request(
        7,
        Some(nobody.clone()),
        Op::Mkdir {
            path: p("theirs"),
            mode: 0o700,
        },
    );
    let r = a.reply();
    let Ok(Done::Attr(attr)) = r.result else {
        panic!("{:?}", r.result)
    };
    assert_eq!((attr.uid, attr.gid), (65534, 65534));
    // Without a caller the request runs as the agent (root).
    let Ok(Done::Attr(mine)) = a.call(Op::Mkdir {
        path: p("mine"),
        mode: 0o700,
    }) else {
        panic!()
    };
    assert_eq!(mine.uid, 0);
    // The caller may not look into root's private directory.
    a.request(8, Some(nobody), Op::OpenDir { path: p("mine") });
    assert_eq!(a.reply().result.unwrap_err().errno, libc::EACCES);
    assert_eq!(std::fs::metadata(root.join("theirs")).unwrap().uid(), 65534);
    assert_eq!(a.finish().0.code(), Some(0));
}

/// The agent is copied into containers whatever their libc: it must not need a dynamic loader.
#[test]
fn the_binary_is_static() {
    if !cfg!(all(target_os = "linux", target_env = "gnu"))
        || std::env::var_os("KMOUNT_AGENT_DYNAMIC").is_some()
    {
        eprintln!("skipped: static linking is only set up for *-linux-gnu");
        return;
    }
    let elf = std::fs::read(BIN).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "64-bit ELF expected");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
        assert_ne!(p_type, PT_INTERP, "{BIN} asks for a dynamic loader");
    }
}
