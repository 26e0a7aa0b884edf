#!/usr/bin/env bash
# containerd-run.sh OCI_DIR TAG CMD [ARG...]
#
# The ordinary (non-lazy) path for an image stored in an OCI layout: imports it into a
# private containerd, which unpacks every layer with its overlayfs snapshotter and checks
# each layer's DiffID against the config, then runs CMD in a container with runc and prints
# its output. Everything is removed on exit.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -ge 3 ] || { echo "usage: $0 OCI_DIR TAG CMD [ARG...]" >&2; exit 2; }
layout=$1; tag=$2; shift 2
need containerd containerd
need runc runc
[ -f "$layout/index.json" ] || die "$layout is not an OCI layout"

work=$(mktemp -d /tmp/esgz-run.XXXXXX)
cleanup() {
    bash "$SCRIPTS_DIR/containerd.sh" stop "$work/c" --rm || true
    rm -rf "$work"
}
trap cleanup EXIT
tar -cf "$work/image.tar" -C "$layout" oci-layout index.json blobs
bash "$SCRIPTS_DIR/containerd.sh" start "$work/c" >&2
sock="$work/c/containerd.sock"
ns=estargz-run
name=docker.io/library/estargz-run
ctr -a "$sock" -n "$ns" images import --base-name "$name" "$work/image.tar" >&2
ctr -a "$sock" -n "$ns" run --rm "$name:$tag" "esgz-run-$$" "$@"
