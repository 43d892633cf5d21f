//! `kmount`: mount a directory of a container, a host or this machine through FUSE.

mod config;
mod connect;
mod control;
mod daemon;
mod doctor;
mod install;
mod kube;
mod preflight;
mod run;
mod ssh;
mod state;
mod target;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::daemon::Ready;
use crate::state::{StateDirs, mount_id, pid_alive};
use crate::target::Target;

const EXAMPLES: &str = "\
Examples:
  kmount ./src ./mnt           mount ./src at ./mnt (in the background)
  kmount -f ~/project /tmp/p   the same in the foreground; Ctrl-C unmounts
  kmount me@box:/srv/app ./mnt mount /srv/app of host box over ssh
  kmount list                  show the active mounts
  kmount unmount ./mnt         flush and unmount
  kmount unmount --all         unmount every kmount mount";

#[derive(Parser, Debug)]
#[command(
    name = "kmount",
    version,
    about = "Mount a directory of a container, a host or this machine, and edit it as a local disk",
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    mount: MountArgs,
}

#[derive(Args, Debug)]
struct MountArgs {
    /// Stay in the foreground; Ctrl-C unmounts.
    #[arg(short, long)]
    foreground: bool,
    /// What to mount: a local directory (starting with '/', '.' or '~'), a directory in a
    /// container ([TYPE/]NAME:/path) or on an ssh host (user@host:/path, ssh://host:port/path).
    #[arg(required = true)]
    target: Option<String>,
    /// An empty directory to mount on.
    #[arg(required = true)]
    mountpoint: Option<PathBuf>,
    /// Kubernetes: the namespace of the pod or workload [default: the context's, else "default"].
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Kubernetes: the container [default: the pod's kubectl.kubernetes.io/default-container
    /// annotation, else its first container].
    #[arg(short = 'c', long, value_name = "NAME")]
    container: Option<String>,
    /// Kubernetes: the kubeconfig context to use [default: its current context].
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
    /// Kubernetes: the kubeconfig file [default: $KUBECONFIG, else ~/.kube/config].
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// How often the mount compares its tree with the target's (digests) to catch changes the
    /// watcher missed, e.g. 30s, 500ms [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    reconcile_interval: Option<Duration>,
    /// Local-first (experimental): changes land in a local journal and content cache at once
    /// and reach the target in the background, in order (`kmount wait` waits for them; `kmount
    /// unmount` sends them first). Also KMOUNT_WRITE_BACK=1.
    #[arg(long)]
    write_back: bool,
}

/// `--write-back` of this mount, read by [`run`] when it builds the mount options.
static WRITE_BACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `--write-back` was given.
pub fn write_back_flag() -> bool {
    WRITE_BACK.load(std::sync::atomic::Ordering::Relaxed)
}

/// `--reconcile-interval`: `500ms`, `2s`, `1.5` (seconds); at least 10 ms.
fn parse_interval(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let secs = num
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v * scale)
        .ok_or_else(|| format!("{s:?} is not a duration: give e.g. 30s, 500ms or 2m"))?;
    if secs < 0.01 {
        return Err(format!("{s:?} is too short: give at least 10ms"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The `--reconcile-interval` of this mount, read by [`run`] when it builds the mount options.
static RECONCILE_INTERVAL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// How often the running mount reconciles (`--reconcile-interval`, else the library default).
pub fn reconcile_interval() -> Duration {
    RECONCILE_INTERVAL
        .get()
        .copied()
        .unwrap_or_else(|| kmount_mount::MountOptions::default().reconcile_interval)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Flush pending changes and unmount.
    #[command(
        visible_alias = "umount",
        after_help = "Examples:\n  kmount unmount ./mnt\n  kmount unmount --all"
    )]
    Unmount {
        /// The mountpoint to unmount.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        mountpoint: Option<PathBuf>,
        /// Unmount every kmount mount of this user.
        #[arg(long)]
        all: bool,
    },
    /// Wait until every change made through a mount is in its target.
    #[command(
        after_help = "Exit status: 0 once every change is applied; 1 when the target refuses one or \
                      cannot be reached in time.\n\nExample:\n  kmount wait ./mnt"
    )]
    Wait {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
    /// List the active mounts: target, mountpoint, state and daemon pid.
    #[command(visible_alias = "ls", after_help = "Example:\n  kmount list")]
    List,
    /// Check this machine (FUSE, fusermount3, inotify limits, the agent) and say what to fix.
    #[command(
        after_help = "Exit status: 0 when everything needed is there, 1 otherwise.\n\nExample:\n  kmount doctor"
    )]
    Doctor,
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  kmount completions bash > /etc/bash_completion.d/kmount\n  kmount completions zsh > \"${fpath[1]}/_kmount\"\n  kmount completions fish > ~/.config/fish/completions/kmount.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Mount every [[mount]] entry of the nearest kmount.toml.
    #[command(
        after_help = "kmount.toml (found in the current directory or the nearest parent):\n\n  [[mount]]\n  target = \"deploy/app:/app\"   # any target kmount accepts\n  mountpoint = \"mnt\"           # relative to the file\n  # optional: namespace, context, container\n\nExample:\n  kmount up"
    )]
    Up,
    /// Unmount every [[mount]] entry of the nearest kmount.toml.
    #[command(after_help = "Example:\n  kmount down")]
    Down,
    /// Print the manual page (roff) on stdout.
    #[command(after_help = "Example:\n  kmount man | man -l -")]
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Unmount { mountpoint, all }) => unmount(mountpoint.as_deref(), all),
        Some(Command::Wait { mountpoint }) => wait(&mountpoint),
        Some(Command::List) => list(),
        Some(Command::Up) => up(),
        Some(Command::Down) => down(),
        Some(Command::Doctor) => {
            return if doctor::report(&doctor::local_checks()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "kmount", &mut script);
            write_stdout(&script)
        }
        Some(Command::Man) => {
            use clap::CommandFactory;
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => write_stdout(&page),
                Err(e) => Err(e).context("cannot render the manual page"),
            }
        }
        None => mount(cli.mount),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmount: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes generated text to stdout; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KMOUNT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn mount(args: MountArgs) -> Result<()> {
    let (Some(target_arg), Some(mountpoint_arg)) = (args.target, args.mountpoint) else {
        bail!("usage: kmount [-f] TARGET MOUNTPOINT (see kmount --help)");
    };
    let ready = Ready::from_env();
    if let Some(every) = args.reconcile_interval {
        let _ = RECONCILE_INTERVAL.set(every);
    }
    if args.write_back {
        WRITE_BACK.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let kube = kube::KubeOptions {
        namespace: args.namespace,
        container: args.container,
        context: args.context,
        kubeconfig: args
            .kubeconfig
            .map(|p| std::path::absolute(&p).unwrap_or(p)),
    };
    let checked = preflight_mount(&target_arg, &mountpoint_arg, &cwd, kube);
    let (target, mountpoint) = match checked {
        Ok(v) => v,
        Err(e) => {
            let mut ready = ready;
            ready.fail(&e);
            return Err(e);
        }
    };
    if args.foreground || ready.is_daemon() {
        if ready.is_daemon() || std::env::var_os("KMOUNT_LOG").is_some() {
            init_logging();
        }
        return run::run(&target, &mountpoint, ready);
    }
    let dirs = StateDirs::for_current_user()?;
    dirs.create()?;
    let log = dirs.log_path(&mount_id(&mountpoint));
    let mut daemon_args = match &target {
        Target::Kube(k) => k.options.to_args(),
        _ => Vec::new(),
    };
    if let Some(every) = args.reconcile_interval {
        daemon_args.push(format!("--reconcile-interval={}ms", every.as_millis()).into());
    }
    if args.write_back {
        daemon_args.push("--write-back".into());
    }
    daemon_args.push(target.to_arg());
    daemon_args.push(mountpoint.clone().into_os_string());
    let daemon_args: Vec<&std::ffi::OsStr> = daemon_args.iter().map(|a| a.as_os_str()).collect();
    let line = daemon::spawn_background(&daemon_args, &log)?;
    println!("{line}");
    Ok(())
}

/// Every check that can fail before anything is mounted. Returns the target in its resolved
/// form (a local root canonicalized) and the canonical mountpoint.
fn preflight_mount(
    target_arg: &str,
    mountpoint: &Path,
    cwd: &Path,
    kube: kube::KubeOptions,
) -> Result<(Target, PathBuf)> {
    let target = match Target::parse(target_arg, cwd)? {
        Target::Kube(mut k) => {
            k.options = kube;
            Target::Kube(k)
        }
        other => {
            if let Some(flag) = kube.given_flags().first() {
                bail!("{flag} applies only to Kubernetes targets such as deploy/app:/app");
            }
            other
        }
    };
    preflight::check_fuse()?;
    let mountpoint = preflight::check_mountpoint(mountpoint)?;
    let target = match target {
        Target::Local { root } => {
            let root = preflight::check_local_root(&root)?;
            preflight::check_no_nesting(&root, &mountpoint)?;
            Target::Local { root }
        }
        ssh @ Target::Ssh(_) => ssh,
        Target::Kube(k) => Target::Kube(k),
    };
    Ok((target, mountpoint))
}

/// The absolute form of a mountpoint argument without touching the mount itself (a dead FUSE
/// mount cannot be canonicalized: stat fails with ENOTCONN).
/// `kmount wait`: asks the mount's daemon to return once every change is applied.
fn wait(mountpoint: &Path) -> Result<()> {
    let dirs = StateDirs::for_current_user()?;
    let mountpoint = absolute_mountpoint(mountpoint)?;
    match dirs.record_for(&mountpoint) {
        Some(rec) if pid_alive(rec.pid) => {
            control::request(
                &dirs.socket_path(&mount_id(&mountpoint)),
                "wait",
                Duration::from_secs(120),
            )
            .with_context(|| format!("changes made through {}", mountpoint.display()))?;
            Ok(())
        }
        _ => bail!(
            "{} is not a running kmount mount (see `kmount list`)",
            mountpoint.display()
        ),
    }
}

fn absolute_mountpoint(p: &Path) -> Result<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Ok(c);
    }
    let abs = std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))?;
    if let (Some(parent), Some(name)) = (abs.parent(), abs.file_name())
        && let Ok(parent) = parent.canonicalize()
    {
        return Ok(parent.join(name));
    }
    Ok(abs)
}

fn unmount(mountpoint: Option<&Path>, all: bool) -> Result<()> {
    let dirs = StateDirs::for_current_user()?;
    if all {
        let records = dirs.records();
        if records.is_empty() {
            println!("kmount: nothing is mounted");
            return Ok(());
        }
        let mut failed = 0;
        for rec in records {
            if let Err(e) = unmount_one(&dirs, &rec.mountpoint) {
                eprintln!("kmount: error: {e:#}");
                failed += 1;
            }
        }
        if failed > 0 {
            bail!("{failed} mount(s) could not be unmounted (see above)");
        }
        return Ok(());
    }
    let Some(mountpoint) = mountpoint else {
        bail!("give a mountpoint or --all");
    };
    unmount_one(&dirs, &absolute_mountpoint(mountpoint)?)
}

fn unmount_one(dirs: &StateDirs, mountpoint: &Path) -> Result<()> {
    let id = mount_id(mountpoint);
    let record = dirs.record_for(mountpoint);
    let mounted = preflight::mounted_fs_type(mountpoint)?;
    match record {
        Some(rec) if pid_alive(rec.pid) => {
            control::request(&dirs.socket_path(&id), "unmount", Duration::from_secs(120))
                .with_context(|| format!("cannot unmount {}", mountpoint.display()))?;
            // The daemon exits once the kernel has ended the session.
            let deadline = Instant::now() + Duration::from_secs(30);
            while pid_alive(rec.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if pid_alive(rec.pid) {
                bail!(
                    "{} was unmounted but its kmount process (pid {}) has not exited yet; see its log {}",
                    mountpoint.display(),
                    rec.pid,
                    dirs.log_path(&id).display()
                );
            }
            println!("kmount: unmounted {}", mountpoint.display());
            Ok(())
        }
        rec => {
            let is_kmount = mounted.as_deref().is_some_and(|t| t.starts_with("fuse"));
            if !is_kmount {
                dirs.remove_record(mountpoint);
                if rec.is_some() {
                    println!(
                        "kmount: {} was no longer mounted; removed its stale record",
                        mountpoint.display()
                    );
                    return Ok(());
                }
                bail!(
                    "{} is not a kmount mount (see `kmount list`)",
                    mountpoint.display()
                );
            }
            // The daemon is gone (killed, crashed): detach the dead mount.
            run::unmount_path(mountpoint, true)?;
            dirs.remove_record(mountpoint);
            println!(
                "kmount: unmounted {} (its kmount process was gone)",
                mountpoint.display()
            );
            Ok(())
        }
    }
}

/// `kmount up`: mounts each entry of kmount.toml by running `kmount` for it, from the file's
/// directory (so relative targets and mountpoints are relative to the file).
fn up() -> Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let cfg = config::load_nearest(&cwd)?;
    let base = cfg.path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let dirs = StateDirs::for_current_user()?;
    let exe = std::env::current_exe().context("cannot find the kmount executable")?;
    let mut failed = 0;
    for (i, m) in cfg.mounts.iter().enumerate() {
        let unsupported: Vec<&str> = [
            (!m.exclude.is_empty(), "exclude"),
            (!m.local_only.is_empty(), "local_only"),
            (m.on_change.is_some(), "on_change"),
        ]
        .into_iter()
        .filter_map(|(set, k)| set.then_some(k))
        .collect();
        if !unsupported.is_empty() {
            eprintln!(
                "kmount: error: {} [[mount]] #{}: {} not supported by this version of kmount yet; \
                 remove it to mount this entry",
                cfg.path.display(),
                i + 1,
                unsupported.join(", ")
            );
            failed += 1;
            continue;
        }
        let mountpoint = absolute_mountpoint(&m.mountpoint)?;
        if dirs
            .record_for(&mountpoint)
            .is_some_and(|r| pid_alive(r.pid))
        {
            println!("kmount: {} is already mounted", mountpoint.display());
            continue;
        }
        if !mountpoint.exists() {
            std::fs::create_dir_all(&mountpoint)
                .with_context(|| format!("cannot create {}", mountpoint.display()))?;
        }
        let mut cmd = std::process::Command::new(&exe);
        cmd.current_dir(&base);
        for (flag, value) in [
            ("--namespace", &m.namespace),
            ("--context", &m.context),
            ("--container", &m.container),
        ] {
            if let Some(v) = value {
                cmd.arg(flag).arg(v);
            }
        }
        cmd.arg(&m.target).arg(&mountpoint);
        let status = cmd.status().context("cannot run kmount")?;
        if !status.success() {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} mount(s) in {} did not come up (see above)",
            cfg.mounts.len(),
            cfg.path.display()
        );
    }
    Ok(())
}

/// `kmount down`: unmounts each entry of kmount.toml that is mounted.
fn down() -> Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let cfg = config::load_nearest(&cwd)?;
    let dirs = StateDirs::for_current_user()?;
    let mut failed = 0;
    for m in &cfg.mounts {
        let mountpoint = absolute_mountpoint(&m.mountpoint)?;
        let mounted = preflight::mounted_fs_type(&mountpoint)?.is_some();
        if !mounted && dirs.record_for(&mountpoint).is_none() {
            println!("kmount: {} is not mounted", mountpoint.display());
            continue;
        }
        if let Err(e) = unmount_one(&dirs, &mountpoint) {
            eprintln!("kmount: error: {e:#}");
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} mount(s) could not be unmounted (see above)");
    }
    Ok(())
}

fn list() -> Result<()> {
    let dirs = StateDirs::for_current_user()?;
    let mut rows = Vec::new();
    for rec in dirs.records() {
        let alive = pid_alive(rec.pid);
        let mounted = preflight::mounted_fs_type(&rec.mountpoint)
            .ok()
            .flatten()
            .is_some();
        let state = match (alive, mounted) {
            (true, true) => "mounted",
            (true, false) => "starting",
            (false, true) => "stale: process gone, run `kmount unmount` on it",
            (false, false) => {
                dirs.remove_record(&rec.mountpoint);
                continue;
            }
        };
        rows.push([
            rec.target.clone(),
            rec.mountpoint.display().to_string(),
            state.to_string(),
            rec.pid.to_string(),
        ]);
    }
    if rows.is_empty() {
        println!("no kmount mounts");
        return Ok(());
    }
    let header = ["TARGET", "MOUNTPOINT", "STATE", "PID"].map(String::from);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(rows.iter()) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}
