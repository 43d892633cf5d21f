//! Send-time coalescing of journal records into fewer, larger operations.
//!
//! # The invariant
//! Every [`Batch`] covers a *contiguous* range of seqs `first_seq..=seq` of its input, the
//! batches cover the input exactly, in order, and applying a batch's `op` has the same effect as
//! applying the records it covers one after the other. Nothing is reordered and nothing is
//! dropped: a run only absorbs the records that immediately follow it, all naming the same path
//! with the same caller, so an operation on another path (a rename of the parent, a link, an
//! unlink) ends the run instead of moving past it.
//!
//! A batch is sent as its operation under its first seq, then a no-op (`Ping`) under each later
//! seq it covers (the agent takes seqs one after the other; see `sender::send_batch`). The
//! agent skips seqs at or below the highest one it applied, so a batch's operation is applied
//! once. Hence the rule for the sender: coalesce only records that follow a seq the agent has
//! applied (after a reconnect: `records_after(AppliedSeq)`). Then every batch starts after the
//! agent's applied seq, and the agent's applied seq is always the end of a batch, so "applied
//! up to N" keeps meaning "every record up to N is applied" however the records were grouped.
//!
//! # What is merged
//! - `Create` (with `O_EXCL` or `O_TRUNC`, no set-id bits in its mode), then `WritePath`s that
//!   write it sequentially from offset 0, then `SetAttr`s changing only its mode and/or mtime:
//!   one `PutFile { atomic: false }` (zstd-compressed when that makes it clearly smaller), at
//!   most [`MAX_PUT_FILE`] bytes; the writes beyond continue as below. The precondition, which
//!   the core keeps, is that a journaled `Create` names a path absent at that point (it is
//!   journaled only for names the local tree lacks): then the file holds exactly the written
//!   bytes with the create mode, which is what `PutFile` produces. Set-id bits are excluded
//!   because the kernel clears them on writes by unprivileged callers, and `PutFile` sets the
//!   mode after writing.
//! - A truncation to 0 of an existing file (`SetAttr` with only `size: 0`: an `open(O_TRUNC)`),
//!   then `WritePath`s from offset 0 on, then mode/mtime `SetAttr`s: one `PutFile { atomic:
//!   false, keep_mode }` (the mode only when one of those `SetAttr`s set it), so a save in
//!   place reaches the target as one open, write and close: a watcher there never sees the
//!   emptied file closed first. Should the file be gone from the target meanwhile, the save
//!   makes it again instead of failing: the local save wins.
//! - An `Unlink` of a path, then an atomic `PutFile` of it or a `Create` run as above: one
//!   atomic `PutFile` (the name is replaced, never missing in between; see [`replace_run`]).
//! - `WritePath`s to one path, each starting where the previous one ended: one `WritePath` of
//!   at most [`MAX_MERGED_WRITE`] bytes.
//! - Everything else is passed through as it is.

use kmount_proto::{Caller, NodeRef, Op, SetAttr, SetTime, Timespec};

use super::Record;

/// Largest `WritePath` produced by merging.
pub const MAX_MERGED_WRITE: usize = 4 << 20;
/// Largest content put in one `PutFile` (before compression).
pub const MAX_PUT_FILE: usize = kmount_proto::MAX_IO_LEN as usize;

/// Files smaller than this are sent uncompressed.
const COMPRESS_MIN: usize = 256;

/// One operation to send, standing for the records `first_seq..=seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first_seq: u64,
    /// The last seq covered; the seq to send it with.
    pub seq: u64,
    pub caller: Option<Caller>,
    pub op: Op,
}

impl Batch {
    fn single(r: &Record) -> Self {
        Self {
            first_seq: r.seq,
            seq: r.seq,
            caller: r.caller.clone(),
            op: r.op.clone(),
        }
    }
}

/// Groups `records` (in seq order, as read from the journal) into batches; see the module
/// documentation for what is merged and why the result is equivalent.
pub fn coalesce(records: &[Record]) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < records.len() {
        if let Some((batch, next)) = replace_run(records, i)
            .or_else(|| put_file_run(records, i))
            .or_else(|| save_run(records, i))
        {
            out.push(batch);
            i = next;
        } else if let Some((batch, next)) = write_run(records, i) {
            out.push(batch);
            i = next;
        } else {
            out.push(Batch::single(&records[i]));
            i += 1;
        }
    }
    out
}

/// Whether `records[j]` directly follows `records[j - 1]` and runs as the run's caller.
fn continues(records: &[Record], j: usize, start: usize) -> bool {
    j < records.len()
        && records[j].seq == records[j - 1].seq + 1
        && records[j].caller == records[start].caller
}

/// Whether `records[j]`, a write to the file that `records[start]` made or emptied, directly
/// follows `records[j - 1]` and may run as the run's caller: its own, or none (a write through
/// an open file is journaled without one, as the open allowed it; the run's caller made or
/// emptied the file, so it may write it too).
fn continues_write(records: &[Record], j: usize, start: usize) -> bool {
    j < records.len()
        && records[j].seq == records[j - 1].seq + 1
        && (records[j].caller.is_none() || records[j].caller == records[start].caller)
}

/// A `SetAttr` of `path` that only changes mode and/or mtime: (mode, mtime).
fn mode_mtime(op: &Op, path: &kmount_proto::RelPath) -> Option<(Option<u32>, Option<SetTime>)> {
    match op {
        Op::SetAttr {
            node: NodeRef::Path(p),
            set:
                SetAttr {
                    mode,
                    uid: None,
                    gid: None,
                    size: None,
                    atime: None,
                    mtime,
                },
        } if p == path && (mode.is_some() || mtime.is_some()) => Some((*mode, *mtime)),
        _ => None,
    }
}

/// What follows a record that starts a file from empty at `path` (record `i`): the
/// `WritePath`s writing it sequentially from offset 0 (at most [`MAX_PUT_FILE`] bytes), then
/// `SetAttr`s changing only its mode and/or mtime. `None` without a write.
struct Filled {
    data: Vec<u8>,
    /// The last mode set, if any.
    mode: Option<u32>,
    /// The last explicit mtime (a "now" leaves the time of writing).
    mtime: Option<Timespec>,
    /// The index after the run.
    next: usize,
}

fn filled(records: &[Record], i: usize, path: &kmount_proto::RelPath) -> Option<Filled> {
    let mut data: Vec<u8> = Vec::new();
    let mut j = i + 1;
    while continues_write(records, j, i) {
        match &records[j].op {
            Op::WritePath {
                path: p,
                offset,
                data: d,
            } if p == path
                && *offset == data.len() as u64
                && data.len() + d.len() <= MAX_PUT_FILE =>
            {
                data.extend_from_slice(d);
                j += 1;
            }
            _ => break,
        }
    }
    if j == i + 1 {
        return None;
    }
    let mut mode: Option<u32> = None;
    let mut mtime: Option<Timespec> = None;
    while continues(records, j, i) {
        let Some((m, t)) = mode_mtime(&records[j].op, path) else {
            break;
        };
        if let Some(m) = m {
            mode = Some(m & 0o7777);
        }
        match t {
            Some(SetTime::At(t)) => mtime = Some(t),
            // "Now" is when the file is written, which PutFile leaves as the mtime.
            Some(SetTime::Now) => mtime = None,
            None => {}
        }
        j += 1;
    }
    Some(Filled {
        data,
        mode,
        mtime,
        next: j,
    })
}

/// One in-place `PutFile` standing for records `i..f.next`.
fn put_batch(
    records: &[Record],
    i: usize,
    path: &kmount_proto::RelPath,
    f: Filled,
    mode: u32,
    keep_mode: bool,
) -> (Batch, usize) {
    let (data, compressed) = maybe_compress(f.data);
    (
        Batch {
            first_seq: records[i].seq,
            seq: records[f.next - 1].seq,
            caller: records[i].caller.clone(),
            op: Op::PutFile {
                path: path.clone(),
                data,
                compressed,
                mode,
                mtime: f.mtime,
                atomic: false,
                keep_mode,
            },
        },
        f.next,
    )
}

fn put_file_run(records: &[Record], i: usize) -> Option<(Batch, usize)> {
    let Op::Create { path, flags, mode } = &records[i].op else {
        return None;
    };
    if flags & (libc::O_EXCL | libc::O_TRUNC) == 0 || mode & 0o6000 != 0 {
        return None;
    }
    let f = filled(records, i, path)?;
    let mode = f.mode.unwrap_or(mode & 0o7777);
    Some(put_batch(records, i, path, f, mode, false))
}

/// An `Unlink` directly followed by what makes the same path again from nothing (an atomic
/// `PutFile`, or a `Create` run that merges into one `PutFile`): one atomic `PutFile`. The end
/// is the same (a new file with those bytes and that mode under the name), but the target never
/// lacks the name, so a watcher there sees the file replaced once, never removed first: an
/// editor's save by renames (JetBrains: `x` -> `x___jb_old___`, `x___jb_tmp___` -> `x`; vim:
/// `x` -> `x~`, then a new `x`), with the local-only names kept here.
fn replace_run(records: &[Record], i: usize) -> Option<(Batch, usize)> {
    let Op::Unlink { path } = &records[i].op else {
        return None;
    };
    if !continues(records, i + 1, i) {
        return None;
    }
    let (mut batch, next) = match &records[i + 1].op {
        Op::PutFile {
            path: p,
            atomic: true,
            ..
        } if p == path => (Batch::single(&records[i + 1]), i + 2),
        Op::Create { path: p, .. } if p == path => put_file_run(records, i + 1)?,
        _ => return None,
    };
    if let Op::PutFile { atomic, .. } = &mut batch.op {
        *atomic = true;
    }
    batch.first_seq = records[i].seq;
    Some((batch, next))
}

/// The truncation to 0 that an `open(O_TRUNC)` journals, and what follows it.
fn save_run(records: &[Record], i: usize) -> Option<(Batch, usize)> {
    let Op::SetAttr {
        node: NodeRef::Path(path),
        set:
            SetAttr {
                size: Some(0),
                mode: None,
                uid: None,
                gid: None,
                atime: None,
                mtime: None,
            },
    } = &records[i].op
    else {
        return None;
    };
    let f = filled(records, i, path)?;
    // Without a chmod in the run, the file keeps its mode (0o644 applies if it must be made).
    let (mode, keep_mode) = match f.mode {
        Some(m) => (m, false),
        None => (0o644, true),
    };
    Some(put_batch(records, i, path, f, mode, keep_mode))
}

fn write_run(records: &[Record], i: usize) -> Option<(Batch, usize)> {
    let Op::WritePath {
        path,
        offset,
        data: first,
    } = &records[i].op
    else {
        return None;
    };
    let mut data: Option<Vec<u8>> = None;
    let mut end = offset + first.len() as u64;
    let mut j = i + 1;
    while continues(records, j, i) {
        match &records[j].op {
            Op::WritePath {
                path: p,
                offset: o,
                data: d,
            } if p == path
                && *o == end
                && data.as_ref().map_or(first.len(), Vec::len) + d.len() <= MAX_MERGED_WRITE =>
            {
                data.get_or_insert_with(|| first.clone())
                    .extend_from_slice(d);
                end += d.len() as u64;
                j += 1;
            }
            _ => break,
        }
    }
    let data = data?;
    Some((
        Batch {
            first_seq: records[i].seq,
            seq: records[j - 1].seq,
            caller: records[i].caller.clone(),
            op: Op::WritePath {
                path: path.clone(),
                offset: *offset,
                data,
            },
        },
        j,
    ))
}

/// zstd when it saves at least an eighth.
fn maybe_compress(data: Vec<u8>) -> (Vec<u8>, bool) {
    if data.len() < COMPRESS_MIN {
        return (data, false);
    }
    match kmount_proto::tree::compress(&data) {
        Ok(z) if z.len() <= data.len() - data.len() / 8 => (z, true),
        _ => (data, false),
    }
}
