//! Never lose a byte, under faults: a write-heavy workload through a write-back mount while
//! the stream to the agent is cut at random points (mid-frame as often as not; the agent is
//! killed with each cut), then the served directory must equal what the local side accepted:
//! no operation lost, duplicated or reordered. Among the operations: editors' saves by renames
//! through local-only names (JetBrains' safe write, vim's backup), which cross the boundary.
//!
//! `KMOUNT_FAULT_CUTS` (default 200) sets the number of cuts; `KMOUNT_FAULT_SEED` the seed.

mod common;

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Mounted, Setup, snapshot};
use kmount_mount::client::Connector;
use kmount_mount::fault::{Faults, FaultyConnector};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (the test must be reproducible from its seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const NAMES: [&str; 12] = [
    "a", "b", "c", "d", "e", "f", "x/a", "x/b", "x/c", "y/a", "y/b", "x/z/a",
];
const DIRS: [&str; 3] = ["x", "y", "x/z"];

fn data(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9).wrapping_add(seed) >> 11) as u8)
        .collect()
}

/// Applies one random operation at `root`; the outcome (errno) for comparison.
fn apply(root: &Path, op: u64, rng: &mut Rng) -> Result<(), ErrorKind> {
    let name = NAMES[rng.below(NAMES.len() as u64) as usize];
    let other = NAMES[rng.below(NAMES.len() as u64) as usize];
    let seed = rng.next();
    let len = if rng.below(10) == 0 {
        200_000 + rng.below(300_000) as usize
    } else {
        rng.below(8_000) as usize
    };
    let offset = rng.below(20_000);
    let p = root.join(name);
    match op % 10 {
        0 | 1 => fs::write(&p, data(len, seed)).map_err(|e| e.kind()),
        2 => fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.write_all_at(&data(len.min(30_000), seed), offset))
            .map_err(|e| e.kind()),
        3 => fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| f.write_all(&data(len.min(10_000), seed)))
            .map_err(|e| e.kind()),
        4 => fs::rename(&p, root.join(other)).map_err(|e| e.kind()),
        5 => fs::remove_file(&p).map_err(|e| e.kind()),
        6 => {
            // A save the way editors do it: a temporary file renamed over the name.
            let tmp = root.join(format!("{name}.tmp"));
            fs::write(&tmp, data(len, seed))
                .and_then(|()| fs::rename(&tmp, &p))
                .map_err(|e| e.kind())
        }
        7 => fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(offset))
            .map_err(|e| e.kind()),
        8 => {
            // JetBrains' safe write: its temporary and backup names are local-only.
            let tmp = root.join(format!("{name}___jb_tmp___"));
            let old = root.join(format!("{name}___jb_old___"));
            fs::write(&tmp, data(len, seed))
                .and_then(|()| fs::rename(&p, &old))
                .and_then(|()| fs::rename(&tmp, &p))
                .and_then(|()| fs::remove_file(&old))
                .map_err(|e| {
                    let _ = fs::remove_file(&tmp);
                    e.kind()
                })
        }
        _ => {
            // vim with a backup: the backup name is local-only.
            let backup = root.join(format!("{name}~"));
            fs::rename(&p, &backup)
                .and_then(|()| fs::write(&p, data(len, seed)))
                .and_then(|()| fs::remove_file(&backup))
                .map_err(|e| e.kind())
        }
    }
}

#[test]
fn random_cuts_during_a_write_heavy_workload_lose_nothing() {
    let cuts = env_u64("KMOUNT_FAULT_CUTS", 200);
    let seed = env_u64("KMOUNT_FAULT_SEED", 0x5eed_f00d);
    let state = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let mut setup = Setup::write_back(state.path());
    // Flow control keeps the workload near the link's pace: the cuts come from bytes on the
    // stream, and operations far ahead of it would only pile up in the journal.
    setup.opts.backlog_limit = 2_000;
    let f = faults.clone();
    setup.wrap = Some(Arc::new(move |c| {
        Arc::new(FaultyConnector::new(Arc::new(c), f.clone())) as Arc<dyn Connector>
    }));
    let fill = |r: &Path| {
        for d in DIRS {
            fs::create_dir_all(r.join(d)).unwrap();
        }
    };
    let Some(m) = Mounted::new(setup, fill) else {
        panic!("this machine cannot mount FUSE (/dev/fuse is missing): the fault tests cannot run");
    };
    assert!(
        m.handle().status().write_back,
        "the mount is not write-back: the fault test needs the journal"
    );
    let reference = tempfile::tempdir().unwrap();
    fill(reference.path());
    // From here on, every stream (the first included once it is replaced) is cut after
    // 4 KiB..256 KiB: within a frame as often as not, and within the handshake now and then.
    faults.random_cuts(cuts, 4 << 10, 256 << 10, seed);
    faults.cut_now();
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let mut ops = 0u64;
    let deadline = Duration::from_secs(480);
    while faults.cuts_left() > 0 || faults.cuts() < cuts {
        if started.elapsed() >= deadline {
            let st = m.handle().status();
            panic!(
                "only {} of {cuts} cuts in {deadline:?} ({ops} operations); streams made: {}; \
                 link {:?}; {} change(s) not applied; the remote refuses: {:?}; recent errors: \
                 {:?}",
                faults.cuts(),
                faults.streams(),
                st.link,
                st.pending.records,
                st.blocked,
                st.recent_errors
            );
        }
        let op = rng.next();
        let mut a = Rng(rng.next() | 1);
        let mut b = Rng(a.0);
        let here = apply(m.mnt.path(), op, &mut a);
        let there = apply(reference.path(), op, &mut b);
        assert_eq!(
            here, there,
            "operation {ops} gave another result through the mount than on a plain directory"
        );
        ops += 1;
        if ops.is_multiple_of(20) {
            // Now and then a pause, so that cuts also hit an idle link (heartbeats, replays).
            std::thread::sleep(Duration::from_millis(rng.below(30)));
        }
    }
    println!(
        "MEASURE faults: {} cuts survived, {ops} operations, {} streams, {:.1} s",
        faults.cuts(),
        faults.streams(),
        started.elapsed().as_secs_f64()
    );
    m.handle()
        .wait_applied(Duration::from_secs(120))
        .expect("the changes did not all reach the served directory after the cuts");
    let want = snapshot(reference.path());
    assert_eq!(
        snapshot(m.mnt.path()),
        want,
        "the mount differs from the plain directory"
    );
    assert_eq!(
        snapshot(m.remote.path()),
        want,
        "the served directory differs from what the mount accepted"
    );
}
