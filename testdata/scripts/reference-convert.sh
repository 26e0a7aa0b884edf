#!/usr/bin/env bash
# reference-convert.sh OUT_OCI_DIR LAYER_TAR [LAYER_TAR...]
#
# Runs the REFERENCE converter on an image made of the given layer tars: builds an OCI image
# (gzip layers, config with diff_ids, host platform), imports it into a private containerd,
# converts it with `ctr-remote image convert --estargz --oci`, and exports the result as an
# OCI image layout into OUT_OCI_DIR (tag "esgz"). Everything else is removed on exit.
#
# EXTRA_CONVERT_ARGS is appended to the convert command, e.g.
#   EXTRA_CONVERT_ARGS="--estargz-chunk-size 65536 --estargz-compression-level 6"
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -ge 2 ] || { echo "usage: $0 OUT_OCI_DIR LAYER_TAR [LAYER_TAR...]" >&2; exit 2; }
out=$1; shift
need ctr-remote stargz-snapshotter
need containerd containerd
need sha256sum coreutils

work=$(mktemp -d /tmp/esgz-ref.XXXXXX)
start_private_containerd "$work"
src=docker.io/library/estargz-interop:src
dst=docker.io/library/estargz-interop:esgz
make_oci_image "$work/layout" src "$src" "$@" >/dev/null
tar -cf "$work/image.tar" -C "$work/layout" oci-layout index.json blobs
ns=estargz-interop
ctr -a "$sock" -n "$ns" images import --no-unpack "$work/image.tar" >/dev/null
start=$(date +%s.%N)
# shellcheck disable=SC2086
ctr-remote -a "$sock" -n "$ns" image convert --estargz --oci ${EXTRA_CONVERT_ARGS:-} "$src" "$dst" >&2
end=$(date +%s.%N)
ctr -a "$sock" -n "$ns" images export "$work/out.tar" "$dst"
rm -rf "$out"
mkdir -p "$out"
tar -xf "$work/out.tar" -C "$out"
# Tag the converted image "esgz" for readers of the layout.
python3 - "$out/index.json" <<'PY'
import json, sys
p = sys.argv[1]
idx = json.load(open(p))
for m in idx["manifests"]:
    m.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = "esgz"
json.dump(idx, open(p, "w"))
PY
log "reference conversion took $(echo "$end - $start" | bc 2>/dev/null || echo "?") s; layout in $out"
