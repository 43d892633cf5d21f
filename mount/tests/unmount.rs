//! An unmount ends the session in bounded time, even while a file of the mount is open (the
//! unmount then only detaches it, and the kernel would keep the session waiting forever).

mod common;

use std::fs;
use std::io::Read;
use std::time::{Duration, Instant};

use common::{Mounted, Setup};

#[test]
fn unmount_with_an_open_file_ends_the_session() {
    let Some(mut m) = Mounted::new(Setup::default(), |r| {
        fs::write(r.join("held"), "held open").unwrap();
    }) else {
        return;
    };
    let mut held = fs::File::open(m.m("held")).unwrap();
    let handle = m.handle.take().unwrap();
    let started = Instant::now();
    let result = handle.unmount();
    let took = started.elapsed();
    println!("unmount with an open file: {result:?} after {took:.1?}");
    assert!(
        took < Duration::from_secs(30),
        "the unmount took {took:?}: the session was left waiting"
    );
    assert!(!common::is_mounted(m.mnt.path()));
    // The open file is cut off from the aborted session.
    let mut buf = String::new();
    let err = held.read_to_string(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
}
