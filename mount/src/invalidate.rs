//! Kernel cache invalidations, sent from one dedicated thread.
//!
//! Rules (each one learned from a deadlock or a stale cache elsewhere):
//! - Only the notifier thread calls the [`fuser::Notifier`]. An invalidation can block in the
//!   kernel until a FUSE request on the same directory has been answered, so calling it from a
//!   request handler, or while holding a lock a handler needs, can deadlock the mount.
//! - Whoever queues an [`Inval`] has already published the new state (the tree is updated
//!   first), so a request the kernel sends after the invalidation sees the new state.
//! - Regular files with open handles get their attributes invalidated only; the kernel then
//!   notices a changed size or mtime itself (`FUSE_AUTO_INVAL_DATA`) without throwing away
//!   pages a reader is using.
//! - After [`Invalidator::disarm`] (unmount), nothing more reaches the kernel.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use fuser::{INodeNo, Notifier};

/// One invalidation for the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Inval {
    /// The name `name` in `parent` may lead elsewhere now: drop the kernel's entry.
    Entry { parent: u64, name: Vec<u8> },
    /// `name` in `parent`, which named `child`, is gone.
    Delete {
        parent: u64,
        child: u64,
        name: Vec<u8>,
    },
    /// The attributes of `ino` changed; with `data`, its cached contents (or, for a directory,
    /// its cached listing) too.
    Inode { ino: u64, data: bool },
}

/// Counters, for tests and status.
#[derive(Debug, Default)]
pub struct InvalStats {
    /// Invalidations handed to the kernel.
    pub sent: AtomicU64,
    /// Invalidations the kernel refused (other than "not cached").
    pub failed: AtomicU64,
    /// Batches queued, and batches the notifier thread has finished (or dropped).
    pub queued: AtomicU64,
    pub done: AtomicU64,
}

/// The sending side; cheap to clone. Queueing never blocks.
#[derive(Debug, Clone)]
pub struct Invalidator {
    /// core, remote task --invalidations--> notifier thread
    inval_tx: mpsc::Sender<Vec<Inval>>,
    armed: Arc<AtomicBool>,
    stats: Arc<InvalStats>,
}

/// The receiving side before the thread starts (the notifier exists only once the session
/// does).
#[derive(Debug)]
pub struct InvalQueue {
    inval_rx: mpsc::Receiver<Vec<Inval>>,
    armed: Arc<AtomicBool>,
    stats: Arc<InvalStats>,
}

/// A queue of invalidations and its receiving end.
pub fn channel() -> (Invalidator, InvalQueue) {
    let (inval_tx, inval_rx) = mpsc::channel();
    let armed = Arc::new(AtomicBool::new(true));
    let stats = Arc::new(InvalStats::default());
    (
        Invalidator {
            inval_tx,
            armed: armed.clone(),
            stats: stats.clone(),
        },
        InvalQueue {
            inval_rx,
            armed,
            stats,
        },
    )
}

impl Invalidator {
    /// Queues a batch (in order). Does nothing once disarmed or when the batch is empty.
    pub fn send(&self, batch: Vec<Inval>) {
        if batch.is_empty() || !self.armed.load(Ordering::Acquire) {
            return;
        }
        self.stats.queued.fetch_add(1, Ordering::AcqRel);
        // The thread is gone only after the session ended; nothing to invalidate then.
        if self.inval_tx.send(batch).is_err() {
            self.stats.done.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Waits (at most `timeout`) until every invalidation queued before the call has been
    /// handed to the kernel.
    pub fn drain(&self, timeout: std::time::Duration) {
        let target = self.stats.queued.load(Ordering::Acquire);
        let deadline = std::time::Instant::now() + timeout;
        while self.stats.done.load(Ordering::Acquire) < target
            && self.armed.load(Ordering::Acquire)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Stops every later invalidation, queued or not, from reaching the kernel.
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::Release);
    }

    pub fn stats(&self) -> &InvalStats {
        &self.stats
    }
}

impl InvalQueue {
    /// Starts the notifier thread. It ends when every [`Invalidator`] is gone.
    pub fn start(self, notifier: Notifier) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("kmount-inval".to_string())
            .spawn(move || {
                let mut retries = Retries::default();
                loop {
                    let batch = match retries.next_due() {
                        None => match self.inval_rx.recv() {
                            Ok(b) => Some(b),
                            Err(_) => break,
                        },
                        Some(wait) => match self.inval_rx.recv_timeout(wait) {
                            Ok(b) => Some(b),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        },
                    };
                    for (inval, attempt) in retries.take_due() {
                        if self.armed.load(Ordering::Acquire) {
                            self.send_one(&notifier, &inval, attempt, &mut retries);
                        }
                    }
                    let Some(batch) = batch else { continue };
                    for inval in batch {
                        if !self.armed.load(Ordering::Acquire) {
                            break;
                        }
                        self.send_one(&notifier, &inval, 0, &mut retries);
                    }
                    self.stats.done.fetch_add(1, Ordering::AcqRel);
                }
            })
    }

    fn send_one(&self, notifier: &Notifier, inval: &Inval, attempt: u32, retries: &mut Retries) {
        let result = match inval {
            Inval::Entry { parent, name } => {
                notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
            }
            Inval::Delete {
                parent,
                child,
                name,
            } => notifier.delete(INodeNo(*parent), INodeNo(*child), OsStr::from_bytes(name)),
            Inval::Inode { ino, data } => {
                // offset -1: attributes only; offset 0, len 0: all data too.
                let offset = if *data { 0 } else { -1 };
                notifier.inval_inode(INodeNo(*ino), offset, 0)
            }
        };
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {}
            // The kernel has no inode of that number, though we queue invalidations only for
            // nodes it looked up: the answer to that lookup may be on its way in the kernel
            // (the reply is written, the inode not made yet), and it carries the attributes
            // from before this change, which would then be kept for the whole TTL. Sent again
            // a little later, it reaches the inode once it exists.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if matches!(inval, Inval::Inode { .. }) {
                    retries.push(inval.clone(), attempt + 1);
                }
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                // ENOTEMPTY (a directory still in use), EBADF after unmount: the kernel keeps
                // what it has, which expires or is revalidated.
                tracing::debug!(?inval, "invalidation refused: {e}");
            }
        }
    }
}

/// Inode invalidations the kernel answered "no such inode", to send again: after
/// [`RETRY_AFTER`] times the attempt number, at most [`RETRY_ATTEMPTS`] times.
#[derive(Default)]
struct Retries {
    due: Vec<(std::time::Instant, Inval, u32)>,
}

const RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(20);
/// The kernel makes the inode of a lookup or readdirplus answer in the context of the process
/// that asked, once it runs again: on a loaded machine that took over 200 ms (the four tries
/// of 20..80 ms were spent, and the file showed its size before a write for the whole TTL).
/// Twelve tries span about 2 s.
const RETRY_ATTEMPTS: u32 = 12;
const RETRY_MAX_GAP: std::time::Duration = std::time::Duration::from_millis(250);

impl Retries {
    fn push(&mut self, inval: Inval, attempt: u32) {
        if attempt > RETRY_ATTEMPTS {
            tracing::debug!(
                ?inval,
                "the kernel never made this inode; it forgot it, or keeps what an answer before \
                 the change said until the attributes expire"
            );
            return;
        }
        let at = std::time::Instant::now() + (RETRY_AFTER * attempt).min(RETRY_MAX_GAP);
        self.due.push((at, inval, attempt));
    }

    /// How long until the next retry is due, if any.
    fn next_due(&self) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        self.due
            .iter()
            .map(|(at, _, _)| at.saturating_duration_since(now))
            .min()
    }

    fn take_due(&mut self) -> Vec<(Inval, u32)> {
        let now = std::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.due.drain(..).partition(|(at, _, _)| *at <= now);
        self.due = later;
        due.into_iter().map(|(_, i, a)| (i, a)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disarmed_invalidator_queues_nothing() {
        let (inv, queue) = channel();
        inv.send(vec![Inval::Inode { ino: 5, data: true }]);
        inv.send(Vec::new());
        inv.disarm();
        inv.send(vec![Inval::Inode { ino: 6, data: true }]);
        let got: Vec<_> = queue.inval_rx.try_iter().collect();
        assert_eq!(got, vec![vec![Inval::Inode { ino: 5, data: true }]]);
    }
}
