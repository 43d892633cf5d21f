//! Everything the mount decodes from the agent: hellos, replies with every kind of result,
//! change events, fatal errors, who the agent runs as; and the bulk payloads inside replies.
#![no_main]

use kmount_fuzz::decodes_stably;
use kmount_proto::{Done, Event, FromAgent, Hello, Reply, tree};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decodes_stably::<FromAgent>(data) {
        Some(FromAgent::Reply(Reply { result: Ok(done), .. })) => check_done(&done),
        Some(FromAgent::Hello(h)) => {
            let _ = Hello::new(0, "fuzz").check_peer(&h);
        }
        _ => {}
    }
    let _ = decodes_stably::<Hello>(data);
    let _ = decodes_stably::<Reply>(data);
    let _ = decodes_stably::<Vec<Event>>(data);
    if let Some(done) = decodes_stably::<Done>(data) {
        check_done(&done);
    }
});

fn check_done(done: &Done) {
    match done {
        Done::Tree { zstd, .. } => {
            let _ = tree::decode_entries(zstd);
        }
        Done::Content {
            data,
            compressed: true,
            ..
        } => {
            let _ = tree::decompress(data, 1 << 20);
        }
        _ => {}
    }
}
