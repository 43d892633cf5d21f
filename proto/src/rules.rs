//! Which paths the mount shows and sends: ignore rules in gitignore syntax.
//!
//! Two classes of rule:
//! - **exclude**: the path is hidden from the mount in both directions (remote files are not
//!   shown; nothing local is sent);
//! - **local-only**: the path is shown and can be used locally, but never sent to the remote
//!   (editor swap and backup files by default).
//!
//! Sources, in increasing precedence within a class (later rules win, `!pattern` re-includes,
//! as in git): the built-in defaults (local-only, unless disabled), the `.kmountignore` file at
//! the root, then `--local-only` / `--exclude` flags. `.kmountignore` lines are exclude rules;
//! after a line `[local-only]` they are local-only rules (and `[exclude]` switches back).
//! Exclude wins over local-only. A rule matching a directory covers everything below it.

use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// Built-in local-only patterns: editor temp, swap and backup files.
pub const DEFAULT_LOCAL_ONLY: &[&str] = &[
    // vim: swap files (.x.swp, .x.swo, …), the 4913 write-permission probe, backups
    ".*.sw[a-p]",
    "*.swp",
    "*.swx",
    "4913",
    "*~",
    // emacs: autosave and lock files
    "\\#*#",
    ".#*",
    // JetBrains IDEs: safe-write temporaries
    "*___jb_tmp___",
    "*___jb_old___",
    // macOS Finder
    ".DS_Store",
    // kmount's own: the other version of a file changed on both sides
    "*.kmount-conflict-*",
];

/// What the rules decide for a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Shown and sent.
    Synced,
    /// Shown locally, never sent.
    LocalOnly,
    /// Not shown, not sent.
    Excluded,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Synced => "synced",
            Class::LocalOnly => "local-only",
            Class::Excluded => "excluded",
        }
    }
}

/// Where a rule came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    /// A command-line flag (`--exclude`, `--local-only`) or a `kmount.toml` list.
    Flag(&'static str),
    /// A `.kmountignore` file.
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Flag(flag) => f.write_str(flag),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The rule that decided, as `git check-ignore -v` shows it: source, line (1-based), pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub source: Source,
    pub line: usize,
    pub pattern: String,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.source, self.line, self.pattern)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub class: Class,
    /// The deciding rule; `None` when no rule matched (synced by default). A negated rule
    /// (`!pattern`) that re-included the path is reported too.
    pub rule: Option<Rule>,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{source_name} line {line}: invalid pattern '{pattern}': {error}")]
    Pattern {
        source_name: String,
        line: usize,
        pattern: String,
        error: String,
    },
}

/// What the user configured; the mount sends it to the agent ([`crate::Op::SetRules`]) so both
/// sides decide alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RulesConfig {
    pub exclude: Vec<String>,
    pub local_only: Vec<String>,
    /// Leave out [`DEFAULT_LOCAL_ONLY`].
    pub no_defaults: bool,
    /// Contents of `.kmountignore` and the path it was read from.
    pub kmountignore: Option<(PathBuf, String)>,
}

/// One source's patterns of one class, compiled.
#[derive(Debug)]
struct Layer {
    source: Source,
    /// The patterns in order, with their line numbers, to name the deciding line.
    lines: Vec<(usize, String)>,
    matcher: Gitignore,
}

#[derive(Debug)]
pub struct Rules {
    /// Lowest precedence first.
    exclude: Vec<Layer>,
    local_only: Vec<Layer>,
}

impl Rules {
    pub fn new(cfg: &RulesConfig) -> Result<Rules, RulesError> {
        let mut exclude = Vec::new();
        let mut local_only = Vec::new();
        if !cfg.no_defaults {
            let lines = DEFAULT_LOCAL_ONLY
                .iter()
                .enumerate()
                .map(|(i, p)| (i + 1, p.to_string()))
                .collect();
            local_only.push(layer(Source::Default, lines)?);
        }
        if let Some((path, text)) = &cfg.kmountignore {
            let mut ex = Vec::new();
            let mut lo = Vec::new();
            let mut to_local = false;
            for (i, raw) in text.lines().enumerate() {
                let line = raw.trim_end();
                match line.trim() {
                    "[local-only]" => to_local = true,
                    "[exclude]" => to_local = false,
                    t if t.is_empty() || t.starts_with('#') => {}
                    _ if to_local => lo.push((i + 1, line.to_string())),
                    _ => ex.push((i + 1, line.to_string())),
                }
            }
            exclude.push(layer(Source::File(path.clone()), ex)?);
            local_only.push(layer(Source::File(path.clone()), lo)?);
        }
        let numbered = |v: &[String]| -> Vec<(usize, String)> {
            v.iter()
                .enumerate()
                .map(|(i, p)| (i + 1, p.clone()))
                .collect()
        };
        local_only.push(layer(
            Source::Flag("--local-only"),
            numbered(&cfg.local_only),
        )?);
        exclude.push(layer(Source::Flag("--exclude"), numbered(&cfg.exclude))?);
        Ok(Rules {
            exclude,
            local_only,
        })
    }

    /// No rules at all: every path is synced.
    pub fn none() -> Rules {
        Rules {
            exclude: Vec::new(),
            local_only: Vec::new(),
        }
    }

    /// Decides for `path` (relative to the root, '/'-separated; `is_dir` for directories).
    pub fn classify(&self, path: &Path, is_dir: bool) -> Decision {
        if let Some((rule, true)) = decide(&self.exclude, path, is_dir) {
            return Decision {
                class: Class::Excluded,
                rule: Some(rule),
            };
        }
        match decide(&self.local_only, path, is_dir) {
            Some((rule, true)) => Decision {
                class: Class::LocalOnly,
                rule: Some(rule),
            },
            Some((rule, false)) => Decision {
                class: Class::Synced,
                rule: Some(rule),
            },
            None => Decision {
                class: Class::Synced,
                rule: decide(&self.exclude, path, is_dir).map(|(r, _)| r),
            },
        }
    }

    /// Shorthand for [`Rules::classify`]`(..).class`.
    pub fn class(&self, path: &Path, is_dir: bool) -> Class {
        self.classify(path, is_dir).class
    }
}

fn layer(source: Source, lines: Vec<(usize, String)>) -> Result<Layer, RulesError> {
    let mut b = GitignoreBuilder::new("/");
    for (line, pattern) in &lines {
        b.add_line(None, pattern).map_err(|e| RulesError::Pattern {
            source_name: source.to_string(),
            line: *line,
            pattern: pattern.clone(),
            error: e.to_string(),
        })?;
    }
    let matcher = b.build().map_err(|e| RulesError::Pattern {
        source_name: source.to_string(),
        line: 0,
        pattern: String::new(),
        error: e.to_string(),
    })?;
    Ok(Layer {
        source,
        lines,
        matcher,
    })
}

/// The highest-precedence layer with a match for `path` or a parent: the rule and whether it
/// includes the path in the class (`false` for a `!` re-include).
fn decide(layers: &[Layer], path: &Path, is_dir: bool) -> Option<(Rule, bool)> {
    let abs = Path::new("/").join(path);
    for layer in layers.iter().rev() {
        let m = layer.matcher.matched_path_or_any_parents(&abs, is_dir);
        let (glob, hit) = match m {
            ignore::Match::None => continue,
            ignore::Match::Ignore(g) => (g, true),
            ignore::Match::Whitelist(g) => (g, false),
        };
        let original = glob.original();
        let line = layer
            .lines
            .iter()
            .rev()
            .find(|(_, p)| p.trim() == original.trim())
            .map(|(l, _)| *l)
            .unwrap_or(0);
        return Some((
            Rule {
                source: layer.source.clone(),
                line,
                pattern: original.to_string(),
            },
            hit,
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(cfg: RulesConfig) -> Rules {
        Rules::new(&cfg).unwrap()
    }

    #[test]
    fn editor_junk_is_local_only_by_default() {
        let r = rules(RulesConfig::default());
        for p in [
            "src/.main.rs.swp",
            "src/.main.rs.swo",
            "a.swx",
            "src/4913",
            "notes.txt~",
            "#draft#",
            "lib/.#lock",
            "Main.java___jb_tmp___",
            "Main.java___jb_old___",
            "deep/.DS_Store",
            "src/app.js.kmount-conflict-20261126-131500",
        ] {
            assert_eq!(r.class(Path::new(p), false), Class::LocalOnly, "{p}");
        }
        for p in ["src/main.rs", "swp", "index.js", "a#b"] {
            assert_eq!(r.class(Path::new(p), false), Class::Synced, "{p}");
        }
        let d = r.classify(Path::new("src/.main.rs.swp"), false);
        let rule = d.rule.unwrap();
        assert_eq!(rule.source, Source::Default);
        assert_eq!(rule.to_string(), "default:2:*.swp");
    }

    #[test]
    fn no_defaults_turns_them_off() {
        let r = rules(RulesConfig {
            no_defaults: true,
            ..Default::default()
        });
        assert_eq!(r.class(Path::new(".x.swp"), false), Class::Synced);
    }

    #[test]
    fn exclude_wins_and_covers_directories() {
        let r = rules(RulesConfig {
            exclude: vec!["node_modules/".into(), "*.log".into()],
            local_only: vec!["*.log".into(), ".env".into()],
            ..Default::default()
        });
        assert_eq!(r.class(Path::new("node_modules"), true), Class::Excluded);
        assert_eq!(
            r.class(Path::new("node_modules/a/index.js"), false),
            Class::Excluded
        );
        assert_eq!(r.class(Path::new("x/debug.log"), false), Class::Excluded);
        assert_eq!(r.class(Path::new(".env"), false), Class::LocalOnly);
        let d = r.classify(Path::new("x/debug.log"), false);
        assert_eq!(d.rule.unwrap().to_string(), "--exclude:2:*.log");
    }

    #[test]
    fn kmountignore_sections_lines_and_negation() {
        let text = "# comment\nbuild/\n\n[local-only]\n*.tmp\n!keep.tmp\n[exclude]\ncache/\n";
        let r = rules(RulesConfig {
            kmountignore: Some((PathBuf::from(".kmountignore"), text.into())),
            ..Default::default()
        });
        let d = r.classify(Path::new("build/out.o"), false);
        assert_eq!(d.class, Class::Excluded);
        assert_eq!(d.rule.unwrap().to_string(), ".kmountignore:2:build/");
        assert_eq!(r.class(Path::new("cache/x"), false), Class::Excluded);
        let d = r.classify(Path::new("a.tmp"), false);
        assert_eq!(d.class, Class::LocalOnly);
        assert_eq!(d.rule.unwrap().line, 5);
        let d = r.classify(Path::new("keep.tmp"), false);
        assert_eq!(d.class, Class::Synced);
        assert_eq!(d.rule.unwrap().to_string(), ".kmountignore:6:!keep.tmp");
        assert_eq!(r.classify(Path::new("src/x.rs"), false).rule, None);
    }

    #[test]
    fn flags_override_the_file() {
        let r = rules(RulesConfig {
            local_only: vec!["!important.tmp".into()],
            kmountignore: Some((
                PathBuf::from(".kmountignore"),
                "[local-only]\n*.tmp\n".into(),
            )),
            ..Default::default()
        });
        assert_eq!(r.class(Path::new("important.tmp"), false), Class::Synced);
        assert_eq!(r.class(Path::new("other.tmp"), false), Class::LocalOnly);
    }

    #[test]
    fn bad_patterns_name_their_line() {
        let e = Rules::new(&RulesConfig {
            exclude: vec!["ok".into(), "a[z-a]".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--exclude line 2"), "{e}");
    }
}
