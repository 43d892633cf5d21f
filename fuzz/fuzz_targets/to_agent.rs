//! Everything the agent decodes from the mount: hellos, requests and every operation,
//! including the ignore rules it compiles from `Op::SetRules`.
#![no_main]

use kmount_fuzz::decodes_stably;
use kmount_proto::{Hello, Op, Request, ToAgent, rules::Rules};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(ToAgent::Request(Request { op, .. })) = decodes_stably::<ToAgent>(data) {
        check_op(&op);
    }
    let _ = decodes_stably::<Hello>(data);
    let _ = decodes_stably::<Request>(data);
    if let Some(op) = decodes_stably::<Op>(data) {
        check_op(&op);
    }
});

fn check_op(op: &Op) {
    match op {
        Op::SetRules { rules } => {
            if let Ok(r) = Rules::new(rules) {
                let _ = r.classify(std::path::Path::new("a/b.swp"), false);
            }
        }
        Op::Journaled { op, .. } => check_op(op),
        _ => {}
    }
}
