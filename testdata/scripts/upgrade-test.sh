#!/usr/bin/env bash
# Upgrade test: an older estargz-snapshotter (REV, default the last release of protocol 0)
# mounts a lazy layer and a reader starts reading it; this build's daemon replaces the old
# daemon while the old FUSE manager keeps serving, then the node switches managers.
#
#   bash testdata/scripts/upgrade-test.sh [REV]      (make upgrade-test [UPGRADE_FROM=REV])
#
# Builds REV from this repository's history in a worktree, with its own target directory
# (target/upgrade-from; ~4 min the first time on 2 cores), then runs the ignored test
# `an_upgraded_daemon_keeps_an_older_manager_serving_running_containers`. Needs root.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

rev=${1:-68ec092}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
git rev-parse --verify -q "$rev^{commit}" >/dev/null \
    || die "revision $rev is not in this repository (a shallow clone? git fetch --unshallow)"
src=$(mktemp -d /var/tmp/esgz-upgrade.XXXXXX)
cleanup() { git worktree remove --force "$src" >/dev/null 2>&1 || rm -rf "$src"; }
trap cleanup EXIT
git worktree add --detach "$src" "$rev" >/dev/null
log "building estargz-snapshotter at $rev"
(cd "$src" && CARGO_TARGET_DIR="$repo/target/upgrade-from" ${CARGO:-cargo} build --release -q -p estargz-snapshotter)
OLD_SNAPSHOTTER_BIN="$repo/target/upgrade-from/release/estargz-snapshotter" \
    ${CARGO:-cargo} test -p estargz-snapshotter --test service -- --ignored --exact \
    an_upgraded_daemon_keeps_an_older_manager_serving_running_containers
echo "ok - upgrade from $rev: running readers kept, the old manager served until switched"
