//! `--on-change`: runs a command in the target after a batch of changes made through the
//! mount has been applied there (debounced, never overlapping).
//!
//! A batch starts with the first local change (the core's mutation count, or a write-back
//! journal record) and ends once [`QUIET`] has passed without another one *and* every change
//! so far is applied remotely. Then the command runs (`Op::RunCommand`, at most
//! [`RUN_TIMEOUT`]); changes made while it runs make exactly one more run after it. Changes
//! the command itself makes in the target arrive as remote changes and start nothing.
//!
//! Output goes to the log at info (target `kmount::on_change`); a failed run (non-zero exit,
//! signal, timeout, or no run at all) is a warning with its exit code and the end of its
//! output. [`Status`] is kept current for `kmount status`.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kmount_proto::{Done, Op, features};
use tokio::sync::watch;

use crate::client::CallError;
use crate::core::Core;

/// How long the mount must be quiet (no new local change) before a batch ends.
pub const QUIET: Duration = Duration::from_millis(300);
/// How long a batch waits, once quiet, for files still open for writing to be closed.
pub const WRITER_PATIENCE: Duration = Duration::from_secs(5);
/// Longest a run may take; the agent then kills it (its whole process group).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the change counters are looked at.
const POLL: Duration = Duration::from_millis(25);
/// Bytes of output shown with a failure.
const FAILURE_TAIL: usize = 2048;

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

/// The live status, shared between the runner and the mount handle.
pub type SharedStatus = Arc<Mutex<Status>>;

fn lock(s: &SharedStatus) -> std::sync::MutexGuard<'_, Status> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the runner watches and where it runs the command (the mount's core; a fake in tests).
pub trait Target: Send + Sync + 'static {
    /// A count that grows with every change made through the mount.
    fn changes(&self) -> u64;
    /// Whether a file is open for writing through the mount (its writes may go on).
    fn writing(&self) -> bool {
        false
    }
    /// Waits until every change made so far is applied remotely; `Err` says why it cannot be.
    fn applied(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Runs `command` in the target.
    fn run(&self, command: &str) -> impl Future<Output = Result<Done, CallError>> + Send;
}

/// The mount's core as a [`Target`].
struct CoreTarget(Arc<Core>);

impl Target for CoreTarget {
    fn writing(&self) -> bool {
        self.0.open_writers() > 0
    }

    fn changes(&self) -> u64 {
        // Direct changes count in the core; write-back changes as journal records.
        let records = self.0.write_back().map_or(0, |wb| wb.journal.tail());
        self.0.mutation_seq() + records
    }

    fn applied(&self) -> impl Future<Output = Result<(), String>> + Send {
        let core = self.0.clone();
        async move {
            if core.write_back().is_none() {
                return Ok(()); // changes reach the remote before the call that made them returns
            }
            // The sender takes durable records only.
            let c = core.clone();
            tokio::task::spawn_blocking(move || c.write_back().map(|wb| wb.journal.commit()))
                .await
                .map_err(|e| format!("cannot commit the journal: {e}"))?
                .transpose()
                .map_err(|e| format!("cannot commit the journal: {e}"))?;
            let Some(wb) = core.write_back() else {
                return Ok(());
            };
            let tail = wb.journal.tail();
            wb.journal
                .wait_applied(tail)
                .await
                .map_err(|e| format!("the changes were not applied: {e}"))
        }
    }

    fn run(&self, command: &str) -> impl Future<Output = Result<Done, CallError>> + Send {
        let core = self.0.clone();
        let op = Op::RunCommand {
            command: command.to_string(),
            timeout_ms: RUN_TIMEOUT.as_millis() as u64,
        };
        async move { core.client().call(op, None).await }
    }
}

/// Starts the runner for `command` on `runtime`; it ends with the mount. `done` is dropped
/// when it has ended. Returns its live status.
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    core: Arc<Core>,
    command: String,
    done: std::sync::mpsc::Sender<()>,
) -> SharedStatus {
    let status: SharedStatus = Arc::new(Mutex::new(Status {
        command: Some(command.clone()),
        ..Default::default()
    }));
    if core.client().features() & features::COMMAND == 0 {
        let why = format!(
            "the agent ({}) cannot run commands; use kmount and kmount-agent from the same \
             release to use --on-change",
            core.client().peer().software
        );
        tracing::warn!(target: "kmount::on_change", "{why}");
        lock(&status).last_error = Some(why);
        return status;
    }
    let shutdown = core.shutdown_signal();
    let s = status.clone();
    runtime.spawn(async move {
        run(CoreTarget(core), command, s, shutdown, QUIET).await;
        drop(done);
    });
    status
}

/// The runner: batches, waits, runs, until `shutdown` turns true. Changes count from the
/// call (not from when the future is first polled).
pub fn run<T: Target>(
    target: T,
    command: String,
    status: SharedStatus,
    mut shutdown: watch::Receiver<bool>,
    quiet: Duration,
) -> impl Future<Output = ()> + Send {
    let seen = target.changes();
    async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        tokio::select! {
            () = stop => {}
            () = runs(&target, seen, &command, &status, quiet) => {}
        }
        lock(&status).running = false;
    }
}

async fn runs<T: Target>(
    target: &T,
    mut seen: u64,
    command: &str,
    status: &SharedStatus,
    quiet: Duration,
) {
    loop {
        // A batch starts with a change ...
        while target.changes() == seen {
            tokio::time::sleep(POLL).await;
        }
        // ... and ends after a quiet spell, once everything is applied remotely.
        let mut last = target.changes();
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(POLL).await;
            let now = target.changes();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= quiet
                && (!target.writing() || since.elapsed() >= WRITER_PATIENCE)
            {
                // Quiet, and no file is still being written (a slow writer may pause longer
                // than the quiet spell; one that stays open, a log, is not waited for forever).
                break;
            }
        }
        if let Err(e) = target.applied().await {
            tracing::warn!(target: "kmount::on_change", "not running `{command}`: {e}");
            seen = last;
            continue;
        }
        // Changes from here on make the next batch.
        seen = last;
        lock(status).running = true;
        let started = Instant::now();
        let result = target.run(command).await;
        record(command, status, result, started.elapsed());
    }
}

/// Logs a run's outcome and updates the status.
fn record(command: &str, status: &SharedStatus, result: Result<Done, CallError>, took: Duration) {
    let mut s = lock(status);
    s.running = false;
    s.runs += 1;
    s.last_run = Some(SystemTime::now());
    let failure = match result {
        Ok(Done::Command {
            status: code,
            signal,
            output,
            truncated,
            millis,
        }) => {
            s.last_status = code;
            let text = String::from_utf8_lossy(&output);
            let text = text.trim_end();
            let cut = if truncated {
                " (output cut to its end)"
            } else {
                ""
            };
            match (code, signal) {
                (Some(0), _) => {
                    tracing::info!(
                        target: "kmount::on_change",
                        "`{command}` ran in {millis} ms{cut}{}{text}",
                        if text.is_empty() { "" } else { ":\n" }
                    );
                    None
                }
                (Some(c), _) => Some(format!(
                    "`{command}` exited with {c} after {millis} ms{}",
                    tail_of(text)
                )),
                (None, Some(sig)) => Some(format!(
                    "`{command}` was killed by signal {sig} after {millis} ms{}",
                    tail_of(text)
                )),
                (None, None) => Some(format!("`{command}` ended oddly{}", tail_of(text))),
            }
        }
        Ok(other) => {
            s.last_status = None;
            Some(format!(
                "`{command}`: the agent answered {other:?} after {} ms",
                took.as_millis()
            ))
        }
        Err(e) => {
            s.last_status = None;
            Some(format!("`{command}` did not run: {e}"))
        }
    };
    if let Some(why) = failure {
        s.failures += 1;
        tracing::warn!(target: "kmount::on_change", "{why}");
        s.last_error = Some(why);
    }
}

/// The end of a command's output, for a failure message.
fn tail_of(text: &str) -> String {
    if text.is_empty() {
        return String::new();
    }
    let mut start = text.len().saturating_sub(FAILURE_TAIL);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!(":\n{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Changes are counted by the test; runs are recorded with the change count they saw.
    #[derive(Default)]
    struct Fake {
        changes: AtomicU64,
        /// Changes not yet applied remotely (the run waits for 0).
        unapplied: AtomicU64,
        runs: Mutex<Vec<(Instant, u64)>>,
        /// How long a run takes.
        run_for: Duration,
        exit: i32,
        /// A file is open for writing.
        writing: std::sync::atomic::AtomicBool,
    }

    impl Target for Arc<Fake> {
        fn changes(&self) -> u64 {
            self.changes.load(Ordering::SeqCst)
        }
        fn writing(&self) -> bool {
            self.writing.load(Ordering::SeqCst)
        }
        fn applied(&self) -> impl Future<Output = Result<(), String>> + Send {
            let me = self.clone();
            async move {
                while me.unapplied.load(Ordering::SeqCst) > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(())
            }
        }
        fn run(&self, _command: &str) -> impl Future<Output = Result<Done, CallError>> + Send {
            let me = self.clone();
            async move {
                me.runs
                    .lock()
                    .unwrap()
                    .push((Instant::now(), me.changes.load(Ordering::SeqCst)));
                tokio::time::sleep(me.run_for).await;
                Ok(Done::Command {
                    status: Some(me.exit),
                    signal: None,
                    output: b"line one\nline two\n".to_vec(),
                    truncated: false,
                    millis: me.run_for.as_millis() as u64,
                })
            }
        }
    }

    struct Running {
        fake: Arc<Fake>,
        status: SharedStatus,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(fake: Fake, quiet: Duration) -> Running {
        start_shared(Arc::new(fake), quiet)
    }

    fn start_shared(fake: Arc<Fake>, quiet: Duration) -> Running {
        let status: SharedStatus = Arc::default();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run(fake.clone(), "make".into(), status.clone(), rx, quiet));
        Running {
            fake,
            status,
            stop,
            task,
        }
    }

    impl Running {
        fn change(&self) {
            self.fake.changes.fetch_add(1, Ordering::SeqCst);
        }
        fn runs(&self) -> usize {
            self.fake.runs.lock().unwrap().len()
        }
        async fn stop(self) -> Status {
            self.stop.send_replace(true);
            tokio::time::timeout(Duration::from_secs(2), self.task)
                .await
                .expect("the runner stops with the mount")
                .unwrap();
            lock(&self.status).clone()
        }
    }

    async fn sleep_ms(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    #[tokio::test]
    async fn a_burst_of_changes_makes_one_run_after_a_quiet_spell() {
        let r = start(Fake::default(), QUIET);
        sleep_ms(100).await;
        assert_eq!(r.runs(), 0, "nothing changed, nothing runs");
        let first = Instant::now();
        let mut last_change = first;
        for _ in 0..10 {
            sleep_ms(30).await;
            r.change();
            last_change = Instant::now();
        }
        sleep_ms(900).await;
        let runs = r.fake.runs.lock().unwrap().clone();
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert!(runs[0].0 >= last_change + QUIET - Duration::from_millis(5));
        assert!(runs[0].0 > first);
        let s = r.stop().await;
        assert_eq!((s.runs, s.failures, s.last_status), (1, 0, Some(0)));
        assert!(s.last_run.is_some() && !s.running);
    }

    #[tokio::test]
    async fn an_open_writer_holds_the_batch_back() {
        let fake = Arc::new(Fake::default());
        fake.writing.store(true, Ordering::SeqCst);
        let r = start_shared(fake.clone(), QUIET);
        r.change();
        sleep_ms(QUIET.as_millis() as u64 * 3).await;
        assert_eq!(r.runs(), 0, "ran while a file was still being written");
        fake.writing.store(false, Ordering::SeqCst);
        sleep_ms(QUIET.as_millis() as u64 + 200).await;
        assert_eq!(r.runs(), 1);
        r.stop().await;
    }

    #[tokio::test]
    async fn it_waits_until_everything_is_applied() {
        let r = start(Fake::default(), Duration::from_millis(50));
        r.fake.unapplied.store(1, Ordering::SeqCst);
        r.change();
        sleep_ms(400).await;
        assert_eq!(r.runs(), 0, "ran before the change reached the remote");
        r.fake.unapplied.store(0, Ordering::SeqCst);
        sleep_ms(200).await;
        assert_eq!(r.runs(), 1);
        r.stop().await;
    }

    #[tokio::test]
    async fn changes_during_a_run_make_exactly_one_more_run() {
        let r = start(
            Fake {
                run_for: Duration::from_millis(400),
                ..Default::default()
            },
            Duration::from_millis(50),
        );
        r.change();
        sleep_ms(200).await;
        assert_eq!(r.runs(), 1);
        assert!(lock(&r.status).running);
        for _ in 0..5 {
            r.change(); // while it runs
            sleep_ms(20).await;
        }
        sleep_ms(1200).await;
        let runs = r.fake.runs.lock().unwrap().clone();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!(
            runs[1].0 >= runs[0].0 + Duration::from_millis(400),
            "never two at once"
        );
        let s = r.stop().await;
        assert_eq!(s.runs, 2);
    }

    #[tokio::test]
    async fn a_failed_run_is_counted_with_its_output() {
        let r = start(
            Fake {
                exit: 2,
                ..Default::default()
            },
            Duration::from_millis(30),
        );
        r.change();
        sleep_ms(300).await;
        let s = r.stop().await;
        assert_eq!((s.runs, s.failures, s.last_status), (1, 1, Some(2)));
        let e = s.last_error.unwrap();
        assert!(e.contains("exited with 2") && e.contains("line two"), "{e}");
    }
}
