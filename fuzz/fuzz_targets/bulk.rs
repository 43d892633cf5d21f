//! Bulk payloads: zstd-compressed tree batches and file contents. Decompression must stay
//! within its limit whatever the input claims.
#![no_main]

use kmount_proto::{ProtoError, tree};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = tree::decode_entries(data) {
        let again = tree::encode_entries(&entries).expect("re-encoding decoded entries");
        assert_eq!(tree::decode_entries(&again).expect("re-decoding"), entries);
    }
    match tree::decompress(data, LIMIT) {
        Ok(out) => assert!(out.len() <= LIMIT),
        Err(ProtoError::FrameTooLarge { len, max }) => assert!(len > max && max == LIMIT),
        Err(_) => {}
    }
});
