//! Tests of the operations layer against real directories.

mod command;
mod confinement;
mod identity;
mod journal;
mod ops;
mod pathops;
mod rules;
mod tree;
mod watch;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kmount_proto::{Done, NodeRef, Op, RelPath, WireError};
use tempfile::TempDir;

use crate::confine::{Kernel, Root};
use crate::journal::Journal;
use crate::ops::{Agent, execute};

/// A served root `<tmp>/root` beside a directory `<tmp>/outside` that must stay untouched.
pub struct Fx {
    pub tmp: TempDir,
    pub agent: Agent,
}

/// Both ways of running: all newer syscalls, and every fallback forced on.
pub type KernelChoice = (&'static str, fn() -> Kernel);

pub fn kernels() -> [KernelChoice; 2] {
    [
        ("new syscalls", || Kernel::all(true)),
        ("fallbacks", || Kernel::all(false)),
    ]
}

impl Fx {
    pub fn new() -> Fx {
        Fx::with(Kernel::all(true))
    }

    pub fn with(kernel: Kernel) -> Fx {
        Fx::make(kernel, tempfile::tempdir().expect("tempdir"))
    }

    /// For big trees: in memory (`/dev/shm`) when there is one, so building them is quick.
    pub fn big() -> Fx {
        let tmp = match std::path::Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm"),
            false => tempfile::tempdir(),
        };
        Fx::make(Kernel::all(true), tmp.expect("tempdir"))
    }

    fn make(kernel: Kernel, tmp: TempDir) -> Fx {
        // The agent runs with umask 0 (modes arrive with the caller's umask applied).
        // SAFETY: umask cannot fail; every test wants 0.
        unsafe { libc::umask(0) };
        std::fs::create_dir(tmp.path().join("root")).unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::fs::create_dir(tmp.path().join("state")).unwrap();
        let root = Root::open_with(&tmp.path().join("root"), kernel).expect("open root");
        let journal = Journal::with_bases(vec![tmp.path().join("state")]);
        Fx {
            agent: Agent::with_journal(root, journal),
            tmp,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }
    pub fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }
    /// A path inside the root on the local filesystem.
    pub fn at(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    pub fn run(&self, op: Op) -> Result<Done, WireError> {
        execute(&self.agent, op)
    }

    #[track_caller]
    pub fn ok(&self, op: Op) -> Done {
        let shown = format!("{op:?}");
        self.run(op)
            .unwrap_or_else(|e| panic!("{}: {e}", &shown[..shown.len().min(200)]))
    }

    #[track_caller]
    pub fn errno(&self, op: Op) -> i32 {
        let shown = format!("{op:?}");
        match self.run(op) {
            Ok(d) => panic!("{shown} succeeded with {d:?}; expected an error"),
            Err(e) => e.errno,
        }
    }

    #[track_caller]
    pub fn attr(&self, op: Op) -> kmount_proto::Attr {
        match self.ok(op) {
            Done::Attr(a) => a,
            other => panic!("expected Attr, got {other:?}"),
        }
    }

    #[track_caller]
    pub fn handle(&self, op: Op) -> u64 {
        match self.ok(op) {
            Done::Opened { handle, .. } | Done::Handle(handle) => handle,
            other => panic!("expected a handle, got {other:?}"),
        }
    }

    #[track_caller]
    pub fn data(&self, op: Op) -> Vec<u8> {
        match self.ok(op) {
            Done::Data(d) => d,
            other => panic!("expected Data, got {other:?}"),
        }
    }
}

/// A tree like a JavaScript project's: `files` regular files spread over nested package
/// directories (about 12 per directory), with a symlink and an empty directory here and there.
pub fn make_tree(root: &Path, files: usize) {
    use std::os::unix::fs::symlink;
    let mut made = 0usize;
    let mut pkg = 0usize;
    while made < files {
        let dir = root.join(format!("node_modules/pkg{}/lib/sub{}", pkg / 8, pkg % 8));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..12 {
            if made == files {
                break;
            }
            std::fs::write(
                dir.join(format!("file{i}.js")),
                format!("module.exports = {pkg} + {i};\n"),
            )
            .unwrap();
            made += 1;
        }
        if pkg.is_multiple_of(8) {
            symlink("sub0/file0.js", dir.parent().unwrap().join("main.js")).unwrap();
            std::fs::create_dir_all(dir.parent().unwrap().join("empty")).unwrap();
        }
        pkg += 1;
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        self.agent.watch.shutdown(&self.agent.echo);
    }
}

pub fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).expect("valid test path")
}

pub fn node(s: &str) -> NodeRef {
    NodeRef::Path(p(s))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `lstat` on the local side, for comparing.
pub fn lstat(path: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
}

pub fn mode_of(path: &Path) -> u32 {
    lstat(path).mode() & 0o7777
}
