#!/usr/bin/env bash
# Installs everything `make test` needs on a fresh Debian bookworm machine (as root):
# Debian packages for the system tests and the Rust components for lint and format.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

apt_install ca-certificates tar gzip xz-utils python3 attr openssl curl \
    containerd runc stargz-snapshotter docker-registry skopeo umoci fuse3 python3-yaml \
    gpgv debian-archive-keyring
for tool in containerd ctr ctr-remote runc; do
    command -v "$tool" >/dev/null || die "$tool is missing after installing packages"
done
if command -v rustup >/dev/null; then
    for c in clippy rustfmt; do
        rustup component list --installed 2>/dev/null | grep "^$c" >/dev/null || rustup component add "$c"
    done
fi
command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup (https://rustup.rs)"
cargo clippy --version >/dev/null 2>&1 || die "cargo clippy is missing: rustup component add clippy"
cargo fmt --version >/dev/null 2>&1 || die "cargo fmt is missing: rustup component add rustfmt"
log "test dependencies present"
