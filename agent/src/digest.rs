//! `Op::Digest`: [`kmount_proto::digest`] of a directory and of its subdirectories down to a
//! depth, computed bottom-up over the whole subtree.
//!
//! Invariants:
//! - Children are read exactly as [`crate::walk`] reads them ([`crate::walk::visible_entry`]:
//!   what the ignore rules hide is left out, so the digest is over the visible entries), and
//!   a subdirectory that cannot be opened (vanished, replaced, unreadable) counts as empty, as
//!   it does in a walk: equal trees give equal digests on both ends.
//! - One directory is open at a time: a directory is listed completely and closed before any of
//!   its subdirectories is opened; the stack holds the listed children of each ancestor.

use kmount_proto::digest::{Child, dir_digest};
use kmount_proto::{DirDigest, Done, RelPath, TreeEntry};

use crate::handles::DirStream;
use crate::hide::View;
use crate::ops::Agent;
use crate::sys::Errno;
use crate::sys::SysResult;
use crate::walk::visible_entry;

struct Frame {
    path: RelPath,
    level: u32,
    children: Vec<TreeEntry>,
    /// Digest of each child that is a directory, once known.
    subdirs: Vec<Option<[u8; 16]>>,
    /// Children before this index are done.
    next: usize,
}

impl Frame {
    fn new(path: RelPath, level: u32, children: Vec<TreeEntry>) -> Frame {
        Frame {
            path,
            level,
            subdirs: vec![None; children.len()],
            children,
            next: 0,
        }
    }

    fn digest(&self) -> [u8; 16] {
        let mut kids: Vec<Child<'_>> = self
            .children
            .iter()
            .zip(&self.subdirs)
            .map(|(e, sub)| Child {
                name: last_name(&e.path),
                attr: &e.attr,
                symlink: e.symlink.as_deref(),
                subdir: *sub,
            })
            .collect();
        dir_digest(&mut kids)
    }
}

fn last_name(p: &RelPath) -> &[u8] {
    let b = p.as_bytes();
    match b.iter().rposition(|&c| c == b'/') {
        Some(i) => &b[i + 1..],
        None => b,
    }
}

/// Every entry of the directory `path` that the ignore rules leave visible.
fn list(a: &Agent, path: &RelPath, hide: &View) -> SysResult<Vec<TreeEntry>> {
    let fd = a
        .root
        .open_beneath(path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut stream = DirStream::new(fd)?;
    let mut out = Vec::new();
    while let Ok(Some(raw)) = stream.next_entry() {
        if let Some(e) = visible_entry(stream.fd(), path, &raw, hide) {
            out.push(e);
        }
    }
    Ok(out)
}

/// `Op::Digest`. Digests come sorted by path (`path` itself first).
pub fn digest(a: &Agent, path: &RelPath, depth: u32) -> SysResult<Done> {
    let hide = a.hide.view();
    if hide.hidden(path, true) {
        return Err(Errno(libc::ENOENT));
    }
    let mut out = Vec::new();
    let mut stack = vec![Frame::new(path.clone(), 0, list(a, path, &hide)?)];
    while let Some(top) = stack.last_mut() {
        // The next subdirectory of `top` still to digest.
        let pending = top.children[top.next..]
            .iter()
            .position(|e| e.attr.is_dir())
            .map(|i| top.next + i);
        if let Some(i) = pending {
            top.next = i + 1;
            let level = top.level + 1;
            let child = top.children[i].path.clone();
            match list(a, &child, &hide) {
                Ok(children) => stack.push(Frame::new(child, level, children)),
                Err(_) => top.subdirs[i] = Some(dir_digest(&mut [])),
            }
            continue;
        }
        let done = stack
            .pop()
            .expect("the loop runs while the stack is not empty");
        let d = done.digest();
        if let Some(parent) = stack.last_mut() {
            parent.subdirs[parent.next - 1] = Some(d);
        }
        if done.level <= depth {
            out.push(DirDigest {
                path: done.path,
                digest: d,
            });
        }
    }
    out.sort_unstable_by(|x, y| x.path.cmp(&y.path));
    Ok(Done::Digests(out))
}
