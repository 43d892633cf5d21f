//! The benchmark's data, generated deterministically (same arguments, same bytes):
//!
//! - `repo/`: a git repository shaped like a JavaScript project with its `node_modules`:
//!   packages (some scoped, some with nested `node_modules`), each with `package.json`,
//!   README, LICENSE, `lib/`/`dist/` trees of small `.js`/`.d.ts`/`.map` files and a few large
//!   bundles, plus `node_modules/.bin` symlinks. Committed, packed, and with a refreshed index
//!   whose entries are not "racily clean", so `git status` only needs to stat.
//! - `big.bin`: one large incompressible file.
//! - an archive of small files for the untar workload.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Bump when the generator changes, so an old tree is not reused.
const VERSION: u32 = 1;

/// splitmix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }

    pub fn pick<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        items[self.range(0, items.len() as u64) as usize]
    }

    /// Sizes like those in node_modules: mostly small, a long tail of big ones.
    fn file_size(&mut self) -> usize {
        let roll = self.range(0, 1000);
        (match roll {
            0..=599 => self.range(80, 3_000),
            600..=899 => self.range(3_000, 12_000),
            900..=989 => self.range(12_000, 80_000),
            990..=998 => self.range(80_000, 400_000),
            _ => self.range(400_000, 1_500_000),
        }) as usize
    }
}

const SYLLABLES: &[&str] = &[
    "ba", "co", "da", "fe", "gi", "ho", "ju", "ka", "lo", "mi", "no", "pa", "qu", "ri", "so", "tu",
    "ve", "wa", "xi", "yo", "ze", "ar", "el", "in", "on", "ul", "ex", "ap", "ty", "re",
];
const WORDS: &[&str] = &[
    "function",
    "return",
    "const",
    "let",
    "var",
    "if",
    "else",
    "for",
    "while",
    "module",
    "exports",
    "require",
    "this",
    "new",
    "typeof",
    "undefined",
    "null",
    "true",
    "false",
    "=>",
    "{",
    "}",
    "(",
    ")",
    ";",
    "=",
    "===",
    "+",
    ".",
    ",",
    "value",
    "options",
    "callback",
    "err",
    "data",
    "result",
    "index",
    "length",
    "prototype",
    "Object",
    "Array",
    "String",
    "Promise",
];

fn name(rng: &mut Rng, syllables: u64) -> String {
    (0..syllables).map(|_| rng.pick(SYLLABLES)).collect()
}

/// `size` bytes of JavaScript-looking text.
fn js_text(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    let mut col = 0;
    while out.len() < size {
        let w = rng.pick(WORDS);
        out.extend_from_slice(w.as_bytes());
        col += w.len() + 1;
        if col > 70 {
            out.push(b'\n');
            col = 0;
        } else {
            out.push(b' ');
        }
    }
    out.truncate(size);
    out
}

/// Summary of a generated tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

struct Builder {
    rng: Rng,
    stats: TreeStats,
    target_files: u64,
    /// (link path relative to node_modules/.bin, target relative to it)
    bins: Vec<(String, String)>,
}

impl Builder {
    fn file(&mut self, path: &Path, content: &[u8]) -> io::Result<()> {
        fs::write(path, content)?;
        self.stats.files += 1;
        self.stats.bytes += content.len() as u64;
        Ok(())
    }

    fn dir(&mut self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)?;
        self.stats.dirs += 1;
        Ok(())
    }

    fn done(&self) -> bool {
        self.stats.files >= self.target_files
    }

    /// One package at `dir` named `pkg`; `depth` > 0 for nested dependencies.
    fn package(&mut self, dir: &Path, pkg: &str, depth: u32) -> io::Result<()> {
        self.dir(dir)?;
        let version = format!(
            "{}.{}.{}",
            self.rng.range(0, 12),
            self.rng.range(0, 30),
            self.rng.range(0, 20)
        );
        let mut manifest = format!(
            "{{\n  \"name\": \"{pkg}\",\n  \"version\": \"{version}\",\n  \"main\": \"index.js\",\n  \"license\": \"MIT\",\n  \"dependencies\": {{\n"
        );
        for i in 0..self.rng.range(0, 6) {
            let dep = name(&mut self.rng, 3);
            manifest.push_str(&format!(
                "    \"{dep}\": \"^{}.{i}.0\",\n",
                self.rng.range(0, 9)
            ));
        }
        manifest.push_str("    \"kmount-bench\": \"*\"\n  }\n}\n");
        self.file(&dir.join("package.json"), manifest.as_bytes())?;
        let size = self.rng.range(500, 8_000) as usize;
        let readme = js_text(&mut self.rng, size);
        self.file(&dir.join("README.md"), &readme)?;
        self.file(
            &dir.join("LICENSE"),
            b"MIT License\n\nPermission is hereby granted, free of charge, to any person.\n",
        )?;
        let size = self.rng.range(100, 2_000) as usize;
        let index = js_text(&mut self.rng, size);
        self.file(&dir.join("index.js"), &index)?;
        if self.rng.chance(15) {
            self.dir(&dir.join("bin"))?;
            let size = self.rng.range(200, 3_000) as usize;
            let cli = js_text(&mut self.rng, size);
            self.file(&dir.join("bin/cli.js"), &cli)?;
            self.bins.push((
                name(&mut self.rng, 2),
                format!("../{}/bin/cli.js", dir_after_node_modules(dir)),
            ));
        }
        // Source trees: lib/ always, dist/{cjs,esm} sometimes, a few levels deep.
        let mut trees = vec!["lib".to_string()];
        if self.rng.chance(35) {
            trees.push("dist/cjs".into());
            trees.push("dist/esm".into());
        }
        for t in trees {
            let base = dir.join(&t);
            self.dir(&base)?;
            let subdirs = self.rng.range(0, 4);
            let mut dirs = vec![base.clone()];
            for _ in 0..subdirs {
                let sub = base.join(name(&mut self.rng, 2));
                if !sub.exists() {
                    self.dir(&sub)?;
                    dirs.push(sub);
                }
            }
            for d in dirs {
                for _ in 0..self.rng.range(1, 9) {
                    let stem = name(&mut self.rng, 3);
                    let size = self.rng.file_size();
                    let js = js_text(&mut self.rng, size);
                    self.file(&d.join(format!("{stem}.js")), &js)?;
                    if self.rng.chance(40) {
                        let size = self.rng.range(100, 2_500) as usize;
                        let dts = js_text(&mut self.rng, size);
                        self.file(&d.join(format!("{stem}.d.ts")), &dts)?;
                    }
                    if self.rng.chance(25) {
                        let size = self.rng.file_size();
                        let map = js_text(&mut self.rng, size);
                        self.file(&d.join(format!("{stem}.js.map")), &map)?;
                    }
                }
                if self.done() {
                    return Ok(());
                }
            }
        }
        if depth == 0 && self.rng.chance(20) {
            let nested = dir.join("node_modules");
            self.dir(&nested)?;
            for _ in 0..self.rng.range(1, 4) {
                let n = name(&mut self.rng, 3);
                if !nested.join(&n).exists() {
                    self.package(&nested.join(&n), &n, depth + 1)?;
                }
            }
        }
        Ok(())
    }
}

/// `a/node_modules/b/c` → `b/c` (the part after the top-level node_modules).
fn dir_after_node_modules(dir: &Path) -> String {
    let s = dir.to_string_lossy();
    match s.find("/node_modules/") {
        Some(i) => s[i + "/node_modules/".len()..].to_string(),
        None => s.to_string(),
    }
}

fn git(repo: &Path, args: &[&str]) -> io::Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=kmount-bench",
            "-c",
            "user.email=bench@kmount",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the pieces live under the work directory.
#[derive(Debug, Clone)]
pub struct Data {
    /// What every contender serves or mounts: holds `repo/`, `big.bin`, `scratch/`.
    pub root: PathBuf,
    pub stats: TreeStats,
    /// Entries (files, dirs, symlinks, excluding the root) a walk of `repo/` must see.
    pub repo_entries: u64,
    /// A copy of `repo/.git/index` as generated, restored before each cold `git status`.
    pub pristine_index: PathBuf,
    pub big_file: PathBuf,
    pub big_size: u64,
    pub big_digest: u64,
    pub untar_archive: PathBuf,
    /// (path relative to the extraction dir, size) of every regular file in the archive.
    pub untar_files: Vec<(PathBuf, u64)>,
}

/// Builds (or reuses, when complete) the data under `work`.
pub fn prepare(work: &Path, files: u64, big_mib: u64, untar_files: u64) -> io::Result<Data> {
    let root = work.join(format!("tree-v{VERSION}-{files}"));
    let repo = root.join("repo");
    let marker = root.join("complete");
    let stats = if marker.exists() {
        parse_stats(&fs::read_to_string(&marker)?)
    } else {
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        eprintln!(
            "kmount-bench: generating a {files}-file tree in {}",
            root.display()
        );
        let stats = generate_repo(&repo, files)?;
        fs::write(&marker, format_stats(&stats))?;
        stats
    };
    fs::create_dir_all(root.join("scratch"))?;
    let pristine_index = root.join("pristine-index");
    if !pristine_index.exists() {
        fs::copy(repo.join(".git/index"), &pristine_index)?;
    }
    let repo_entries = count_entries(&repo)?;

    let big_file = root.join("big.bin");
    let big_size = big_mib << 20;
    let big_digest = ensure_big_file(&big_file, big_size)?;

    let untar_archive = work.join(format!("untar-v{VERSION}-{untar_files}.tar"));
    let untar_list = make_untar_archive(work, &untar_archive, untar_files)?;
    Ok(Data {
        root,
        stats,
        repo_entries,
        pristine_index,
        big_file,
        big_size,
        big_digest,
        untar_archive,
        untar_files: untar_list,
    })
}

fn format_stats(s: &TreeStats) -> String {
    format!(
        "files {}\ndirs {}\nsymlinks {}\nbytes {}\n",
        s.files, s.dirs, s.symlinks, s.bytes
    )
}

fn parse_stats(text: &str) -> TreeStats {
    let mut s = TreeStats::default();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (Some(k), Some(v)) = (w.next(), w.next().and_then(|v| v.parse().ok())) else {
            continue;
        };
        match k {
            "files" => s.files = v,
            "dirs" => s.dirs = v,
            "symlinks" => s.symlinks = v,
            "bytes" => s.bytes = v,
            _ => {}
        }
    }
    s
}

fn generate_repo(repo: &Path, files: u64) -> io::Result<TreeStats> {
    let mut b = Builder {
        rng: Rng::new(0x6b6d_6f75_6e74 ^ files),
        stats: TreeStats::default(),
        target_files: files,
        bins: Vec::new(),
    };
    b.dir(repo)?;
    b.file(
        &repo.join("package.json"),
        b"{\n  \"name\": \"bench-app\",\n  \"version\": \"1.0.0\",\n  \"private\": true\n}\n",
    )?;
    b.file(&repo.join(".gitignore"), b"*.log\n")?;
    let src = repo.join("src");
    b.dir(&src)?;
    for _ in 0..40 {
        let n = name(&mut b.rng, 3);
        let size = b.rng.range(200, 6_000) as usize;
        let text = js_text(&mut b.rng, size);
        b.file(&src.join(format!("{n}.js")), &text)?;
    }
    let nm = repo.join("node_modules");
    b.dir(&nm)?;
    while !b.done() {
        let pkg = name(&mut b.rng, 3);
        if b.rng.chance(12) {
            let scope = nm.join(format!("@{}", name(&mut b.rng, 2)));
            if !scope.exists() {
                b.dir(&scope)?;
            }
            let dir = scope.join(&pkg);
            if !dir.exists() {
                let full = format!(
                    "@{}/{pkg}",
                    scope
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .trim_start_matches('@')
                );
                b.package(&dir, &full, 0)?;
            }
        } else if !nm.join(&pkg).exists() {
            b.package(&nm.join(&pkg), &pkg, 0)?;
        }
    }
    let bin = nm.join(".bin");
    b.dir(&bin)?;
    for (link, target) in std::mem::take(&mut b.bins) {
        let path = bin.join(&link);
        if !path.exists() && std::os::unix::fs::symlink(&target, &path).is_ok() {
            b.stats.symlinks += 1;
        }
    }
    eprintln!(
        "kmount-bench: {} files, {} directories, {} symlinks, {} MiB; committing",
        b.stats.files,
        b.stats.dirs,
        b.stats.symlinks,
        b.stats.bytes >> 20
    );
    git(repo, &["init", "-q"])?;
    git(repo, &["add", "-A"])?;
    git(repo, &["commit", "-q", "-m", "bench tree"])?;
    git(repo, &["gc", "-q", "--prune=now"])?;
    // Entries written in the same second as the index are "racily clean" and make every
    // later `git status` re-read them; a refresh a few seconds later records them as clean.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    git(repo, &["update-index", "--really-refresh", "-q"])?;
    let status = git(repo, &["status", "--porcelain"])?;
    if !status.trim().is_empty() {
        return Err(io::Error::other(format!(
            "the generated repository is not clean: {status}"
        )));
    }
    Ok(b.stats)
}

/// Entries below `dir` (not following symlinks), as a walk must find them.
pub fn count_entries(dir: &Path) -> io::Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        n += 1;
        if e.file_type()?.is_dir() {
            n += count_entries(&e.path())?;
        }
    }
    Ok(n)
}

/// The digest [`crate::workload::read_file`] computes.
pub fn digest(bytes: &[u8], state: u64) -> u64 {
    // FNV-1a over 8-byte words: cheap, order-sensitive, enough to catch wrong data.
    let mut h = state;
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub const DIGEST_INIT: u64 = 0xcbf2_9ce4_8422_2325;

fn ensure_big_file(path: &Path, size: u64) -> io::Result<u64> {
    let mut rng = Rng::new(0xb16 ^ size);
    let mut state = DIGEST_INIT;
    let exists = fs::metadata(path).is_ok_and(|m| m.len() == size);
    let mut out = if exists {
        None
    } else {
        eprintln!(
            "kmount-bench: writing {} ({} MiB)",
            path.display(),
            size >> 20
        );
        Some(io::BufWriter::with_capacity(
            1 << 20,
            fs::File::create(path)?,
        ))
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        state = digest(&buf[..n], state);
        if let Some(out) = out.as_mut() {
            out.write_all(&buf[..n])?;
        }
        left -= n as u64;
    }
    if let Some(out) = out {
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    Ok(state)
}

/// An archive of `count` small files in a few hundred directories, like an unpacked package.
fn make_untar_archive(work: &Path, archive: &Path, count: u64) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut rng = Rng::new(0x7a7 ^ count);
    let mut list = Vec::new();
    let mut dirs = vec![PathBuf::from("pkg")];
    for i in 0..count {
        if i % 20 == 0 {
            let parent = dirs[rng.range(0, dirs.len() as u64) as usize].clone();
            let d = if parent.components().count() < 5 {
                parent.join(format!("{}{i}", name(&mut rng, 2)))
            } else {
                PathBuf::from("pkg").join(format!("{}{i}", name(&mut rng, 2)))
            };
            dirs.push(d);
        }
        let dir = dirs.last().cloned().unwrap_or_else(|| PathBuf::from("pkg"));
        let size = rng.range(100, 4_000);
        list.push((dir.join(format!("{}{i}.js", name(&mut rng, 3))), size));
    }
    if archive.exists() {
        return Ok(list);
    }
    let src = work.join("untar-src");
    if src.exists() {
        fs::remove_dir_all(&src)?;
    }
    let mut text_rng = Rng::new(0x7e7 ^ count);
    for (path, size) in &list {
        let p = src.join(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, js_text(&mut text_rng, *size as usize))?;
    }
    let tmp = archive.with_extension("tmp");
    let out = Command::new("tar")
        .arg("-cf")
        .arg(&tmp)
        .arg("-C")
        .arg(&src)
        .arg("pkg")
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "tar -cf failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    fs::rename(&tmp, archive)?;
    fs::remove_dir_all(&src)?;
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sa = generate_repo(&a.path().join("r"), 300).unwrap();
        let sb = generate_repo(&b.path().join("r"), 300).unwrap();
        assert_eq!(sa, sb);
        assert!(sa.files >= 300 && sa.dirs > 10, "{sa:?}");
        let ha = git(&a.path().join("r"), &["rev-parse", "HEAD^{tree}"]).unwrap();
        let hb = git(&b.path().join("r"), &["rev-parse", "HEAD^{tree}"]).unwrap();
        assert_eq!(ha, hb);
        let big = a.path().join("big");
        let d1 = ensure_big_file(&big, 3 << 20).unwrap();
        assert_eq!(fs::metadata(&big).unwrap().len(), 3 << 20);
        assert_eq!(digest(&fs::read(&big).unwrap(), DIGEST_INIT), d1);
        assert_eq!(ensure_big_file(&big, 3 << 20).unwrap(), d1);
    }
}
