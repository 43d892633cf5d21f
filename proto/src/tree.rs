//! Bulk encodings: tree-walk batches and whole-file payloads, zstd-compressed.
//!
//! Decompression is bounded: a payload that expands beyond the given limit is an error, and
//! memory grows only with the bytes actually produced (a "zip bomb" cannot allocate the limit).

use std::io::Read;

use crate::frame::ProtoError;
use crate::msg::TreeEntry;

/// Largest decompressed size of one tree batch.
pub const MAX_TREE_BATCH_BYTES: usize = 64 << 20;

/// zstd level used for everything on the wire: fast, and plenty for metadata and source code.
pub const LEVEL: i32 = 3;

/// postcard, then zstd.
pub fn encode_entries(entries: &[TreeEntry]) -> Result<Vec<u8>, ProtoError> {
    let raw = postcard::to_allocvec(entries).map_err(ProtoError::Encode)?;
    compress(&raw)
}

/// The inverse of [`encode_entries`], bounded by [`MAX_TREE_BATCH_BYTES`].
pub fn decode_entries(zstd: &[u8]) -> Result<Vec<TreeEntry>, ProtoError> {
    let raw = decompress(zstd, MAX_TREE_BATCH_BYTES)?;
    crate::decode(&raw)
}

pub fn compress(data: &[u8]) -> Result<Vec<u8>, ProtoError> {
    zstd::bulk::compress(data, LEVEL).map_err(ProtoError::Io)
}

/// Decompresses at most `limit` bytes; more is [`ProtoError::FrameTooLarge`].
pub fn decompress(data: &[u8], limit: usize) -> Result<Vec<u8>, ProtoError> {
    let decoder = zstd::stream::read::Decoder::new(data)?;
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(ProtoError::Io)?;
    if out.len() > limit {
        return Err(ProtoError::FrameTooLarge {
            len: out.len(),
            max: limit,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, RelPath, Timespec};

    fn entry(i: u32) -> TreeEntry {
        TreeEntry {
            path: RelPath::new(format!("node_modules/pkg{i}/index.js").into_bytes()).unwrap(),
            attr: Attr {
                ino: 1000 + u64::from(i),
                dev: 2049,
                mode: 0o100644,
                nlink: 1,
                uid: 1000,
                gid: 1000,
                rdev: 0,
                size: 1234,
                blocks: 8,
                blksize: 4096,
                atime: Timespec { sec: 1, nsec: 2 },
                mtime: Timespec { sec: 3, nsec: 4 },
                ctime: Timespec { sec: 5, nsec: 6 },
            },
            symlink: None,
        }
    }

    #[test]
    fn batches_round_trip_and_compress() {
        let entries: Vec<TreeEntry> = (0..2000).map(entry).collect();
        let z = encode_entries(&entries).unwrap();
        let raw = postcard::to_allocvec(&entries).unwrap();
        assert!(z.len() * 3 < raw.len(), "{} vs {}", z.len(), raw.len());
        assert_eq!(decode_entries(&z).unwrap(), entries);
    }

    #[test]
    fn decompression_is_bounded() {
        let zeros = vec![0u8; 1 << 20];
        let z = compress(&zeros).unwrap();
        assert!(z.len() < 1024);
        assert!(matches!(
            decompress(&z, 4096),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        assert_eq!(decompress(&z, 1 << 20).unwrap(), zeros);
        assert!(decompress(b"not zstd", 100).is_err());
    }
}
