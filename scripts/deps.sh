#!/usr/bin/env bash
# Installs what kmount needs to build and run (Debian/Ubuntu): FUSE 3 and a C toolchain for
# crates that build C. With --test, also what the test tiers use: git, sqlite3, vim, tar, attr,
# psmisc, the POSIX suites (pjdfstest, fsx) from crates.io, and nodemon from the npm registry.
# Idempotent and non-interactive; fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

pkgs="fuse3 gcc libc6-dev pkg-config"
[ $want_test = 1 ] && pkgs="$pkgs git sqlite3 vim-nox tar attr psmisc procps coreutils util-linux openssh-server openssh-client"

missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "kmount: installing Debian packages:$missing" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Rust: kmount needs 1.88 or later (Cargo.toml rust-version). A machine without it (or with an
# older distribution cargo) gets rustup's stable toolchain in ~/.cargo, as rustup.rs installs it.
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
rust_ok() {
  command -v cargo >/dev/null && command -v rustc >/dev/null || return 1
  local v; v=$(rustc --version | awk '{print $2}')
  [ "$(printf '%s\n1.88.0\n' "$v" | sort -V | head -1)" = 1.88.0 ]
}
if ! rust_ok; then
  echo "kmount: Rust 1.88 or later is needed ($(rustc --version 2>/dev/null || echo 'no rustc')); installing the stable toolchain with rustup into ~/.cargo" >&2
  if ! command -v curl >/dev/null; then
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends curl ca-certificates >/dev/null
  fi
  if ! curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy >&2; then
    echo "kmount: could not install Rust with rustup (https://rustup.rs); install Rust 1.88 or later, then run this again" >&2
    exit 1
  fi
  . "$HOME/.cargo/env"
  rust_ok || { echo "kmount: rustup ran, but $(rustc --version) is still older than 1.88" >&2; exit 1; }
fi

# nodemon (npm registry) for tests/tests/watch.rs, into target/npm (found there by the test, or
# through KMOUNT_NODEMON); Node.js from Debian when the machine has none.
if [ $want_test = 1 ]; then
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
    echo "kmount: installing Debian packages: nodejs npm" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  if [ ! -x target/npm/node_modules/.bin/nodemon ]; then
    echo "kmount: installing nodemon@3 into target/npm" >&2
    mkdir -p target/npm
    npm install --prefix target/npm --no-audit --no-fund --silent nodemon@3 >/dev/null
  fi
fi

if [ $want_test = 1 ] && [ -x scripts/posix/install.sh ]; then
  scripts/posix/install.sh
fi
