//! `kmount.toml`: a project's mounts, set up once and brought up with `kmount up`.
//!
//! ```toml
//! [[mount]]
//! target = "deploy/app:/app"   # any target kmount accepts
//! mountpoint = "mnt"           # relative to this file
//! # optional: namespace, context, container, exclude = [...], local_only = [...], on_change = "...",
//! # remote_timeout = "10s"
//! ```
//!
//! The file is found like git finds `.git`: in the current directory or the nearest parent.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

pub const FILE_NAME: &str = "kmount.toml";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub mount: Vec<MountEntry>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MountEntry {
    pub target: String,
    pub mountpoint: PathBuf,
    pub namespace: Option<String>,
    pub context: Option<String>,
    pub container: Option<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub local_only: Vec<String>,
    pub on_change: Option<String>,
    /// `--remote-timeout`, as the flag takes it ("10s", "2m").
    pub remote_timeout: Option<String>,
    /// The line of its `[[mount]]` header (filled in by [`load`]), for messages.
    #[serde(skip)]
    pub line: usize,
}

/// A loaded file: where it is and what it says, with mountpoints made absolute.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub mounts: Vec<MountEntry>,
}

/// The nearest `kmount.toml` at or above `start`.
fn find(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|d| d.join(FILE_NAME))
        .find(|p| p.is_file())
}

/// Finds and loads the nearest `kmount.toml`, or says how to create one.
pub fn load_nearest(start: &Path) -> Result<Config> {
    let Some(path) = find(start) else {
        bail!(
            "no {FILE_NAME} in {} or any parent directory; create one, for example:\n\n\
             [[mount]]\ntarget = \"deploy/app:/app\"\nmountpoint = \"mnt\"",
            start.display()
        );
    };
    load(&path)
}

pub fn load(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = parse(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mounts = file
        .mount
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            if m.mountpoint.is_relative() {
                m.mountpoint = base.join(&m.mountpoint);
            }
            m.line = mount_line(&text, i);
            m
        })
        .collect();
    Ok(Config {
        path: path.to_path_buf(),
        mounts,
    })
}

/// Parses the text; errors start with the line number (`12: …`).
pub fn parse(text: &str) -> Result<ConfigFile, String> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            })
            .unwrap_or(1);
        format!("{line}: {}", e.message())
    })?;
    if file.mount.is_empty() {
        return Err("1: no [[mount]] entries".into());
    }
    for (i, m) in file.mount.iter().enumerate() {
        let line = mount_line(text, i);
        if m.target.trim().is_empty() {
            return Err(format!("{line}: [[mount]] #{}: target is empty", i + 1));
        }
        if m.mountpoint.as_os_str().is_empty() {
            return Err(format!("{line}: [[mount]] #{}: mountpoint is empty", i + 1));
        }
    }
    Ok(file)
}

/// The line of the `i`-th `[[mount]]` header, for error messages.
fn mount_line(text: &str, i: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == "[[mount]]")
        .nth(i)
        .map(|(n, _)| n + 1)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let f = parse(
            "[[mount]]\ntarget = \"deploy/app:/app\"\nmountpoint = \"mnt\"\n\
             namespace = \"dev\"\nexclude = [\"node_modules/\"]\non_change = \"make\"\n",
        )
        .unwrap();
        assert_eq!(f.mount.len(), 1);
        assert_eq!(f.mount[0].target, "deploy/app:/app");
        assert_eq!(f.mount[0].namespace.as_deref(), Some("dev"));
        assert_eq!(f.mount[0].exclude, vec!["node_modules/".to_string()]);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("[[mount]]\ntarget = \"a\"\nmountpoint = \"m\"\nbogus = 1\n").unwrap_err();
        assert!(e.starts_with("4:"), "{e}");
        let e = parse("[[mount]]\ntarget = \"./a\"\nmountpoint = 3\n").unwrap_err();
        assert!(e.starts_with("3:"), "{e}");
        let e = parse("[[mount]]\ntarget = \"./a\"\n").unwrap_err();
        assert!(e.contains("mountpoint"), "{e}");
        let e = parse("[[mount]]\ntarget = \"./a\"\nmountpoint = \"m\"\n\n[[mount]]\ntarget = \"\"\nmountpoint = \"n\"\n")
            .unwrap_err();
        assert!(e.starts_with("5:"), "{e}");
        assert!(parse("").unwrap_err().contains("no [[mount]]"));
        let e = parse("[[mount]\n").unwrap_err();
        assert!(e.starts_with("1:"), "{e}");
    }

    #[test]
    fn found_like_git_and_mountpoints_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            "[[mount]]\ntarget = \"./src\"\nmountpoint = \"mnt\"\n",
        )
        .unwrap();
        let cfg = load_nearest(&deep).unwrap();
        assert_eq!(cfg.path, dir.path().join(FILE_NAME));
        assert_eq!(cfg.mounts[0].mountpoint, dir.path().join("mnt"));
        let empty = tempfile::tempdir().unwrap();
        let e = load_nearest(empty.path()).unwrap_err().to_string();
        assert!(e.contains("create one"), "{e}");
    }
}
