#!/usr/bin/env bash
# Installs kmount: Debian packages it needs (fuse3), a release build of `kmount` and
# `kmount-agent`, both copied to /usr/local/bin (root) or ~/.local/bin (other users).
# Then, if given arguments, runs `kmount ARGS…`, e.g.  ./install.sh ~/project ./mnt
set -euo pipefail
orig="$PWD"
cd "$(dirname "$0")"
scripts/deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"  # a Rust that deps.sh just installed
echo "kmount: building (release)…" >&2
cargo build --release --locked -p kmount-cli -p kmount-agent
if [ "$(id -u)" = 0 ]; then bindir=/usr/local/bin; else bindir="$HOME/.local/bin"; fi
mkdir -p "$bindir"
install -m 0755 target/release/kmount target/release/kmount-agent "$bindir/"
echo "kmount: installed kmount and kmount-agent in $bindir" >&2
case ":$PATH:" in *":$bindir:"*) ;; *) echo "kmount: add $bindir to your PATH" >&2 ;; esac
if [ $# -gt 0 ]; then
  cd "$orig"
  exec "$bindir/kmount" "$@"
fi
