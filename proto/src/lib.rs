//! The kmount wire protocol: the contract between the mount (`kmount`) and the agent
//! (`kmount-agent`).
//!
//! # Framing
//! A frame is a little-endian `u32` payload length followed by that many payload bytes. A length
//! above [`MAX_FRAME_LEN`] is an error ([`ProtoError::FrameTooLarge`]) and is never allocated.
//! The payload is one message encoded with postcard (a stable, documented format).
//!
//! Decoding is safe on hostile input (fuzzed: `fuzz/`; `hostile.rs`, `tests/alloc.rs`): a
//! length inside a frame reserves no more than the frame can hold, `Op::Journaled` nests at
//! most [`MAX_JOURNALED_NESTING`] deep (deeper would recurse without bound), and a value the
//! protocol refuses (a path with `..`, ...) is [`ProtoError::Invalid`] naming it; the agent
//! answers such a request with `EINVAL` ([`request_id`]) and goes on.
//!
//! # Session
//! The first frame each way is a [`Hello`] (`ToAgent::Hello` / `FromAgent::Hello`, both variant
//! 0, whose layout never changes). A different [`PROTOCOL_VERSION`] ends the session with an
//! error naming both versions. After that the mount sends [`Request`]s, each with an id of its
//! choosing, and the agent answers each with exactly one [`Reply`] carrying the same id. Many
//! requests are in flight at once and replies come back in any order.
//!
//! # Rules for changing this crate
//! - Enums only grow at the end; fields are never removed or reordered (postcard is positional).
//! - A new request kind is sent only when the peer's hello announced the feature bit for it.
//! - Bump [`PROTOCOL_VERSION`] for anything that is not backward compatible.
//!
//! # Errors
//! Errors carry the raw Linux errno ([`WireError::errno`]): an `EACCES` in the container is an
//! `EACCES` in the editor. Both ends run Linux, so numbers are not translated.

pub mod digest;
mod frame;
#[cfg(test)]
mod hostile;
mod msg;
mod path;
pub mod rules;
pub mod tree;

pub use frame::{
    FrameDecoder, ProtoError, decode, encode, frame_len, read_frame, request_id, write_frame,
};
pub use msg::*;
pub use path::{RelPath, RelPathError};

/// Version of the wire protocol. Both ends must speak the same one.
pub const PROTOCOL_VERSION: u32 = 1;

/// First bytes of every hello, so that a stream that is not kmount (a shell banner, an error
/// message from `sh`) is recognised at once rather than misread.
pub const MAGIC: [u8; 4] = *b"KMNT";

/// Largest frame payload either end accepts.
pub const MAX_FRAME_LEN: usize = 32 << 20;

/// Largest data payload of one read or write request; leaves room for the envelope.
pub const MAX_IO_LEN: u32 = 16 << 20;

/// Feature bits announced in [`Hello::features`].
pub mod features {
    /// The agent runs requests with the caller's uid, gid and groups ([`crate::Caller`]).
    /// Only offered when the agent runs as root and was asked to (`--identity`).
    pub const IDENTITY: u64 = 1 << 0;
    /// `Op::WalkOpen`/`WalkNext`, `Op::Digest`.
    pub const TREE: u64 = 1 << 1;
    /// `Op::Watch` and `FromAgent::Events`.
    pub const WATCH: u64 = 1 << 2;
    /// `Op::Journaled`, `Op::AppliedSeq`, `Op::PutFile`, `Op::ReadPath`, `Op::FsyncPath`, `Op::WritePath`,
    /// `Op::FallocatePath`.
    pub const JOURNAL: u64 = 1 << 3;
    /// The agent tells the user it runs as ([`crate::FromAgent::RunsAs`]) once, right
    /// after the hellos and before any reply, when both hellos announce this bit.
    pub const RUNS_AS: u64 = 1 << 4;
    /// `Op::SetRules`: the agent hides excluded and local-only paths from walks, listings,
    /// lookups, digests and events.
    pub const RULES: u64 = 1 << 5;
    /// `Op::RunCommand` (`--on-change`).
    pub const COMMAND: u64 = 1 << 6;
}
