//! `--on-change` and the ignore rules through a real mount and a real agent.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{Mounted, Setup, eventually};
use kmount_mount::MountOptions;
use kmount_mount::rules::{Class, RulesConfig};

fn with(opts: MountOptions) -> Setup {
    Setup {
        opts,
        ..Setup::default()
    }
}

const CMD: &str = "echo ran >> runs.txt; if [ -e fail ]; then echo boom; exit 4; fi";

#[test]
fn a_change_through_the_mount_runs_the_command_once_in_the_root() {
    let Some(m) = Mounted::new(
        with(MountOptions {
            on_change: Some(CMD.into()),
            ..MountOptions::default()
        }),
        |_| {},
    ) else {
        return;
    };
    assert_eq!(m.handle().on_change_status().runs, 0);
    assert_eq!(m.handle().on_change_status().command.as_deref(), Some(CMD));
    for i in 0..5 {
        fs::write(m.m("f"), format!("edit {i}")).unwrap();
    }
    eventually("the command ran", Duration::from_secs(10), || {
        m.handle().on_change_status().runs == 1
    });
    assert_eq!(fs::read_to_string(m.r("runs.txt")).unwrap(), "ran\n");
    let s = m.handle().on_change_status();
    assert_eq!((s.failures, s.last_status, s.running), (0, Some(0), false));
    // What the command changed in the target is a remote change: it starts nothing.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(m.handle().on_change_status().runs, 1);
    // A failing command is counted with its exit code and output.
    fs::write(m.r("fail"), b"").unwrap();
    fs::write(m.m("g"), b"x").unwrap();
    eventually("the second run", Duration::from_secs(10), || {
        m.handle().on_change_status().runs == 2
    });
    assert_eq!(fs::read_to_string(m.r("runs.txt")).unwrap(), "ran\nran\n");
    let s = m.handle().on_change_status();
    assert_eq!((s.failures, s.last_status), (1, Some(4)));
    let e = s.last_error.unwrap();
    assert!(e.contains("exited with 4") && e.contains("boom"), "{e}");
    m.unmount();
}

#[test]
fn the_agent_hides_excluded_paths_and_kmountignore_counts() {
    let Some(m) = Mounted::new(
        with(MountOptions {
            rules: RulesConfig {
                exclude: vec!["node_modules/".into()],
                ..Default::default()
            },
            ..MountOptions::default()
        }),
        |r| {
            fs::create_dir_all(r.join("node_modules/pkg")).unwrap();
            fs::write(r.join("node_modules/pkg/index.js"), b"x").unwrap();
            fs::create_dir_all(r.join("build")).unwrap();
            fs::write(r.join("build/out.o"), b"x").unwrap();
            fs::write(r.join(".kmountignore"), b"build/\n").unwrap();
            fs::write(r.join("src.rs"), b"x").unwrap();
        },
    ) else {
        return;
    };
    let rules = m.handle().rules();
    assert_eq!(rules.class(Path::new("build"), true), Class::Excluded);
    assert_eq!(
        rules.class(Path::new("node_modules"), true),
        Class::Excluded
    );
    let mut names: Vec<String> = fs::read_dir(m.mnt.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [".kmountignore", "src.rs"]);
    assert!(fs::metadata(m.m("node_modules/pkg/index.js")).is_err());
    assert!(fs::metadata(m.m("build")).is_err());
    // Remote changes inside hidden directories never show up.
    fs::write(m.r("node_modules/pkg/new.js"), b"x").unwrap();
    fs::write(m.r("visible.rs"), b"x").unwrap();
    eventually("the visible change", Duration::from_secs(5), || {
        fs::metadata(m.m("visible.rs")).is_ok()
    });
    assert!(fs::metadata(m.m("node_modules")).is_err());
    m.unmount();
}

/// The command sees what was written through the mount, in write-back mode too (it waits
/// until the journal has it all in the target).
#[test]
fn the_command_sees_the_changes_that_started_it() {
    for write_back in [false, true] {
        let state = tempfile::tempdir().unwrap();
        let mut setup = if write_back {
            Setup::write_back(state.path())
        } else {
            Setup::default()
        };
        setup.opts.on_change = Some("cat d/f > seen.txt".into());
        let Some(m) = Mounted::new(setup, |_| {}) else {
            return;
        };
        assert_eq!(m.handle().status().write_back, write_back);
        // In write-back mode the changes wait in the journal while the agent is stopped: the
        // command must wait for them rather than start after the quiet spell.
        let agent = m.agent_pid();
        if write_back {
            // SAFETY: plain syscall on the test's own agent process.
            unsafe { libc::kill(agent, libc::SIGSTOP) };
        }
        fs::create_dir(m.m("d")).unwrap();
        fs::write(m.m("d/f"), vec![b'x'; 300_000]).unwrap();
        if write_back {
            std::thread::sleep(Duration::from_millis(1000));
            let s = m.handle().on_change_status();
            assert!(
                !s.running && s.runs == 0,
                "ran before the changes were applied: {s:?}"
            );
            // SAFETY: as above.
            unsafe { libc::kill(agent, libc::SIGCONT) };
        }
        eventually("the command ran", Duration::from_secs(15), || {
            m.handle().on_change_status().runs >= 1
        });
        assert_eq!(
            fs::read(m.r("seen.txt")).unwrap().len(),
            300_000,
            "write-back {write_back}"
        );
        assert_eq!(m.handle().on_change_status().failures, 0);
        m.unmount();
    }
}
