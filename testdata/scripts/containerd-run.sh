#!/usr/bin/env bash
# containerd-run.sh OCI_DIR TAG CMD [ARG...]
# containerd-run.sh --pull REF CMD [ARG...]
#
# The ordinary (non-lazy) path: imports an image from an OCI layout, or pulls REF from a
# registry (plain HTTP), into a private containerd, which unpacks every layer with its
# overlayfs snapshotter and checks each layer's DiffID against the config; then runs CMD in
# a container with runc and prints its output. Everything is removed on exit.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -ge 3 ] || { echo "usage: $0 OCI_DIR TAG CMD [ARG...] | $0 --pull REF CMD [ARG...]" >&2; exit 2; }
need containerd containerd
need runc runc
pull=""
if [ "$1" = "--pull" ]; then
    pull=$2; shift 2
else
    layout=$1; tag=$2; shift 2
    [ -f "$layout/index.json" ] || die "$layout is not an OCI layout"
fi

work=$(mktemp -d /tmp/esgz-run.XXXXXX)
start_private_containerd "$work"
ns=estargz-run
if [ -n "$pull" ]; then
    ctr -a "$sock" -n "$ns" images pull --plain-http "$pull" >&2
    image=$pull
else
    tar -cf "$work/image.tar" -C "$layout" oci-layout index.json blobs
    name=docker.io/library/estargz-run
    ctr -a "$sock" -n "$ns" images import --base-name "$name" "$work/image.tar" >&2
    image=$name:$tag
fi
ctr -a "$sock" -n "$ns" run --rm "$image" "esgz-run-$$" "$@"
