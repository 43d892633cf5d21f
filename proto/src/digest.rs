//! Directory digests for reconciliation: both ends compute them the same way from the same
//! data, so equal digests mean equal subtrees (as far as kmount can observe).
//!
//! The digest of a directory hashes, for each child in byte order of its name: the name, the
//! mode (type and permissions), uid, gid, inode number, and
//! - for a directory, the child's own digest (so a digest covers the whole subtree);
//! - otherwise size, mtime, ctime and the symlink target.
//!
//! Access times and the directory's own times are left out: reading a file or creating and
//! removing a temporary file must not make two equal trees look different.

use xxhash_rust::xxh3::Xxh3;

use crate::msg::Attr;

/// One child of a directory, as fed to [`dir_digest`].
#[derive(Debug, Clone)]
pub struct Child<'a> {
    pub name: &'a [u8],
    pub attr: &'a Attr,
    pub symlink: Option<&'a [u8]>,
    /// The child's digest when it is a directory.
    pub subdir: Option<[u8; 16]>,
}

/// The digest of a directory with these children (in any order; they are sorted here).
pub fn dir_digest(children: &mut [Child<'_>]) -> [u8; 16] {
    children.sort_unstable_by(|a, b| a.name.cmp(b.name));
    let mut h = Xxh3::new();
    for c in children.iter() {
        h.update(&(c.name.len() as u32).to_le_bytes());
        h.update(c.name);
        h.update(&c.attr.mode.to_le_bytes());
        h.update(&c.attr.uid.to_le_bytes());
        h.update(&c.attr.gid.to_le_bytes());
        h.update(&c.attr.ino.to_le_bytes());
        if c.attr.is_dir() {
            h.update(&c.subdir.unwrap_or([0; 16]));
        } else {
            h.update(&c.attr.size.to_le_bytes());
            h.update(&c.attr.mtime.sec.to_le_bytes());
            h.update(&c.attr.mtime.nsec.to_le_bytes());
            h.update(&c.attr.ctime.sec.to_le_bytes());
            h.update(&c.attr.ctime.nsec.to_le_bytes());
            match c.symlink {
                Some(t) => {
                    h.update(&[1]);
                    h.update(&(t.len() as u32).to_le_bytes());
                    h.update(t);
                }
                None => h.update(&[0]),
            }
        }
    }
    h.digest128().to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Timespec;

    fn attr(ino: u64, mode: u32, size: u64) -> Attr {
        Attr {
            ino,
            dev: 1,
            mode,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            size,
            blocks: 0,
            blksize: 4096,
            atime: Timespec { sec: 9, nsec: 9 },
            mtime: Timespec { sec: 1, nsec: 1 },
            ctime: Timespec { sec: 2, nsec: 2 },
        }
    }

    #[test]
    fn order_independent_and_sensitive_to_what_matters() {
        let a = attr(10, 0o100644, 5);
        let b = attr(11, 0o100644, 6);
        let d1 = dir_digest(&mut [
            Child {
                name: b"a",
                attr: &a,
                symlink: None,
                subdir: None,
            },
            Child {
                name: b"b",
                attr: &b,
                symlink: None,
                subdir: None,
            },
        ]);
        let d2 = dir_digest(&mut [
            Child {
                name: b"b",
                attr: &b,
                symlink: None,
                subdir: None,
            },
            Child {
                name: b"a",
                attr: &a,
                symlink: None,
                subdir: None,
            },
        ]);
        assert_eq!(d1, d2);
        let mut a_read = a.clone();
        a_read.atime = Timespec { sec: 100, nsec: 0 };
        let d3 = dir_digest(&mut [
            Child {
                name: b"a",
                attr: &a_read,
                symlink: None,
                subdir: None,
            },
            Child {
                name: b"b",
                attr: &b,
                symlink: None,
                subdir: None,
            },
        ]);
        assert_eq!(d1, d3, "atime must not matter");
        let mut a_written = a.clone();
        a_written.mtime.nsec += 1;
        let d4 = dir_digest(&mut [
            Child {
                name: b"a",
                attr: &a_written,
                symlink: None,
                subdir: None,
            },
            Child {
                name: b"b",
                attr: &b,
                symlink: None,
                subdir: None,
            },
        ]);
        assert_ne!(d1, d4);
        let d5 = dir_digest(&mut [Child {
            name: b"a",
            attr: &a,
            symlink: None,
            subdir: None,
        }]);
        assert_ne!(d1, d5);
    }

    #[test]
    fn subdirectory_digest_propagates() {
        let d = attr(20, 0o040755, 4096);
        let x = dir_digest(&mut [Child {
            name: b"d",
            attr: &d,
            symlink: None,
            subdir: Some([1; 16]),
        }]);
        let y = dir_digest(&mut [Child {
            name: b"d",
            attr: &d,
            symlink: None,
            subdir: Some([2; 16]),
        }]);
        assert_ne!(x, y);
        let mut d_touched = d.clone();
        d_touched.mtime.sec += 5;
        let z = dir_digest(&mut [Child {
            name: b"d",
            attr: &d_touched,
            symlink: None,
            subdir: Some([1; 16]),
        }]);
        assert_eq!(x, z, "a directory's own times do not matter");
    }
}
