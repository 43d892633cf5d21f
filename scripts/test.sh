#!/usr/bin/env bash
# The whole kmount test run, as CI runs it (.ci/run calls exactly this):
#   1. installs what the tests need (Debian packages, pjdfstest, fsx)
#   2. format and lint checks
#   3. unit and integration tests (real FUSE mounts against a real agent)
#   4. the POSIX suites on a mount: pjdfstest (compared with the backing ext4 dir) and fsx
# Every tier must run: a tier that cannot run fails the whole run, loudly.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
results=${KMOUNT_RESULTS:-/tmp/kmount-results}
mkdir -p "$results"
start=$(date +%s)
passed=0 failed=0
tier() {  # tier NAME COMMAND…
  local name=$1; shift
  echo "=== $(date +%T) tier: $name" >&2
  if "$@"; then
    passed=$((passed + 1)); echo "=== tier $name: passed" >&2
  else
    failed=$((failed + 1)); echo "=== tier $name: FAILED" >&2
  fi
}

scripts/deps.sh --test || { echo "kmount: cannot install the test dependencies (see above)" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"  # a Rust that deps.sh just installed
if [ ! -e /dev/fuse ]; then
  echo "kmount: /dev/fuse is missing: the FUSE test tiers cannot run on this machine" >&2
  exit 1
fi

tier fmt cargo fmt --all -- --check
tier build cargo build --workspace --all-targets --locked
tier clippy cargo clippy --workspace --all-targets --locked -- -D warnings
# Property tests draw new cases on every run; the seed is printed so that a failure can be
# repeated exactly (PROPTEST_RNG_SEED=N scripts/test.sh), and failing cases are saved to the
# proptest-regressions files, which every later run tries first.
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
echo "property tests: PROPTEST_RNG_SEED=$PROPTEST_RNG_SEED (set it to draw these cases again)"
tier cargo-test cargo test --workspace --locked -- --test-threads="${KMOUNT_TEST_THREADS:-4}"
if [ -x scripts/posix/pjdfstest.sh ]; then
  tier pjdfstest env KMOUNT_RESULTS="$results/posix" scripts/posix/pjdfstest.sh
else
  echo "kmount: scripts/posix/pjdfstest.sh is missing" >&2; failed=$((failed + 1))
fi
if [ -x scripts/posix/fsx.sh ]; then
  tier fsx env KMOUNT_RESULTS="$results/posix" scripts/posix/fsx.sh "${KMOUNT_FSX_OPS:-20000}"
else
  echo "kmount: scripts/posix/fsx.sh is missing" >&2; failed=$((failed + 1))
fi
# 5. Kubernetes targets against a real local cluster (started here; failing to start fails the tier)
tier cluster bash -c 'set -eo pipefail; scripts/cluster-up.sh >/dev/null; . "${KMOUNT_CLUSTER_DIR:-/tmp/kmount-cluster}/env"; export KUBECONFIG KMOUNT_CLUSTER_DIR; cargo test -p kmount-tests --locked --test cluster -- --include-ignored --test-threads=2'

echo "kmount tests: $(( $(date +%s) - start ))s" >&2
echo "tiers: $passed passed, $failed failed"
[ "$failed" = 0 ]
