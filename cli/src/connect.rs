//! From a target to a byte stream to its agent: one [`Connector`] per kind of target, and the
//! mount options that go with it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use kmount_mount::{Client, Connector, LocalConnector, OwnerMap};

use crate::target::Target;

/// How a target is reached and how its files are presented.
pub struct Plan {
    /// Shared, so that a [`Client::connect_shared`] client can reconnect through it.
    pub connector: Arc<dyn Connector>,
    /// Requests carry the caller's identity and the agent acts as that user (local targets
    /// served by root, so that a shared mount behaves like a local disk).
    pub identity: bool,
    /// Other users may use the mount, with the kernel checking file modes.
    pub shared: bool,
    /// Files of the user the agent runs as appear owned by the local user (as sshfs's
    /// `idmap=user`): for containers and ssh hosts, where that user is someone else's.
    pub map_owner: bool,
}

impl Plan {
    /// The owner map for a session with `client`: the agent's user (as it reported) shown as
    /// the user running kmount. `None` for local targets, where owners are real, and for agents
    /// that do not say who they run as.
    pub fn owner_map(&self, client: &Client) -> Option<OwnerMap> {
        owner_map(self.map_owner, client.agent_user())
    }
}

fn owner_map(map_owner: bool, agent_user: Option<(u32, u32)>) -> Option<OwnerMap> {
    if !map_owner {
        return None;
    }
    let (uid, gid) = agent_user?;
    Some(OwnerMap::to_current_user(uid, gid))
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
                connector: Arc::new(LocalConnector::new(agent_binary()?, root.clone(), args)),
                identity: is_root,
                shared: is_root,
                map_owner: false,
            })
        }
        // The agent runs as the container's user: files it creates belong to the app, and
        // appear as the local user's.
        Target::Kube(k) => {
            let agent = crate::install::LocalAgent::load(&agent_binary()?)?;
            Ok(Plan {
                connector: Arc::new(crate::kube::KubeConnector::new(k.clone(), agent)),
                identity: false,
                shared: false,
                map_owner: true,
            })
        }
        // The remote user owns what the mount creates, and appears as the local user; the
        // mount is this user's alone.
        Target::Ssh(ssh) => Ok(Plan {
            connector: Arc::new(crate::ssh::SshConnector::new(ssh)?),
            identity: false,
            shared: false,
            map_owner: true,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_targets_map_the_agent_user_to_the_local_user() {
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        assert_eq!(
            owner_map(true, Some((1000, 1001))),
            Some(OwnerMap {
                remote_uid: 1000,
                remote_gid: 1001,
                local_uid: me.0,
                local_gid: me.1,
            })
        );
        // Local targets keep the real owners; an agent that does not say maps nothing.
        assert_eq!(owner_map(false, Some((1000, 1001))), None);
        assert_eq!(owner_map(true, None), None);
    }
}
