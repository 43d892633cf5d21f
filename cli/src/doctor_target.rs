//! `kmount doctor TARGET`: the way to a remote target. Kubernetes: the kubeconfig loads, the
//! cluster answers, and the user may exec into pods of the namespace. ssh: the host lets us in
//! without a prompt.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::doctor::Check;
use crate::kube::KubeOptions;
use crate::target::Target;

/// How long one remote check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// The checks for `target` (and for `--context`/`--kubeconfig` without one).
pub fn target_checks(target: Option<&str>, kube: KubeOptions) -> Result<Vec<Check>> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let parsed = target.map(|t| Target::parse(t, &cwd)).transpose()?;
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the I/O runtime")
    };
    Ok(match parsed {
        Some(Target::Ssh(ssh)) => vec![runtime()?.block_on(check_ssh(&ssh))],
        Some(Target::Kube(mut k)) => {
            k.options = kube;
            runtime()?.block_on(kube_checks(&k.options))
        }
        Some(Target::Local { root }) => vec![match root.canonicalize() {
            Ok(p) if p.is_dir() => Check::ok("target", p.display().to_string()),
            _ => Check::fail(
                "target",
                format!("{} is not a directory", root.display()),
                "give an existing directory",
            ),
        }],
        None if kube.context.is_some() || kube.kubeconfig.is_some() => {
            runtime()?.block_on(kube_checks(&kube))
        }
        None => Vec::new(),
    })
}

async fn kube_checks(opts: &KubeOptions) -> Vec<Check> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let cluster = match crate::kube::cluster::Cluster::from_options(opts).await {
        Ok(c) => c,
        Err(e) => {
            return vec![Check::fail(
                "kubeconfig",
                format!("{e:#}"),
                "fix the kubeconfig, or pick a context with --context",
            )];
        }
    };
    let mut checks = vec![Check::ok(
        "kubeconfig",
        format!("context {} ({})", cluster.context, cluster.source),
    )];
    match tokio::time::timeout(CHECK_TIMEOUT, cluster.client.apiserver_version()).await {
        Ok(Ok(v)) => checks.push(Check::ok(
            "cluster",
            format!(
                "{} answers (Kubernetes {}.{})",
                cluster.server, v.major, v.minor
            ),
        )),
        Ok(Err(e)) => {
            checks.push(Check::fail(
                "cluster",
                format!("{} does not answer: {e}", cluster.server),
                "check the network/VPN and that the cluster is up (`kubectl version`)",
            ));
            return checks;
        }
        Err(_) => {
            checks.push(Check::fail(
                "cluster",
                format!("{} did not answer within {CHECK_TIMEOUT:?}", cluster.server),
                "check the network/VPN and that the cluster is up (`kubectl version`)",
            ));
            return checks;
        }
    }
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(cluster.namespace.clone()),
                verb: Some("create".into()),
                resource: Some("pods".into()),
                subresource: Some("exec".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: kube::Api<SelfSubjectAccessReview> = kube::Api::all(cluster.client.clone());
    let ns = &cluster.namespace;
    let asked = tokio::time::timeout(
        CHECK_TIMEOUT,
        api.create(&kube::api::PostParams::default(), &review),
    )
    .await;
    checks.push(match asked {
        Ok(Ok(r)) if r.status.as_ref().is_some_and(|s| s.allowed) => Check::ok(
            "exec permission",
            format!("may exec into pods in namespace {ns}"),
        ),
        Ok(Ok(_)) => Check::fail(
            "exec permission",
            format!("may not exec into pods in namespace {ns} (create pods/exec)"),
            format!(
                "ask for a Role granting `create` on `pods/exec` in {ns}; check with `kubectl \
                 auth can-i create pods/exec -n {ns}`"
            ),
        ),
        Ok(Err(e)) => Check::warn(
            "exec permission",
            format!("cannot ask the cluster: {e}"),
            format!("check with `kubectl auth can-i create pods/exec -n {ns}`"),
        ),
        Err(_) => Check::warn(
            "exec permission",
            "the cluster did not answer in time",
            format!("check with `kubectl auth can-i create pods/exec -n {ns}`"),
        ),
    });
    checks
}

async fn check_ssh(ssh: &crate::ssh::SshTarget) -> Check {
    let shell = match crate::ssh::SshShell::new(&ssh.destination, ssh.port) {
        Ok(s) => s,
        Err(e) => return Check::fail("ssh", format!("{e:#}"), "install the OpenSSH client"),
    };
    let run = shell
        .command("true")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let words = match ssh.port {
        Some(p) => format!("ssh -p {p} {}", ssh.destination),
        None => format!("ssh {}", ssh.destination),
    };
    match tokio::time::timeout(CHECK_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => Check::ok(
            "ssh",
            format!("{} lets us in without a prompt", ssh.destination),
        ),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let host = ssh
                .destination
                .rsplit_once('@')
                .map_or(ssh.destination.as_str(), |(_, h)| h);
            let why =
                crate::ssh::explain_ssh_failure(out.status.code(), &stderr, host, &words, ssh.port)
                    .unwrap_or_else(|| format!("`{words} true` failed: {}", stderr.trim()));
            Check::fail(
                "ssh",
                why,
                format!("make `{words} true` work without a prompt"),
            )
        }
        Ok(Err(e)) => Check::fail(
            "ssh",
            format!("cannot run ssh: {e}"),
            "install the OpenSSH client",
        ),
        Err(_) => Check::fail(
            "ssh",
            format!(
                "{} did not answer within {CHECK_TIMEOUT:?}",
                ssh.destination
            ),
            format!("check that `{words} true` works"),
        ),
    }
}
