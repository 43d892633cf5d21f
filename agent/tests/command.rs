//! `Op::RunCommand` through the real binary: it runs beside other requests, and a missing
//! `sh` is named.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, BIN};
use kmount_proto::{Done, Op, features};

#[test]
fn other_requests_are_answered_while_a_command_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Agent::spawn(&[], tmp.path());
    let h = a.hello();
    assert_eq!(
        h.features & (features::RULES | features::COMMAND),
        features::RULES | features::COMMAND
    );
    let started = Instant::now();
    a.request(
        1,
        None,
        Op::RunCommand {
            command: "sleep 1; echo done".into(),
            timeout_ms: 20_000,
        },
    );
    // More commands than there are workers would block every worker if they ran there.
    for id in 2..12 {
        a.request(
            id,
            None,
            Op::RunCommand {
                command: "sleep 1".into(),
                timeout_ms: 20_000,
            },
        );
    }
    a.request(100, None, Op::Ping);
    let first = a.reply();
    assert_eq!(first.id, 100, "the ping waited for a command");
    assert!(started.elapsed() < Duration::from_millis(900));
    let mut seen = 0;
    while seen < 11 {
        let r = a.reply();
        if r.id == 1 {
            let Ok(Done::Command { status, output, .. }) = r.result else {
                panic!("{r:?}")
            };
            assert_eq!((status, output.as_slice()), (Some(0), &b"done\n"[..]));
        }
        seen += 1;
    }
    let (status, _) = a.finish();
    assert!(status.success());
}

#[test]
fn a_missing_sh_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg(tmp.path()).env("PATH", "/nonexistent-kmount-test");
    let mut a = Agent::spawn_command(cmd);
    a.hello();
    let e = a
        .call(Op::RunCommand {
            command: "true".into(),
            timeout_ms: 1000,
        })
        .unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert!(e.message.contains("no 'sh'"), "{e}");
}

#[test]
fn the_session_end_kills_a_running_command() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Agent::spawn(&[], tmp.path());
    a.hello();
    a.request(
        1,
        None,
        Op::RunCommand {
            command: "echo $$ > pid; sleep 60".into(),
            timeout_ms: 120_000,
        },
    );
    let pid_file = tmp.path().join("pid");
    let end = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&pid_file).map_or(true, |s| !s.ends_with('\n')) {
        assert!(Instant::now() < end, "the command did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let (status, _) = a.finish();
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
