//! [`KubeConnector`]: a byte stream to `kmount-agent` running in a container, through the
//! exec subresource, with the agent installed by [`crate::install`] when the container lacks it.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;
use kmount_mount::{BoxedStream, ConnectFuture, Connector, StderrTail};
use tokio::sync::{OnceCell, watch};

use super::cluster::Cluster;
use super::exec::{Exit, PodExec, is_missing_executable};
use super::resolve::{PodChoice, Resolved, resolve};
use super::target::KubeTarget;
use crate::install::{ExecFuture, Installer, LocalAgent, RemoteShell};

/// How long the first connect waits for a pod that exists but is still starting.
const FIRST_WAIT: Duration = Duration::from_secs(60);
/// How long a reconnect waits for the workload's pod to come back (replaced, restarted).
const RECONNECT_WAIT: Duration = Duration::from_secs(120);
/// Between two looks at a pod that is not ready yet.
const POLL: Duration = Duration::from_secs(1);

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
                tracing::info!("waiting for {}: {text}", self.target.object());
                said = text;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn connect_once(&self) -> Result<BoxedStream> {
        let cluster = self.cluster().await?;
        let first = self.state().connects == 0;
        let choice = self.pod(cluster, first).await?;
        if let Some(note) = &choice.note {
            tracing::warn!("{note}");
        }
        {
            let st = self.state();
            match &st.last_pod {
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
        let launched = self
            .installer
            .launch(&shell, std::slice::from_ref(&self.target.path))
            .await
            .map_err(|e| explain_install_failure(e, &shell.exec))?;
        let mut st = self.state();
        st.connects += 1;
        st.last_pod = Some((choice.uid.clone(), choice.pod.clone()));
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
        format!("the agent in {}", self.target)
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
