//! `Op::SetRules`: the mount's ignore rules, and which paths they hide from this session.
//!
//! Every path the rules class as excluded or local-only ([`Class`]) is hidden: left out of
//! walks, listings, digests and watcher events, `ENOENT` to lookups. A hidden directory is
//! never listed, walked or watched, so `--exclude node_modules` makes walks cheap.
//! The root itself is never hidden. Until the first `SetRules` nothing is hidden.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use kmount_proto::rules::{Class, Rules, RulesConfig};
use kmount_proto::{RelPath, WireError};

/// The rules of one session; shared with the watcher thread.
#[derive(Debug, Default)]
pub struct Hide {
    rules: RwLock<Option<Arc<Rules>>>,
    /// What the rules were compiled from.
    config: std::sync::Mutex<Option<RulesConfig>>,
}

/// The rules in force at one moment (cheap to keep for a whole listing).
#[derive(Debug, Clone, Default)]
pub struct View(Option<Arc<Rules>>);

impl Hide {
    /// Compiles and installs `cfg`, replacing earlier rules; `true` when they differ from
    /// the earlier ones. An invalid pattern is `EINVAL` naming it, and leaves the earlier
    /// rules in force.
    pub fn set(&self, cfg: &RulesConfig) -> Result<bool, WireError> {
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        if config.as_ref() == Some(cfg) {
            return Ok(false);
        }
        let rules = Rules::new(cfg).map_err(|e| {
            WireError::new(
                libc::EINVAL,
                format!("bad ignore rule: {e}; fix or remove that pattern"),
            )
        })?;
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(rules));
        *config = Some(cfg.clone());
        Ok(true)
    }

    pub fn view(&self) -> View {
        View(self.rules.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Shorthand for `self.view().hidden(path, is_dir)`.
    pub fn hidden(&self, path: &RelPath, is_dir: bool) -> bool {
        self.view().hidden(path, is_dir)
    }
}

impl View {
    /// Whether any rule is set (otherwise nothing is hidden).
    pub fn active(&self) -> bool {
        self.0.is_some()
    }

    /// Whether `path` (a directory when `is_dir`) is hidden: its class, or that of a parent
    /// directory, is not synced.
    pub fn hidden(&self, path: &RelPath, is_dir: bool) -> bool {
        match &self.0 {
            Some(rules) if !path.is_root() => rules.class(as_path(path), is_dir) != Class::Synced,
            _ => false,
        }
    }

    /// For a path whose kind is unknown (it is gone): hidden when it would be as a file or as
    /// a directory. Wrongly hiding a removal leaves a stale entry that reconciliation repairs;
    /// wrongly reporting one could remove a local-only node on the mount side.
    pub fn hidden_any(&self, path: &RelPath) -> bool {
        self.hidden(path, false) || self.hidden(path, true)
    }

    /// With a known kind when there is one.
    pub fn hidden_kind(&self, path: &RelPath, is_dir: Option<bool>) -> bool {
        match is_dir {
            Some(d) => self.hidden(path, d),
            None => self.hidden_any(path),
        }
    }
}

pub fn as_path(p: &RelPath) -> &Path {
    Path::new(OsStr::from_bytes(p.as_bytes()))
}
