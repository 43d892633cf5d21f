//! `--on-change`: runs a command in the target after a batch of changes made through the
//! mount has been applied there (debounced, never overlapping).

use std::time::SystemTime;

/// What `kmount status` shows of the `--on-change` command.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// The command, when one is set.
    pub command: Option<String>,
    /// Runs finished so far.
    pub runs: u64,
    /// Runs that failed (non-zero exit, signal, timeout, or the agent could not start it).
    pub failures: u64,
    /// A run is under way.
    pub running: bool,
    /// When the last run ended.
    #[serde(with = "opt_unix_secs")]
    pub last_run: Option<SystemTime>,
    /// Exit code of the last run (`None`: a signal ended it, or it did not start).
    pub last_status: Option<i32>,
    /// Why the last failed run failed, with the end of its output.
    pub last_error: Option<String>,
}

mod opt_unix_secs {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}
