//! Soak: 4 writers and 4 readers through the mount of a 24,000-file tree while a process on
//! the target side churns files of its own, for a while; the daemon's and the agent's memory
//! and file descriptors must stay flat, and at the end the mount and the target are the same
//! tree.
//!
//!     KMOUNT_SOAK_SECS=600 cargo test -p kmount-tests --test soak -- --nocapture --test-threads 1   # 10 minutes each
//!
//! CI runs both for 60 s (the default): `soak_writers_readers_…` on a write-through mount,
//! `soak_with_write_back` on a write-back one (the default for containers).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kmount_tests::*;

const WRITERS: usize = 4;
const READERS: usize = 4;
/// Files per directory of the big tree.
const PER_DIR: usize = 100;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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

/// (VmRSS in KiB, open descriptors) of `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

fn daemon_pid(m: &Mounted) -> u32 {
    let out = run_timeout(m.kmount().arg("list"), MOUNT_TIMEOUT);
    let mnt = m.mnt.to_string_lossy();
    let row = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == mnt))
        .unwrap_or_else(|| panic!("kmount list does not show {mnt}: {out}"));
    row.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no pid in {row}"))
}

/// One writer's step in its own directory `dir` (through the mount).
fn write_step(dir: &Path, rng: &mut Rng) {
    let name = |rng: &mut Rng| dir.join(format!("w{}", rng.below(40)));
    let p = name(rng);
    let data = pattern(rng.below(20_000) as usize, rng.next());
    let _ = match rng.below(6) {
        0 | 1 => fs::write(&p, &data),
        2 => fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &data[..data.len().min(500)])),
        3 => fs::rename(&p, name(rng)),
        4 => fs::remove_file(&p),
        _ => {
            let tmp = dir.join(format!(".tmp{}", rng.below(1000)));
            fs::write(&tmp, &data).and_then(|()| fs::rename(&tmp, &p))
        }
    };
}

#[test]
fn soak_writers_readers_and_remote_churn_stay_flat_and_converge() {
    soak(false);
}

#[test]
fn soak_with_write_back() {
    soak(true);
}

/// One soak at a time: each is sized to load the machine by itself.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn soak(write_back: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let secs = env_u64("KMOUNT_SOAK_SECS", 60);
    let files = env_u64("KMOUNT_SOAK_FILES", 24_000) as usize;
    let dirs = files.div_ceil(PER_DIR);
    let envs: Vec<(&str, &str)> = if write_back {
        vec![("KMOUNT_WRITE_BACK", "1")]
    } else {
        vec![("KMOUNT_WRITE_BACK", "0")]
    };
    let mut m = Mounted::with_args(
        |b| {
            for d in 0..dirs {
                let dir = b.join(format!("tree/d{d}"));
                fs::create_dir_all(&dir).unwrap();
                for f in 0..PER_DIR.min(files - d * PER_DIR) {
                    fs::write(dir.join(format!("f{f}.js")), format!("module {d}/{f}\n")).unwrap();
                }
            }
            for w in 0..WRITERS {
                fs::create_dir_all(b.join(format!("local/w{w}"))).unwrap();
            }
            fs::create_dir_all(b.join("remote")).unwrap();
        },
        &[],
        &envs,
    );
    // Every file read once first: a write-back mount keeps what it read in its content cache
    // (bounded by size, not by time), and the baseline is taken with it full, so that growth
    // after it is a leak and not the cache filling up.
    let warm = Instant::now();
    tree_snapshot(&m.m("tree"), false).unwrap();
    println!("read the tree once in {:?}", warm.elapsed());
    let daemon = daemon_pid(&m);
    let agent = *children_of(daemon)
        .first()
        .expect("the daemon has no agent child");
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let (stop, ops) = (stop.clone(), ops.clone());
        let dir = m.m(format!("local/w{w}"));
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9 + w as u64);
            while !stop.load(Ordering::Relaxed) {
                write_step(&dir, &mut rng);
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for r in 0..READERS {
        let (stop, reads) = (stop.clone(), reads.clone());
        let root: PathBuf = m.mnt.clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x51ed_270b + r as u64);
            while !stop.load(Ordering::Relaxed) {
                let d = rng.below(dirs as u64);
                if rng.below(10) == 0 {
                    let _ = fs::read_dir(root.join(format!("tree/d{d}")))
                        .map(|it| it.flatten().filter_map(|e| e.metadata().ok()).count());
                } else {
                    let f = rng.below(PER_DIR as u64);
                    let _ = fs::read(root.join(format!("tree/d{d}/f{f}.js")));
                    let _ = fs::read_dir(root.join("remote")).map(|it| it.count());
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        // The target side: its own files come and go, and files of the big tree change.
        let stop = stop.clone();
        let backing = m.backing.clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x2545_f491);
            while !stop.load(Ordering::Relaxed) {
                let p = backing.join(format!("remote/r{}", rng.below(200)));
                let _ = match rng.below(5) {
                    0 | 1 => fs::write(&p, pattern(rng.below(5_000) as usize, rng.next())),
                    2 => fs::remove_file(&p),
                    3 => fs::rename(&p, backing.join(format!("remote/r{}", rng.below(200)))),
                    _ => {
                        let d = rng.below(dirs as u64);
                        let f = rng.below(PER_DIR as u64);
                        fs::write(
                            backing.join(format!("tree/d{d}/f{f}.js")),
                            format!("changed {}\n", rng.next()),
                        )
                    }
                };
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    // Warmed up: the baseline.
    std::thread::sleep(Duration::from_secs(secs.min(10)));
    let (d0, a0) = (usage(daemon), usage(agent));
    let started = Instant::now();
    let mut samples = vec![(0u64, d0, a0)];
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(5));
        samples.push((started.elapsed().as_secs(), usage(daemon), usage(agent)));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    // Everything written reaches the target first: descriptors that belong to changes still
    // on their way (a created file's handle until its record is applied) are not leaks. Their
    // peak during the run is shown below.
    let out = run_timeout(m.kmount().arg("wait").arg(&m.mnt), Duration::from_secs(120));
    assert!(out.success(), "kmount wait: {out}{}", m.logs());
    let (d1, a1) = (usage(daemon), usage(agent));
    println!(
        "MEASURE soak {secs} s ({}): {} writes, {} reads; daemon RSS {} -> {} KiB, fds {} -> {}; \
         agent RSS {} -> {} KiB, fds {} -> {}",
        if write_back {
            "write-back"
        } else {
            "write-through"
        },
        ops.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed),
        d0.0,
        d1.0,
        d0.1,
        d1.1,
        a0.0,
        a1.0,
        a0.1,
        a1.1
    );
    println!(
        "MEASURE soak peak fds during the run: daemon {}, agent {}",
        samples.iter().map(|(_, d, _)| d.1).max().unwrap_or(0),
        samples.iter().map(|(_, _, a)| a.1).max().unwrap_or(0)
    );
    for (t, d, a) in &samples {
        println!(
            "  t={t:>4}s daemon {} KiB {} fds; agent {} KiB {} fds",
            d.0, d.1, a.0, a.1
        );
    }
    assert!(
        d1.1 <= d0.1 + 8 && a1.1 <= a0.1 + 8,
        "file descriptors grew: daemon {} -> {}, agent {} -> {}",
        d0.1,
        d1.1,
        a0.1,
        a1.1
    );
    // Flat: no more than a quarter (and 32 MiB) above the warmed-up baseline.
    let grew = |a: u64, b: u64| b > a + (a / 4).max(32 << 10);
    assert!(
        !grew(d0.0, d1.0) && !grew(a0.0, a1.0),
        "memory grew: daemon {} -> {} KiB, agent {} -> {} KiB",
        d0.0,
        d1.0,
        a0.0,
        a1.0
    );
    // The mount shows the target's tree.
    let start = Instant::now();
    loop {
        let (a, b) = (
            tree_snapshot(&m.mnt, false).unwrap(),
            tree_snapshot(&m.backing, false).unwrap(),
        );
        let diff = tree_snapshot_diff(&a, &b);
        if diff.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "60 s after the soak the mount and the target differ:\n{}",
            diff.lines().take(40).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    m.unmount();
}
