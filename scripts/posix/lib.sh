# shellcheck shell=bash disable=SC2154 # prog and kmount_bin are set by the caller
# Shared by scripts/posix/{pjdfstest,fsx}.sh (sourced, not run). Callers set `prog` (the
# name used in messages) and `kmount_bin` before calling kmount_mount / kmount_unmount.

die() {
	echo "$prog: error: $*" >&2
	exit 2
}
log() { echo "$prog: $*" >&2; }

# is_mounted PATH: reads /proc/self/mountinfo only, so it never blocks on a hung FUSE mount.
is_mounted() {
	awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# mount_fstype PATH: filesystem type of the mount whose mountpoint is exactly PATH.
mount_fstype() {
	awk -v m="$1" '$5 == m { for (i = 7; $i != "-"; i++); t = $(i + 1) } END { print t }' \
		/proc/self/mountinfo
}

# fstype PATH: filesystem type of the filesystem holding PATH (as df reports it).
fstype() { df --output=fstype "$1" | tail -n 1 | tr -d ' '; }

# require_disk_dir DIR: DIR must be on a disk filesystem (the stand-in for the remote's ext4).
require_disk_dir() {
	local t
	t=$(fstype "$1")
	case $t in
	tmpfs | ramfs | fuse*) die "$1 is on $t; set KMOUNT_POSIX_WORKDIR to a directory on ext4" ;;
	ext4) ;;
	*) log "warning: $1 is on $t, not ext4" ;;
	esac
}

# use_state_dir RESULTS_ROOT: unless KMOUNT_STATE_DIR is set, keep kmount's state (mount
# records, control sockets, daemon logs) under RESULTS_ROOT/kmount-state so the daemon log
# stays with the results; falls back to kmount's default when the control socket path would
# not fit in a unix socket address (108 bytes).
use_state_dir() {
	local dir=$1/kmount-state
	[[ -z ${KMOUNT_STATE_DIR:-} ]] || return 0
	if ((${#dir} + 32 < 108)); then
		export KMOUNT_STATE_DIR=$dir
	else
		log "note: $dir is too long for kmount's control socket; daemon logs stay in kmount's default state dir"
	fi
}

# kmount_mount SRC MNT LOG: `kmount SRC MNT` (daemonizes once the mount is ready); its output
# and the daemon's go to LOG. Dies unless MNT ends up a FUSE mount.
kmount_mount() {
	local src=$1 mnt=$2 logf=$3 t
	log "mount: $kmount_bin $src $mnt"
	echo "# $(date -u +%FT%TZ) $kmount_bin $src $mnt" >>"$logf"
	local rc=0 limit=${KMOUNT_MOUNT_TIMEOUT:-120}
	timeout "$limit" "$kmount_bin" "$src" "$mnt" >>"$logf" 2>&1 || rc=$?
	if ((rc == 124)); then
		die "'kmount $src $mnt' did not return within ${limit}s (KMOUNT_MOUNT_TIMEOUT)$(
			is_mounted "$mnt" && echo "; $mnt is mounted, so the mount works but the command never reported ready")"
	elif ((rc != 0)); then
		tail -n 20 "$logf" >&2
		die "'kmount $src $mnt' failed with exit $rc (see $logf)"
	fi
	is_mounted "$mnt" || die "kmount exited 0 but nothing is mounted on $mnt"
	t=$(mount_fstype "$mnt")
	[[ $t == fuse* ]] || die "$mnt is mounted as '$t', not as a FUSE filesystem"
	log "mount: $mnt is $t"
}

# kmount_unmount MNT LOG: `kmount unmount MNT`. Returns 1 when that failed or left MNT
# mounted; then MNT is detached with fusermount3 -u or umount -l so nothing stays behind.
kmount_unmount() {
	local mnt=$1 logf=$2 ok=0
	is_mounted "$mnt" || return 0
	log "unmount: $kmount_bin unmount $mnt"
	echo "# $(date -u +%FT%TZ) $kmount_bin unmount $mnt" >>"$logf"
	if ! timeout 120 "$kmount_bin" unmount "$mnt" >>"$logf" 2>&1; then
		log "ERROR: 'kmount unmount $mnt' failed or timed out (see $logf)"
		ok=1
	fi
	if is_mounted "$mnt"; then
		log "ERROR: $mnt is still mounted after kmount unmount; detaching it"
		ok=1
		fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" || true
	fi
	return "$ok"
}
