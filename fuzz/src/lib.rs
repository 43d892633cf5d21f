//! Checks shared by the fuzz targets.

use kmount_proto::{ProtoError, decode, encode};
use serde::{Serialize, de::DeserializeOwned};

/// Decodes `payload` as a `T`; when that works, the value must survive an encode and a second
/// decode unchanged (the decoder accepts nothing the encoder cannot say again). Returns the
/// value for further checks.
pub fn decodes_stably<T>(payload: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let value: T = decode(payload).ok()?;
    let frame = match encode(&value) {
        Ok(frame) => frame,
        // Re-encoding is never larger than what was decoded, so it cannot be over the limit.
        Err(ProtoError::FrameTooLarge { .. }) => panic!("re-encoding {value:?} is too large"),
        Err(e) => panic!("cannot re-encode {value:?}: {e}"),
    };
    let again: T = decode(&frame[4..]).unwrap_or_else(|e| panic!("re-decoding {value:?}: {e}"));
    assert_eq!(again, value);
    Some(value)
}
