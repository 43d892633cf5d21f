#!/usr/bin/env bash
# pjdfstest (the POSIX filesystem suite, Rust rewrite from crates.io) on a kmount mount,
# compared with the same suite on a plain directory of the backing ext4 filesystem.
#
# Usage: scripts/posix/pjdfstest.sh [--backing-only|--mount-only] [-- TEST_PATTERN...]
#   (default)       run on a fresh ext4 directory, then on `kmount DIR MNT` of another fresh
#                   ext4 directory, and compare;
#   --backing-only  only the ext4 run (proves the setup, records the baseline);
#   --mount-only    only the mount run, compared with the baseline saved by an earlier run
#                   in the same results dir (without one, every failure on the mount counts);
#   TEST_PATTERN    passed to pjdfstest: run only tests whose name contains one of them
#                   (e.g. `-- chmod:: rename::`); handy to replay one failure.
#
# Replay one test by hand (as root), e.g. on a mount at MNT:
#   pjdfstest -c tests/posix/pjdfstest.toml -p MNT -s /dev/shm/SOMEDIR -e -v chmod::foo
#
# Environment:
#   KMOUNT_RESULTS          results dir (default /tmp/kmount-posix); this script writes
#                           pjdfstest/{backing,mount}.{log,tsv,failures.txt}, comparison.txt
#                           and kmount.log (output of the kmount commands).
#   KMOUNT                  kmount binary (default: target/debug/kmount of this repo).
#   KMOUNT_POSIX_WORKDIR    where the fresh directories are made (default /var/tmp); must
#                           not be tmpfs or FUSE: it stands for the ext4 the agent serves.
#   PJDFSTEST_TIMEOUT       seconds allowed for each pjdfstest run (default 1800).
#   PJDFSTEST_RERUNS        times each test that failed on the mount is re-run alone, to
#                           tell a race from a deterministic failure (default 3; 0: never).
#   KMOUNT_KEEP=1           keep the work directories (the mount is still unmounted).
#   KMOUNT_STATE_DIR        kmount's state dir (default RESULTS/kmount-state, so the mount
#                           daemon's log, RESULTS/kmount-state/logs/*.log, is kept with the
#                           results); KMOUNT_LOG=debug makes that log list every FUSE request.
#
# Exit status: 0 when no test fails on the mount that passes on the backing directory
# (tests listed with a reason in tests/posix/pjdfstest-known-differences.txt excepted);
# 1 when some do; 2 when the suite could not run to the end (setup error, crash, timeout,
# mount or unmount failure).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
config="$repo/tests/posix/pjdfstest.toml"
allowlist="$repo/tests/posix/pjdfstest-known-differences.txt"
results_root=$(realpath -m "${KMOUNT_RESULTS:-/tmp/kmount-posix}")
results="$results_root/pjdfstest"
kmount_bin=${KMOUNT:-$repo/target/debug/kmount}
workbase=${KMOUNT_POSIX_WORKDIR:-/var/tmp}
run_timeout=${PJDFSTEST_TIMEOUT:-1800}
reruns=${PJDFSTEST_RERUNS:-3}
export PATH="$HOME/.cargo/bin:$PATH" NO_COLOR=1 RUST_BACKTRACE=0

prog=pjdfstest.sh
# shellcheck source=scripts/posix/lib.sh
. "$repo/scripts/posix/lib.sh"

mode=both
patterns=()
while (($#)); do
	case $1 in
	--backing-only) mode=backing ;;
	--mount-only) mode=mount ;;
	--)
		shift
		patterns=("$@")
		break
		;;
	-h | --help)
		sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
		exit 0
		;;
	*) die "unknown argument '$1' (see --help)" ;;
	esac
	shift
done

[[ $(id -u) -eq 0 ]] || die "run as root: pjdfstest switches users and kmount mounts with allow_other"
command -v pjdfstest >/dev/null || die "pjdfstest not found: run scripts/posix/install.sh"
[[ -f $config ]] || die "missing $config"
[[ $reruns =~ ^[0-9]+$ ]] || die "PJDFSTEST_RERUNS must be a number"
if [[ $mode != backing ]]; then
	[[ -x $kmount_bin ]] ||
		die "kmount binary $kmount_bin not found: run 'cargo build -p kmount-cli -p kmount-agent' (or set KMOUNT)"
	[[ -e /dev/fuse ]] || die "/dev/fuse is missing: the mount run cannot happen on this machine"
fi

# --- allowlist: "TEST_NAME REASON", both mandatory -------------------------------------------
declare -A allowed=()
if [[ -f $allowlist ]]; then
	lineno=0
	while IFS= read -r line || [[ -n $line ]]; do
		lineno=$((lineno + 1))
		line=${line%%$'\r'}
		[[ $line =~ ^[[:space:]]*(#|$) ]] && continue
		if [[ ! $line =~ ^([^[:space:]]+)[[:space:]]+([^[:space:]].*)$ ]]; then
			die "$allowlist:$lineno: entry without a reason: '$line' (write: TEST_NAME REASON)"
		fi
		allowed[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
	done <"$allowlist"
fi

mkdir -p "$results"
use_state_dir "$results_root"
work=$(mktemp -d "$workbase/kmount-pjdfstest.XXXXXX")
chmod 0755 "$work"
secondary=""
mnt=""
unmount_failed=0

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
	local rc=$?
	if [[ -n $mnt ]]; then
		kmount_unmount "$mnt" "$results_root/kmount.log" || unmount_failed=1
	fi
	if [[ ${KMOUNT_KEEP:-0} == 1 ]]; then
		log "keeping $work ${secondary:+and $secondary}"
	else
		if [[ -n $mnt ]] && is_mounted "$mnt"; then
			log "not removing $work: $mnt is still mounted"
		else
			rm -rf --one-file-system "$work"
		fi
		if [[ -n $secondary ]]; then rm -rf --one-file-system "$secondary"; fi
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
work_fs=$(fstype "$work")

# Secondary filesystem for the EXDEV tests (link/rename across filesystems): a directory on
# /dev/shm (tmpfs), distinct from both the backing ext4 and the FUSE mount.
secondary_args=()
if [[ -d /dev/shm && $(stat -c %d /dev/shm) != $(stat -c %d "$work") ]]; then
	secondary=$(mktemp -d /dev/shm/kmount-pjdfstest-secondary.XXXXXX)
	chmod 0755 "$secondary"
	secondary_args=(-s "$secondary")
else
	log "warning: no /dev/shm on a separate filesystem: the EXDEV tests will be skipped"
fi

# parse LOG -> "NAME<TAB>STATUS" lines; STATUS is pass|fail|skip|xfail|xpass.
# pjdfstest prints "NAME<spaces>RESULT" per test; names contain "::" and no spaces, the
# indented lines after a result are skip reasons or the failure's panic message.
parse() {
	awk '
		/^[^ \t]*::[^ \t]* +(ok|skipped|FAILED|PASSED UNEXPECTEDLY|failed as expected)$/ {
			name = $1
			st = $0; sub(/^[^ ]+ +/, "", st)
			if (st == "ok") st = "pass"
			else if (st == "skipped") st = "skip"
			else if (st == "FAILED") st = "fail"
			else if (st == "PASSED UNEXPECTEDLY") st = "xpass"
			else st = "xfail"
			print name "\t" st
		}' "$1"
}

# failures LOG -> each failed test with the message pjdfstest printed for it.
failures() {
	awk '
		/^[^ \t]*::[^ \t]* +(ok|skipped|FAILED|PASSED UNEXPECTEDLY|failed as expected)$/ {
			infail = ($NF == "FAILED")
			if (infail) print "### " $1
			next
		}
		/^Summary: / { infail = 0 }
		infail { print }' "$1"
}

counts() { # TSV -> "pass N  fail N  skip N  xfail N  xpass N  total N"
	awk -F'\t' '{ n[$2]++; t++ }
		END { printf "pass %d  fail %d  skip %d  xfail %d  xpass %d  total %d\n",
			n["pass"], n["fail"], n["skip"], n["xfail"], n["xpass"], t }' "$1"
}

# run_suite SIDE PATH: runs pjdfstest on PATH, writes $results/SIDE.{log,tsv,failures.txt}.
run_suite() {
	local side=$1 path=$2 rc=0
	local cmd=(pjdfstest -c "$config" -p "$path" "${secondary_args[@]}" "${patterns[@]}")
	log "$side: ${cmd[*]}"
	{
		echo "# $(date -u +%FT%TZ) $(pjdfstest --version) on $path ($(fstype "$path"))"
		echo "# ${cmd[*]}"
	} >"$results/$side.log"
	(cd "$path" && timeout --kill-after=30 "$run_timeout" "${cmd[@]}") >>"$results/$side.log" 2>&1 || rc=$?
	parse "$results/$side.log" >"$results/$side.tsv"
	failures "$results/$side.log" >"$results/$side.failures.txt"
	log "$side: $(counts "$results/$side.tsv")  (log: $results/$side.log)"
	if ((rc == 124 || rc == 137)); then
		log "ERROR: $side: pjdfstest did not finish within ${run_timeout}s (PJDFSTEST_TIMEOUT)"
		return 2
	fi
	if ! grep -q '^Summary: ' "$results/$side.log"; then
		log "ERROR: $side: pjdfstest stopped before its summary (exit $rc); see the end of $results/$side.log"
		tail -n 20 "$results/$side.log" >&2
		return 2
	fi
	# pjdfstest exits 1 when some test failed; the summary line is the authority then.
	return 0
}

status=0
if [[ $mode != mount ]]; then
	mkdir "$work/backing"
	chmod 0755 "$work/backing"
	run_suite backing "$work/backing" || status=$?
	((status < 2)) || exit "$status"
	cp "$config" "$results/backing.config.toml"
fi

if [[ $mode != backing ]]; then
	mkdir "$work/mount-src" "$work/mnt"
	chmod 0755 "$work/mount-src" "$work/mnt"
	mnt="$work/mnt"
	kmount_mount "$work/mount-src" "$mnt" "$results_root/kmount.log"
	mnt_fs=$(mount_fstype "$mnt")
	run_suite mount "$mnt" || status=$?
	((status < 2)) || exit "$status"
fi

# --- comparison ------------------------------------------------------------------------------
{
	echo "pjdfstest comparison, $(date -u +%FT%TZ)"
	echo "suite:  $(pjdfstest --version), config $config"
	[[ ${#patterns[@]} -eq 0 ]] || echo "filter: ${patterns[*]}"
	if [[ -f $results/backing.tsv ]]; then
		echo "backing ext4 dir ($work_fs): $(counts "$results/backing.tsv")"
	fi
	if [[ $mode != backing ]]; then
		echo "kmount mount ($mnt_fs):       $(counts "$results/mount.tsv")"
	fi
} >"$results/comparison.txt"

if [[ $mode == backing ]]; then
	{
		echo
		echo "Failures on the backing directory (environment or suite problems, not kmount):"
		awk -F'\t' '$2 == "fail" { print "  " $1; n++ } END { if (!n) print "  (none)" }' "$results/backing.tsv"
	} >>"$results/comparison.txt"
	cat "$results/comparison.txt"
	exit 0
fi

baseline=$results/backing.tsv
if [[ ! -s $baseline ]]; then
	log "no baseline in $baseline: every failure on the mount counts"
	baseline=/dev/null
fi

# join the two result sets: NAME BACKING MOUNT ("none" when a side lacks the test; with
# TEST_PATTERNs, only the tests the mount run selected)
joined=$(awk -F'\t' -v filtered=${#patterns[@]} '
	FILENAME == ARGV[1] { b[$1] = $2; next }
	{ m[$1] = $2 }
	END {
		for (n in b) if (!filtered || (n in m)) printf "%s\t%s\t%s\n", n, b[n], ((n in m) ? m[n] : "none")
		for (n in m) if (!(n in b)) printf "%s\t%s\t%s\n", n, "none", m[n]
	}' "$baseline" "$results/mount.tsv" | sort)

regressions=()
allowed_hits=()
while IFS=$'\t' read -r name b m; do
	[[ -n $name ]] || continue
	if [[ $m == fail && ($b == pass || $b == none) ]]; then
		if [[ -n ${allowed[$name]+x} ]]; then
			allowed_hits+=("$name")
		else
			regressions+=("$name")
		fi
	fi
done <<<"$joined"

# Re-run each test that failed on the mount alone, a few times, on the same mount: tells a
# deterministic failure from a race. It changes nothing in the verdict: a flaky failure is a
# failure. Logs: $results/reruns/TEST.log.
declare -A rerun_note=()
if ((${#regressions[@]})) && ((reruns > 0)); then
	mkdir -p "$results/reruns"
	for n in "${regressions[@]}"; do
		fails=0
		: >"$results/reruns/$n.log"
		for ((i = 1; i <= reruns; i++)); do
			(cd "$mnt" && timeout --kill-after=30 300 pjdfstest -c "$config" -p "$mnt" \
				"${secondary_args[@]}" -e "$n") >"$results/reruns/run.log" 2>&1 || true
			cat "$results/reruns/run.log" >>"$results/reruns/$n.log"
			[[ $(parse "$results/reruns/run.log" | cut -f2) == pass ]] || fails=$((fails + 1))
		done
		rm -f "$results/reruns/run.log"
		rerun_note[$n]="alone on the same mount: failed $fails of $reruns reruns"
		log "rerun $n: failed $fails of $reruns"
	done
fi

section() { # section TITLE AWK_CONDITION
	local lines
	lines=$(awk -F'\t' "$2 { print \"  \" \$1 \"  (backing: \" \$2 \", mount: \" \$3 \")\" }" <<<"$joined")
	echo
	echo "$1 ($(grep -c . <<<"$lines" || true)):"
	[[ -z $lines ]] || echo "$lines"
}
# shellcheck disable=SC2016 # section conditions are awk code, expanded by awk
{
	echo
	echo "FAIL ON THE MOUNT, PASS ON THE BACKING DIR (${#regressions[@]}):"
	for n in "${regressions[@]}"; do echo "  $n  ${rerun_note[$n]:+(${rerun_note[$n]})}"; done
	echo
	echo "Allowlisted differences, tests/posix/pjdfstest-known-differences.txt (${#allowed_hits[@]}):"
	for n in "${allowed_hits[@]}"; do echo "  $n  -- ${allowed[$n]}"; done
	section "Fail on both" '$2 == "fail" && $3 == "fail"'
	section "Pass on the mount, fail on the backing dir" '$2 == "fail" && $3 == "pass"'
	section "Skipped on the mount, ran on the backing dir (coverage lost)" '$3 == "skip" && $2 != "skip" && $2 != "none"'
	section "Run on one side only" '$2 == "none" || $3 == "none"'
	for n in "${!allowed[@]}"; do
		grep -q "^$n"$'\t'"pass"$'\t'"fail$" <<<"$joined" ||
			echo "note: allowlist entry '$n' no longer differs; remove it"
	done
	if ((${#regressions[@]})); then
		echo
		echo "Failure messages on the mount ($results/mount.failures.txt):"
		for n in "${regressions[@]}"; do
			awk -v n="### $n" '$0 == n { p = 1; print; next } /^### / { p = 0 } p' "$results/mount.failures.txt"
		done
	fi
} >>"$results/comparison.txt"
cat "$results/comparison.txt"
echo "full logs: $results"

((${#regressions[@]} == 0)) || exit 1
exit 0
