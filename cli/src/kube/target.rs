//! Kubernetes targets as kubectl users write them: `[TYPE/]NAME:/path`, plus the flags that
//! choose the cluster, namespace and container.

use std::fmt;
use std::path::PathBuf;

use anyhow::{Result, bail};

/// The kind of object a target names. A pod is used as it is; every other kind resolves to
/// one running, ready pod of its selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Job,
}

impl Kind {
    /// The spellings kubectl accepts for each kind (singular, plural, short name, with group).
    const SPELLINGS: &'static [(Kind, &'static [&'static str])] = &[
        (Kind::Pod, &["pod", "pods", "po"]),
        (
            Kind::Deployment,
            &[
                "deploy",
                "deployment",
                "deployments",
                "deployment.apps",
                "deployments.apps",
            ],
        ),
        (
            Kind::StatefulSet,
            &[
                "sts",
                "statefulset",
                "statefulsets",
                "statefulset.apps",
                "statefulsets.apps",
            ],
        ),
        (
            Kind::DaemonSet,
            &[
                "ds",
                "daemonset",
                "daemonsets",
                "daemonset.apps",
                "daemonsets.apps",
            ],
        ),
        (
            Kind::ReplicaSet,
            &[
                "rs",
                "replicaset",
                "replicasets",
                "replicaset.apps",
                "replicasets.apps",
            ],
        ),
        (Kind::Job, &["job", "jobs", "job.batch", "jobs.batch"]),
    ];

    fn from_spelling(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        Self::SPELLINGS
            .iter()
            .find(|(_, names)| names.contains(&lower.as_str()))
            .map(|(k, _)| *k)
    }

    /// The short form used in messages and in the canonical target string (`deploy/app`).
    pub fn short(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Deployment => "deploy",
            Kind::StatefulSet => "sts",
            Kind::DaemonSet => "ds",
            Kind::ReplicaSet => "rs",
            Kind::Job => "job",
        }
    }

    /// The resource name as RBAC and the API know it (`deployments`).
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Deployment => "deployments",
            Kind::StatefulSet => "statefulsets",
            Kind::DaemonSet => "daemonsets",
            Kind::ReplicaSet => "replicasets",
            Kind::Job => "jobs",
        }
    }

    /// Whether the pods of this kind are interchangeable replicas (so the newest ready one may
    /// be chosen), as opposed to pods with their own identity or node.
    pub fn replicas_interchangeable(self) -> bool {
        matches!(self, Kind::Deployment | Kind::ReplicaSet | Kind::Job)
    }
}

/// Flags that choose where a Kubernetes target lives. Each is optional: kubectl's defaults
/// apply (KUBECONFIG or ~/.kube/config, its current context, the context's namespace or
/// "default", the default container).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeOptions {
    pub namespace: Option<String>,
    pub container: Option<String>,
    pub context: Option<String>,
    pub kubeconfig: Option<PathBuf>,
}

impl KubeOptions {
    /// The flags as they would be given again on a command line (for the background daemon).
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut out = Vec::new();
        if let Some(n) = &self.namespace {
            out.push(format!("--namespace={n}").into());
        }
        if let Some(c) = &self.container {
            out.push(format!("--container={c}").into());
        }
        if let Some(c) = &self.context {
            out.push(format!("--context={c}").into());
        }
        if let Some(k) = &self.kubeconfig {
            let mut a = std::ffi::OsString::from("--kubeconfig=");
            a.push(k.as_os_str());
            out.push(a);
        }
        out
    }

    /// The names of the flags that are set, for "only for Kubernetes targets" errors.
    pub fn given_flags(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.namespace.is_some() {
            out.push("--namespace");
        }
        if self.container.is_some() {
            out.push("--container");
        }
        if self.context.is_some() {
            out.push("--context");
        }
        if self.kubeconfig.is_some() {
            out.push("--kubeconfig");
        }
        out
    }
}

/// A directory in a container: what `kmount [TYPE/]NAME:/path` names, with the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeTarget {
    pub kind: Kind,
    pub name: String,
    /// Absolute path in the container.
    pub path: String,
    pub options: KubeOptions,
}

impl KubeTarget {
    /// Whether `arg` is meant as a Kubernetes target rather than an ssh one (`user@host:…`,
    /// `ssh://…`) or a local path. Like `kubectl cp`, `NAME:/path` names a pod.
    pub fn looks_like(arg: &str) -> bool {
        if arg.starts_with('/') || arg.starts_with('.') || arg.starts_with('~') {
            return false;
        }
        if arg.contains("://") {
            return false;
        }
        match arg.split_once(':') {
            Some((spec, _)) => !spec.contains('@'),
            None => arg
                .split_once('/')
                .is_some_and(|(kind, _)| Kind::from_spelling(kind).is_some()),
        }
    }

    /// Parses `[TYPE/]NAME:/path` (the flags are added by the caller).
    pub fn parse(arg: &str) -> Result<KubeTarget> {
        let Some((spec, path)) = arg.split_once(':') else {
            bail!(
                "'{arg}' names no directory in the container; add one after a colon, for \
                 example {arg}:/app"
            );
        };
        let (kind, name) = match spec.split_once('/') {
            Some((kind_str, name)) => {
                let Some(kind) = Kind::from_spelling(kind_str) else {
                    bail!(
                        "'{kind_str}' in '{arg}' is not a kind kmount can mount from; use one of \
                         pod, deploy, sts, ds, rs, job (for example deploy/{name}:{path}); to \
                         choose a namespace use -n {kind_str}"
                    );
                };
                (kind, name)
            }
            None => (Kind::Pod, spec),
        };
        if name.is_empty() {
            bail!(
                "'{arg}' names no {}; write its name, for example {}/app:{}",
                kind_noun(kind),
                kind.short(),
                if path.is_empty() { "/app" } else { path }
            );
        }
        check_object_name(name, kind)?;
        if path.is_empty() {
            bail!(
                "'{arg}' names no directory in the container; add one after the colon, for \
                 example {spec}:/app"
            );
        }
        if !path.starts_with('/') {
            bail!(
                "the container path '{path}' in '{arg}' is relative; give an absolute path, for \
                 example {spec}:/{path}"
            );
        }
        if path.contains('\0') {
            bail!("the container path in '{arg}' contains a NUL byte");
        }
        let trimmed = path.trim_end_matches('/');
        let path = if trimmed.is_empty() { "/" } else { trimmed };
        Ok(KubeTarget {
            kind,
            name: name.to_string(),
            path: path.to_string(),
            options: KubeOptions::default(),
        })
    }

    /// `deploy/app:/app` (pods without their kind, as the user would write them).
    pub fn spec(&self) -> String {
        match self.kind {
            Kind::Pod => format!("{}:{}", self.name, self.path),
            k => format!("{}/{}:{}", k.short(), self.name, self.path),
        }
    }

    /// `deploy/app` or `pod/app`.
    pub fn object(&self) -> String {
        format!("{}/{}", self.kind.short(), self.name)
    }
}

impl fmt::Display for KubeTarget {
    /// The target with the flags that change its meaning: `deploy/app:/app -n dev -c web`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.spec())?;
        if let Some(n) = &self.options.namespace {
            write!(f, " -n {n}")?;
        }
        if let Some(c) = &self.options.container {
            write!(f, " -c {c}")?;
        }
        if let Some(c) = &self.options.context {
            write!(f, " --context {c}")?;
        }
        Ok(())
    }
}

fn kind_noun(kind: Kind) -> &'static str {
    match kind {
        Kind::Pod => "pod",
        Kind::Deployment => "deployment",
        Kind::StatefulSet => "statefulset",
        Kind::DaemonSet => "daemonset",
        Kind::ReplicaSet => "replicaset",
        Kind::Job => "job",
    }
}

/// Object names are DNS-1123 subdomains: lowercase letters, digits, '-' and '.', starting and
/// ending with a letter or digit, at most 253 characters.
fn check_object_name(name: &str, kind: Kind) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.len() > 253
        || !name.chars().all(ok_char)
        || !alnum(name.chars().next())
        || !alnum(name.chars().last())
    {
        bail!(
            "'{name}' is not a valid {} name: Kubernetes names use lowercase letters, digits, \
             '-' and '.' (see `kubectl get {}`)",
            kind_noun(kind),
            kind.resource()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(arg: &str) -> KubeTarget {
        KubeTarget::parse(arg).unwrap()
    }

    fn err(arg: &str) -> String {
        format!("{:#}", KubeTarget::parse(arg).unwrap_err())
    }

    #[test]
    fn kinds_and_defaults() {
        let a = t("app-7f9:/srv/app/");
        assert_eq!(
            (a.kind, a.name.as_str(), a.path.as_str()),
            (Kind::Pod, "app-7f9", "/srv/app")
        );
        assert_eq!(t("deploy/app:/app").kind, Kind::Deployment);
        assert_eq!(t("deployment/app:/app").kind, Kind::Deployment);
        assert_eq!(t("Deployments.apps/app:/app").kind, Kind::Deployment);
        assert_eq!(t("sts/db:/data").kind, Kind::StatefulSet);
        assert_eq!(t("statefulset/db:/data").kind, Kind::StatefulSet);
        assert_eq!(t("ds/agent:/").kind, Kind::DaemonSet);
        assert_eq!(t("daemonset/agent:/").path, "/");
        assert_eq!(t("rs/app-1:/x").kind, Kind::ReplicaSet);
        assert_eq!(t("replicaset/app-1:/x").kind, Kind::ReplicaSet);
        assert_eq!(t("job/migrate:/x").kind, Kind::Job);
        assert_eq!(t("pod/web:/x").kind, Kind::Pod);
        assert_eq!(t("po/web:/x").spec(), "web:/x");
        assert_eq!(t("deployment/app:/app/").spec(), "deploy/app:/app");
        // Colons after the first belong to the path.
        assert_eq!(t("web:/a:b").path, "/a:b");
    }

    #[test]
    fn bad_targets_are_explained() {
        let e = err("deploy/:/x");
        assert!(e.contains("names no deployment"), "{e}");
        let e = err("pod/a");
        assert!(e.contains("pod/a:/app"), "{e}");
        let e = err("pod/a:");
        assert!(e.contains("names no directory"), "{e}");
        let e = err("web:app");
        assert!(e.contains("relative") && e.contains("web:/app"), "{e}");
        let e = err("svc/web:/app");
        assert!(e.contains("'svc'") && e.contains("pod, deploy"), "{e}");
        let e = err("Web:/app");
        assert!(e.contains("not a valid pod name"), "{e}");
        let e = err("-x:/app");
        assert!(e.contains("not a valid"), "{e}");
    }

    #[test]
    fn what_looks_like_kubernetes() {
        assert!(KubeTarget::looks_like("app:/x"));
        assert!(KubeTarget::looks_like("deploy/app:/x"));
        assert!(KubeTarget::looks_like("pod/a"));
        assert!(KubeTarget::looks_like("deploy/:/x"));
        assert!(!KubeTarget::looks_like("user@host:/x"));
        assert!(!KubeTarget::looks_like("ssh://host/x"));
        assert!(!KubeTarget::looks_like("./a:b"));
        assert!(!KubeTarget::looks_like("/a:b"));
        assert!(!KubeTarget::looks_like("src"));
    }

    #[test]
    fn options_round_trip_as_flags() {
        let o = KubeOptions {
            namespace: Some("dev".into()),
            container: Some("web".into()),
            context: Some("kind-a".into()),
            kubeconfig: Some("/k/c".into()),
        };
        let args: Vec<String> = o
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--namespace=dev",
                "--container=web",
                "--context=kind-a",
                "--kubeconfig=/k/c"
            ]
        );
        assert_eq!(o.given_flags().len(), 4);
        assert!(KubeOptions::default().given_flags().is_empty());
    }
}
