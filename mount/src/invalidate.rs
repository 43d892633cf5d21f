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
//! - Every inode invalidation is sent again a little later ([`FOLLOW_UPS`]): one that comes
//!   before the kernel has made the inode of an answer in flight is lost without an error.
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
        if let Err(e) = result {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            // ENOTEMPTY (a directory still in use), EBADF after unmount: the kernel keeps
            // what it has, which expires or is revalidated.
            tracing::debug!(?inval, "invalidation refused: {e}");
        }
        if matches!(inval, Inval::Inode { .. }) {
            retries.push(inval, attempt + 1);
        }
    }
}

/// Inode invalidations to send again. An answer that introduces an inode to the kernel (a
/// lookup, a readdirplus) is written before the kernel makes that inode: it does so when the
/// process that asked runs again. An invalidation queued meanwhile finds nothing, the kernel
/// answers ENOENT, which fuser's `Notifier` reports as success, and the answer's older
/// attributes then stay for the whole TTL (a file made and then written in the container
/// showed its size before the write for good, on a loaded machine). So every inode
/// invalidation is sent again [`FOLLOW_UPS`] later; a repeat costs one write to the FUSE
/// device, and for a node with cached pages one reread. Entry invalidations are not repeated:
/// a repeat would drop names the kernel has looked up since (and make it forget their nodes).
#[derive(Default)]
struct Retries {
    /// One queue per follow-up: each has one delay, so each is in time order.
    due: [std::collections::VecDeque<(std::time::Instant, Inval)>; FOLLOW_UPS.len()],
}

/// The delays of the repeats, each after the one before (about 1.3 s in all).
const FOLLOW_UPS: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(30),
    std::time::Duration::from_millis(250),
    std::time::Duration::from_millis(1000),
];

impl Retries {
    /// Schedules repeat number `attempt` (from 1) of `inval`, if there is one.
    fn push(&mut self, inval: &Inval, attempt: u32) {
        let Some(delay) = FOLLOW_UPS.get(attempt as usize - 1) else {
            return;
        };
        self.due[attempt as usize - 1]
            .push_back((std::time::Instant::now() + *delay, inval.clone()));
    }

    /// How long until the next repeat is due, if any.
    fn next_due(&self) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        self.due
            .iter()
            .filter_map(|q| q.front())
            .map(|(at, _)| at.saturating_duration_since(now))
            .min()
    }

    /// The repeats due now, with their numbers.
    fn take_due(&mut self) -> Vec<(Inval, u32)> {
        let now = std::time::Instant::now();
        let mut due = Vec::new();
        for (level, q) in self.due.iter_mut().enumerate() {
            while q.front().is_some_and(|(at, _)| *at <= now) {
                let (_, inval) = q.pop_front().expect("front checked");
                due.push((inval, level as u32 + 1));
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inode_invalidation_is_repeated_later_on_a_schedule() {
        let mut r = Retries::default();
        let inode = Inval::Inode { ino: 5, data: true };
        r.push(&inode, 1);
        assert!(r.take_due().is_empty(), "repeated at once");
        let wait = r.next_due().unwrap();
        assert!(
            wait <= FOLLOW_UPS[0] && wait > FOLLOW_UPS[0] / 2,
            "{wait:?}"
        );
        std::thread::sleep(wait);
        assert_eq!(r.take_due(), vec![(inode.clone(), 1)]);
        assert_eq!(r.next_due(), None);
        // The last repeat schedules nothing more.
        r.push(&inode, FOLLOW_UPS.len() as u32 + 1);
        assert_eq!(r.next_due(), None);
        r.push(&inode, FOLLOW_UPS.len() as u32);
        assert!(r.next_due().unwrap() > FOLLOW_UPS[0]);
    }

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
