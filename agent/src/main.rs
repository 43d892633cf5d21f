//! `kmount-agent [--identity] [--mountpoint LOCAL_MOUNTPOINT] ROOT`: serves ROOT over
//! stdin/stdout until stdin closes. `kmount-agent --version` prints the version.

mod command;
mod confine;
mod digest;
mod echo;
mod handles;
mod hide;
mod identity;
mod journal;
mod ops;
mod pathops;
mod serve;
mod sys;
mod walk;
mod watch;
mod xattr;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::fs::File;
use std::io::BufReader;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::identity::Identity;

const USAGE: &str = "usage: kmount-agent [--identity] [--mountpoint LOCAL_MOUNTPOINT] ROOT\n       kmount-agent --version";

#[derive(Debug, Default, PartialEq)]
struct Args {
    identity: bool,
    mountpoint: Option<PathBuf>,
    root: Option<PathBuf>,
    version: bool,
    help: bool,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut out = Args::default();
    let mut args = args.into_iter();
    let mut positional_only = false;
    while let Some(arg) = args.next() {
        let s = arg.to_string_lossy();
        if positional_only || !s.starts_with('-') || s == "-" {
            if out.root.is_some() {
                return Err(format!("unexpected extra argument {s:?}"));
            }
            out.root = Some(PathBuf::from(arg));
            continue;
        }
        match &*s {
            "--" => positional_only = true,
            "--identity" => out.identity = true,
            "--version" | "-V" => out.version = true,
            "--help" | "-h" => out.help = true,
            "--mountpoint" => match args.next() {
                Some(p) => out.mountpoint = Some(PathBuf::from(p)),
                None => return Err("--mountpoint needs a path".into()),
            },
            _ => match s.strip_prefix("--mountpoint=") {
                Some(p) if !p.is_empty() => out.mountpoint = Some(PathBuf::from(p)),
                _ => return Err(format!("unknown option {s:?}")),
            },
        }
    }
    Ok(out)
}

/// The root as it will be served, or why it cannot be.
fn check_root(root: &Path, mountpoint: Option<&Path>) -> Result<PathBuf, String> {
    let shown = root.display();
    let canonical = root
        .canonicalize()
        .map_err(|e| format!("cannot serve {shown}: {e}; check that the directory exists"))?;
    if !canonical.is_dir() {
        return Err(format!(
            "cannot serve {shown}: it is not a directory; give the directory to mount"
        ));
    }
    let Some(mp) = mountpoint else {
        return Ok(canonical);
    };
    let mp = mp
        .canonicalize()
        .or_else(|_| std::path::absolute(mp))
        .map_err(|e| format!("cannot check the mountpoint {}: {e}", mp.display()))?;
    let (r, m) = (canonical.display(), mp.display());
    if canonical == mp {
        Err(format!(
            "refusing to serve {r}: it is the mountpoint itself, which would make the mount loop \
             forever; choose a mountpoint outside the served directory"
        ))
    } else if mp.starts_with(&canonical) {
        Err(format!(
            "refusing to serve {r}: it contains the mountpoint {m}, which would make the mount \
             loop forever; choose a mountpoint outside the served directory"
        ))
    } else if canonical.starts_with(&mp) {
        Err(format!(
            "refusing to serve {r}: it lies inside the mountpoint {m}, which would make the \
             mount loop forever; choose a directory outside the mountpoint"
        ))
    } else {
        Ok(canonical)
    }
}

/// Lets the agent keep as many files open as the mount side may hold.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid in/out pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Keeps the resident set small: big I/O buffers are mapped and unmapped one by one instead
/// of lingering in per-thread malloc arenas (glibc otherwise raises its mmap threshold after
/// the first free and keeps up to 8 arenas per core).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() {
    tune_malloc();
    std::process::exit(real_main());
}

fn real_main() -> i32 {
    // SAFETY: fds 0 and 1 are the session's stream; the agent owns them from here on and
    // nothing else in the process uses stdin/stdout.
    let (stdin, mut stdout) = unsafe { (File::from_raw_fd(0), File::from_raw_fd(1)) };
    let args = parse_args(std::env::args_os().skip(1));
    if let Ok(a) = &args {
        if a.version {
            println!(
                "kmount-agent {} protocol {}",
                env!("CARGO_PKG_VERSION"),
                kmount_proto::PROTOCOL_VERSION
            );
            return 0;
        }
        if a.help {
            println!("{USAGE}");
            return 0;
        }
    }
    let identity = Identity::new(args.as_ref().is_ok_and(|a| a.identity));
    let hello = serve::hello(&identity);
    let refuse = |stdout: &mut File, message: String| {
        eprintln!("kmount-agent: {message}");
        let _ = serve::refuse(stdout, &hello, &message);
        serve::EXIT_REFUSED
    };
    let args = match args {
        Ok(a) => a,
        Err(e) => return refuse(&mut stdout, format!("{e}\n{USAGE}")),
    };
    let Some(root_arg) = &args.root else {
        return refuse(&mut stdout, format!("no directory to serve given\n{USAGE}"));
    };
    let root_path = match check_root(root_arg, args.mountpoint.as_deref()) {
        Ok(p) => p,
        Err(message) => return refuse(&mut stdout, message),
    };
    if args.identity && !identity.active() {
        eprintln!("kmount-agent: --identity needs root; serving as the agent's own user");
    }
    // Modes arrive with the caller's umask already applied by the mount side's kernel.
    // SAFETY: umask cannot fail.
    let started_with = unsafe { libc::umask(0) };
    command::remember_umask(started_with as u32);
    raise_fd_limit();
    let root = match confine::Root::open(&root_path) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                &mut stdout,
                format!("cannot open {}: {e}", root_path.display()),
            );
        }
    };
    let agent = Arc::new(ops::Agent::new(root));
    let input = BufReader::with_capacity(256 << 10, stdin);
    serve::run(agent, Arc::new(identity), input, stdout)
}

#[cfg(test)]
mod main_tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Args, String> {
        parse_args(v.iter().map(OsString::from))
    }

    #[test]
    fn parses_the_documented_command_line() {
        let a = parse(&["--identity", "--mountpoint", "/m", "/r"]).unwrap();
        assert!(a.identity);
        assert_eq!(a.mountpoint.as_deref(), Some(Path::new("/m")));
        assert_eq!(a.root.as_deref(), Some(Path::new("/r")));
        let b = parse(&["--mountpoint=/m", "--", "-odd"]).unwrap();
        assert_eq!(b.mountpoint.as_deref(), Some(Path::new("/m")));
        assert_eq!(b.root.as_deref(), Some(Path::new("-odd")));
        assert!(parse(&["--version"]).unwrap().version);
        assert!(parse(&["--bogus", "/r"]).is_err());
        assert!(parse(&["/a", "/b"]).is_err());
        assert!(parse(&["--mountpoint"]).is_err());
    }

    #[test]
    fn refuses_roots_that_would_loop() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        let inner = root.join("mnt");
        std::fs::create_dir_all(&inner).unwrap();
        let outside = t.path().join("m");
        std::fs::create_dir(&outside).unwrap();
        let canon = root.canonicalize().unwrap();
        assert_eq!(check_root(&root, Some(&outside)).unwrap(), canon);
        assert_eq!(check_root(&root, None).unwrap(), canon);
        let e = check_root(&root, Some(&inner)).unwrap_err();
        assert!(
            e.contains("contains the mountpoint") && e.contains("loop"),
            "{e}"
        );
        let e = check_root(&inner, Some(&root)).unwrap_err();
        assert!(e.contains("inside the mountpoint"), "{e}");
        let e = check_root(&root, Some(&root)).unwrap_err();
        assert!(e.contains("mountpoint itself"), "{e}");
        // A sibling whose name merely starts the same is not inside.
        let sibling = t.path().join("r2");
        std::fs::create_dir(&sibling).unwrap();
        assert!(check_root(&root, Some(&sibling)).is_ok());
        let e = check_root(&t.path().join("missing"), None).unwrap_err();
        assert!(e.contains("cannot serve") && e.contains("exists"), "{e}");
        let file = t.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = check_root(&file, None).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
    }
}
