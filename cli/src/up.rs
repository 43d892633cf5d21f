//! `kmount up` / `kmount down`: the mounts of the nearest kmount.toml.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::state::{StateDirs, pid_alive};
use crate::{absolute_mountpoint, config, preflight, unmount};

/// Mounts each entry by running `kmount` for it, from the file's directory (relative targets
/// and mountpoints are relative to the file). When one fails, the mounts this run made are
/// unmounted again, so that `up` is all or nothing.
pub fn up() -> Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let cfg = config::load_nearest(&cwd)?;
    let base = cfg.path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let dirs = StateDirs::for_current_user()?;
    let exe = std::env::current_exe().context("cannot find the kmount executable")?;
    check_entries(&cfg, &base)?;
    // Mounts made by this run, and the mountpoints it created, to undo on failure.
    let mut made: Vec<PathBuf> = Vec::new();
    let mut created: Vec<PathBuf> = Vec::new();
    let mut failure = None;
    for (i, m) in cfg.mounts.iter().enumerate() {
        let what = format!(
            "{} [[mount]] #{} ({} at {})",
            cfg.path.display(),
            i + 1,
            m.target,
            m.mountpoint.display()
        );
        match up_one(&dirs, &exe, &base, m, &mut created) {
            Ok(Some(mnt)) => made.push(mnt),
            Ok(None) => {}
            Err(e) => {
                failure = Some(e.context(what));
                break;
            }
        }
    }
    let Some(err) = failure else {
        return Ok(());
    };
    let mut undone = 0;
    for mnt in made.iter().rev() {
        match unmount::unmount_one(&dirs, mnt) {
            Ok(()) => undone += 1,
            Err(e) => eprintln!("kmount: error: {e:#}"),
        }
    }
    for dir in created.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
    let stays = made.len() - undone;
    if stays > 0 {
        bail!(
            "{err:#}\n{stays} mount(s) made by this `kmount up` could not be unmounted again \
             (see above); `kmount down` retries"
        );
    }
    bail!(
        "{err:#}\nnothing was left mounted by this `kmount up` ({undone} mount(s) undone); fix \
         the entry and run `kmount up` again"
    )
}

/// Refuses the file before anything is mounted when an entry's target or patterns are bad.
fn check_entries(cfg: &config::Config, base: &Path) -> Result<()> {
    for (i, m) in cfg.mounts.iter().enumerate() {
        let rules = kmount_mount::rules::RulesConfig {
            exclude: m.exclude.clone(),
            local_only: m.local_only.clone(),
            ..Default::default()
        };
        let checked = crate::target::Target::parse(&m.target, base)
            .map(drop)
            .and_then(|()| {
                kmount_mount::rules::Rules::new(&rules)
                    .map(drop)
                    .map_err(anyhow::Error::from)
            });
        if let Err(e) = checked {
            bail!(
                "{}:{}: [[mount]] #{}: {e:#}; fix it and run `kmount up` again (nothing was \
                 mounted)",
                cfg.path.display(),
                m.line,
                i + 1
            );
        }
    }
    Ok(())
}

/// Mounts one entry; `Ok(None)` when it was already mounted.
fn up_one(
    dirs: &StateDirs,
    exe: &Path,
    base: &Path,
    m: &config::MountEntry,
    created: &mut Vec<PathBuf>,
) -> Result<Option<PathBuf>> {
    let mountpoint = absolute_mountpoint(&m.mountpoint)?;
    if dirs
        .record_for(&mountpoint)
        .is_some_and(|r| pid_alive(r.pid))
    {
        println!("kmount: {} is already mounted", mountpoint.display());
        return Ok(None);
    }
    if !mountpoint.exists() {
        // Shallowest first, so that undoing in reverse removes the deepest first.
        let mut missing: Vec<PathBuf> = mountpoint
            .ancestors()
            .take_while(|a| !a.exists())
            .map(Path::to_path_buf)
            .collect();
        missing.reverse();
        std::fs::create_dir_all(&mountpoint)
            .with_context(|| format!("cannot create {}", mountpoint.display()))?;
        created.extend(missing);
    }
    let mut cmd = std::process::Command::new(exe);
    cmd.current_dir(base);
    for (flag, value) in [
        ("--namespace", &m.namespace),
        ("--context", &m.context),
        ("--container", &m.container),
        ("--on-change", &m.on_change),
        ("--remote-timeout", &m.remote_timeout),
    ] {
        if let Some(v) = value {
            cmd.arg(format!("{flag}={v}"));
        }
    }
    for p in &m.exclude {
        cmd.arg(format!("--exclude={p}"));
    }
    for p in &m.local_only {
        cmd.arg(format!("--local-only={p}"));
    }
    cmd.arg("--").arg(&m.target).arg(&mountpoint);
    let status = cmd.status().context("cannot run kmount")?;
    if !status.success() {
        bail!("did not come up (see the error above)");
    }
    Ok(Some(mountpoint))
}

/// Unmounts each entry that is mounted.
pub fn down() -> Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let cfg = config::load_nearest(&cwd)?;
    let dirs = StateDirs::for_current_user()?;
    let mut failed = 0;
    for m in &cfg.mounts {
        let mountpoint = absolute_mountpoint(&m.mountpoint)?;
        let mounted = preflight::mounted_fs_type(&mountpoint)?.is_some();
        if !mounted && dirs.record_for(&mountpoint).is_none() {
            println!("kmount: {} is not mounted", mountpoint.display());
            continue;
        }
        if let Err(e) = unmount::unmount_one(&dirs, &mountpoint) {
            eprintln!("kmount: error: {e:#}");
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} mount(s) could not be unmounted (see above)");
    }
    Ok(())
}
