//! kmount's FUSE filesystem: the [`Client`] that talks to the agent, a FUSE-free async
//! [`core::Core`], and a thin fuser adapter.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use kmount_mount::{Client, LocalConnector, MountOptions, mount};
//! let connector = LocalConnector::new("kmount-agent".into(), "/srv/dir".into(), vec![]);
//! let client = Client::connect(&connector).await?;
//! let runtime = tokio::runtime::Handle::current();
//! let mounted = tokio::task::spawn_blocking(move || {
//!     mount(runtime, client, "/mnt/x".as_ref(), &MountOptions::default())
//! })
//! .await??;
//! mounted.join()?;
//! # Ok(()) }
//! ```

pub mod client;
pub mod core;
pub mod error;
mod fuse;
pub mod inode;
pub mod rules;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use client::{
    BoxedStream, CallError, Client, ClientError, ConnectFuture, Connector, LocalConnector,
    StderrTail,
};
pub use error::FsError;
pub use fuser::{Notifier, SessionUnmounter};

use fuser::{Config, MountOption, Session, SessionACL};
use kmount_proto::features;

use crate::core::Core;
use crate::fuse::FuseFs;

/// Shortest attribute/entry TTL used; a TTL of zero makes the kernel ask for every stat.
pub const MIN_ATTR_TTL: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Shown as the source in `/proc/mounts` (e.g. the target as the user typed it).
    pub fsname: String,
    /// Let other users use the mount (`allow_other`).
    pub allow_other: bool,
    /// The kernel checks permissions against the remote's modes and owners.
    pub default_permissions: bool,
    /// Requests run in the agent with the caller's uid/gid/groups (when the agent offers it).
    pub identity: bool,
    /// How long the kernel trusts attributes and names; at least [`MIN_ATTR_TTL`].
    pub attr_ttl: Duration,
    /// Threads reading kernel requests (requests themselves run on the tokio runtime).
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fsname: "kmount".to_string(),
            allow_other: false,
            default_permissions: false,
            identity: false,
            attr_ttl: Duration::from_secs(1),
            threads: 4,
        }
    }
}

/// Why mounting failed; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "/dev/fuse is missing: install fuse3 (apt-get install fuse3) and check that /dev/fuse \
         exists (in a container: run it with --device /dev/fuse --cap-add SYS_ADMIN)"
    )]
    NoDevFuse,
    #[error(
        "fusermount3 was not found: install fuse3 (apt-get install fuse3); unprivileged users \
         need it to mount"
    )]
    NoFusermount,
    #[error("mountpoint {path}: {problem}")]
    Mountpoint { path: PathBuf, problem: String },
    #[error(
        "permission denied mounting on {path}: {detail}; mount on a directory you own, check \
         that you can open /dev/fuse, and for allow_other add 'user_allow_other' to \
         /etc/fuse.conf"
    )]
    PermissionDenied { path: PathBuf, detail: String },
    #[error("cannot read the served directory through the agent: {0}")]
    Root(FsError),
    #[error("cannot mount on {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the FUSE session thread: {0}")]
    Thread(#[source] io::Error),
}

/// Unmounts a live mount; cheap to clone and usable from any thread (e.g. a signal handler
/// task).
#[derive(Debug, Clone)]
pub struct Unmounter(Arc<Mutex<SessionUnmounter>>);

impl Unmounter {
    /// Unmounts; the session then ends. Fails with `EBUSY` while files are in use.
    pub fn unmount(&self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).unmount()
    }
}

/// A live mount. Dropping it unmounts (best effort).
#[derive(Debug)]
pub struct MountHandle {
    session: Option<JoinHandle<io::Result<()>>>,
    unmounter: Unmounter,
    notifier: Notifier,
    mountpoint: PathBuf,
    core: Arc<Core>,
}

impl MountHandle {
    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmounter.unmount()?;
        self.join_session()
    }

    /// Waits until the filesystem is unmounted (by [`Unmounter::unmount`] or externally).
    pub fn join(mut self) -> io::Result<()> {
        self.join_session()
    }

    fn join_session(&mut self) -> io::Result<()> {
        match self.session.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| io::Error::other("the FUSE session thread panicked"))?,
            None => Ok(()),
        }
    }

    /// A handle that unmounts this mount from anywhere.
    pub fn unmounter(&self) -> Unmounter {
        self.unmounter.clone()
    }

    /// Sends cache invalidations to the kernel. Call it from a thread of its own, never from
    /// inside a request and never while holding a lock a request needs.
    pub fn notifier(&self) -> Notifier {
        self.notifier.clone()
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Nodes the kernel currently holds (the root included).
    pub fn known_nodes(&self) -> usize {
        self.core.table().len()
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.session.is_none() {
            return;
        }
        match self.unmounter.unmount() {
            Ok(()) => {
                let _ = self.join_session();
            }
            Err(e) => tracing::warn!("cannot unmount {}: {e}", self.mountpoint.display()),
        }
    }
}

/// Mounts the directory `client` serves at `mountpoint`; returns once the kernel handshake is
/// done. Blocking: call it outside async code (e.g. in `spawn_blocking`). Requests run on
/// `runtime`.
pub fn mount(
    runtime: tokio::runtime::Handle,
    client: Client,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<MountHandle, MountError> {
    check_mountpoint(mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoDevFuse);
    }
    if !nix::unistd::geteuid().is_root() && find_fusermount().is_none() {
        return Err(MountError::NoFusermount);
    }

    let root = {
        let (tx, rx) = std::sync::mpsc::channel();
        let c = client.clone();
        runtime.spawn(async move {
            let _ = tx.send(Core::root_attr(&c).await);
        });
        rx.recv()
            .map_err(|_| MountError::Root(err!(libc::EIO, "the runtime is shutting down")))?
            .map_err(MountError::Root)?
    };
    if !root.is_dir() {
        return Err(MountError::Root(err!(
            libc::ENOTDIR,
            "the served path is not a directory"
        )));
    }
    if opts.identity && client.features() & features::IDENTITY == 0 {
        tracing::warn!(
            "the agent ({}) does not run requests as their callers; everything runs as the \
             agent's user",
            client.peer().software
        );
    }
    let core = Arc::new(Core::new(client, &root, opts.identity));
    let fs = FuseFs::new(core.clone(), runtime, opts.attr_ttl.max(MIN_ATTR_TTL));

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("kmount".to_string()),
    ];
    if opts.default_permissions {
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;

    let mut session =
        Session::new(fs, mountpoint, &config).map_err(|e| mount_error(mountpoint, e))?;
    let unmounter = Unmounter(Arc::new(Mutex::new(session.unmount_callable())));
    let notifier = session.notifier();
    let thread = std::thread::Builder::new()
        .name("kmount-fuse".to_string())
        .spawn(move || session.run())
        .map_err(MountError::Thread)?;
    tracing::debug!("mounted at {}", mountpoint.display());
    Ok(MountHandle {
        session: Some(thread),
        unmounter,
        notifier,
        mountpoint: mountpoint.to_path_buf(),
        core,
    })
}

fn check_mountpoint(mountpoint: &Path) -> Result<(), MountError> {
    let problem = match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => "it is not a directory".to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            "it does not exist; create it first (mkdir -p)".to_string()
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            "a dead mount is still there; unmount it first (fusermount3 -u)".to_string()
        }
        Err(e) => e.to_string(),
    };
    Err(MountError::Mountpoint {
        path: mountpoint.to_path_buf(),
        problem,
    })
}

fn find_fusermount() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/bin"), PathBuf::from("/sbin")])
        .flat_map(|dir| [dir.join("fusermount3"), dir.join("fusermount")])
        .find(|p| p.is_file())
}

fn mount_error(mountpoint: &Path, e: io::Error) -> MountError {
    let path = mountpoint.to_path_buf();
    if e.kind() == io::ErrorKind::PermissionDenied {
        return MountError::PermissionDenied {
            path,
            detail: e.to_string().trim().to_string(),
        };
    }
    if e.kind() == io::ErrorKind::NotFound {
        if !Path::new("/dev/fuse").exists() {
            return MountError::NoDevFuse;
        }
        if find_fusermount().is_none() {
            return MountError::NoFusermount;
        }
    }
    MountError::Mount { path, source: e }
}
