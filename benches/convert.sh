#!/usr/bin/env bash
# benches/convert.sh [SAMPLES]
#
# Conversion speed and size, ours vs the reference, on the same real image in one run:
#   - `estargz layer convert` on the image's gzip layer (2 threads and 1 thread; the output
#     must be byte-identical),
#   - `estargz convert` registry to registry (pull + convert + push, loopback registry),
#   - `ctr-remote image convert --estargz --oci` (the convert step only, timed inside
#     reference-convert-registry.sh, content already in containerd).
# Prints a Markdown table (medians of SAMPLES runs, default 3).
set -euo pipefail
SCRIPTS="$(cd "$(dirname "$0")/../testdata/scripts" && pwd)"
. "$SCRIPTS/lib.sh"
samples=${1:-3}
need /usr/bin/time time
need skopeo skopeo
need ctr-remote stargz-snapshotter

work=$(mktemp -d /tmp/esgz-bench.XXXXXX)
cleanup() {
    bash "$SCRIPTS/registry.sh" stop "$work/reg" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

log "building the release CLI"
(cd "$REPO_DIR" && cargo build --release -q -p estargz-cli)
E="$REPO_DIR/target/release/estargz"

bash "$SCRIPTS/rootfs.sh" "$work/rootfs.tar" >&2
gzip -n -6 -c "$work/rootfs.tar" > "$work/layer.tar.gz"

# A one-layer OCI image of the rootfs (the same gzip -6 layer), pushed to a local registry.
layout="$work/src"
make_oci_image "$layout" orig "" "$work/rootfs.tar" >/dev/null
addr=$(bash "$SCRIPTS/registry.sh" start "$work/reg")
skopeo copy -q --dest-tls-verify=false "oci:$layout:orig" "docker://$addr/bench:orig"

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
timed() { # timed OUTFILE CMD...: appends "wall cpu" to OUTFILE
    local out=$1; shift
    /usr/bin/time -f "%e %U %S" -o "$work/t" "$@" >/dev/null
    awk '{printf "%s %.2f\n", $1, $2 + $3}' "$work/t" >> "$out"
}
layer_size() { # layer_size TAG: size of the first layer of the pushed manifest
    curl -s -H "Accept: application/vnd.oci.image.manifest.v1+json" "http://$addr/v2/bench/manifests/$1" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["size"])'
}

: > "$work/t2"; : > "$work/t1"; : > "$work/reg-ours"; : > "$work/ref"
for i in $(seq 1 "$samples"); do
    log "sample $i/$samples"
    timed "$work/t2" "$E" layer convert "$work/layer.tar.gz" "$work/out2.esgz" --threads 2 --quiet
    timed "$work/t1" "$E" layer convert "$work/layer.tar.gz" "$work/out1.esgz" --threads 1 --quiet
    cmp -s "$work/out1.esgz" "$work/out2.esgz" || die "1 and 2 threads gave different bytes"
    timed "$work/reg-ours" "$E" convert "$addr/bench:orig" "$addr/bench:ours-$i" --quiet
    bash "$SCRIPTS/reference-convert-registry.sh" "$addr/bench:orig" "$addr/bench:ref-$i" 2>/dev/null >> "$work/ref"
done
ours_size=$(stat -c %s "$work/out2.esgz")
ref_size=$(layer_size ref-1)
reg_size=$(layer_size ours-1)

col() { awk -v c="$2" '{print $c}' "$1" | median; }
echo
echo "Input: real Debian rootfs, $(stat -c %s "$work/rootfs.tar") bytes as tar, $(stat -c %s "$work/layer.tar.gz") bytes as tar.gz (gzip -6)."
echo "Date $(date -u +%F); $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)."
echo "Command: bash benches/convert.sh $samples"
echo
echo "| tool | what is timed | median wall s | median CPU s | output layer bytes | samples |"
echo "|---|---|---|---|---|---|"
echo "| estargz layer convert --threads 2 | convert one layer | $(col "$work/t2" 1) | $(col "$work/t2" 2) | $ours_size | $samples |"
echo "| estargz layer convert --threads 1 | convert one layer | $(col "$work/t1" 1) | $(col "$work/t1" 2) | $ours_size | $samples |"
echo "| estargz convert (registry to registry) | pull + convert + push | $(col "$work/reg-ours" 1) | $(col "$work/reg-ours" 2) | $reg_size | $samples |"
echo "| ctr-remote image convert --estargz --oci | convert only (content in containerd) | $(median < "$work/ref") | n/a | $ref_size | $samples |"
