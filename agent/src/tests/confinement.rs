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

/// Swaps the names `a` and `b` (beneath the root) again and again, atomically, until dropped:
/// what a hostile process inside the container could do while the agent works.
struct Flipper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Flipper {
    fn start(a: &Path, b: &Path) -> Flipper {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, b) = (cstr(a), cstr(b));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                // SAFETY: both paths are NUL-terminated.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
                if r == 0 {
                    flips += 1;
                }
            }
            flips
        });
        Flipper {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and says how many swaps were made.
    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.to_str().unwrap()).unwrap()
}

/// How long each race runs per kernel choice.
const RACE: std::time::Duration = std::time::Duration::from_millis(1500);

/// Every operation (its result apart) is run while `race` flips between a real directory and a
/// symlink leading out of the root; nothing outside may change, and nothing the agent
/// creates or links may be an outside node.
#[test]
fn a_directory_flipping_with_a_symlink_during_operations_never_lets_one_out() {
    for (label, kernel) in kernels() {
        let e = setup(kernel());
        let fx = &e.fx;
        let secret = lstat(&fx.outside().join("secret"));
        fs::create_dir(fx.at("race")).unwrap();
        fs::write(fx.at("race/secret"), b"inside").unwrap();
        fs::create_dir(fx.at("race/sub")).unwrap();
        symlink(fx.outside(), fx.at("alt")).unwrap();
        let flipper = Flipper::start(&fx.at("race"), &fx.at("alt"));
        let started = std::time::Instant::now();
        let (mut rounds, mut succeeded) = (0u64, 0u64);
        while started.elapsed() < RACE {
            for op in every_op_through("race") {
                let shown = format!("{op:?}");
                match fx.run(op) {
                    Ok(Done::Data(d)) => assert_ne!(d, b"secret", "{label}: {shown} read outside"),
                    Ok(Done::Content { data, .. }) => {
                        assert_ne!(data, b"secret", "{label}: {shown} read outside")
                    }
                    Ok(Done::Opened { handle, .. }) => {
                        if let Ok(Done::Data(d)) = fx.run(Op::Read {
                            handle,
                            offset: 0,
                            len: 100,
                        }) {
                            assert_ne!(d, b"secret", "{label}: {shown} opened outside");
                        }
                        fx.ok(Op::Close { handle });
                        succeeded += 1;
                    }
                    Ok(Done::Handle(handle)) => {
                        let _ = fx.run(Op::Close { handle });
                        succeeded += 1;
                    }
                    Ok(_) => succeeded += 1,
                    Err(_) => {}
                }
            }
            // Put back what the round removed, through the agent: writing through the local
            // path would race with the flipper itself (and write outside).
            for dir in ["race", "alt"] {
                let _ = fx.run(Op::PutFile {
                    path: p(&format!("{dir}/secret")),
                    data: b"inside".to_vec(),
                    compressed: false,
                    mode: 0o644,
                    mtime: None,
                    atomic: false,
                    keep_mode: false,
                });
                let _ = fx.run(Op::Mkdir {
                    path: p(&format!("{dir}/sub")),
                    mode: 0o755,
                });
            }
            rounds += 1;
        }
        let flips = flipper.stop();
        assert!(flips > 100, "{label}: the race hardly ran ({flips} flips)");
        assert!(succeeded > 0, "{label}: no operation ever got through");
        assert_eq!(
            snapshot(&fx.outside()),
            e.before,
            "{label}: outside changed ({rounds} rounds, {flips} flips)"
        );
        // Nothing in the root became a name of an outside node.
        for entry in walk_all(&fx.root()) {
            let m = lstat(&entry);
            assert!(
                (m.dev(), m.ino()) != (secret.dev(), secret.ino()),
                "{label}: {} is the outside file",
                entry.display()
            );
        }
    }
}

/// The final name flips between a regular file inside and a symlink to a file outside while
/// every operation that works on a file's contents or attributes runs on it.
#[test]
fn a_file_flipping_with_a_symlink_during_operations_never_lets_one_out() {
    for (label, kernel) in kernels() {
        let e = setup(kernel());
        let fx = &e.fx;
        let secret = lstat(&fx.outside().join("secret"));
        fs::write(fx.at("victim"), b"inside").unwrap();
        symlink(fx.outside().join("secret"), fx.at("alt")).unwrap();
        let set = |s: SetAttr| Op::SetAttr {
            node: node("victim"),
            set: s,
        };
        let ops = || {
            let mut ops = vec![
                set(SetAttr {
                    mode: Some(0o777),
                    ..Default::default()
                }),
                set(SetAttr {
                    size: Some(0),
                    ..Default::default()
                }),
                set(SetAttr {
                    mtime: Some(SetTime::At(Timespec { sec: 1, nsec: 0 })),
                    atime: Some(SetTime::Now),
                    ..Default::default()
                }),
                Op::SetXattr {
                    node: node("victim"),
                    name: b"user.x".to_vec(),
                    value: b"v".to_vec(),
                    flags: 0,
                },
                Op::RemoveXattr {
                    node: node("victim"),
                    name: b"user.x".to_vec(),
                },
                Op::GetXattr {
                    node: node("victim"),
                    name: b"user.x".to_vec(),
                },
                Op::Open {
                    path: p("victim"),
                    flags: libc::O_RDWR | libc::O_TRUNC,
                },
                Op::Open {
                    path: p("victim"),
                    flags: libc::O_RDONLY,
                },
                Op::Create {
                    path: p("victim"),
                    flags: libc::O_WRONLY | libc::O_TRUNC,
                    mode: 0o666,
                },
                Op::ReadPath {
                    path: p("victim"),
                    offset: 0,
                    len: 100,
                },
                Op::WritePath {
                    path: p("victim"),
                    offset: 0,
                    data: b"overwritten".to_vec(),
                },
                Op::PutFile {
                    path: p("victim"),
                    data: b"put".to_vec(),
                    compressed: false,
                    mode: 0o666,
                    mtime: None,
                    atomic: false,
                    keep_mode: true,
                },
                Op::FallocatePath {
                    path: p("victim"),
                    mode: 0,
                    offset: 0,
                    len: 1 << 16,
                },
                Op::FsyncPath {
                    path: p("victim"),
                    datasync: true,
                },
                Op::Access {
                    path: p("victim"),
                    mask: libc::W_OK,
                },
            ];
            if is_root() {
                ops.push(set(SetAttr {
                    uid: Some(65534),
                    gid: Some(65534),
                    ..Default::default()
                }));
            }
            ops
        };
        let flipper = Flipper::start(&fx.at("victim"), &fx.at("alt"));
        let started = std::time::Instant::now();
        let (mut links, mut succeeded) = (0u64, 0u64);
        while started.elapsed() < RACE {
            for op in ops() {
                let shown = format!("{op:?}");
                match fx.run(op) {
                    Ok(Done::Data(d)) => assert_ne!(d, b"secret", "{label}: {shown} read outside"),
                    Ok(Done::Content { data, .. }) => {
                        assert_ne!(data, b"secret", "{label}: {shown} read outside")
                    }
                    Ok(Done::Opened { handle, .. }) => {
                        if let Ok(Done::Data(d)) = fx.run(Op::Read {
                            handle,
                            offset: 0,
                            len: 100,
                        }) {
                            assert_ne!(d, b"secret", "{label}: {shown} opened outside");
                        }
                        fx.ok(Op::Close { handle });
                        succeeded += 1;
                    }
                    Ok(_) => succeeded += 1,
                    Err(_) => {}
                }
            }
            // A hard link of whatever the name is now: the file inside or the symlink itself.
            let to = format!("link{links}");
            if let Ok(Done::Attr(a)) = fx.run(Op::Link {
                from: p("victim"),
                to: p(&to),
            }) {
                assert!((a.dev, a.ino) != (secret.dev(), secret.ino()), "{label}");
                links += 1;
            }
        }
        let flips = flipper.stop();
        assert!(flips > 100, "{label}: the race hardly ran ({flips} flips)");
        assert!(succeeded > 0, "{label}: no operation ever got through");
        assert_eq!(
            snapshot(&fx.outside()),
            e.before,
            "{label}: outside changed ({flips} flips)"
        );
        assert_eq!(lstat(&fx.outside().join("secret")).nlink(), 1, "{label}");
    }
}

/// Every path beneath `dir` (not following symlinks).
fn walk_all(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if lstat(&path).is_dir() {
            out.extend(walk_all(&path));
        }
        out.push(path);
    }
    out
}

/// A file hard-linked into the root from outside is inside the root: it is served like any
/// other. But `Link` only ever names nodes reached beneath the root: no path it is given
/// leads to the outside file, whatever symlinks lie on the way.
#[test]
fn hard_links_from_outside_are_served_and_link_never_reaches_out() {
    for (label, kernel) in kernels() {
        let e = setup(kernel());
        let fx = &e.fx;
        let shared = fx.tmp.path().join("shared");
        fs::write(&shared, b"shared").unwrap();
        fs::hard_link(&shared, fx.at("hardlinked")).unwrap();
        let h = fx.handle(Op::Open {
            path: p("hardlinked"),
            flags: libc::O_RDONLY,
        });
        assert_eq!(
            fx.data(Op::Read {
                handle: h,
                offset: 0,
                len: 100
            }),
            b"shared",
            "{label}"
        );
        fx.ok(Op::Close { handle: h });
        // Another name for it inside the root is fine: it is a node of the root.
        let a = fx.attr(Op::Link {
            from: p("hardlinked"),
            to: p("d/again"),
        });
        assert_eq!(a.ino, lstat(&shared).ino(), "{label}");
        assert_eq!(lstat(&shared).nlink(), 3, "{label}");
        // Links whose source is reached through a symlink, or whose source is a symlink: refused
        // or a link of the symlink itself; never of the outside file or directory.
        let secret = lstat(&fx.outside().join("secret"));
        for (i, from) in e
            .via
            .iter()
            .map(|d| format!("{d}/secret"))
            .chain(["tofile", "todir", "abs", "up", "dotdot", "escape"].map(String::from))
            .enumerate()
        {
            let to = format!("l{i}");
            match fx.run(Op::Link {
                from: p(&from),
                to: p(&to),
            }) {
                Ok(Done::Attr(a)) => {
                    assert_eq!(a.file_type(), libc::S_IFLNK, "{label}: link of {from}");
                    assert!((a.dev, a.ino) != (secret.dev(), secret.ino()), "{label}");
                    assert!(lstat(&fx.at(&to)).file_type().is_symlink());
                }
                Ok(other) => panic!("{label}: link of {from}: {other:?}"),
                Err(err) => assert!(REFUSED.contains(&err.errno), "{label}: {from}: {err}"),
            }
        }
        assert_eq!(
            snapshot(&fx.outside()),
            e.before,
            "{label}: outside changed"
        );
    }
}

/// Names that are not paths cannot even be expressed as a `RelPath` (`proto` refuses them on
/// the wire, see `agent/tests/pipe.rs`). The free-form names that remain, xattr names and
/// symlink targets, are refused with an errno when they hold a NUL or are absurdly long, and
/// the error message stays short.
#[test]
fn absurd_xattr_names_and_symlink_targets_are_refused_briefly() {
    let fx = Fx::new();
    fs::write(fx.at("f"), b"x").unwrap();
    let huge = vec![b'n'; 1 << 20];
    let mut with_nul = b"user.a".to_vec();
    with_nul.extend(b"\0b");
    let mut user_huge = b"user.".to_vec();
    user_huge.extend(&huge);
    for name in [&with_nul, &user_huge, &Vec::new()] {
        for op in [
            Op::GetXattr {
                node: node("f"),
                name: name.clone(),
            },
            Op::SetXattr {
                node: node("f"),
                name: name.clone(),
                value: b"v".to_vec(),
                flags: 0,
            },
            Op::RemoveXattr {
                node: node("f"),
                name: name.clone(),
            },
        ] {
            let shown = format!("{:.80}", format!("{op:?}"));
            let err = fx.run(op).expect_err(&shown);
            assert!(
                [libc::EINVAL, libc::ERANGE, libc::E2BIG, libc::ENAMETOOLONG].contains(&err.errno),
                "{shown}: {err}"
            );
            assert!(
                err.message.len() < 1024,
                "{shown}: {} bytes",
                err.message.len()
            );
        }
    }
    for target in [with_nul, huge, Vec::new()] {
        let err = fx
            .run(Op::Symlink {
                path: p("l"),
                target,
            })
            .unwrap_err();
        assert!(
            [libc::EINVAL, libc::ENAMETOOLONG, libc::ENOENT].contains(&err.errno),
            "{err}"
        );
        assert!(err.message.len() < 1024, "{} bytes", err.message.len());
    }
    assert!(!fx.at("l").exists());
    assert_eq!(fs::read(fx.at("f")).unwrap(), b"x");
}
