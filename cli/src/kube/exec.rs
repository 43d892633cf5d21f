//! Running commands in a container through the exec subresource (WebSocket, kube-rs).
//!
//! Before Kubernetes 1.29 (WebSocket protocol v4) the client cannot signal the end of stdin:
//! closing it closes the whole connection. Nothing here depends on end of input: commands
//! read exactly the bytes they are told about (`head -c N`), and the agent's protocol is
//! framed.
//!
//! kube-rs delivers stdout/stderr through in-memory pipes that are only closed on a clean
//! end; when its connection task fails, they would stay open forever. The wrappers here end
//! (with the reason) as soon as the exec is over, however it ended.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::{Result, anyhow};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::Api;
use kube::api::{AttachParams, AttachedProcess};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, watch};

use super::cluster::Cluster;
use super::error::{API_TIMEOUT, error_chain};

/// In-memory pipe sizes between kube-rs's connection task and the stream's users.
const PIPE_BUF: usize = 1 << 20;

/// How an exec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The command ran and exited with this code.
    Code(i32),
    /// The command could not be started (no such executable, container gone...).
    NotStarted(String),
    /// The connection ended without an exit status (cluster unreachable, pod deleted...).
    Lost(String),
    /// kmount ended it (the stream's reader was dropped).
    Closed,
}

impl Exit {
    pub fn describe(&self) -> String {
        match self {
            Exit::Code(c) => format!("exited with code {c}"),
            Exit::NotStarted(m) => format!("could not be started: {m}"),
            Exit::Lost(m) => format!("lost its connection: {m}"),
            Exit::Closed => "was ended by kmount".to_string(),
        }
    }
}

/// One container of one pod, to run commands in.
#[derive(Clone)]
pub struct PodExec {
    cluster: Cluster,
    pods: Api<Pod>,
    pub pod: String,
    pub container: String,
}

/// The pipes of a running exec. The command's stdin never sees an end of input.
pub struct ExecPipes {
    pub stdin: ExecWriter,
    pub stdout: ExecReader,
    pub stderr: ExecReader,
    exit: watch::Receiver<Option<Exit>>,
}

impl ExecPipes {
    /// Tells how the exec ended, once it has.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }
}

impl PodExec {
    pub fn new(cluster: &Cluster, pod: &str, container: &str) -> PodExec {
        PodExec {
            pods: Api::namespaced(cluster.client.clone(), &cluster.namespace),
            cluster: cluster.clone(),
            pod: pod.to_string(),
            container: container.to_string(),
        }
    }

    /// "container app of pod app-7f9 (namespace default)".
    pub fn describe(&self) -> String {
        format!(
            "container '{}' of pod '{}' (namespace '{}')",
            self.container, self.pod, self.cluster.namespace
        )
    }

    /// Starts `argv` in the container with all three pipes attached.
    pub async fn spawn(&self, argv: &[String]) -> Result<ExecPipes> {
        let params = AttachParams {
            container: Some(self.container.clone()),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
            max_stdin_buf_size: Some(PIPE_BUF),
            max_stdout_buf_size: Some(PIPE_BUF),
            max_stderr_buf_size: Some(PIPE_BUF),
        };
        let started = tokio::time::timeout(
            API_TIMEOUT,
            self.pods.exec(&self.pod, argv.to_vec(), &params),
        )
        .await;
        let mut attached = match started {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(self.explain_start(e)),
            Err(_) => {
                return Err(anyhow!(
                    "the cluster at {} did not start an exec in {} within {} s",
                    self.cluster.server,
                    self.describe(),
                    API_TIMEOUT.as_secs()
                ));
            }
        };
        let (Some(stdin), Some(stdout), Some(stderr), Some(status)) = (
            attached.stdin(),
            attached.stdout(),
            attached.stderr(),
            attached.take_status(),
        ) else {
            return Err(anyhow!("kube-rs returned an exec without its pipes"));
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        tokio::spawn(supervise(attached, status, exit_tx, cancel_rx));
        Ok(ExecPipes {
            stdin: ExecWriter {
                inner: Box::new(stdin),
                exit: ExitWatch::new(exit_rx.clone()),
            },
            stdout: ExecReader {
                inner: Box::new(stdout),
                exit: ExitWatch::new(exit_rx.clone()),
                failure_is_error: Some(format!(
                    "the process kmount started in {}",
                    self.describe()
                )),
                _cancel_on_drop: Some(cancel_tx),
            },
            stderr: ExecReader {
                inner: Box::new(stderr),
                exit: ExitWatch::new(exit_rx.clone()),
                failure_is_error: None,
                _cancel_on_drop: None,
            },
            exit: exit_rx,
        })
    }

    fn explain_start(&self, e: kube::Error) -> anyhow::Error {
        let ns = &self.cluster.namespace;
        if let kube::Error::Api(status) = &e {
            let msg = &status.message;
            return match status.code {
                403 => anyhow!(
                    "not allowed to exec into pod '{}' in namespace '{ns}': `create pods/exec` \
                     is forbidden (403: {msg}); kmount needs it to run its agent; ask for a \
                     Role that grants `create` on `pods/exec`, check with `kubectl auth can-i \
                     create pods/exec -n {ns}`",
                    self.pod
                ),
                401 => anyhow!(
                    "the cluster at {} rejected the credentials of context '{}' (401: {msg}); \
                     log in again or renew them in {}",
                    self.cluster.server,
                    self.cluster.context,
                    self.cluster.source
                ),
                404 => anyhow!("pod '{}' is gone from namespace '{ns}' ({msg})", self.pod),
                _ => anyhow!(
                    "cannot exec into {}: {msg} ({} {})",
                    self.describe(),
                    status.code,
                    status.reason
                ),
            };
        }
        anyhow!(
            "cannot exec into {} through {}: {}; check that the cluster is reachable \
             (`kubectl exec`)",
            self.describe(),
            self.cluster.server,
            error_chain(&e)
        )
    }
}

/// Owns the kube-rs exec until it ends or the stream's reader is dropped, then publishes how
/// it ended. Dropping the `AttachedProcess` aborts its connection task.
async fn supervise(
    attached: AttachedProcess,
    status: impl Future<Output = Option<Status>>,
    exit_tx: watch::Sender<Option<Exit>>,
    cancel_rx: oneshot::Receiver<()>,
) {
    tokio::select! {
        status = status => {
            let exit = match status {
                Some(s) => exit_from_status(&s),
                None => {
                    // No status: the connection task ended; its result says why.
                    match attached.join().await {
                        Ok(()) => Exit::Lost(
                            "the connection closed without an exit status (the pod may have \
                             been deleted, or the API server or kubelet restarted)"
                                .into(),
                        ),
                        Err(e) => Exit::Lost(error_chain(&e)),
                    }
                }
            };
            tracing::debug!(?exit, "exec ended");
            let _ = exit_tx.send(Some(exit));
        }
        _ = cancel_rx => {
            attached.abort();
            let _ = exit_tx.send(Some(Exit::Closed));
        }
    }
}

/// Reads the exit status the API server sends on the status channel.
pub fn exit_from_status(s: &Status) -> Exit {
    if s.status.as_deref() == Some("Success") {
        return Exit::Code(0);
    }
    if s.reason.as_deref() == Some("NonZeroExitCode") {
        let code = s
            .details
            .as_ref()
            .and_then(|d| d.causes.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.reason.as_deref() == Some("ExitCode")))
            .and_then(|c| c.message.as_deref())
            .and_then(|m| m.parse::<i32>().ok());
        if let Some(code) = code {
            return Exit::Code(code);
        }
    }
    Exit::NotStarted(s.message.clone().unwrap_or_else(|| format!("{s:?}")))
}

/// Whether a failure to start a command means the executable does not exist.
pub fn is_missing_executable(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("executable file not found")
        || m.contains("no such file or directory")
        || m.contains("not found in $path")
}

/// The exec's end as a future that can be polled from `poll_read`/`poll_write`.
struct ExitWatch {
    rx: watch::Receiver<Option<Exit>>,
    fut: Option<Pin<Box<dyn Future<Output = Exit> + Send>>>,
}

impl ExitWatch {
    fn new(rx: watch::Receiver<Option<Exit>>) -> Self {
        Self { rx, fut: None }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Exit> {
        let rx = &self.rx;
        let fut = self.fut.get_or_insert_with(|| {
            let mut rx = rx.clone();
            Box::pin(async move {
                match rx.wait_for(|e| e.is_some()).await {
                    Ok(e) => e.clone().unwrap_or_else(|| Exit::Lost(String::new())),
                    Err(_) => Exit::Lost("the exec's supervisor ended".into()),
                }
            })
        });
        fut.as_mut().poll(cx)
    }
}

/// stdout or stderr of an exec: ends once everything the command wrote was read and the exec
/// is over. A lost connection is an error; so is, on stdout, an exit with a non-zero code.
pub struct ExecReader {
    inner: Box<dyn AsyncRead + Send + Unpin>,
    exit: ExitWatch,
    /// Names the command for the error that a non-zero exit becomes (`None`: such an exit is
    /// an end of stream).
    failure_is_error: Option<String>,
    /// Dropping the stream's reader ends the exec.
    _cancel_on_drop: Option<oneshot::Sender<()>>,
}

impl AsyncRead for ExecReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        // Nothing buffered: the stream is over once the exec is.
        match self.exit.poll(cx) {
            Poll::Ready(Exit::Lost(why)) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, why)))
            }
            Poll::Ready(Exit::Code(code)) if code != 0 && self.failure_is_error.is_some() => {
                let what = self.failure_is_error.as_deref().unwrap_or_default();
                let why = match code {
                    137 => " (killed: the pod was deleted or evicted, or the container restarted)",
                    143 => " (terminated: the pod is shutting down)",
                    _ => "",
                };
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("{what} exited with code {code}{why}"),
                )))
            }
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// stdin of an exec: writes fail once the exec is over. Shutting it down ends the exec
/// (before Kubernetes 1.29 there is no way to close stdin alone).
pub struct ExecWriter {
    inner: Box<dyn AsyncWrite + Send + Unpin>,
    exit: ExitWatch,
}

impl ExecWriter {
    fn check_exit(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        match self.exit.poll(cx) {
            Poll::Ready(exit) => Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the command in the container {}", exit.describe()),
            )),
            Poll::Pending => None,
        }
    }
}

impl AsyncWrite for ExecWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.check_exit(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.check_exit(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.check_exit(cx).is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A reader over an in-memory pipe that, like kube-rs's on a failed connection, is never
    /// closed by its writer.
    fn reader(
        stdout_like: bool,
    ) -> (
        ExecReader,
        tokio::io::WriteHalf<tokio::io::SimplexStream>,
        watch::Sender<Option<Exit>>,
    ) {
        let (r, w) = tokio::io::simplex(1024);
        let (exit_tx, exit_rx) = watch::channel(None);
        let reader = ExecReader {
            inner: Box::new(r),
            exit: ExitWatch::new(exit_rx),
            failure_is_error: stdout_like.then(|| "the test command".to_string()),
            _cancel_on_drop: None,
        };
        (reader, w, exit_tx)
    }

    #[tokio::test]
    async fn output_is_drained_before_the_end() {
        let (mut r, mut w, exit_tx) = reader(true);
        w.write_all(b"last words").await.unwrap();
        exit_tx.send(Some(Exit::Code(0))).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }

    #[tokio::test]
    async fn a_lost_connection_ends_an_open_pipe_with_an_error() {
        let (mut r, mut w, exit_tx) = reader(false);
        w.write_all(b"partial").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(r.read(&mut buf).await.unwrap(), 7);
        // Nothing more arrives and the pipe stays open: only the exit ends the wait.
        let pending = tokio::time::timeout(Duration::from_millis(50), r.read(&mut buf)).await;
        assert!(pending.is_err(), "the read ended before the exec did");
        exit_tx
            .send(Some(Exit::Lost("connection reset".into())))
            .unwrap();
        let e = r.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert!(e.to_string().contains("connection reset"), "{e}");
        drop(w);
    }

    #[tokio::test]
    async fn a_killed_command_is_an_error_on_stdout_only() {
        let (mut out, _w1, tx1) = reader(true);
        let (mut err, _w2, tx2) = reader(false);
        tx1.send(Some(Exit::Code(137))).unwrap();
        tx2.send(Some(Exit::Code(137))).unwrap();
        let mut buf = [0u8; 8];
        let e = out.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("code 137 (killed"), "{e}");
        assert_eq!(err.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn writes_fail_once_the_command_is_gone() {
        let (_r, w) = tokio::io::simplex(16);
        let (exit_tx, exit_rx) = watch::channel(None);
        let mut writer = ExecWriter {
            inner: Box::new(w),
            exit: ExitWatch::new(exit_rx),
        };
        writer.write_all(b"fits").await.unwrap();
        exit_tx.send(Some(Exit::Code(2))).unwrap();
        // The pipe would accept more, but nobody reads it any more.
        let e = writer.write_all(b"more").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        assert!(e.to_string().contains("exited with code 2"), "{e}");
    }

    #[test]
    fn exit_codes_from_status() {
        let ok: Status = serde_json::from_value(serde_json::json!({"status": "Success"})).unwrap();
        assert_eq!(exit_from_status(&ok), Exit::Code(0));
        let nz: Status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "message": "command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}
        }))
        .unwrap();
        assert_eq!(exit_from_status(&nz), Exit::Code(3));
        let missing: Status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "message": "OCI runtime exec failed: exec failed: container_linux.go:367: starting container process caused: exec: \"sh\": executable file not found in $PATH: unknown",
        }))
        .unwrap();
        match exit_from_status(&missing) {
            Exit::NotStarted(m) => assert!(is_missing_executable(&m)),
            other => panic!("{other:?}"),
        }
    }
}
