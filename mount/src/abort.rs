//! Ending a FUSE session that does not end by itself: an unmount that was refused or only
//! detached (files still open) leaves the kernel connection up and the session threads
//! waiting for requests forever. The kernel's fusectl filesystem can abort the connection:
//! every waiting request fails with `ENOTCONN` and the session ends.

use std::io;
use std::path::Path;

/// Where fusectl is normally mounted.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The FUSE connection number (the minor device number) of the filesystem mounted exactly at
/// `mountpoint`, from `/proc/self/mountinfo`; the last such mount wins (the visible one).
pub fn connection_of(mountpoint: &Path) -> Option<u32> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    connection_in(&info, mountpoint)
}

fn connection_in(info: &str, mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || unescape_mountinfo(fields[4]) != want {
            continue;
        }
        let fstype = fields.get(sep + 1).copied().unwrap_or("");
        if !(fstype == "fuse" || fstype.starts_with("fuse.")) {
            continue;
        }
        let minor = fields[2].split(':').nth(1).and_then(|m| m.parse().ok());
        found = minor.or(found);
    }
    found
}

/// A path field of `/proc/self/mountinfo`, which escapes space, tab, newline and backslash
/// as `\ooo`.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Aborts FUSE connection `conn`. Mounts fusectl first when it is not mounted and this
/// process may (root).
pub fn abort_connection(conn: u32) -> io::Result<()> {
    let abort = Path::new(FUSECTL).join(conn.to_string()).join("abort");
    if !Path::new(FUSECTL).join(conn.to_string()).exists() {
        let _ = nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    std::fs::write(&abort, "1").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot abort FUSE connection {conn} through {}: {e}",
                abort.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_visible_fuse_mount() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
40 22 0:52 / /tmp/with\\040space rw,nosuid - fuse.kmount x rw
41 22 0:53 / /tmp/m rw - fuse kmount rw
42 41 0:60 / /tmp/m rw - fuse.kmount kmount rw
43 22 0:61 / /tmp/other rw - tmpfs tmpfs rw";
        assert_eq!(connection_in(info, Path::new("/tmp/with space")), Some(52));
        assert_eq!(connection_in(info, Path::new("/tmp/m")), Some(60));
        assert_eq!(connection_in(info, Path::new("/tmp/other")), None);
        assert_eq!(connection_in(info, Path::new("/nowhere")), None);
    }
}
