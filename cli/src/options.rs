//! What the mount flags ask for, in one value: parsed once by `main`, passed to the daemon
//! again as arguments ([`MountFlags::to_args`]) and to [`crate::run::run`].

use std::ffi::OsString;
use std::time::Duration;

use kmount_mount::rules::{Rules, RulesConfig};

/// The options of one mount beyond its target and mountpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountFlags {
    /// `--reconcile-interval`; `None`: the library default.
    pub reconcile_interval: Option<Duration>,
    /// `--write-back` (or `KMOUNT_WRITE_BACK=1`).
    pub write_back: bool,
    /// `--write-through` (or `KMOUNT_WRITE_BACK=0`): not local-first even for a container.
    pub write_through: bool,
    /// `--exclude`, `--local-only`, `--no-default-ignores` (`.kmountignore` is read by the
    /// mount from the target's root).
    pub rules: RulesConfig,
    /// `--on-change`.
    pub on_change: Option<String>,
    /// `--bwlimit`, bytes per second in each direction.
    pub bwlimit: Option<u64>,
    /// `--remote-timeout`; `None`: the library default.
    pub remote_timeout: Option<Duration>,
}

impl MountFlags {
    /// The same flags as command-line arguments, for the background daemon.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(every) = self.reconcile_interval {
            args.push(format!("--reconcile-interval={}ms", every.as_millis()).into());
        }
        if self.write_back {
            args.push("--write-back".into());
        }
        if self.write_through {
            args.push("--write-through".into());
        }
        for p in &self.rules.exclude {
            args.push(format!("--exclude={p}").into());
        }
        for p in &self.rules.local_only {
            args.push(format!("--local-only={p}").into());
        }
        if self.rules.no_defaults {
            args.push("--no-default-ignores".into());
        }
        if let Some(cmd) = &self.on_change {
            args.push(format!("--on-change={cmd}").into());
        }
        if let Some(rate) = self.bwlimit {
            args.push(format!("--bwlimit={rate}").into());
        }
        if let Some(t) = self.remote_timeout {
            args.push(format!("--remote-timeout={}ms", t.as_millis()).into());
        }
        args
    }

    /// Whether the mount is local-first: `--write-back` or `KMOUNT_WRITE_BACK=1`; and by
    /// default for a target across a network (`remote`: a container or an ssh host). Over a
    /// link every write-through operation waits a round trip (an untar of 5,000 files at
    /// 20 ms took over 400 s, `git status` 4× native); and a container's pod can be replaced
    /// with a fresh filesystem at any time, when only the journal has the session's changes
    /// to apply again. `--write-through` or `KMOUNT_WRITE_BACK=0` turns that off.
    pub fn write_back_enabled(&self, remote: bool) -> bool {
        let env = std::env::var_os("KMOUNT_WRITE_BACK");
        if self.write_through || env.as_ref().is_some_and(|v| v == "0") {
            return false;
        }
        self.write_back || env.is_some_and(|v| v == "1") || remote
    }

    /// Checks the patterns now, so that a bad one is refused before anything is mounted.
    pub fn check_rules(&self) -> anyhow::Result<()> {
        Rules::new(&self.rules).map_err(|e| {
            anyhow::anyhow!("{e}; fix the pattern (gitignore syntax, see `kmount --help`)")
        })?;
        Ok(())
    }
}

/// `--bwlimit`: `500K`, `2M`, `1G`, `64KiB`, `1.5M/s`, or plain bytes per second; K = 1024.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{s:?} is not a rate: give bytes per second such as 500K, 2M or 1G (K = 1024 bytes)"
        )
    };
    let mut t = s.trim();
    t = t.strip_suffix("/s").unwrap_or(t);
    let upper = t.to_ascii_uppercase();
    let mut u = upper.as_str();
    u = u
        .strip_suffix("IB")
        .or_else(|| u.strip_suffix('B'))
        .unwrap_or(u);
    let (num, scale) = match u.chars().last() {
        Some('K') => (&u[..u.len() - 1], 1u64 << 10),
        Some('M') => (&u[..u.len() - 1], 1 << 20),
        Some('G') => (&u[..u.len() - 1], 1 << 30),
        _ => (u, 1),
    };
    let value = num
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(bad)?;
    let rate = (value * scale as f64).round();
    if rate < 1024.0 {
        return Err(format!(
            "{s:?} is too slow to mount anything: give at least 1K (1024 bytes per second)"
        ));
    }
    if rate > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(rate as u64)
}

/// Shows a rate as the user would write it (`512K`, `2M`).
pub fn format_rate(rate: u64) -> String {
    for (unit, scale) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if rate >= scale && rate.is_multiple_of(scale) {
            return format!("{}{unit}", rate / scale);
        }
    }
    format!("{rate}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("500K"), Ok(500 * 1024));
        assert_eq!(parse_rate("2M"), Ok(2 << 20));
        assert_eq!(parse_rate("1G"), Ok(1 << 30));
        assert_eq!(parse_rate("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_rate("1.5m/s"), Ok(3 << 19));
        assert_eq!(parse_rate("4096"), Ok(4096));
        for bad in ["", "fast", "-1M", "2X", "10"] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("500K") || e.contains("at least"), "{bad}: {e}");
        }
        assert_eq!(format_rate(500 * 1024), "500K");
        assert_eq!(format_rate(3 << 19), "1536K");
        assert_eq!(format_rate(1000), "1000");
    }

    #[test]
    fn flags_survive_the_trip_to_the_daemon() {
        let flags = MountFlags {
            reconcile_interval: Some(Duration::from_millis(1500)),
            write_back: true,
            write_through: false,
            rules: RulesConfig {
                exclude: vec!["node_modules/".into(), "*.log".into()],
                local_only: vec!["build/".into()],
                no_defaults: true,
                kmountignore: None,
            },
            on_change: Some("make -j4 && echo 'done'".into()),
            bwlimit: Some(2 << 20),
            remote_timeout: Some(Duration::from_secs(3)),
        };
        let args: Vec<String> = flags
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--reconcile-interval=1500ms",
                "--write-back",
                "--exclude=node_modules/",
                "--exclude=*.log",
                "--local-only=build/",
                "--no-default-ignores",
                "--on-change=make -j4 && echo 'done'",
                "--bwlimit=2097152",
                "--remote-timeout=3000ms",
            ]
        );
    }
}
