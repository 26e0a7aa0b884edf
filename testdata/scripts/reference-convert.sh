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
cleanup() {
    bash "$SCRIPTS_DIR/containerd.sh" stop "$work/c" --rm || true
    rm -rf "$work"
}
trap cleanup EXIT

layout="$work/layout"
mkdir -p "$layout/blobs/sha256"
put_blob() { # put_blob FILE -> prints "digest size"
    local d s
    d=$(sha256sum "$1" | cut -d' ' -f1)
    s=$(stat -c %s "$1")
    mv "$1" "$layout/blobs/sha256/$d"
    echo "sha256:$d $s"
}
layers=""; diffs=""
for t in "$@"; do
    [ -f "$t" ] || die "layer $t does not exist"
    diffs="$diffs${diffs:+,}\"sha256:$(sha256sum "$t" | cut -d' ' -f1)\""
    gzip -n -c "$t" > "$work/layer.gz"
    read -r d s < <(put_blob "$work/layer.gz")
    layers="$layers${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"$d\",\"size\":$s}"
done
printf '{"architecture":"%s","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
    "$(host_arch)" "$diffs" > "$work/config.json"
read -r cd cs < <(put_blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[%s]}' \
    "$cd" "$cs" "$layers" > "$work/manifest.json"
read -r md ms < <(put_blob "$work/manifest.json")
src=docker.io/library/estargz-interop:src
dst=docker.io/library/estargz-interop:esgz
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"src"}}]}' \
    "$md" "$ms" "$src" > "$layout/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
tar -cf "$work/image.tar" -C "$layout" .

bash "$SCRIPTS_DIR/containerd.sh" start "$work/c"
sock="$work/c/containerd.sock"
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
