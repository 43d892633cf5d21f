//! kmount's benchmark harness and the link emulation its tests share: a delaying TCP relay
//! ([`delay`]) and a throwaway sshd ([`sshd`]); the benchmark's data ([`tree`]), contenders
//! ([`contender`]) and workloads ([`workload`]).

pub mod contender;
pub mod delay;
pub mod sshd;
pub mod tree;
pub mod workload;
