use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use kmount_proto::{Done, MAX_IO_LEN, NodeRef, Op, SetAttr, SetTime, Timespec};

use super::*;

const O_RDWR: i32 = libc::O_RDWR;

fn create(fx: &Fx, path: &str, mode: u32) -> u64 {
    fx.handle(Op::Create {
        path: p(path),
        flags: O_RDWR | libc::O_EXCL,
        mode,
    })
}

fn write(fx: &Fx, handle: u64, offset: u64, data: &[u8]) {
    match fx.ok(Op::Write {
        handle,
        offset,
        data: data.to_vec(),
    }) {
        Done::Written(n) => assert_eq!(n as usize, data.len()),
        other => panic!("{other:?}"),
    }
}

fn read(fx: &Fx, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    fx.data(Op::Read {
        handle,
        offset,
        len,
    })
}

#[test]
fn lookup_reports_exact_lstat() {
    let fx = Fx::new();
    fs::write(fx.at("f"), b"hello").unwrap();
    let a = fx.attr(Op::Lookup { path: p("f") });
    let m = lstat(&fx.at("f"));
    assert_eq!(a.ino, m.ino());
    assert_eq!(a.dev, m.dev());
    assert_eq!(a.mode, m.mode());
    assert_eq!(a.nlink, m.nlink());
    assert_eq!((a.uid, a.gid), (m.uid(), m.gid()));
    assert_eq!(a.size, 5);
    assert_eq!(a.blocks, m.blocks());
    assert_eq!(a.blksize as u64, m.blksize());
    assert_eq!(
        (a.mtime.sec, a.mtime.nsec as i64),
        (m.mtime(), m.mtime_nsec())
    );
    assert_eq!(
        (a.ctime.sec, a.ctime.nsec as i64),
        (m.ctime(), m.ctime_nsec())
    );
    assert_eq!(
        (a.atime.sec, a.atime.nsec as i64),
        (m.atime(), m.atime_nsec())
    );
    let r = fx.attr(Op::Lookup { path: p("") });
    assert!(r.is_dir());
    assert_eq!(r.ino, lstat(&fx.root()).ino());
    let e = fx.run(Op::Lookup { path: p("nope") }).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert_eq!(e.message, "lstat nope: No such file or directory");
    assert_eq!(fx.errno(Op::Lookup { path: p("f/x") }), libc::ENOTDIR);
    // A symlink is reported as itself.
    std::os::unix::fs::symlink("f", fx.at("l")).unwrap();
    let l = fx.attr(Op::Lookup { path: p("l") });
    assert_eq!(l.file_type(), libc::S_IFLNK);
    assert_eq!(l.size, 1);
}

#[test]
fn getattr_by_path_and_by_handle() {
    let fx = Fx::new();
    let h = create(&fx, "f", 0o640);
    write(&fx, h, 0, b"abc");
    let by_handle = fx.attr(Op::GetAttr {
        node: NodeRef::Handle(h),
    });
    let by_path = fx.attr(Op::GetAttr { node: node("f") });
    assert_eq!(by_handle, by_path);
    assert_eq!(by_path.mode, libc::S_IFREG | 0o640);
    assert_eq!(by_path.size, 3);
    assert_eq!(
        fx.errno(Op::GetAttr {
            node: NodeRef::Handle(999)
        }),
        libc::EBADF
    );
}

#[test]
fn setattr_by_path_in_order_and_exact() {
    for (label, kernel) in kernels() {
        let fx = Fx::with(kernel());
        fs::write(fx.at("f"), b"0123456789").unwrap();
        let set = SetAttr {
            mode: Some(0o4751),
            uid: None,
            gid: None,
            size: Some(4),
            atime: Some(SetTime::At(Timespec {
                sec: 1_000_000_000,
                nsec: 123_456_789,
            })),
            mtime: Some(SetTime::At(Timespec {
                sec: -5,
                nsec: 999_999_999,
            })),
        };
        let a = fx.attr(Op::SetAttr {
            node: node("f"),
            set,
        });
        assert_eq!(a.mode & 0o7777, 0o4751, "{label}");
        assert_eq!(a.size, 4, "{label}");
        assert_eq!(
            a.atime,
            Timespec {
                sec: 1_000_000_000,
                nsec: 123_456_789
            }
        );
        assert_eq!(
            a.mtime,
            Timespec {
                sec: -5,
                nsec: 999_999_999
            }
        );
        assert_eq!(fs::read(fx.at("f")).unwrap(), b"0123", "{label}");
        let m = lstat(&fx.at("f"));
        assert_eq!((m.mtime(), m.mtime_nsec()), (-5, 999_999_999));

        // Only mtime: atime is left alone (UTIME_OMIT); Now is the agent's clock. (The read
        // above may have moved atime, so compare with a fresh lookup.)
        let a = fx.attr(Op::Lookup { path: p("f") });
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let b = fx.attr(Op::SetAttr {
            node: node("f"),
            set: SetAttr {
                mtime: Some(SetTime::Now),
                ..Default::default()
            },
        });
        assert_eq!(b.atime, a.atime, "{label}");
        assert!(b.mtime.sec >= before, "{label}");

        // The root itself can be changed.
        let r = fx.attr(Op::SetAttr {
            node: node(""),
            set: SetAttr {
                mode: Some(0o751),
                ..Default::default()
            },
        });
        assert_eq!(r.mode, libc::S_IFDIR | 0o751);
        assert_eq!(mode_of(&fx.root()), 0o751);
    }
}

#[test]
fn setattr_chown_changes_only_what_is_given() {
    if !is_root() {
        eprintln!("skipped: chown to another user needs root");
        return;
    }
    let fx = Fx::new();
    fs::write(fx.at("f"), b"").unwrap();
    let a = fx.attr(Op::SetAttr {
        node: node("f"),
        set: SetAttr {
            gid: Some(4242),
            ..Default::default()
        },
    });
    assert_eq!((a.uid, a.gid), (0, 4242));
    let a = fx.attr(Op::SetAttr {
        node: node("f"),
        set: SetAttr {
            uid: Some(65534),
            ..Default::default()
        },
    });
    assert_eq!((a.uid, a.gid), (65534, 4242));
}

#[test]
fn setattr_on_handle_uses_the_descriptor() {
    let fx = Fx::new();
    let h = create(&fx, "f", 0o600);
    write(&fx, h, 0, b"abcdef");
    // Rename the file away: the handle still reaches it, the old path does not.
    fs::rename(fx.at("f"), fx.at("g")).unwrap();
    let a = fx.attr(Op::SetAttr {
        node: NodeRef::Handle(h),
        set: SetAttr {
            mode: Some(0o644),
            size: Some(2),
            mtime: Some(SetTime::At(Timespec { sec: 42, nsec: 7 })),
            ..Default::default()
        },
    });
    assert_eq!(a.mode & 0o7777, 0o644);
    assert_eq!(a.size, 2);
    assert_eq!(a.mtime, Timespec { sec: 42, nsec: 7 });
    assert_eq!(fs::read(fx.at("g")).unwrap(), b"ab");
}

#[test]
fn truncate_by_path_refuses_dirs_and_never_opens_fifos() {
    for (label, kernel) in kernels() {
        let fx = Fx::with(kernel());
        fs::create_dir(fx.at("d")).unwrap();
        let fifo = std::ffi::CString::new(fx.at("fifo").to_str().unwrap()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
        let size = |path: &str| Op::SetAttr {
            node: node(path),
            set: SetAttr {
                size: Some(0),
                ..Default::default()
            },
        };
        assert_eq!(fx.errno(size("d")), libc::EISDIR, "{label}");
        // Opening a FIFO for writing without a reader would block forever.
        assert_eq!(fx.errno(size("fifo")), libc::EINVAL, "{label}");
        assert_eq!(fx.errno(size("missing")), libc::ENOENT, "{label}");
    }
}

#[test]
fn chmod_of_a_symlink_is_refused_without_touching_the_target() {
    for (label, kernel) in kernels() {
        let fx = Fx::with(kernel());
        fs::write(fx.at("t"), b"").unwrap();
        fs::set_permissions(
            fx.at("t"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("t", fx.at("l")).unwrap();
        let e = fx.errno(Op::SetAttr {
            node: node("l"),
            set: SetAttr {
                mode: Some(0o777),
                ..Default::default()
            },
        });
        assert_eq!(e, libc::EOPNOTSUPP, "{label}");
        assert_eq!(mode_of(&fx.at("t")), 0o600, "{label}");
        // utimensat on the link changes the link, not the target.
        let t_before = lstat(&fx.at("t")).mtime();
        let a = fx.attr(Op::SetAttr {
            node: node("l"),
            set: SetAttr {
                mtime: Some(SetTime::At(Timespec { sec: 77, nsec: 0 })),
                ..Default::default()
            },
        });
        assert_eq!(a.file_type(), libc::S_IFLNK);
        assert_eq!(a.mtime.sec, 77);
        assert_eq!(lstat(&fx.at("t")).mtime(), t_before, "{label}");
    }
}

#[test]
fn readdir_batches_without_dots_with_attrs_and_symlink_targets() {
    let fx = Fx::new();
    fs::create_dir(fx.at("d")).unwrap();
    for i in 0..10 {
        fs::write(fx.at(&format!("d/f{i}")), vec![b'x'; i]).unwrap();
    }
    fs::create_dir(fx.at("d/sub")).unwrap();
    std::os::unix::fs::symlink("../elsewhere", fx.at("d/link")).unwrap();
    let h = fx.handle(Op::OpenDir { path: p("d") });
    let mut seen = BTreeMap::new();
    let mut batches = 0;
    loop {
        let Done::Entries { entries, eof } = fx.ok(Op::ReadDir { handle: h, max: 5 }) else {
            panic!("expected entries");
        };
        assert!(entries.len() <= 5);
        batches += 1;
        for e in entries {
            assert!(e.name != b"." && e.name != b"..");
            let name = String::from_utf8(e.name).unwrap();
            assert!(seen.insert(name, (e.attr.unwrap(), e.symlink)).is_none());
        }
        if eof {
            break;
        }
        assert!(batches < 10, "never reached eof");
    }
    // 12 entries in batches of 5: the third batch holds 2 and already says eof.
    assert_eq!(batches, 3);
    assert_eq!(seen.len(), 12);
    for i in 0..10usize {
        let (a, link) = &seen[&format!("f{i}")];
        assert_eq!(a.size, i as u64);
        assert_eq!(a.ino, lstat(&fx.at(&format!("d/f{i}"))).ino());
        assert!(link.is_none());
    }
    assert!(seen["sub"].0.is_dir());
    assert_eq!(seen["link"].0.file_type(), libc::S_IFLNK);
    assert_eq!(seen["link"].1.as_deref(), Some(&b"../elsewhere"[..]));
    fx.ok(Op::Close { handle: h });
    assert_eq!(fx.errno(Op::ReadDir { handle: h, max: 5 }), libc::EBADF);
}

#[test]
fn readdir_exact_fit_reports_eof_in_the_same_batch() {
    let fx = Fx::new();
    for i in 0..3 {
        fs::write(fx.at(&format!("f{i}")), b"").unwrap();
    }
    let h = fx.handle(Op::OpenDir { path: p("") });
    let Done::Entries { entries, eof } = fx.ok(Op::ReadDir { handle: h, max: 3 }) else {
        panic!()
    };
    assert_eq!(entries.len(), 3);
    assert!(eof);
    assert_eq!(fx.errno(Op::ReadDir { handle: h, max: 0 }), libc::EINVAL);
    let f = create(&fx, "file", 0o600);
    assert_eq!(fx.errno(Op::ReadDir { handle: f, max: 1 }), libc::ENOTDIR);
    assert_eq!(fx.errno(Op::OpenDir { path: p("file") }), libc::ENOTDIR);
}

#[test]
fn open_flags_are_passed_through_minus_creat() {
    let fx = Fx::new();
    // O_CREAT is ignored by Open.
    assert_eq!(
        fx.errno(Op::Open {
            path: p("new"),
            flags: O_RDWR | libc::O_CREAT
        }),
        libc::ENOENT
    );
    fs::write(fx.at("f"), b"abcdef").unwrap();
    let h = fx.handle(Op::Open {
        path: p("f"),
        flags: libc::O_WRONLY | libc::O_APPEND | libc::O_DIRECT,
    });
    // O_APPEND: the offset is ignored and data goes to the end.
    write(&fx, h, 0, b"XY");
    assert_eq!(fs::read(fx.at("f")).unwrap(), b"abcdefXY");
    let t = fx.ok(Op::Open {
        path: p("f"),
        flags: libc::O_RDWR | libc::O_TRUNC,
    });
    let Done::Opened { handle, attr } = t else {
        panic!()
    };
    assert_eq!(attr.size, 0);
    assert_eq!(read(&fx, handle, 0, 10), b"");
    // Reading a write-only handle fails like read(2).
    assert_eq!(
        fx.errno(Op::Read {
            handle: h,
            offset: 0,
            len: 1
        }),
        libc::EBADF
    );
}

#[test]
fn create_uses_mode_exactly_and_honours_excl() {
    let fx = Fx::new();
    let h = fx.ok(Op::Create {
        path: p("f"),
        flags: libc::O_WRONLY | libc::O_EXCL,
        mode: libc::S_IFREG | 0o606,
    });
    let Done::Opened { attr, .. } = h else {
        panic!()
    };
    assert_eq!(attr.mode, libc::S_IFREG | 0o606);
    assert_eq!(mode_of(&fx.at("f")), 0o606);
    assert_eq!(
        fx.errno(Op::Create {
            path: p("f"),
            flags: libc::O_WRONLY | libc::O_EXCL,
            mode: 0o600
        }),
        libc::EEXIST
    );
    // Without O_EXCL an existing file is opened.
    fx.handle(Op::Create {
        path: p("f"),
        flags: libc::O_WRONLY,
        mode: 0o600,
    });
    assert_eq!(
        fx.errno(Op::Create {
            path: p("missing/f"),
            flags: libc::O_WRONLY,
            mode: 0o600
        }),
        libc::ENOENT
    );
}

#[test]
fn read_write_close_and_handle_numbers() {
    let fx = Fx::new();
    let h = create(&fx, "f", 0o644);
    write(&fx, h, 0, b"hello world");
    write(&fx, h, 6, b"WORLD");
    assert_eq!(read(&fx, h, 0, 100), b"hello WORLD");
    assert_eq!(read(&fx, h, 6, 3), b"WOR");
    assert_eq!(read(&fx, h, 50, 3), b"");
    assert_eq!(
        fx.errno(Op::Read {
            handle: h,
            offset: 0,
            len: MAX_IO_LEN + 1
        }),
        libc::EINVAL
    );
    assert_eq!(
        fx.errno(Op::Read {
            handle: h,
            offset: u64::MAX,
            len: 1
        }),
        libc::EINVAL
    );
    fx.ok(Op::Fsync {
        handle: h,
        datasync: true,
    });
    fx.ok(Op::Fsync {
        handle: h,
        datasync: false,
    });
    assert_eq!(fx.agent.handles.count(), 1);
    fx.ok(Op::Close { handle: h });
    assert_eq!(fx.agent.handles.count(), 0);
    assert_eq!(fx.errno(Op::Close { handle: h }), libc::EBADF);
    assert_eq!(
        fx.errno(Op::Write {
            handle: h,
            offset: 0,
            data: b"x".to_vec()
        }),
        libc::EBADF
    );
    // Numbers are never reused within a session.
    let h2 = fx.handle(Op::Open {
        path: p("f"),
        flags: libc::O_RDONLY,
    });
    let d = fx.handle(Op::OpenDir { path: p("") });
    assert!(h2 > h && d > h2);
}

#[test]
fn large_sparse_file_at_five_gib() {
    let fx = Fx::new();
    let h = create(&fx, "big", 0o644);
    let off = 5u64 << 30;
    let data: Vec<u8> = (0..=255u8).cycle().take(1 << 16).collect();
    write(&fx, h, off, &data);
    assert_eq!(read(&fx, h, off, data.len() as u32), data);
    assert_eq!(read(&fx, h, 4 << 30, 16), vec![0u8; 16]);
    let a = fx.attr(Op::GetAttr {
        node: NodeRef::Handle(h),
    });
    assert_eq!(a.size, off + data.len() as u64);
    assert!(
        a.blocks * 512 < 16 << 20,
        "file is not sparse: {} blocks",
        a.blocks
    );
    // The hole and the data are where they should be.
    let seek = |offset, whence| match fx.ok(Op::Lseek {
        handle: h,
        offset,
        whence,
    }) {
        Done::Offset(o) => o,
        other => panic!("{other:?}"),
    };
    assert_eq!(seek(0, libc::SEEK_HOLE), 0);
    assert!(seek(0, libc::SEEK_DATA) <= off);
    assert_eq!(
        fx.errno(Op::Lseek {
            handle: h,
            offset: a.size + 10,
            whence: libc::SEEK_DATA
        }),
        libc::ENXIO
    );
    assert_eq!(
        fx.errno(Op::Lseek {
            handle: h,
            offset: 0,
            whence: libc::SEEK_SET
        }),
        libc::EINVAL
    );
}

#[test]
fn fallocate_keep_size_and_punch_hole() {
    let fx = Fx::new();
    let h = create(&fx, "f", 0o644);
    let attr = |fx: &Fx| {
        fx.attr(Op::GetAttr {
            node: NodeRef::Handle(h),
        })
    };
    write(&fx, h, 0, &vec![7u8; 1 << 20]);
    fx.ok(Op::Fsync {
        handle: h,
        datasync: false,
    });
    let before = attr(&fx);
    // Keep-size: blocks grow, size does not.
    fx.ok(Op::Fallocate {
        handle: h,
        mode: libc::FALLOC_FL_KEEP_SIZE,
        offset: 1 << 20,
        len: 1 << 20,
    });
    let grown = attr(&fx);
    assert_eq!(grown.size, before.size);
    assert!(
        grown.blocks > before.blocks,
        "{} <= {}",
        grown.blocks,
        before.blocks
    );
    // Punch a hole: zeros read back, blocks shrink, size stays.
    fx.ok(Op::Fallocate {
        handle: h,
        mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset: 64 << 10,
        len: 256 << 10,
    });
    let punched = attr(&fx);
    assert_eq!(punched.size, before.size);
    assert!(punched.blocks < grown.blocks);
    assert_eq!(read(&fx, h, 64 << 10, 4096), vec![0u8; 4096]);
    assert_eq!(read(&fx, h, 0, 4), vec![7u8; 4]);
    let Done::Offset(hole) = fx.ok(Op::Lseek {
        handle: h,
        offset: 0,
        whence: libc::SEEK_HOLE,
    }) else {
        panic!()
    };
    assert_eq!(hole, 64 << 10);
    // Plain fallocate extends the size.
    fx.ok(Op::Fallocate {
        handle: h,
        mode: 0,
        offset: 0,
        len: 3 << 20,
    });
    assert_eq!(attr(&fx).size, 3 << 20);
    // Punching without keep-size is refused by the kernel, and the errno passes through.
    assert_eq!(
        fx.errno(Op::Fallocate {
            handle: h,
            mode: libc::FALLOC_FL_PUNCH_HOLE,
            offset: 0,
            len: 4096
        }),
        libc::EOPNOTSUPP
    );
}

#[test]
fn mkdir_mknod_symlink_readlink_link_unlink_rmdir() {
    let fx = Fx::new();
    let d = fx.attr(Op::Mkdir {
        path: p("d"),
        mode: 0o1750,
    });
    assert_eq!(d.mode, libc::S_IFDIR | 0o1750);
    assert_eq!(
        fx.errno(Op::Mkdir {
            path: p("d"),
            mode: 0o755
        }),
        libc::EEXIST
    );

    let fifo = fx.attr(Op::Mknod {
        path: p("d/fifo"),
        mode: libc::S_IFIFO | 0o640,
        rdev: 0,
    });
    assert_eq!(fifo.mode, libc::S_IFIFO | 0o640);
    assert!(lstat(&fx.at("d/fifo")).file_type().is_fifo());
    let sock = fx.attr(Op::Mknod {
        path: p("d/sock"),
        mode: libc::S_IFSOCK | 0o600,
        rdev: 0,
    });
    assert_eq!(sock.file_type(), libc::S_IFSOCK);
    let reg = fx.attr(Op::Mknod {
        path: p("d/reg"),
        mode: libc::S_IFREG | 0o444,
        rdev: 0,
    });
    assert_eq!(reg.mode, libc::S_IFREG | 0o444);
    if is_root() {
        let null = fx.attr(Op::Mknod {
            path: p("d/null"),
            mode: libc::S_IFCHR | 0o666,
            rdev: libc::makedev(1, 3),
        });
        assert_eq!(null.file_type(), libc::S_IFCHR);
        assert_eq!(null.rdev, libc::makedev(1, 3));
    }

    let l = fx.attr(Op::Symlink {
        path: p("d/l"),
        target: b"../some where".to_vec(),
    });
    assert_eq!(l.file_type(), libc::S_IFLNK);
    assert_eq!(fx.data(Op::Readlink { path: p("d/l") }), b"../some where");
    let long = vec![b'a'; 4000];
    fx.ok(Op::Symlink {
        path: p("long"),
        target: long.clone(),
    });
    assert_eq!(fx.data(Op::Readlink { path: p("long") }), long);
    assert_eq!(fx.errno(Op::Readlink { path: p("d/reg") }), libc::EINVAL);
    assert_eq!(
        fx.errno(Op::Symlink {
            path: p("bad"),
            target: b"a\0b".to_vec()
        }),
        libc::EINVAL
    );

    let h = create(&fx, "f", 0o644);
    write(&fx, h, 0, b"data");
    let linked = fx.attr(Op::Link {
        from: p("f"),
        to: p("d/hard"),
    });
    assert_eq!(linked.nlink, 2);
    assert_eq!(linked.ino, lstat(&fx.at("f")).ino());
    assert_eq!(
        fx.errno(Op::Link {
            from: p("d"),
            to: p("dlink")
        }),
        libc::EPERM
    );

    assert_eq!(fx.errno(Op::Rmdir { path: p("d") }), libc::ENOTEMPTY);
    assert_eq!(fx.errno(Op::Unlink { path: p("d") }), libc::EISDIR);
    assert_eq!(fx.errno(Op::Rmdir { path: p("f") }), libc::ENOTDIR);
    for name in ["fifo", "sock", "reg", "l", "hard"] {
        fx.ok(Op::Unlink {
            path: p(&format!("d/{name}")),
        });
    }
    if is_root() {
        fx.ok(Op::Unlink { path: p("d/null") });
    }
    fx.ok(Op::Rmdir { path: p("d") });
    assert!(!fx.at("d").exists());
    assert_eq!(fx.errno(Op::Unlink { path: p("d") }), libc::ENOENT);
    // The root cannot be removed through the agent.
    assert_ne!(fx.run(Op::Rmdir { path: p("") }).map(drop), Ok(()));
    assert!(fx.root().is_dir());
}

#[test]
fn rename_plain_noreplace_exchange() {
    let fx = Fx::new();
    fs::write(fx.at("a"), b"A").unwrap();
    fs::write(fx.at("b"), b"B").unwrap();
    fs::create_dir(fx.at("d")).unwrap();
    assert_eq!(
        fx.errno(Op::Rename {
            from: p("a"),
            to: p("b"),
            flags: libc::RENAME_NOREPLACE
        }),
        libc::EEXIST
    );
    fx.ok(Op::Rename {
        from: p("a"),
        to: p("b"),
        flags: libc::RENAME_EXCHANGE,
    });
    assert_eq!(fs::read(fx.at("a")).unwrap(), b"B");
    assert_eq!(fs::read(fx.at("b")).unwrap(), b"A");
    fx.ok(Op::Rename {
        from: p("a"),
        to: p("d/c"),
        flags: 0,
    });
    assert!(!fx.at("a").exists());
    assert_eq!(fs::read(fx.at("d/c")).unwrap(), b"B");
    fx.ok(Op::Rename {
        from: p("d/c"),
        to: p("b"),
        flags: 0,
    });
    assert_eq!(fs::read(fx.at("b")).unwrap(), b"B");
    assert_eq!(
        fx.errno(Op::Rename {
            from: p("missing"),
            to: p("x"),
            flags: 0
        }),
        libc::ENOENT
    );
    assert_eq!(
        fx.errno(Op::Rename {
            from: p("b"),
            to: p("x"),
            flags: libc::RENAME_EXCHANGE
        }),
        libc::ENOENT
    );
}

#[test]
fn statfs_of_the_root_filesystem() {
    let fx = Fx::new();
    let Done::Statfs(s) = fx.ok(Op::Statfs) else {
        panic!()
    };
    let mut v = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    let c = std::ffi::CString::new(fx.root().to_str().unwrap()).unwrap();
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), v.as_mut_ptr()) }, 0);
    // SAFETY: statvfs returned 0.
    let v = unsafe { v.assume_init() };
    assert_eq!(s.blocks, v.f_blocks);
    assert_eq!(s.files, v.f_files);
    assert_eq!(s.bsize as u64, v.f_bsize);
    assert_eq!(s.namelen as u64, v.f_namemax);
    assert!(s.blocks > 0 && s.bsize > 0);
}

#[test]
fn xattrs_by_path_and_handle() {
    for (label, kernel) in kernels() {
        let fx = Fx::with(kernel());
        fs::write(fx.at("f"), b"").unwrap();
        let set = |node: NodeRef, name: &str, value: &[u8], flags| Op::SetXattr {
            node,
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
            flags,
        };
        let get = |node: NodeRef, name: &str| Op::GetXattr {
            node,
            name: name.as_bytes().to_vec(),
        };
        let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        fx.ok(set(node("f"), "user.big", &big, 0));
        fx.ok(set(node("f"), "user.empty", b"", 0));
        assert_eq!(fx.data(get(node("f"), "user.big")), big, "{label}");
        assert_eq!(fx.data(get(node("f"), "user.empty")), b"", "{label}");
        let list = fx.data(Op::ListXattr { node: node("f") });
        let mut names: Vec<&[u8]> = list.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
        names.sort();
        assert_eq!(names, vec![&b"user.big"[..], b"user.empty"], "{label}");
        assert_eq!(
            fx.errno(set(node("f"), "user.big", b"x", libc::XATTR_CREATE)),
            libc::EEXIST
        );
        assert_eq!(
            fx.errno(set(node("f"), "user.none", b"x", libc::XATTR_REPLACE)),
            libc::ENODATA
        );
        fx.ok(Op::RemoveXattr {
            node: node("f"),
            name: b"user.big".to_vec(),
        });
        assert_eq!(
            fx.errno(get(node("f"), "user.big")),
            libc::ENODATA,
            "{label}"
        );
        assert_eq!(
            fx.errno(Op::RemoveXattr {
                node: node("f"),
                name: b"user.big".to_vec()
            }),
            libc::ENODATA
        );
        // The same through a handle, and on the root.
        let h = fx.handle(Op::Open {
            path: p("f"),
            flags: libc::O_RDONLY,
        });
        fx.ok(set(NodeRef::Handle(h), "user.h", b"v", 0));
        assert_eq!(fx.data(get(node("f"), "user.h")), b"v");
        assert_eq!(fx.data(get(NodeRef::Handle(h), "user.h")), b"v");
        fx.ok(set(node(""), "user.r", b"root", 0));
        assert_eq!(fx.data(get(node(""), "user.r")), b"root");
        assert!(
            fx.data(Op::ListXattr {
                node: NodeRef::Handle(h)
            })
            .windows(6)
            .any(|w| w == b"user.h")
        );
        assert_eq!(fx.errno(get(node("missing"), "user.x")), libc::ENOENT);
    }
}

#[test]
fn access_checks_like_access2() {
    for (label, kernel) in kernels() {
        let fx = Fx::with(kernel());
        fs::write(fx.at("f"), b"").unwrap();
        fs::set_permissions(
            fx.at("f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        let access = |path: &str, mask| Op::Access {
            path: p(path),
            mask,
        };
        fx.ok(access("f", libc::F_OK));
        fx.ok(access("f", libc::R_OK | libc::W_OK));
        assert_eq!(
            fx.errno(access("missing", libc::F_OK)),
            libc::ENOENT,
            "{label}"
        );
        // Even root may not execute a file without any execute bit.
        assert_eq!(fx.errno(access("f", libc::X_OK)), libc::EACCES, "{label}");
        fx.ok(access("", libc::R_OK | libc::X_OK));
    }
}

#[test]
fn ping_answers() {
    assert_eq!(Fx::new().ok(Op::Ping), Done::Ok);
}

/// The ACL value vim sets after a save: owner, group and other entries only.
fn minimal_acl(mode: u32) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, shift) in [(0x01u16, 6), (0x04, 3), (0x20, 0)] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&(((mode >> shift) & 7) as u16).to_le_bytes());
        v.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    v
}

fn ctime(path: &std::path::Path) -> (i64, i64) {
    let m = lstat(path);
    (m.ctime(), m.ctime_nsec())
}

/// A chmod to the mode a file has, and a minimal ACL equal to it, change nothing in the
/// target (no ctime change, so no attribute event for the container's watchers); any real
/// change still happens, by path and by handle.
#[test]
fn a_mode_or_minimal_acl_the_node_already_has_changes_nothing() {
    let fx = Fx::new();
    let h = create(&fx, "f", 0o644);
    write(&fx, h, 0, b"saved");
    let f = fx.at("f");
    let tick = || std::thread::sleep(std::time::Duration::from_millis(30));
    let chmod = |node: NodeRef, mode: u32| {
        fx.attr(Op::SetAttr {
            node,
            set: SetAttr {
                mode: Some(mode),
                ..Default::default()
            },
        })
    };
    let acl = |node: NodeRef, mode: u32| {
        fx.ok(Op::SetXattr {
            node,
            name: b"system.posix_acl_access".to_vec(),
            value: minimal_acl(mode),
            flags: 0,
        })
    };
    let before = ctime(&f);
    tick();
    assert_eq!(chmod(NodeRef::Handle(h), 0o100644).mode & 0o7777, 0o644);
    assert_eq!(chmod(node("f"), 0o644).mode & 0o7777, 0o644);
    acl(NodeRef::Handle(h), 0o644);
    acl(node("f"), 0o644);
    assert_eq!(
        ctime(&f),
        before,
        "a change to what the file already is touched it"
    );

    // Real changes happen.
    assert_eq!(chmod(NodeRef::Handle(h), 0o600).mode & 0o7777, 0o600);
    assert_eq!(lstat(&f).mode() & 0o7777, 0o600);
    acl(node("f"), 0o640);
    assert_eq!(lstat(&f).mode() & 0o7777, 0o640);
    let changed = ctime(&f);
    assert_ne!(changed, before);
    // Set-id bits are never taken for granted (the kernel may clear them).
    fs::set_permissions(&f, fs::Permissions::from_mode(0o2640)).unwrap();
    let setgid = ctime(&f);
    tick();
    chmod(node("f"), 0o2640);
    assert_ne!(
        ctime(&f),
        setgid,
        "a chmod involving set-id bits was skipped"
    );
}

#[test]
fn only_minimal_acls_of_three_entries_stand_for_a_mode() {
    use crate::ops::minimal_acl_mode;
    assert_eq!(minimal_acl_mode(&minimal_acl(0o754)), Some(0o754));
    assert_eq!(minimal_acl_mode(&minimal_acl(0)), Some(0));
    let mut mask = minimal_acl(0o644);
    mask.extend_from_slice(&0x10u16.to_le_bytes());
    mask.extend_from_slice(&7u16.to_le_bytes());
    mask.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(minimal_acl_mode(&mask), None);
    let mut twice = minimal_acl(0o644);
    twice[12..14].copy_from_slice(&0x01u16.to_le_bytes()); // the group entry as a second owner
    assert_eq!(minimal_acl_mode(&twice), None);
    let mut v1 = minimal_acl(0o644);
    v1[0] = 1;
    assert_eq!(minimal_acl_mode(&v1), None);
    let mut big = minimal_acl(0o644);
    big[6] = 8;
    assert_eq!(minimal_acl_mode(&big), None);
    assert_eq!(minimal_acl_mode(&[]), None);
    assert_eq!(minimal_acl_mode(&minimal_acl(0o644)[..27]), None);
}
