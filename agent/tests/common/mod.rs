//! The real `kmount-agent` binary, driven over its stdin/stdout.
#![allow(dead_code)] // each test file uses its own part

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Instant;

use kmount_proto::{
    Caller, Done, Event, FromAgent, Hello, Op, PROTOCOL_VERSION, RelPath, Reply, Request, ToAgent,
    WireError, decode, encode, read_frame,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_kmount-agent");

pub struct Agent {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    /// Events that arrived while waiting for replies.
    pub events: Vec<Event>,
    state: Option<tempfile::TempDir>,
}

impl Agent {
    /// The agent serving `root`, with a private state directory of its own (`TMPDIR`).
    pub fn spawn(args: &[&str], root: &Path) -> Agent {
        let state = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(args).arg(root).env("TMPDIR", state.path());
        let mut a = Agent::spawn_command(cmd);
        a.state = Some(state);
        a
    }

    /// Runs `cmd` (which execs the agent) with piped stdio.
    pub fn spawn_command(mut cmd: Command) -> Agent {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kmount-agent");
        Agent {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            child,
            events: Vec::new(),
            state: None,
        }
    }

    pub fn recv(&mut self) -> Option<FromAgent> {
        read_frame(self.stdout.as_mut().expect("stdout not handed to frames()"))
            .expect("reading a frame")
            .map(|p| decode(&p).expect("decoding a frame"))
    }

    /// Hands stdout to a thread that decodes every frame as it arrives, stamped with the
    /// time it was read.
    pub fn frames(&mut self) -> Receiver<(Instant, FromAgent)> {
        let mut out = self.stdout.take().expect("stdout not handed out yet");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            while let Ok(Some(p)) = read_frame(&mut out) {
                if tx
                    .send((Instant::now(), decode(&p).expect("decoding a frame")))
                    .is_err()
                {
                    break;
                }
            }
        });
        rx
    }

    pub fn send(&mut self, msg: &ToAgent) {
        self.send_raw(&encode(msg).unwrap());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(bytes).unwrap();
        w.flush().unwrap();
    }

    /// Reads the agent's hello and answers with ours.
    pub fn hello(&mut self) -> Hello {
        let Some(FromAgent::Hello(h)) = self.recv() else {
            panic!("no hello from the agent")
        };
        assert_eq!(h.version, PROTOCOL_VERSION);
        assert!(h.software.starts_with("kmount-agent "), "{}", h.software);
        self.send(&ToAgent::Hello(Hello::new(0, "pipe test")));
        h
    }

    pub fn request(&mut self, id: u64, caller: Option<Caller>, op: Op) {
        self.send(&ToAgent::Request(Request { id, caller, op }));
    }

    /// The next reply; events on the way are kept in [`Agent::events`].
    pub fn reply(&mut self) -> Reply {
        loop {
            match self.recv() {
                Some(FromAgent::Reply(r)) => return r,
                Some(FromAgent::Events(e)) => self.events.extend(e),
                other => panic!("expected a reply, got {other:?}"),
            }
        }
    }

    pub fn call(&mut self, op: Op) -> Result<Done, WireError> {
        self.request(1, None, op);
        let r = self.reply();
        assert_eq!(r.id, 1);
        r.result
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn finish(mut self) -> (ExitStatus, String) {
        self.close_stdin();
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, err)
    }

    /// A `/proc/PID/status` memory figure (`VmRSS`, `VmHWM`) in KiB.
    pub fn mem_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = s.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

pub fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A tree like a JavaScript project's: `files` regular files spread over nested package
/// directories (12 per directory), with a symlink and an empty directory here and there.
pub fn make_tree(root: &Path, files: usize) {
    let mut made = 0usize;
    let mut pkg = 0usize;
    while made < files {
        let dir = root.join(format!("node_modules/pkg{}/lib/sub{}", pkg / 8, pkg % 8));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..12 {
            if made == files {
                break;
            }
            std::fs::write(
                dir.join(format!("file{i}.js")),
                format!("module.exports = {pkg} + {i};\n"),
            )
            .unwrap();
            made += 1;
        }
        if pkg.is_multiple_of(8) {
            std::os::unix::fs::symlink("sub0/file0.js", dir.parent().unwrap().join("main.js"))
                .unwrap();
            std::fs::create_dir_all(dir.parent().unwrap().join("empty")).unwrap();
        }
        pkg += 1;
    }
}

/// A temporary directory in memory (`/dev/shm`) when there is one: big trees build quickly.
pub fn shm_tempdir() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// CPU time the process has used so far (all its threads), from the scheduler's counters.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        if let Ok(s) = std::fs::read_to_string(t.join("schedstat")) {
            ns += s.split_whitespace().next().unwrap().parse::<u64>().unwrap();
        }
    }
    std::time::Duration::from_nanos(ns)
}
