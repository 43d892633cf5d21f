//! `kmount`: mount a directory of a container, a host or this machine through FUSE.

mod bwlimit;
mod config;
mod confirm;
mod connect;
mod control;
mod daemon;
mod doctor;
mod doctor_target;
mod install;
mod kube;
mod logs;
mod manpage;
mod options;
mod preflight;
mod run;
mod ssh;
mod state;
mod status;
mod target;
mod unmount;
mod up;
mod why;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::daemon::Ready;
use crate::state::{MountRecord, StateDirs, mount_id, pid_alive};
use crate::target::Target;

const EXAMPLES: &str = "\
Examples:
  kmount ./src ./mnt           mount ./src at ./mnt (in the background)
  kmount -f ~/project /tmp/p   the same in the foreground; Ctrl-C unmounts
  kmount me@box:/srv/app ./mnt mount /srv/app of host box over ssh
  kmount deploy/app:/app ./mnt mount /app of a container of deployment app
  kmount --exclude node_modules/ --on-change 'make' ./src ./mnt
  kmount list                  show the active mounts
  kmount status ./mnt          what the mount is doing (--json for scripts)
  kmount confirm ./mnt         apply a removal the mount paused (the target lost most files)
  kmount logs -f ./mnt         follow the mount's log
  kmount why ./mnt/a.swp       which ignore rule decides for a path
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
    /// Local-first: changes land in a local journal and content cache at once and reach the
    /// target in the background, in order (`kmount wait` waits for them; `kmount unmount`
    /// sends them first). The default for containers and ssh hosts. Also KMOUNT_WRITE_BACK=1.
    #[arg(long, conflicts_with = "write_through")]
    write_back: bool,
    /// Every change is in the target before the call returns: each waits a round trip (the
    /// default for local directories; containers and ssh hosts are local-first). Also
    /// KMOUNT_WRITE_BACK=0.
    #[arg(long)]
    write_through: bool,
    /// Hide paths matching PATTERN (gitignore syntax) in both directions; repeatable. Also
    /// read from `.kmountignore` at the target's root.
    #[arg(long, value_name = "PATTERN", allow_hyphen_values = true)]
    exclude: Vec<String>,
    /// Keep paths matching PATTERN on this side only: usable in the mount, never sent to the
    /// target; repeatable. Editor swap and backup files are local-only by default.
    #[arg(long, value_name = "PATTERN", allow_hyphen_values = true)]
    local_only: Vec<String>,
    /// Leave out the built-in local-only patterns (editor swap and backup files).
    #[arg(long)]
    no_default_ignores: bool,
    /// Run COMMAND in the target (`sh -c`, in the mounted directory) after each batch of
    /// changes made through the mount has landed there; runs never overlap.
    #[arg(long, value_name = "COMMAND", allow_hyphen_values = true)]
    on_change: Option<String>,
    /// Cap the traffic to the target at RATE bytes per second in each direction: 500K, 2M,
    /// 1G (K = 1024).
    #[arg(long, value_name = "RATE", value_parser = options::parse_rate, allow_hyphen_values = true)]
    bwlimit: Option<u64>,
    /// How long a request that needs the target waits for it (a lost connection to come back,
    /// a frozen agent to answer) before it fails with EIO, e.g. 10s, 2m [default: 30s]. Reads
    /// of cached files and listings never wait.
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    remote_timeout: Option<Duration>,
}

impl MountArgs {
    fn flags(&self) -> options::MountFlags {
        options::MountFlags {
            reconcile_interval: self.reconcile_interval,
            write_back: self.write_back,
            write_through: self.write_through,
            rules: kmount_mount::rules::RulesConfig {
                exclude: self.exclude.clone(),
                local_only: self.local_only.clone(),
                no_defaults: self.no_default_ignores,
                kmountignore: None,
            },
            on_change: self.on_change.clone(),
            bwlimit: self.bwlimit,
            remote_timeout: self.remote_timeout,
        }
    }
}

/// `--reconcile-interval`, `--remote-timeout`: `500ms`, `2s`, `1.5` (seconds); at least 10 ms.
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Flush pending changes and unmount.
    #[command(
        visible_alias = "umount",
        after_help = "Examples:\n  kmount unmount ./mnt\n  kmount unmount --all\n  kmount unmount --force ./mnt   the target is gone or the mount hangs"
    )]
    Unmount {
        /// The mountpoint to unmount.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        mountpoint: Option<PathBuf>,
        /// Unmount every kmount mount of this user.
        #[arg(long)]
        all: bool,
        /// Unmount at once even when the target or the mount's process is gone or hangs
        /// (lazy unmount; the process is ended). Changes not yet applied are listed and kept
        /// for the next mount of the same target at the same place.
        #[arg(long)]
        force: bool,
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
    /// Show what a mount is doing: connection, changes not yet applied, reconciliation,
    /// conflicts, errors, cache, the --on-change command.
    #[command(
        after_help = "--json prints {\"schema\": \"kmount.status\", \"version\": 1, \"mounts\": [...]}; \
                      the keys are listed in the README (Everyday use).\n\nExamples:\n  kmount status\n  kmount status ./mnt --json"
    )]
    Status {
        /// The mountpoint [default: every mount].
        mountpoint: Option<PathBuf>,
        /// Print JSON (stable keys, see the README).
        #[arg(long)]
        json: bool,
    },
    /// Apply a removal the mount paused: the target suddenly lacked most of its files (an empty
    /// volume, the wrong directory, a new pod), so the mount kept showing them.
    #[command(
        after_help = "`kmount status` shows a paused removal. Fix the target instead when it is wrong: \
                      the pause ends by itself once the files are back.\n\nExample:\n  kmount confirm ./mnt"
    )]
    Confirm {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
    /// Print a mount's log (KMOUNT_LOG=debug when mounting logs more).
    #[command(after_help = "Examples:\n  kmount logs ./mnt\n  kmount logs -f ./mnt")]
    Logs {
        /// The mountpoint [default: the only mount].
        mountpoint: Option<PathBuf>,
        /// Keep printing what is added until interrupted or the mount ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Say which ignore rule decides for a path, like `git check-ignore -v`.
    #[command(
        after_help = "Prints SOURCE:LINE:PATTERN<TAB>PATH<TAB>CLASS (CLASS: excluded, local-only, synced).\n\n\
                      Exit status: 0 when PATH is excluded or local-only, 1 when it is synced, 2 on error.\n\n\
                      Examples:\n  kmount why ./mnt/node_modules\n  kmount why --mount ./mnt build/out.o"
    )]
    Why {
        /// A path in a mount (it need not exist), or relative to the root of --mount.
        path: PathBuf,
        /// The mount PATH is relative to [default: the mount PATH is in].
        #[arg(long, value_name = "MOUNTPOINT")]
        mount: Option<PathBuf>,
    },
    /// Check this machine (FUSE, fusermount3, inotify limits, the agent) and, given a target,
    /// the cluster or ssh host it needs; say what to fix.
    #[command(
        after_help = "Exit status: 0 when everything needed is there, 1 otherwise.\n\nExamples:\n  kmount doctor\n  kmount doctor deploy/app:/app --context dev\n  kmount doctor me@box:/srv/app"
    )]
    Doctor {
        /// A target to check the way to (Kubernetes: kubeconfig, cluster, exec permission;
        /// ssh: the host answers without a password prompt).
        target: Option<String>,
        /// Kubernetes: the namespace to check exec permission in.
        #[arg(short = 'n', long, value_name = "NAMESPACE")]
        namespace: Option<String>,
        /// Kubernetes: the kubeconfig context to check (checked even without a target).
        #[arg(long, value_name = "NAME")]
        context: Option<String>,
        /// Kubernetes: the kubeconfig file.
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
    },
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
        after_help = "kmount.toml (found in the current directory or the nearest parent):\n\n  [[mount]]\n  target = \"deploy/app:/app\"   # any target kmount accepts\n  mountpoint = \"mnt\"           # relative to the file\n  # optional:\n  namespace = \"dev\"\n  context = \"staging\"\n  container = \"app\"\n  exclude = [\"node_modules/\"]\n  local_only = [\"build/\"]\n  on_change = \"make\"\n  remote_timeout = \"10s\"\n\nWhen an entry fails, the mounts this `up` made are unmounted again.\n\nExample:\n  kmount up"
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
        Some(Command::Unmount {
            mountpoint,
            all,
            force,
        }) => unmount::command(mountpoint.as_deref(), all, force),
        Some(Command::Wait { mountpoint }) => wait(&mountpoint),
        Some(Command::List) => list(),
        Some(Command::Status { mountpoint, json }) => status::command(mountpoint.as_deref(), json),
        Some(Command::Logs { mountpoint, follow }) => logs::command(mountpoint.as_deref(), follow),
        Some(Command::Confirm { mountpoint }) => confirm::command(&mountpoint),
        Some(Command::Why { path, mount }) => {
            return match why::command(&path, mount.as_deref()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("kmount: error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Up) => up::up(),
        Some(Command::Down) => up::down(),
        Some(Command::Doctor {
            target,
            namespace,
            context,
            kubeconfig,
        }) => {
            let kube = kube::KubeOptions {
                namespace,
                container: None,
                context,
                kubeconfig: kubeconfig.map(|p| std::path::absolute(&p).unwrap_or(p)),
            };
            let mut checks = doctor::local_checks();
            match doctor_target::target_checks(target.as_deref(), kube) {
                Ok(more) => checks.extend(more),
                Err(e) => {
                    eprintln!("kmount: error: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
            return if doctor::report(&checks) {
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
            match manpage::render(Cli::command()) {
                Ok(page) => write_stdout(&page),
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

/// Logs at `KMOUNT_LOG` (EnvFilter syntax; default `info`) to stderr (the log file, for a
/// daemon) and, in the foreground, also to the mount's log file (`kmount logs`).
fn init_logging(daemon: bool, mountpoint: &Path) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KMOUNT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let to_terminal = daemon || std::env::var_os("KMOUNT_LOG").is_some();
    let file = (!daemon).then(|| foreground_log_file(mountpoint)).flatten();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match (file, to_terminal) {
        (Some(f), true) => builder
            .with_writer(std::io::stderr.and(std::sync::Mutex::new(f)))
            .try_init(),
        (Some(f), false) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        (None, _) => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// The log file of a foreground mount (the same one a background mount writes to).
fn foreground_log_file(mountpoint: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let dirs = StateDirs::for_current_user().ok()?;
    dirs.create().ok()?;
    let log = dirs.log_path(&mount_id(mountpoint));
    logs::rotate(&log);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .ok()
}

fn mount(args: MountArgs) -> Result<()> {
    let flags = args.flags();
    let (Some(target_arg), Some(mountpoint_arg)) = (args.target, args.mountpoint) else {
        bail!("usage: kmount [-f] TARGET MOUNTPOINT (see kmount --help)");
    };
    let mut ready = Ready::from_env();
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let kube = kube::KubeOptions {
        namespace: args.namespace,
        container: args.container,
        context: args.context,
        kubeconfig: args
            .kubeconfig
            .map(|p| std::path::absolute(&p).unwrap_or(p)),
    };
    let checked = flags
        .check_rules()
        .and_then(|()| preflight_mount(&target_arg, &mountpoint_arg, &cwd, kube));
    let (target, mountpoint) = match checked {
        Ok(v) => v,
        Err(e) => {
            ready.fail(&e);
            return Err(e);
        }
    };
    if args.foreground || ready.is_daemon() {
        init_logging(ready.is_daemon(), &mountpoint);
        return run::run(&target, &mountpoint, &flags, ready);
    }
    let dirs = StateDirs::for_current_user()?;
    dirs.create()?;
    let log = dirs.log_path(&mount_id(&mountpoint));
    let mut daemon_args = match &target {
        Target::Kube(k) => k.options.to_args(),
        _ => Vec::new(),
    };
    daemon_args.extend(flags.to_args());
    daemon_args.push("--".into());
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

/// `kmount wait`: asks the mount's daemon to return once every change is applied.
fn wait(mountpoint: &Path) -> Result<()> {
    let dirs = StateDirs::for_current_user()?;
    let rec = find_record(&dirs, mountpoint)?;
    if !pid_alive(rec.pid) {
        bail!(
            "the kmount process of {} (pid {}) is gone; `kmount unmount {}` cleans up and the \
             next mount of the same target there sends what was left",
            rec.mountpoint.display(),
            rec.pid,
            rec.mountpoint.display()
        );
    }
    control::request(
        &dirs.socket_path(&mount_id(&rec.mountpoint)),
        "wait",
        Duration::from_secs(120),
    )
    .with_context(|| format!("changes made through {}", rec.mountpoint.display()))?;
    Ok(())
}

/// The absolute form of a mountpoint argument without touching the mount itself (a dead FUSE
/// mount cannot be canonicalized: stat fails with ENOTCONN).
pub fn absolute_mountpoint(p: &Path) -> Result<PathBuf> {
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

/// The record of the mount at `mountpoint`, or an error that says what is mounted.
pub fn find_record(dirs: &StateDirs, mountpoint: &Path) -> Result<MountRecord> {
    let abs = absolute_mountpoint(mountpoint)?;
    if let Some(rec) = dirs.record_for(&abs) {
        return Ok(rec);
    }
    bail!(
        "{} is not a kmount mount; {}",
        abs.display(),
        mounted_list(dirs)
    )
}

/// "mounted: /a, /b" or "nothing is mounted", for error messages.
pub fn mounted_list(dirs: &StateDirs) -> String {
    let records = dirs.records();
    if records.is_empty() {
        return "nothing is mounted (see `kmount list`)".into();
    }
    let names: Vec<String> = records
        .iter()
        .map(|r| r.mountpoint.display().to_string())
        .collect();
    format!("kmount mounts: {}", names.join(", "))
}

/// The mount a command without MOUNTPOINT means: the only one there is.
pub fn only_record(dirs: &StateDirs) -> Result<MountRecord> {
    let mut records = dirs.records();
    match records.len() {
        1 => Ok(records.remove(0)),
        0 => bail!("nothing is mounted (see `kmount list`); give a MOUNTPOINT"),
        _ => bail!(
            "{} mounts are running; give one MOUNTPOINT ({})",
            records.len(),
            mounted_list(dirs)
        ),
    }
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
