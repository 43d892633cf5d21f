//! Length-prefixed framing and postcard encoding.

use std::io::{self, Read, Write};

use serde::{Serialize, de::DeserializeOwned};

use crate::MAX_FRAME_LEN;

/// Everything that can go wrong reading or writing the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    /// A message that is well formed but holds a value the protocol refuses (a path with
    /// `..`, a name with `/`, ...); the text says which.
    #[error("malformed message: {0}")]
    Invalid(String),
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    #[error("the other end is not a kmount {expected} (its first bytes were {got:?})")]
    BadMagic {
        expected: &'static str,
        got: Vec<u8>,
    },
    #[error(
        "protocol version mismatch: this side speaks version {ours}, the other side ({theirs_software}) speaks version {theirs}"
    )]
    VersionMismatch {
        ours: u32,
        theirs: u32,
        theirs_software: String,
    },
    #[error("the stream ended in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Length of the payload announced by a frame header, checked against [`MAX_FRAME_LEN`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Encodes `msg` as one whole frame: length prefix and payload.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let mut out = postcard::to_extend(msg, vec![0u8; 4]).map_err(ProtoError::Encode)?;
    let len = out.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

thread_local! {
    /// Why the last value on this thread was refused during decoding: postcard keeps only
    /// "custom error" of what a `Deserialize` impl said, so [`invalid`] leaves the text here.
    static REFUSED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The error a `Deserialize` impl of this crate returns for a value it refuses; [`decode`]
/// reports `why` as [`ProtoError::Invalid`].
pub(crate) fn invalid<E: serde::de::Error>(why: String) -> E {
    let err = E::custom(&why);
    REFUSED.with(|r| *r.borrow_mut() = Some(why));
    err
}

/// Decodes one payload (without its length prefix). Trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    REFUSED.with(|r| r.borrow_mut().take());
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|e| {
        match (e, REFUSED.with(|r| r.borrow_mut().take())) {
            (postcard::Error::SerdeDeCustom, Some(why)) => ProtoError::Invalid(why),
            (e, _) => ProtoError::Decode(e),
        }
    })?;
    if !rest.is_empty() {
        return Err(ProtoError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(msg)
}

/// The id of a request whose payload does not decode, when its start is readable: the
/// agent then answers that request with an error instead of ending the session.
pub fn request_id(payload: &[u8]) -> Option<u64> {
    // `ToAgent::Request` is variant 1 and `Request::id` its first field, both varints.
    let (variant, rest) = postcard::take_from_bytes::<u32>(payload).ok()?;
    if variant != 1 {
        return None;
    }
    postcard::take_from_bytes::<u64>(rest)
        .ok()
        .map(|(id, _)| id)
}

/// Reads one frame's payload. `Ok(None)` at a clean end of stream (between frames).
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, ProtoError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(header)?;
    // Memory grows with the bytes that arrive, not with what the header claims: a peer that
    // announces a large frame and stops costs nothing.
    let mut payload = Vec::with_capacity(len.min(READ_AHEAD));
    r.take(len as u64).read_to_end(&mut payload)?;
    if payload.len() < len {
        return Err(ProtoError::Truncated);
    }
    Ok(Some(payload))
}

/// What [`read_frame`] reserves before the payload arrives.
const READ_AHEAD: usize = 64 << 10;

/// Encodes and writes one frame (does not flush).
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtoError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Incremental frame decoder for readers that get bytes in arbitrary pieces.
///
/// Memory stays bounded: it never holds more than one frame plus one read's worth of bytes, and
/// a header announcing more than [`MAX_FRAME_LEN`] is rejected before anything is reserved.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next complete frame's payload, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let header: [u8; 4] = self.buf[..4].try_into().expect("slice of length 4");
        let len = frame_len(header)?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let payload = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(payload))
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use proptest::prelude::*;

    fn sample_messages() -> Vec<ToAgent> {
        let p = |s: &str| RelPath::new(s.as_bytes().to_vec()).unwrap();
        let ts = Timespec { sec: -5, nsec: 7 };
        vec![
            ToAgent::Hello(Hello::new(features::IDENTITY, "test")),
            ToAgent::Request(Request {
                id: 1,
                caller: Some(Caller {
                    uid: 1,
                    gid: 2,
                    groups: vec![3, 4],
                }),
                op: Op::Lookup { path: p("a/b") },
            }),
            ToAgent::Request(Request {
                id: u64::MAX,
                caller: None,
                op: Op::SetAttr {
                    node: NodeRef::Handle(9),
                    set: SetAttr {
                        mode: Some(0o755),
                        uid: None,
                        gid: Some(5),
                        size: Some(1 << 40),
                        atime: Some(SetTime::Now),
                        mtime: Some(SetTime::At(ts)),
                    },
                },
            }),
            ToAgent::Request(Request {
                id: 3,
                caller: None,
                op: Op::Write {
                    handle: 4,
                    offset: 5 << 32,
                    data: vec![0, 1, 2, 255],
                },
            }),
            ToAgent::Request(Request {
                id: 4,
                caller: None,
                op: Op::Rename {
                    from: p("x"),
                    to: p("d/y"),
                    flags: 2,
                },
            }),
        ]
    }

    #[test]
    fn every_sample_round_trips() {
        for msg in sample_messages() {
            let frame = encode(&msg).unwrap();
            let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, frame.len() - 4);
            let back: ToAgent = decode(&frame[4..]).unwrap();
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn reply_round_trips() {
        let attr = Attr {
            ino: 7,
            dev: 8,
            mode: 0o100644,
            nlink: 1,
            uid: 1000,
            gid: 1000,
            rdev: 0,
            size: 5,
            blocks: 8,
            blksize: 4096,
            atime: Timespec { sec: 1, nsec: 2 },
            mtime: Timespec { sec: 3, nsec: 4 },
            ctime: Timespec { sec: 5, nsec: 6 },
        };
        for result in [
            Ok(Done::Ok),
            Ok(Done::Attr(attr.clone())),
            Ok(Done::Entries {
                entries: vec![DirEntry {
                    name: b"n".to_vec(),
                    attr: Some(attr.clone()),
                    symlink: None,
                }],
                eof: true,
            }),
            Err(WireError::new(libc_enoent(), "gone")),
        ] {
            let msg = FromAgent::Reply(Reply { id: 42, result });
            let frame = encode(&msg).unwrap();
            let back: FromAgent = decode(&frame[4..]).unwrap();
            assert_eq!(back, msg);
        }
    }

    fn libc_enoent() -> i32 {
        2
    }

    #[test]
    fn raw_bytes_are_not_inflated() {
        let data = vec![0xabu8; 1 << 20];
        let msg = ToAgent::Request(Request {
            id: 1,
            caller: None,
            op: Op::Write {
                handle: 1,
                offset: 0,
                data,
            },
        });
        let frame = encode(&msg).unwrap();
        assert!(
            frame.len() < (1 << 20) + 32,
            "frame is {} bytes",
            frame.len()
        );
    }

    #[test]
    fn oversized_header_is_refused_without_allocating() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        assert!(matches!(
            frame_len(header),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        let mut dec = FrameDecoder::new();
        dec.extend(&u32::MAX.to_le_bytes());
        assert!(dec.next_frame().is_err());
        let mut r: &[u8] = &u32::MAX.to_le_bytes();
        assert!(matches!(
            read_frame(&mut r),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn read_frame_distinguishes_clean_end_from_truncation() {
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty).unwrap().is_none());
        let frame = encode(&ToAgent::Hello(Hello::new(0, "t"))).unwrap();
        let mut cut: &[u8] = &frame[..frame.len() - 1];
        assert!(matches!(read_frame(&mut cut), Err(ProtoError::Truncated)));
        let mut half_header: &[u8] = &frame[..2];
        assert!(matches!(
            read_frame(&mut half_header),
            Err(ProtoError::Truncated)
        ));
    }

    #[test]
    fn decoder_reassembles_frames_split_anywhere() {
        let mut stream = Vec::new();
        for m in sample_messages() {
            stream.extend(encode(&m).unwrap());
        }
        for chunk in [1, 3, 7, 64] {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                dec.extend(piece);
                while let Some(p) = dec.next_frame().unwrap() {
                    got.push(decode::<ToAgent>(&p).unwrap());
                }
            }
            assert_eq!(got, sample_messages());
            assert_eq!(dec.pending(), 0);
        }
    }

    #[test]
    fn hello_version_mismatch_names_both_versions() {
        let ours = Hello::new(0, "kmount 1");
        let mut theirs = Hello::new(0, "kmount-agent 9");
        theirs.version = PROTOCOL_VERSION + 1;
        let err = ours.check_peer(&theirs).unwrap_err().to_string();
        assert!(err.contains(&PROTOCOL_VERSION.to_string()), "{err}");
        assert!(err.contains(&(PROTOCOL_VERSION + 1).to_string()), "{err}");
        let mut junk = Hello::new(0, "x");
        junk.magic = *b"bash";
        assert!(matches!(
            ours.check_peer(&junk),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<ToAgent>(&bytes);
            let _ = decode::<FromAgent>(&bytes);
            let mut dec = FrameDecoder::new();
            dec.extend(&bytes);
            while let Ok(Some(p)) = dec.next_frame() {
                let _ = decode::<ToAgent>(&p);
            }
        }

        #[test]
        fn mutated_frames_never_panic(idx in 0usize..5, pos in any::<usize>(), val in any::<u8>()) {
            let msg = &sample_messages()[idx];
            let mut frame = encode(msg).unwrap();
            let at = 4 + pos % (frame.len() - 4);
            frame[at] = val;
            let _ = decode::<ToAgent>(&frame[4..]);
        }
    }
}
