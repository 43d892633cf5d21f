//! The frame layer: bytes arriving in arbitrary pieces. The incremental decoder and the
//! blocking reader must agree on every frame, refuse an oversized header the same way, and
//! never panic or hold more than the bytes given.
#![no_main]

use kmount_proto::{FrameDecoder, FromAgent, MAX_FRAME_LEN, ProtoError, ToAgent, read_frame};
use kmount_fuzz::decodes_stably;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pieces, stream)) = data.split_first() else {
        return;
    };
    let piece = 1 + usize::from(pieces % 61);

    let mut dec = FrameDecoder::new();
    let mut incremental = Vec::new();
    let mut incremental_too_large = false;
    'feed: for chunk in stream.chunks(piece) {
        dec.extend(chunk);
        assert!(dec.pending() <= stream.len());
        loop {
            match dec.next_frame() {
                Ok(Some(p)) => {
                    assert!(p.len() <= MAX_FRAME_LEN);
                    incremental.push(p);
                }
                Ok(None) => break,
                Err(ProtoError::FrameTooLarge { len, max }) => {
                    assert!(len > max);
                    incremental_too_large = true;
                    break 'feed;
                }
                Err(e) => panic!("the incremental decoder failed with {e}"),
            }
        }
    }

    let mut r = stream;
    let mut blocking = Vec::new();
    let mut blocking_too_large = false;
    loop {
        match read_frame(&mut r) {
            Ok(Some(p)) => blocking.push(p),
            Ok(None) | Err(ProtoError::Truncated) => break,
            Err(ProtoError::FrameTooLarge { .. }) => {
                blocking_too_large = true;
                break;
            }
            Err(e) => panic!("read_frame failed with {e}"),
        }
    }
    assert_eq!(incremental, blocking);
    assert_eq!(incremental_too_large, blocking_too_large);

    for p in &incremental {
        let _ = decodes_stably::<ToAgent>(p);
        let _ = decodes_stably::<FromAgent>(p);
    }
});
