#!/usr/bin/env bash
# The kmount benchmark in one command: installs the peers (sshfs, bindfs) and an sshd, builds
# release binaries, and runs kmount-bench, which writes bench/results/<date>.md.
#   bench/run.sh --quick     smoke test: small tree, 0 ms only, one repetition (~2 min)
#   bench/run.sh             full run: 24,000 files, 0/10/20 ms round trip
#   bench/run.sh --help      every option (round trips, repetitions, caps, contenders)
# Needs root (FUSE mounts, dropping the page cache between cold runs, sshd).
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs="fuse3 sshfs bindfs openssh-server openssh-client git tar"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "kmount-bench: installing Debian packages:$missing" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

target=${CARGO_TARGET_DIR:-target}
cargo build --release -p kmount-cli -p kmount-agent -p kmount-bench
exec "$target/release/kmount-bench" \
  --kmount "$target/release/kmount" --agent "$target/release/kmount-agent" "$@"
