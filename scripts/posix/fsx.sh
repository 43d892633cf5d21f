#!/usr/bin/env bash
# fsx (File System eXerciser, fsx-rs from crates.io) on files inside a kmount mount, after the
# same runs on the backing ext4 filesystem as a sanity baseline.
#
# Usage: scripts/posix/fsx.sh [--backing-only] [OPS]
#   OPS   operations per run (default 20000).
# The long run, done once by hand (same seed, 100,000 operations per run):
#   FSX_SEED=1123581321 scripts/posix/fsx.sh 100000
#
# Option sets (tests/posix/fsx/SET.toml, each documented there):
#   rw      (a) pread/pwrite, truncate that shrinks and extends, writes past EOF, close+reopen
#   mmap    (b) (a) plus mmap reads, mmap writes (+msync) and msync(MS_INVALIDATE)
#   falloc  (c) (a) plus posix_fallocate and punch hole (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE)
#   all     (d) everything fsx has, combined (adds fsync, fdatasync, sendfile, fadvise,
#               copy_file_range)
# Each set runs first on a fresh ext4 directory, then on a file inside one `kmount SRC MNT` of
# another fresh ext4 directory. fsx checks every read against its model of the file. With the
# same seed both sides do the same operations, so this script also checks that the file read
# through the mount equals the ext4 baseline's file, and that after `kmount unmount` the
# backing file SRC/fsx-SET equals it too (everything close() accepted reached the agent).
#
# Every fsx command is printed; re-run one by hand to replay a failure (same -S seed), adding
# -v (or -vv) for a log of each operation, or `-m FROM:TO` to watch a byte range.
#
# Environment:
#   FSX_SEED              seed for every run (default 1123581321); printed.
#   FSX_SETS              sets to run (default "rw mmap falloc all").
#   FSX_TIMEOUT           seconds allowed per run (default max(600, OPS/10)).
#   KMOUNT_RESULTS        results dir (default /tmp/kmount-posix): fsx/SIDE-SET.log, fsx
#                         artifacts (SIDE-SET/*.fsxgood on failure), summary.txt, and
#                         kmount.log (output of the kmount commands).
#   KMOUNT                kmount binary (default: target/debug/kmount of this repo).
#   KMOUNT_POSIX_WORKDIR  where the fresh directories are made (default /var/tmp); must not
#                         be tmpfs or FUSE.
#   KMOUNT_KEEP=1         keep the work directories.
#   KMOUNT_STATE_DIR      kmount's state dir (default RESULTS/kmount-state, so the mount
#                         daemon's log, RESULTS/kmount-state/logs/*.log, is kept with the
#                         results); KMOUNT_LOG=debug makes that log list every FUSE request.
#
# Exit status: 0 when every run passed and the contents matched; 1 when some fsx run failed
# or some contents differ; 2 when the runs could not happen (setup, mount or unmount failure).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
prog=fsx.sh
# shellcheck source=scripts/posix/lib.sh
. "$repo/scripts/posix/lib.sh"

results_root=$(realpath -m "${KMOUNT_RESULTS:-/tmp/kmount-posix}")
results="$results_root/fsx"
kmount_bin=${KMOUNT:-$repo/target/debug/kmount}
workbase=${KMOUNT_POSIX_WORKDIR:-/var/tmp}
seed=${FSX_SEED:-1123581321}
read -r -a sets <<<"${FSX_SETS:-rw mmap falloc all}"
export PATH="$HOME/.cargo/bin:$PATH" NO_COLOR=1

backing_only=0
ops=20000
while (($#)); do
	case $1 in
	--backing-only) backing_only=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
		exit 0
		;;
	*[!0-9]* | '') die "unknown argument '$1' (usage: fsx.sh [--backing-only] [OPS])" ;;
	*) ops=$1 ;;
	esac
	shift
done
((ops > 0)) || die "OPS must be a positive number"
[[ $seed =~ ^[0-9]+$ ]] || die "FSX_SEED must be a number"
run_timeout=${FSX_TIMEOUT:-$((ops / 10 > 600 ? ops / 10 : 600))}

command -v fsx >/dev/null || die "fsx not found: run scripts/posix/install.sh"
for set in "${sets[@]}"; do
	[[ -f $repo/tests/posix/fsx/$set.toml ]] || die "unknown set '$set': no tests/posix/fsx/$set.toml"
done
if ((!backing_only)); then
	[[ -x $kmount_bin ]] ||
		die "kmount binary $kmount_bin not found: run 'cargo build -p kmount-cli -p kmount-agent' (or set KMOUNT)"
	[[ -e /dev/fuse ]] || die "/dev/fuse is missing: the mount runs cannot happen on this machine"
fi

mkdir -p "$results"
use_state_dir "$results_root"
: >"$results/summary.txt"
work=$(mktemp -d "$workbase/kmount-fsx.XXXXXX")
chmod 0755 "$work"
mnt=""
unmount_failed=0

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
	local rc=$?
	if [[ -n $mnt ]]; then
		kmount_unmount "$mnt" "$results_root/kmount.log" || unmount_failed=1
	fi
	if [[ ${KMOUNT_KEEP:-0} == 1 ]]; then
		log "keeping $work"
	elif [[ -n $mnt ]] && is_mounted "$mnt"; then
		log "not removing $work: $mnt is still mounted"
	else
		rm -rf --one-file-system "$work"
	fi
	if ((unmount_failed)) && ((rc < 2)); then
		rc=2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 2' INT TERM HUP
trap 'log "ERROR: unexpected failure at line $LINENO: $BASH_COMMAND"; exit 2' ERR

require_disk_dir "$work"
failed=0

record() { # record LINE: to stdout and the summary
	echo "$*"
	echo "$*" >>"$results/summary.txt"
}

# run_fsx SIDE SET DIR: one fsx run on DIR/fsx-SET (-v logs every operation, so the log
# shows the step that failed even when fsx panics); sets `failed` and returns 1 on failure.
run_fsx() {
	local side=$1 set=$2 dir=$3 rc=0 start secs
	local artifacts="$results/$side-$set"
	local logf="$results/$side-$set.log"
	rm -rf "$artifacts"
	mkdir -p "$artifacts"
	local cmd=(fsx -v -N "$ops" -S "$seed" -f "$repo/tests/posix/fsx/$set.toml" -P "$artifacts" "$dir/fsx-$set")
	echo "[$side/$set] ${cmd[*]}"
	echo "# ${cmd[*]}" >"$logf"
	start=$(date +%s)
	(cd "$artifacts" && timeout --kill-after=30 "$run_timeout" "${cmd[@]}") >>"$logf" 2>&1 || rc=$?
	secs=$(($(date +%s) - start))
	if ((rc == 0)) && grep -q 'All operations completed A-OK!' "$logf"; then
		record "PASS  $side/$set  ${secs}s  seed $seed  ops $ops"
		rmdir "$artifacts" 2>/dev/null || true
	else
		failed=1
		if ((rc == 124 || rc == 137)); then
			record "FAIL  $side/$set  timed out after ${run_timeout}s (FSX_TIMEOUT)  seed $seed  ops $ops"
		else
			record "FAIL  $side/$set  exit $rc after ${secs}s  seed $seed  ops $ops  log $logf"
		fi
		record "      replay: ${cmd[*]}"
		tail -n 40 "$logf" | sed 's/^/      | /'
		return 1
	fi
}

# same_content SET A B WHAT: the files must be byte-identical.
same_content() {
	local set=$1 a=$2 b=$3 what=$4
	if cmp -s "$a" "$b"; then
		record "PASS  mount/$set  $what"
	else
		failed=1
		record "FAIL  mount/$set  $what: $a and $b differ ($(cmp "$a" "$b" 2>&1 | head -n 1))"
	fi
}

echo "fsx $(fsx --version | awk '{print $2}'), seed $seed, $ops operations per run, sets: ${sets[*]}"
record "# $(date -u +%FT%TZ) seed $seed ops $ops sets ${sets[*]}"

# Sets whose ext4 baseline passed (their final file is the reference for the mount runs),
# and sets whose mount run passed.
declare -A ext4_ok=() mount_ok=()
mkdir "$work/backing"
for set in "${sets[@]}"; do
	if run_fsx ext4 "$set" "$work/backing"; then ext4_ok[$set]=1; fi
done

if ((!backing_only)); then
	mkdir "$work/mount-src" "$work/mnt"
	chmod 0755 "$work/mount-src" "$work/mnt"
	mnt="$work/mnt"
	kmount_mount "$work/mount-src" "$mnt" "$results_root/kmount.log"
	for set in "${sets[@]}"; do
		run_fsx mount "$set" "$mnt" || continue
		mount_ok[$set]=1
		# Identical seeds and operations: the final files must be identical too.
		if [[ -n ${ext4_ok[$set]:-} ]]; then
			same_content "$set" "$mnt/fsx-$set" "$work/backing/fsx-$set" \
				"file read through the mount equals the ext4 baseline's"
		fi
	done
	if kmount_unmount "$mnt" "$results_root/kmount.log"; then
		for set in "${sets[@]}"; do
			[[ -n ${ext4_ok[$set]:-} && -n ${mount_ok[$set]:-} ]] || continue
			same_content "$set" "$work/mount-src/fsx-$set" "$work/backing/fsx-$set" \
				"backing file after kmount unmount equals the ext4 baseline's"
		done
	else
		unmount_failed=1
	fi
fi

echo
echo "fsx summary ($results/summary.txt):"
cat "$results/summary.txt"
((unmount_failed == 0)) || exit 2
((failed == 0)) || exit 1
exit 0
