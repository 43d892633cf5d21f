//! The protocol loop: hello, then requests in, replies out.
//!
//! Threads: the calling thread reads and decodes frames (`stdin --requests--> workers`), a fixed
//! pool of workers runs them (several may use one handle at once), one journal lane runs
//! `Journaled` and `AppliedSeq` requests one at a time in arrival order
//! (`stdin --journaled requests--> lane`), the watcher (when enabled) produces events
//! (`watcher --events--> writer`), and one writer owns the output
//! (`workers, lane, watcher --encoded frames--> writer`), flushing whenever its queue runs empty.
//!
//! Memory stays bounded: the queues are bounded, and two byte budgets cap the request payloads
//! in flight and the read buffers waiting to be written (each admits at least one frame).

use std::io::{self, BufWriter, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use kmount_proto::{
    Event, FromAgent, Hello, Op, ProtoError, Reply, Request, ToAgent, WireError, decode, encode,
    features, frame_len, write_frame,
};

use crate::identity::Identity;
use crate::ops::{self, Agent};
use crate::walk::{self, Ticket};
use crate::watch::Sink;

pub const WORKERS: usize = 8;
const REQUEST_QUEUE: usize = 32;
/// Journaled requests waiting for the lane (the mount keeps up to 64 in flight).
const LANE_QUEUE: usize = 128;
const REPLY_QUEUE: usize = 32;
/// Request payloads in flight (writes, mostly). 16 MiB keeps 16 requests of 1 MiB moving.
const REQUEST_BUDGET: usize = 16 << 20;
/// Read buffers waiting for the writer.
const REPLY_BUDGET: usize = 16 << 20;
const OUTPUT_BUFFER: usize = 256 << 10;

/// Exit status after the mount closed the stream cleanly.
pub const EXIT_OK: i32 = 0;
/// Exit status after a broken stream (malformed frame, write error).
pub const EXIT_BROKEN: i32 = 1;
/// Exit status when the agent refuses to serve (bad root, hello mismatch).
pub const EXIT_REFUSED: i32 = 2;

pub fn software() -> String {
    format!("kmount-agent {}", env!("CARGO_PKG_VERSION"))
}

/// Our hello: `IDENTITY` only when identity switching is really possible.
pub fn hello(identity: &Identity) -> Hello {
    let mut features = features::TREE
        | features::WATCH
        | features::JOURNAL
        | features::RUNS_AS
        | features::RULES
        | features::COMMAND;
    if identity.active() {
        features |= features::IDENTITY;
    }
    Hello::new(features, software())
}

/// Says hello and then why the agent cannot serve, so the mount can show the reason.
pub fn refuse<W: Write>(out: &mut W, hello: &Hello, message: &str) -> io::Result<()> {
    write_frame(out, &FromAgent::Hello(hello.clone())).map_err(io::Error::other)?;
    write_frame(out, &FromAgent::Fatal(message.to_string())).map_err(io::Error::other)?;
    out.flush()
}

/// Serves one session until the input ends. Returns the process exit status.
pub fn run<R, W>(agent: Arc<Agent>, identity: Arc<Identity>, mut input: R, output: W) -> i32
where
    R: Read,
    W: Write + Send + 'static,
{
    let mut output = BufWriter::with_capacity(OUTPUT_BUFFER, output);
    let ours = hello(&identity);
    if let Err(e) = write_frame(&mut output, &FromAgent::Hello(ours.clone())) {
        eprintln!("kmount-agent: cannot send hello: {e}");
        return EXIT_BROKEN;
    }
    if let Err(e) = output.flush() {
        eprintln!("kmount-agent: cannot send hello: {e}");
        return EXIT_BROKEN;
    }
    match read_hello(&mut input, &ours) {
        Ok(Some(theirs)) => {
            if theirs & ours.features & features::RUNS_AS != 0 {
                // SAFETY: geteuid and getegid cannot fail.
                let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
                let runs_as = FromAgent::RunsAs {
                    uid,
                    gid,
                    groups: supplementary_groups(),
                };
                if let Err(e) = write_frame(&mut output, &runs_as) {
                    eprintln!("kmount-agent: cannot send who it runs as: {e}");
                    return EXIT_BROKEN;
                }
            }
        }
        Ok(None) => return EXIT_OK, // the mount left before saying hello
        Err(message) => {
            return fatal(output, &message, EXIT_REFUSED);
        }
    }

    let broken = Arc::new(AtomicBool::new(false));
    let requests_budget = Arc::new(Budget::new(REQUEST_BUDGET));
    let replies_budget = Arc::new(Budget::new(REPLY_BUDGET));
    // reader --decoded requests--> workers
    let (requests_tx, requests_rx) = sync_channel::<Job>(REQUEST_QUEUE);
    let requests_rx = Arc::new(Mutex::new(requests_rx));
    // reader --journaled requests, in arrival order--> lane
    let (lane_tx, lane_rx) = sync_channel::<Job>(LANE_QUEUE);
    // workers, lane, watcher --encoded frames--> writer
    let (replies_tx, replies_rx) = sync_channel::<Outgoing>(REPLY_QUEUE);
    agent.watch.set_sink(Some(events_sink(replies_tx.clone())));

    let writer = {
        let broken = broken.clone();
        thread::Builder::new()
            .name("writer".into())
            .spawn(move || write_loop(output, replies_rx, &broken))
            .expect("spawning a thread at start-up")
    };
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let (agent, identity) = (agent.clone(), identity.clone());
            let (rx, tx) = (requests_rx.clone(), replies_tx.clone());
            let budget = replies_budget.clone();
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || work_loop(&agent, &identity, &rx, &tx, &budget))
                .expect("spawning a thread at start-up")
        })
        .collect();
    let lane = {
        let (agent, identity, tx) = (agent.clone(), identity.clone(), replies_tx.clone());
        thread::Builder::new()
            .name("journal".into())
            .spawn(move || lane_loop(&agent, &identity, &lane_rx, &tx))
            .expect("spawning a thread at start-up")
    };
    let queues = Queues {
        pool: requests_tx,
        lane: lane_tx,
        replies: replies_tx,
        identity: identity.clone(),
    };
    let read_result = read_loop(&agent, &mut input, &queues, &requests_budget, &broken);
    drop(queues);
    // Commands still running end with the session (their threads then let go of the writer).
    agent.commands.kill_all();
    for w in workers {
        // A worker only ends by its queue closing; a panic was already caught per request.
        let _ = w.join();
    }
    let _ = lane.join();
    // The watcher holds the last sender to the writer.
    agent.watch.shutdown(&agent.echo);
    let (output, write_result) = writer.join().expect("the writer does not panic");
    if let Err(e) = write_result {
        eprintln!("kmount-agent: cannot write to the mount: {e}");
        return EXIT_BROKEN;
    }
    match read_result {
        Ok(()) => EXIT_OK,
        Err(message) => fatal(output, &message, EXIT_BROKEN),
    }
}

fn fatal<W: Write>(mut output: BufWriter<W>, message: &str, code: i32) -> i32 {
    eprintln!("kmount-agent: {message}");
    let _ = write_frame(&mut output, &FromAgent::Fatal(message.to_string()));
    let _ = output.flush();
    code
}

/// This process's supplementary groups (empty when they cannot be read).
fn supplementary_groups() -> Vec<u32> {
    // SAFETY: a zero-sized call only counts; the second fills at most `n` entries of a buffer
    // of that many.
    unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n <= 0 {
            return Vec::new();
        }
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let got = libc::getgroups(n, groups.as_mut_ptr());
        groups.truncate(got.max(0) as usize);
        groups
    }
}

/// Reads and checks the mount's hello; its features, `None` when the input ended before it.
fn read_hello<R: Read>(input: &mut R, ours: &Hello) -> Result<Option<u64>, String> {
    let Some(frame) = read_payload(input, None).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    match decode::<ToAgent>(&frame.payload) {
        Ok(ToAgent::Hello(theirs)) => ours
            .check_peer(&theirs)
            .map(|()| Some(theirs.features))
            .map_err(|e| format!("{e} (this side is {})", ours.software)),
        Ok(ToAgent::Request(_)) => {
            Err("the mount sent a request before its hello; it is not a kmount mount".into())
        }
        Err(e) => Err(format!("the mount's hello is unreadable: {e}")),
    }
}

/// One frame's payload, with the budget it holds. `None` at a clean end between frames.
fn read_payload<R: Read>(
    input: &mut R,
    budget: Option<&Arc<Budget>>,
) -> Result<Option<Frame>, ProtoError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match input.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(header)?;
    let permit = budget.map(|b| b.acquire(len));
    let mut payload = vec![0u8; len];
    input.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Truncated
        } else {
            ProtoError::Io(e)
        }
    })?;
    Ok(Some(Frame { payload, permit }))
}

/// One frame's payload and its share of the request budget.
struct Frame {
    payload: Vec<u8>,
    permit: Option<Permit>,
}

struct Job {
    req: Request,
    /// Holds the request's share of the request budget until it has run.
    _permit: Option<Permit>,
    /// A `WalkNext`'s place in line.
    ticket: Option<Ticket>,
}

/// Where the reader sends requests.
struct Queues {
    /// reader --requests--> workers
    pool: SyncSender<Job>,
    /// reader --journaled requests--> lane
    lane: SyncSender<Job>,
    /// command threads --replies--> writer
    replies: SyncSender<Outgoing>,
    identity: Arc<Identity>,
}

/// Events from the watcher become `FromAgent::Events` frames in the writer's queue.
fn events_sink(events_tx: SyncSender<Outgoing>) -> Sink {
    Arc::new(
        move |events: Vec<Event>| match encode(&FromAgent::Events(events)) {
            Ok(frame) => events_tx
                .send(Outgoing {
                    frame,
                    _permit: None,
                })
                .is_ok(),
            Err(e) => {
                eprintln!("kmount-agent: cannot encode watcher events: {e}");
                true
            }
        },
    )
}

struct Outgoing {
    frame: Vec<u8>,
    /// Holds a read's share of the reply budget until the reply is written.
    _permit: Option<Permit>,
}

fn read_loop<R: Read>(
    agent: &Arc<Agent>,
    input: &mut R,
    queues: &Queues,
    budget: &Arc<Budget>,
    broken: &AtomicBool,
) -> Result<(), String> {
    loop {
        if broken.load(Ordering::Relaxed) {
            return Ok(()); // nobody can hear replies any more
        }
        let Some(Frame { payload, permit }) =
            read_payload(input, Some(budget)).map_err(|e| format!("broken stream: {e}"))?
        else {
            return Ok(());
        };
        match decode::<ToAgent>(&payload) {
            Ok(ToAgent::Request(req)) if matches!(req.op, Op::RunCommand { .. }) => {
                drop(payload);
                run_command(agent, queues, req);
            }
            Ok(ToAgent::Request(req)) => {
                drop(payload);
                let ticket = match &req.op {
                    Op::WalkNext { handle, .. } => walk::ticket(agent, *handle),
                    _ => None,
                };
                let queue = match &req.op {
                    Op::Journaled { .. } | Op::AppliedSeq { .. } => &queues.lane,
                    _ => &queues.pool,
                };
                let job = Job {
                    req,
                    _permit: permit,
                    ticket,
                };
                if queue.send(job).is_err() {
                    return Ok(());
                }
            }
            Ok(ToAgent::Hello(_)) => return Err("the mount sent a second hello".into()),
            // A request that names something the protocol refuses (a path with `..`, a name
            // with `/`, ...) fails on its own; the frame boundary is intact, so the session
            // goes on. Only a frame that is not recognisably a request breaks the stream.
            Err(e) => match kmount_proto::request_id(&payload) {
                Some(id) => {
                    drop(payload);
                    drop(permit);
                    let result = Err(WireError::new(libc::EINVAL, format!("refused: {e}")));
                    let reply = Outgoing {
                        frame: encode_reply(id, result),
                        _permit: None,
                    };
                    if queues.replies.send(reply).is_err() {
                        return Ok(());
                    }
                }
                None => return Err(format!("broken stream: {e}")),
            },
        }
    }
}

/// Runs an `Op::RunCommand` on a thread of its own: it may take minutes, and the workers must
/// stay free for other requests meanwhile.
fn run_command(agent: &Arc<Agent>, queues: &Queues, req: Request) {
    let (agent, identity, tx) = (
        agent.clone(),
        queues.identity.clone(),
        queues.replies.clone(),
    );
    let id = req.id;
    let spawned = thread::Builder::new()
        .name("command".into())
        .spawn(move || {
            let result = run_request(&agent, &identity, req, None);
            let _ = tx.send(Outgoing {
                frame: encode_reply(id, result),
                _permit: None,
            });
        });
    if let Err(e) = spawned {
        let result = Err(WireError::new(
            libc::EAGAIN,
            format!("cannot start a thread for the command: {e}; try again later"),
        ));
        let _ = queues.replies.send(Outgoing {
            frame: encode_reply(id, result),
            _permit: None,
        });
    }
}

fn work_loop(
    agent: &Agent,
    identity: &Identity,
    requests_rx: &Mutex<Receiver<Job>>,
    replies_tx: &SyncSender<Outgoing>,
    budget: &Arc<Budget>,
) {
    loop {
        // The lock is only held while waiting for the next job, never while running one.
        let job = match requests_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let Job {
            req,
            _permit: request_permit,
            ticket,
        } = job;
        let reply_permit = match &req.op {
            Op::Read { len, .. } | Op::ReadPath { len, .. } => Some(budget.acquire(*len as usize)),
            _ => None,
        };
        let id = req.id;
        let result = run_request(agent, identity, req, ticket);
        drop(request_permit);
        let frame = encode_reply(id, result);
        if replies_tx
            .send(Outgoing {
                frame,
                _permit: reply_permit,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Runs journaled requests one at a time, in arrival order, and persists the journal position
/// when due and at the end.
fn lane_loop(
    agent: &Agent,
    identity: &Identity,
    lane_rx: &Receiver<Job>,
    replies_tx: &SyncSender<Outgoing>,
) {
    loop {
        let job = match agent.journal.persist_wait() {
            None => match lane_rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
            Some(wait) => match lane_rx.recv_timeout(wait) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    agent.journal.persist_due();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        let Job {
            req,
            _permit: request_permit,
            ticket,
        } = job;
        let id = req.id;
        let result = run_request(agent, identity, req, ticket);
        drop(request_permit);
        agent.journal.persist_due();
        if replies_tx
            .send(Outgoing {
                frame: encode_reply(id, result),
                _permit: None,
            })
            .is_err()
        {
            break;
        }
    }
    agent.journal.persist();
}

/// Runs one request as its caller. A panic in an operation is answered with `EIO` (the
/// identity guard restores the agent's own identity while unwinding).
fn run_request(
    agent: &Agent,
    identity: &Identity,
    req: Request,
    ticket: Option<Ticket>,
) -> Result<kmount_proto::Done, WireError> {
    let op = req.op;
    // The watcher and the journal's own files belong to the agent, not to a caller (a thread
    // started while acting as a caller would keep the caller's identity).
    let caller = match op {
        Op::Watch { .. } | Op::AppliedSeq { .. } | Op::RunCommand { .. } => None,
        _ => req.caller,
    };
    if let Op::Journaled { session, .. } = op {
        agent.journal.prepare(session);
    }
    catch_unwind(AssertUnwindSafe(|| {
        let _as_caller = identity.assume(caller.as_ref()).map_err(|e| {
            let c = caller.as_ref().expect("assume only fails with a caller");
            WireError::new(
                e.0,
                format!(
                    "cannot act as uid {} gid {}: {}",
                    c.uid,
                    c.gid,
                    e.describe()
                ),
            )
        })?;
        match (op, ticket) {
            (Op::WalkNext { handle, max }, Some(t)) => ops::walk_next(agent, handle, max, Some(t)),
            (op, _) => ops::execute(agent, op),
        }
    }))
    .unwrap_or_else(|_| Err(WireError::new(libc::EIO, "internal error in kmount-agent")))
}

fn encode_reply(id: u64, result: Result<kmount_proto::Done, WireError>) -> Vec<u8> {
    match encode(&FromAgent::Reply(Reply { id, result })) {
        Ok(frame) => frame,
        Err(e) => {
            let result = Err(WireError::new(
                libc::EOVERFLOW,
                format!("reply too large: {e}"),
            ));
            encode(&FromAgent::Reply(Reply { id, result }))
                .expect("a short error reply always encodes")
        }
    }
}

fn write_loop<W: Write>(
    mut output: BufWriter<W>,
    replies_rx: Receiver<Outgoing>,
    broken: &AtomicBool,
) -> (BufWriter<W>, io::Result<()>) {
    let mut failed: Option<io::Error> = None;
    let fail = |e: io::Error, failed: &mut Option<io::Error>| {
        broken.store(true, Ordering::Relaxed);
        failed.get_or_insert(e);
    };
    loop {
        let next = match replies_rx.try_recv() {
            Ok(m) => m,
            Err(TryRecvError::Empty) => {
                if failed.is_none()
                    && let Err(e) = output.flush()
                {
                    fail(e, &mut failed);
                }
                match replies_rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        // After a write error replies are dropped, so workers never block on a dead stream.
        if failed.is_none()
            && let Err(e) = output.write_all(&next.frame)
        {
            fail(e, &mut failed);
        }
    }
    if failed.is_none()
        && let Err(e) = output.flush()
    {
        fail(e, &mut failed);
    }
    match failed {
        Some(e) => (output, Err(e)),
        None => (output, Ok(())),
    }
}

/// A count of bytes that may be in flight; `acquire` waits until enough are free.
struct Budget {
    cap: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

struct Permit {
    budget: Arc<Budget>,
    n: usize,
}

impl Budget {
    fn new(cap: usize) -> Budget {
        Budget {
            cap,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits for `n` bytes (at most the whole budget, so one frame always fits).
    fn acquire(self: &Arc<Self>, n: usize) -> Permit {
        let n = n.min(self.cap);
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used + n > self.cap {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += n;
        Permit {
            budget: self.clone(),
            n,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= self.n;
        self.budget.freed.notify_all();
    }
}
