//! A mount that misbehaves, seen from the real `kmount-agent` binary: requests naming paths the
//! protocol refuses, and what the agent exposes besides its stdio (nothing).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Agent, p};
use kmount_proto::{Done, Op, Reply, Request, ToAgent, encode};

/// A LEB128 varint, as postcard writes lengths and integers.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// The frame of request `id` running `op`, whose path named `X` is replaced by `bad`, bytes
/// that `RelPath::new` would never let through.
fn frame_with_path(id: u64, op: Op, bad: &[u8]) -> Vec<u8> {
    let good = encode(&ToAgent::Request(Request {
        id,
        caller: None,
        op,
    }))
    .unwrap();
    let payload = &good[4..];
    let at = payload
        .windows(2)
        .position(|w| w == [1, b'X'])
        .expect("the op names the path X");
    let mut out = payload[..at].to_vec();
    out.extend(varint(bad.len() as u64));
    out.extend_from_slice(bad);
    out.extend_from_slice(&payload[at + 2..]);
    let mut frame = (out.len() as u32).to_le_bytes().to_vec();
    frame.extend(out);
    frame
}

fn listing(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in walk(dir) {
        let rel = e.strip_prefix(dir).unwrap().display().to_string();
        out.insert(rel, std::fs::read(&e).unwrap_or_default());
    }
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn requests_naming_paths_that_are_not_paths_fail_alone_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("x"), b"outside").unwrap();
    std::fs::write(root.join("inside"), b"inside").unwrap();
    let before = (listing(&root), listing(&outside));

    let dotdot = b"../outside/x".to_vec();
    let deep = b"a/../../outside/x".to_vec();
    let absolute = format!("{}/x", outside.display()).into_bytes();
    let empty_name = b"a//b".to_vec();
    let trailing = b"a/".to_vec();
    let dot = b"./x".to_vec();
    let nul = b"x\0../../etc".to_vec();
    let long_name = vec![b'n'; 256];
    let megabyte = vec![b'm'; 1 << 20];
    let bad_paths: Vec<(&str, &[u8])> = vec![
        ("'..'", &dotdot),
        ("'..'", &deep),
        ("'/'", &absolute),
        ("empty", &empty_name),
        ("trailing", &trailing),
        ("'.'", &dot),
        ("NUL", &nul),
        ("longer than 255", &long_name),
        ("longer than 4096", &megabyte),
    ];
    let ops = || {
        vec![
            Op::Lookup { path: p("X") },
            Op::Mkdir {
                path: p("X"),
                mode: 0o755,
            },
            Op::Create {
                path: p("X"),
                flags: libc::O_WRONLY,
                mode: 0o644,
            },
            Op::PutFile {
                path: p("X"),
                data: b"planted".to_vec(),
                compressed: false,
                mode: 0o644,
                mtime: None,
                atomic: true,
                keep_mode: false,
            },
            Op::Symlink {
                path: p("X"),
                target: b"/".to_vec(),
            },
            Op::Unlink { path: p("X") },
            Op::Rename {
                from: p("inside"),
                to: p("X"),
                flags: 0,
            },
            Op::Link {
                from: p("inside"),
                to: p("X"),
            },
            Op::Journaled {
                session: 77,
                seq: 1,
                op: Box::new(Op::Mkdir {
                    path: p("X"),
                    mode: 0o755,
                }),
            },
        ]
    };

    let mut a = Agent::spawn(&[], &root);
    a.hello();
    let mut id = 100;
    for (says, bad) in &bad_paths {
        for op in ops() {
            id += 1;
            let shown = format!("{op:?}");
            a.send_raw(&frame_with_path(id, op, bad));
            let Reply { id: got, result } = a.reply();
            assert_eq!(got, id, "{shown}");
            let err = result.expect_err(&shown);
            assert_eq!(err.errno, libc::EINVAL, "{shown}: {err}");
            assert!(err.message.contains(says), "{shown}: {err}");
            assert!(
                err.message.len() < 512,
                "{shown}: {} bytes",
                err.message.len()
            );
        }
    }
    // The session goes on, and nothing anywhere changed.
    assert_eq!(a.call(Op::Ping), Ok(Done::Ok));
    assert_eq!((listing(&root), listing(&outside)), before);
    let (status, _) = a.finish();
    assert_eq!(status.code(), Some(0));
}

/// Sockets among a process's descriptors, as `(fd, link)`.
fn sockets(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let link = link.display().to_string();
        if link.starts_with("socket:") {
            out.push((e.file_name().to_str().unwrap().parse().unwrap(), link));
        }
    }
    out
}

/// Inodes of listening TCP sockets and bound UDP sockets in the process's network namespace.
fn listening_inodes(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for (table, state) in [("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == state {
                out.push(cols[9].to_string());
            }
        }
    }
    out
}

#[test]
fn the_agent_opens_no_socket_and_listens_on_no_port() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"x").unwrap();
    let mut a = Agent::spawn(&[], tmp.path());
    a.hello();
    // Everything that starts threads or opens descriptors: the watcher, a walk, a read.
    assert_eq!(a.call(Op::Watch { enable: true }), Ok(Done::Ok));
    let Ok(Done::Handle(walk)) = a.call(Op::WalkOpen {
        path: kmount_proto::RelPath::root(),
    }) else {
        panic!("no walk")
    };
    assert!(
        a.call(Op::WalkNext {
            handle: walk,
            max: 10
        })
        .is_ok()
    );
    assert!(
        a.call(Op::ReadPath {
            path: p("f"),
            offset: 0,
            len: 10
        })
        .is_ok()
    );
    std::fs::write(tmp.path().join("g"), b"y").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));

    let pid = a.child.id();
    // Its stdio are pipes here; over ssh they may be sockets, which would be fds 0 to 2.
    let extra: Vec<_> = sockets(pid).into_iter().filter(|(fd, _)| *fd > 2).collect();
    assert!(extra.is_empty(), "the agent holds sockets: {extra:?}");
    let ours: Vec<String> = sockets(pid)
        .into_iter()
        .map(|(_, l)| {
            l.trim_start_matches("socket:[")
                .trim_end_matches(']')
                .to_string()
        })
        .collect();
    let listening = listening_inodes(pid);
    assert!(
        ours.iter().all(|i| !listening.contains(i)),
        "the agent listens on a port: {ours:?} among {listening:?}"
    );
    assert_eq!(a.call(Op::Ping), Ok(Done::Ok));
    let _ = a.finish();
}
