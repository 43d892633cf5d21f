//! From a target to a byte stream to its agent: one [`Connector`] per kind of target, and the
//! mount options that go with it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kmount_mount::{Connector, LocalConnector};

use crate::target::Target;

/// How a target is reached and how its files are presented.
pub struct Plan {
    pub connector: Box<dyn Connector>,
    /// Requests carry the caller's identity and the agent acts as that user (local targets
    /// served by root, so that a shared mount behaves like a local disk).
    pub identity: bool,
    /// Other users may use the mount, with the kernel checking file modes.
    pub shared: bool,
}

/// Builds the plan for `target` mounted at `mountpoint`.
pub fn plan(target: &Target, mountpoint: &Path) -> Result<Plan> {
    match target {
        Target::Local { root } => {
            let is_root = nix::unistd::geteuid().is_root();
            let mut args: Vec<OsString> = Vec::new();
            if is_root {
                args.push("--identity".into());
            }
            args.push("--mountpoint".into());
            args.push(mountpoint.as_os_str().to_owned());
            Ok(Plan {
                connector: Box::new(LocalConnector::new(agent_binary()?, root.clone(), args)),
                identity: is_root,
                shared: is_root,
            })
        }
        // The agent runs as the container's user: files it creates belong to the app.
        Target::Kube(k) => {
            let agent = crate::install::LocalAgent::load(&agent_binary()?)?;
            Ok(Plan {
                connector: Box::new(crate::kube::KubeConnector::new(k.clone(), agent)),
                identity: false,
                shared: false,
            })
        }
        // The remote user owns what the mount creates; the mount is this user's alone.
        Target::Ssh(ssh) => Ok(Plan {
            connector: Box::new(crate::ssh::SshConnector::new(ssh)?),
            identity: false,
            shared: false,
        }),
    }
}

/// Where `kmount-agent` is: `KMOUNT_AGENT`, else next to this executable.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KMOUNT_AGENT") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "KMOUNT_AGENT points to {}, which is not a file",
                p.display()
            );
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find the kmount executable")?;
    let p = exe.with_file_name("kmount-agent");
    if !p.is_file() {
        bail!(
            "kmount-agent was not found next to {} ; install both binaries together \
             (./install.sh does) or set KMOUNT_AGENT=/path/to/kmount-agent",
            exe.display()
        );
    }
    Ok(p)
}
