//! `kmount-bench`: kmount against sshfs, the native disk and bindfs, on the same data and the
//! same emulated link, with a markdown report of medians and ratios.
//!
//! `bench/run.sh` installs the peers, builds release binaries and runs this. See
//! `kmount-bench --help`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use kmount_bench::contender::{self, Env, Kind, Session, drop_caches, memory_kib};
use kmount_bench::delay::DelayRelay;
use kmount_bench::sshd::{TestSshd, Variant};
use kmount_bench::tree::{self, Data};
use kmount_bench::workload::{self, Latencies, Run};

#[derive(Parser, Debug)]
#[command(
    name = "kmount-bench",
    about = "Benchmark kmount against sshfs, the native disk and bindfs on one emulated link",
    after_help = "Examples:\n  bench/run.sh --quick           smoke test (small tree, 0 ms only)\n  bench/run.sh                   the full run (0, 10, 20 ms)\n  kmount-bench sshd              start the throwaway sshd and wait (for trying things by hand)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(clap::Args, Debug, Clone)]
struct Opts {
    /// Small tree, 0 ms only, one repetition: a smoke test of the harness.
    #[arg(long)]
    quick: bool,
    /// Round-trip times to emulate, in ms.
    #[arg(long, value_delimiter = ',', default_value = "0,10,20")]
    rtt_ms: Vec<u64>,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Files in the tree.
    #[arg(long, default_value_t = 24_000)]
    files: u64,
    /// Files in the untar archive.
    #[arg(long, default_value_t = 5_000)]
    untar_files: u64,
    /// Size of the big file, MiB.
    #[arg(long, default_value_t = 256)]
    big_mib: u64,
    /// Samples per latency measurement.
    #[arg(long, default_value_t = 20)]
    latency_samples: usize,
    /// Longest a single measurement may take, in s; a slower one is stopped and shown as
    /// "> cap".
    #[arg(long, default_value_t = 30)]
    cap_s: u64,
    /// Longest a single untar run may take, in s: longer than `--cap-s`, so that a peer that
    /// makes a round trip per file operation (sshfs) is measured rather than capped.
    #[arg(long, default_value_t = 600)]
    untar_cap_s: u64,
    /// Longest a single latency sample may take, in s.
    #[arg(long, default_value_t = 5)]
    latency_cap_s: u64,
    /// A measurement slower than this (s) is not repeated.
    #[arg(long, default_value_t = 15)]
    slow_s: u64,
    /// Contenders to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kmount,kmount-wb,sshfs,native,bindfs"
    )]
    contenders: Vec<String>,
    /// Work directory (the generated data is kept there and reused).
    #[arg(long, default_value = "/var/tmp/kmount-bench")]
    work: PathBuf,
    /// The kmount binary.
    #[arg(long, default_value = "target/release/kmount")]
    kmount: PathBuf,
    /// The kmount-agent binary.
    #[arg(long, default_value = "target/release/kmount-agent")]
    agent: PathBuf,
    /// The markdown report [default: bench/results/<date>.md].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// (internal) Walk a directory: readdir + lstat of every entry.
    #[command(hide = true)]
    Walk { dir: PathBuf },
    /// (internal) Read a file whole, print its size and digest.
    #[command(hide = true)]
    Read { file: PathBuf },
    /// Start the throwaway sshd (own keys, 127.0.0.1) and print how to reach it; Ctrl-C stops.
    Sshd {
        /// Also start a delaying relay in front of it with this round-trip time (ms).
        #[arg(long)]
        rtt_ms: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Sub::Walk { dir }) => workload::walk_main(&dir),
        Some(Sub::Read { file }) => workload::read_main(&file),
        Some(Sub::Sshd { rtt_ms }) => sshd_main(rtt_ms),
        None => bench_main(cli.opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmount-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sshd_main(rtt_ms: Option<u64>) -> io::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    // Signals are taken synchronously below, so that the sshd is stopped and its directory
    // removed on Ctrl-C.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.thread_block().map_err(io::Error::from)?;
    let sshd = TestSshd::start()?;
    let relay = match rtt_ms {
        Some(ms) => Some(DelayRelay::start(sshd.addr(), Duration::from_millis(ms))?),
        None => None,
    };
    let port = relay.as_ref().map_or(sshd.port(), |r| r.port());
    println!("sshd pid {} on 127.0.0.1:{}", sshd.pid(), sshd.port());
    if let (Some(r), Some(ms)) = (&relay, rtt_ms) {
        println!("relay on 127.0.0.1:{} with {ms} ms round trip", r.port());
    }
    println!("export KMOUNT_SSH='{}'", sshd.ssh_command(Variant::Good));
    println!(
        "kmount ssh://{}:{port}/some/dir ./mnt",
        kmount_bench::sshd::HOST_ALIAS
    );
    println!("(Ctrl-C stops it)");
    let signal = signals.wait().map_err(io::Error::from)?;
    eprintln!("kmount-bench: {signal:?}: stopping sshd");
    drop(relay);
    drop(sshd);
    Ok(())
}

/// What is measured, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Mount,
    ColdWalk,
    WarmWalk,
    GitCold,
    GitWarm,
    Untar,
    ReadCold,
    ReadWarm,
}

impl Workload {
    const ALL: [Workload; 8] = [
        Workload::Mount,
        Workload::ColdWalk,
        Workload::WarmWalk,
        Workload::GitCold,
        Workload::GitWarm,
        Workload::Untar,
        Workload::ReadCold,
        Workload::ReadWarm,
    ];

    fn label(self, d: &Data, untar: usize) -> String {
        match self {
            Workload::Mount => "mount until it answers".into(),
            Workload::ColdWalk => {
                format!("cold walk (readdir + lstat, {} entries)", d.repo_entries)
            }
            Workload::WarmWalk => "warm walk".into(),
            Workload::GitCold => "git status, cold".into(),
            Workload::GitWarm => "git status, warm".into(),
            Workload::Untar => format!("untar {untar} small files until all are on the remote"),
            Workload::ReadCold => format!("cold read of a {} MiB file", d.big_size >> 20),
            Workload::ReadWarm => format!("warm read of the {} MiB file", d.big_size >> 20),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LatencyKind {
    SaveToEvent,
    RemoteToVisible,
}

/// The network a measurement ran over: `None` for local contenders (no link).
type Link = Option<u64>;

#[derive(Default)]
struct Results {
    runs: BTreeMap<(Link, Workload, Kind), Vec<Run>>,
    latencies: BTreeMap<(Link, LatencyKind, Kind), Latencies>,
    /// (link, contender, role, VmHWM KiB, VmRSS KiB)
    memory: Vec<(Link, Kind, String, u64, u64)>,
    notes: Vec<String>,
}

impl Results {
    fn runs_of(&self, link: Link, w: Workload, k: Kind) -> Option<&Vec<Run>> {
        let link = if k.remote() { link } else { None };
        self.runs.get(&(link, w, k))
    }

    fn latency_of(&self, link: Link, l: LatencyKind, k: Kind) -> Option<&Latencies> {
        let link = if k.remote() { link } else { None };
        self.latencies.get(&(link, l, k))
    }
}

struct Bench<'a> {
    opts: &'a Opts,
    data: &'a Data,
    env: Env<'a>,
    cap: Duration,
    results: Results,
    caches_dropped: bool,
    /// /proc/loadavg when the run started (other work on the machine skews the numbers).
    load_start: String,
}

fn bench_main(mut opts: Opts) -> io::Result<()> {
    if opts.quick {
        opts.rtt_ms = vec![0];
        opts.reps = 1;
        opts.files = opts.files.min(3_000);
        opts.untar_files = opts.untar_files.min(1_000);
        opts.big_mib = opts.big_mib.min(32);
        opts.latency_samples = opts.latency_samples.min(8);
    }
    let kinds: Vec<Kind> = opts
        .contenders
        .iter()
        .map(|c| {
            Kind::parse(c).ok_or_else(|| {
                io::Error::other(format!(
                    "unknown contender '{c}' (kmount, kmount-wb, sshfs, native, bindfs)"
                ))
            })
        })
        .collect::<io::Result<_>>()?;
    for (tool, needed, pkg) in [
        ("git", true, "git"),
        ("tar", true, "tar"),
        ("fusermount3", true, "fuse3"),
        ("sshfs", kinds.contains(&Kind::Sshfs), "sshfs"),
        ("bindfs", kinds.contains(&Kind::Bindfs), "bindfs"),
    ] {
        if needed && !in_path(tool) {
            return Err(io::Error::other(format!(
                "{tool} is not installed: apt-get install {pkg} (bench/run.sh does)"
            )));
        }
    }
    let kmount = fs::canonicalize(&opts.kmount).map_err(|e| {
        io::Error::other(format!(
            "kmount binary {}: {e}; build it (cargo build --release -p kmount-cli) or pass --kmount",
            opts.kmount.display()
        ))
    })?;
    let agent = fs::canonicalize(&opts.agent).map_err(|e| {
        io::Error::other(format!(
            "kmount-agent binary {}: {e}; build it (cargo build --release -p kmount-agent) or pass --agent",
            opts.agent.display()
        ))
    })?;
    fs::create_dir_all(&opts.work)?;
    let work = fs::canonicalize(&opts.work)?;
    for k in Kind::ALL {
        contender::force_unmount(&work.join(format!("mnt-{k}")));
    }
    let started = Instant::now();
    let data = tree::prepare(&work, opts.files, opts.big_mib, opts.untar_files)?;
    eprintln!(
        "kmount-bench: data ready in {:.0} s: {} files, {} dirs, {} symlinks, {} MiB in {}",
        started.elapsed().as_secs_f64(),
        data.stats.files,
        data.stats.dirs,
        data.stats.symlinks,
        data.stats.bytes >> 20,
        data.root.display()
    );
    let sshd = TestSshd::start()?;
    let mut bench = Bench {
        opts: &opts,
        data: &data,
        env: Env {
            work: &work,
            root: &data.root,
            sshd: &sshd,
            kmount: &kmount,
            agent: &agent,
        },
        cap: Duration::from_secs(opts.cap_s),
        results: Results::default(),
        caches_dropped: true,
        load_start: loadavg(),
    };
    for &k in kinds.iter().filter(|k| !k.remote()) {
        eprintln!("kmount-bench: {k}");
        bench.suite(k, None, 0);
    }
    for &ms in &opts.rtt_ms {
        let relay = DelayRelay::start(sshd.addr(), Duration::from_millis(ms))?;
        for &k in kinds.iter().filter(|k| k.remote()) {
            eprintln!("kmount-bench: {k} at {ms} ms round trip");
            bench.suite(k, Some(ms), relay.port());
        }
    }
    let report = bench.report(&kinds, started.elapsed());
    let out = match &opts.out {
        Some(p) => p.clone(),
        None => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
            fs::create_dir_all(&dir)?;
            let name = if opts.quick {
                format!("{}-quick.md", date())
            } else {
                format!("{}.md", date())
            };
            dir.join(name)
        }
    };
    fs::write(&out, &report)?;
    println!("{report}");
    eprintln!(
        "kmount-bench: wrote {} ({:.0} s in all)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Today as YYYY-MM-DD (UTC).
fn date() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

impl Bench<'_> {
    fn record(&mut self, link: Link, w: Workload, k: Kind, run: Run) {
        match &run {
            Run::Ok(d) => eprintln!("  {w:?}: {:.3} s", d.as_secs_f64()),
            Run::Capped(d) => eprintln!("  {w:?}: stopped after {:.0} s", d.as_secs_f64()),
            Run::Wrong(e, _) => eprintln!("  {w:?}: WRONG: {e}"),
        }
        self.results.runs.entry((link, w, k)).or_default().push(run);
    }

    /// Whether `w` has been measured enough: once capped, wrong or slow, it is not repeated.
    fn done(&self, link: Link, w: Workload, k: Kind) -> bool {
        let slow = Duration::from_secs(self.opts.slow_s);
        self.results.runs.get(&(link, w, k)).is_some_and(|runs| {
            runs.len() >= self.opts.reps
                || runs.iter().any(|r| match r {
                    Run::Ok(d) => *d > slow,
                    _ => true,
                })
        })
    }

    fn mount(&mut self, k: Kind, link: Link, port: u16) -> Option<Session> {
        self.caches_dropped &= drop_caches();
        match Session::mount(k, &self.env, port) {
            Ok(s) => {
                if k != Kind::Native {
                    self.record(link, Workload::Mount, k, Run::Ok(s.mount_time));
                }
                Some(s)
            }
            Err(e) => {
                self.record(link, Workload::Mount, k, Run::Wrong(e.to_string(), None));
                None
            }
        }
    }

    fn unmount(&mut self, s: Session) {
        let k = s.kind;
        if let Err(e) = s.unmount() {
            self.results.notes.push(format!("{k}: unmount failed: {e}"));
        }
    }

    fn restore_git_index(&self) {
        let git = self.data.root.join("repo/.git");
        let _ = fs::remove_file(git.join("index.lock"));
        if let Err(e) = fs::copy(&self.data.pristine_index, git.join("index")) {
            eprintln!("kmount-bench: cannot restore the git index: {e}");
        }
    }

    fn suite(&mut self, k: Kind, link: Link, port: u16) {
        let cap = self.cap;
        let data = self.data;
        for rep in 0..self.opts.reps {
            // Walks: a fresh mount, then the same walk twice.
            if !self.done(link, Workload::ColdWalk, k) || !self.done(link, Workload::WarmWalk, k) {
                let Some(s) = self.mount(k, link, port) else {
                    return;
                };
                let repo = s.root.join("repo");
                let cold = workload::walk_tree(&repo, data.repo_entries, cap);
                self.record(link, Workload::ColdWalk, k, cold);
                let warm = workload::walk_tree(&repo, data.repo_entries, cap);
                self.record(link, Workload::WarmWalk, k, warm);
                self.unmount(s);
            }
            // git status with the index as committed, on a fresh mount, then again.
            if !self.done(link, Workload::GitCold, k) || !self.done(link, Workload::GitWarm, k) {
                self.restore_git_index();
                let Some(s) = self.mount(k, link, port) else {
                    return;
                };
                let repo = s.root.join("repo");
                let cold = workload::git_status(&repo, cap);
                self.record(link, Workload::GitCold, k, cold);
                let warm = workload::git_status(&repo, cap);
                self.record(link, Workload::GitWarm, k, warm);
                self.unmount(s);
                self.restore_git_index();
            }
            // Reads, untar and latencies on one more fresh mount.
            let Some(s) = self.mount(k, link, port) else {
                return;
            };
            if !self.done(link, Workload::ReadCold, k) || !self.done(link, Workload::ReadWarm, k) {
                let rel = data
                    .big_file
                    .strip_prefix(&data.root)
                    .unwrap_or(Path::new("big.bin"));
                let file = s.root.join(rel);
                let cold = workload::read_big(&file, data.big_size, data.big_digest, cap);
                self.record(link, Workload::ReadCold, k, cold);
                let warm = workload::read_big(&file, data.big_size, data.big_digest, cap);
                self.record(link, Workload::ReadWarm, k, warm);
            }
            if !self.done(link, Workload::Untar, k) {
                let rel = PathBuf::from(format!(
                    "scratch/untar-{k}-{}-{rep}",
                    link.map_or("local".to_string(), |l| format!("{l}ms"))
                ));
                let remote = data.root.join(&rel);
                let _ = fs::remove_dir_all(&remote);
                let run = workload::untar(
                    &data.untar_archive,
                    &s.root.join(&rel),
                    &remote,
                    &data.untar_files,
                    Duration::from_secs(self.opts.untar_cap_s),
                );
                self.record(link, Workload::Untar, k, run);
            }
            if rep + 1 == self.opts.reps || self.all_done(k, link) {
                self.latencies(&s, link);
                for (role, pid) in s.processes() {
                    if let Some((hwm, rss)) = memory_kib(pid) {
                        self.results.memory.push((link, k, role, hwm, rss));
                    }
                }
                self.unmount(s);
                break;
            }
            self.unmount(s);
        }
        // Leave the scratch area empty for the next contender (removed on the remote side:
        // deleting thousands of files through a slow mount is not what is measured).
        if let Ok(entries) = fs::read_dir(data.root.join("scratch")) {
            for e in entries.flatten() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    fn all_done(&self, k: Kind, link: Link) -> bool {
        Workload::ALL
            .iter()
            .filter(|w| **w != Workload::Mount)
            .all(|w| self.done(link, *w, k))
    }

    fn latencies(&mut self, s: &Session, link: Link) {
        let k = s.kind;
        let rel = "scratch/watch";
        let remote = self.data.root.join(rel);
        if let Err(e) = fs::create_dir_all(&remote) {
            self.results
                .notes
                .push(format!("{k}: cannot create {rel}: {e}"));
            return;
        }
        let local = s.root.join(rel);
        let cap = Duration::from_secs(self.opts.latency_cap_s);
        // Made on the remote just now: a mount that caches must first learn of it (that
        // delay is what the second measurement is about, not this one).
        let start = Instant::now();
        while !local.is_dir() && start.elapsed() < cap {
            std::thread::sleep(Duration::from_millis(5));
        }
        let n = self.opts.latency_samples;
        let save = workload::save_to_event(&local, &remote, n, cap);
        eprintln!("  save -> inotify: {}", fmt_latency(&save, cap));
        self.results
            .latencies
            .insert((link, LatencyKind::SaveToEvent, k), save);
        let vis = workload::remote_to_visible(&local, &remote, n, cap);
        eprintln!("  remote change -> visible: {}", fmt_latency(&vis, cap));
        self.results
            .latencies
            .insert((link, LatencyKind::RemoteToVisible, k), vis);
    }

    fn report(&self, kinds: &[Kind], elapsed: Duration) -> String {
        let o = self.opts;
        let d = self.data;
        let mut r = String::new();
        let _ = writeln!(r, "# kmount benchmark, {}\n", date());
        let _ = writeln!(
            r,
            "{} mode. Machine: {} cores ({}), kernel {}, load average {} at the start and {} at \
             the end. kmount {}. {}; {}; {}.\n",
            if o.quick {
                "Quick (smoke test)"
            } else {
                "Full"
            },
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model(),
            kernel(),
            self.load_start,
            loadavg(),
            git_rev(),
            tool_version("ssh", &["-V"]),
            tool_version("sshfs", &["--version"]),
            tool_version("bindfs", &["--version"]),
        );
        let _ = writeln!(
            r,
            "Data: a git repository shaped like a project with its node_modules: {} files, {} \
             directories, {} symlinks, {} MiB (a walk sees {} entries, `.git` included); a {} MiB \
             file; an archive of {} small files. The remote is a directory on this machine \
             reached over ssh (a throwaway sshd on 127.0.0.1) through a userspace relay that \
             adds half the round-trip time in each direction; kmount and sshfs use the same ssh \
             configuration and the same relay. native is the directory itself, bindfs a local \
             FUSE passthrough of it (the floor of any FUSE filesystem).\n",
            d.stats.files,
            d.stats.dirs,
            d.stats.symlinks,
            d.stats.bytes >> 20,
            d.repo_entries,
            d.big_size >> 20,
            d.untar_files.len(),
        );
        let _ = writeln!(
            r,
            "Each cell: the median of up to {} runs (`n` shown when fewer ran: a run slower than \
             {} s is not repeated); `> {} s`: stopped at the cap ({} s for untar; a ratio \
             against a capped run is an upper bound, `< N×`). Every run checks its result \
             (entry count, file digest, clean `git status`, files on the remote); a wrong \
             result is shown as WRONG. Cold = fresh mount, kernel caches dropped ({}) and \
             kmount's content cache emptied. sshfs runs with its defaults{}.\n",
            o.reps,
            o.slow_s,
            o.cap_s,
            o.untar_cap_s,
            if self.caches_dropped {
                "done before every cold run"
            } else {
                "NOT possible here: not root"
            },
            match contender::sshfs_extra_options().join(" ") {
                o if o.is_empty() => String::new(),
                o => format!(
                    " plus `{o}` (without it, this sshfs refuses the `..` symlinks of \
                     node_modules/.bin with EPERM and git status is wrong)"
                ),
            }
        );
        for &ms in &o.rtt_ms {
            self.table(&mut r, kinds, Some(ms));
        }
        if !self.results.memory.is_empty() {
            let _ = writeln!(r, "## Memory (after the workloads above)\n");
            let _ = writeln!(
                r,
                "| round trip | contender | process | peak RSS (VmHWM) | RSS now (VmRSS) |"
            );
            let _ = writeln!(r, "|---|---|---|---:|---:|");
            for (link, kind, role, hwm, rss) in &self.results.memory {
                let _ = writeln!(
                    r,
                    "| {} | {kind} | {role} | {:.1} MiB | {:.1} MiB |",
                    link.map_or("local".into(), |l| format!("{l} ms")),
                    *hwm as f64 / 1024.0,
                    *rss as f64 / 1024.0
                );
            }
            r.push('\n');
        }
        let wrong: Vec<String> = self
            .results
            .runs
            .iter()
            .flat_map(|((link, w, k), runs)| {
                runs.iter().filter_map(move |run| match run {
                    Run::Wrong(e, _) => Some(format!(
                        "{k} {w:?} ({}): {e}",
                        link.map_or("local".into(), |l| format!("{l} ms"))
                    )),
                    _ => None,
                })
            })
            .chain(
                self.results
                    .latencies
                    .iter()
                    .filter_map(|((link, l, k), lat)| {
                        lat.wrong.as_ref().map(|e| {
                            format!(
                                "{k} {l:?} ({}): {e}",
                                link.map_or("local".into(), |l| format!("{l} ms"))
                            )
                        })
                    }),
            )
            .chain(self.results.notes.iter().cloned())
            .collect();
        if !wrong.is_empty() {
            let _ = writeln!(r, "## Failures and notes\n");
            for w in wrong {
                let _ = writeln!(r, "- {w}");
            }
            r.push('\n');
        }
        let _ = writeln!(
            r,
            "Run time {:.0} s. Reproduce: `bench/run.sh{}`.",
            elapsed.as_secs_f64(),
            if o.quick { " --quick" } else { "" }
        );
        r
    }

    fn table(&self, r: &mut String, kinds: &[Kind], link: Link) {
        let ms = link.unwrap_or(0);
        let _ = writeln!(r, "## {ms} ms round trip\n");
        let mut header = String::from("| workload |");
        let mut rule = String::from("|---|");
        for k in kinds {
            let _ = write!(header, " {k} |");
            rule.push_str("---:|");
        }
        let has = |k| kinds.contains(&k);
        let ratios: Vec<(Kind, Kind)> = [
            (Kind::Kmount, Kind::Native),
            (Kind::Kmount, Kind::Sshfs),
            (Kind::KmountWb, Kind::Native),
            (Kind::KmountWb, Kind::Sshfs),
        ]
        .into_iter()
        .filter(|(a, b)| has(*a) && has(*b))
        .collect();
        for (a, b) in &ratios {
            let _ = write!(header, " {a} / {b} |");
            rule.push_str("---:|");
        }
        let _ = writeln!(r, "{header}\n{rule}");
        let untar = self.data.untar_files.len();
        for w in Workload::ALL {
            let mut line = format!("| {} |", w.label(self.data, untar));
            for &k in kinds {
                let cell = match (w, k) {
                    (Workload::Mount, Kind::Native) => "–".to_string(),
                    _ => self
                        .results
                        .runs_of(link, w, k)
                        .map_or("–".into(), |runs| fmt_runs(runs)),
                };
                let _ = write!(line, " {cell} |");
            }
            for (a, b) in &ratios {
                let ra = self.results.runs_of(link, w, *a);
                let rb = self.results.runs_of(link, w, *b);
                let cell = match (ra.and_then(|x| median_ok(x)), rb.and_then(|x| median_ok(x))) {
                    (Some(x), Some(y)) if !y.is_zero() => {
                        format!("{:.2}×", x.as_secs_f64() / y.as_secs_f64())
                    }
                    // The other was stopped at the cap: it took longer, so the ratio is at most
                    // this.
                    (Some(x), None) => match rb.and_then(|x| capped_at(x)) {
                        Some(y) if !y.is_zero() => {
                            format!("< {:.2}×", x.as_secs_f64() / y.as_secs_f64())
                        }
                        _ => "–".into(),
                    },
                    _ => "–".into(),
                };
                let _ = write!(line, " {cell} |");
            }
            let _ = writeln!(r, "{line}");
        }
        let cap = Duration::from_secs(self.opts.latency_cap_s);
        for (l, label) in [
            (
                LatencyKind::SaveToEvent,
                "save → inotify event on the remote, p50 / p95",
            ),
            (
                LatencyKind::RemoteToVisible,
                "remote change → visible in the mount, p50 / p95",
            ),
        ] {
            let mut line = format!("| {label} |");
            for &k in kinds {
                let cell = self
                    .results
                    .latency_of(link, l, k)
                    .map_or("–".into(), |lat| fmt_latency(lat, cap));
                let _ = write!(line, " {cell} |");
            }
            for (a, b) in &ratios {
                let pa = self
                    .results
                    .latency_of(link, l, *a)
                    .and_then(|x| percentile(x, 50));
                let pb = self
                    .results
                    .latency_of(link, l, *b)
                    .and_then(|x| percentile(x, 50));
                let cell = match (pa, pb) {
                    (Some(x), Some(y)) if !y.is_zero() => {
                        format!("{:.2}× (p50)", x.as_secs_f64() / y.as_secs_f64())
                    }
                    _ => "–".into(),
                };
                let _ = write!(line, " {cell} |");
            }
            let _ = writeln!(r, "{line}");
        }
        r.push('\n');
    }
}

fn median_ok(runs: &[Run]) -> Option<Duration> {
    if runs.iter().any(|r| !matches!(r, Run::Ok(_))) {
        return None;
    }
    let mut d: Vec<Duration> = runs
        .iter()
        .filter_map(|r| match r {
            Run::Ok(d) => Some(*d),
            _ => None,
        })
        .collect();
    d.sort();
    d.get(d.len() / 2).copied()
}

/// How long a measurement ran before it was stopped at the cap, if it was.
fn capped_at(runs: &[Run]) -> Option<Duration> {
    runs.iter().find_map(|r| match r {
        Run::Capped(d) => Some(*d),
        _ => None,
    })
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 {
        format!("{s:.0} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.01 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{:.1} ms", s * 1000.0)
    }
}

fn fmt_runs(runs: &[Run]) -> String {
    if let Some(Run::Wrong(_, took)) = runs.iter().find(|r| matches!(r, Run::Wrong(..))) {
        // A wrong result is never a number to compare; how long it took is still shown.
        return match took {
            Some(d) => format!("WRONG ({})", fmt_duration(*d)),
            None => "WRONG".into(),
        };
    }
    if let Some(Run::Capped(d)) = runs.iter().find(|r| r.is_capped()) {
        return format!("> {:.0} s", d.as_secs_f64());
    }
    match median_ok(runs) {
        Some(m) if runs.len() > 1 => fmt_duration(m),
        Some(m) => format!("{} (n=1)", fmt_duration(m)),
        None => "–".into(),
    }
}

fn percentile(l: &Latencies, p: usize) -> Option<Duration> {
    let mut all = l.samples.clone();
    if all.is_empty() || l.wrong.is_some() {
        return None;
    }
    all.sort();
    let total = all.len() + l.capped;
    let idx = (total * p).div_ceil(100).saturating_sub(1);
    // Capped samples count as the slowest.
    all.get(idx).copied()
}

fn fmt_latency(l: &Latencies, cap: Duration) -> String {
    if l.wrong.is_some() {
        return "WRONG".into();
    }
    let show = |p| match percentile(l, p) {
        Some(d) => fmt_duration(d),
        None => format!("> {}", fmt_duration(cap)),
    };
    format!("{} / {}", show(50), show(95))
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .map_or("(unknown revision)".into(), |s| format!("at {s}"))
}

fn tool_version(tool: &str, args: &[&str]) -> String {
    std::process::Command::new(tool)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| l.to_lowercase().contains(tool))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{tool} (version unknown)"))
}
