//! Kubernetes API failures turned into messages that say what is wrong and what to try.

use std::time::Duration;

use anyhow::anyhow;

use super::cluster::Cluster;

/// How long one API request (not an exec stream) may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// What was asked of the API server, for messages: `get pods` in namespace `dev`.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub verb: &'a str,
    pub resource: &'a str,
    /// The object's name, if the call names one.
    pub name: Option<&'a str>,
}

/// How an API call failed, for callers that react to some failures (a missing object).
#[derive(Debug)]
pub enum ApiFailure {
    NotFound(anyhow::Error),
    Other(anyhow::Error),
}

impl ApiFailure {
    pub fn into_error(self) -> anyhow::Error {
        match self {
            ApiFailure::NotFound(e) | ApiFailure::Other(e) => e,
        }
    }
}

/// Runs one API request with [`API_TIMEOUT`] and explains its failure.
pub async fn api<T>(
    cluster: &Cluster,
    call: Call<'_>,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ApiFailure> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(explain(e, cluster, call)),
        Err(_) => Err(ApiFailure::Other(anyhow!(
            "the cluster at {} (context '{}') did not answer `{} {}` within {} s; check that it \
             is up and reachable (`kubectl --context {} get pods`)",
            cluster.server,
            cluster.context,
            call.verb,
            call.resource,
            API_TIMEOUT.as_secs(),
            cluster.context
        ))),
    }
}

/// Explains a failed API request.
pub fn explain(err: kube::Error, cluster: &Cluster, call: Call<'_>) -> ApiFailure {
    let ns = &cluster.namespace;
    let ctx = &cluster.context;
    let what = match call.name {
        Some(n) => format!("{} {n}", call.resource),
        None => call.resource.to_string(),
    };
    match err {
        kube::Error::Api(status) => {
            let msg = status.message.clone();
            match status.code {
                401 => ApiFailure::Other(anyhow!(
                    "the cluster at {} rejected the credentials of context '{ctx}' (401 \
                     Unauthorized: {msg}); they are invalid or have expired: log in again or \
                     renew them in {}",
                    cluster.server,
                    cluster.source
                )),
                403 => ApiFailure::Other(anyhow!(
                    "not allowed to {} {} in namespace '{ns}' (403 Forbidden: {msg}); kmount \
                     needs `get pods` and `create pods/exec` there (and `get` on the workload); \
                     ask for a Role that grants it, check with `kubectl auth can-i {} {} -n {ns}`, \
                     or choose another namespace with -n",
                    call.verb,
                    call.resource,
                    call.verb,
                    call.resource
                )),
                404 => ApiFailure::NotFound(anyhow!(
                    "{what} was not found in namespace '{ns}' (context '{ctx}'): {msg}"
                )),
                _ => ApiFailure::Other(anyhow!(
                    "the cluster refused `{} {what}` in namespace '{ns}': {msg} ({} {})",
                    call.verb,
                    status.code,
                    status.reason
                )),
            }
        }
        kube::Error::Auth(e) => ApiFailure::Other(anyhow!(
            "cannot get credentials for context '{ctx}': {e}; your login may have expired: \
             renew it (e.g. the cloud provider's login command) and check {}",
            cluster.source
        )),
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            let chain = error_chain(&err);
            let hint = if chain.contains("certificate") || chain.contains("Certificate") {
                "the server's TLS certificate is not trusted by the kubeconfig's \
                 certificate-authority data, or the client certificate is not accepted; check \
                 the kubeconfig"
            } else {
                "check that the cluster is running and reachable from here \
                 (`kubectl cluster-info`), or choose another context with --context"
            };
            ApiFailure::Other(anyhow!(
                "cannot reach the cluster at {} (context '{ctx}'): {chain}; {hint}",
                cluster.server
            ))
        }
        other => ApiFailure::Other(anyhow!(
            "`{} {what}` in namespace '{ns}' failed: {}",
            call.verb,
            error_chain(&other)
        )),
    }
}

/// "outer: inner: innermost", without repeating a cause that the outer text already shows.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}
