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
    choose_workload_pod(target, &candidates, &selector, &cluster.namespace)
}

/// Chooses among `candidates`, the pods of the workload `target` names (`selector` and
/// `namespace` only appear in messages): the newest running one, ready ones first. Pods being
/// deleted never count, so after a pod is deleted its replacement is found, or waited for.
fn choose_workload_pod(
    target: &KubeTarget,
    candidates: &[Pod],
    selector: &str,
    namespace: &str,
) -> Result<Resolved> {
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
            namespace
        )));
    } else {
        return Ok(Resolved::Starting(anyhow!(
            "{} has no running pod yet; {}",
            target.object(),
            describe_pods(candidates, "its pods", namespace)
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
    use serde_json::json;

    fn target(spec: &str) -> KubeTarget {
        KubeTarget::parse(spec).unwrap()
    }

    #[derive(Clone, Copy)]
    enum State {
        /// Running and ready.
        Ready,
        /// Running, container running, not ready.
        Unready,
        /// Pending, container waiting (ContainerCreating).
        Creating,
        /// Running, being deleted.
        Deleting,
    }

    /// A pod of one container "main", created `created` seconds into the day.
    fn pod(name: &str, created: u32, state: State) -> Pod {
        let running = json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}});
        let waiting = json!({"waiting": {"reason": "ContainerCreating"}});
        let (phase, ready, container_state) = match state {
            State::Ready | State::Deleting => ("Running", true, running),
            State::Unready => ("Running", false, running),
            State::Creating => ("Pending", false, waiting),
        };
        let mut metadata = json!({
            "name": name,
            "uid": format!("uid-{name}"),
            "creationTimestamp": format!("2026-01-01T{:02}:{:02}:{:02}Z",
                created / 3600, created / 60 % 60, created % 60),
        });
        if matches!(state, State::Deleting) {
            metadata["deletionTimestamp"] = json!("2026-01-01T23:00:00Z");
        }
        serde_json::from_value(json!({
            "metadata": metadata,
            "spec": {"containers": [{"name": "main", "image": "debian"}]},
            "status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "containerStatuses": [{
                    "name": "main", "ready": ready, "restartCount": 0, "image": "debian",
                    "imageID": "", "state": container_state,
                }],
            },
        }))
        .unwrap()
    }

    fn resolve_among(spec: &str, pods: &[Pod]) -> Result<Resolved> {
        choose_workload_pod(&target(spec), pods, "app=x", "default")
    }

    fn chosen(r: Result<Resolved>) -> PodChoice {
        match r {
            Ok(Resolved::Pod(c)) => c,
            other => panic!("expected a pod, got {other:?}"),
        }
    }

    #[test]
    fn a_deleted_pod_is_followed_to_its_replacement() {
        let pods = [
            pod("x-old", 10, State::Deleting),
            pod("x-new", 20, State::Ready),
        ];
        let c = chosen(resolve_among("deploy/x:/work", &pods));
        assert_eq!((c.pod.as_str(), c.uid.as_str()), ("x-new", "uid-x-new"));
        assert_eq!(c.container, "main");
        assert_eq!(c.note, None);
    }

    #[test]
    fn a_replacement_that_is_still_starting_is_waited_for() {
        let pods = [
            pod("x-old", 10, State::Deleting),
            pod("x-new", 20, State::Creating),
        ];
        let Ok(Resolved::Starting(why)) = resolve_among("deploy/x:/work", &pods) else {
            panic!("expected to wait")
        };
        let why = format!("{why:#}");
        assert!(why.contains("deploy/x has no running pod yet"), "{why}");
        assert!(why.contains("x-old (Running, terminating)"), "{why}");
        assert!(
            why.contains("x-new (Pending, waiting: ContainerCreating)"),
            "{why}"
        );
        // Before the replacement exists, only the deleted pod is there: still waiting.
        let pods = [pod("x-old", 10, State::Deleting)];
        assert!(matches!(
            resolve_among("deploy/x:/work", &pods),
            Ok(Resolved::Starting(_))
        ));
    }

    #[test]
    fn a_workload_without_pods_is_absent() {
        let Ok(Resolved::Absent(why)) = resolve_among("deploy/x:/work", &[]) else {
            panic!("expected absent")
        };
        assert!(format!("{why}").contains("deploy/x has no pods (selector app=x)"));
    }

    #[test]
    fn the_newest_ready_replica_is_chosen_and_the_others_named() {
        let pods = [
            pod("x-a", 10, State::Ready),
            pod("x-c", 30, State::Unready),
            pod("x-b", 20, State::Ready),
        ];
        let c = chosen(resolve_among("deploy/x:/work", &pods));
        assert_eq!(c.pod, "x-b");
        let note = c.note.unwrap();
        assert!(
            note.contains("using the newest, x-b (others: x-a)"),
            "{note}"
        );
        // Without a ready one, a running one will do, with a warning.
        let pods = [
            pod("x-c", 30, State::Unready),
            pod("x-d", 5, State::Creating),
        ];
        let c = chosen(resolve_among("deploy/x:/work", &pods));
        assert_eq!(c.pod, "x-c");
        assert!(c.note.unwrap().contains("no pod of deploy/x is ready"));
    }

    #[test]
    fn pods_with_their_own_identity_are_not_picked_for_the_user() {
        let pods = [pod("db-0", 10, State::Ready), pod("db-1", 20, State::Ready)];
        let err = resolve_among("sts/db:/data", &pods)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sts/db has 2 pods (db-0, db-1)"), "{err}");
        assert!(err.contains("kmount pod/db-0:/data MOUNTPOINT"), "{err}");
        // One pod left (the other being replaced): that one.
        let pods = [
            pod("db-0", 10, State::Ready),
            pod("db-1", 20, State::Deleting),
        ];
        assert_eq!(chosen(resolve_among("sts/db:/data", &pods)).pod, "db-0");
    }

    #[test]
    fn a_named_pod_being_deleted_or_starting_is_waited_for() {
        let t = target("pod/web:/srv");
        let r = choose_container(&t, &pod("web", 10, State::Deleting), None);
        assert!(matches!(r, Ok(Resolved::Starting(_))), "{r:?}");
        let r = choose_container(&t, &pod("web", 10, State::Creating), None);
        let Ok(Resolved::Starting(why)) = r else {
            panic!("expected to wait: {r:?}")
        };
        assert!(format!("{why}").contains("container 'main' of pod 'web' is not running"));
        let c = chosen(choose_container(&t, &pod("web", 10, State::Ready), None));
        assert_eq!((c.pod.as_str(), c.uid.as_str()), ("web", "uid-web"));
    }

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
