//! The on-disk format of journal segments and of the small state files beside them.
//!
//! A segment is `seg-<first_seq>.log` (first_seq zero-padded to 20 digits so that names sort):
//!
//! ```text
//! segment  = magic "KMJSEG01" (8) | first_seq u64 LE (8) | record*
//! record   = len u32 LE | seq u64 LE | check u64 LE | payload (len bytes)
//! check    = xxh3_64(len LE | seq LE | xxh3_64(payload) LE)
//! payload  = postcard(RecordBody { caller, op })
//! ```
//!
//! A record is valid only when its whole envelope is present and its check matches, so a
//! record torn by a crash (short, zero-filled, or half old and half new) is recognised.

use std::fs::File;
use std::io::{self, BufReader, Read};

use kmount_proto::{Caller, Op};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

pub(super) const SEG_MAGIC: [u8; 8] = *b"KMJSEG01";
/// Bytes before the first record of a segment.
pub(super) const SEG_HEADER_LEN: u64 = 16;
/// Bytes before a record's payload.
pub(super) const REC_HEADER_LEN: u64 = 20;
/// Largest payload accepted, written or read: a record above it is refused when appended and
/// taken for garbage when read. Far above any [`Op`] the core journals (writes are at most
/// `MAX_IO_LEN`).
pub const MAX_RECORD_LEN: u32 = 64 << 20;

/// What a record's payload holds.
#[derive(Debug, Deserialize)]
pub(super) struct RecordBody {
    pub caller: Option<Caller>,
    pub op: Op,
}

/// [`RecordBody`] by reference, for encoding without a copy; same layout.
#[derive(Serialize)]
pub(super) struct RecordBodyRef<'a> {
    pub caller: &'a Option<Caller>,
    pub op: &'a Op,
}

pub(super) fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

/// The first seq named by a segment file name, `None` for any other file.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(super) fn segment_header(first_seq: u64) -> [u8; SEG_HEADER_LEN as usize] {
    let mut h = [0u8; SEG_HEADER_LEN as usize];
    h[..8].copy_from_slice(&SEG_MAGIC);
    h[8..].copy_from_slice(&first_seq.to_le_bytes());
    h
}

fn check(len: u32, seq: u64, payload_hash: u64) -> u64 {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&len.to_le_bytes());
    b[4..12].copy_from_slice(&seq.to_le_bytes());
    b[12..].copy_from_slice(&payload_hash.to_le_bytes());
    xxh3_64(&b)
}

/// The envelope header of a record whose payload hashes to `payload_hash` (see
/// [`payload_hash`]); computing the payload hash needs no lock, this needs the seq.
pub(super) fn record_header(
    len: u32,
    seq: u64,
    payload_hash: u64,
) -> [u8; REC_HEADER_LEN as usize] {
    let mut h = [0u8; REC_HEADER_LEN as usize];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..12].copy_from_slice(&seq.to_le_bytes());
    h[12..].copy_from_slice(&check(len, seq, payload_hash).to_le_bytes());
    h
}

pub(super) fn payload_hash(payload: &[u8]) -> u64 {
    xxh3_64(payload)
}

/// One record read back.
pub(super) struct RawRecord {
    pub seq: u64,
    /// Envelope and payload.
    pub total_len: u64,
    pub payload: Vec<u8>,
}

/// A record header: (payload len, seq, check); `None` at the end of the segment; `Err` when
/// no valid header starts here (why).
type Header = Result<Option<(u32, u64, u64)>, &'static str>;

/// The result of reading at one offset of a segment.
pub(super) enum Read1 {
    /// A valid record.
    Record(RawRecord),
    /// The segment ends exactly here.
    End,
    /// No valid record starts here: torn, garbage or damaged; the text says how.
    Bad(&'static str),
}

/// Reads segments record by record through a large buffer.
pub(super) struct SegmentReader {
    reader: BufReader<File>,
    /// Offset of the next record.
    pub offset: u64,
    /// Length of the file when opened; nothing beyond it is read.
    pub file_len: u64,
}

impl SegmentReader {
    pub fn new(file: File, offset: u64, file_len: u64) -> io::Result<Self> {
        use std::io::Seek;
        let mut reader = BufReader::with_capacity(256 << 10, file);
        reader.seek(io::SeekFrom::Start(offset))?;
        Ok(Self {
            reader,
            offset,
            file_len,
        })
    }

    /// Reads the envelope header at the current offset: (payload len, seq), or why not.
    fn header(&mut self) -> io::Result<Header> {
        let left = self.file_len.saturating_sub(self.offset);
        if left == 0 {
            return Ok(Ok(None));
        }
        if left < REC_HEADER_LEN {
            return Ok(Err("incomplete record header"));
        }
        let mut h = [0u8; REC_HEADER_LEN as usize];
        self.reader.read_exact(&mut h)?;
        let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
        let chk = u64::from_le_bytes(h[12..].try_into().expect("8 bytes"));
        if len > MAX_RECORD_LEN {
            return Ok(Err("record length out of range"));
        }
        if left < REC_HEADER_LEN + u64::from(len) {
            return Ok(Err("incomplete record"));
        }
        Ok(Ok(Some((len, seq, chk))))
    }

    /// Reads and verifies the record at the current offset and moves past it.
    pub fn next(&mut self) -> io::Result<Read1> {
        let (len, seq, chk) = match self.header()? {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(Read1::End),
            Err(why) => return Ok(Read1::Bad(why)),
        };
        let mut payload = vec![0u8; len as usize];
        self.reader.read_exact(&mut payload)?;
        if check(len, seq, payload_hash(&payload)) != chk {
            return Ok(Read1::Bad("checksum mismatch"));
        }
        let total_len = REC_HEADER_LEN + u64::from(len);
        self.offset += total_len;
        Ok(Read1::Record(RawRecord {
            seq,
            total_len,
            payload,
        }))
    }

    /// Moves past the record at the current offset without reading its payload; returns its
    /// seq. Only for records known to be valid (already verified and durable).
    pub fn skip(&mut self) -> io::Result<Option<u64>> {
        match self.header()? {
            Ok(Some((len, seq, _))) => {
                self.reader.seek_relative(i64::from(len))?;
                self.offset += REC_HEADER_LEN + u64::from(len);
                Ok(Some(seq))
            }
            Ok(None) => Ok(None),
            Err(why) => Err(io::Error::new(io::ErrorKind::InvalidData, why)),
        }
    }
}

/// A small state file: `magic (8) | values (8 each) | xxh3_64 of everything before (8)`.
pub(super) fn encode_state(magic: &[u8; 8], values: &[u64]) -> Vec<u8> {
    let mut out = magic.to_vec();
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let h = xxh3_64(&out);
    out.extend_from_slice(&h.to_le_bytes());
    out
}

/// The values of a state file written by [`encode_state`], `None` when it is not one (wrong
/// magic, wrong size, damaged).
pub(super) fn decode_state(magic: &[u8; 8], bytes: &[u8], count: usize) -> Option<Vec<u64>> {
    if bytes.len() != 8 + 8 * count + 8 || &bytes[..8] != magic {
        return None;
    }
    let body = &bytes[..bytes.len() - 8];
    let h = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().ok()?);
    if xxh3_64(body) != h {
        return None;
    }
    Some(
        body[8..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort() {
        assert_eq!(parse_segment_name(&segment_name(0)), Some(0));
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert!(segment_name(9) < segment_name(10));
        for bad in [
            "seg-.log",
            "seg-12.tmp",
            "xseg-1.log",
            "seg-1a.log",
            "applied",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn state_files_detect_damage() {
        let m = *b"TESTSTAT";
        let b = encode_state(&m, &[7, 9]);
        assert_eq!(decode_state(&m, &b, 2), Some(vec![7, 9]));
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x10;
            assert_eq!(decode_state(&m, &d, 2), None, "byte {i}");
        }
        assert_eq!(decode_state(&m, &b[..b.len() - 1], 2), None);
        assert_eq!(decode_state(&m, &b, 1), None);
    }
}
