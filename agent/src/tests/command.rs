//! `Op::RunCommand`: output, exit status, working directory, timeout.

use std::time::{Duration, Instant};

use kmount_proto::{Done, Op};

use super::*;

struct Ran {
    status: Option<i32>,
    signal: Option<i32>,
    output: String,
    truncated: bool,
    millis: u64,
}

fn run(fx: &Fx, command: &str, timeout_ms: u64) -> Ran {
    match fx.ok(Op::RunCommand {
        command: command.into(),
        timeout_ms,
    }) {
        Done::Command {
            status,
            signal,
            output,
            truncated,
            millis,
        } => Ran {
            status,
            signal,
            output: String::from_utf8_lossy(&output).into_owned(),
            truncated,
            millis,
        },
        other => panic!("expected Command, got {other:?}"),
    }
}

#[test]
fn output_and_exit_status_come_back_from_the_root() {
    let fx = Fx::new();
    std::fs::write(fx.at("marker"), b"here").unwrap();
    let r = run(
        &fx,
        "cat marker; echo; echo to-err >&2; pwd; exit 3",
        10_000,
    );
    assert_eq!(r.status, Some(3));
    assert_eq!(r.signal, None);
    assert!(!r.truncated);
    let root = fx.root().canonicalize().unwrap();
    assert_eq!(
        r.output,
        format!("here\nto-err\n{}\n", root.display()),
        "stdout and stderr together, in the root"
    );
    let ok = run(&fx, "true", 10_000);
    assert_eq!(
        (ok.status, ok.signal, ok.output.as_str()),
        (Some(0), None, "")
    );
    // stdin is /dev/null: a command reading it ends at once.
    assert_eq!(run(&fx, "cat", 10_000).status, Some(0));
}

#[test]
fn long_output_keeps_its_end() {
    let fx = Fx::new();
    let r = run(
        &fx,
        "head -c 100000 /dev/zero | tr '\\0' a; echo END",
        10_000,
    );
    assert_eq!(r.status, Some(0));
    assert!(r.truncated);
    assert_eq!(r.output.len(), crate::command::OUTPUT_KEEP);
    assert!(r.output.ends_with("aaaEND\n"));
}

fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie nobody reaps yet is dead too.
        Ok(s) => s.rsplit(')').next().unwrap().trim_start().starts_with('Z'),
    }
}

#[test]
fn a_timeout_kills_the_whole_process_group() {
    let fx = Fx::new();
    let started = Instant::now();
    let r = run(&fx, "sleep 30 & echo $! > bg.pid; sleep 30", 300);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.status, None);
    assert_eq!(r.signal, Some(libc::SIGKILL));
    assert!(r.millis >= 300, "{}", r.millis);
    assert!(r.output.contains("was killed"), "{}", r.output);
    let pid: i32 = std::fs::read_to_string(fx.at("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !gone(pid) {
        assert!(
            Instant::now() < end,
            "the background process {pid} survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_command_leaving_a_background_process_returns_when_it_exits() {
    let fx = Fx::new();
    let started = Instant::now();
    let r = run(&fx, "sleep 3 & echo started", 20_000);
    assert_eq!(r.status, Some(0));
    assert!(r.output.starts_with("started"), "{}", r.output);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn commands_get_a_normal_umask_back() {
    let fx = Fx::new();
    let r = run(&fx, "umask", 10_000);
    assert_eq!(r.output.trim(), "0022");
}
