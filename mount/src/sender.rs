//! The sender: takes the journal's durable records to the agent, in seq order, as
//! `Op::Journaled { session, seq, op }`, with up to [`MAX_IN_FLIGHT`] in flight.
//!
//! Invariants:
//! - It starts (and, after any failure or reconnection, starts again) from
//!   `max(agent's AppliedSeq, journal's applied) + 1`, so every record is applied exactly once
//!   in order (the agent skips seqs it has applied).
//! - A coalesced batch of records `first..=last` goes out as its operation under seq `first`
//!   followed by a no-op (`Ping`) under each later seq, so the agent still sees every seq one
//!   after the other ([`send_batch`]).
//! - Replies are taken in seq order; the journal's applied seq moves only over an unbroken run
//!   of successes.
//! - A record the remote refuses stops the sender there: the error is kept (status, `fsync`),
//!   logged, and the record is sent again after a backoff (100 ms doubling to 30 s).
//! - A record that was in flight when the stream broke and fails on replay with `EEXIST` or
//!   `ENOENT` did its work before the break: it counts as applied.
//! - When a record is applied, the nodes it was the last change of are settled: their remote
//!   identity and attributes are adopted ([`Core::settle`]).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kmount_proto::{Done, Op};
use tokio::sync::watch;

use crate::client::CallError;
use crate::core::Core;
use crate::journal::{Batch, Journal, Record, coalesce, op_paths};
use crate::local::RemoteError;

/// Journaled requests in flight at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Records read from the journal per round.
const READ_RECORDS: usize = 1024;
/// Bytes of records read per round (about).
const READ_BYTES: usize = 8 << 20;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// How long the records of a file still open for writing are held back, so that its new
/// content reaches the target in one piece rather than as the part written so far.
const HOLD_OPEN_FILE: Duration = Duration::from_secs(2);
/// How long the removal of a file, last in the journal, waits for the file to be made again:
/// an editor that saves by renames (vim: `x` -> `x~`, then a new `x`) removes the name there
/// just before it writes the new file, and both then go as one replacement
/// ([`crate::journal::coalesce`]), so the target never lacks the file in between.
const HOLD_REMOVAL: Duration = Duration::from_millis(50);
/// How often held records are looked at again.
const HOLD_POLL: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

type Reply = std::pin::Pin<Box<dyn Future<Output = Result<(Done, u64), CallError>> + Send>>;
/// A batch on its way: the connection generation it went out in, the watcher stamp when it
/// was sent ([`Core::heard_seq`]), and its reply.
type InFlight = (Batch, u64, u64, Reply);

/// Why a run of the sender ended.
enum Stop {
    Shutdown,
    /// Start again (after a failure, a reconnection, a refused coalesced batch).
    Restart,
}

/// Sends the journal until `shutdown` turns true.
pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    let Some(wb) = core.wb() else { return };
    let mut backoff = BACKOFF_FIRST;
    // Seqs in flight when a stream broke: their effect may already be in place.
    let mut interrupted: HashSet<u64> = HashSet::new();
    let mut coalescing = true;
    // Applying the session's records again, up to this seq, to an agent that lost them.
    let mut replaying: Option<u64> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match run_once(
            &core,
            &mut shutdown,
            &mut interrupted,
            &mut coalescing,
            &mut backoff,
            &mut replaying,
        )
        .await
        {
            Stop::Shutdown => return,
            Stop::Restart => {}
        }
        let blocked = wb.blocked().is_some();
        let pause = if blocked { backoff } else { BACKOFF_FIRST };
        if blocked {
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            () = tokio::time::sleep(pause) => {}
            // An fsync asks whether the remote takes it now.
            () = wb.retry_asked(), if blocked => {}
        }
    }
}

async fn run_once(
    core: &Arc<Core>,
    shutdown: &mut watch::Receiver<bool>,
    interrupted: &mut HashSet<u64>,
    coalescing: &mut bool,
    backoff: &mut Duration,
    replaying: &mut Option<u64>,
) -> Stop {
    let wb = core.wb().expect("the sender runs in write-back mode");
    let client = core.client().clone();
    let journal = &wb.journal;
    let session = journal.session();
    let mut durable = journal.watch_durable();
    // A stream first.
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Stop::Shutdown,
            up = client.wait_connected(Duration::from_secs(3600)) => if up { break },
        }
        if !client.reconnects() {
            // Gone for good: the records wait in the journal for the next kmount.
            let _ = shutdown.wait_for(|s| *s).await;
            return Stop::Shutdown;
        }
    }
    let generation = client.generation();
    let mut agent_applied = match client.call(Op::AppliedSeq { session }, None).await {
        Ok(Done::Seq(n)) => n,
        Ok(other) => {
            tracing::warn!("the agent answered AppliedSeq with {other:?}");
            return Stop::Restart;
        }
        Err(e) => {
            tracing::debug!("cannot ask the agent how far the journal got: {e}");
            return Stop::Restart;
        }
    };
    if agent_applied == 0 && journal.applied() > 0 {
        // An agent with no record of the session at all: a new one on a new filesystem (a
        // replaced pod), which has none of the changes applied so far. They count as pending
        // again and are sent again, from the journal's records (kept for this), before the
        // pending ones; the seqs of records no longer stored pass as no-ops.
        let until = journal.applied();
        let first = journal.first_retained();
        tracing::warn!(
            "the agent has no record of this session (a new pod, or its state was lost): \
             applying the session's changes again (records {first}..={until})"
        );
        match journal.rewind_applied(first.saturating_sub(1)) {
            Ok(to) => {
                if to > 0 {
                    tracing::warn!(
                        "records 1..={to} are no longer stored; their changes cannot be applied \
                         again"
                    );
                    if let Err(stop) = fast_forward(&client, session, 0, to).await {
                        return stop;
                    }
                    agent_applied = to;
                }
                *replaying = Some(until);
            }
            Err(e) => {
                tracing::error!("cannot apply the session's changes again: {e}");
            }
        }
    }
    if agent_applied > journal.applied() {
        let before = journal.applied();
        applied(core, journal, agent_applied).await;
        core.settle(before + 1, journal.applied(), None).await;
    } else if agent_applied < journal.applied() {
        // The agent keeps its applied seq lazily: one that was killed may have lost the last
        // few, which it did apply (it answered them). Records up to ours are applied; it is
        // told so with no-op records, since it takes seqs only one after the other.
        if let Err(stop) = fast_forward(&client, session, agent_applied, journal.applied()).await {
            return stop;
        }
    }
    replay_done(replaying, journal.applied());
    let mut next = journal.applied() + 1;
    let mut reader = journal.records_after(next - 1);
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut pending_records: VecDeque<Record> = VecDeque::new();
    // Since when the tail of `pending_records` is held back (a file still being written).
    let mut held_since: Option<std::time::Instant> = None;
    loop {
        // Fill the window.
        while in_flight.len() < MAX_IN_FLIGHT {
            if pending_records.is_empty() || held_since.is_some() {
                let mut bytes = 0;
                while pending_records.len() < READ_RECORDS && bytes < READ_BYTES {
                    match reader.next() {
                        Some(Ok(r)) => {
                            bytes += record_size(&r.op);
                            pending_records.push_back(r);
                        }
                        Some(Err(e)) => {
                            tracing::error!("cannot read the local journal: {e}");
                            wb.set_blocked(Some(RemoteError {
                                errno: libc::EIO,
                                path: None,
                                message: format!("cannot read the local journal: {e}"),
                                seq: Some(next),
                                at: SystemTime::now(),
                            }));
                            return Stop::Restart;
                        }
                        None => break,
                    }
                }
            }
            if pending_records.is_empty() {
                break;
            }
            let mut records: Vec<Record> = pending_records.drain(..).collect();
            let (hold, limit) = if *coalescing && !journal.has_waiters() {
                held_tail(core, &records)
            } else {
                (0, Duration::ZERO)
            };
            if hold > 0 && held_since.is_none_or(|t| t.elapsed() < limit) {
                held_since.get_or_insert_with(std::time::Instant::now);
                pending_records.extend(records.split_off(records.len() - hold));
            } else {
                held_since = None;
            }
            if records.is_empty() {
                break;
            }
            let batches = if *coalescing {
                coalesce(&records)
            } else {
                records
                    .iter()
                    .map(|r| Batch {
                        first_seq: r.seq,
                        seq: r.seq,
                        caller: r.caller.clone(),
                        op: r.op.clone(),
                    })
                    .collect()
            };
            for b in batches {
                // Sent here, in seq order; the replies are awaited below.
                tracing::debug!(
                    first = b.first_seq,
                    seq = b.seq,
                    "sending: {}",
                    crate::journal::summary(&b.op)
                );
                let asked = core.heard_seq();
                let reply = send_batch(&client, session, &b).await;
                next = b.seq + 1;
                in_flight.push_back((b, generation, asked, reply));
            }
        }
        // Wait for the oldest reply, new records, or the end.
        let Some((batch, sent_in, asked, reply)) = in_flight.pop_front() else {
            let held = held_since.is_some();
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Stop::Shutdown,
                r = durable.changed() => if r.is_err() { return Stop::Shutdown },
                () = tokio::time::sleep(HOLD_POLL), if held => {}
                // A save's end: its records go now, not at the next look.
                () = wb.file_closed(), if held => {}
            }
            continue;
        };
        let result = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Stop::Shutdown,
            r = reply => r,
        };
        match result {
            Ok((done, _)) => {
                interrupted.remove(&batch.seq);
                if wb.blocked().is_some() {
                    tracing::info!("the remote accepted seq {} again; sending on", batch.seq);
                    wb.set_blocked(None);
                }
                *backoff = BACKOFF_FIRST;
                // Settled before it counts as applied: whoever waits for it then sees the
                // nodes with their remote identity.
                core.settle(
                    batch.first_seq,
                    batch.seq,
                    Some((&batch.op, done, sent_in, asked)),
                )
                .await;
                applied(core, journal, batch.seq).await;
                replay_done(replaying, batch.seq);
            }
            Err(CallError::Remote(e)) => {
                let replayed = interrupted.remove(&batch.seq);
                if replayed && matches!(e.errno, libc::EEXIST | libc::ENOENT) {
                    tracing::debug!(
                        seq = batch.seq,
                        "a change sent before the connection broke had landed: {e}"
                    );
                    applied(core, journal, batch.seq).await;
                    core.settle(batch.first_seq, batch.seq, None).await;
                    continue;
                }
                if e.errno == libc::EPROTO && batch.first_seq != batch.seq && *coalescing {
                    tracing::warn!(
                        "the agent wants every journal record one by one ({e}); sending them \
                         uncoalesced"
                    );
                    *coalescing = false;
                    return Stop::Restart;
                }
                if e.errno == libc::ECANCELED {
                    // An earlier one failed and was handled; start again from it.
                    return Stop::Restart;
                }
                let path = op_paths(&batch.op).first().map(|p| (*p).clone());
                if replaying.is_some_and(|until| batch.seq <= until) {
                    // A change applied before, applied again to an agent that lost it, and
                    // refused now (the new target differs from the old one): passed over.
                    tracing::warn!(
                        seq = batch.seq,
                        "a change applied before could not be applied again{}: {e}; passed over",
                        path.as_ref()
                            .map(|p| format!(" to {p}"))
                            .unwrap_or_default()
                    );
                    let first = batch.first_seq;
                    return match fast_forward(&client, session, first - 1, batch.seq).await {
                        Ok(()) => {
                            core.settle(first, batch.seq, None).await;
                            applied(core, journal, batch.seq).await;
                            Stop::Restart
                        }
                        Err(stop) => stop,
                    };
                }
                if droppable(&batch, e.errno) {
                    // A change of metadata alone that the remote will never take (its
                    // permission rules differ from what the mount checked): it is dropped, so
                    // that it does not hold back everything after it, and the node shows the
                    // remote's attributes again.
                    tracing::warn!(
                        seq = batch.seq,
                        "the remote refused a change of attributes{}: {e}; dropped (the mount \
                         shows the target's attributes again)",
                        path.as_ref()
                            .map(|p| format!(" of {p}"))
                            .unwrap_or_default()
                    );
                    wb.note_error(RemoteError {
                        errno: e.errno,
                        path,
                        message: e.message.clone(),
                        seq: Some(batch.seq),
                        at: SystemTime::now(),
                    });
                    // The agent holds the session at this seq until it comes again: as a no-op.
                    let skip = Op::Journaled {
                        session,
                        seq: batch.seq,
                        op: Box::new(Op::Ping),
                    };
                    if let Ok(wait) = client.send_ordered(skip, None).await
                        && wait.await.is_ok()
                    {
                        core.settle(batch.first_seq, batch.seq, None).await;
                        applied(core, journal, batch.seq).await;
                    }
                    // Those sent after it were cancelled: start again after it.
                    return Stop::Restart;
                }
                if e.errno == libc::ENOENT
                    && needs_existing_file(&batch.op)
                    && let Some(p) = &path
                {
                    // The target removed the file while changes to its bytes were on their
                    // way: the local version wins (nothing close() accepted is dropped). It is
                    // made again there, whole, and this record is sent again on top of it.
                    match core.wb_recreate(p).await {
                        Ok(()) => {
                            tracing::warn!(
                                seq = batch.seq,
                                "the target removed {p} while changes to it were on their way; \
                                 it was made there again with the version written here (remove \
                                 it through the mount to remove it)"
                            );
                            return Stop::Restart;
                        }
                        Err(why) => tracing::debug!("cannot make {p} again in the target: {why}"),
                    }
                }
                tracing::warn!(
                    seq = batch.seq,
                    "the remote refused a change{}: {e}; it stays in the journal and is sent \
                     again",
                    path.as_ref()
                        .map(|p| format!(" to {p}"))
                        .unwrap_or_default()
                );
                wb.set_blocked(Some(RemoteError {
                    errno: e.errno,
                    path,
                    message: e.message.clone(),
                    seq: Some(batch.seq),
                    at: SystemTime::now(),
                }));
                return Stop::Restart;
            }
            Err(CallError::NotSent(reason)) => {
                tracing::debug!(
                    "the journal stream broke before seq {}: {reason}",
                    batch.seq
                );
                return Stop::Restart;
            }
            Err(CallError::Disconnected(reason)) => {
                tracing::debug!("the journal stream broke: {reason}");
                interrupted.insert(batch.seq);
                // Those behind it may have reached the agent too.
                for (b, _, _, _) in in_flight.drain(..) {
                    interrupted.insert(b.seq);
                }
                return Stop::Restart;
            }
            Err(CallError::Encode(e)) => {
                tracing::error!(seq = batch.seq, "cannot encode a journal record: {e}");
                wb.set_blocked(Some(RemoteError {
                    errno: libc::EIO,
                    path: None,
                    message: e,
                    seq: Some(batch.seq),
                    at: SystemTime::now(),
                }));
                return Stop::Restart;
            }
        }
    }
}

/// Sends one batch: its operation under its first seq, then a no-op (`Ping`) under each
/// later seq it covers (the agent takes seqs only one after the other). The reply is the
/// operation's, once every seq of the batch is answered.
/// How many records at the end of `records` to hold back, and for how long at most (since the
/// hold began): a run that makes or rewrites one file from its start (a `Create`, or a
/// truncation to 0) and writes it, while that file is still open here ([`HOLD_OPEN_FILE`]).
/// Sent now, the target would get the part written so far, closed, and then the rest: a
/// watcher there would act on a half-written file. The removal of the file just before such
/// a run is held with it, and a removal last of all for [`HOLD_REMOVAL`].
fn held_tail(core: &Core, records: &[Record]) -> (usize, Duration) {
    let none = (0, Duration::ZERO);
    let Some(last) = records.last() else {
        return none;
    };
    if matches!(last.op, Op::Unlink { .. }) {
        return (1, HOLD_REMOVAL);
    }
    let paths = op_paths(&last.op);
    let [path] = paths.as_slice() else {
        return none;
    };
    let path = (*path).clone();
    let mut start = None;
    for (i, r) in records.iter().enumerate().rev() {
        let same = op_paths(&r.op).as_slice() == [&path];
        if !same || (i + 1 < records.len() && records[i + 1].seq != r.seq + 1) {
            break;
        }
        match &r.op {
            Op::Create { .. } => {
                start = Some(i);
                break;
            }
            Op::SetAttr { set, .. } if set.size == Some(0) => {
                start = Some(i);
                break;
            }
            Op::WritePath { .. } | Op::SetAttr { .. } | Op::FallocatePath { .. } => {}
            _ => break,
        }
    }
    let Some(mut start) = start else {
        return none;
    };
    if start > 0
        && records[start - 1].seq + 1 == records[start].seq
        && matches!(&records[start - 1].op, Op::Unlink { path: p } if *p == path)
    {
        start -= 1;
    }
    let t = core.tree().lock();
    match t.resolve(&path) {
        Some(id) if t.is_open(id) => (records.len() - start, HOLD_OPEN_FILE),
        _ => none,
    }
}

async fn send_batch(client: &crate::client::Client, session: u64, b: &Batch) -> Reply {
    let op = Op::Journaled {
        session,
        seq: b.first_seq,
        op: Box::new(b.op.clone()),
    };
    let main = match client.send_ordered(op, b.caller.clone()).await {
        Ok(wait) => wait,
        Err(e) => return Box::pin(std::future::ready(Err(e))),
    };
    if b.first_seq >= b.seq {
        return Box::pin(main);
    }
    let mut pads = Vec::new();
    let mut unsent = None;
    for seq in b.first_seq + 1..=b.seq {
        let pad = Op::Journaled {
            session,
            seq,
            op: Box::new(Op::Ping),
        };
        match client.send_ordered(pad, None).await {
            Ok(wait) => pads.push(wait),
            Err(e) => {
                unsent = Some(e);
                break;
            }
        }
    }
    Box::pin(async move {
        let done = main.await?;
        for pad in pads {
            pad.await?;
        }
        match unsent {
            Some(e) => Err(e),
            None => Ok(done),
        }
    })
}

/// Ends the replay (see [`run`]) once the records up to `applied` are applied again.
fn replay_done(replaying: &mut Option<u64>, applied: u64) {
    if replaying.is_some_and(|until| applied >= until) {
        tracing::info!("the session's changes are applied again");
        *replaying = None;
    }
}

/// Brings the agent's applied seq of `session` from `from` up to `to` with `Ping` records.
async fn fast_forward(
    client: &crate::client::Client,
    session: u64,
    from: u64,
    to: u64,
) -> Result<(), Stop> {
    tracing::info!(
        "the agent lost track of journal records {}..={to}, which it applied; telling it",
        from + 1
    );
    let mut waits = VecDeque::new();
    for seq in from + 1..=to {
        let op = Op::Journaled {
            session,
            seq,
            op: Box::new(Op::Ping),
        };
        match client.send_ordered(op, None).await {
            Ok(w) => waits.push_back(w),
            Err(_) => return Err(Stop::Restart),
        }
        while waits.len() >= MAX_IN_FLIGHT {
            if let Some(w) = waits.pop_front()
                && w.await.is_err()
            {
                return Err(Stop::Restart);
            }
        }
    }
    for w in waits {
        if w.await.is_err() {
            return Err(Stop::Restart);
        }
    }
    Ok(())
}

/// A refused record that is dropped rather than retried: one changing attributes only (mode,
/// owner, times) that the remote refuses for permission, or a change of extended attributes
/// (refused for whatever reason: they live on the remote only, and whoever made it waits for
/// the answer and gets the errno).
fn droppable(batch: &Batch, errno: i32) -> bool {
    batch.first_seq == batch.seq
        && match &batch.op {
            Op::SetAttr { set, .. } => {
                set.size.is_none() && matches!(errno, libc::EACCES | libc::EPERM)
            }
            Op::SetXattr { .. } | Op::RemoveXattr { .. } => true,
            _ => false,
        }
}

fn record_size(op: &Op) -> usize {
    match op {
        Op::WritePath { data, .. } | Op::PutFile { data, .. } => data.len() + 64,
        _ => 128,
    }
}

/// A record that changes a file that must exist already (its bytes or attributes), and so
/// fails with `ENOENT` only when the file is gone.
fn needs_existing_file(op: &Op) -> bool {
    matches!(
        op,
        Op::WritePath { .. } | Op::FallocatePath { .. } | Op::SetAttr { .. }
    )
}

/// Records up to `seq` count as applied from now on; remote changes left out while they were
/// pending are looked at again.
async fn applied(core: &Core, journal: &Journal, seq: u64) {
    journal.mark_applied(seq);
    core.look_again_left_out().await;
}
