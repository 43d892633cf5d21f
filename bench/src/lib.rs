//! kmount's benchmark harness and the link emulation its tests share: a delaying TCP relay
//! ([`delay`]) and a throwaway sshd ([`sshd`]).

pub mod delay;
pub mod sshd;
