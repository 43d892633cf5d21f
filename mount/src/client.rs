//! The connection to the agent: a hello each way, then many requests in flight over one byte
//! stream, answered in any order.
//!
//! One writer task owns the stream's write half and one reader task owns the read half; callers
//! only touch the pending map (id -> reply slot) and the queue of encoded frames. When the stream
//! breaks, every pending call and every later call fails at once with
//! [`CallError::Disconnected`]; nothing waits forever.

use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kmount_proto::{
    Caller, Done, FromAgent, Hello, Op, ProtoError, Reply, Request, ToAgent, WireError, decode,
    encode, features, frame_len,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
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
    #[error("{source}; use kmount and kmount-agent from the same release")]
    Version {
        #[source]
        source: ProtoError,
    },
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
    /// The stream to the agent is gone; the text says how.
    #[error("the connection to the agent is gone: {0}")]
    Disconnected(String),
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

/// A session with an agent. Cheap to clone; all clones share the one stream.
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
    calls: Arc<Calls>,
    /// callers --encoded request frames--> writer task
    frames_tx: mpsc::Sender<Vec<u8>>,
    peer: Hello,
    features: u64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        lock(&self.calls.state).closing = true;
    }
}

/// Reply slots of the requests in flight.
#[derive(Default)]
struct Calls {
    state: Mutex<CallState>,
}

type ReplySlot = oneshot::Sender<Result<Done, WireError>>;

#[derive(Default)]
struct CallState {
    pending: HashMap<u64, ReplySlot>,
    /// Why the stream is unusable; set once, never cleared.
    broken: Option<String>,
    /// Every [`Client`] is gone, so the end of the stream is expected.
    closing: bool,
}

impl Calls {
    fn register(&self, id: u64, slot: ReplySlot) -> Result<(), CallError> {
        let mut st = lock(&self.state);
        if let Some(reason) = &st.broken {
            return Err(CallError::Disconnected(reason.clone()));
        }
        st.pending.insert(id, slot);
        Ok(())
    }

    fn unregister(&self, id: u64) {
        lock(&self.state).pending.remove(&id);
    }

    fn complete(&self, reply: Reply) {
        let slot = lock(&self.state).pending.remove(&reply.id);
        match slot {
            // A send error means the caller stopped waiting; nothing to do.
            Some(slot) => drop(slot.send(reply.result)),
            None => tracing::debug!(id = reply.id, "reply to a request nobody waits for"),
        }
    }

    /// Marks the stream broken and fails every pending call (their slots are dropped).
    fn break_all(&self, reason: String) -> bool {
        let mut st = lock(&self.state);
        if st.broken.is_none() {
            st.broken = Some(reason);
        }
        st.pending.clear();
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected sections never panic midway, so a poisoned lock still holds valid data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn software() -> String {
    format!("kmount {}", env!("CARGO_PKG_VERSION"))
}

impl Client {
    /// Connects through `connector` and completes the hello exchange.
    pub async fn connect(connector: &dyn Connector) -> Result<Client, ClientError> {
        let what = connector.describe();
        let stream = connector
            .connect()
            .await
            .map_err(|source| ClientError::Spawn {
                what: what.clone(),
                source,
            })?;
        Self::from_stream(stream, &what).await
    }

    /// Completes the hello exchange on an already open stream. `what` names the other end in
    /// error messages.
    pub async fn from_stream(stream: BoxedStream, what: &str) -> Result<Client, ClientError> {
        let BoxedStream {
            mut reader,
            mut writer,
            mut child,
            stderr,
        } = stream;
        let ours = Hello::new(features::IDENTITY, software());
        let exchange = tokio::time::timeout(
            HELLO_TIMEOUT,
            hello_exchange(&mut reader, &mut writer, &ours),
        )
        .await;
        let theirs = match exchange {
            Ok(Ok(theirs)) => theirs,
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

        let calls = Arc::new(Calls::default());
        let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
        tokio::spawn(write_loop(writer, frames_rx, calls.clone()));
        tokio::spawn(read_loop(reader, calls.clone(), child));
        Ok(Client {
            shared: Arc::new(Shared {
                next_id: AtomicU64::new(1),
                calls,
                frames_tx,
                peer: theirs,
                features,
            }),
        })
    }

    /// Sends one request and waits for its reply. Safe to call from many tasks at once.
    pub async fn call(&self, op: Op, caller: Option<Caller>) -> Result<Done, CallError> {
        let shared = &self.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&ToAgent::Request(Request { id, caller, op }))
            .map_err(|e| CallError::Encode(e.to_string()))?;
        let (slot_tx, slot_rx) = oneshot::channel();
        shared.calls.register(id, slot_tx)?;
        let _guard = PendingGuard {
            calls: &shared.calls,
            id,
        };
        if shared.frames_tx.send(frame).await.is_err() {
            return Err(CallError::Disconnected(shared.calls.reason()));
        }
        match slot_rx.await {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => Err(CallError::Remote(e)),
            Err(_) => Err(CallError::Disconnected(shared.calls.reason())),
        }
    }

    /// Feature bits both ends support ([`kmount_proto::features`]).
    pub fn features(&self) -> u64 {
        self.shared.features
    }

    /// The agent's hello (its software and version).
    pub fn peer(&self) -> &Hello {
        &self.shared.peer
    }

    /// False once the stream has broken.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.calls.state).broken.is_none()
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
            HelloFailure::Version(source) => return ClientError::Version { source },
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

/// Sends our hello and a ping, reads the agent's hello and the ping's reply. An agent that
/// cannot serve answers the ping with `FromAgent::Fatal`.
async fn hello_exchange(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    writer: &mut (dyn AsyncWrite + Send + Unpin),
    ours: &Hello,
) -> Result<Hello, HelloFailure> {
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

    match read_frame_async(reader).await {
        Ok(Some(p)) => match decode::<FromAgent>(&p) {
            Ok(FromAgent::Reply(Reply { id: 0, result })) => match result {
                Ok(_) => {}
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
    write_result.map_err(HelloFailure::Io)?;
    Ok(theirs)
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

/// Writes queued frames, batching whatever is queued into one flush.
async fn write_loop(
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    mut frames_rx: mpsc::Receiver<Vec<u8>>,
    calls: Arc<Calls>,
) {
    let mut w = BufWriter::with_capacity(256 << 10, writer);
    while let Some(frame) = frames_rx.recv().await {
        let result = async {
            w.write_all(&frame).await?;
            while let Ok(more) = frames_rx.try_recv() {
                w.write_all(&more).await?;
            }
            w.flush().await
        }
        .await;
        if let Err(e) = result {
            let expected = calls.break_all(format!("writing to the agent failed: {e}"));
            if !expected {
                tracing::warn!("writing to the agent failed: {e}");
            }
            return;
        }
    }
    // Every client is gone: closing our end tells the agent to finish.
    let _ = w.shutdown().await;
}

/// Reads replies and hands each to its caller until the stream ends.
async fn read_loop(
    reader: Box<dyn AsyncRead + Send + Unpin>,
    calls: Arc<Calls>,
    child: Option<Child>,
) {
    let mut r = BufReader::with_capacity(256 << 10, reader);
    let reason = loop {
        match read_frame_async(&mut r).await {
            Ok(Some(payload)) => match decode::<FromAgent>(&payload) {
                Ok(FromAgent::Reply(reply)) => calls.complete(reply),
                Ok(FromAgent::Fatal(msg)) => break format!("the agent stopped: {msg}"),
                Ok(FromAgent::Hello(_)) => break "the agent sent a second hello".to_string(),
                Ok(FromAgent::Events(events)) => {
                    tracing::debug!(
                        "{} remote change(s) ignored: no watcher consumer",
                        events.len()
                    );
                }
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
    }
    if let Some(mut child) = child {
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) if status.success() => tracing::debug!("the agent exited"),
            Ok(Ok(status)) => tracing::warn!("the agent exited with {status}"),
            Ok(Err(e)) => tracing::warn!("cannot wait for the agent: {e}"),
            // Dropping `child` kills it (kill_on_drop).
            Err(_) => tracing::warn!("the agent did not exit after its stream closed; killing it"),
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
