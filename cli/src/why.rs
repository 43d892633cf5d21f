//! `kmount why PATH`: which ignore rule decides for a path, asked of the mount's daemon (it
//! holds the rules in force, `.kmountignore` included). Output like `git check-ignore -v`.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::state::{MountRecord, StateDirs, mount_id, pid_alive};
use crate::{absolute_mountpoint, control, mounted_list};

/// The control request (`why <json>`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Question {
    /// Relative to the mount's root, '/'-separated ("" is the root).
    pub path: String,
    /// `None`: unknown (the path does not exist in the mount, which it does not when a rule
    /// hides it); the daemon then tries it as a directory and as a file.
    pub is_dir: Option<bool>,
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    /// excluded | local-only | synced
    pub class: String,
    /// `source:line:pattern` of the deciding rule, if one matched.
    pub rule: Option<String>,
}

/// The daemon side.
pub fn answer(rules: &kmount_mount::rules::Rules, q: &Question) -> Answer {
    let path = Path::new(&q.path);
    let d = match q.is_dir {
        Some(is_dir) => rules.classify(path, is_dir),
        None => {
            let as_dir = rules.classify(path, true);
            if as_dir.class == kmount_mount::rules::Class::Synced {
                rules.classify(path, false)
            } else {
                as_dir
            }
        }
    };
    Answer {
        class: d.class.as_str().to_string(),
        rule: d.rule.map(|r| r.to_string()),
    }
}

/// `kmount why PATH [--mount MOUNTPOINT]`. `Ok(true)`: excluded or local-only.
pub fn command(path: &Path, mount: Option<&Path>) -> Result<bool> {
    let dirs = StateDirs::for_current_user()?;
    let (rec, rel) = locate(&dirs, path, mount)?;
    if !pid_alive(rec.pid) {
        bail!(
            "the kmount process of {} is gone; `kmount unmount {}` cleans up",
            rec.mountpoint.display(),
            rec.mountpoint.display()
        );
    }
    let is_dir = if path.as_os_str().to_string_lossy().ends_with('/') {
        Some(true)
    } else {
        std::fs::symlink_metadata(rec.mountpoint.join(&rel))
            .ok()
            .map(|m| m.is_dir())
    };
    let q = Question {
        path: rel.to_string_lossy().into_owned(),
        is_dir,
    };
    let sock = dirs.socket_path(&mount_id(&rec.mountpoint));
    let json = control::request(
        &sock,
        &format!("why {}", serde_json::to_string(&q)?),
        Duration::from_secs(10),
    )
    .with_context(|| format!("cannot ask the mount {}", rec.mountpoint.display()))?;
    let a: Answer = serde_json::from_str(&json).context("unreadable answer from the daemon")?;
    let shown = path.display();
    match &a.rule {
        Some(rule) => println!("{rule}\t{shown}\t{}", a.class),
        None => println!("::\t{shown}\t{} (no rule matches)", a.class),
    }
    Ok(a.class != "synced")
}

/// The mount `path` is in, and `path` relative to its root.
fn locate(dirs: &StateDirs, path: &Path, mount: Option<&Path>) -> Result<(MountRecord, PathBuf)> {
    if let Some(m) = mount {
        let rec = crate::find_record(dirs, m)?;
        let rel = if path.is_absolute() {
            normalize(path)
                .strip_prefix(&rec.mountpoint)
                .map(Path::to_path_buf)
                .with_context(|| {
                    format!(
                        "{} is not in the mount {}",
                        path.display(),
                        rec.mountpoint.display()
                    )
                })?
        } else {
            normalize(&Path::new("/").join(path))
                .strip_prefix("/")
                .map(Path::to_path_buf)
                .unwrap_or_default()
        };
        return Ok((rec, rel));
    }
    // Lexically: the path may be hidden by the very rule asked about, so it may not exist.
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let abs = normalize(&cwd.join(path));
    let abs = match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => absolute_mountpoint(parent)
            .map(|p| p.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    };
    let best = dirs
        .records()
        .into_iter()
        .filter(|r| abs.starts_with(&r.mountpoint))
        .max_by_key(|r| r.mountpoint.as_os_str().len());
    match best {
        Some(rec) => {
            let rel = abs
                .strip_prefix(&rec.mountpoint)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            Ok((rec, rel))
        }
        None => bail!(
            "{} is not in a kmount mount; give a path in one, or one relative to its root with \
             --mount MOUNTPOINT ({})",
            path.display(),
            mounted_list(dirs)
        ),
    }
}

/// Removes `.` and resolves `..` without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmount_mount::rules::{Rules, RulesConfig};

    #[test]
    fn answers_like_check_ignore() {
        let rules = Rules::new(&RulesConfig {
            exclude: vec!["node_modules/".into()],
            local_only: vec!["*.tmp".into()],
            ..RulesConfig::default()
        })
        .unwrap();
        let ask = |path: &str, is_dir: bool| {
            answer(
                &rules,
                &Question {
                    path: path.into(),
                    is_dir: Some(is_dir),
                },
            )
        };
        let a = ask("web/node_modules", true);
        assert_eq!(a.class, "excluded");
        assert_eq!(a.rule.as_deref(), Some("--exclude:1:node_modules/"));
        assert_eq!(ask("a.tmp", false).class, "local-only");
        assert_eq!(
            ask(".x.swp", false).rule.as_deref(),
            Some("default:2:*.swp")
        );
        let a = ask("src/main.rs", false);
        assert_eq!((a.class.as_str(), a.rule), ("synced", None));
        // A hidden directory does not exist in the mount: tried as a directory too.
        let unknown = |path: &str| {
            answer(
                &rules,
                &Question {
                    path: path.into(),
                    is_dir: None,
                },
            )
        };
        assert_eq!(unknown("web/node_modules").class, "excluded");
        assert_eq!(unknown("a.tmp").class, "local-only");
        assert_eq!(unknown("src/main.rs").class, "synced");
    }

    #[test]
    fn paths_are_normalized_lexically() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    }
}
