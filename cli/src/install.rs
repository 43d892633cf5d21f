//! Running `kmount-agent` on a remote machine, installing it there first when needed.
//!
//! Transport-agnostic: everything goes through a [`RemoteShell`], which only has to run a POSIX
//! `sh` script on the remote with the script's stdin and stdout as a byte stream (ssh, `kubectl
//! exec`, ...). The stream never has to signal end-of-input: the binary is sent with its
//! length and received with `head -c N`.
//!
//! One connection, in the common case: the *launch* script looks for the agent in the cache
//! directory named by the binary's content hash and `exec`s it. Only when it is not there does
//! the script describe the remote instead (architecture, uid, writable temp directories, tools)
//! and a second connection runs the *install* script: receive exactly N bytes into a temporary
//! file, check its size, its SHA-256 (or POSIX `cksum`, when that is all the remote has) and
//! that it runs and speaks our protocol, move it into place atomically, then `exec` it. So a
//! truncated or wrong copy is never run, and never left where the launch script looks.
//!
//! The cache is `<tmp>/kmount-<uid>/agent-<key>/kmount-agent` for the first of `$TMPDIR`,
//! `/tmp`, `/dev/shm`, `/var/tmp`, `~/.cache` where the user can own a private (0700)
//! directory and execute files. `<key>` is a hash of the binary, so a different build gets a
//! different directory and never runs a stale copy.
//!
//! Each script's stdout carries kmount's marker lines and then, after `kmount-exec PATH` or
//! `kmount-installed PATH`, the agent's own stream. Lines a login script prints before that are
//! skipped.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use kmount_mount::{BoxedStream, StderrTail};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// A stream to a command started on the remote (the same type a `Connector` returns).
pub type ExecFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send + 'a>>;

/// A way to run a POSIX `sh` script on the remote.
pub trait RemoteShell: Send + Sync {
    /// Starts `/bin/sh -c SCRIPT` on the remote. The stream's writer is the script's stdin, its
    /// reader the script's stdout; `stderr` and `child` carry the remote's error output and the
    /// local process (if any) for error messages.
    fn exec<'a>(&'a self, script: &'a str) -> ExecFuture<'a>;
    /// Names the remote in messages, e.g. "alice@build-host (ssh)".
    fn describe(&self) -> String;
    /// Explains why a command produced no output when the transport itself failed
    /// (authentication, host key, unreachable host), from the local process's exit status
    /// and the error output. `None` when the cause is not the transport's.
    fn transport_error(&self, status: Option<ExitStatus>, stderr: &str) -> Option<String>;
}

/// Lines (or bytes) a remote login script may print before kmount's first marker.
const MAX_JUNK_LINES: usize = 200;
const MAX_MARKER_BYTES: usize = 64 << 10;
/// How long the remote may take to answer the launch or probe script.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Upload chunk.
const CHUNK: usize = 256 << 10;

/// Architectures kmount can tell apart, by ELF machine number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
    X86,
    Arm,
    Riscv64,
    Ppc64,
    S390x,
    /// Another ELF machine number.
    Other(u16),
}

impl Arch {
    fn from_elf_machine(machine: u16) -> Arch {
        match machine {
            62 => Arch::X86_64,
            183 => Arch::Aarch64,
            3 => Arch::X86,
            40 => Arch::Arm,
            243 => Arch::Riscv64,
            21 => Arch::Ppc64,
            22 => Arch::S390x,
            m => Arch::Other(m),
        }
    }

    /// From `uname -m`.
    pub fn from_uname(machine: &str) -> Option<Arch> {
        let m = machine.trim();
        Some(match m {
            "x86_64" | "amd64" | "x64" => Arch::X86_64,
            "aarch64" | "arm64" | "aarch64_be" | "armv8l" | "armv8b" => Arch::Aarch64,
            "i386" | "i486" | "i586" | "i686" | "x86" => Arch::X86,
            "riscv64" => Arch::Riscv64,
            "ppc64" | "ppc64le" => Arch::Ppc64,
            "s390x" => Arch::S390x,
            _ if m.starts_with("armv") || m == "arm" => Arch::Arm,
            _ => return None,
        })
    }

    /// The Rust target to build an agent for this architecture with.
    fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => "aarch64-unknown-linux-gnu",
            Arch::X86 => "i686-unknown-linux-gnu",
            Arch::Arm => "armv7-unknown-linux-gnueabihf",
            Arch::Riscv64 => "riscv64gc-unknown-linux-gnu",
            Arch::Ppc64 => "powerpc64le-unknown-linux-gnu",
            Arch::S390x => "s390x-unknown-linux-gnu",
            Arch::Other(_) => "<target>",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::X86_64 => f.write_str("x86_64"),
            Arch::Aarch64 => f.write_str("aarch64"),
            Arch::X86 => f.write_str("x86 (32-bit)"),
            Arch::Arm => f.write_str("arm (32-bit)"),
            Arch::Riscv64 => f.write_str("riscv64"),
            Arch::Ppc64 => f.write_str("ppc64"),
            Arch::S390x => f.write_str("s390x"),
            Arch::Other(m) => write!(f, "ELF machine {m}"),
        }
    }
}

/// What the ELF header of a binary says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub arch: Arch,
    /// The dynamic loader it asks for (PT_INTERP), `None` for a static binary.
    pub interpreter: Option<String>,
}

/// Reads the architecture and the PT_INTERP entry of an ELF executable.
pub fn elf_info(bytes: &[u8]) -> Result<ElfInfo, String> {
    if bytes.len() < 52 || &bytes[..4] != b"\x7fELF" {
        return Err("it is not an ELF executable".into());
    }
    let is64 = match bytes[4] {
        1 => false,
        2 => true,
        c => return Err(format!("unknown ELF class {c}")),
    };
    let le = match bytes[5] {
        1 => true,
        2 => false,
        d => return Err(format!("unknown ELF data encoding {d}")),
    };
    let u16_at = |o: usize| -> Option<u16> {
        let b: [u8; 2] = bytes.get(o..o + 2)?.try_into().ok()?;
        Some(if le {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b: [u8; 4] = bytes.get(o..o + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let u64_at = |o: usize| -> Option<u64> {
        let b: [u8; 8] = bytes.get(o..o + 8)?.try_into().ok()?;
        Some(if le {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    };
    let truncated = || "its ELF header is truncated".to_string();
    let machine = u16_at(18).ok_or_else(truncated)?;
    let (phoff, phentsize, phnum) = if is64 {
        (
            u64_at(32).ok_or_else(truncated)?,
            u16_at(54).ok_or_else(truncated)?,
            u16_at(56).ok_or_else(truncated)?,
        )
    } else {
        (
            u64::from(u32_at(28).ok_or_else(truncated)?),
            u16_at(42).ok_or_else(truncated)?,
            u16_at(44).ok_or_else(truncated)?,
        )
    };
    const PT_INTERP: u32 = 3;
    let mut interpreter = None;
    for i in 0..u64::from(phnum) {
        let ph = usize::try_from(phoff + i * u64::from(phentsize)).map_err(|_| truncated())?;
        let p_type = u32_at(ph).ok_or_else(truncated)?;
        if p_type != PT_INTERP {
            continue;
        }
        let (off, size) = if is64 {
            (
                u64_at(ph + 8).ok_or_else(truncated)?,
                u64_at(ph + 32).ok_or_else(truncated)?,
            )
        } else {
            (
                u64::from(u32_at(ph + 4).ok_or_else(truncated)?),
                u64::from(u32_at(ph + 16).ok_or_else(truncated)?),
            )
        };
        let name = usize::try_from(off)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, s)| bytes.get(o..o.checked_add(s)?))
            .map(|b| {
                String::from_utf8_lossy(b)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap_or_else(|| "a dynamic loader".into());
        interpreter = Some(name);
    }
    Ok(ElfInfo {
        arch: Arch::from_elf_machine(machine),
        interpreter,
    })
}

/// How much of the binary the ELF checks read: the headers and the interpreter name sit at
/// its start.
const ELF_HEAD: usize = 64 << 10;

/// The local agent binary that gets shipped.
#[derive(Debug, Clone)]
pub struct LocalAgent {
    path: PathBuf,
    size: u64,
    /// Names the remote cache directory: a hash of the content.
    key: String,
    /// What the launch script checks a cached copy against before running it.
    sha256: String,
    cksum: u32,
    arch: Arch,
}

impl LocalAgent {
    /// Reads and checks `path`: an ELF executable that is statically linked. Streams the
    /// file (it is not kept in memory: most mounts never send it).
    pub fn load(path: &Path) -> Result<LocalAgent> {
        let read_err = || format!("cannot read the agent binary {}", path.display());
        let mut file = std::fs::File::open(path).with_context(read_err)?;
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        let mut sha256 = Sha256::new();
        let mut cksum = Cksum::default();
        let mut head: Vec<u8> = Vec::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf).with_context(read_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            sha256.update(&buf[..n]);
            cksum.update(&buf[..n]);
            if head.len() < ELF_HEAD {
                let take = n.min(ELF_HEAD - head.len());
                head.extend_from_slice(&buf[..take]);
            }
            size += n as u64;
        }
        let info = elf_info(&head).map_err(|e| {
            anyhow!(
                "the agent binary {} cannot be sent to a remote machine: {e}; point KMOUNT_AGENT \
                 at a kmount-agent executable",
                path.display()
            )
        })?;
        if let Some(interp) = &info.interpreter {
            bail!(
                "the agent binary {} is dynamically linked (it needs {interp}), so it would not \
                 run on machines with another C library; build a static one (`cargo build \
                 --release -p kmount-agent` links it statically when libc6-dev is installed, or \
                 build for a musl target) and install it next to kmount or set KMOUNT_AGENT",
                path.display()
            );
        }
        Ok(LocalAgent {
            path: path.to_path_buf(),
            size,
            key: format!("{:032x}", hasher.digest128()),
            sha256: format!("{:x}", sha256.finalize()),
            cksum: cksum.finish(),
            arch: info.arch,
        })
    }

    /// The bytes to send, checked against the key they were loaded with (the file may have
    /// been replaced since: then the mount must be restarted to use the new one).
    fn bytes(&self) -> Result<Vec<u8>> {
        let bytes = std::fs::read(&self.path)
            .with_context(|| format!("cannot read the agent binary {}", self.path.display()))?;
        if content_key(&bytes) != self.key {
            bail!(
                "the agent binary {} changed since this mount started; restart the mount to use \
                 the new one",
                self.path.display()
            );
        }
        Ok(bytes)
    }
}

fn content_key(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// The POSIX `cksum` checksum (CRC-32, polynomial 0x04C11DB7, length appended).
#[cfg(test)]
fn posix_cksum(bytes: &[u8]) -> u32 {
    let mut c = Cksum::default();
    c.update(bytes);
    c.finish()
}

/// The POSIX `cksum` checksum (CRC-32, polynomial 0x04C11DB7, length appended) of bytes
/// that arrive in pieces.
#[derive(Debug, Default)]
struct Cksum {
    crc: u32,
    len: u64,
}

impl Cksum {
    fn update(&mut self, bytes: &[u8]) {
        let table = cksum_table();
        for &b in bytes {
            self.crc = (self.crc << 8) ^ table[((self.crc >> 24) as u8 ^ b) as usize];
        }
        self.len += bytes.len() as u64;
    }

    fn finish(self) -> u32 {
        let table = cksum_table();
        let mut crc = self.crc;
        let mut len = self.len;
        while len != 0 {
            crc = (crc << 8) ^ table[((crc >> 24) as u8 ^ len as u8) as usize];
            len >>= 8;
        }
        !crc
    }
}

fn cksum_table() -> &'static [u32; 256] {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = (i as u32) << 24;
            for _ in 0..8 {
                c = if c & 0x8000_0000 != 0 {
                    (c << 1) ^ 0x04C1_1DB7
                } else {
                    c << 1
                };
            }
            *slot = c;
        }
        t
    })
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The candidate parent directories of the cache, in order of preference (a shell word list).
const TMP_CANDIDATES: &str = r#""${TMPDIR:-}" /tmp /dev/shm /var/tmp "${HOME:+$HOME/.cache}""#;

/// Finds the cached agent and execs it, or describes the remote when it is not there.
///
/// A cached copy runs only when its content is ours: same size and, with whichever tool the
/// remote has, the same SHA-256 or POSIX `cksum` (the install script checked a new copy with
/// the same tool). Anything else there (a truncated copy, another build, a planted script) is
/// never run; the probe follows and the install replaces it.
fn launch_script(agent: &LocalAgent, command: &str) -> String {
    format!(
        r#"u=$(id -u 2>/dev/null || echo unknown)
same() {{
  if command -v sha256sum >/dev/null 2>&1; then
    h=$(sha256sum < "$1" 2>/dev/null) || return 1
    [ "${{h%% *}}" = {sha256} ]
  elif command -v cksum >/dev/null 2>&1; then
    h=$(cksum < "$1" 2>/dev/null) || return 1
    [ "$h" = "{cksum} {size}" ] || [ "$h" = "{cksum} {size} -" ]
  fi
}}
for t in {TMP_CANDIDATES}; do
  [ -n "$t" ] || continue
  b="$t/kmount-$u"
  f="$b/agent-{key}/kmount-agent"
  if [ -f "$f" ] && [ -x "$f" ] && [ ! -L "$f" ] && [ ! -L "$b" ] && [ -O "$b" ] && [ "$(($(wc -c < "$f")))" -eq {size} ] && same "$f"; then
    echo "kmount-exec $f"
    exec "$f" {command}
  fi
done
echo "kmount-probe 1"
echo "arch $(uname -m 2>/dev/null)"
echo "uid $u"
for c in head sha256sum cksum; do
  command -v "$c" >/dev/null 2>&1 && echo "tool $c"
done
for t in {TMP_CANDIDATES}; do
  [ -n "$t" ] && [ -d "$t" ] || continue
  b="$t/kmount-$u"
  mkdir -p "$b" 2>/dev/null
  if [ -d "$b" ] && [ ! -L "$b" ] && [ -O "$b" ] && chmod 700 "$b" 2>/dev/null && [ -w "$b" ]; then
    echo "dir $b"
  elif [ -e "$b" ] && [ ! -O "$b" ]; then
    echo "foreign $b"
  fi
done
echo "kmount-probe-end"
"#,
        key = agent.key,
        size = agent.size,
        sha256 = agent.sha256,
        cksum = agent.cksum,
    )
}

/// How the install script checks the received copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Sha256(String),
    Cksum {
        crc: u32,
        size: u64,
    },
    /// Only size and `--version`.
    None,
}

/// Receives exactly `size` bytes into `base/agent-KEY/`, checks them, and execs the result.
fn install_script(agent: &LocalAgent, base: &str, check: &Check, command: &str) -> String {
    let check_cmd = match check {
        Check::Sha256(hex) => format!(
            r#"h=$(sha256sum < "$t" 2>&1) || fail "sha256sum failed: $h"
h=${{h%% *}}
[ "$h" = {hex} ] || fail "the received copy is corrupt (sha256 $h)""#
        ),
        Check::Cksum { crc, size } => format!(
            r#"h=$(cksum < "$t" 2>&1) || fail "cksum failed: $h"
set -- $h
[ "$1 $2" = "{crc} {size}" ] || fail "the received copy is corrupt (cksum $h)""#
        ),
        Check::None => String::new(),
    };
    format!(
        r#"umask 077
d={dir}
f="$d/kmount-agent"
t="$d/.tmp.$$"
fail() {{ rm -f "$t"; echo "kmount-install-failed $1"; exit 0; }}
mkdir -p "$d" 2>/dev/null || fail "cannot create $d"
e=$(head -c {size} 2>&1 > "$t") || fail "cannot write $t: $e"
s=$(($(wc -c < "$t")))
[ "$s" -eq {size} ] || fail "received $s of {size} bytes"
{check_cmd}
chmod 700 "$t" || fail "cannot make $t executable"
v=$("$t" --version 2>&1)
r=$?
[ "$r" -eq 126 ] && fail "noexec: $v"
[ "$r" -eq 0 ] || fail "the received agent does not run (exit $r): $v"
case "$v" in
  *" protocol {protocol}") ;;
  *) fail "the agent speaks another protocol: $v" ;;
esac
mv -f "$t" "$f" || fail "cannot move the agent into place at $f"
echo "kmount-installed $f"
exec "$f" {command}
"#,
        dir = sh_quote(&format!("{base}/agent-{}", agent.key)),
        size = agent.size,
        protocol = kmount_proto::PROTOCOL_VERSION,
    )
}

/// What the probe found out about the remote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Probe {
    pub machine: String,
    pub uid: String,
    pub tools: Vec<String>,
    /// Private, writable cache parents, in order of preference.
    pub dirs: Vec<String>,
    /// Cache parents that exist but belong to someone else.
    pub foreign: Vec<String>,
}

impl Probe {
    fn parse(lines: &[String]) -> Probe {
        let mut p = Probe::default();
        for line in lines {
            let (word, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            match word {
                "arch" => p.machine = rest.trim().to_string(),
                "uid" => p.uid = rest.trim().to_string(),
                "tool" => p.tools.push(rest.trim().to_string()),
                "dir" if !p.dirs.iter().any(|d| d == rest) => p.dirs.push(rest.to_string()),
                "foreign" => p.foreign.push(rest.to_string()),
                _ => {}
            }
        }
        p
    }

    fn has(&self, tool: &str) -> bool {
        self.tools.iter().any(|t| t == tool)
    }
}

/// How the agent came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The cached copy was run.
    Cached,
    /// It was sent and installed first.
    Installed,
}

/// A running agent on the remote.
#[derive(Debug)]
pub struct Launched {
    /// The stream to it, ready for the hello exchange.
    pub stream: BoxedStream,
    pub outcome: Outcome,
    /// Where it lives on the remote.
    pub path: String,
}

/// Runs the agent on a remote, installing it when needed. Re-runnable: a reconnect calls
/// [`Installer::launch`] again.
#[derive(Debug)]
pub struct Installer {
    agent: LocalAgent,
}

/// The marker line that ended the script's preamble, and what the stream holds after it.
enum Answer {
    /// `kmount-exec PATH` / `kmount-installed PATH`: the agent's stream follows.
    Agent {
        path: String,
        stream: Box<BoxedStream>,
    },
    /// The probe's lines (without the markers).
    Probe(Vec<String>),
    /// `kmount-install-failed REASON`.
    InstallFailed(String),
}

impl Installer {
    pub fn new(agent: LocalAgent) -> Installer {
        Installer { agent }
    }

    /// Starts the agent on the remote with `args` (each one word; quoted here).
    pub async fn launch(&self, shell: &dyn RemoteShell, args: &[String]) -> Result<Launched> {
        let command = args
            .iter()
            .map(|a| sh_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        let script = launch_script(&self.agent, &command);
        let lines = match self.run(shell, &script, None).await? {
            Answer::Agent { path, stream } => {
                tracing::debug!("running the cached agent {path} on {}", shell.describe());
                return Ok(Launched {
                    stream: *stream,
                    outcome: Outcome::Cached,
                    path,
                });
            }
            Answer::Probe(lines) => lines,
            Answer::InstallFailed(reason) => bail!(
                "internal error: {} answered the launch script with an install failure: {reason}",
                shell.describe()
            ),
        };
        let probe = Probe::parse(&lines);
        self.check_probe(shell, &probe)?;
        let bytes = self.agent.bytes()?;
        let check = if probe.has("sha256sum") {
            Check::Sha256(self.agent.sha256.clone())
        } else if probe.has("cksum") {
            Check::Cksum {
                crc: self.agent.cksum,
                size: self.agent.size,
            }
        } else {
            Check::None
        };
        let mut failures = Vec::new();
        for base in &probe.dirs {
            tracing::info!(
                "installing kmount-agent ({} bytes) on {} in {base}",
                self.agent.size,
                shell.describe()
            );
            let script = install_script(&self.agent, base, &check, &command);
            match self.run(shell, &script, Some(&bytes)).await? {
                Answer::Agent { path, stream } => {
                    tracing::info!("installed kmount-agent on {} at {path}", shell.describe());
                    return Ok(Launched {
                        stream: *stream,
                        outcome: Outcome::Installed,
                        path,
                    });
                }
                Answer::InstallFailed(reason) => {
                    tracing::warn!("cannot install the agent in {base}: {reason}");
                    // A directory mounted noexec: try the next one. Anything else is a
                    // problem the next directory would hit too.
                    let noexec = reason.starts_with("noexec");
                    failures.push(format!("{base}: {reason}"));
                    if !noexec {
                        break;
                    }
                }
                Answer::Probe(_) => bail!(
                    "internal error: {} answered the install script with a probe",
                    shell.describe()
                ),
            }
        }
        bail!(
            "cannot install kmount-agent on {}: {}",
            shell.describe(),
            failures.join("; ")
        )
    }

    fn check_probe(&self, shell: &dyn RemoteShell, probe: &Probe) -> Result<()> {
        let remote = shell.describe();
        let ours = self.agent.arch;
        match Arch::from_uname(&probe.machine) {
            Some(theirs) if theirs == ours => {}
            Some(theirs) => bail!(
                "{remote} is {theirs} ({machine}) but this kmount carries an {ours} agent ({path}); \
                 build one for {theirs} (cargo build --release -p kmount-agent --target {target}) \
                 and set KMOUNT_AGENT to it",
                machine = probe.machine,
                path = self.agent.path.display(),
                target = theirs.rust_target(),
            ),
            None => bail!(
                "{remote} runs on '{machine}', which kmount cannot tell apart; build \
                 kmount-agent for that machine and set KMOUNT_AGENT to it",
                machine = probe.machine,
            ),
        }
        if !probe.has("head") {
            bail!(
                "{remote} has no `head` command, which kmount needs to receive its agent; \
                 install coreutils or busybox there"
            );
        }
        if probe.dirs.is_empty() {
            let mut msg = format!(
                "{remote} has no writable temporary directory for kmount's agent (tried \
                 $TMPDIR, /tmp, /dev/shm, /var/tmp and ~/.cache as uid {uid})",
                uid = probe.uid
            );
            if !probe.foreign.is_empty() {
                msg.push_str(&format!(
                    "; {} belongs to another user: remove it",
                    probe.foreign.join(", ")
                ));
            }
            msg.push_str(
                "; mount a writable volume (for a container: an emptyDir at /tmp) or set \
                 TMPDIR to a writable directory there",
            );
            bail!(msg);
        }
        Ok(())
    }

    /// Runs `script`, sends `upload` on its stdin (if any), and reads the marker that ends the
    /// script's preamble.
    async fn run(
        &self,
        shell: &dyn RemoteShell,
        script: &str,
        upload: Option<&[u8]>,
    ) -> Result<Answer> {
        let remote = shell.describe();
        let mut stream = shell
            .exec(script)
            .await
            .with_context(|| format!("cannot start a command on {remote}"))?;
        // The upload is written while the answer is read: the script may fail before reading
        // it all, and then its answer is what explains why.
        let timeout = match upload {
            // Generous for slow links: 60 s plus 256 KiB/s.
            Some(b) => ANSWER_TIMEOUT + Duration::from_secs(b.len() as u64 / (256 << 10)),
            None => ANSWER_TIMEOUT,
        };
        let BoxedStream { reader, writer, .. } = &mut stream;
        let upload_fut = async {
            if let Some(bytes) = upload {
                for chunk in bytes.chunks(CHUNK) {
                    if writer.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                let _ = writer.flush().await;
            }
        };
        let read = async {
            let (_, answer) = tokio::join!(upload_fut, read_preamble(reader.as_mut()));
            answer
        };
        let preamble = match tokio::time::timeout(timeout, read).await {
            Ok(p) => p,
            Err(_) => {
                let stderr = stderr_text(stream.stderr.clone(), Duration::ZERO).await;
                bail!(
                    "{remote} did not answer within {} s{}",
                    timeout.as_secs(),
                    note(&stderr)
                );
            }
        };
        let Preamble {
            marker,
            lines,
            leftover,
            junk,
        } = match preamble {
            Ok(p) => p,
            Err(e) => return Err(self.explain_failure(shell, &mut stream, e).await),
        };
        let (word, rest) = marker.split_once(' ').unwrap_or((marker.as_str(), ""));
        match word {
            "kmount-exec" | "kmount-installed" => {
                if !junk.is_empty() {
                    tracing::debug!("{remote} printed before kmount started: {junk:?}");
                }
                let reader = std::mem::replace(&mut stream.reader, Box::new(tokio::io::empty()));
                stream.reader = Box::new(std::io::Cursor::new(leftover).chain(reader));
                Ok(Answer::Agent {
                    path: rest.to_string(),
                    stream: Box::new(stream),
                })
            }
            "kmount-install-failed" => Ok(Answer::InstallFailed(rest.to_string())),
            _ => Ok(Answer::Probe(lines)),
        }
    }

    /// The stream ended (or broke) before kmount's marker: say why, as precisely as possible.
    async fn explain_failure(
        &self,
        shell: &dyn RemoteShell,
        stream: &mut BoxedStream,
        e: PreambleError,
    ) -> anyhow::Error {
        let remote = shell.describe();
        let stderr = stderr_text(stream.stderr.clone(), Duration::from_secs(2)).await;
        let mut status = None;
        if let Some(child) = stream.child.as_mut()
            && let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), child.wait()).await
        {
            status = Some(s);
        }
        if let Some(msg) = shell.transport_error(status, &stderr) {
            return anyhow!(msg);
        }
        let exit = status.map(|s| format!(" ({s})")).unwrap_or_default();
        match e {
            PreambleError::Ended { junk } if junk.is_empty() => anyhow!(
                "the command kmount ran on {remote} ended without output{exit}{}; check that \
                 {remote} has a POSIX shell at /bin/sh",
                note(&stderr)
            ),
            PreambleError::Ended { junk } | PreambleError::TooMuch { junk } => anyhow!(
                "the command kmount ran on {remote} printed something unexpected{exit}: {:?}{}",
                junk.chars().take(500).collect::<String>(),
                note(&stderr)
            ),
            PreambleError::Io(err) => anyhow!(
                "the stream from {remote} failed: {err}{exit}{}",
                note(&stderr)
            ),
        }
    }
}

fn note(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; its error output: {stderr}")
    }
}

async fn stderr_text(stderr: Option<StderrTail>, wait: Duration) -> String {
    match stderr {
        Some(tail) => tail.text(wait).await,
        None => String::new(),
    }
}

struct Preamble {
    /// The line that ended the preamble.
    marker: String,
    /// Lines between `kmount-probe` and `kmount-probe-end`.
    lines: Vec<String>,
    /// Bytes read past the marker line (the start of the agent's stream).
    leftover: Vec<u8>,
    /// What came before kmount's first marker (a chatty login script).
    junk: String,
}

enum PreambleError {
    Ended { junk: String },
    TooMuch { junk: String },
    Io(io::Error),
}

/// Reads lines until `kmount-exec`, `kmount-installed`, `kmount-install-failed` or the end of
/// a probe. Never reads a byte past the marker line into `leftover`'s owner: whatever arrived
/// after it is returned in `leftover`.
async fn read_preamble(
    reader: &mut (dyn AsyncRead + Send + Unpin),
) -> Result<Preamble, PreambleError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut lines = Vec::new();
    let mut junk = String::new();
    let mut junk_lines = 0;
    let mut in_probe = false;
    let mut chunk = vec![0u8; 8192];
    let mut consumed = 0;
    loop {
        while let Some(nl) = buf[consumed..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[consumed..consumed + nl])
                .trim_end_matches('\r')
                .to_string();
            consumed += nl + 1;
            let word = line.split(' ').next().unwrap_or("");
            match word {
                "kmount-exec" | "kmount-installed" | "kmount-install-failed" => {
                    return Ok(Preamble {
                        marker: line,
                        lines,
                        leftover: buf[consumed..].to_vec(),
                        junk,
                    });
                }
                "kmount-probe" => in_probe = true,
                "kmount-probe-end" if in_probe => {
                    return Ok(Preamble {
                        marker: line,
                        lines,
                        leftover: buf[consumed..].to_vec(),
                        junk,
                    });
                }
                _ if in_probe => lines.push(line),
                _ => {
                    junk_lines += 1;
                    junk.push_str(&line);
                    junk.push('\n');
                    if junk_lines > MAX_JUNK_LINES {
                        return Err(PreambleError::TooMuch { junk });
                    }
                }
            }
        }
        if buf.len() - consumed > MAX_MARKER_BYTES {
            junk.push_str(&String::from_utf8_lossy(&buf[consumed..]));
            return Err(PreambleError::TooMuch { junk });
        }
        let n = match reader.read(&mut chunk).await {
            Ok(0) => {
                junk.push_str(&String::from_utf8_lossy(&buf[consumed..]));
                return Err(PreambleError::Ended { junk });
            }
            Ok(n) => n,
            Err(e) => return Err(PreambleError::Io(e)),
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use tokio::process::Command;

    #[test]
    fn cksum_matches_posix_cksum() {
        // Reference values from GNU coreutils `cksum`.
        assert_eq!(posix_cksum(b""), 4294967295);
        assert_eq!(posix_cksum(b"hello\n"), 3015617425);
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let out = std::process::Command::new("cksum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("piped").write_all(&big)?;
                c.wait_with_output()
            });
        if let Ok(out) = out {
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                text.split_whitespace().next(),
                Some(posix_cksum(&big).to_string().as_str())
            );
        }
    }

    #[test]
    fn streamed_key_matches_the_content() {
        let agent = LocalAgent::load(&built_agent()).unwrap();
        let bytes = std::fs::read(built_agent()).unwrap();
        assert_eq!(agent.key, content_key(&bytes));
        assert_eq!(agent.size, bytes.len() as u64);
        assert_eq!(agent.bytes().unwrap(), bytes);
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/srv/app"), "/srv/app");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn uname_names() {
        assert_eq!(Arch::from_uname("x86_64\n"), Some(Arch::X86_64));
        assert_eq!(Arch::from_uname("arm64"), Some(Arch::Aarch64));
        assert_eq!(Arch::from_uname("aarch64"), Some(Arch::Aarch64));
        assert_eq!(Arch::from_uname("armv7l"), Some(Arch::Arm));
        assert_eq!(Arch::from_uname("mips"), None);
    }

    #[test]
    fn elf_of_this_test_binary() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let info = elf_info(&me).unwrap();
        #[cfg(target_arch = "x86_64")]
        assert_eq!(info.arch, Arch::X86_64);
        #[cfg(target_arch = "aarch64")]
        assert_eq!(info.arch, Arch::Aarch64);
        // Test binaries are linked dynamically.
        assert!(info.interpreter.is_some(), "{info:?}");
        assert!(elf_info(b"#!/bin/sh\necho hi\n").is_err());
        assert!(elf_info(&me[..40]).is_err());
    }

    #[test]
    fn probe_lines() {
        let lines: Vec<String> = [
            "arch aarch64",
            "uid 1000",
            "tool head",
            "tool cksum",
            "dir /tmp/kmount-1000",
            "dir /tmp/kmount-1000",
            "dir /var/tmp/kmount-1000",
            "foreign /dev/shm/kmount-1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = Probe::parse(&lines);
        assert_eq!(p.machine, "aarch64");
        assert_eq!(p.uid, "1000");
        assert!(p.has("head") && p.has("cksum") && !p.has("sha256sum"));
        assert_eq!(p.dirs, vec!["/tmp/kmount-1000", "/var/tmp/kmount-1000"]);
        assert_eq!(p.foreign, vec!["/dev/shm/kmount-1000"]);
    }

    #[tokio::test]
    async fn preamble_keeps_what_follows_the_marker() {
        let data = b"Welcome!\nkmount-exec /tmp/x/kmount-agent\n\x10\x00\x00\x00rest".to_vec();
        let mut r: &[u8] = &data;
        let p = read_preamble(&mut r).await.ok().unwrap();
        assert_eq!(p.marker, "kmount-exec /tmp/x/kmount-agent");
        assert_eq!(p.junk, "Welcome!\n");
        assert_eq!(p.leftover, b"\x10\x00\x00\x00rest");
        let mut r: &[u8] = b"kmount-probe 1\narch x86_64\nkmount-probe-end\n";
        let p = read_preamble(&mut r).await.ok().unwrap();
        assert_eq!(p.lines, vec!["arch x86_64"]);
        let mut r: &[u8] = b"oops";
        assert!(matches!(
            read_preamble(&mut r).await,
            Err(PreambleError::Ended { junk }) if junk == "oops"
        ));
    }

    /// Runs the scripts with the local `/bin/sh`, as a remote would.
    struct LocalShell {
        tmpdir: PathBuf,
        path: String,
    }

    impl RemoteShell for LocalShell {
        fn exec<'a>(&'a self, script: &'a str) -> ExecFuture<'a> {
            Box::pin(async move {
                let mut child = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(script)
                    .env("TMPDIR", &self.tmpdir)
                    .env("PATH", &self.path)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()?;
                let stdin = child.stdin.take().expect("piped");
                let stdout = child.stdout.take().expect("piped");
                let stderr = child.stderr.take().expect("piped");
                Ok(BoxedStream {
                    reader: Box::new(stdout),
                    writer: Box::new(stdin),
                    child: Some(child),
                    stderr: Some(kmount_mount::StderrTail::spawn(stderr)),
                })
            })
        }
        fn describe(&self) -> String {
            "the local shell".into()
        }
        fn transport_error(&self, _: Option<ExitStatus>, _: &str) -> Option<String> {
            None
        }
    }

    /// The real agent (a static ELF executable is needed; a script would not do).
    fn built_agent() -> PathBuf {
        let p = match std::env::var_os("KMOUNT_AGENT") {
            Some(p) => PathBuf::from(p),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/kmount-agent"),
        };
        assert!(
            p.is_file(),
            "{} is missing: build it first (cargo build -p kmount-agent) or set KMOUNT_AGENT",
            p.display()
        );
        p
    }

    async fn version_through(stream: BoxedStream) -> String {
        let BoxedStream {
            mut reader,
            writer,
            mut child,
            ..
        } = stream;
        drop(writer);
        let mut out = String::new();
        reader.read_to_string(&mut out).await.unwrap();
        if let Some(c) = child.as_mut() {
            c.wait().await.unwrap();
        }
        out
    }

    #[tokio::test]
    async fn installs_once_then_reuses_and_refuses_broken_dirs() {
        let agent_path = built_agent();
        let agent = LocalAgent::load(&agent_path).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        let shell = LocalShell {
            tmpdir: tmp.path().to_path_buf(),
            path: path.clone(),
        };
        let installer = Installer::new(agent.clone());
        let args = vec!["--version".to_string()];
        let launched = installer.launch(&shell, &args).await.unwrap();
        assert_eq!(launched.outcome, Outcome::Installed);
        let out = version_through(launched.stream).await;
        assert!(out.starts_with("kmount-agent "), "{out}");
        let uid = nix::unistd::geteuid();
        let installed = tmp
            .path()
            .join(format!("kmount-{uid}/agent-{}/kmount-agent", agent.key));
        assert_eq!(std::fs::metadata(&installed).unwrap().len(), agent.size);

        let launched = installer.launch(&shell, &args).await.unwrap();
        assert_eq!(launched.outcome, Outcome::Cached);
        assert_eq!(Path::new(&launched.path), installed);
        let out = version_through(launched.stream).await;
        assert!(out.starts_with("kmount-agent "), "{out}");

        // A truncated copy in the cache is never run: it is replaced.
        std::fs::write(&installed, b"\x7fELF truncated").unwrap();
        let launched = installer.launch(&shell, &args).await.unwrap();
        assert_eq!(launched.outcome, Outcome::Installed);
        let out = version_through(launched.stream).await;
        assert!(out.starts_with("kmount-agent "), "{out}");
    }

    /// A directory for `PATH` with only the tools the scripts use, less `leave_out`.
    fn tools_without(dir: &Path, leave_out: &str) -> String {
        std::fs::create_dir_all(dir).unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        for tool in [
            "id",
            "uname",
            "wc",
            "head",
            "sha256sum",
            "cksum",
            "mkdir",
            "chmod",
            "mv",
            "rm",
            "touch",
            "cat",
        ] {
            if tool == leave_out {
                continue;
            }
            if let Some(found) = std::env::split_paths(&path)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
            {
                std::os::unix::fs::symlink(found, dir.join(tool)).unwrap();
            }
        }
        dir.display().to_string()
    }

    /// Whatever sits in the cache under our key with our size but other contents (another
    /// build, a corrupted or planted copy: here a script that would say hello with another
    /// protocol version) is never run: it is replaced by our agent, which then runs. With
    /// `sha256sum` on the remote, and with only `cksum`.
    #[tokio::test]
    async fn a_cached_copy_with_other_contents_is_never_run() {
        let agent_path = built_agent();
        let agent = LocalAgent::load(&agent_path).unwrap();
        let ours = std::fs::read(&agent_path).unwrap();
        for leave_out in ["", "sha256sum"] {
            let tmp = tempfile::tempdir().unwrap();
            let shell = LocalShell {
                tmpdir: tmp.path().to_path_buf(),
                path: tools_without(&tmp.path().join("bin"), leave_out),
            };
            let installer = Installer::new(agent.clone());
            let args = vec!["--version".to_string()];
            let launched = installer.launch(&shell, &args).await.unwrap();
            assert_eq!(launched.outcome, Outcome::Installed, "{leave_out}");
            version_through(launched.stream).await;
            let installed = PathBuf::from(&launched.path);

            let marker = tmp.path().join("the impostor ran");
            let mut impostor = format!(
                "#!/bin/sh\ntouch '{}'\nprintf '\\023\\000\\000\\000\\000KMNT\\011\\000\\010impostor'\nexit 0\n",
                marker.display()
            )
            .into_bytes();
            impostor.resize(ours.len(), b'#');
            std::fs::write(&installed, &impostor).unwrap();
            assert_eq!(std::fs::metadata(&installed).unwrap().len(), agent.size);

            let launched = installer.launch(&shell, &args).await.unwrap();
            let out = version_through(launched.stream).await;
            assert!(
                !marker.exists(),
                "{leave_out}: the impostor was run: {out:?}"
            );
            assert_eq!(launched.outcome, Outcome::Installed, "{leave_out}");
            assert!(out.starts_with("kmount-agent "), "{leave_out}: {out}");
            assert!(
                std::fs::read(&installed).unwrap() == ours,
                "{leave_out}: not replaced"
            );
            // And the good copy is used from then on.
            let launched = installer.launch(&shell, &args).await.unwrap();
            assert_eq!(launched.outcome, Outcome::Cached, "{leave_out}");
            version_through(launched.stream).await;
        }
    }

    #[test]
    fn streamed_cksum_matches_the_whole() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let mut c = Cksum::default();
        for piece in bytes.chunks(777) {
            c.update(piece);
        }
        assert_eq!(c.finish(), posix_cksum(&bytes));
        let agent = LocalAgent::load(&built_agent()).unwrap();
        let whole = std::fs::read(built_agent()).unwrap();
        assert_eq!(agent.cksum, posix_cksum(&whole));
        assert_eq!(agent.sha256, format!("{:x}", Sha256::digest(&whole)));
    }

    #[tokio::test]
    async fn wrong_copy_is_refused() {
        let agent_path = built_agent();
        let agent = LocalAgent::load(&agent_path).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let shell = LocalShell {
            tmpdir: tmp.path().to_path_buf(),
            path: std::env::var("PATH").unwrap_or_default(),
        };
        let installer = Installer::new(agent.clone());
        // The remote receives a different binary than the one it was told about.
        let uid = nix::unistd::geteuid();
        let base = tmp.path().join(format!("kmount-{uid}"));
        std::fs::create_dir_all(&base).unwrap();
        let bogus = Check::Sha256("0".repeat(64));
        let script = install_script(&agent, base.to_str().unwrap(), &bogus, "--version");
        let bytes = agent.bytes().unwrap();
        match installer.run(&shell, &script, Some(&bytes)).await.unwrap() {
            Answer::InstallFailed(reason) => assert!(reason.contains("corrupt"), "{reason}"),
            _ => panic!("a copy with the wrong hash was accepted"),
        }
        let bogus = Check::Cksum {
            crc: 1,
            size: agent.size,
        };
        let script = install_script(&agent, base.to_str().unwrap(), &bogus, "--version");
        match installer.run(&shell, &script, Some(&bytes)).await.unwrap() {
            Answer::InstallFailed(reason) => assert!(reason.contains("corrupt"), "{reason}"),
            _ => panic!("a copy with the wrong checksum was accepted"),
        }
        // Fewer bytes than announced: the copy is refused, nothing is left in place.
        let script = install_script(&agent, base.to_str().unwrap(), &Check::None, "--version");
        let short = &bytes[..bytes.len() / 2];
        let mut stream = shell.exec(&script).await.unwrap();
        stream.writer.write_all(short).await.unwrap();
        drop(stream.writer);
        let mut out = String::new();
        stream.reader.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("kmount-install-failed received"), "{out}");
        assert!(
            !base
                .join(format!("agent-{}/kmount-agent", agent.key))
                .exists()
        );
    }

    #[tokio::test]
    async fn no_writable_dir_is_explained() {
        let agent_path = built_agent();
        let installer = Installer::new(LocalAgent::load(&agent_path).unwrap());
        let probe = Probe {
            machine: std::env::consts::ARCH.into(),
            uid: "1000".into(),
            tools: vec!["head".into()],
            dirs: vec![],
            foreign: vec!["/tmp/kmount-1000".into()],
        };
        let shell = LocalShell {
            tmpdir: "/nonexistent".into(),
            path: String::new(),
        };
        let e = installer
            .check_probe(&shell, &probe)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no writable temporary directory"), "{e}");
        assert!(
            e.contains("/tmp/kmount-1000 belongs to another user"),
            "{e}"
        );
        let probe = Probe {
            machine: if cfg!(target_arch = "aarch64") {
                "x86_64"
            } else {
                "aarch64"
            }
            .into(),
            ..probe
        };
        let e = installer
            .check_probe(&shell, &probe)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cargo build --release -p kmount-agent --target"),
            "{e}"
        );
        assert!(e.contains("KMOUNT_AGENT"), "{e}");
    }
}
