//! POSIX operations through a real kmount mount of a temp directory, one test per family.
//! Each checks the result through the mount and in the backing directory.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink,
};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kmount_tests::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn md(path: &Path) -> fs::Metadata {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn read_at(f: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("pread {len} bytes at {offset}: {e}"));
    buf
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.expect("dirent").file_name().into_string().expect("utf-8"))
        .collect();
    v.sort();
    v
}

fn splice(mut base: Vec<u8>, offset: usize, data: &[u8]) -> Vec<u8> {
    if base.len() < offset + data.len() {
        base.resize(offset + data.len(), 0);
    }
    base[offset..offset + data.len()].copy_from_slice(data);
    base
}

#[test]
fn create_excl() {
    let m = Mounted::new();
    let p = m.m("f");
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&p)
        .expect("O_CREAT|O_EXCL of a new file");
    drop(f);
    assert_eq!(perm(&p), 0o640 & !current_umask());
    assert_same_node(&p, &m.b("f"));

    assert_errno(
        OpenOptions::new().write(true).create_new(true).open(&p),
        libc::EEXIST,
        "O_CREAT|O_EXCL of an existing file",
    );
    // O_EXCL never follows a symlink, even a dangling one.
    symlink("nowhere", m.m("dangling")).unwrap();
    assert_errno(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.m("dangling")),
        libc::EEXIST,
        "O_CREAT|O_EXCL of a dangling symlink",
    );
    assert!(!m.b("nowhere").exists(), "O_EXCL followed the symlink");

    // O_CREAT without O_EXCL opens the existing file: no truncation, mode unchanged.
    fs::write(&p, b"content").unwrap();
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o777)
        .open(&p)
        .unwrap();
    drop(f);
    assert_eq!(read(&p), b"content");
    assert_eq!(perm(&p), 0o640 & !current_umask());

    assert_errno(
        File::create(m.m("missing/f")),
        libc::ENOENT,
        "create in a missing directory",
    );
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn write_at_offsets_and_read_back() {
    let m = Mounted::new();
    let p = m.m("f");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let a = pattern(5000, 1);
    let b = pattern(3000, 2);
    let c = pattern(70_000, 3);
    let d = pattern(100, 4);
    f.write_all_at(&a, 0).unwrap();
    f.write_all_at(&b, 10_000).unwrap();
    f.write_all_at(&c, MIB + 7).unwrap();
    f.write_all_at(&d, 4090).unwrap(); // overwrites across a page boundary
    f.sync_all().unwrap();
    let mut expected = splice(Vec::new(), 0, &a);
    expected = splice(expected, 10_000, &b);
    expected = splice(expected, (MIB + 7) as usize, &c);
    expected = splice(expected, 4090, &d);

    assert_eq!(f.metadata().unwrap().len(), expected.len() as u64);
    // Through the same handle, a fresh handle, and in the backing directory.
    assert_eq!(read_at(&f, 4000, 8192), expected[4000..12192]);
    assert!(read(&p) == expected, "content through the mount differs");
    assert!(
        read(&m.b("f")) == expected,
        "content in the backing dir differs"
    );
    let g = File::open(&p).unwrap();
    assert_eq!(
        read_at(&g, MIB, 100),
        expected[MIB as usize..MIB as usize + 100]
    );
    // A read past the end is short.
    let mut buf = vec![0u8; 100];
    let n = g.read_at(&mut buf, expected.len() as u64 - 10).unwrap();
    assert_eq!(n, 10);
    assert_eq!(g.read_at(&mut buf, expected.len() as u64 + 10).unwrap(), 0);
    drop((f, g));
    assert_same_node(&p, &m.b("f"));
}

#[test]
fn pwrite_in_place_into_big_file() {
    const SIZE: usize = 64 << 20;
    let original = pattern(SIZE, 7);
    let m = Mounted::with_backing(|b| fs::write(b.join("big"), &original).unwrap());
    let ino_before = ino(&m.b("big"));

    let patch = pattern(4096, 99);
    let offset = (32 << 20) + 1234;
    let f = OpenOptions::new().write(true).open(m.m("big")).unwrap();
    f.write_all_at(&patch, offset as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let expected = splice(original, offset, &patch);
    let backing = read(&m.b("big"));
    assert_eq!(backing.len(), SIZE, "size changed");
    let changed: Vec<usize> = backing
        .iter()
        .zip(&expected)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .take(10)
        .collect();
    assert!(
        changed.is_empty(),
        "backing file differs from the original + patch at {changed:?}..."
    );
    assert_eq!(
        ino(&m.b("big")),
        ino_before,
        "the file was replaced rather than written in place"
    );
    let g = File::open(m.m("big")).unwrap();
    assert_eq!(
        read_at(&g, offset as u64 - 10, 4116),
        expected[offset - 10..offset + 4106]
    );
    drop(g);
    assert!(
        read(&m.m("big")) == expected,
        "content through the mount differs"
    );
    assert_same_node(&m.m("big"), &m.b("big"));
}

#[test]
fn truncate_and_extend() {
    let m = Mounted::new();
    let p = m.m("f");
    let data = pattern(10_000, 5);
    fs::write(&p, &data).unwrap();

    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(3000).unwrap(); // ftruncate
    assert_eq!(f.metadata().unwrap().len(), 3000);
    assert_eq!(read(&p), data[..3000]);
    assert_eq!(read(&m.b("f")), data[..3000]);

    // truncate(2) by path, extending: the new bytes read as zeros.
    check(unsafe { libc::truncate(cstr(&p).as_ptr(), 8000) }).unwrap();
    let mut expected = data[..3000].to_vec();
    expected.resize(8000, 0);
    assert_eq!(md(&p).len(), 8000);
    assert_eq!(read(&p), expected);
    assert_same_node(&p, &m.b("f"));

    // Shrink to nothing, then a write past the end leaves a zero gap.
    f.set_len(0).unwrap();
    f.write_all_at(b"tail", 100).unwrap();
    f.sync_all().unwrap();
    let mut expected = vec![0u8; 100];
    expected.extend_from_slice(b"tail");
    assert_eq!(read(&p), expected);
    assert_eq!(read(&m.b("f")), expected);

    // O_TRUNC on open.
    drop(
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap(),
    );
    assert_eq!(md(&p).len(), 0);
    assert_eq!(md(&m.b("f")).len(), 0);
    drop(f);
    assert_same_node(&p, &m.b("f"));
}

#[test]
fn append() {
    let m = Mounted::new();
    let p = m.m("log");
    fs::write(&p, b"start\n").unwrap();
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let b = OpenOptions::new().write(true).open(&p).unwrap();
    a.write_all(b"one\n").unwrap();
    // Another handle extends the file; O_APPEND must follow the new end.
    b.write_all_at(b"XXXXXXXXXX", 20).unwrap();
    a.write_all(b"two\n").unwrap();
    let mut c = OpenOptions::new().append(true).open(&p).unwrap();
    c.write_all(b"three\n").unwrap();
    a.write_all(b"four\n").unwrap();
    a.sync_all().unwrap();

    let mut expected = b"start\none\n".to_vec();
    expected.resize(20, 0);
    expected.extend_from_slice(b"XXXXXXXXXXtwo\nthree\nfour\n");
    assert_eq!(
        String::from_utf8_lossy(&read(&p)),
        String::from_utf8_lossy(&expected)
    );
    assert_eq!(read(&m.b("log")), expected);
    drop((a, b, c));
    assert_same_node(&p, &m.b("log"));
}

#[test]
fn mkdir_rmdir() {
    let m = Mounted::new();
    let d = m.m("d");
    fs::DirBuilder::new().mode(0o750).create(&d).unwrap();
    assert_eq!(perm(&d), 0o750 & !current_umask());
    assert!(md(&m.b("d")).is_dir());
    assert_eq!(md(&m.mnt).nlink(), 3, "root nlink after one mkdir");
    assert_eq!(
        md(&m.backing).nlink(),
        3,
        "backing root nlink after one mkdir"
    );

    assert_errno(fs::create_dir(&d), libc::EEXIST, "mkdir of an existing dir");
    assert_errno(
        fs::create_dir(m.m("missing/x")),
        libc::ENOENT,
        "mkdir in a missing dir",
    );
    fs::write(m.m("d/f"), b"x").unwrap();
    assert_errno(
        fs::remove_dir(&d),
        libc::ENOTEMPTY,
        "rmdir of a non-empty dir",
    );
    assert_errno(fs::remove_dir(m.m("d/f")), libc::ENOTDIR, "rmdir of a file");
    assert_errno(
        fs::create_dir(m.m("d/f/x")),
        libc::ENOTDIR,
        "mkdir under a file",
    );
    fs::remove_file(m.m("d/f")).unwrap();
    fs::remove_dir(&d).unwrap();
    assert_errno(
        fs::symlink_metadata(&d),
        libc::ENOENT,
        "lstat of the removed dir",
    );
    assert_errno(
        fs::symlink_metadata(m.b("d")),
        libc::ENOENT,
        "lstat of the removed dir in the backing dir",
    );
    assert_errno(fs::remove_dir(&d), libc::ENOENT, "rmdir of a missing dir");

    fs::create_dir_all(m.m("a/b/c")).unwrap();
    fs::create_dir(m.m("a/b2")).unwrap();
    assert_eq!(md(&m.m("a")).nlink(), 4);
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn unlink() {
    let m = Mounted::new();
    fs::write(m.m("f"), b"x").unwrap();
    fs::create_dir(m.m("d")).unwrap();
    fs::remove_file(m.m("f")).unwrap();
    assert_errno(
        fs::symlink_metadata(m.m("f")),
        libc::ENOENT,
        "lstat after unlink",
    );
    assert_errno(
        fs::symlink_metadata(m.b("f")),
        libc::ENOENT,
        "lstat in the backing dir after unlink",
    );
    assert_errno(
        fs::remove_file(m.m("f")),
        libc::ENOENT,
        "unlink of a missing file",
    );
    assert_errno(fs::remove_file(m.m("d")), libc::EISDIR, "unlink of a dir");
    // A new file under the old name is a new file.
    fs::write(m.m("f"), b"new").unwrap();
    assert_eq!(read(&m.m("f")), b"new");
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn rename() {
    let m = Mounted::new();
    fs::write(m.m("a"), b"A").unwrap();
    let ino_a = ino(&m.b("a"));
    fs::rename(m.m("a"), m.m("b")).unwrap();
    assert_errno(
        fs::symlink_metadata(m.m("a")),
        libc::ENOENT,
        "old name after rename",
    );
    assert_eq!(read(&m.m("b")), b"A");
    assert_eq!(ino(&m.m("b")), ino_a);

    fs::create_dir(m.m("d")).unwrap();
    fs::rename(m.m("b"), m.m("d/b")).unwrap();
    assert_eq!(read(&m.m("d/b")), b"A");

    // Over an existing file: the target is replaced atomically.
    fs::write(m.m("c"), b"CCCC").unwrap();
    let old_c = File::open(m.m("c")).unwrap();
    fs::rename(m.m("d/b"), m.m("c")).unwrap();
    assert_eq!(read(&m.m("c")), b"A");
    assert_eq!(ino(&m.m("c")), ino_a);
    assert_eq!(read(&m.b("c")), b"A");
    // The replaced file lives on through its open handle.
    assert_eq!(read_at(&old_c, 0, 4), b"CCCC");
    drop(old_c);

    // Directories with contents.
    fs::create_dir_all(m.m("x/y")).unwrap();
    fs::write(m.m("x/y/f"), b"deep").unwrap();
    fs::rename(m.m("x"), m.m("z")).unwrap();
    assert_eq!(read(&m.m("z/y/f")), b"deep");
    assert_errno(
        fs::symlink_metadata(m.m("x/y/f")),
        libc::ENOENT,
        "old path after dir rename",
    );
    // Over an empty dir.
    fs::create_dir(m.m("e")).unwrap();
    fs::rename(m.m("z"), m.m("e")).unwrap();
    assert_eq!(read(&m.m("e/y/f")), b"deep");
    // Over a non-empty dir, a file over a dir, a dir over a file, a dir into itself.
    fs::create_dir(m.m("n")).unwrap();
    fs::write(m.m("n/f"), b"").unwrap();
    assert_errno(
        fs::rename(m.m("e"), m.m("n")),
        libc::ENOTEMPTY,
        "dir over non-empty dir",
    );
    assert_errno(
        fs::rename(m.m("c"), m.m("n")),
        libc::EISDIR,
        "file over dir",
    );
    assert_errno(
        fs::rename(m.m("n"), m.m("c")),
        libc::ENOTDIR,
        "dir over file",
    );
    assert_errno(
        fs::rename(m.m("e"), m.m("e/y/sub")),
        libc::EINVAL,
        "dir into itself",
    );
    assert_errno(
        fs::rename(m.m("missing"), m.m("q")),
        libc::ENOENT,
        "missing source",
    );
    // Onto itself: nothing happens.
    fs::rename(m.m("c"), m.m("c")).unwrap();
    assert_eq!(read(&m.m("c")), b"A");
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn rename_noreplace() {
    let m = Mounted::new();
    fs::write(m.m("a"), b"A").unwrap();
    fs::write(m.m("b"), b"B").unwrap();
    assert_errno(
        renameat2(&m.m("a"), &m.m("b"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE onto an existing file",
    );
    assert_eq!(read(&m.m("a")), b"A");
    assert_eq!(read(&m.m("b")), b"B");
    renameat2(&m.m("a"), &m.m("c"), libc::RENAME_NOREPLACE).unwrap();
    assert_errno(
        fs::symlink_metadata(m.m("a")),
        libc::ENOENT,
        "source after rename",
    );
    assert_eq!(read(&m.m("c")), b"A");
    assert_eq!(read(&m.b("c")), b"A");
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn rename_exchange() {
    let m = Mounted::new();
    fs::write(m.m("a"), b"AAA").unwrap();
    fs::write(m.m("b"), b"B").unwrap();
    fs::create_dir(m.m("d")).unwrap();
    fs::write(m.m("d/inner"), b"in").unwrap();
    let (ino_a, ino_b) = (ino(&m.m("a")), ino(&m.m("b")));
    renameat2(&m.m("a"), &m.m("b"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(read(&m.m("a")), b"B");
    assert_eq!(read(&m.m("b")), b"AAA");
    assert_eq!((ino(&m.m("a")), ino(&m.m("b"))), (ino_b, ino_a));
    assert_eq!(read(&m.b("a")), b"B");
    assert_eq!(read(&m.b("b")), b"AAA");
    assert_eq!(md(&m.m("a")).len(), 1);

    // A file and a directory trade places.
    renameat2(&m.m("a"), &m.m("d"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(read(&m.m("d")), b"B");
    assert_eq!(read(&m.m("a/inner")), b"in");
    assert_errno(
        renameat2(&m.m("a"), &m.m("missing"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with a missing target",
    );
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn hard_links() {
    let m = Mounted::new();
    fs::write(m.m("a"), b"one").unwrap();
    fs::create_dir(m.m("d")).unwrap();
    fs::hard_link(m.m("a"), m.m("d/b")).unwrap();
    let (ma, mb) = (md(&m.m("a")), md(&m.m("d/b")));
    assert_eq!(ma.ino(), mb.ino(), "both names show the same inode");
    assert_eq!(ma.ino(), ino(&m.b("a")), "the inode is the backing file's");
    assert_eq!((ma.nlink(), mb.nlink()), (2, 2));
    assert_eq!(md(&m.b("a")).nlink(), 2);

    // Data written through one name is seen through the other, also by a handle opened and
    // read before the write.
    let reader = File::open(m.m("a")).unwrap();
    assert_eq!(read_at(&reader, 0, 3), b"one");
    let w = OpenOptions::new().write(true).open(m.m("d/b")).unwrap();
    w.write_all_at(b"two", 0).unwrap();
    w.sync_all().unwrap();
    drop(w);
    assert_eq!(
        read_at(&reader, 0, 3),
        b"two",
        "stale read through the first name"
    );
    assert_eq!(read(&m.m("a")), b"two");
    drop(reader);

    assert_errno(
        fs::hard_link(m.m("a"), m.m("d/b")),
        libc::EEXIST,
        "link onto an existing name",
    );
    assert_errno(
        fs::hard_link(m.m("d"), m.m("d2")),
        libc::EPERM,
        "link of a directory",
    );
    assert_errno(
        fs::hard_link(m.m("missing"), m.m("x")),
        libc::ENOENT,
        "link of a missing file",
    );
    assert_same_tree(&m.mnt, &m.backing);

    fs::remove_file(m.m("a")).unwrap();
    assert_eq!(md(&m.m("d/b")).nlink(), 1);
    assert_eq!(read(&m.m("d/b")), b"two");
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn symlink_readlink() {
    let m = Mounted::new();
    fs::write(m.m("t"), b"T").unwrap();
    fs::create_dir(m.m("d")).unwrap();
    symlink("t", m.m("rel")).unwrap();
    symlink("../t", m.m("d/up")).unwrap();
    symlink("/nonexistent/abs", m.m("abs")).unwrap();
    let long_target = "x/".repeat(2000) + "end"; // 4003 bytes
    symlink(&long_target, m.m("long")).unwrap();

    assert_eq!(fs::read_link(m.m("rel")).unwrap(), Path::new("t"));
    assert_eq!(fs::read_link(m.m("d/up")).unwrap(), Path::new("../t"));
    assert_eq!(
        fs::read_link(m.m("abs")).unwrap(),
        Path::new("/nonexistent/abs")
    );
    assert_eq!(fs::read_link(m.m("long")).unwrap(), Path::new(&long_target));
    assert_eq!(fs::read_link(m.b("long")).unwrap(), Path::new(&long_target));
    let l = md(&m.m("rel"));
    assert!(l.file_type().is_symlink());
    assert_eq!(l.len(), 1, "a symlink's size is its target's length");
    // The kernel follows relative links inside the mount.
    assert_eq!(read(&m.m("rel")), b"T");
    assert_eq!(read(&m.m("d/up")), b"T");
    assert_errno(
        fs::metadata(m.m("abs")),
        libc::ENOENT,
        "stat through a dangling link",
    );
    assert_errno(
        symlink("x", m.m("rel")),
        libc::EEXIST,
        "symlink onto an existing name",
    );
    assert_errno(fs::read_link(m.m("t")), libc::EINVAL, "readlink of a file");
    // Writing through a symlink writes the target.
    fs::write(m.m("rel"), b"via link").unwrap();
    assert_eq!(read(&m.b("t")), b"via link");
    assert!(md(&m.b("rel")).file_type().is_symlink());
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn mknod_fifo_socket_device() {
    let m = Mounted::new();
    let fifo = m.m("fifo");
    check(unsafe { libc::mkfifo(cstr(&fifo).as_ptr(), 0o640) }).unwrap();
    assert_eq!(Kind::of_mode(md(&fifo).mode()), Kind::Fifo);
    assert_eq!(Kind::of_mode(md(&m.b("fifo")).mode()), Kind::Fifo);
    assert_eq!(perm(&fifo), 0o640 & !current_umask());
    // A FIFO in the mount works as a FIFO (non-blocking opens: nothing can hang here).
    let mut reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut writer = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    writer.write_all(b"through the fifo").unwrap();
    let mut buf = [0u8; 64];
    let n = reader.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"through the fifo");
    drop((reader, writer));

    // A unix socket bound in the mount: a socket node in the backing dir, and connectable
    // through the mount.
    let listener = UnixListener::bind(m.m("sock")).unwrap();
    assert_eq!(Kind::of_mode(md(&m.m("sock")).mode()), Kind::Socket);
    assert_eq!(Kind::of_mode(md(&m.b("sock")).mode()), Kind::Socket);
    let mut client = UnixStream::connect(m.m("sock")).expect("connect to a socket in the mount");
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    drop((client, server, listener));

    // mknod of a regular file and (as root) of a character device.
    check(unsafe { libc::mknod(cstr(&m.m("reg")).as_ptr(), libc::S_IFREG | 0o600, 0) }).unwrap();
    assert!(md(&m.b("reg")).is_file());
    if nix::unistd::geteuid().is_root() {
        let dev = libc::makedev(1, 3);
        check(unsafe { libc::mknod(cstr(&m.m("null")).as_ptr(), libc::S_IFCHR | 0o600, dev) })
            .unwrap();
        assert_eq!(Kind::of_mode(md(&m.b("null")).mode()), Kind::CharDev);
        assert_eq!(md(&m.b("null")).rdev(), dev);
        assert_eq!(md(&m.m("null")).rdev(), dev);
    } else {
        eprintln!("mknod of a device node skipped: needs root");
    }
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn chmod_chown_utimens() {
    let m = Mounted::new();
    let p = m.m("f");
    fs::write(&p, b"x").unwrap();
    for mode in [0o600, 0o755, 0o4755, 0o2711, 0o1644, 0o000, 0o7777] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(perm(&p), mode, "mode through the mount");
        assert_eq!(perm(&m.b("f")), mode, "mode in the backing dir");
    }
    fs::create_dir(m.m("d")).unwrap();
    fs::set_permissions(m.m("d"), fs::Permissions::from_mode(0o1777)).unwrap();
    assert_eq!(perm(&m.b("d")), 0o1777);

    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
        assert_eq!((md(&p).uid(), md(&p).gid()), (1234, 5678));
        assert_eq!((md(&m.b("f")).uid(), md(&m.b("f")).gid()), (1234, 5678));
        std::os::unix::fs::chown(&p, None, Some(42)).unwrap();
        assert_eq!((md(&m.b("f")).uid(), md(&m.b("f")).gid()), (1234, 42));
        symlink("f", m.m("l")).unwrap();
        std::os::unix::fs::lchown(m.m("l"), Some(7), Some(8)).unwrap();
        assert_eq!((md(&m.b("l")).uid(), md(&m.b("l")).gid()), (7, 8));
        assert_eq!(md(&m.b("f")).uid(), 1234, "lchown followed the link");

        // chown of a setuid/setgid executable clears those bits, as on a local file system.
        let local = m.dir().join("local");
        fs::write(&local, b"x").unwrap();
        for q in [&p, &local] {
            fs::set_permissions(q, fs::Permissions::from_mode(0o6755)).unwrap();
            std::os::unix::fs::chown(q, Some(1000), Some(1000)).unwrap();
        }
        assert_eq!(perm(&p), perm(&local), "mode after chown of a setuid file");
        assert_eq!(perm(&m.b("f")), perm(&local));
    } else {
        eprintln!("chown part skipped: needs root");
    }

    // Exact nanoseconds.
    utimensat(
        &p,
        ts(1_000_000_000, 123_456_789),
        ts(1_100_000_000, 987_654_321),
        0,
    )
    .unwrap();
    for q in [&p, &m.b("f")] {
        let s = md(q);
        assert_eq!(
            (s.atime(), s.atime_nsec()),
            (1_000_000_000, 123_456_789),
            "{q:?} atime"
        );
        assert_eq!(
            (s.mtime(), s.mtime_nsec()),
            (1_100_000_000, 987_654_321),
            "{q:?} mtime"
        );
    }
    // UTIME_OMIT keeps mtime.
    utimensat(&p, ts(1_200_000_000, 5), ts(0, libc::UTIME_OMIT), 0).unwrap();
    for q in [&p, &m.b("f")] {
        let s = md(q);
        assert_eq!(
            (s.atime(), s.atime_nsec()),
            (1_200_000_000, 5),
            "{q:?} atime"
        );
        assert_eq!(
            (s.mtime(), s.mtime_nsec()),
            (1_100_000_000, 987_654_321),
            "{q:?} mtime"
        );
    }
    // UTIME_NOW.
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    utimensat(&p, ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW), 0).unwrap();
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let s = md(&p);
    assert!(
        (before - 1..=after + 1).contains(&s.mtime()),
        "UTIME_NOW gave mtime {} (now is {before}..{after})",
        s.mtime()
    );
    assert_eq!(
        (s.atime(), s.atime_nsec()),
        (1_200_000_000, 5),
        "atime after UTIME_OMIT"
    );
    // On a symlink itself.
    symlink("f", m.m("l2")).unwrap();
    utimensat(&m.m("l2"), ts(5, 6), ts(7, 8), libc::AT_SYMLINK_NOFOLLOW).unwrap();
    assert_eq!(
        (md(&m.b("l2")).mtime(), md(&m.b("l2")).mtime_nsec()),
        (7, 8)
    );
    assert_ne!(
        md(&m.b("f")).mtime(),
        7,
        "AT_SYMLINK_NOFOLLOW followed the link"
    );
    // futimens on an open handle.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    let t = UNIX_EPOCH + Duration::new(1_300_000_000, 42);
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
    drop(f);
    assert_eq!(
        (md(&m.b("f")).mtime(), md(&m.b("f")).mtime_nsec()),
        (1_300_000_000, 42)
    );
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn xattrs_user_namespace() {
    let m = Mounted::new();
    let p = m.m("f");
    fs::write(&p, b"x").unwrap();
    fs::create_dir(m.m("d")).unwrap();

    set_xattr(&p, "user.a", b"hello", 0).unwrap();
    assert_eq!(get_xattr(&p, "user.a").unwrap(), b"hello");
    assert_eq!(get_xattr(&m.b("f"), "user.a").unwrap(), b"hello");
    let binary: Vec<u8> = (0..=255u8).chain(0..=255).collect();
    set_xattr(&p, "user.bin", &binary, 0).unwrap();
    set_xattr(&p, "user.empty", b"", 0).unwrap();
    assert_eq!(get_xattr(&p, "user.bin").unwrap(), binary);
    assert_eq!(get_xattr(&p, "user.empty").unwrap(), b"");
    assert_eq!(
        list_xattrs(&p).unwrap(),
        vec![
            b"user.a".to_vec(),
            b"user.bin".to_vec(),
            b"user.empty".to_vec()
        ]
    );
    assert_eq!(xattrs(&p), xattrs(&m.b("f")));

    assert_errno(
        set_xattr(&p, "user.a", b"again", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE of an existing attribute",
    );
    assert_errno(
        set_xattr(&p, "user.none", b"v", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE of a missing attribute",
    );
    set_xattr(&p, "user.a", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_eq!(get_xattr(&m.b("f"), "user.a").unwrap(), b"replaced");
    assert_errno(
        get_xattr(&p, "user.none"),
        libc::ENODATA,
        "getxattr of a missing attribute",
    );

    // A buffer that is too small gives ERANGE.
    let mut small = [0u8; 2];
    let ret = unsafe {
        libc::lgetxattr(
            cstr(&p).as_ptr(),
            c"user.a".as_ptr(),
            small.as_mut_ptr().cast(),
            small.len(),
        )
    };
    assert_eq!(ret, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ERANGE)
    );

    remove_xattr(&p, "user.a").unwrap();
    assert_errno(
        get_xattr(&p, "user.a"),
        libc::ENODATA,
        "getxattr after removexattr",
    );
    assert_errno(
        get_xattr(&m.b("f"), "user.a"),
        libc::ENODATA,
        "backing after removexattr",
    );
    assert_errno(
        remove_xattr(&p, "user.a"),
        libc::ENODATA,
        "removexattr of a missing one",
    );

    set_xattr(&m.m("d"), "user.dir", b"on a dir", 0).unwrap();
    assert_eq!(get_xattr(&m.b("d"), "user.dir").unwrap(), b"on a dir");
    assert_errno(
        get_xattr(&m.m("missing"), "user.a"),
        libc::ENOENT,
        "getxattr of a missing file",
    );
    assert_same_tree(&m.mnt, &m.backing);
}

fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) }).map(drop)
}

fn lseek(f: &File, offset: u64, whence: i32) -> std::io::Result<u64> {
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as i64, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[test]
fn fallocate_keep_size_and_punch_hole() {
    let m = Mounted::new();
    let p = m.m("f");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 0, MIB).unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0, "KEEP_SIZE changed the size");
    assert_eq!(md(&m.b("f")).len(), 0);
    assert!(
        md(&m.b("f")).blocks() >= 2048,
        "1 MiB not allocated in the backing file"
    );
    assert_eq!(
        md(&p).blocks(),
        md(&m.b("f")).blocks(),
        "st_blocks through the mount"
    );

    fallocate(&f, 0, 0, 2 * MIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 2 * MIB);
    assert_eq!(md(&m.b("f")).len(), 2 * MIB);

    let data = pattern(MIB as usize, 11);
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    let blocks_before = md(&m.b("f")).blocks();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        256 * KIB,
        256 * KIB,
    )
    .unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        2 * MIB,
        "punching a hole changed the size"
    );
    let blocks_after = md(&m.b("f")).blocks();
    assert!(
        blocks_after + 512 <= blocks_before,
        "st_blocks went from {blocks_before} to {blocks_after}: the hole was not punched"
    );
    assert_eq!(md(&p).blocks(), blocks_after, "st_blocks through the mount");
    let mut expected = data.clone();
    expected[256 * KIB as usize..512 * KIB as usize].fill(0);
    expected.resize(2 * MIB as usize, 0);
    assert!(
        read_at(&f, 0, 2 * MIB as usize) == expected,
        "content through the same handle"
    );
    assert!(read(&p) == expected, "content through a new handle");
    assert!(read(&m.b("f")) == expected, "content in the backing dir");

    // SEEK_HOLE / SEEK_DATA see the hole, through the mount as in the backing dir.
    let b = File::open(m.b("f")).unwrap();
    assert_eq!(
        lseek(&b, 0, libc::SEEK_HOLE).unwrap(),
        256 * KIB,
        "backing SEEK_HOLE"
    );
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE).unwrap(),
        256 * KIB,
        "SEEK_HOLE through the mount"
    );
    assert_eq!(
        lseek(&f, 256 * KIB, libc::SEEK_DATA).unwrap(),
        512 * KIB,
        "SEEK_DATA"
    );
    assert_errno(
        lseek(&f, 3 * MIB, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA past the end",
    );
    drop((f, b));
    assert_same_node(&p, &m.b("f"));
}

fn statvfs(path: &Path) -> libc::statvfs {
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(cstr(path).as_ptr(), &mut s) }).unwrap();
    s
}

#[test]
fn statfs() {
    let m = Mounted::new();
    let (a, b) = (statvfs(&m.mnt), statvfs(&m.backing));
    assert_eq!(
        a.f_blocks * a.f_frsize,
        b.f_blocks * b.f_frsize,
        "total size"
    );
    assert_eq!(a.f_files, b.f_files, "total inodes");
    assert_eq!(a.f_namemax, b.f_namemax, "name length limit");
    assert_eq!(a.f_namemax, 255);
    let (free_a, free_b) = (a.f_bavail * a.f_frsize, b.f_bavail * b.f_frsize);
    assert!(
        free_a.abs_diff(free_b) <= free_b / 20 + 64 * MIB,
        "available space {free_a} vs {free_b}"
    );
    assert!(a.f_bsize > 0 && a.f_frsize > 0);
}

fn access(path: &Path, mode: i32) -> std::io::Result<()> {
    check(unsafe { libc::access(cstr(path).as_ptr(), mode) }).map(drop)
}

#[test]
fn access_checks() {
    let m = Mounted::new();
    let p = m.m("f");
    fs::write(&p, b"x").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    access(&p, libc::F_OK).unwrap();
    access(&p, libc::R_OK | libc::W_OK).unwrap();
    if nix::unistd::geteuid().is_root() {
        // Even root needs an execute bit somewhere to pass X_OK.
        assert_errno(
            access(&p, libc::X_OK),
            libc::EACCES,
            "X_OK on a 0644 file as root",
        );
    }
    fs::set_permissions(&p, fs::Permissions::from_mode(0o744)).unwrap();
    access(&p, libc::X_OK).unwrap();
    access(&m.mnt, libc::X_OK | libc::R_OK).unwrap();
    assert_errno(
        access(&m.m("missing"), libc::F_OK),
        libc::ENOENT,
        "access of a missing file",
    );
    assert_errno(
        access(&m.m("f/x"), libc::F_OK),
        libc::ENOTDIR,
        "access below a file",
    );
}

type Check<'a> = (&'static str, Box<dyn Fn() -> i32 + 'a>);

/// In a forked child, switches to uid/gid 65534 and reports one errno (0 = success) per check.
fn as_nobody(checks: &[Check<'_>]) -> Vec<i32> {
    let (rd, wr) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only makes raw syscalls and calls the (allocation-free) checks, then
    // _exit()s; it touches no lock another thread of this process might hold.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => unsafe {
            let fd = wr.as_raw_fd();
            let ok = libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
                && libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534) == 0
                && libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) == 0;
            if !ok {
                libc::_exit(100);
            }
            for (_, c) in checks {
                let e: i32 = c();
                libc::write(fd, (&e as *const i32).cast(), 4);
            }
            libc::_exit(0);
        },
        pid => {
            drop(wr);
            let mut out = Vec::new();
            File::from(rd).read_to_end(&mut out).unwrap();
            let mut status = 0;
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "child running as uid 65534 failed (wait status {status:#x})"
            );
            out.chunks(4)
                .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
                .collect()
        }
    }
}

fn open_errno(path: &std::ffi::CStr, flags: i32) -> i32 {
    let fd = unsafe { libc::open(path.as_ptr(), flags, 0o644) };
    if fd < 0 {
        unsafe { *libc::__errno_location() }
    } else {
        unsafe { libc::close(fd) };
        0
    }
}

fn syscall_errno(ret: libc::c_int) -> i32 {
    if ret < 0 {
        unsafe { *libc::__errno_location() }
    } else {
        0
    }
}

#[test]
fn errno_passthrough() {
    let m = Mounted::new();
    fs::write(m.m("f"), b"x").unwrap();
    fs::create_dir(m.m("d")).unwrap();
    assert_errno(
        File::open(m.m("missing")),
        libc::ENOENT,
        "open of a missing file",
    );
    assert_errno(File::open(m.m("f/x")), libc::ENOTDIR, "open below a file");
    assert_errno(
        OpenOptions::new().write(true).open(m.m("d")),
        libc::EISDIR,
        "open of a dir for writing",
    );
    assert_errno(fs::read_dir(m.m("f")), libc::ENOTDIR, "opendir of a file");
    assert_errno(
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(m.m("f")),
        libc::ENOTDIR,
        "O_DIRECTORY on a file",
    );
    assert_errno(
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open({
                symlink("f", m.m("l")).unwrap();
                m.m("l")
            }),
        libc::ELOOP,
        "O_NOFOLLOW on a symlink",
    );

    if !nix::unistd::geteuid().is_root() {
        eprintln!("EACCES part of errno_passthrough skipped: needs root to switch to another uid");
        return;
    }
    // As uid 65534: a 0600 root file is unreadable, a 0644 one readable but not writable, a
    // root-owned 0755 dir is not writable, and a 0777 dir lets the user create its own files.
    fs::write(m.m("private"), b"secret").unwrap();
    fs::set_permissions(m.m("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.m("public"), b"hello").unwrap();
    fs::set_permissions(m.m("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(m.m("open")).unwrap();
    fs::set_permissions(m.m("open"), fs::Permissions::from_mode(0o777)).unwrap();
    let (root, private, public, new_in_d, mine, unlink_f) = (
        cstr(&m.mnt),
        cstr(&m.m("private")),
        cstr(&m.m("public")),
        cstr(&m.m("d/new")),
        cstr(&m.m("open/mine")),
        cstr(&m.m("f")),
    );
    let checks: Vec<Check<'_>> = vec![
        (
            "stat of the mount root",
            Box::new(|| {
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                syscall_errno(unsafe { libc::stat(root.as_ptr(), &mut st) })
            }),
        ),
        (
            "read a 0600 root file",
            Box::new(|| open_errno(&private, libc::O_RDONLY)),
        ),
        (
            "read a 0644 root file",
            Box::new(|| open_errno(&public, libc::O_RDONLY)),
        ),
        (
            "write a 0644 root file",
            Box::new(|| open_errno(&public, libc::O_WRONLY)),
        ),
        (
            "create in a 0755 root dir",
            Box::new(|| open_errno(&new_in_d, libc::O_WRONLY | libc::O_CREAT)),
        ),
        (
            "unlink in a 0755 root dir",
            Box::new(|| syscall_errno(unsafe { libc::unlink(unlink_f.as_ptr()) })),
        ),
        (
            "create in a 0777 dir",
            Box::new(|| open_errno(&mine, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)),
        ),
    ];
    let got = as_nobody(&checks);
    let expected = [
        0,
        libc::EACCES,
        0,
        libc::EACCES,
        libc::EACCES,
        libc::EACCES,
        0,
    ];
    let report: Vec<String> = checks
        .iter()
        .zip(got.iter().zip(expected))
        .map(|((what, _), (g, e))| format!("{what}: got {}, expected {}", name(*g), name(e)))
        .collect();
    assert_eq!(
        got,
        expected,
        "as uid 65534 through the mount:\n{}",
        report.join("\n")
    );
    assert!(m.b("f").exists(), "the unprivileged unlink went through");
    let mine = md(&m.b("open/mine"));
    assert_eq!(
        (mine.uid(), mine.gid()),
        (65534, 65534),
        "owner of a file the user created"
    );
}

fn name(errno: i32) -> String {
    if errno == 0 {
        "success".into()
    } else {
        errno_name(errno)
    }
}

#[test]
fn sparse_1gib_file() {
    let m = Mounted::new();
    let p = m.m("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(GIB).unwrap();
    let tail = pattern(4096, 21);
    f.write_all_at(&tail, GIB - 4096).unwrap();
    f.sync_all().unwrap();
    for q in [&p, &m.b("sparse")] {
        let s = md(q);
        assert_eq!(s.len(), GIB, "{q:?} size");
        assert!(
            s.blocks() < 2048,
            "{q:?} has {} blocks: not sparse",
            s.blocks()
        );
    }
    let g = File::open(&p).unwrap();
    assert!(
        read_at(&g, 512 * MIB, 65536).iter().all(|b| *b == 0),
        "a hole reads as zeros"
    );
    assert_eq!(read_at(&g, GIB - 4096, 4096), tail);
    assert_eq!(
        read_at(&File::open(m.b("sparse")).unwrap(), GIB - 4096, 4096),
        tail
    );
    drop((f, g));
    assert_eq!(md(&p).blocks(), md(&m.b("sparse")).blocks());
}

#[test]
fn sparse_file_over_4gib() {
    let m = Mounted::new();
    let p = m.m("big");
    let f = File::create(&p).unwrap();
    let a = pattern(8192, 31);
    let b = pattern(100, 32);
    f.write_all_at(&a, 5 * GIB).unwrap();
    f.write_all_at(&b, 4 * GIB + 100).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(md(&p).len(), 5 * GIB + 8192);
    assert_eq!(md(&m.b("big")).len(), 5 * GIB + 8192);
    let g = File::open(&p).unwrap();
    assert_eq!(read_at(&g, 5 * GIB, 8192), a);
    assert_eq!(read_at(&g, 4 * GIB + 100, 100), b);
    assert!(read_at(&g, 4 * GIB, 100).iter().all(|x| *x == 0));
    let h = File::open(m.b("big")).unwrap();
    assert_eq!(read_at(&h, 5 * GIB, 8192), a);
    assert_eq!(read_at(&h, 4 * GIB + 100, 100), b);
}

#[test]
fn name_length_limits() {
    let m = Mounted::new();
    let n255 = "n".repeat(250) + "12345";
    let n255b = "m".repeat(255);
    let n256 = "n".repeat(256);
    assert_eq!(n255.len(), 255);
    fs::write(m.m(&n255), b"long name").unwrap();
    assert_eq!(read(&m.m(&n255)), b"long name");
    assert_eq!(read(&m.b(&n255)), b"long name");
    fs::create_dir(m.m(&n255b)).unwrap();
    fs::rename(m.m(&n255), m.m(&n255b).join(&n255b)).unwrap();
    assert_eq!(names(&m.m(&n255b)), vec![n255b.clone()]);
    assert_eq!(names(&m.mnt), vec![n255b.clone()]);
    symlink(&n255b, m.m("link")).unwrap();

    let too_long = m.m(&n256);
    assert_errno(
        File::create(&too_long),
        libc::ENAMETOOLONG,
        "create with a 256-byte name",
    );
    assert_errno(
        fs::create_dir(&too_long),
        libc::ENAMETOOLONG,
        "mkdir with a 256-byte name",
    );
    assert_errno(
        fs::symlink_metadata(&too_long),
        libc::ENAMETOOLONG,
        "lstat of a 256-byte name",
    );
    assert_errno(
        symlink("x", &too_long),
        libc::ENAMETOOLONG,
        "symlink with a 256-byte name",
    );
    assert_errno(
        fs::rename(m.m("link"), &too_long),
        libc::ENAMETOOLONG,
        "rename to a 256-byte name",
    );
    assert_errno(
        fs::hard_link(m.m(&n255b).join(&n255b), &too_long),
        libc::ENAMETOOLONG,
        "link to a 256-byte name",
    );
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn unlinked_open_file() {
    let m = Mounted::new();
    let p = m.m("u");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"hello", 0).unwrap();
    fs::remove_file(&p).unwrap();
    assert_errno(fs::symlink_metadata(&p), libc::ENOENT, "lstat after unlink");
    assert_eq!(
        f.metadata().unwrap().nlink(),
        0,
        "fstat nlink of an unlinked file"
    );
    f.write_all_at(b" world", 5).unwrap();
    assert_eq!(read_at(&f, 0, 11), b"hello world");
    assert_eq!(f.metadata().unwrap().len(), 11);

    // A new file under the same name is independent of the open one.
    fs::write(&p, b"new").unwrap();
    assert_eq!(read_at(&f, 0, 11), b"hello world");
    f.set_len(3).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 3);
    assert_eq!(read(&p), b"new");
    f.sync_all().unwrap();
    // No hidden placeholder names appear.
    assert_eq!(names(&m.mnt), vec!["u".to_string()]);
    assert_eq!(names(&m.backing), vec!["u".to_string()]);
    drop(f);
    assert_eq!(names(&m.mnt), vec!["u".to_string()]);
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn stat_ino_matches_backing() {
    let m = Mounted::with_backing(|b| {
        fs::create_dir_all(b.join("d/e")).unwrap();
        fs::write(b.join("d/e/f"), b"x").unwrap();
        fs::write(b.join("g"), b"y").unwrap();
        symlink("g", b.join("l")).unwrap();
    });
    for rel in ["d", "d/e", "d/e/f", "g", "l"] {
        assert_eq!(ino(&m.m(rel)), ino(&m.b(rel)), "st_ino of {rel:?}");
    }
    fs::write(m.m("new"), b"z").unwrap();
    fs::rename(m.m("d/e/f"), m.m("moved")).unwrap();
    for rel in ["new", "moved"] {
        assert_eq!(ino(&m.m(rel)), ino(&m.b(rel)), "st_ino of {rel:?}");
    }
    assert_same_tree(&m.mnt, &m.backing);
}

#[test]
fn root_ino_matches_backing() {
    let m = Mounted::new();
    assert_eq!(
        ino(&m.mnt),
        ino(&m.backing),
        "st_ino of the mount root (FUSE node id 1) should be the backing root's"
    );
}

#[test]
fn readdir_d_ino_and_type_match_backing() {
    let m = Mounted::with_backing(|b| {
        fs::create_dir(b.join("d")).unwrap();
        fs::write(b.join("f"), b"x").unwrap();
        symlink("f", b.join("l")).unwrap();
    });
    let entries = |dir: &Path| -> Vec<(String, u64, bool, bool)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                use std::os::unix::fs::DirEntryExt;
                (
                    e.file_name().into_string().unwrap(),
                    e.ino(),
                    t.is_dir(),
                    t.is_symlink(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(entries(&m.mnt), entries(&m.backing));
}

#[test]
fn stat_right_after_close() {
    // The kernel releases a handle asynchronously after close(2); a stat racing with that
    // release must still succeed.
    let m = Mounted::new();
    let mut failures = Vec::new();
    for i in 0..1000 {
        let (a, b) = (m.m(format!("a{i}")), m.m(format!("b{i}")));
        fs::write(&a, b"A").unwrap();
        if let Err(e) = fs::symlink_metadata(&a) {
            failures.push(format!("lstat a{i} after write+close: {e}"));
        }
        fs::rename(&a, &b).unwrap();
        let _ = read(&b);
        if let Err(e) = fs::symlink_metadata(&b) {
            failures.push(format!("lstat b{i} after read+close: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 2000 stats failed: {failures:?}",
        failures.len()
    );
}

#[test]
fn readdir_large_directory() {
    let m = Mounted::new();
    fs::create_dir(m.m("many")).unwrap();
    let mut expected = Vec::new();
    for i in 0..2000 {
        let name = format!("file-{i:05}-{}", "x".repeat(i % 100));
        File::create(m.m("many").join(&name)).unwrap();
        expected.push(name);
    }
    expected.sort();
    assert_eq!(names(&m.m("many")), expected);
    assert_eq!(names(&m.b("many")), expected);
    for name in expected.iter().step_by(2) {
        fs::remove_file(m.m("many").join(name)).unwrap();
    }
    let left: Vec<String> = expected.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(names(&m.m("many")), left);
    assert_eq!(names(&m.b("many")), left);
}

#[test]
fn unlink_while_reading_dir() {
    // What `rm -rf` does: unlink each entry as readdir returns it, in one pass over the
    // directory. Every entry must be returned exactly once even as the directory shrinks.
    let m = Mounted::with_backing(|b| {
        fs::create_dir(b.join("big")).unwrap();
        for i in 0..1500 {
            fs::write(b.join("big").join(format!("entry-{i}")), b"").unwrap();
        }
    });
    let mut seen = std::collections::BTreeSet::new();
    for entry in fs::read_dir(m.m("big")).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(seen.insert(name.clone()), "readdir returned {name:?} twice");
        fs::remove_file(m.m("big").join(&name)).unwrap();
    }
    assert_eq!(
        seen.len(),
        1500,
        "readdir missed entries while they were being unlinked"
    );
    assert_eq!(names(&m.m("big")), Vec::<String>::new());
    fs::remove_dir(m.m("big")).unwrap();
    assert!(!m.b("big").exists());
}

#[test]
fn mmap_shared_write_and_read() {
    let m = Mounted::new();
    let p = m.m("mapped");
    let len = 3 * 4096 + 100;
    let original = pattern(len, 41);
    fs::write(&p, &original).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    // SAFETY: a fresh shared mapping of `len` bytes of a file of that size; it is unmapped
    // below and not used after.
    let map = unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len)
    };
    assert!(map[..] == original[..], "mapped content differs");
    map[5000..5010].copy_from_slice(b"MAPPEDXXXX");
    map[len - 1] = b'!';
    check(unsafe { libc::msync(map.as_mut_ptr().cast(), len, libc::MS_SYNC) }).unwrap();
    check(unsafe { libc::munmap(map.as_mut_ptr().cast(), len) }).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut expected = splice(original, 5000, b"MAPPEDXXXX");
    expected[len - 1] = b'!';
    assert!(
        read(&p) == expected,
        "content through the mount after msync"
    );
    assert!(
        read(&m.b("mapped")) == expected,
        "backing content after msync"
    );
}

#[test]
fn copy_file_range_within_the_mount() {
    let m = Mounted::new();
    let data = pattern(300_000, 43);
    fs::write(m.m("src"), &data).unwrap();
    let src = File::open(m.m("src")).unwrap();
    let dst = File::create(m.m("dst")).unwrap();
    let (mut off_in, mut off_out): (i64, i64) = (1000, 0);
    let mut left = 200_000usize;
    while left > 0 {
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        assert!(
            n > 0,
            "copy_file_range: {n} {}",
            std::io::Error::last_os_error()
        );
        left -= n as usize;
    }
    dst.sync_all().unwrap();
    drop((src, dst));
    assert_eq!(read(&m.m("dst")), data[1000..201_000]);
    assert_eq!(read(&m.b("dst")), data[1000..201_000]);
}

#[test]
fn exec_from_the_mount() {
    let m = Mounted::new();
    fs::copy("/bin/echo", m.m("echo")).unwrap();
    fs::set_permissions(m.m("echo"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.m("script.sh"), "#!/bin/sh\necho script \"$1\"\n").unwrap();
    fs::set_permissions(m.m("script.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(m.m("echo"))
        .arg("hello")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exec of a binary in the mount: {out:?}"
    );
    assert_eq!(out.stdout, b"hello\n");
    let out = std::process::Command::new(m.m("script.sh"))
        .arg("x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exec of a script in the mount: {out:?}"
    );
    assert_eq!(out.stdout, b"script x\n");
    // Writing to a binary that is running is refused (ETXTBSY), as on a local file system.
    fs::copy("/bin/sleep", m.m("sleep")).unwrap();
    fs::set_permissions(m.m("sleep"), fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = std::process::Command::new(m.m("sleep"))
        .arg("30")
        .spawn()
        .unwrap();
    let busy = OpenOptions::new().write(true).open(m.m("sleep"));
    let _ = child.kill();
    let _ = child.wait();
    assert_errno(busy, libc::ETXTBSY, "open for writing of a running binary");
}

#[test]
fn concurrent_io_does_not_stall() {
    const THREADS: usize = 8;
    let m = Mounted::new();
    let (done_tx, done_rx) = mpsc::channel::<(usize, Result<(), String>)>();
    for t in 0..THREADS {
        let dir: PathBuf = m.m(format!("t{t}"));
        // worker --result--> test thread
        let done_tx = done_tx.clone();
        thread::spawn(move || {
            let result = (|| -> std::io::Result<()> {
                fs::create_dir(&dir)?;
                for i in 0..12 {
                    let data = pattern(256 * 1024 + i * 1000, (t * 100 + i) as u64);
                    let p = dir.join(format!("f{i}"));
                    let f = File::create(&p)?;
                    for (k, chunk) in data.chunks(64 * 1024).enumerate() {
                        f.write_all_at(chunk, (k * 64 * 1024) as u64)?;
                    }
                    if i % 3 == 0 {
                        f.sync_all()?;
                    }
                    drop(f);
                    fs::rename(&p, dir.join(format!("g{i}")))?;
                    if fs::read(dir.join(format!("g{i}")))? != data {
                        return Err(std::io::Error::other(format!("t{t}/g{i}: content differs")));
                    }
                    fs::read_dir(&dir)?.count();
                }
                Ok(())
            })();
            let _ = done_tx.send((t, result.map_err(|e| e.to_string())));
        });
    }
    drop(done_tx);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut finished = Vec::new();
    while finished.len() < THREADS {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match done_rx.recv_timeout(left) {
            Ok((t, Ok(()))) => finished.push(t),
            Ok((t, Err(e))) => panic!("thread {t}: {e}"),
            Err(_) => panic!(
                "mount stalled: only threads {finished:?} of {THREADS} finished within 120 s"
            ),
        }
    }
    assert_same_tree(&m.mnt, &m.backing);
}
