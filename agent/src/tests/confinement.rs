//! No operation may read, write or create anything outside the root, whatever symlinks the
//! tree holds, as an intermediate component or as the final name.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;

use kmount_proto::{Done, NodeRef, Op, SetAttr, SetTime, Timespec};

use super::*;

/// Everything observable about a directory tree: names, types, sizes, modes, owners, link
/// counts, times, contents and user xattrs.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
        let m = lstat(dir);
        let rel = dir.strip_prefix(base).unwrap().display().to_string();
        let mut desc = format!(
            "mode {:o} uid {} gid {} nlink {} size {} mtime {}.{}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.nlink(),
            m.size(),
            m.mtime(),
            m.mtime_nsec()
        );
        if m.is_file() {
            desc += &format!(" data {:?}", fs::read(dir).unwrap());
        }
        let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        let mut buf = vec![0u8; 4096];
        // SAFETY: valid path and buffer.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        desc += &format!(" xattrs {:?}", &buf[..n.max(0) as usize]);
        out.insert(rel, desc);
        if m.is_dir() {
            for e in fs::read_dir(dir).unwrap() {
                walk(&e.unwrap().path(), base, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

struct Escape {
    fx: Fx,
    before: BTreeMap<String, String>,
    /// Paths whose last directory component is a symlink leading out of the root.
    via: Vec<String>,
}

fn setup(kernel: Kernel) -> Escape {
    let fx = Fx::with(kernel);
    let outside = fx.outside();
    fs::write(outside.join("secret"), b"secret").unwrap();
    fs::create_dir(outside.join("sub")).unwrap();
    fs::set_permissions(
        outside.join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let tmp_name = fx
        .tmp
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let outside_abs = outside.to_str().unwrap().to_owned();
    symlink("..", fx.at("up")).unwrap();
    symlink("/", fx.at("abs")).unwrap();
    symlink("../..", fx.at("dotdot")).unwrap();
    symlink(&outside, fx.at("escape")).unwrap();
    symlink(outside.join("secret"), fx.at("tofile")).unwrap();
    symlink("../outside", fx.at("todir")).unwrap();
    fs::create_dir(fx.at("d")).unwrap();
    symlink("../..", fx.at("d/back")).unwrap();
    fs::write(fx.at("inside"), b"inside").unwrap();
    let via = vec![
        "up/outside".to_string(),
        format!("abs{outside_abs}"),
        format!("dotdot/{tmp_name}/outside"),
        "escape".to_string(),
        "todir".to_string(),
        format!("d/back/{tmp_name}/outside"),
    ];
    let before = snapshot(&outside);
    Escape { fx, before, via }
}

const REFUSED: [i32; 3] = [libc::ELOOP, libc::ENOTDIR, libc::EXDEV];

#[track_caller]
fn refused(fx: &Fx, op: Op) {
    let shown = format!("{op:?}");
    match fx.run(op) {
        Ok(d) => panic!("{shown} reached outside the root: {d:?}"),
        Err(e) => assert!(REFUSED.contains(&e.errno), "{shown}: unexpected {e}"),
    }
}

fn every_op_through(dir: &str) -> Vec<Op> {
    let at = |name: &str| p(&format!("{dir}/{name}"));
    let set = |s: SetAttr| Op::SetAttr {
        node: NodeRef::Path(at("secret")),
        set: s,
    };
    vec![
        Op::Lookup { path: at("secret") },
        Op::GetAttr {
            node: NodeRef::Path(at("secret")),
        },
        Op::Open {
            path: at("secret"),
            flags: libc::O_RDONLY,
        },
        Op::Open {
            path: at("secret"),
            flags: libc::O_WRONLY | libc::O_TRUNC,
        },
        Op::Create {
            path: at("new"),
            flags: libc::O_WRONLY,
            mode: 0o644,
        },
        Op::Create {
            path: at("secret"),
            flags: libc::O_WRONLY | libc::O_TRUNC,
            mode: 0o644,
        },
        Op::OpenDir { path: p(dir) },
        Op::OpenDir { path: at("sub") },
        Op::Mkdir {
            path: at("newdir"),
            mode: 0o755,
        },
        Op::Mknod {
            path: at("fifo"),
            mode: libc::S_IFIFO | 0o644,
            rdev: 0,
        },
        Op::Symlink {
            path: at("planted"),
            target: b"/etc/passwd".to_vec(),
        },
        Op::Readlink { path: at("secret") },
        Op::Link {
            from: at("secret"),
            to: p("stolen"),
        },
        Op::Link {
            from: p("inside"),
            to: at("planted"),
        },
        Op::Unlink { path: at("secret") },
        Op::Rmdir { path: at("sub") },
        Op::Rename {
            from: at("secret"),
            to: p("stolen"),
            flags: 0,
        },
        Op::Rename {
            from: p("inside"),
            to: at("secret"),
            flags: 0,
        },
        Op::Rename {
            from: p("inside"),
            to: at("secret"),
            flags: libc::RENAME_EXCHANGE,
        },
        set(SetAttr {
            mode: Some(0o777),
            ..Default::default()
        }),
        set(SetAttr {
            uid: Some(65534),
            gid: Some(65534),
            ..Default::default()
        }),
        set(SetAttr {
            size: Some(0),
            ..Default::default()
        }),
        set(SetAttr {
            mtime: Some(SetTime::At(Timespec { sec: 1, nsec: 0 })),
            ..Default::default()
        }),
        Op::GetXattr {
            node: NodeRef::Path(at("secret")),
            name: b"user.x".to_vec(),
        },
        Op::ListXattr {
            node: NodeRef::Path(at("secret")),
        },
        Op::SetXattr {
            node: NodeRef::Path(at("secret")),
            name: b"user.x".to_vec(),
            value: b"v".to_vec(),
            flags: 0,
        },
        Op::RemoveXattr {
            node: NodeRef::Path(at("secret")),
            name: b"user.x".to_vec(),
        },
        Op::Access {
            path: at("secret"),
            mask: libc::R_OK,
        },
        Op::WalkOpen { path: p(dir) },
        Op::WalkOpen { path: at("sub") },
        Op::Digest {
            path: p(dir),
            depth: 3,
        },
        Op::Digest {
            path: at("sub"),
            depth: 0,
        },
        Op::ReadPath {
            path: at("secret"),
            offset: 0,
            len: 100,
        },
        Op::FsyncPath {
            path: at("secret"),
            datasync: false,
        },
        Op::WritePath {
            path: at("secret"),
            offset: 0,
            data: b"overwritten".to_vec(),
        },
        Op::FallocatePath {
            path: at("secret"),
            mode: 0,
            offset: 0,
            len: 1 << 20,
        },
        Op::PutFile {
            path: at("secret"),
            data: b"replaced".to_vec(),
            compressed: false,
            mode: 0o666,
            mtime: None,
            atomic: true,
            keep_mode: false,
        },
        Op::PutFile {
            path: at("secret"),
            data: b"replaced".to_vec(),
            compressed: false,
            mode: 0o666,
            mtime: None,
            atomic: false,
            keep_mode: false,
        },
        Op::PutFile {
            path: at("new"),
            data: b"planted".to_vec(),
            compressed: false,
            mode: 0o666,
            mtime: None,
            atomic: true,
            keep_mode: false,
        },
        // Each in a session of its own: a failed seq blocks its session.
        journaled(Op::Mkdir {
            path: at("newdir"),
            mode: 0o755,
        }),
        journaled(Op::Unlink { path: at("secret") }),
        journaled(Op::WritePath {
            path: at("secret"),
            offset: 0,
            data: b"x".to_vec(),
        }),
    ]
}

fn journaled(op: Op) -> Op {
    static SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Op::Journaled {
        session: SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed) | 0xc0f1_0000_0000,
        seq: 1,
        op: Box::new(op),
    }
}

#[test]
fn symlinks_as_intermediate_components_are_never_followed() {
    for (label, kernel) in kernels() {
        let e = setup(kernel());
        for dir in &e.via {
            for op in every_op_through(dir) {
                refused(&e.fx, op);
            }
        }
        assert_eq!(
            snapshot(&e.fx.outside()),
            e.before,
            "{label}: outside changed"
        );
        assert!(!e.fx.at("stolen").exists(), "{label}");
    }
}

#[test]
fn symlinks_as_the_final_name_are_never_followed() {
    for (label, kernel) in kernels() {
        let e = setup(kernel());
        let fx = &e.fx;
        for name in ["tofile", "todir", "abs", "up", "dotdot", "escape"] {
            refused(
                fx,
                Op::Open {
                    path: p(name),
                    flags: libc::O_RDONLY,
                },
            );
            refused(
                fx,
                Op::Open {
                    path: p(name),
                    flags: libc::O_WRONLY | libc::O_TRUNC,
                },
            );
            refused(
                fx,
                Op::Create {
                    path: p(name),
                    flags: libc::O_WRONLY | libc::O_TRUNC,
                    mode: 0o666,
                },
            );
            refused(fx, Op::OpenDir { path: p(name) });
            refused(fx, Op::WalkOpen { path: p(name) });
            refused(
                fx,
                Op::Digest {
                    path: p(name),
                    depth: 1,
                },
            );
            for atomic in [false, true] {
                refused(
                    fx,
                    Op::PutFile {
                        path: p(name),
                        data: b"through".to_vec(),
                        compressed: false,
                        mode: 0o666,
                        mtime: None,
                        atomic,
                        keep_mode: false,
                    },
                );
            }
            refused(
                fx,
                Op::ReadPath {
                    path: p(name),
                    offset: 0,
                    len: 10,
                },
            );
            refused(
                fx,
                Op::WritePath {
                    path: p(name),
                    offset: 0,
                    data: b"through".to_vec(),
                },
            );
        }
        let set = |s: SetAttr| Op::SetAttr {
            node: node("tofile"),
            set: s,
        };
        // truncate(2) and chmod(2) of the link itself: refused, target untouched.
        assert_eq!(
            fx.errno(set(SetAttr {
                size: Some(0),
                ..Default::default()
            })),
            libc::EINVAL,
            "{label}"
        );
        assert_eq!(
            fx.errno(set(SetAttr {
                mode: Some(0o777),
                ..Default::default()
            })),
            libc::EOPNOTSUPP,
            "{label}"
        );
        // chown and utimes apply to the link itself.
        if is_root() {
            let a = fx.attr(set(SetAttr {
                uid: Some(65534),
                ..Default::default()
            }));
            assert_eq!(a.uid, 65534);
            assert_eq!(a.file_type(), libc::S_IFLNK);
        }
        let a = fx.attr(set(SetAttr {
            mtime: Some(SetTime::At(Timespec { sec: 5, nsec: 0 })),
            ..Default::default()
        }));
        assert_eq!(a.file_type(), libc::S_IFLNK);
        // User xattrs cannot be set on a symlink; the target does not get one either.
        assert_eq!(
            fx.errno(Op::SetXattr {
                node: node("tofile"),
                name: b"user.x".to_vec(),
                value: b"v".to_vec(),
                flags: 0,
            }),
            libc::EPERM,
            "{label}"
        );
        assert_eq!(
            fx.errno(Op::GetXattr {
                node: node("tofile"),
                name: b"user.x".to_vec(),
            }),
            libc::ENODATA
        );
        // A hard link of the symlink links the symlink, not what it points to.
        let l = fx.attr(Op::Link {
            from: p("tofile"),
            to: p("hard"),
        });
        assert_eq!(l.file_type(), libc::S_IFLNK, "{label}");
        assert_eq!(lstat(&fx.outside().join("secret")).nlink(), 1);
        // Readlink and lookup report the link, harmlessly.
        assert_eq!(
            fx.data(Op::Readlink { path: p("tofile") }),
            fx.outside().join("secret").to_str().unwrap().as_bytes()
        );
        assert_eq!(
            fx.attr(Op::Lookup { path: p("tofile") }).file_type(),
            libc::S_IFLNK
        );
        // Renaming and removing the link move and remove only the link.
        fx.ok(Op::Rename {
            from: p("tofile"),
            to: p("d/moved"),
            flags: 0,
        });
        fx.ok(Op::Unlink { path: p("d/moved") });
        fx.ok(Op::Unlink { path: p("hard") });
        assert_eq!(fx.ok(Op::Unlink { path: p("d/back") }), Done::Ok);
        assert_eq!(
            snapshot(&fx.outside()),
            e.before,
            "{label}: outside changed"
        );
    }
}

#[test]
fn a_directory_swapped_for_a_symlink_is_refused() {
    for (label, kernel) in kernels() {
        let e = setup(kernel());
        let fx = &e.fx;
        fs::create_dir(fx.at("work")).unwrap();
        fs::write(fx.at("work/f"), b"in").unwrap();
        assert_eq!(fx.data(Op::Readlink { path: p("up") }), b"..");
        fx.attr(Op::Lookup { path: p("work/f") });
        // Swap the directory for a symlink leading out (as a hostile process inside could).
        fs::rename(fx.at("work"), fx.at("work.old")).unwrap();
        symlink(fx.outside(), fx.at("work")).unwrap();
        refused(
            fx,
            Op::Lookup {
                path: p("work/secret"),
            },
        );
        refused(
            fx,
            Op::Create {
                path: p("work/f"),
                flags: libc::O_WRONLY,
                mode: 0o644,
            },
        );
        assert_eq!(snapshot(&fx.outside()), e.before, "{label}");
    }
}
