//! What a hostile or broken peer can send: arbitrary bytes into every decoder, messages that
//! nest without end, values the protocol refuses. Nothing may panic, overflow the stack, or
//! be accepted; refusals say what was wrong. (Allocation bounds: `tests/alloc.rs`.)

use proptest::prelude::*;
use serde::de::DeserializeOwned;

use crate::rules::RulesConfig;
use crate::*;

/// Decodes `bytes` as every type that arrives from the wire on its own. Whatever decodes must
/// survive an encode and a second decode unchanged.
fn decode_as_everything(bytes: &[u8]) {
    fn stable<T: serde::Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(b: &[u8]) {
        if let Ok(v) = decode::<T>(b) {
            let frame = encode(&v).expect("what decoded encodes again");
            assert_eq!(decode::<T>(&frame[4..]).expect("and decodes again"), v);
        }
    }
    stable::<ToAgent>(bytes);
    stable::<FromAgent>(bytes);
    stable::<Hello>(bytes);
    stable::<Request>(bytes);
    stable::<Op>(bytes);
    stable::<Reply>(bytes);
    stable::<Done>(bytes);
    stable::<Event>(bytes);
    stable::<Vec<Event>>(bytes);
    stable::<Vec<TreeEntry>>(bytes);
    stable::<RulesConfig>(bytes);
    stable::<RelPath>(bytes);
    let _ = tree::decode_entries(bytes);
    let _ = tree::decompress(bytes, 4096);
}

/// Bytes that begin like a real message, so that decoding gets past the first variant.
fn message_prefixes() -> Vec<Vec<u8>> {
    let req = |op| {
        ToAgent::Request(Request {
            id: 7,
            caller: None,
            op,
        })
    };
    let path = RelPath::new(b"a/b".to_vec()).unwrap();
    [
        encode(&ToAgent::Hello(Hello::new(features::TREE, "kmount"))),
        encode(&req(Op::Lookup { path: path.clone() })),
        encode(&req(Op::Journaled {
            session: 1,
            seq: 2,
            op: Box::new(Op::Unlink { path }),
        })),
        encode(&FromAgent::Hello(Hello::new(0, "kmount-agent"))),
        encode(&FromAgent::Events(vec![Event::Remove {
            path: RelPath::root(),
        }])),
        encode(&FromAgent::Reply(Reply {
            id: 3,
            result: Ok(Done::Data(b"xyz".to_vec())),
        })),
    ]
    .into_iter()
    .map(|f| f.unwrap()[4..].to_vec())
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_decoder_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        decode_as_everything(&bytes);
    }

    #[test]
    fn every_decoder_survives_damaged_messages(
        which in 0usize..6,
        keep in any::<prop::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let prefix = &message_prefixes()[which];
        let mut bytes = prefix[..keep.index(prefix.len() + 1)].to_vec();
        bytes.extend_from_slice(&tail);
        decode_as_everything(&bytes);
    }

    #[test]
    fn the_frame_decoder_agrees_with_read_frame(
        stream in proptest::collection::vec(any::<u8>(), 0..2048),
        piece in 1usize..64,
    ) {
        let mut dec = FrameDecoder::new();
        let mut incremental = Vec::new();
        let mut refused = false;
        'feed: for chunk in stream.chunks(piece) {
            dec.extend(chunk);
            loop {
                match dec.next_frame() {
                    Ok(Some(p)) => incremental.push(p),
                    Ok(None) => break,
                    Err(ProtoError::FrameTooLarge { .. }) => {
                        refused = true;
                        break 'feed;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let mut r: &[u8] = &stream;
        let mut blocking = Vec::new();
        let refused_too = loop {
            match read_frame(&mut r) {
                Ok(Some(p)) => blocking.push(p),
                Ok(None) | Err(ProtoError::Truncated) => break false,
                Err(ProtoError::FrameTooLarge { .. }) => break true,
                Err(e) => panic!("{e}"),
            }
        };
        prop_assert_eq!(&incremental, &blocking);
        prop_assert_eq!(refused, refused_too);
        for p in &incremental {
            decode_as_everything(p);
        }
    }
}

/// `Op::Journaled` wrapped around itself `levels` times, around a `Ping`, as a request frame's
/// payload (built byte by byte: encoding a deep value would recurse as deep).
fn nested_journaled(levels: usize) -> Vec<u8> {
    let one = postcard::to_allocvec(&Op::Journaled {
        session: 0,
        seq: 0,
        op: Box::new(Op::Ping),
    })
    .unwrap();
    let (ping, level) = one.split_last().unwrap();
    let mut payload = postcard::to_allocvec(&(1u32, 9u64, None::<Caller>)).unwrap();
    for _ in 0..levels {
        payload.extend_from_slice(level);
    }
    payload.push(*ping);
    payload
}

#[test]
fn deeply_nested_requests_are_refused_not_a_stack_overflow() {
    // 3 bytes a level: a 3 MB frame, far under the frame limit. Decoded on a thread with a
    // small stack, as the agent's reader could be.
    let payload = nested_journaled(1_000_000);
    assert!(payload.len() < MAX_FRAME_LEN);
    let result = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || decode::<ToAgent>(&payload).map(|_| ()))
        .unwrap()
        .join()
        .expect("the decoder must not crash");
    match result {
        Err(ProtoError::Invalid(why)) => assert!(why.contains("nested"), "{why}"),
        other => panic!("a million nested journaled ops: {other:?}"),
    }
    // The limit itself still decodes (the agent then refuses the nesting with a reply), and
    // the depth count starts over for the next message on the thread.
    let ok = decode::<ToAgent>(&nested_journaled(MAX_JOURNALED_NESTING)).unwrap();
    let ToAgent::Request(Request { id: 9, op, .. }) = ok else {
        panic!("{ok:?}")
    };
    assert!(matches!(op, Op::Journaled { .. }));
    assert!(decode::<ToAgent>(&nested_journaled(MAX_JOURNALED_NESTING + 1)).is_err());
    assert!(decode::<ToAgent>(&nested_journaled(MAX_JOURNALED_NESTING)).is_ok());
}

/// A request whose path is `bytes`, encoded without the checks [`RelPath::new`] makes.
fn request_with_raw_path(id: u64, bytes: &[u8]) -> Vec<u8> {
    let lookup = postcard::to_allocvec(&Op::Lookup {
        path: RelPath::root(),
    })
    .unwrap();
    let mut payload = postcard::to_allocvec(&(1u32, id, None::<Caller>)).unwrap();
    payload.extend_from_slice(&lookup[..lookup.len() - 1]); // the variant, then the path:
    payload.extend(postcard::to_allocvec(&serde_bytes::Bytes::new(bytes)).unwrap());
    payload
}

#[test]
fn refused_paths_are_named_in_the_error_and_the_request_id_survives() {
    let long_name = vec![b'n'; 1 << 20];
    for (bytes, says) in [
        (&b"../etc/passwd"[..], "../etc/passwd"),
        (b"a/../../b", "a/../../b"),
        (b"/etc", "/etc"),
        (b"a//b", "empty"),
        (b"a/", "trailing"),
        (b".", "'.'"),
        (b"a\0b", "NUL"),
        (&long_name, "1048576 bytes"),
        (&long_name[..256], "longer than 255"),
    ] {
        let payload = request_with_raw_path(41, bytes);
        match decode::<ToAgent>(&payload) {
            Err(e @ ProtoError::Invalid(_)) => {
                let text = e.to_string();
                assert!(text.contains(says), "{bytes:.20?}: {text}");
                assert!(text.len() < 400, "the message quotes too much: {text}");
            }
            other => panic!(
                "{:?} accepted or not named: {other:?}",
                &bytes[..bytes.len().min(20)]
            ),
        }
        assert_eq!(request_id(&payload), Some(41));
    }
    // Sanity: the same construction with a good path decodes.
    let ok = decode::<ToAgent>(&request_with_raw_path(41, b"a/b")).unwrap();
    assert!(matches!(ok, ToAgent::Request(Request { id: 41, .. })));
    // Not a request: no id to answer.
    assert_eq!(request_id(&[]), None);
    assert_eq!(request_id(&[0, 1, 2]), None);
    assert_eq!(request_id(&[0xff; 8]), None);
}
