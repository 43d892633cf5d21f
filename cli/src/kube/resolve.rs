//! From a target (`deploy/app`) to one pod and container to exec into.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Api;
use kube::api::ListParams;

use super::cluster::Cluster;
use super::error::{ApiFailure, Call, api};
use super::target::{Kind, KubeTarget};

/// The annotation kubectl reads to choose a pod's container when none is given.
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// At most this many names are listed in an error message.
const LIST_MAX: usize = 12;

/// The pod and container a target resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodChoice {
    pub pod: String,
    pub uid: String,
    pub container: String,
    /// Something the user should know about the choice (other candidates, no ready pod).
    pub note: Option<String>,
}

/// The outcome of one resolution attempt.
#[derive(Debug)]
pub enum Resolved {
    Pod(PodChoice),
    /// Nothing to exec into exists (no such pod, a workload without pods); one may appear
    /// (a replaced pod, a scaled-up workload). The error says what exists.
    Absent(anyhow::Error),
    /// A pod exists but is not usable yet (starting, terminating, container not running).
    Starting(anyhow::Error),
}

/// Resolves `target` in `cluster` once. `Err` is a failure that waiting will not fix.
pub async fn resolve(cluster: &Cluster, target: &KubeTarget) -> Result<Resolved> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    if target.kind == Kind::Pod {
        let call = Call {
            verb: "get",
            resource: "pods",
            name: Some(&target.name),
        };
        let pod = match api(cluster, call, pods.get(&target.name)).await {
            Ok(p) => p,
            Err(ApiFailure::NotFound(_)) => {
                check_namespace(cluster).await?;
                let existing = list_pods(cluster, &pods, None).await?;
                return Ok(Resolved::Absent(anyhow!(
                    "pod '{}' does not exist in namespace '{}'; {}",
                    target.name,
                    cluster.namespace,
                    describe_pods(&existing, "pods there", &cluster.namespace)
                )));
            }
            Err(e) => return Err(e.into_error()),
        };
        return choose_container(target, &pod, None);
    }

    let selector = workload_selector(cluster, target).await?;
    let candidates = list_pods(cluster, &pods, Some(&selector)).await?;
    let live: Vec<&Pod> = candidates
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && phase(p) == "Running")
        .collect();
    let ready: Vec<&Pod> = live.iter().copied().filter(|p| is_ready(p)).collect();
    let (pool, unready_note) = if !ready.is_empty() {
        (ready, None)
    } else if !live.is_empty() {
        (
            live,
            Some(format!(
                "no pod of {} is ready; using a running one that is not",
                target.object()
            )),
        )
    } else if candidates.is_empty() {
        return Ok(Resolved::Absent(anyhow!(
            "{} has no pods (selector {selector}); see `kubectl describe {} -n {}`",
            target.object(),
            target.object(),
            cluster.namespace
        )));
    } else {
        return Ok(Resolved::Starting(anyhow!(
            "{} has no running pod yet; {}",
            target.object(),
            describe_pods(&candidates, "its pods", &cluster.namespace)
        )));
    };
    if pool.len() > 1 && !target.kind.replicas_interchangeable() {
        let names: Vec<String> = pool.iter().map(|p| pod_name(p).to_string()).collect();
        return Err(anyhow!(
            "{} has {} pods ({}), each with its own files; mount one of them, for example \
             kmount pod/{}:{} MOUNTPOINT",
            target.object(),
            pool.len(),
            names.join(", "),
            names[0],
            target.path
        ));
    }
    let mut pool = pool;
    // Newest first; ties (creation times have one-second resolution) by name, for a stable choice.
    pool.sort_by(|a, b| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        tb.cmp(&ta).then_with(|| pod_name(a).cmp(pod_name(b)))
    });
    let chosen = pool[0];
    let mut notes: Vec<String> = unready_note.into_iter().collect();
    if pool.len() > 1 {
        let others: Vec<&str> = pool[1..].iter().map(|p| pod_name(p)).collect();
        notes.push(format!(
            "{} has {} pods; using the newest, {} (others: {}); changes reach that pod only",
            target.object(),
            pool.len(),
            pod_name(chosen),
            others.join(", ")
        ));
    }
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    choose_container(target, chosen, note)
}

/// The container to exec into: --container, else the default-container annotation, else the
/// first. It must be running.
fn choose_container(target: &KubeTarget, pod: &Pod, note: Option<String>) -> Result<Resolved> {
    let name = pod_name(pod).to_string();
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| anyhow!("pod '{name}' has no spec"))?;
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    let container = match &target.options.container {
        Some(c) => {
            if !names.contains(&c.as_str()) {
                return Err(anyhow!(
                    "pod '{name}' has no container '{c}'; its containers: {}",
                    names.join(", ")
                ));
            }
            c.clone()
        }
        None => {
            let annotated = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_CONTAINER_ANNOTATION))
                .filter(|c| names.contains(&c.as_str()));
            match annotated.or_else(|| spec.containers.first().map(|c| &c.name)) {
                Some(c) => c.clone(),
                None => return Err(anyhow!("pod '{name}' has no containers")),
            }
        }
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(Resolved::Starting(anyhow!(
            "pod '{name}' is being deleted; waiting for its replacement"
        )));
    }
    let status = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|s| s.name == container));
    let running = status
        .and_then(|s| s.state.as_ref())
        .is_some_and(|st| st.running.is_some());
    if !running {
        let state = status
            .map(container_state)
            .unwrap_or_else(|| "not started".to_string());
        return Ok(Resolved::Starting(anyhow!(
            "container '{container}' of pod '{name}' is not running ({state}; pod {}); see \
             `kubectl describe pod {name}`",
            phase(pod)
        )));
    }
    Ok(Resolved::Pod(PodChoice {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        pod: name,
        container,
        note,
    }))
}

/// The label selector of the workload `target` names, as a `key=value,…` string.
async fn workload_selector(cluster: &Cluster, target: &KubeTarget) -> Result<String> {
    let client = cluster.client.clone();
    let ns = cluster.namespace.as_str();
    let name = target.name.as_str();
    let call = Call {
        verb: "get",
        resource: target.kind.resource(),
        name: Some(name),
    };
    let got = match target.kind {
        Kind::Deployment => api(
            cluster,
            call,
            Api::<Deployment>::namespaced(client, ns).get(name),
        )
        .await
        .map(|d| d.spec.map(|s| s.selector)),
        Kind::StatefulSet => api(
            cluster,
            call,
            Api::<StatefulSet>::namespaced(client, ns).get(name),
        )
        .await
        .map(|d| d.spec.map(|s| s.selector)),
        Kind::DaemonSet => api(
            cluster,
            call,
            Api::<DaemonSet>::namespaced(client, ns).get(name),
        )
        .await
        .map(|d| d.spec.map(|s| s.selector)),
        Kind::ReplicaSet => api(
            cluster,
            call,
            Api::<ReplicaSet>::namespaced(client, ns).get(name),
        )
        .await
        .map(|d| d.spec.map(|s| s.selector)),
        Kind::Job => api(cluster, call, Api::<Job>::namespaced(client, ns).get(name))
            .await
            .map(|d| d.spec.and_then(|s| s.selector)),
        Kind::Pod => unreachable!("pods have no selector; resolve() handles them first"),
    };
    let selector = match got {
        Ok(s) => s,
        Err(ApiFailure::NotFound(_)) => {
            check_namespace(cluster).await?;
            let existing = list_workloads(cluster, target.kind).await;
            return Err(anyhow!(
                "{} does not exist in namespace '{ns}' (context '{}'); {existing}",
                target.object(),
                cluster.context
            ));
        }
        Err(e) => return Err(e.into_error()),
    };
    let selector = selector
        .map(|s| selector_string(&s))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("{} has no pod selector", target.object()))?;
    Ok(selector)
}

/// The names of the workloads of `kind` in the namespace, for "not found" messages.
async fn list_workloads(cluster: &Cluster, kind: Kind) -> String {
    let client = cluster.client.clone();
    let ns = cluster.namespace.as_str();
    let call = Call {
        verb: "list",
        resource: kind.resource(),
        name: None,
    };
    let lp = ListParams::default();
    fn names<K: kube::Resource>(items: Vec<K>) -> Vec<String> {
        items.iter().filter_map(|i| i.meta().name.clone()).collect()
    }
    let got = match kind {
        Kind::Deployment => api(
            cluster,
            call,
            Api::<Deployment>::namespaced(client, ns).list(&lp),
        )
        .await
        .map(|l| names(l.items)),
        Kind::StatefulSet => api(
            cluster,
            call,
            Api::<StatefulSet>::namespaced(client, ns).list(&lp),
        )
        .await
        .map(|l| names(l.items)),
        Kind::DaemonSet => api(
            cluster,
            call,
            Api::<DaemonSet>::namespaced(client, ns).list(&lp),
        )
        .await
        .map(|l| names(l.items)),
        Kind::ReplicaSet => api(
            cluster,
            call,
            Api::<ReplicaSet>::namespaced(client, ns).list(&lp),
        )
        .await
        .map(|l| names(l.items)),
        Kind::Job => api(cluster, call, Api::<Job>::namespaced(client, ns).list(&lp))
            .await
            .map(|l| names(l.items)),
        Kind::Pod => api(cluster, call, Api::<Pod>::namespaced(client, ns).list(&lp))
            .await
            .map(|l| names(l.items)),
    };
    match got {
        Ok(n) if n.is_empty() => format!("there are no {} in it", kind.resource()),
        Ok(n) => format!("{} there: {}", kind.resource(), join_limited(&n)),
        Err(_) => format!("(cannot list the {} there)", kind.resource()),
    }
}

/// Fails with a clear message when the namespace does not exist. A namespace that cannot be
/// read (no permission for `get namespaces`, common for developers) counts as existing.
async fn check_namespace(cluster: &Cluster) -> Result<()> {
    let ns: Api<Namespace> = Api::all(cluster.client.clone());
    let call = Call {
        verb: "get",
        resource: "namespaces",
        name: Some(&cluster.namespace),
    };
    match api(cluster, call, ns.get(&cluster.namespace)).await {
        Err(ApiFailure::NotFound(_)) => {
            let list_call = Call {
                verb: "list",
                resource: "namespaces",
                name: None,
            };
            let known = match api(cluster, list_call, ns.list(&ListParams::default())).await {
                Ok(l) => {
                    let n: Vec<String> = l
                        .items
                        .into_iter()
                        .filter_map(|n| n.metadata.name)
                        .collect();
                    format!("; namespaces: {}", join_limited(&n))
                }
                Err(_) => String::new(),
            };
            Err(anyhow!(
                "the namespace '{}' does not exist in the cluster of context '{}'{known}; \
                 choose one with -n",
                cluster.namespace,
                cluster.context
            ))
        }
        _ => Ok(()),
    }
}

async fn list_pods(cluster: &Cluster, pods: &Api<Pod>, selector: Option<&str>) -> Result<Vec<Pod>> {
    let mut lp = ListParams::default();
    if let Some(s) = selector {
        lp = lp.labels(s);
    }
    let call = Call {
        verb: "list",
        resource: "pods",
        name: None,
    };
    api(cluster, call, pods.list(&lp))
        .await
        .map(|l| l.items)
        .map_err(ApiFailure::into_error)
}

/// "pods there: a (Running, ready), b (Pending: ContainerCreating)" or "there are no pods".
fn describe_pods(pods: &[Pod], label: &str, namespace: &str) -> String {
    if pods.is_empty() {
        return format!("there are no pods in namespace '{namespace}'");
    }
    let items: Vec<String> = pods
        .iter()
        .map(|p| {
            let mut state = phase(p).to_string();
            if p.metadata.deletion_timestamp.is_some() {
                state.push_str(", terminating");
            } else if let Some(why) = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.iter().find(|c| !c.ready))
                .map(container_state)
            {
                state.push_str(&format!(", {why}"));
            } else if is_ready(p) {
                state.push_str(", ready");
            }
            format!("{} ({state})", pod_name(p))
        })
        .collect();
    format!("{label}: {}", join_limited(&items))
}

fn container_state(s: &k8s_openapi::api::core::v1::ContainerStatus) -> String {
    let Some(state) = &s.state else {
        return "state unknown".into();
    };
    if let Some(w) = &state.waiting {
        return format!(
            "waiting: {}",
            w.reason.as_deref().unwrap_or("unknown reason")
        );
    }
    if let Some(t) = &state.terminated {
        return format!(
            "terminated: {} (exit code {})",
            t.reason.as_deref().unwrap_or("unknown reason"),
            t.exit_code
        );
    }
    if state.running.is_some() && !s.ready {
        return "running, not ready".into();
    }
    "running".into()
}

fn join_limited(items: &[String]) -> String {
    if items.len() <= LIST_MAX {
        return items.join(", ");
    }
    format!(
        "{}, and {} more",
        items[..LIST_MAX].join(", "),
        items.len() - LIST_MAX
    )
}

fn pod_name(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap_or("?")
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown")
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A LabelSelector in the string form the list API takes.
pub fn selector_string(sel: &LabelSelector) -> String {
    let mut parts: Vec<String> = Vec::new();
    let labels: BTreeMap<String, String> = sel.match_labels.clone().unwrap_or_default();
    for (k, v) in labels {
        parts.push(format!("{k}={v}"));
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        match e.operator.as_str() {
            "In" => parts.push(format!("{} in ({values})", e.key)),
            "NotIn" => parts.push(format!("{} notin ({values})", e.key)),
            "Exists" => parts.push(e.key.clone()),
            "DoesNotExist" => parts.push(format!("!{}", e.key)),
            other => parts.push(format!("{} {other} ({values})", e.key)),
        }
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selectors_as_strings() {
        let sel = LabelSelector {
            match_labels: Some(BTreeMap::from([
                ("app".to_string(), "web".to_string()),
                ("tier".to_string(), "fe".to_string()),
            ])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "env".into(),
                    operator: "In".into(),
                    values: Some(vec!["dev".into(), "qa".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert_eq!(
            selector_string(&sel),
            "app=web,tier=fe,env in (dev,qa),!canary"
        );
    }
}
