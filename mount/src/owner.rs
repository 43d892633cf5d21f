//! [`OwnerMap`]: the files of the user the agent runs as, shown as the local user's.
//!
//! In a container the agent runs as the app's user (say 1000), and whatever it creates belongs
//! to that user there. On the local side those files should look like the local user's own, so
//! that an editor offers to write them (and, with `default_permissions`, the kernel's mode
//! checks let the local user write), while the container still applies its own permissions to
//! every operation and its errno reaches the editor. This is what sshfs calls `idmap=user`.
//!
//! The map is one way, as sshfs's: only the remote user's uid (and group's gid) become the local
//! ones; every other owner is shown as it is. Going back (chown, `setattr`), the local uid and
//! gid become the remote ones, so `chown $USER file` or `cp -a` keeps the file the remote
//! user's. Applied at the FUSE boundary only: the core, the tree and the journal keep the
//! remote's own values.

/// Shows files owned by `remote_uid`/`remote_gid` as owned by `local_uid`/`local_gid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerMap {
    pub remote_uid: u32,
    pub remote_gid: u32,
    pub local_uid: u32,
    pub local_gid: u32,
}

impl OwnerMap {
    /// Maps the remote user `(uid, gid)` to the user running this process.
    pub fn to_current_user(remote_uid: u32, remote_gid: u32) -> OwnerMap {
        OwnerMap {
            remote_uid,
            remote_gid,
            local_uid: nix::unistd::getuid().as_raw(),
            local_gid: nix::unistd::getgid().as_raw(),
        }
    }

    /// Whether the map changes anything.
    pub fn is_identity(&self) -> bool {
        self.remote_uid == self.local_uid && self.remote_gid == self.local_gid
    }

    /// A remote owner as shown locally.
    pub fn to_local(&self, uid: u32, gid: u32) -> (u32, u32) {
        (
            if uid == self.remote_uid {
                self.local_uid
            } else {
                uid
            },
            if gid == self.remote_gid {
                self.local_gid
            } else {
                gid
            },
        )
    }

    /// An owner asked for locally (chown), as sent to the remote.
    pub fn to_remote(&self, uid: Option<u32>, gid: Option<u32>) -> (Option<u32>, Option<u32>) {
        (
            uid.map(|u| {
                if u == self.local_uid {
                    self.remote_uid
                } else {
                    u
                }
            }),
            gid.map(|g| {
                if g == self.local_gid {
                    self.remote_gid
                } else {
                    g
                }
            }),
        )
    }
}

/// `map` applied to a remote owner, when there is one.
pub(crate) fn shown(map: Option<&OwnerMap>, uid: u32, gid: u32) -> (u32, u32) {
    map.map_or((uid, gid), |m| m.to_local(uid, gid))
}

/// `map` applied backwards to a requested owner, when there is one.
pub(crate) fn requested(
    map: Option<&OwnerMap>,
    uid: Option<u32>,
    gid: Option<u32>,
) -> (Option<u32>, Option<u32>) {
    map.map_or((uid, gid), |m| m.to_remote(uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI case: the container's app user 1000 seen by root.
    const APP_AS_ROOT: OwnerMap = OwnerMap {
        remote_uid: 1000,
        remote_gid: 1000,
        local_uid: 0,
        local_gid: 0,
    };

    /// A developer (uid 501, gid 20) mounting a container that runs as root.
    const ROOT_AS_DEV: OwnerMap = OwnerMap {
        remote_uid: 0,
        remote_gid: 0,
        local_uid: 501,
        local_gid: 20,
    };

    #[test]
    fn the_remote_user_appears_as_the_local_user() {
        assert_eq!(APP_AS_ROOT.to_local(1000, 1000), (0, 0));
        assert_eq!(ROOT_AS_DEV.to_local(0, 0), (501, 20));
        // uid and gid are mapped independently.
        assert_eq!(APP_AS_ROOT.to_local(1000, 50), (0, 50));
        assert_eq!(APP_AS_ROOT.to_local(33, 1000), (33, 0));
    }

    #[test]
    fn other_owners_are_shown_as_they_are() {
        assert_eq!(APP_AS_ROOT.to_local(0, 0), (0, 0));
        assert_eq!(APP_AS_ROOT.to_local(33, 33), (33, 33));
        assert_eq!(ROOT_AS_DEV.to_local(1000, 1000), (1000, 1000));
        // One way, as sshfs idmap=user: a remote file of the local uid is not swapped.
        assert_eq!(ROOT_AS_DEV.to_local(501, 20), (501, 20));
    }

    #[test]
    fn a_chown_to_the_local_user_goes_to_the_remote_user() {
        assert_eq!(
            APP_AS_ROOT.to_remote(Some(0), Some(0)),
            (Some(1000), Some(1000))
        );
        assert_eq!(
            ROOT_AS_DEV.to_remote(Some(501), Some(20)),
            (Some(0), Some(0))
        );
        assert_eq!(APP_AS_ROOT.to_remote(None, Some(0)), (None, Some(1000)));
        assert_eq!(APP_AS_ROOT.to_remote(Some(0), None), (Some(1000), None));
        assert_eq!(APP_AS_ROOT.to_remote(None, None), (None, None));
    }

    #[test]
    fn a_chown_to_someone_else_is_sent_as_asked() {
        assert_eq!(
            APP_AS_ROOT.to_remote(Some(33), Some(44)),
            (Some(33), Some(44))
        );
        assert_eq!(
            ROOT_AS_DEV.to_remote(Some(1000), Some(1000)),
            (Some(1000), Some(1000))
        );
    }

    #[test]
    fn round_trip_of_the_mapped_user() {
        for m in [APP_AS_ROOT, ROOT_AS_DEV] {
            let (u, g) = m.to_local(m.remote_uid, m.remote_gid);
            assert_eq!(
                m.to_remote(Some(u), Some(g)),
                (Some(m.remote_uid), Some(m.remote_gid))
            );
        }
    }

    #[test]
    fn no_map_changes_nothing() {
        assert_eq!(shown(None, 1000, 1000), (1000, 1000));
        assert_eq!(requested(None, Some(0), None), (Some(0), None));
        assert_eq!(shown(Some(&APP_AS_ROOT), 1000, 7), (0, 7));
        assert_eq!(
            requested(Some(&APP_AS_ROOT), Some(0), Some(0)),
            (Some(1000), Some(1000))
        );
        assert!(
            OwnerMap {
                remote_uid: 5,
                remote_gid: 6,
                local_uid: 5,
                local_gid: 6
            }
            .is_identity()
        );
        assert!(!APP_AS_ROOT.is_identity());
    }
}
