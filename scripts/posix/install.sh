#!/usr/bin/env bash
# Installs the POSIX test suites used by scripts/posix/{pjdfstest,fsx}.sh:
#   - pjdfstest (Rust rewrite, crates.io) and fsx (fsx-rs, crates.io), pinned versions,
#     built with `cargo install --locked` into ~/.cargo/bin;
#   - the Debian packages they need: gcc and libc6-dev (cargo links with cc), libacl1-dev
#     (pjdfstest's exacl dependency links libacl), acl (getfacl/setfacl, listed by pjdfstest's
#     README), fuse3 (fusermount3, used to mount and unmount kmount);
#   - the dummy user/group `tests` that pjdfstest switches to (with `nobody`/`nogroup`).
#
# Idempotent: each step runs only when its result is missing. Non-interactive. Run as root
# on Debian 12. Exits non-zero, with a message on stderr, on the first error.
set -euo pipefail

PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2
DEBIAN_PACKAGES=(gcc libc6-dev libacl1-dev acl fuse3)

die() {
	echo "install.sh: error: $*" >&2
	exit 1
}
log() { echo "install.sh: $*"; }

[[ $(id -u) -eq 0 ]] || die "run as root (pjdfstest needs root, and apt-get/useradd are used)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu only"

export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null ||
	die "cargo not found: install a Rust toolchain (https://rustup.rs), then re-run"

# --- Debian packages -------------------------------------------------------------------------
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
		missing+=("$pkg")
	fi
done
if ((${#missing[@]})); then
	export DEBIAN_FRONTEND=noninteractive
	# Refresh the package lists only when one of the packages is unknown to apt, or when
	# installing from the current lists fails (stale lists name files the mirror dropped).
	updated=0
	for pkg in "${missing[@]}"; do
		if ! apt-cache show "$pkg" >/dev/null 2>&1; then
			log "apt-get update (package lists do not know $pkg)"
			apt-get update -q || die "apt-get update failed"
			updated=1
			break
		fi
	done
	log "apt-get install ${missing[*]}"
	if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
		((updated == 0)) || die "apt-get install ${missing[*]} failed"
		log "apt-get install failed; retrying after apt-get update"
		apt-get update -q || die "apt-get update failed"
		apt-get install -y -q --no-install-recommends "${missing[@]}" ||
			die "apt-get install ${missing[*]} failed"
	fi
else
	log "Debian packages present: ${DEBIAN_PACKAGES[*]}"
fi

# --- cargo crates ----------------------------------------------------------------------------
# `cargo install --list` prints "NAME vVERSION:" for each installed crate.
cargo_install() {
	local name=$1 version=$2
	if cargo install --list | grep -qx "$name v$version:"; then
		log "$name $version already installed"
		return
	fi
	log "cargo install --locked $name@$version"
	cargo install --locked "$name@$version" || die "cargo install $name@$version failed"
}
cargo_install pjdfstest "$PJDFSTEST_VERSION"
cargo_install fsx "$FSX_VERSION"

# --- pjdfstest dummy users -------------------------------------------------------------------
# tests/posix/pjdfstest.toml names ["nobody", "nogroup"] and ["tests", "tests"].
getent passwd nobody >/dev/null || die "user nobody is missing (it is part of base Debian)"
getent group nogroup >/dev/null || die "group nogroup is missing (it is part of base Debian)"
if ! getent group tests >/dev/null; then
	log "groupadd --system tests"
	groupadd --system tests || die "groupadd tests failed"
fi
if ! getent passwd tests >/dev/null; then
	log "useradd --system tests"
	useradd --system --gid tests --no-create-home --home-dir / \
		--shell /usr/sbin/nologin --comment "Dummy user for pjdfstest" tests ||
		die "useradd tests failed"
fi
[[ $(id -g tests) == $(getent group tests | cut -d: -f3) ]] ||
	die "user tests exists but its primary group is not 'tests'; pjdfstest needs it to be"

for tool in pjdfstest fsx; do
	command -v "$tool" >/dev/null || die "$tool not on PATH after install (expected in ~/.cargo/bin)"
done
log "ready: $(pjdfstest --version), $(fsx --version)"
