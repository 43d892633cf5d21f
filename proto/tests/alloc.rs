//! Memory a peer can make the decoders allocate. A counting allocator measures, per thread,
//! the peak of live heap bytes while one call runs (tests run on threads of their own, so
//! they do not see each other's allocations).
//!
//! The bounds: a length prefix over [`MAX_FRAME_LEN`] allocates nothing; a frame's memory
//! grows with the bytes that actually arrive; a length *inside* a frame (of a `Vec`, a string,
//! a byte field) reserves at most what the rest of the frame could hold and never more than
//! 1 MiB (postcard declines to hint a length the input cannot hold; serde caps hints at 1 MiB).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{self, Read};

use kmount_proto::*;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize));
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak heap bytes allocated on this thread while `f` ran, above what was live before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

/// A reader that serves `head`, then claims to have endless zeros, counting what it hands out.
struct Endless {
    head: Vec<u8>,
    served: usize,
}

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = if self.served < self.head.len() {
            let n = buf.len().min(self.head.len() - self.served);
            buf[..n].copy_from_slice(&self.head[self.served..self.served + n]);
            n
        } else {
            buf.fill(0);
            buf.len()
        };
        self.served += n;
        Ok(n)
    }
}

#[test]
fn an_oversized_length_prefix_is_refused_before_allocating_or_reading_the_body() {
    for claimed in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        let mut r = Endless {
            head: claimed.to_le_bytes().to_vec(),
            served: 0,
        };
        let (result, peak) = peak_during(|| read_frame(&mut r));
        assert!(
            matches!(result, Err(ProtoError::FrameTooLarge { .. })),
            "{result:?}"
        );
        assert_eq!(r.served, 4, "read past the header of a refused frame");
        assert!(peak < 4096, "{peak} bytes allocated to refuse a frame");

        let mut dec = FrameDecoder::new();
        dec.extend(&claimed.to_le_bytes());
        let (result, peak) = peak_during(|| dec.next_frame());
        assert!(matches!(result, Err(ProtoError::FrameTooLarge { .. })));
        assert!(peak < 4096, "{peak} bytes allocated to refuse a frame");
    }
}

#[test]
fn a_frame_claimed_but_not_sent_costs_only_what_arrived() {
    // The largest allowed frame is announced; 100 bytes follow, then the stream ends.
    let mut stream = (MAX_FRAME_LEN as u32).to_le_bytes().to_vec();
    stream.extend([7u8; 100]);
    let mut r: &[u8] = &stream;
    let (result, peak) = peak_during(|| read_frame(&mut r));
    assert!(matches!(result, Err(ProtoError::Truncated)), "{result:?}");
    assert!(peak <= 128 << 10, "{peak} bytes for a 100-byte fragment");

    let mut dec = FrameDecoder::new();
    let (result, peak) = peak_during(|| {
        dec.extend(&stream);
        dec.next_frame().map(|f| f.is_some())
    });
    assert!(matches!(result, Ok(false)));
    assert!(peak <= 4096, "{peak} bytes for a 100-byte fragment");
}

/// The payload of a `Ping` request whose `Caller::groups` claims `count` entries and holds
/// `held` of them.
fn caller_claiming(count: u64, held: usize) -> Vec<u8> {
    let mut p = postcard::to_allocvec(&(1u32, 5u64, 1u8, 1000u32, 1000u32)).unwrap();
    p.extend(postcard::to_allocvec(&count).unwrap()); // the groups' length, as a varint
    p.extend(std::iter::repeat_n(1u8, held)); // each group is a one-byte varint
    p.push(26); // Op::Ping, if the groups ever ended
    p
}

#[test]
fn lengths_inside_a_frame_reserve_no_more_than_the_frame_can_hold() {
    // A Vec claiming 2^60 elements in a 20-byte frame.
    let payload = caller_claiming(1 << 60, 3);
    let (result, peak) = peak_during(|| decode::<ToAgent>(&payload));
    assert!(result.is_err());
    assert!(
        peak < 4096,
        "{peak} bytes for a {}-byte frame",
        payload.len()
    );

    // Byte fields and strings: a claimed length beyond the frame is refused before copying.
    for msg in [
        FromAgent::Fatal("x".repeat(10)),
        FromAgent::Reply(Reply {
            id: 1,
            result: Ok(Done::Data(vec![1; 10])),
        }),
    ] {
        let mut payload = encode(&msg).unwrap()[4..].to_vec();
        let len_at = payload.iter().position(|&b| b == 10).unwrap();
        payload.splice(
            len_at..=len_at,
            postcard::to_allocvec(&(u32::MAX as u64)).unwrap(),
        );
        let (result, peak) = peak_during(|| decode::<FromAgent>(&payload));
        assert!(result.is_err(), "{result:?}");
        assert!(
            peak < 4096,
            "{peak} bytes for a {}-byte frame",
            payload.len()
        );
    }

    // A frame of 1 MiB claiming more groups than it holds: the hint is declined, memory
    // follows the elements actually decoded (4 bytes each, one input byte each).
    let payload = caller_claiming(1 << 40, 1 << 20);
    let (result, peak) = peak_during(|| decode::<ToAgent>(&payload));
    assert!(result.is_err());
    assert!(
        peak <= 2 * 4 * payload.len() + (1 << 20),
        "{peak} bytes for a {}-byte frame",
        payload.len()
    );
}

/// How much memory a frame full of the cheapest possible elements decodes into. Every element
/// costs at least one input byte, so this is at most `size_of::<T>()` per byte (twice that
/// while the `Vec` grows), whatever lengths the frame claims. This pins the figure for the
/// two lists a frame can hold in bulk, so that a change to them is noticed.
#[test]
fn amplification_of_the_cheapest_lists_is_bounded() {
    // Events: `Remove` of the root, 2 bytes each.
    let n = 100_000usize;
    let events = vec![
        Event::Remove {
            path: RelPath::root()
        };
        n
    ];
    let payload = encode(&FromAgent::Events(events)).unwrap()[4..].to_vec();
    let (result, peak) = peak_during(|| decode::<FromAgent>(&payload).map(drop));
    result.unwrap();
    let per_byte = peak / payload.len();
    // Each element takes at least 2 bytes, the Vec at most twice the room its elements need.
    let bound = std::mem::size_of::<Event>();
    assert!(
        per_byte <= bound,
        "{peak} bytes for a {}-byte frame of events ({per_byte} per byte, bound {bound})",
        payload.len()
    );
    eprintln!(
        "events: {} bytes decode into a peak of {peak} bytes ({per_byte}x; a full frame: {} MiB)",
        payload.len(),
        (per_byte * MAX_FRAME_LEN) >> 20
    );
}
