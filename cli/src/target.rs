//! What the user asked to mount: parsing of the TARGET argument.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A parsed TARGET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A directory on this machine, served by a local `kmount-agent` child process.
    Local { root: PathBuf },
    /// A directory in a container: `[TYPE/]NAME:/path` (kubectl's notation).
    Kube(crate::kube::KubeTarget),
    /// A directory on a host reached with the system `ssh` client.
    Ssh(crate::ssh::SshTarget),
}

impl Target {
    /// Parses TARGET as the user typed it. Relative local paths are resolved against `cwd`.
    pub fn parse(arg: &str, cwd: &Path) -> Result<Target> {
        if arg.is_empty() {
            bail!("the target is empty; give a directory such as ./src or /srv/app");
        }
        if arg.starts_with('/') || arg.starts_with('.') || arg.starts_with('~') {
            let expanded = expand_tilde(arg)?;
            let root = if expanded.is_absolute() {
                expanded
            } else {
                cwd.join(expanded)
            };
            return Ok(Target::Local { root });
        }
        if let Some(ssh) = crate::ssh::SshTarget::parse(arg) {
            return Ok(Target::Ssh(ssh?));
        }
        if crate::kube::KubeTarget::looks_like(arg) {
            return Ok(Target::Kube(crate::kube::KubeTarget::parse(arg)?));
        }
        if arg.contains(':') {
            bail!(
                "'{arg}' looks like a Kubernetes or ssh target; this build of kmount mounts local \
                 directories only (a path starting with '/', '.' or '~'), remote targets come in a \
                 later release"
            );
        }
        bail!(
            "cannot tell what '{arg}' is: a local directory must start with '/', '.' or '~' \
             (for example ./{arg})"
        )
    }

    /// The argument that names this target again (for the background daemon's command line).
    pub fn to_arg(&self) -> std::ffi::OsString {
        match self {
            Target::Local { root } => root.as_os_str().to_owned(),
            Target::Kube(k) => k.spec().into(),
            Target::Ssh(ssh) => ssh.to_string_form().into(),
        }
    }

    /// How the target is shown to the user and recorded in `kmount list`.
    pub fn display(&self) -> String {
        match self {
            Target::Local { root } => root.display().to_string(),
            Target::Kube(k) => k.to_string(),
            Target::Ssh(ssh) => ssh.to_string_form(),
        }
    }
}

fn expand_tilde(arg: &str) -> Result<PathBuf> {
    let Some(rest) = arg.strip_prefix('~') else {
        return Ok(PathBuf::from(arg));
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        bail!("'{arg}': only '~' and '~/…' are understood, not '~user'; write the full path");
    }
    let home = std::env::var_os("HOME").context("'~' was used but $HOME is not set")?;
    Ok(PathBuf::from(home).join(rest.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_forms() {
        let cwd = Path::new("/work");
        assert_eq!(
            Target::parse("./src", cwd).unwrap(),
            Target::Local {
                root: "/work/./src".into()
            }
        );
        assert_eq!(
            Target::parse("/srv/app", cwd).unwrap(),
            Target::Local {
                root: "/srv/app".into()
            }
        );
        assert_eq!(
            Target::parse("..", cwd).unwrap(),
            Target::Local {
                root: "/work/..".into()
            }
        );
    }

    #[test]
    fn tilde_uses_home() {
        let home = std::env::var("HOME").unwrap_or_default();
        if home.is_empty() {
            return;
        }
        let t = Target::parse("~/x", Path::new("/")).unwrap();
        assert_eq!(
            t,
            Target::Local {
                root: Path::new(&home).join("x")
            }
        );
        assert!(Target::parse("~bob/x", Path::new("/")).is_err());
    }

    #[test]
    fn unclear_targets_are_explained() {
        let e = Target::parse("src", Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("./src"), "{e}");
        assert!(matches!(
            Target::parse("deploy/app:/app", Path::new("/")),
            Ok(Target::Kube(_))
        ));
        assert!(Target::parse("", Path::new("/")).is_err());
    }
}
