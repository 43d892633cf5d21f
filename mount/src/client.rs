//! The connection to the agent: a hello each way, then many requests in flight over one byte
//! stream, answered in any order.
//!
//! One writer task owns the stream's write half and one reader task owns the read half; callers
//! only touch the pending map (id -> reply slot) and the queue of encoded frames. Remote
//! changes (`FromAgent::Events`) go out through [`Client::take_events`].
//!
//! When the stream breaks, every pending call fails with [`CallError::Disconnected`] at once,
//! unless the client was made with a connector ([`Client::connect_shared`]): then a new stream
//! is made through it with exponential backoff, and calls that need the remote wait for it up
//! to a bounded time (requests harmless to repeat go out again). Nothing waits forever.

use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kmount_proto::rules::{Rules, RulesConfig, RulesError};
use kmount_proto::{
    Caller, Done, Event, FromAgent, Hello, NodeRef, Op, ProtoError, RelPath, Reply, Request,
    ToAgent, WireError, decode, encode, features, frame_len,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

/// How long the other end may take to say hello (a remote command can take a while to start).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(60);

/// A hello frame is tiny; a bigger announced length means the stream is not kmount.
const MAX_HELLO_LEN: usize = 4096;

/// Encoded frames waiting for the writer task.
const FRAME_QUEUE: usize = 256;

/// Bytes of the agent's stderr kept for error messages.
const STDERR_KEEP: usize = 8192;

/// The ignore file at the root of the served directory, read at the start of every session.
pub const KMOUNTIGNORE: &str = ".kmountignore";
/// The most of it that is read.
const KMOUNTIGNORE_MAX: u32 = 1 << 20;
/// How [`Client::requests_sent`] counts the reads of `.kmountignore` (apart from the
/// `ReadPath`s of file contents).
pub const KMOUNTIGNORE_READS: &str = "ReadPath(.kmountignore)";

/// A byte stream to an agent, as a [`Connector`] produces it.
pub struct BoxedStream {
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    pub writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// The local process at the other end (the agent, or `ssh`/`kubectl` carrying it), if any.
    /// It is killed when the connection is dropped.
    pub child: Option<Child>,
    /// What that process writes on stderr, kept for error messages.
    pub stderr: Option<StderrTail>,
}

impl std::fmt::Debug for BoxedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoxedStream")
            .field("child", &self.child.as_ref().and_then(|c| c.id()))
            .finish_non_exhaustive()
    }
}

pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send + 'a>>;

/// Obtains a fresh byte stream to an agent (a local child process, `kubectl exec`, `ssh`, ...).
pub trait Connector: Send + Sync {
    fn connect(&self) -> ConnectFuture<'_>;
    /// Names the other end for error messages, e.g. "the agent /usr/bin/kmount-agent".
    fn describe(&self) -> String;
}

/// Runs `agent_binary args.. root` as a child process and talks to it over its stdin/stdout.
#[derive(Debug, Clone)]
pub struct LocalConnector {
    agent_binary: PathBuf,
    root: PathBuf,
    args: Vec<OsString>,
}

impl LocalConnector {
    pub fn new(agent_binary: PathBuf, root: PathBuf, args: Vec<OsString>) -> Self {
        Self {
            agent_binary,
            root,
            args,
        }
    }
}

impl LocalConnector {
    /// The same, running another program as the agent (a wrapper that starts the agent as
    /// another user, say).
    pub fn with_agent(mut self, agent_binary: PathBuf) -> Self {
        self.agent_binary = agent_binary;
        self
    }
}

impl Connector for LocalConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let mut child = Command::new(&self.agent_binary)
                .args(&self.args)
                .arg(&self.root)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Its own process group: a Ctrl-C meant for kmount must not kill the agent
                // before kmount has unmounted cleanly.
                .process_group(0)
                .kill_on_drop(true)
                .spawn()?;
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(io::Error::other("the agent's stdio pipes were not created"));
            };
            Ok(BoxedStream {
                reader: Box::new(stdout),
                writer: Box::new(stdin),
                child: Some(child),
                stderr: Some(StderrTail::spawn(stderr)),
            })
        })
    }

    fn describe(&self) -> String {
        format!("the agent {}", self.agent_binary.display())
    }
}

/// Collects the last few KiB a process writes on stderr and logs each line.
#[derive(Debug, Clone)]
pub struct StderrTail {
    tail: Arc<Mutex<Vec<u8>>>,
    /// Becomes true when the stream has ended.
    ended: watch::Receiver<bool>,
}

impl StderrTail {
    /// Starts a task draining `reader`. Must be called within a tokio runtime.
    pub fn spawn<R: AsyncRead + Send + Unpin + 'static>(mut reader: R) -> Self {
        let tail = Arc::new(Mutex::new(Vec::new()));
        let (ended_tx, ended_rx) = watch::channel(false);
        let task_tail = tail.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 4096];
            let mut line = Vec::new();
            loop {
                let n = match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                {
                    let mut tail = lock(&task_tail);
                    tail.extend_from_slice(&chunk[..n]);
                    if tail.len() > STDERR_KEEP {
                        let cut = tail.len() - STDERR_KEEP;
                        tail.drain(..cut);
                    }
                }
                for &b in &chunk[..n] {
                    if b == b'\n' || line.len() >= 1024 {
                        log_stderr_line(&line);
                        line.clear();
                    }
                    if b != b'\n' {
                        line.push(b);
                    }
                }
            }
            if !line.is_empty() {
                log_stderr_line(&line);
            }
            let _ = ended_tx.send(true);
        });
        Self {
            tail,
            ended: ended_rx,
        }
    }

    /// The text collected so far, after waiting up to `wait` for the stream to end.
    pub async fn text(&self, wait: Duration) -> String {
        let mut ended = self.ended.clone();
        let _ = tokio::time::timeout(wait, ended.wait_for(|e| *e)).await;
        String::from_utf8_lossy(&lock(&self.tail))
            .trim()
            .to_string()
    }
}

fn log_stderr_line(line: &[u8]) {
    tracing::warn!(target: "kmount::agent", "{}", String::from_utf8_lossy(line).trim_end());
}

/// Failure to establish a session.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The agent said why it cannot serve; the text is meant for the user as it is.
    #[error("{0}")]
    Agent(String),
    #[error("{what} did not start a kmount session: {detail}")]
    NoSession { what: String, detail: String },
    /// The text already holds the mismatch, so it is not also a `source` (which would print
    /// it twice in an error chain).
    #[error("{mismatch}; use kmount and kmount-agent from the same release")]
    Version { mismatch: ProtoError },
    #[error("{what} did not say hello within {} s{stderr}", timeout.as_secs())]
    Timeout {
        what: String,
        timeout: Duration,
        /// "; its error output: ..." or empty.
        stderr: String,
    },
}

/// Failure of one call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The operation ran in the agent and failed there.
    #[error("{0}")]
    Remote(WireError),
    /// The stream to the agent is gone; the text says how. The request may have reached the
    /// agent.
    #[error("the connection to the agent is gone: {0}")]
    Disconnected(String),
    /// The stream broke before it took the request: the agent never saw it.
    #[error("the connection to the agent is gone (the request was not sent): {0}")]
    NotSent(String),
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

/// How long a call that needs the remote waits for a broken connection to come back, and how
/// long a connected agent may stay silent while requests wait for it before the stream is
/// taken for dead (a frozen process, a link that dropped without closing) and replaced.
pub const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_secs(30);

/// First pause before reconnecting; it doubles after each failure up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Batches of remote changes waiting for the mount.
const EVENT_QUEUE: usize = 1024;

/// What the client reports besides replies (`client --events--> core`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Changes the agent's watcher saw, in order. `since`: the local-change sequence number
    /// ([`Client::local_clock`]) when they arrived. The agent sends an event before the reply
    /// of any own operation that changed its path after it looked, so a node changed here
    /// after `since` may have a change of ours the event does not show yet.
    Changes { events: Vec<Event>, since: u64 },
    /// Batches of changes were dropped because the mount fell behind: anything may have
    /// changed.
    Overflow,
    /// The stream broke; calls that need the remote wait for a new one.
    Disconnected(String),
    /// A new session replaced a broken one. Agent handles of earlier sessions are void.
    Reconnected { generation: u64 },
}

/// The state of the connection, for status lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkStatus {
    Connected {
        /// Counts sessions from 1.
        generation: u64,
    },
    /// The stream broke at `since`; a new one is being tried.
    Reconnecting {
        since: Instant,
        attempts: u32,
        last_error: String,
    },
    /// Broken for good: there is no connector to reconnect through.
    Closed { reason: String },
}

/// A session with an agent. Cheap to clone; all clones share the one stream. With a
/// [`Connector`] ([`Client::connect_shared`]), a broken stream is replaced by a new one.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.shared.peer.software)
            .field("features", &self.shared.features)
            .finish_non_exhaustive()
    }
}

struct Shared {
    next_id: AtomicU64,
    /// Names the other end in messages.
    what: String,
    /// Reconnects through this when the stream breaks.
    connector: Option<Arc<dyn Connector>>,
    /// The first session's hello; the mount chose its mode by its features.
    peer: Hello,
    features: u64,
    /// Who the first session's agent runs as (uid, gid, supplementary groups), when it said.
    runs_as: Option<(u32, u32, Vec<u32>)>,
    /// Milliseconds a call waits for a lost connection to come back.
    remote_timeout_ms: AtomicU64,
    link: watch::Sender<Link>,
    events: Arc<EventSink>,
    /// Requests sent, by operation.
    sent: Mutex<HashMap<&'static str, u64>>,
    /// The ignore rules in force ([`Client::set_rules`] and the root's `.kmountignore`),
    /// compiled.
    rules: Mutex<Arc<Rules>>,
    /// What [`Client::set_rules`] was given, sent at the start of every session.
    rules_cfg: Mutex<Option<RulesConfig>>,
    /// Counts [`Client::set_rules`] calls; a session is ready once it has applied the latest.
    rules_version: AtomicU64,
    /// The agent cannot apply rules, and the user was told.
    rules_warned: AtomicBool,
}

#[derive(Clone)]
enum Link {
    Up(Arc<Conn>),
    Down {
        since: Instant,
        attempts: u32,
        reason: String,
        /// A reconnection is under way.
        retrying: bool,
    },
}

/// One stream to an agent.
struct Conn {
    generation: u64,
    calls: Arc<Calls>,
    /// callers --(request id, encoded frame)--> writer task
    frames_tx: mpsc::Sender<(u64, Frame)>,
    /// The agent's features in this session.
    features: u64,
    /// The [`Shared::rules_version`] this session's agent has (0: none).
    rules_applied: AtomicU64,
    /// Held while the rules are being sent, so every other request of the session waits.
    rules_gate: tokio::sync::Mutex<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Link::Up(conn) = &*self.link.borrow() {
            lock(&conn.calls.state).closing = true;
        }
    }
}

/// Where remote changes go: nowhere until the mount takes the receiver.
#[derive(Default)]
struct EventSink {
    /// client --events--> core
    tx: Mutex<Option<mpsc::Sender<ClientEvent>>>,
    rx: Mutex<Option<mpsc::Receiver<ClientEvent>>>,
    /// Batches were dropped; the next successful send starts with [`ClientEvent::Overflow`].
    overflowed: std::sync::atomic::AtomicBool,
    /// The local-change sequence number ([`Client::local_clock`]).
    clock: Arc<AtomicU64>,
}

impl EventSink {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        Self {
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(Some(rx)),
            overflowed: Default::default(),
            clock: Arc::default(),
        }
    }

    fn emit(&self, event: ClientEvent) {
        let mut guard = lock(&self.tx);
        let Some(tx) = guard.as_ref() else { return };
        if lock(&self.rx).is_some() {
            // Nobody consumes events yet: there is no model to keep current.
            return;
        }
        if self.overflowed.load(Ordering::Acquire) {
            if tx.try_send(ClientEvent::Overflow).is_err() {
                return;
            }
            self.overflowed.store(false, Ordering::Release);
        }
        match tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflowed.swap(true, Ordering::AcqRel) {
                    tracing::warn!("remote changes arrive faster than the mount applies them");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // Nobody listens any more (the mount ended); the guard is held already.
                guard.take();
            }
        }
    }
}

/// An encoded request, shared so that it can go out again on a new stream without a copy.
type Frame = Arc<Vec<u8>>;

/// What a caller waiting for a reply gets.
enum Answer {
    Reply(Result<Done, WireError>),
    /// The stream broke before any of the request was written: the agent never saw it.
    Unsent,
}

type ReplySlot = oneshot::Sender<Answer>;

struct Pending {
    slot: ReplySlot,
    /// The whole frame went into the stream (the agent may have seen it).
    written: bool,
}

#[derive(Default)]
struct CallState {
    pending: HashMap<u64, Pending>,
    /// Why the stream is unusable; set once, never cleared.
    broken: Option<String>,
    /// Every [`Client`] is gone, so the end of the stream is expected.
    closing: bool,
}

/// Reply slots of the requests in flight on one stream.
struct Calls {
    state: Mutex<CallState>,
    /// Bytes received from the agent so far: any shows it is alive (one big frame on a slow
    /// link takes long to arrive whole).
    bytes_in: Arc<AtomicU64>,
    /// Turns true when the stream is given up for dead: its reader and writer stop at once
    /// (a frozen agent never ends them by itself).
    cut: watch::Sender<bool>,
}

impl Calls {
    fn new() -> Self {
        Self {
            state: Mutex::new(CallState::default()),
            bytes_in: Arc::new(AtomicU64::new(0)),
            cut: watch::channel(false).0,
        }
    }

    /// Whether a request that reached the stream waits for its reply.
    fn waiting(&self) -> bool {
        lock(&self.state).pending.values().any(|p| p.written)
    }

    fn register(&self, id: u64, slot: ReplySlot) -> Result<(), String> {
        let mut st = lock(&self.state);
        if let Some(reason) = &st.broken {
            return Err(reason.clone());
        }
        st.pending.insert(
            id,
            Pending {
                slot,
                written: false,
            },
        );
        Ok(())
    }

    fn mark_written(&self, id: u64) {
        if let Some(p) = lock(&self.state).pending.get_mut(&id) {
            p.written = true;
        }
    }

    fn unregister(&self, id: u64) {
        lock(&self.state).pending.remove(&id);
    }

    fn complete(&self, reply: Reply) {
        let pending = lock(&self.state).pending.remove(&reply.id);
        match pending {
            // A send error means the caller stopped waiting; nothing to do.
            Some(p) => drop(p.slot.send(Answer::Reply(reply.result))),
            None => tracing::debug!(id = reply.id, "reply to a request nobody waits for"),
        }
    }

    /// Marks the stream broken and ends every pending call: those never written learn so
    /// ([`Answer::Unsent`]), the others lose their slot. Returns whether the end was expected
    /// (every client is gone).
    fn break_all(&self, reason: String) -> bool {
        let mut st = lock(&self.state);
        if st.broken.is_none() {
            st.broken = Some(reason);
        }
        for (_, p) in st.pending.drain() {
            if !p.written {
                let _ = p.slot.send(Answer::Unsent);
            }
        }
        st.closing
    }

    fn reason(&self) -> String {
        lock(&self.state)
            .broken
            .clone()
            .unwrap_or_else(|| "the connection closed".to_string())
    }
}

/// Removes a pending entry when a call is abandoned before its reply arrives.
struct PendingGuard<'a> {
    calls: &'a Calls,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.calls.unregister(self.id);
    }
}

/// Why a call on one stream got no reply.
enum Failure {
    /// The request never reached the stream: it can go out on the next one.
    Unsent(String),
    /// It may have reached the agent.
    Lost(String),
}

impl Conn {
    async fn call(&self, id: u64, frame: Frame) -> Result<Result<Done, WireError>, Failure> {
        let (slot_tx, slot_rx) = oneshot::channel();
        if let Err(reason) = self.calls.register(id, slot_tx) {
            return Err(Failure::Unsent(reason));
        }
        let _guard = PendingGuard {
            calls: &self.calls,
            id,
        };
        if self.frames_tx.send((id, frame)).await.is_err() {
            return Err(Failure::Unsent(self.calls.reason()));
        }
        match slot_rx.await {
            Ok(Answer::Reply(result)) => Ok(result),
            Ok(Answer::Unsent) => Err(Failure::Unsent(self.calls.reason())),
            Err(_) => Err(Failure::Lost(self.calls.reason())),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected sections never panic midway, so a poisoned lock still holds valid data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn software() -> String {
    format!("kmount {}", env!("CARGO_PKG_VERSION"))
}

/// Whether sending `op` again is harmless when its reply was lost with the stream: it reads,
/// or it states a result rather than a step (a path-addressed write at an explicit offset).
/// Handle-addressed requests never are: handles die with their session.
fn replayable(op: &Op) -> bool {
    match op {
        Op::Lookup { .. }
        | Op::Readlink { .. }
        | Op::Statfs
        | Op::Access { .. }
        | Op::Ping
        | Op::OpenDir { .. }
        | Op::WalkOpen { .. }
        | Op::Watch { .. }
        | Op::Digest { .. }
        | Op::AppliedSeq { .. }
        | Op::ReadPath { .. }
        | Op::FsyncPath { .. } => true,
        Op::GetAttr { node } | Op::GetXattr { node, .. } | Op::ListXattr { node } => {
            matches!(node, NodeRef::Path(_))
        }
        Op::Open { flags, .. } => flags & libc::O_TRUNC == 0,
        // Creating a file that may exist already ends the same way twice (an O_TRUNC of a
        // file just made empty changes nothing); with O_EXCL the second would fail.
        Op::Create { flags, .. } => flags & libc::O_EXCL == 0,
        _ => false,
    }
}

/// A stream after a successful hello exchange.
struct Handshaken {
    reader: Box<dyn AsyncRead + Send + Unpin>,
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    child: Option<Child>,
    theirs: Hello,
    features: u64,
    /// The uid, gid and groups the agent runs as, when it said.
    runs_as: Option<(u32, u32, Vec<u32>)>,
}

/// Completes the hello exchange on `stream`.
async fn handshake(stream: BoxedStream, what: &str) -> Result<Handshaken, ClientError> {
    let BoxedStream {
        mut reader,
        mut writer,
        mut child,
        stderr,
    } = stream;
    let ours = Hello::new(OUR_FEATURES, software());
    let exchange = tokio::time::timeout(
        HELLO_TIMEOUT,
        hello_exchange(&mut reader, &mut writer, &ours),
    )
    .await;
    let (theirs, runs_as) = match exchange {
        Ok(Ok(answer)) => answer,
        Ok(Err(failure)) => {
            return Err(failure.into_error(what, &stderr, child.as_mut()).await);
        }
        Err(_) => {
            return Err(ClientError::Timeout {
                what: what.to_string(),
                timeout: HELLO_TIMEOUT,
                stderr: stderr_note(&stderr, Duration::ZERO).await,
            });
        }
    };
    let features = ours.features & theirs.features;
    tracing::debug!(peer = %theirs.software, features, "session established");
    Ok(Handshaken {
        reader,
        writer,
        child,
        theirs,
        features,
        runs_as,
    })
}

/// Features this side supports.
const OUR_FEATURES: u64 = features::IDENTITY
    | features::TREE
    | features::WATCH
    | features::JOURNAL
    | features::RUNS_AS
    | features::RULES
    | features::COMMAND;

/// Starts the reader and writer tasks of a new stream.
fn start_conn(
    h: Handshaken,
    generation: u64,
    shared: Weak<Shared>,
    events: Arc<EventSink>,
) -> Arc<Conn> {
    let calls = Arc::new(Calls::new());
    let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
    tokio::spawn(watchdog(
        calls.clone(),
        frames_tx.downgrade(),
        shared.clone(),
        generation,
    ));
    tokio::spawn(write_loop(
        h.writer,
        frames_rx,
        calls.clone(),
        shared.clone(),
        generation,
    ));
    tokio::spawn(read_loop(
        h.reader,
        calls.clone(),
        h.child,
        shared,
        generation,
        events,
    ));
    Arc::new(Conn {
        generation,
        calls,
        frames_tx,
        features: h.features,
        rules_applied: AtomicU64::new(0),
        rules_gate: tokio::sync::Mutex::new(()),
    })
}

impl Shared {
    /// The stream of session `generation` broke: calls wait for a new one (when there is a
    /// connector) and a reconnection starts.
    fn link_down(self: &Arc<Self>, generation: u64, reason: String) {
        let retrying = self.connector.is_some();
        let changed = self.link.send_if_modified(|link| match link {
            Link::Up(conn) if conn.generation == generation => {
                *link = Link::Down {
                    since: Instant::now(),
                    attempts: 0,
                    reason: reason.clone(),
                    retrying,
                };
                true
            }
            _ => false,
        });
        if !changed {
            return;
        }
        self.events.emit(ClientEvent::Disconnected(reason));
        if retrying {
            tokio::spawn(reconnect_loop(Arc::downgrade(self), generation + 1));
        }
    }

    /// Makes sure the session on `conn` has the latest rules before anything else is sent on
    /// it: the first request of a session (or the first after [`Client::set_rules`]) sends
    /// them, and every other waits meanwhile. A failure means the stream broke.
    async fn ensure_rules(&self, conn: &Conn) -> Result<(), Failure> {
        let want = self.rules_version.load(Ordering::Acquire);
        if conn.rules_applied.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        let _gate = conn.rules_gate.lock().await;
        let want = self.rules_version.load(Ordering::Acquire);
        if conn.rules_applied.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        let cfg = lock(&self.rules_cfg).clone();
        if let Some(cfg) = cfg {
            self.session_rules(conn, cfg).await?;
        }
        conn.rules_applied.store(want, Ordering::Release);
        Ok(())
    }

    /// Reads `.kmountignore`, compiles the rules with it and sends them (`Op::SetRules`).
    async fn session_rules(&self, conn: &Conn, mut cfg: RulesConfig) -> Result<(), Failure> {
        if conn.features & features::RULES == 0 {
            let user_rules = !cfg.exclude.is_empty() || !cfg.local_only.is_empty();
            if user_rules && !self.rules_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the agent ({}) cannot apply ignore rules: paths matched by --exclude and                      --local-only are still listed and walked there, and .kmountignore is not                      read; use kmount and kmount-agent from the same release",
                    self.peer.software
                );
            }
            return Ok(());
        }
        if conn.features & features::JOURNAL != 0 {
            cfg.kmountignore = self
                .read_kmountignore(conn)
                .await?
                .map(|text| (PathBuf::from(KMOUNTIGNORE), text));
        }
        let rules = match Rules::new(&cfg) {
            Ok(rules) => rules,
            Err(e) => {
                tracing::warn!(
                    "ignoring {KMOUNTIGNORE}: {e}; fix that line (kmount reads the file again                      when it reconnects or is mounted again)"
                );
                cfg.kmountignore = None;
                Rules::new(&cfg).unwrap_or_else(|e| {
                    tracing::warn!("bad ignore rule: {e}; no path is hidden");
                    Rules::none()
                })
            }
        };
        *lock(&self.rules) = Arc::new(rules);
        match self
            .call_on(conn, Op::SetRules { rules: cfg }, "SetRules")
            .await?
        {
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "the agent refused the ignore rules: {e}; it shows every path to this mount"
            ),
        }
        Ok(())
    }

    /// The text of `.kmountignore` at the root, `None` when there is none (or it cannot be
    /// read, which is logged).
    async fn read_kmountignore(&self, conn: &Conn) -> Result<Option<String>, Failure> {
        let op = Op::ReadPath {
            path: RelPath::new(KMOUNTIGNORE.as_bytes().to_vec())
                .expect("a plain file name is a valid path"),
            offset: 0,
            len: KMOUNTIGNORE_MAX,
        };
        let data = match self.call_on(conn, op, KMOUNTIGNORE_READS).await? {
            Ok(Done::Content {
                data, compressed, ..
            }) if compressed => {
                match kmount_proto::tree::decompress(&data, KMOUNTIGNORE_MAX as usize) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(
                            "cannot read {KMOUNTIGNORE}: malformed reply ({e}); going on without it"
                        );
                        return Ok(None);
                    }
                }
            }
            Ok(Done::Content { data, .. }) => data,
            Ok(other) => {
                tracing::warn!(
                    "cannot read {KMOUNTIGNORE}: the agent answered {other:?}; going on without it"
                );
                return Ok(None);
            }
            Err(e) if e.errno == libc::ENOENT => return Ok(None),
            Err(e) => {
                tracing::warn!(
                    "cannot read {KMOUNTIGNORE} at the root: {e}; going on without it (make it                      a readable regular file, or remove it)"
                );
                return Ok(None);
            }
        };
        if data.len() >= KMOUNTIGNORE_MAX as usize {
            tracing::warn!(
                "{KMOUNTIGNORE} is larger than {} KiB; only its beginning is used",
                KMOUNTIGNORE_MAX >> 10
            );
        }
        Ok(Some(String::from_utf8_lossy(&data).into_owned()))
    }

    /// Sends `op` on `conn` itself (session set-up, before the session is open to others),
    /// counted as `kind` in [`Client::requests_sent`].
    async fn call_on(
        &self,
        conn: &Conn,
        op: Op,
        kind: &'static str,
    ) -> Result<Result<Done, WireError>, Failure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        *lock(&self.sent).entry(kind).or_default() += 1;
        let frame: Frame = Arc::new(
            encode(&ToAgent::Request(Request {
                id,
                caller: None,
                op,
            }))
            .map_err(|e| Failure::Unsent(format!("cannot encode a request: {e}")))?,
        );
        conn.call(id, frame).await
    }

    fn remote_timeout(&self) -> Duration {
        Duration::from_millis(self.remote_timeout_ms.load(Ordering::Relaxed))
    }

    /// The current stream, waiting until `deadline` for one while a reconnection is under
    /// way.
    async fn wait_up(&self, deadline: tokio::time::Instant) -> Result<Arc<Conn>, CallError> {
        let mut rx = self.link.subscribe();
        loop {
            let link = rx.borrow_and_update().clone();
            let reason = match link {
                Link::Up(conn) => return Ok(conn),
                Link::Down {
                    retrying: false,
                    reason,
                    ..
                } => return Err(CallError::Disconnected(reason)),
                Link::Down { reason, .. } => reason,
            };
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(CallError::Disconnected(reason)),
                Err(_) => {
                    return Err(CallError::Disconnected(format!(
                        "{reason}; it did not come back within {} s (check that the target \
                         is up: `kmount status`; kmount keeps reconnecting, and \
                         --remote-timeout sets how long requests wait)",
                        self.remote_timeout().as_secs_f64()
                    )));
                }
            }
        }
    }
}

/// Replaces a broken stream: connects through the connector with exponential backoff until
/// it works or every client is gone.
async fn reconnect_loop(shared: Weak<Shared>, generation: u64) {
    let mut delay = RECONNECT_FIRST;
    let mut attempts = 0u32;
    loop {
        tokio::time::sleep(delay).await;
        let Some(s) = shared.upgrade() else { return };
        let Some(connector) = s.connector.clone() else {
            return;
        };
        attempts += 1;
        let result = async {
            let stream = connector
                .connect()
                .await
                .map_err(|source| ClientError::Spawn {
                    what: s.what.clone(),
                    source,
                })?;
            handshake(stream, &s.what).await
        }
        .await;
        // The session gets the rules before it is open to anybody else.
        let result = match result {
            Ok(h) => {
                if h.features != s.features {
                    tracing::warn!(
                        "the new agent session offers features {:#x}, the first offered {:#x}",
                        h.features,
                        s.features
                    );
                }
                let conn = start_conn(h, generation, shared.clone(), s.events.clone());
                match tokio::time::timeout(HELLO_TIMEOUT, s.ensure_rules(&conn)).await {
                    Ok(Ok(())) => Ok(conn),
                    Ok(Err(Failure::Unsent(reason) | Failure::Lost(reason))) => Err(format!(
                        "the new session broke while it was being set up: {reason}"
                    )),
                    Err(_) => Err(format!(
                        "the new session did not answer its set-up (ignore rules) within {} s",
                        HELLO_TIMEOUT.as_secs()
                    )),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(conn) => {
                s.link.send_replace(Link::Up(conn));
                tracing::info!(generation, attempts, "reconnected to {}", s.what);
                s.events.emit(ClientEvent::Reconnected { generation });
                return;
            }
            Err(e) => {
                if attempts == 1 || attempts.is_multiple_of(10) {
                    tracing::warn!("reconnecting to {} (attempt {attempts}): {e}", s.what);
                } else {
                    tracing::debug!("reconnecting to {} (attempt {attempts}): {e}", s.what);
                }
                s.link.send_modify(|link| {
                    if let Link::Down {
                        attempts: a,
                        reason,
                        ..
                    } = link
                    {
                        *a = attempts;
                        *reason = e.clone();
                    }
                });
                delay = (delay * 2).min(RECONNECT_MAX);
            }
        }
    }
}

impl Client {
    /// Connects through `connector` and completes the hello exchange. A broken stream is not
    /// replaced; see [`Client::connect_shared`] for that.
    pub async fn connect(connector: &dyn Connector) -> Result<Client, ClientError> {
        let what = connector.describe();
        let stream = connector
            .connect()
            .await
            .map_err(|source| ClientError::Spawn {
                what: what.clone(),
                source,
            })?;
        Self::start(stream, &what, None).await
    }

    /// Connects through `connector` and keeps it: when the stream breaks, a new one is made
    /// through it (with exponential backoff, 100 ms up to 5 s between attempts). Calls that
    /// need the remote wait for it up to [`Client::set_remote_timeout`].
    pub async fn connect_shared(connector: Arc<dyn Connector>) -> Result<Client, ClientError> {
        let what = connector.describe();
        let stream = connector
            .connect()
            .await
            .map_err(|source| ClientError::Spawn {
                what: what.clone(),
                source,
            })?;
        Self::start(stream, &what, Some(connector)).await
    }

    /// Completes the hello exchange on an already open stream. `what` names the other end in
    /// error messages. A broken stream is not replaced.
    pub async fn from_stream(stream: BoxedStream, what: &str) -> Result<Client, ClientError> {
        Self::start(stream, what, None).await
    }

    async fn start(
        stream: BoxedStream,
        what: &str,
        connector: Option<Arc<dyn Connector>>,
    ) -> Result<Client, ClientError> {
        let h = handshake(stream, what).await?;
        let events = Arc::new(EventSink::new());
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| {
            let peer = h.theirs.clone();
            let features = h.features;
            let runs_as = h.runs_as.clone();
            let conn = start_conn(h, 1, weak.clone(), events.clone());
            let (link, _) = watch::channel(Link::Up(conn));
            Shared {
                next_id: AtomicU64::new(1),
                what: what.to_string(),
                connector,
                peer,
                features,
                runs_as,
                remote_timeout_ms: AtomicU64::new(DEFAULT_REMOTE_TIMEOUT.as_millis() as u64),
                link,
                events,
                sent: Mutex::new(HashMap::new()),
                rules: Mutex::new(Arc::new(Rules::none())),
                rules_cfg: Mutex::new(None),
                rules_version: AtomicU64::new(0),
                rules_warned: AtomicBool::new(false),
            }
        });
        Ok(Client { shared })
    }

    /// The ignore rules in force: which paths are excluded, local-only or synced.
    pub fn rules(&self) -> Arc<Rules> {
        self.shared
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets the ignore rules of this mount. They go to the agent (`Op::SetRules`, when it
    /// offers [`features::RULES`]) at the start of every session, before any other request of
    /// that session, together with the root's `.kmountignore` as it is then (read afresh each
    /// time; a bad line is logged and the file left out). On the current session they go
    /// before the next request. An invalid pattern in `cfg` itself is an error here.
    pub fn set_rules(&self, cfg: &RulesConfig) -> Result<(), RulesError> {
        let rules = Rules::new(cfg)?;
        *lock(&self.shared.rules) = Arc::new(rules);
        *lock(&self.shared.rules_cfg) = Some(cfg.clone());
        self.shared.rules_version.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// How long calls wait for a broken connection to come back before failing.
    pub fn set_remote_timeout(&self, timeout: Duration) {
        self.shared
            .remote_timeout_ms
            .store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// The local-change sequence number the mount's core counts its changes with (see
    /// [`ClientEvent::Changes`]): events are stamped with it as they arrive.
    pub fn local_clock(&self) -> Arc<AtomicU64> {
        self.shared.events.clock.clone()
    }

    /// The receiver of remote changes and connection events; `Some` once. Until it is taken,
    /// remote changes are dropped.
    pub fn take_events(&self) -> Option<mpsc::Receiver<ClientEvent>> {
        lock(&self.shared.events.rx).take()
    }

    /// Sends one request and waits for its reply. Safe to call from many tasks at once.
    ///
    /// When the stream breaks and a new one comes (a connector was given), a request that
    /// never left, or one that is harmless to repeat ([`replayable`]), goes out again on the
    /// new stream; others fail with [`CallError::Disconnected`].
    pub async fn call(&self, op: Op, caller: Option<Caller>) -> Result<Done, CallError> {
        self.call_inner(op, caller, None)
            .await
            .map(|(done, _)| done)
    }

    /// Like [`Client::call`], also returning the session the reply came from (for requests
    /// that hand out agent handles; see [`Client::call_in`]).
    pub async fn call_gen(&self, op: Op, caller: Option<Caller>) -> Result<(Done, u64), CallError> {
        self.call_inner(op, caller, None).await
    }

    /// Like [`Client::call`] for a request naming an agent handle of session `generation`: it
    /// fails at once when that session is gone, and never goes out on another one.
    pub async fn call_in(
        &self,
        generation: u64,
        op: Op,
        caller: Option<Caller>,
    ) -> Result<Done, CallError> {
        self.call_inner(op, caller, Some(generation))
            .await
            .map(|(done, _)| done)
    }

    async fn call_inner(
        &self,
        op: Op,
        caller: Option<Caller>,
        generation: Option<u64>,
    ) -> Result<(Done, u64), CallError> {
        let shared = &self.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let replay = shared.connector.is_some() && generation.is_none() && replayable(&op);
        *lock(&shared.sent).entry(op_name(&op)).or_default() += 1;
        let frame: Frame = Arc::new(
            encode(&ToAgent::Request(Request { id, caller, op }))
                .map_err(|e| CallError::Encode(e.to_string()))?,
        );
        let deadline = tokio::time::Instant::now() + shared.remote_timeout();
        loop {
            let conn = match generation {
                None => shared.wait_up(deadline).await?,
                Some(g) => match &*shared.link.borrow() {
                    Link::Up(conn) if conn.generation == g => conn.clone(),
                    _ => {
                        return Err(CallError::Disconnected(
                            "the session that opened this handle has ended".to_string(),
                        ));
                    }
                },
            };
            if let Err(Failure::Unsent(reason) | Failure::Lost(reason)) =
                shared.ensure_rules(&conn).await
            {
                // This request itself was not sent.
                shared.link_down(conn.generation, reason.clone());
                if generation.is_some() || shared.connector.is_none() {
                    return Err(CallError::Disconnected(reason));
                }
                continue;
            }
            match conn.call(id, frame.clone()).await {
                Ok(result) => {
                    return result
                        .map(|done| (done, conn.generation))
                        .map_err(CallError::Remote);
                }
                Err(Failure::Unsent(reason)) => {
                    shared.link_down(conn.generation, reason.clone());
                    if generation.is_some() || shared.connector.is_none() {
                        return Err(CallError::Disconnected(reason));
                    }
                }
                Err(Failure::Lost(reason)) => {
                    shared.link_down(conn.generation, reason.clone());
                    if !replay {
                        return Err(CallError::Disconnected(reason));
                    }
                }
            }
        }
    }

    /// Sends `op` now, in the order of calls to this method, and returns the wait for its
    /// reply (with the session it came from). Nothing is sent again after a broken stream:
    /// the caller (the journal sender) replays itself. A request the stream never took fails
    /// with [`CallError::NotSent`].
    pub async fn send_ordered(
        &self,
        op: Op,
        caller: Option<Caller>,
    ) -> Result<impl Future<Output = Result<(Done, u64), CallError>> + Send + 'static, CallError>
    {
        let shared = &self.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        *lock(&shared.sent).entry(op_name(&op)).or_default() += 1;
        let frame: Frame = Arc::new(
            encode(&ToAgent::Request(Request { id, caller, op }))
                .map_err(|e| CallError::Encode(e.to_string()))?,
        );
        let conn = match &*shared.link.borrow() {
            Link::Up(conn) => conn.clone(),
            Link::Down { reason, .. } => return Err(CallError::NotSent(reason.clone())),
        };
        if let Err(Failure::Unsent(reason) | Failure::Lost(reason)) =
            shared.ensure_rules(&conn).await
        {
            shared.link_down(conn.generation, reason.clone());
            return Err(CallError::NotSent(reason));
        }
        let (slot_tx, slot_rx) = oneshot::channel();
        conn.calls
            .register(id, slot_tx)
            .map_err(CallError::NotSent)?;
        if conn.frames_tx.send((id, frame)).await.is_err() {
            conn.calls.unregister(id);
            return Err(CallError::NotSent(conn.calls.reason()));
        }
        let weak = Arc::downgrade(shared);
        Ok(async move {
            let guard = PendingGuard {
                calls: &conn.calls,
                id,
            };
            let answer = slot_rx.await;
            drop(guard);
            let broke = |reason: String| {
                if let Some(s) = weak.upgrade() {
                    s.link_down(conn.generation, reason);
                }
            };
            match answer {
                Ok(Answer::Reply(r)) => r
                    .map(|done| (done, conn.generation))
                    .map_err(CallError::Remote),
                Ok(Answer::Unsent) => {
                    let reason = conn.calls.reason();
                    broke(reason.clone());
                    Err(CallError::NotSent(reason))
                }
                Err(_) => {
                    let reason = conn.calls.reason();
                    broke(reason.clone());
                    Err(CallError::Disconnected(reason))
                }
            }
        })
    }

    /// Feature bits both ends supported in the first session ([`kmount_proto::features`]).
    pub fn features(&self) -> u64 {
        self.shared.features
    }

    /// The agent's hello of the first session (its software and version).
    pub fn peer(&self) -> &Hello {
        &self.shared.peer
    }

    /// The uid and gid the agent of the first session runs as, when it said (agents that
    /// announce [`features::RUNS_AS`]).
    pub fn agent_user(&self) -> Option<(u32, u32)> {
        self.shared
            .runs_as
            .as_ref()
            .map(|(uid, gid, _)| (*uid, *gid))
    }

    /// The supplementary groups of that user (empty when the agent did not say).
    pub fn agent_groups(&self) -> Vec<u32> {
        self.shared
            .runs_as
            .as_ref()
            .map(|(_, _, groups)| groups.clone())
            .unwrap_or_default()
    }

    /// True while a stream is up.
    pub fn is_connected(&self) -> bool {
        matches!(&*self.shared.link.borrow(), Link::Up(c) if !c.calls.is_broken())
    }

    /// The current session's number (1 for the first, one more for each reconnection).
    pub fn generation(&self) -> u64 {
        match &*self.shared.link.borrow() {
            Link::Up(conn) => conn.generation,
            Link::Down { .. } => 0,
        }
    }

    /// Requests of kind `kind` (as [`op_name`] names them) sent so far.
    pub fn requests_sent(&self, kind: &str) -> u64 {
        lock(&self.shared.sent).get(kind).copied().unwrap_or(0)
    }

    /// Whether a broken stream is replaced by a new one.
    pub fn reconnects(&self) -> bool {
        self.shared.connector.is_some()
    }

    /// The state of the connection.
    pub fn status(&self) -> LinkStatus {
        match &*self.shared.link.borrow() {
            Link::Up(conn) => LinkStatus::Connected {
                generation: conn.generation,
            },
            Link::Down {
                retrying: true,
                since,
                attempts,
                reason,
            } => LinkStatus::Reconnecting {
                since: *since,
                attempts: *attempts,
                last_error: reason.clone(),
            },
            Link::Down { reason, .. } => LinkStatus::Closed {
                reason: reason.clone(),
            },
        }
    }

    /// Waits until a stream is up (at once when it is), at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        self.shared.wait_up(deadline).await.is_ok()
    }

    /// The features of the current session (0 while disconnected).
    pub fn session_features(&self) -> u64 {
        match &*self.shared.link.borrow() {
            Link::Up(conn) => conn.features,
            Link::Down { .. } => 0,
        }
    }
}

impl Calls {
    fn is_broken(&self) -> bool {
        lock(&self.state).broken.is_some()
    }
}

/// Why a hello exchange failed, before the stderr of the other end is added.
enum HelloFailure {
    /// The stream ended; `got` is what came before.
    Ended {
        got: Vec<u8>,
    },
    /// The bytes are not a kmount hello.
    NotKmount {
        got: Vec<u8>,
    },
    Version(ProtoError),
    Fatal(String),
    Refused(WireError),
    Io(io::Error),
}

impl HelloFailure {
    async fn into_error(
        self,
        what: &str,
        stderr: &Option<StderrTail>,
        child: Option<&mut Child>,
    ) -> ClientError {
        let detail = match self {
            HelloFailure::Fatal(msg) => return ClientError::Agent(msg),
            HelloFailure::Version(mismatch) => return ClientError::Version { mismatch },
            HelloFailure::Refused(e) => format!("it refused the session: {e}"),
            HelloFailure::Ended { got } if got.is_empty() => "it closed the stream at once".into(),
            HelloFailure::Ended { got } => format!(
                "the stream ended in the middle of its hello after {}",
                show_bytes(&got)
            ),
            HelloFailure::NotKmount { got } => format!("it wrote {}", show_bytes(&got)),
            HelloFailure::Io(e) => format!("the stream failed: {e}"),
        };
        let mut detail = detail;
        detail.push_str(&stderr_note(stderr, Duration::from_secs(2)).await);
        if let Some(child) = child
            && let Ok(Ok(status)) =
                tokio::time::timeout(Duration::from_millis(500), child.wait()).await
        {
            detail.push_str(&format!("; it exited with {status}"));
        }
        ClientError::NoSession {
            what: what.to_string(),
            detail,
        }
    }
}

fn show_bytes(got: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(&got[..got.len().min(256)]))
}

async fn stderr_note(stderr: &Option<StderrTail>, wait: Duration) -> String {
    match stderr {
        Some(tail) => {
            let text = tail.text(wait).await;
            if text.is_empty() {
                String::new()
            } else {
                format!("; its error output: {text}")
            }
        }
        None => String::new(),
    }
}

/// Sends our hello and a ping, reads the agent's hello, who it runs as (when it says) and the
/// ping's reply. An agent that cannot serve answers the ping with `FromAgent::Fatal`.
async fn hello_exchange(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    writer: &mut (dyn AsyncWrite + Send + Unpin),
    ours: &Hello,
) -> Result<(Hello, Option<(u32, u32, Vec<u32>)>), HelloFailure> {
    let encode_failed = |e: ProtoError| HelloFailure::Io(io::Error::other(e.to_string()));
    let mut out = encode(&ToAgent::Hello(ours.clone())).map_err(encode_failed)?;
    out.extend(
        encode(&ToAgent::Request(Request {
            id: 0,
            caller: None,
            op: Op::Ping,
        }))
        .map_err(encode_failed)?,
    );
    // A write error means the other end is gone; what it wrote first explains why, so it is
    // only reported when reading brings nothing better.
    let write_result = async {
        writer.write_all(&out).await?;
        writer.flush().await
    }
    .await;

    let payload = read_hello_frame(reader).await?;
    let theirs = match decode::<FromAgent>(&payload) {
        Ok(FromAgent::Hello(h)) => h,
        Ok(FromAgent::Fatal(msg)) => return Err(HelloFailure::Fatal(msg)),
        _ => return Err(HelloFailure::NotKmount { got: payload }),
    };
    match ours.check_peer(&theirs) {
        Ok(()) => {}
        Err(ProtoError::BadMagic { .. }) => return Err(HelloFailure::NotKmount { got: payload }),
        Err(e) => return Err(HelloFailure::Version(e)),
    }

    let mut runs_as = None;
    loop {
        match read_frame_async(reader).await {
            Ok(Some(p)) => match decode::<FromAgent>(&p) {
                Ok(FromAgent::RunsAs { uid, gid, groups }) if runs_as.is_none() => {
                    runs_as = Some((uid, gid, groups));
                    continue;
                }
                Ok(FromAgent::Reply(Reply { id: 0, result })) => match result {
                    Ok(_) => break,
                    Err(e) => return Err(HelloFailure::Refused(e)),
                },
                Ok(FromAgent::Fatal(msg)) => return Err(HelloFailure::Fatal(msg)),
                _ => return Err(HelloFailure::NotKmount { got: p }),
            },
            Ok(None) | Err(ProtoError::Truncated) => {
                return Err(match write_result {
                    Err(e) => HelloFailure::Io(e),
                    Ok(()) => HelloFailure::Ended { got: Vec::new() },
                });
            }
            Err(ProtoError::Io(e)) => return Err(HelloFailure::Io(e)),
            Err(_) => return Err(HelloFailure::NotKmount { got: Vec::new() }),
        }
    }
    write_result.map_err(HelloFailure::Io)?;
    Ok((theirs, runs_as))
}

/// Reads the first frame, keeping whatever arrived for the error message when it is not a
/// kmount frame.
async fn read_hello_frame(
    reader: &mut (dyn AsyncRead + Send + Unpin),
) -> Result<Vec<u8>, HelloFailure> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match reader.read(&mut header[got..]).await {
            Ok(0) => {
                return Err(HelloFailure::Ended {
                    got: header[..got].to_vec(),
                });
            }
            Ok(n) => got += n,
            Err(e) => return Err(HelloFailure::Io(e)),
        }
    }
    let len = match frame_len(header) {
        Ok(len) if len <= MAX_HELLO_LEN => len,
        _ => {
            // Not a frame: most likely text (a shell's "command not found"). Show some of it.
            let mut got = header.to_vec();
            let mut more = vec![0u8; 252];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), reader.read(&mut more)).await
            {
                got.extend_from_slice(&more[..n]);
            }
            return Err(HelloFailure::NotKmount { got });
        }
    };
    let mut payload = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match reader.read(&mut payload[filled..]).await {
            Ok(0) => {
                let mut got = header.to_vec();
                got.extend_from_slice(&payload[..filled]);
                return Err(HelloFailure::Ended { got });
            }
            Ok(n) => filled += n,
            Err(e) => return Err(HelloFailure::Io(e)),
        }
    }
    Ok(payload)
}

/// Reads one frame's payload; `Ok(None)` at a clean end of stream.
async fn read_frame_async<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, ProtoError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtoError::Truncated)
            };
        }
        got += n;
    }
    let len = frame_len(header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Truncated
        } else {
            ProtoError::Io(e)
        }
    })?;
    Ok(Some(payload))
}

/// Bytes of queued frames gathered into one write.
const WRITE_BATCH: usize = 256 << 10;

/// Writes queued frames, gathering whatever is queued into one write. A frame counts as
/// written once the stream accepted its last byte; frames the stream refused never reached
/// the agent, and their callers are told so when the stream breaks.
async fn write_loop(
    mut writer: Box<dyn AsyncWrite + Send + Unpin>,
    mut frames_rx: mpsc::Receiver<(u64, Frame)>,
    calls: Arc<Calls>,
    shared: Weak<Shared>,
    generation: u64,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
    // (request id, end offset of its frame in `buf`)
    let mut ends: Vec<(u64, usize)> = Vec::new();
    let mut cut = calls.cut.subscribe();
    loop {
        let next = tokio::select! {
            next = frames_rx.recv() => next,
            _ = cut.wait_for(|c| *c) => return,
        };
        let Some((id, frame)) = next else { break };
        buf.clear();
        ends.clear();
        buf.extend_from_slice(&frame);
        ends.push((id, buf.len()));
        while buf.len() < WRITE_BATCH {
            let Ok((id, frame)) = frames_rx.try_recv() else {
                break;
            };
            buf.extend_from_slice(&frame);
            ends.push((id, buf.len()));
        }
        let result = async {
            let (mut done, mut marked) = (0, 0);
            while done < buf.len() {
                let n = writer.write(&buf[done..]).await?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                done += n;
                while marked < ends.len() && ends[marked].1 <= done {
                    calls.mark_written(ends[marked].0);
                    marked += 1;
                }
            }
            writer.flush().await
        };
        let result = tokio::select! {
            r = result => r,
            // Given up for dead: a write into a full pipe of a frozen agent never ends.
            _ = cut.wait_for(|c| *c) => return,
        };
        if let Err(e) = result {
            let reason = format!("writing to the agent failed: {e}");
            let expected = calls.break_all(reason.clone());
            if !expected {
                tracing::warn!("{reason}");
                if let Some(s) = shared.upgrade() {
                    s.link_down(generation, reason);
                }
            }
            return;
        }
    }
    // Every client is gone: closing our end tells the agent to finish.
    let _ = writer.shutdown().await;
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.count.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

/// Gives a stream up for dead when requests wait on it and the agent has sent nothing (not a
/// byte) for the remote timeout, though it was asked for a sign of life (`Op::Ping`)
/// meanwhile: a frozen agent (a stopped process, a node that hangs) or a link that dropped
/// without closing. Its calls then fail, and a reconnection starts.
async fn watchdog(
    calls: Arc<Calls>,
    frames_tx: mpsc::WeakSender<(u64, Frame)>,
    shared: Weak<Shared>,
    generation: u64,
) {
    let mut cut = calls.cut.subscribe();
    let mut seen = calls.bytes_in.load(Ordering::Relaxed);
    let mut silent_since: Option<Instant> = None;
    let mut timeout = DEFAULT_REMOTE_TIMEOUT;
    loop {
        // The first stream's task may run before its client is complete (`Arc::new_cyclic`):
        // the timeout is then the one it had.
        if let Some(s) = shared.upgrade() {
            timeout = s.remote_timeout();
        }
        let tick = (timeout / 8).clamp(Duration::from_millis(25), Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = cut.wait_for(|c| *c) => return,
        }
        // Held weakly: the stream ends (its writer closes) once every client is gone.
        let Some(frames_tx) = frames_tx.upgrade() else {
            return;
        };
        if calls.is_broken() {
            return;
        }
        let now_seen = calls.bytes_in.load(Ordering::Relaxed);
        if now_seen != seen || !calls.waiting() {
            seen = now_seen;
            silent_since = None;
            continue;
        }
        let Some(since) = silent_since else {
            silent_since = Some(Instant::now());
            // Its answer (to an id nobody waits for) is the sign of life; a full queue means
            // the stream takes nothing, which the deadline below settles.
            if let Some(s) = shared.upgrade() {
                let id = s.next_id.fetch_add(1, Ordering::Relaxed);
                let ping = ToAgent::Request(Request {
                    id,
                    caller: None,
                    op: Op::Ping,
                });
                if let Ok(frame) = encode(&ping) {
                    let _ = frames_tx.try_send((id, Arc::new(frame)));
                }
            }
            continue;
        };
        if since.elapsed() < timeout {
            continue;
        }
        let reason = format!(
            "the agent has not answered for {} s (frozen, or the link to it is dead); \
             kmount starts it again",
            since.elapsed().as_secs_f64().round()
        );
        tracing::warn!("{reason}");
        let expected = calls.break_all(reason.clone());
        calls.cut.send_replace(true);
        if !expected && let Some(s) = shared.upgrade() {
            s.link_down(generation, reason);
        }
        return;
    }
}

/// Reads replies and hands each to its caller, and remote changes to the event sink, until
/// the stream ends.
async fn read_loop(
    reader: Box<dyn AsyncRead + Send + Unpin>,
    calls: Arc<Calls>,
    child: Option<Child>,
    shared: Weak<Shared>,
    generation: u64,
    events: Arc<EventSink>,
) {
    let counted = Counted {
        inner: reader,
        count: calls.bytes_in.clone(),
    };
    let mut r = BufReader::with_capacity(256 << 10, counted);
    let mut cut = calls.cut.subscribe();
    let reason = loop {
        let frame = tokio::select! {
            frame = read_frame_async(&mut r) => frame,
            _ = cut.wait_for(|c| *c) => break calls.reason(),
        };
        match frame {
            Ok(Some(payload)) => match decode::<FromAgent>(&payload) {
                Ok(FromAgent::Reply(reply)) => calls.complete(reply),
                Ok(FromAgent::Fatal(msg)) => break format!("the agent stopped: {msg}"),
                Ok(FromAgent::Hello(_)) => break "the agent sent a second hello".to_string(),
                Ok(FromAgent::Events(batch)) => events.emit(ClientEvent::Changes {
                    events: batch,
                    since: events.clock.load(Ordering::Acquire),
                }),
                // Only expected during the hello exchange; harmless later.
                Ok(FromAgent::RunsAs { .. }) => {}
                Err(e) => break format!("malformed message from the agent: {e}"),
            },
            Ok(None) => break "the agent closed the connection".to_string(),
            Err(e) => break format!("reading from the agent failed: {e}"),
        }
    };
    let expected = calls.break_all(reason.clone());
    if expected {
        tracing::debug!("{reason}");
    } else {
        tracing::error!("{reason}");
        if let Some(s) = shared.upgrade() {
            s.link_down(generation, reason);
        }
    }
    if let Some(mut child) = child {
        if *calls.cut.borrow() {
            // It does not answer: it is not waited for.
            let _ = child.start_kill();
        }
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) if status.success() => tracing::debug!("the agent exited"),
            Ok(Ok(status)) => tracing::warn!("the agent exited with {status}"),
            Ok(Err(e)) => tracing::warn!("cannot wait for the agent: {e}"),
            // Dropping `child` kills it (kill_on_drop).
            Err(_) => tracing::warn!("the agent did not exit after its stream closed; killing it"),
        }
    }
}

/// The name of an operation, for messages and counters.
pub fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Lookup { .. } => "Lookup",
        Op::GetAttr { .. } => "GetAttr",
        Op::SetAttr { .. } => "SetAttr",
        Op::OpenDir { .. } => "OpenDir",
        Op::ReadDir { .. } => "ReadDir",
        Op::Open { .. } => "Open",
        Op::Create { .. } => "Create",
        Op::Read { .. } => "Read",
        Op::Write { .. } => "Write",
        Op::Fsync { .. } => "Fsync",
        Op::Fallocate { .. } => "Fallocate",
        Op::Close { .. } => "Close",
        Op::Mkdir { .. } => "Mkdir",
        Op::Mknod { .. } => "Mknod",
        Op::Symlink { .. } => "Symlink",
        Op::Readlink { .. } => "Readlink",
        Op::Link { .. } => "Link",
        Op::Unlink { .. } => "Unlink",
        Op::Rmdir { .. } => "Rmdir",
        Op::Rename { .. } => "Rename",
        Op::Statfs => "Statfs",
        Op::GetXattr { .. } => "GetXattr",
        Op::ListXattr { .. } => "ListXattr",
        Op::SetXattr { .. } => "SetXattr",
        Op::RemoveXattr { .. } => "RemoveXattr",
        Op::Access { .. } => "Access",
        Op::Ping => "Ping",
        Op::Lseek { .. } => "Lseek",
        Op::WalkOpen { .. } => "WalkOpen",
        Op::WalkNext { .. } => "WalkNext",
        Op::Watch { .. } => "Watch",
        Op::Digest { .. } => "Digest",
        Op::Journaled { .. } => "Journaled",
        Op::AppliedSeq { .. } => "AppliedSeq",
        Op::PutFile { .. } => "PutFile",
        Op::ReadPath { .. } => "ReadPath",
        Op::FsyncPath { .. } => "FsyncPath",
        Op::WritePath { .. } => "WritePath",
        Op::FallocatePath { .. } => "FallocatePath",
        Op::SetRules { .. } => "SetRules",
        Op::RunCommand { .. } => "RunCommand",
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
