//! [`KubeConnector`]: a byte stream to `kmount-agent` running in a container, through the
//! exec subresource, with the agent installed by [`crate::install`] when the container lacks it.
//!
//! It follows the workload: every connect (the first and each reconnect of a
//! [`kmount_mount::Client::connect_shared`] client) resolves the target again to a running pod,
//! so a deleted pod's replacement is found (and waited for while it starts), and a session
//! ends as soon as its pod is being deleted, so that the client moves on without waiting for
//! the pod to die.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kmount_mount::{BoxedStream, ConnectFuture, Connector, StderrTail};
use kube::Api;
use kube::api::{WatchEvent, WatchParams};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{OnceCell, oneshot, watch};

use super::cluster::Cluster;
use super::error::API_TIMEOUT;
use super::exec::{Exit, PodExec, is_missing_executable};
use super::resolve::{PodChoice, Resolved, resolve};
use super::target::{Kind, KubeTarget};
use crate::install::{ExecFuture, Installer, LocalAgent, RemoteShell};

/// How long the first connect waits for a pod that exists but is still starting.
const FIRST_WAIT: Duration = Duration::from_secs(60);
/// How long a reconnect waits for the workload's pod to come back (replaced, restarted).
const RECONNECT_WAIT: Duration = Duration::from_secs(120);
/// Between two looks at a pod that is not ready yet.
const POLL: Duration = Duration::from_secs(1);
/// Between two looks at the pod of a live session (is it being deleted?), where it cannot be
/// watched.
const POD_CHECK: Duration = Duration::from_secs(2);

/// Connects to the agent in the container a [`KubeTarget`] names. Every connect resolves the
/// target again, so a replaced pod is followed.
pub struct KubeConnector {
    target: KubeTarget,
    installer: Installer,
    cluster: OnceCell<Cluster>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    connects: u64,
    /// The pod (uid, name) of the last successful connect.
    last_pod: Option<(String, String)>,
    /// The container of the last successful connect.
    last_container: Option<String>,
}

impl KubeConnector {
    pub fn new(target: KubeTarget, agent: LocalAgent) -> KubeConnector {
        KubeConnector {
            target,
            installer: Installer::new(agent),
            cluster: OnceCell::new(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn cluster(&self) -> Result<&Cluster> {
        self.cluster
            .get_or_try_init(|| Cluster::from_options(&self.target.options))
            .await
    }

    /// Resolves the target to a usable pod, waiting while one is starting (and, on a
    /// reconnect, while the old one is replaced).
    async fn pod(&self, cluster: &Cluster, first: bool) -> Result<PodChoice> {
        let wait = if first { FIRST_WAIT } else { RECONNECT_WAIT };
        let deadline = Instant::now() + wait;
        let mut said = String::new();
        loop {
            let why = match resolve(cluster, &self.target).await? {
                Resolved::Pod(choice) => return Ok(choice),
                Resolved::Absent(e) if first => return Err(e),
                Resolved::Absent(e) | Resolved::Starting(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(why.context(format!(
                    "no usable pod for {} after waiting {} s",
                    self.target.object(),
                    wait.as_secs()
                )));
            }
            let text = format!("{why:#}");
            if text != said {
                tracing::info!(
                    "{} (up to {} s): {text}",
                    waiting_for(&self.target),
                    wait.as_secs()
                );
                said = text;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn connect_once(&self) -> Result<BoxedStream> {
        let cluster = self.cluster().await?;
        let first = self.state().connects == 0;
        if !first {
            tracing::info!("reconnecting: resolving {} again", self.target.object());
        }
        let choice = self.pod(cluster, first).await?;
        if let Some(note) = &choice.note {
            tracing::warn!("{note}");
        }
        {
            let st = self.state();
            match &st.last_pod {
                Some((uid, name)) if *uid != choice.uid && *name == choice.pod => tracing::info!(
                    "{} is a new pod of that name (uid {})",
                    self.target.object(),
                    choice.uid
                ),
                Some((uid, name)) if *uid != choice.uid => tracing::info!(
                    "{} is now pod {} (was {name})",
                    self.target.object(),
                    choice.pod
                ),
                _ => {}
            }
        }
        let shell = KubeShell {
            exec: PodExec::new(cluster, &choice.pod, &choice.container),
            last_exit: Mutex::new(None),
        };
        let mut launched = self
            .installer
            .launch(&shell, std::slice::from_ref(&self.target.path))
            .await
            .map_err(|e| explain_install_failure(e, &shell.exec))?;
        let gone = watch_pod(cluster.clone(), choice.pod.clone(), choice.uid.clone());
        launched.stream.reader = Box::new(FollowPod {
            inner: launched.stream.reader,
            gone: Some(gone),
            failed: None,
        });
        let mut st = self.state();
        st.connects += 1;
        st.last_pod = Some((choice.uid.clone(), choice.pod.clone()));
        st.last_container = Some(choice.container.clone());
        tracing::info!(
            "started the agent {} ({:?}) for {} in {}",
            launched.path,
            launched.outcome,
            self.target.path,
            shell.exec.describe()
        );
        Ok(launched.stream)
    }
}

impl Connector for KubeConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            self.connect_once()
                .await
                .map_err(|e| io::Error::other(format!("{e:#}")))
        })
    }

    fn describe(&self) -> String {
        let st = self.state();
        match (&st.last_pod, &st.last_container) {
            (Some((_, pod)), Some(container)) => format!(
                "the agent in {} (pod {pod}, container {container})",
                self.target
            ),
            _ => format!("the agent in {}", self.target),
        }
    }
}

/// "waiting for a pod of deploy/app", "waiting for pod/web-0".
fn waiting_for(target: &KubeTarget) -> String {
    match target.kind {
        Kind::Pod => format!("waiting for {}", target.object()),
        _ => format!("waiting for a pod of {}", target.object()),
    }
}

/// Follows `pod` while its session lives (until the receiver is dropped), and says why the
/// session should move once the pod is being deleted, is gone, or was replaced by another of
/// the same name. It watches the pod (one long request, told at once), or, where watching is
/// not allowed, looks at it every [`POD_CHECK`]. API failures are not a verdict: the stream
/// itself ends if the pod is really unreachable.
fn watch_pod(cluster: Cluster, pod: String, uid: String) -> oneshot::Receiver<String> {
    let (mut tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        let mut can_watch = true;
        let verdict = loop {
            let version = match tokio::time::timeout(API_TIMEOUT, pods.get_opt(&pod)).await {
                Ok(Ok(found)) => match pod_leaving(&pod, &uid, found.as_ref()) {
                    Some(why) => break why,
                    None => found.and_then(|p| p.metadata.resource_version),
                },
                Ok(Err(e)) => {
                    tracing::debug!("cannot look at pod '{pod}': {e}");
                    None
                }
                Err(_) => None,
            };
            if let (true, Some(version)) = (can_watch, version) {
                let wp = WatchParams::default()
                    .fields(&format!("metadata.name={pod}"))
                    .timeout(290);
                match tokio::time::timeout(API_TIMEOUT, pods.watch(&wp, &version)).await {
                    Ok(Ok(events)) => {
                        let opened = Instant::now();
                        let mut events = std::pin::pin!(events);
                        let seen = tokio::select! {
                            _ = tx.closed() => return,
                            seen = watch_verdict(&pod, &uid, &mut events) => seen,
                        };
                        match seen {
                            Some(why) => break why,
                            // The watch ended (its time is up, or it broke): look again, at
                            // once unless it ended as soon as it began.
                            None if opened.elapsed() >= POD_CHECK => continue,
                            None => {}
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(
                            "cannot watch pod '{pod}' ({e}); looking every {POD_CHECK:?}"
                        );
                        can_watch = false;
                    }
                    Err(_) => {}
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(POD_CHECK) => {}
            }
        };
        tracing::info!("{verdict}: ending the session there, to reconnect");
        let _ = tx.send(verdict);
    });
    rx
}

/// Reads a watch of the pod `name` until it says the session must move (the reason) or ends
/// (`None`).
async fn watch_verdict<S>(name: &str, uid: &str, events: &mut Pin<&mut S>) -> Option<String>
where
    S: futures_util::Stream<Item = kube::Result<WatchEvent<Pod>>>,
{
    use futures_util::StreamExt;
    loop {
        match events.next().await? {
            Ok(WatchEvent::Added(p) | WatchEvent::Modified(p)) => {
                if let Some(why) = pod_leaving(name, uid, Some(&p)) {
                    return Some(why);
                }
            }
            Ok(WatchEvent::Deleted(p)) if p.metadata.uid.as_deref() == Some(uid) => {
                return pod_leaving(name, uid, None);
            }
            Ok(WatchEvent::Deleted(_) | WatchEvent::Bookmark(_)) => {}
            Ok(WatchEvent::Error(e)) => {
                tracing::debug!("the watch of pod '{name}' ended: {e}");
                return None;
            }
            Err(e) => {
                tracing::debug!("the watch of pod '{name}' broke: {e}");
                return None;
            }
        }
    }
}

/// Why a session in the pod `name` (with `uid`) should end, given what the API has now.
fn pod_leaving(name: &str, uid: &str, found: Option<&Pod>) -> Option<String> {
    let Some(p) = found else {
        return Some(format!("pod '{name}' is gone"));
    };
    if p.metadata.uid.as_deref() != Some(uid) {
        return Some(format!(
            "pod '{name}' was replaced by a new pod of that name"
        ));
    }
    if p.metadata.deletion_timestamp.is_some() {
        return Some(format!("pod '{name}' is being deleted"));
    }
    None
}

/// The reader of a session's stream, which fails once [`watch_pod`] says the pod is going
/// away: the client then reconnects, to the replacement.
struct FollowPod {
    inner: Box<dyn AsyncRead + Send + Unpin>,
    gone: Option<oneshot::Receiver<String>>,
    failed: Option<String>,
}

impl AsyncRead for FollowPod {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(rx) = self.gone.as_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(why)) => {
                    self.gone = None;
                    self.failed = Some(why);
                }
                // The watch ended without a verdict: read on.
                Poll::Ready(Err(_)) => self.gone = None,
                Poll::Pending => {}
            }
        }
        if let Some(why) = &self.failed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                why.clone(),
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Adds what to do in a pod when the installer found no temporary directory where the agent
/// may run (it reports each such directory as "DIR: noexec: …").
fn explain_install_failure(e: anyhow::Error, exec: &PodExec) -> anyhow::Error {
    if !format!("{e:#}").contains(": noexec: ") {
        return e;
    }
    e.context(format!(
        "{} has no temporary directory where programs may run (read-only root, /dev/shm \
         mounted noexec); give the pod a writable volume for it, e.g. an emptyDir at /tmp \
         (`volumes: [{{name: tmp, emptyDir: {{}}}}]` and `volumeMounts: [{{name: tmp, \
         mountPath: /tmp}}]`), or set TMPDIR in the container to such a directory",
        exec.describe()
    ))
}

/// Runs `sh -c SCRIPT` in one container, for the installer.
struct KubeShell {
    exec: PodExec,
    /// How the last command ended, known once its output has ended.
    last_exit: Mutex<Option<watch::Receiver<Option<Exit>>>>,
}

impl KubeShell {
    fn last_exit(&self) -> Option<Exit> {
        let guard = self.last_exit.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().and_then(|rx| rx.borrow().clone())
    }
}

impl RemoteShell for KubeShell {
    fn exec<'a>(&'a self, script: &'a str) -> ExecFuture<'a> {
        Box::pin(async move {
            let argv = ["sh".to_string(), "-c".to_string(), script.to_string()];
            let pipes = self
                .exec
                .spawn(&argv)
                .await
                .map_err(|e| io::Error::other(format!("{e:#}")))?;
            *self.last_exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(pipes.exit_watch());
            Ok(BoxedStream {
                reader: Box::new(pipes.stdout),
                writer: Box::new(pipes.stdin),
                child: None,
                stderr: Some(StderrTail::spawn(pipes.stderr)),
            })
        })
    }

    fn describe(&self) -> String {
        self.exec.describe()
    }

    fn transport_error(&self, _: Option<std::process::ExitStatus>, stderr: &str) -> Option<String> {
        let where_ = self.exec.describe();
        match self.last_exit()? {
            Exit::NotStarted(m) if is_missing_executable(&m) => Some(format!(
                "{where_} has no shell: kmount needs `sh` there to install and start its agent \
                 (images such as distroless, scratch or pause have none); mount a container of \
                 the pod that has one (-c NAME), or add a sidecar with a shell that shares the \
                 volume you want to edit ({m})"
            )),
            Exit::NotStarted(m) => Some(format!(
                "cannot run a command in {where_}: {m}; check that the container is running \
                 (`kubectl describe pod {}`)",
                self.exec.pod
            )),
            Exit::Lost(m) => Some(format!(
                "the connection to {where_} was lost: {m}{}",
                if stderr.is_empty() {
                    String::new()
                } else {
                    format!("; its error output: {stderr}")
                }
            )),
            Exit::Code(_) | Exit::Closed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::AsyncReadExt;

    fn pod(uid: &str, deleting: bool) -> Pod {
        let mut meta = json!({"name": "web", "uid": uid});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({ "metadata": meta })).unwrap()
    }

    #[test]
    fn a_session_leaves_a_pod_that_goes_away() {
        assert_eq!(pod_leaving("web", "u1", Some(&pod("u1", false))), None);
        assert_eq!(
            pod_leaving("web", "u1", Some(&pod("u1", true))).as_deref(),
            Some("pod 'web' is being deleted")
        );
        assert_eq!(
            pod_leaving("web", "u1", None).as_deref(),
            Some("pod 'web' is gone")
        );
        assert_eq!(
            pod_leaving("web", "u1", Some(&pod("u2", false))).as_deref(),
            Some("pod 'web' was replaced by a new pod of that name")
        );
    }

    #[test]
    fn waiting_lines_name_the_workload() {
        let t = KubeTarget::parse("deploy/x:/work").unwrap();
        assert_eq!(waiting_for(&t), "waiting for a pod of deploy/x");
        let t = KubeTarget::parse("pod/web-0:/srv").unwrap();
        assert_eq!(waiting_for(&t), "waiting for pod/web-0");
    }

    #[tokio::test]
    async fn the_stream_breaks_when_its_pod_goes() {
        let (mut far, near) = tokio::io::duplex(64);
        let (tx, rx) = oneshot::channel();
        let mut r = FollowPod {
            inner: Box::new(near),
            gone: Some(rx),
            failed: None,
        };
        tokio::io::AsyncWriteExt::write_all(&mut far, b"abc")
            .await
            .unwrap();
        let mut buf = [0u8; 3];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"abc");
        tx.send("pod 'web' is being deleted".to_string()).unwrap();
        for _ in 0..2 {
            let err = r.read(&mut buf).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
            assert_eq!(err.to_string(), "pod 'web' is being deleted");
        }
    }

    /// By hand, against the local cluster (`scripts/cluster-up.sh`, then with its KUBECONFIG
    /// and a built agent): `cargo test -p kmount-cli -- --ignored --nocapture
    /// follows_a_deployment`. A shared client keeps working across the deletion of the
    /// deployment's pod, through the replacement.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs the local cluster (scripts/cluster-up.sh) and KUBECONFIG"]
    async fn follows_a_deployment_to_the_replacement_of_a_deleted_pod() {
        use kmount_mount::Client;
        use kmount_proto::{Done, Op, RelPath};
        use std::sync::Arc;

        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_test_writer()
            .try_init();
        let agent = std::env::var_os("KMOUNT_AGENT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/debug/kmount-agent")
            });
        let target = KubeTarget::parse("deploy/kmount-restart:/work").unwrap();
        let connector = Arc::new(KubeConnector::new(
            target,
            LocalAgent::load(&agent).unwrap(),
        ));
        let client = Client::connect_shared(connector.clone()).await.unwrap();
        client.set_remote_timeout(Duration::from_secs(180));
        let old = connector.state().last_pod.clone().unwrap().1;
        let name = format!("follow-{}", std::process::id());
        let dir = RelPath::new(name.into_bytes()).unwrap();
        let mkdir = Op::Mkdir {
            path: dir.clone(),
            mode: 0o755,
        };
        assert!(matches!(
            client.call(mkdir.clone(), None).await,
            Ok(Done::Attr(_))
        ));

        let cluster = connector.cluster().await.unwrap();
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        pods.delete(&old, &Default::default()).await.unwrap();
        let deleted = Instant::now();
        // The session leaves the old pod; calls wait for the replacement and go there.
        let new = loop {
            assert!(
                deleted.elapsed() < Duration::from_secs(180),
                "no reconnect to a new pod"
            );
            let _ = client.call(Op::Statfs, None).await;
            let now = connector.state().last_pod.clone().unwrap().1;
            if now != old && client.is_connected() {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        eprintln!("{old} -> {new} in {:.1} s", deleted.elapsed().as_secs_f64());
        // A new pod: a fresh /work, without the old pod's directory.
        let lookup = client.call(Op::Lookup { path: dir.clone() }, None).await;
        assert!(
            matches!(&lookup, Err(kmount_mount::CallError::Remote(e)) if e.errno == libc::ENOENT),
            "{lookup:?}"
        );
        assert!(matches!(client.call(mkdir, None).await, Ok(Done::Attr(_))));
        assert!(connector.state().connects >= 2);
    }

    /// By hand, like the test above: a pod named on the command line that is deleted is
    /// waited for, and the session goes on in the new pod of that name.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs the local cluster (scripts/cluster-up.sh) and KUBECONFIG"]
    async fn a_named_pod_that_is_deleted_and_made_again_is_waited_for() {
        use kmount_mount::Client;
        use kmount_proto::{Done, Op};
        use std::sync::Arc;

        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_test_writer()
            .try_init();
        const NAME: &str = "kmount-follow-pod";
        let manifest: Pod = serde_json::from_value(json!({
            "metadata": {"name": NAME},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "main",
                    "image": "localhost/debian:bookworm",
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "infinity"],
                }],
            },
        }))
        .unwrap();
        let agent = std::env::var_os("KMOUNT_AGENT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/debug/kmount-agent")
            });
        let target = KubeTarget::parse(&format!("pod/{NAME}:/tmp")).unwrap();
        let connector = Arc::new(KubeConnector::new(
            target,
            LocalAgent::load(&agent).unwrap(),
        ));
        let cluster = connector.cluster().await.unwrap().clone();
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        let wait_gone = async |pods: &Api<Pod>| {
            while pods.get_opt(NAME).await.unwrap().is_some() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        if pods.get_opt(NAME).await.unwrap().is_some() {
            pods.delete(NAME, &Default::default()).await.unwrap();
            wait_gone(&pods).await;
        }
        pods.create(&Default::default(), &manifest).await.unwrap();

        let client = Client::connect_shared(connector.clone()).await.unwrap();
        client.set_remote_timeout(Duration::from_secs(180));
        let first_uid = connector.state().last_pod.clone().unwrap().0;
        pods.delete(NAME, &Default::default()).await.unwrap();
        wait_gone(&pods).await;
        // Gone for a while: the connector waits for it (see the log), calls wait too.
        let call = {
            let client = client.clone();
            tokio::spawn(async move { client.call(Op::Statfs, None).await })
        };
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!call.is_finished(), "{:?}", call.await);
        pods.create(&Default::default(), &manifest).await.unwrap();
        let made = Instant::now();
        assert!(matches!(call.await.unwrap(), Ok(Done::Statfs(_))));
        eprintln!(
            "back in the new pod {:.1} s after it was made",
            made.elapsed().as_secs_f64()
        );
        assert_ne!(connector.state().last_pod.clone().unwrap().0, first_uid);
        drop(client);
        pods.delete(NAME, &Default::default()).await.unwrap();
    }

    #[tokio::test]
    async fn a_watch_without_a_verdict_changes_nothing() {
        let (mut far, near) = tokio::io::duplex(64);
        let (tx, rx) = oneshot::channel::<String>();
        let mut r = FollowPod {
            inner: Box::new(near),
            gone: Some(rx),
            failed: None,
        };
        drop(tx);
        tokio::io::AsyncWriteExt::write_all(&mut far, b"xy")
            .await
            .unwrap();
        drop(far);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"xy");
    }
}
