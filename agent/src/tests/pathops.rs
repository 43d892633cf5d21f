//! PutFile, ReadPath, FsyncPath, WritePath, FallocatePath.

use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};

use kmount_proto::{Done, Op, Timespec};

use super::*;

fn put(path: &str, data: &[u8], compressed: bool, atomic: bool) -> Op {
    Op::PutFile {
        path: p(path),
        data: data.to_vec(),
        compressed,
        mode: 0o640,
        mtime: Some(Timespec {
            sec: 1_600_000_000,
            nsec: 123_456_789,
        }),
        atomic,
        keep_mode: false,
    }
}

fn leftovers(fx: &Fx, dir: &str) -> Vec<String> {
    fs::read_dir(fx.at(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".kmount-"))
        .collect()
}

#[test]
fn put_file_atomic_replaces_in_one_step_with_mode_and_mtime() {
    let fx = Fx::new();
    fs::create_dir(fx.at("d")).unwrap();
    fs::write(fx.at("d/f"), b"old contents").unwrap();
    let old_ino = lstat(&fx.at("d/f")).ino();
    let data = b"new contents ".repeat(1000);
    let z = kmount_proto::tree::compress(&data).unwrap();
    let a = fx.attr(put("d/f", &z, true, true));
    assert_eq!(fs::read(fx.at("d/f")).unwrap(), data);
    let m = lstat(&fx.at("d/f"));
    assert_ne!(
        m.ino(),
        old_ino,
        "atomic: a new file renamed over the old one"
    );
    assert_eq!(
        (a.ino, a.size, a.mode),
        (m.ino(), data.len() as u64, 0o100640)
    );
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_000, 123_456_789));
    assert_eq!(
        (a.ctime.sec, a.ctime.nsec as i64),
        (m.ctime(), m.ctime_nsec())
    );
    assert!(leftovers(&fx, "d").is_empty());
    // A new file, uncompressed, without mtime.
    let a = fx.attr(Op::PutFile {
        path: p("d/new"),
        data: b"hi".to_vec(),
        compressed: false,
        mode: 0o4755,
        mtime: None,
        atomic: true,
        keep_mode: false,
    });
    assert_eq!(a.mode, 0o104755, "set-id bits set after the data");
    assert_eq!(fs::read(fx.at("d/new")).unwrap(), b"hi");
    // A long name still gets a temporary name within NAME_MAX.
    let long = "n".repeat(255);
    fx.attr(put(&format!("d/{long}"), b"x", false, true));
    assert_eq!(fs::read(fx.at(&format!("d/{long}"))).unwrap(), b"x");
    assert!(leftovers(&fx, "d").is_empty());
}

#[test]
fn put_file_in_place_keeps_the_inode() {
    let fx = Fx::new();
    fs::write(fx.at("f"), b"a much longer old content").unwrap();
    let ino = lstat(&fx.at("f")).ino();
    let a = fx.attr(put("f", b"short", false, false));
    assert_eq!(a.ino, ino);
    assert_eq!(fs::read(fx.at("f")).unwrap(), b"short");
    assert_eq!(lstat(&fx.at("f")).mode() & 0o7777, 0o640);
    let a = fx.attr(put("g", b"", false, false));
    assert_eq!((a.size, a.mode), (0, 0o100640));
}

#[test]
fn put_file_failures_leave_nothing_behind() {
    let fx = Fx::new();
    fs::create_dir(fx.at("dir")).unwrap();
    fs::write(fx.at("f"), b"keep").unwrap();
    for atomic in [true, false] {
        assert_eq!(fx.errno(put("dir", b"x", false, atomic)), libc::EISDIR);
        assert_eq!(fx.errno(put("", b"x", false, atomic)), libc::EISDIR);
        assert_eq!(
            fx.errno(put("missing/f", b"x", false, atomic)),
            libc::ENOENT
        );
        assert_eq!(fx.errno(put("f", b"not zstd", true, atomic)), libc::EINVAL);
    }
    // The atomic failure did not touch the target; the in-place one truncated it (as
    // open(O_TRUNC) would) before the data turned out to be bad.
    assert!(leftovers(&fx, "").is_empty());
    // SAFETY: path is NUL-terminated.
    let fifo = std::ffi::CString::new(fx.at("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert_eq!(fx.errno(put("fifo", b"x", false, false)), libc::EINVAL);
    assert_eq!(fx.errno(put("fifo", b"x", false, true)), libc::EINVAL);
}

#[test]
fn streamed_decompression_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fs::File::create(tmp.path().join("f")).unwrap();
    use std::os::fd::AsRawFd;
    let big = vec![7u8; 3 << 20];
    let z = kmount_proto::tree::compress(&big).unwrap();
    assert!(z.len() < 4096);
    assert_eq!(
        crate::pathops::write_content_limited(f.as_raw_fd(), &z, true, 1 << 20),
        Err(crate::sys::Errno(libc::EFBIG))
    );
    assert_eq!(
        crate::pathops::write_content_limited(f.as_raw_fd(), &big, false, 1 << 20),
        Err(crate::sys::Errno(libc::EFBIG))
    );
    assert_eq!(
        crate::pathops::write_content_limited(f.as_raw_fd(), &z, true, 3 << 20),
        Ok(())
    );
    assert_eq!(fs::read(tmp.path().join("f")).unwrap(), big);
}

#[test]
fn read_path_returns_bytes_with_their_state_compressed_when_worth_it() {
    let fx = Fx::new();
    let text = b"hello world, hello world, hello world\n".repeat(500);
    fs::write(fx.at("text"), &text).unwrap();
    let Done::Content {
        attr,
        data,
        compressed,
    } = fx.ok(Op::ReadPath {
        path: p("text"),
        offset: 0,
        len: 1 << 20,
    })
    else {
        panic!()
    };
    assert!(compressed);
    assert!(data.len() * 10 < text.len());
    assert_eq!(
        kmount_proto::tree::decompress(&data, 1 << 20).unwrap(),
        text
    );
    let m = lstat(&fx.at("text"));
    assert_eq!((attr.ino, attr.size), (m.ino(), text.len() as u64));
    assert_eq!(
        (attr.mtime.sec, attr.mtime.nsec as i64),
        (m.mtime(), m.mtime_nsec())
    );
    // Incompressible bytes go as they are; a range past the end is short.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(fx.at("noise"), &noise).unwrap();
    let Done::Content {
        data, compressed, ..
    } = fx.ok(Op::ReadPath {
        path: p("noise"),
        offset: 4000,
        len: 1000,
    })
    else {
        panic!()
    };
    assert!(!compressed);
    assert_eq!(data, &noise[4000..]);
    // Only regular files, and a FIFO is never opened for reading (it would block).
    fs::create_dir(fx.at("dir")).unwrap();
    symlink("text", fx.at("link")).unwrap();
    // SAFETY: path is NUL-terminated.
    let fifo = std::ffi::CString::new(fx.at("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let read = |path: &str| Op::ReadPath {
        path: p(path),
        offset: 0,
        len: 10,
    };
    assert_eq!(fx.errno(read("dir")), libc::EISDIR);
    assert_eq!(fx.errno(read("link")), libc::ELOOP);
    assert_eq!(fx.errno(read("fifo")), libc::EINVAL);
    assert_eq!(fx.errno(read("missing")), libc::ENOENT);
    assert_eq!(
        fx.errno(Op::ReadPath {
            path: p("text"),
            offset: 0,
            len: kmount_proto::MAX_IO_LEN + 1
        }),
        libc::EINVAL
    );
}

#[test]
fn write_fallocate_and_fsync_by_path() {
    let fx = Fx::new();
    fs::create_dir(fx.at("d")).unwrap();
    fs::write(fx.at("d/f"), b"0123456789").unwrap();
    let w = Op::WritePath {
        path: p("d/f"),
        offset: 4,
        data: b"abc".to_vec(),
    };
    assert_eq!(fx.ok(w.clone()), Done::Written(3));
    assert_eq!(fx.ok(w), Done::Written(3), "a repeat is harmless");
    assert_eq!(fs::read(fx.at("d/f")).unwrap(), b"0123abc789");
    assert_eq!(
        fx.ok(Op::WritePath {
            path: p("d/f"),
            offset: 20,
            data: b"z".to_vec(),
        }),
        Done::Written(1)
    );
    assert_eq!(lstat(&fx.at("d/f")).size(), 21);
    assert_eq!(
        fx.ok(Op::FallocatePath {
            path: p("d/f"),
            mode: 0,
            offset: 0,
            len: 1 << 20,
        }),
        Done::Ok
    );
    assert_eq!(lstat(&fx.at("d/f")).size(), 1 << 20);
    for datasync in [false, true] {
        assert_eq!(
            fx.ok(Op::FsyncPath {
                path: p("d/f"),
                datasync
            }),
            Done::Ok
        );
    }
    assert_eq!(
        fx.errno(Op::FsyncPath {
            path: p("d"),
            datasync: false
        }),
        libc::EISDIR
    );
    assert_eq!(
        fx.errno(Op::WritePath {
            path: p("d/missing"),
            offset: 0,
            data: b"x".to_vec(),
        }),
        libc::ENOENT
    );
    assert_eq!(
        fx.errno(Op::WritePath {
            path: p("d"),
            offset: 0,
            data: b"x".to_vec(),
        }),
        libc::EISDIR
    );
}
