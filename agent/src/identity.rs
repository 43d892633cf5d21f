//! Running one request as the mount-side caller (`--identity`).
//!
//! Linux keeps credentials per thread; the raw `setfsuid`/`setfsgid`/`setgroups` syscalls change
//! only the calling thread (glibc's wrappers would broadcast them to every thread, so they are
//! not used). With a filesystem uid other than 0 the kernel drops CAP_CHOWN, CAP_DAC_OVERRIDE,
//! CAP_FOWNER and the other filesystem capabilities from the thread's effective set, so
//! permission and ownership rules apply exactly as for that user; they come back when the
//! filesystem uid returns to 0.
//!
//! Invariant: a worker thread runs as the agent's own identity except between
//! [`Identity::assume`] and the drop of the guard it returns.

use kmount_proto::Caller;

use crate::sys::{self, Errno, SysResult};

#[derive(Debug)]
pub struct Identity {
    active: bool,
    fsuid: u32,
    fsgid: u32,
    groups: Vec<libc::gid_t>,
}

impl Identity {
    /// Identity switching is active only when asked for and the agent runs as root.
    pub fn new(requested: bool) -> Identity {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        Identity {
            active: requested && root,
            fsuid: sys::current_fsuid(),
            fsgid: sys::current_fsgid(),
            groups: sys::current_groups().unwrap_or_default(),
        }
    }

    pub fn active(&self) -> bool {
        self.active
    }

    /// The supplementary groups restored after each request.
    #[cfg(test)]
    pub fn base_groups(&self) -> Vec<libc::gid_t> {
        self.groups.clone()
    }

    /// Takes on `caller`'s uid, gid and groups for the current thread until the guard drops.
    /// Without a caller, or when switching is not active, the thread keeps the agent's identity.
    pub fn assume(&self, caller: Option<&Caller>) -> SysResult<Option<AsCaller<'_>>> {
        let Some(c) = caller.filter(|_| self.active) else {
            return Ok(None);
        };
        // The guard exists before the first change, so a failure part-way is undone.
        let guard = AsCaller { base: self };
        set_groups(&c.groups)?;
        set_fsgid(c.gid)?;
        set_fsuid(c.uid)?;
        Ok(Some(guard))
    }

    fn restore(&self) -> SysResult<()> {
        set_fsuid(self.fsuid)?;
        set_fsgid(self.fsgid)?;
        set_groups(&self.groups)
    }
}

/// While alive, the current thread runs as a caller. Dropping it restores the agent's identity.
#[derive(Debug)]
#[must_use = "the identity is restored as soon as the guard is dropped"]
pub struct AsCaller<'a> {
    base: &'a Identity,
}

impl Drop for AsCaller<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.base.restore() {
            // Going on would run later requests with a stranger's identity.
            eprintln!("kmount-agent: cannot restore the agent's own identity ({e}); aborting");
            std::process::abort();
        }
    }
}

fn set_groups(groups: &[u32]) -> SysResult<()> {
    // SAFETY: the pointer and length describe a valid gid_t array; per-thread raw syscall.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    sys::cvt(r).map(drop)
}

fn set_fsgid(gid: u32) -> SysResult<()> {
    // SAFETY: per-thread raw syscall; it reports the previous id, so success is checked after.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid as libc::c_long) };
    if sys::current_fsgid() == gid {
        Ok(())
    } else {
        Err(Errno(libc::EPERM))
    }
}

fn set_fsuid(uid: u32) -> SysResult<()> {
    // SAFETY: as set_fsgid.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid as libc::c_long) };
    if sys::current_fsuid() == uid {
        Ok(())
    } else {
        Err(Errno(libc::EPERM))
    }
}
