//! The contenders: how each one makes the data root appear at a path, and how it is taken
//! down again. kmount and sshfs reach the same sshd through the same delaying relay.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::sshd::{HOST_ALIAS, TestSshd, Variant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Kmount,
    /// kmount with `--write-back` (local-first: changes go through a local journal).
    KmountWb,
    Sshfs,
    Native,
    Bindfs,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Kmount,
        Kind::KmountWb,
        Kind::Sshfs,
        Kind::Native,
        Kind::Bindfs,
    ];

    /// Whether it goes over the (emulated) network.
    pub fn remote(self) -> bool {
        matches!(self, Kind::Kmount | Kind::KmountWb | Kind::Sshfs)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Kmount => "kmount",
            Kind::KmountWb => "kmount-wb",
            Kind::Sshfs => "sshfs",
            Kind::Native => "native",
            Kind::Bindfs => "bindfs",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a contender needs to mount.
pub struct Env<'a> {
    pub work: &'a Path,
    /// The data root on the "remote" (served by sshd; the same directory natively).
    pub root: &'a Path,
    pub sshd: &'a TestSshd,
    pub kmount: &'a Path,
    pub agent: &'a Path,
}

impl Env<'_> {
    fn mountpoint(&self, kind: Kind) -> PathBuf {
        self.work.join(format!("mnt-{kind}"))
    }

    /// kmount's state, content cache and journal, kept apart from the user's.
    fn kmount_dirs(&self) -> (PathBuf, PathBuf, PathBuf) {
        let k = self.work.join("kmount-home");
        (k.join("state"), k.join("cache"), k.join("xdg-state"))
    }

    fn kmount_cmd(&self) -> Command {
        let (state, cache, xdg_state) = self.kmount_dirs();
        let mut c = Command::new(self.kmount);
        c.env("KMOUNT_AGENT", self.agent)
            .env("KMOUNT_SSH", self.sshd.ssh_command(Variant::Good))
            .env("KMOUNT_STATE_DIR", state)
            .env("XDG_CACHE_HOME", cache)
            .env("XDG_STATE_HOME", xdg_state);
        c
    }
}

/// The root as one contender shows it, mounted until [`Session::unmount`] (or drop).
pub struct Session {
    pub kind: Kind,
    /// Where the data root appears.
    pub root: PathBuf,
    mountpoint: Option<PathBuf>,
    /// How long mounting took (until the mount answered).
    pub mount_time: Duration,
    /// `kmount unmount MNT` with the environment the mount was made with.
    kmount_unmount: Option<Command>,
    /// The data root on the remote (to recognize the agent serving it).
    remote_root: PathBuf,
}

fn run(cmd: &mut Command, what: &str) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(())
}

/// Options sshfs gets beyond its defaults: `no_contain_symlinks` where sshfs has it (Debian's
/// security update made it reject symlinks containing `..`, which `node_modules/.bin` is made
/// of: without it `git status` is wrong).
pub fn sshfs_extra_options() -> Vec<String> {
    let help = Command::new("sshfs")
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    if help.contains("no_contain_symlinks") {
        vec!["-o".into(), "no_contain_symlinks".into()]
    } else {
        Vec::new()
    }
}

fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == p))
}

/// Takes down whatever is mounted at `mnt` (left over from an interrupted run).
pub fn force_unmount(mnt: &Path) {
    if is_mounted(mnt) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(mnt)
            .status();
    }
    if is_mounted(mnt) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
}

impl Session {
    /// Mounts `kind` with empty client-side caches. `port` is the relay's (remote kinds).
    pub fn mount(kind: Kind, env: &Env, port: u16) -> io::Result<Session> {
        let mnt = env.mountpoint(kind);
        if kind != Kind::Native {
            force_unmount(&mnt);
            fs::create_dir_all(&mnt)?;
        }
        let start = Instant::now();
        let mut kmount_unmount = None;
        match kind {
            Kind::Native => {
                return Ok(Session {
                    kind,
                    root: env.root.to_path_buf(),
                    mountpoint: None,
                    mount_time: Duration::ZERO,
                    kmount_unmount: None,
                    remote_root: env.root.to_path_buf(),
                });
            }
            Kind::Bindfs => run(Command::new("bindfs").arg(env.root).arg(&mnt), "bindfs")?,
            Kind::Sshfs => run(
                Command::new("sshfs")
                    .args(sshfs_extra_options())
                    .arg("-o")
                    .arg(format!(
                        "ssh_command={}",
                        env.sshd.ssh_command(Variant::Good)
                    ))
                    .arg("-p")
                    .arg(port.to_string())
                    .arg(format!("{HOST_ALIAS}:{}", env.root.display()))
                    .arg(&mnt),
                "sshfs",
            )?,
            Kind::Kmount | Kind::KmountWb => {
                let (_, cache, _) = env.kmount_dirs();
                // Cold: no content cache from an earlier mount.
                if cache.exists() {
                    fs::remove_dir_all(&cache)?;
                }
                let target = format!("ssh://{HOST_ALIAS}:{port}{}", env.root.display());
                let mut cmd = env.kmount_cmd();
                // Both explicit: local-first is the default for ssh targets.
                cmd.arg(if kind == Kind::KmountWb {
                    "--write-back"
                } else {
                    "--write-through"
                });
                run(cmd.arg(&target).arg(&mnt), "kmount")?;
                let mut unmount = env.kmount_cmd();
                unmount.arg("unmount").arg(&mnt);
                kmount_unmount = Some(unmount);
            }
        }
        // Ready means answering: the first stat through it.
        fs::metadata(mnt.join("repo"))?;
        let mount_time = start.elapsed();
        Ok(Session {
            kind,
            root: mnt.clone(),
            mountpoint: Some(mnt),
            mount_time,
            kmount_unmount,
            remote_root: env.root.to_path_buf(),
        })
    }

    pub fn mountpoint(&self) -> Option<&Path> {
        self.mountpoint.as_deref()
    }

    /// Unmounts (kmount: `kmount unmount`, which waits until everything is on the remote).
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        let servers = self.processes();
        let Some(mnt) = self.mountpoint.take() else {
            return Ok(());
        };
        // A process killed at the cap can keep the mount busy for a moment.
        let mut result = Ok(());
        for _ in 0..20 {
            result = match self.kmount_unmount.as_mut() {
                Some(cmd) => run(cmd, "kmount unmount"),
                None => run(
                    Command::new("fusermount3").arg("-u").arg(&mnt),
                    "fusermount3 -u",
                ),
            };
            match &result {
                Err(e) if e.to_string().contains("busy") => {
                    std::thread::sleep(Duration::from_millis(250))
                }
                _ => break,
            }
        }
        if result.is_err() {
            force_unmount(&mnt);
            // A lazily detached mount keeps its daemon alive; it must not linger into the
            // next session (nor into its memory figures).
            for (role, pid) in servers {
                if !role.contains("remote") {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
            }
        }
        result
    }

    /// The processes that serve this session: (role, pid).
    pub fn processes(&self) -> Vec<(String, u32)> {
        let Some(mnt) = &self.mountpoint else {
            return Vec::new();
        };
        let mnt = mnt.to_string_lossy().into_owned();
        let root = self.remote_root.to_string_lossy().into_owned();
        let mut out = Vec::new();
        for (pid, args) in all_processes() {
            let exe = args
                .first()
                .map(|a| a.rsplit('/').next().unwrap_or(a).to_string());
            let Some(exe) = exe else { continue };
            let has = |s: &str| args.iter().any(|a| a == s);
            let role = match (self.kind, exe.as_str()) {
                (Kind::Kmount | Kind::KmountWb, "kmount") if has(&mnt) => "kmount",
                (Kind::Kmount | Kind::KmountWb, "kmount-agent") if has(&root) => {
                    "kmount-agent (remote)"
                }
                (Kind::Sshfs, "sshfs") if has(&mnt) => "sshfs",
                (Kind::Sshfs, "sftp-server") => "sftp-server (remote)",
                (Kind::Bindfs, "bindfs") if has(&mnt) => "bindfs",
                _ => continue,
            };
            out.push((role.to_string(), pid));
        }
        out
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.unmount_inner();
    }
}

fn all_processes() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push((pid, args));
    }
    out
}

/// Peak and current resident memory of a process, in KiB (VmHWM, VmRSS).
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Empties the kernel's page, dentry and inode caches (root only). Returns false when it
/// could not.
pub fn drop_caches() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}
