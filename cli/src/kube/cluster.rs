//! Reaching a cluster the way kubectl does: KUBECONFIG or ~/.kube/config (or --kubeconfig),
//! its current context (or --context), the context's namespace (or --namespace).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};

use super::target::KubeOptions;

/// How long to wait for a TCP connection to the API server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for one cluster, with the namespace the target lives in.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    pub namespace: String,
    /// The kubeconfig context in use (for messages).
    pub context: String,
    /// The API server URL (for messages).
    pub server: String,
    /// Where the configuration came from (for messages).
    pub source: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .field("context", &self.context)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Loads the kubeconfig and builds a client. Talks to no server yet.
    pub async fn from_options(opts: &KubeOptions) -> Result<Cluster> {
        let (kubeconfig, source) = load_kubeconfig(opts.kubeconfig.as_ref())?;
        let context = match &opts.context {
            Some(name) => {
                if !kubeconfig.contexts.iter().any(|c| &c.name == name) {
                    bail!(
                        "the context '{name}' is not in {source}; {}",
                        list_contexts(&kubeconfig)
                    );
                }
                name.clone()
            }
            None => match &kubeconfig.current_context {
                Some(c) if !c.is_empty() => c.clone(),
                _ => bail!(
                    "{source} sets no current context; choose one with --context ({})",
                    list_contexts(&kubeconfig)
                ),
            },
        };
        let options = KubeConfigOptions {
            context: Some(context.clone()),
            ..Default::default()
        };
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| explain_config_error(e, &context, &source))?;
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        // No read timeout: an exec stream of an idle mount carries nothing for long stretches.
        config.read_timeout = None;
        let server = config.cluster_url.to_string();
        let namespace = opts
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).map_err(|e| {
            anyhow!(
                "cannot set up a client for the cluster of context '{context}' ({server}): {e}; \
                 check its certificate data in {source}"
            )
        })?;
        Ok(Cluster {
            client,
            namespace,
            context,
            server,
            source,
        })
    }
}

/// `--kubeconfig` wins over KUBECONFIG, which wins over ~/.kube/config (kubectl's order).
fn load_kubeconfig(flag: Option<&PathBuf>) -> Result<(Kubeconfig, String)> {
    if let Some(path) = flag {
        let source = path.display().to_string();
        let kc = Kubeconfig::read_from(path)
            .map_err(|e| explain_read_error(e, &source, "the --kubeconfig file"))?;
        return Ok((kc, source));
    }
    if let Some(value) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        let source = format!("KUBECONFIG ({})", value.to_string_lossy());
        let kc = Kubeconfig::from_env()
            .map_err(|e| explain_read_error(e, &source, "a file named by KUBECONFIG"))?
            .unwrap_or_default();
        return Ok((kc, source));
    }
    let home = std::env::var_os("HOME").context(
        "no kubeconfig: KUBECONFIG and HOME are unset; pass --kubeconfig FILE or set KUBECONFIG",
    )?;
    let path = PathBuf::from(home).join(".kube").join("config");
    let source = path.display().to_string();
    let kc = Kubeconfig::read_from(&path)
        .map_err(|e| explain_read_error(e, &source, "the default kubeconfig"))?;
    Ok((kc, source))
}

fn explain_read_error(e: KubeconfigError, source: &str, what: &str) -> anyhow::Error {
    match e {
        KubeconfigError::ReadConfig(io, path) if io.kind() == std::io::ErrorKind::NotFound => {
            anyhow!(
                "{what} {} does not exist; point KUBECONFIG or --kubeconfig at your cluster's \
                 kubeconfig (the file `kubectl` uses)",
                path.display()
            )
        }
        KubeconfigError::ReadConfig(io, path) => {
            anyhow!("cannot read the kubeconfig {}: {io}", path.display())
        }
        other => anyhow!("cannot load the kubeconfig from {source}: {other}; check the file"),
    }
}

fn explain_config_error(e: KubeconfigError, context: &str, source: &str) -> anyhow::Error {
    match e {
        KubeconfigError::LoadContext(_) => anyhow!(
            "the context '{context}' is not in {source}; list the contexts with \
             `kubectl config get-contexts`"
        ),
        KubeconfigError::LoadClusterOfContext(c) => anyhow!(
            "the context '{context}' in {source} refers to the cluster '{c}', which is not \
             defined there; fix the kubeconfig"
        ),
        other => anyhow!("cannot use the context '{context}' of {source}: {other}"),
    }
}

fn list_contexts(kc: &Kubeconfig) -> String {
    if kc.contexts.is_empty() {
        return "it defines no contexts at all".to_string();
    }
    let names: Vec<&str> = kc.contexts.iter().map(|c| c.name.as_str()).collect();
    format!("the contexts there: {}", names.join(", "))
}
