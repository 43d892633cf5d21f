//! Requests run as their caller when identity switching is active.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use kmount_proto::{Caller, Done, Op, SetAttr};

use super::*;
use crate::identity::Identity;
use crate::sys;

const NOBODY: u32 = 65534;

fn nobody(groups: Vec<u32>) -> Caller {
    Caller {
        uid: NOBODY,
        gid: NOBODY,
        groups,
    }
}

/// Runs `op` as `caller` on this thread, the way a worker does.
fn as_caller(fx: &Fx, id: &Identity, caller: &Caller, op: Op) -> Result<Done, i32> {
    let _guard = id.assume(Some(caller)).expect("switching identity");
    assert_eq!(sys::current_fsuid(), caller.uid);
    fx.run(op).map_err(|e| e.errno)
}

fn root_or_skip(test: &str) -> Option<Identity> {
    if !is_root() {
        eprintln!("skipped {test}: identity switching needs the agent to run as root");
        return None;
    }
    let id = Identity::new(true);
    assert!(id.active());
    Some(id)
}

#[test]
fn identity_is_only_offered_to_root_when_asked() {
    assert!(!Identity::new(false).active());
    assert_eq!(Identity::new(true).active(), is_root());
    // Inactive: a caller is ignored and the thread keeps its identity.
    let id = Identity::new(false);
    let before = sys::current_fsuid();
    let g = id.assume(Some(&nobody(vec![]))).unwrap();
    assert!(g.is_none());
    assert_eq!(sys::current_fsuid(), before);
}

#[test]
fn created_nodes_belong_to_the_caller() {
    let Some(id) = root_or_skip("created_nodes_belong_to_the_caller") else {
        return;
    };
    let fx = Fx::new();
    fs::set_permissions(fx.root(), fs::Permissions::from_mode(0o777)).unwrap();
    let c = nobody(vec![]);
    let Ok(Done::Opened { attr, .. }) = as_caller(
        &fx,
        &id,
        &c,
        Op::Create {
            path: p("mine"),
            flags: libc::O_WRONLY | libc::O_EXCL,
            mode: 0o640,
        },
    ) else {
        panic!("create as nobody failed");
    };
    assert_eq!((attr.uid, attr.gid), (NOBODY, NOBODY));
    let m = lstat(&fx.at("mine"));
    assert_eq!((m.uid(), m.gid()), (NOBODY, NOBODY));
    let Ok(Done::Attr(d)) = as_caller(
        &fx,
        &id,
        &c,
        Op::Mkdir {
            path: p("dir"),
            mode: 0o755,
        },
    ) else {
        panic!("mkdir as nobody failed");
    };
    assert_eq!((d.uid, d.gid), (NOBODY, NOBODY));
    // Back to the agent's own identity afterwards.
    assert_eq!(sys::current_fsuid(), 0);
    assert_eq!(sys::current_fsgid(), 0);
    let a = fx.attr(Op::Mkdir {
        path: p("rootdir"),
        mode: 0o755,
    });
    assert_eq!(a.uid, 0);
}

#[test]
fn permission_and_ownership_rules_are_the_callers() {
    let Some(id) = root_or_skip("permission_and_ownership_rules_are_the_callers") else {
        return;
    };
    let fx = Fx::new();
    fs::set_permissions(fx.root(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(fx.at("roots"), b"r").unwrap();
    fs::set_permissions(fx.at("roots"), fs::Permissions::from_mode(0o644)).unwrap();
    let c = nobody(vec![]);
    let chown = Op::SetAttr {
        node: node("roots"),
        set: SetAttr {
            uid: Some(NOBODY),
            ..Default::default()
        },
    };
    // chown by a non-owner: EPERM (CAP_CHOWN is gone with fsuid != 0).
    assert_eq!(as_caller(&fx, &id, &c, chown.clone()), Err(libc::EPERM));
    assert_eq!(lstat(&fx.at("roots")).uid(), 0);
    // Writing a root-owned 0644 file, creating in a root-owned 0755 dir: EACCES.
    assert_eq!(
        as_caller(
            &fx,
            &id,
            &c,
            Op::Open {
                path: p("roots"),
                flags: libc::O_WRONLY
            }
        ),
        Err(libc::EACCES)
    );
    assert_eq!(
        as_caller(
            &fx,
            &id,
            &c,
            Op::Create {
                path: p("new"),
                flags: libc::O_WRONLY,
                mode: 0o644
            }
        ),
        Err(libc::EACCES)
    );
    assert_eq!(
        as_caller(
            &fx,
            &id,
            &c,
            Op::Access {
                path: p("roots"),
                mask: libc::W_OK
            }
        ),
        Err(libc::EACCES)
    );
    assert_eq!(
        as_caller(
            &fx,
            &id,
            &c,
            Op::Access {
                path: p("roots"),
                mask: libc::R_OK
            }
        ),
        Ok(Done::Ok)
    );
    // chmod by a non-owner: EPERM, also to the mode the file has (never skipped as a no-op).
    for mode in [0o777, 0o644] {
        assert_eq!(
            as_caller(
                &fx,
                &id,
                &c,
                Op::SetAttr {
                    node: node("roots"),
                    set: SetAttr {
                        mode: Some(mode),
                        ..Default::default()
                    }
                }
            ),
            Err(libc::EPERM),
            "chmod {mode:o}"
        );
    }
    // Root itself may do all of it.
    fx.ok(Op::Access {
        path: p("roots"),
        mask: libc::W_OK,
    });
    fx.ok(chown);
    assert_eq!(lstat(&fx.at("roots")).uid(), NOBODY);
}

#[test]
fn supplementary_groups_count() {
    let Some(id) = root_or_skip("supplementary_groups_count") else {
        return;
    };
    for (label, kernel) in kernels() {
        let fx = Fx::with(kernel());
        fs::write(fx.at("g"), b"group data").unwrap();
        fs::set_permissions(fx.at("g"), fs::Permissions::from_mode(0o040)).unwrap();
        let cpath = std::ffi::CString::new(fx.at("g").to_str().unwrap()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::chown(cpath.as_ptr(), 0, 4321) }, 0);
        let open = Op::Open {
            path: p("g"),
            flags: libc::O_RDONLY,
        };
        let access = Op::Access {
            path: p("g"),
            mask: libc::R_OK,
        };
        let without = nobody(vec![]);
        let with = nobody(vec![100, 4321]);
        assert_eq!(
            as_caller(&fx, &id, &without, open.clone()).map(drop),
            Err(libc::EACCES),
            "{label}"
        );
        assert_eq!(
            as_caller(&fx, &id, &without, access.clone()),
            Err(libc::EACCES),
            "{label}"
        );
        assert!(as_caller(&fx, &id, &with, open).is_ok(), "{label}");
        assert_eq!(as_caller(&fx, &id, &with, access), Ok(Done::Ok), "{label}");
        assert_eq!(
            sys::current_groups().unwrap(),
            Identity::new(true).base_groups()
        );
    }
}

#[test]
fn the_switch_is_per_thread() {
    let Some(id) = root_or_skip("the_switch_is_per_thread") else {
        return;
    };
    let c = nobody(vec![7]);
    // A thread that exists before the switch keeps the agent's identity throughout.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let watcher = std::thread::spawn(move || {
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        (sys::current_fsuid(), sys::current_fsgid())
    });
    ready_rx.recv().unwrap();
    let guard = id.assume(Some(&c)).unwrap();
    assert_eq!(sys::current_fsuid(), NOBODY);
    assert_eq!(sys::current_groups().unwrap(), vec![7]);
    go_tx.send(()).unwrap();
    assert_eq!(watcher.join().unwrap(), (0, 0));
    drop(guard);
    assert_eq!((sys::current_fsuid(), sys::current_fsgid()), (0, 0));
}

#[test]
fn a_failed_switch_leaves_the_thread_as_it_was() {
    let Some(id) = root_or_skip("a_failed_switch_leaves_the_thread_as_it_was") else {
        return;
    };
    // More groups than the kernel allows (NGROUPS_MAX is 65536).
    let c = nobody((0..70_000).collect());
    assert_eq!(
        id.assume(Some(&c)).map(|g| g.is_some()),
        Err(sys::Errno(libc::EINVAL))
    );
    assert_eq!((sys::current_fsuid(), sys::current_fsgid()), (0, 0));
}
