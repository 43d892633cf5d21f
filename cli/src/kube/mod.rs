//! Kubernetes targets: `kmount [TYPE/]NAME:/path` resolved to a pod and container, the agent
//! installed and run there through the exec subresource (kube-rs, no kubectl needed).

pub mod cluster;
mod connector;
mod error;
mod exec;
mod resolve;
mod target;

pub use connector::KubeConnector;
pub use target::{KubeOptions, KubeTarget};
