#!/usr/bin/env bash
# benches/convert.sh [SAMPLES]
#
# Conversion speed and size, ours vs the reference, on the same real images (python and
# gcc, as in the time-to-ready benchmark) in one run:
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

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
timed() { # timed OUTFILE CMD...: appends "wall cpu" to OUTFILE
    local out=$1; shift
    /usr/bin/time -f "%e %U %S" -o "$work/t" "$@" >/dev/null
    awk '{printf "%s %.2f\n", $1, $2 + $3}' "$work/t" >> "$out"
}
layer_size() { # layer_size REPO TAG: size of the first layer of the pushed manifest
    curl -s -H "Accept: application/vnd.oci.image.manifest.v1+json" "http://$addr/v2/$1/manifests/$2" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["size"])'
}
col() { awk -v c="$2" '{print $c}' "$1" | median; }

addr=$(bash "$SCRIPTS/registry.sh" start "$work/reg")
rows=()
inputs=()
# The images of the time-to-ready benchmark (benches/benchlib.py): python, and gcc.
for image in python gcc; do
    packages=$(cd "$(dirname "$0")" && python3 -c "from benchlib import IMAGES; print(IMAGES['$image'] or '')")
    ROOTFS_PACKAGES="$packages" bash "$SCRIPTS/rootfs.sh" "$work/$image.tar" >&2
    gzip -n -6 -c "$work/$image.tar" > "$work/$image.tar.gz"
    # A one-layer OCI image of the rootfs (the same gzip -6 layer), pushed to a local registry.
    make_oci_image "$work/layout-$image" orig "" "$work/$image.tar" >/dev/null
    skopeo copy -q --dest-tls-verify=false "oci:$work/layout-$image:orig" "docker://$addr/$image:orig"
    inputs+=("$image: $(stat -c %s "$work/$image.tar") bytes as tar, $(stat -c %s "$work/$image.tar.gz") as tar.gz (gzip -6)")

    : > "$work/t2"; : > "$work/t1"; : > "$work/reg-ours"; : > "$work/ref"
    for i in $(seq 1 "$samples"); do
        log "$image: sample $i/$samples"
        timed "$work/t2" "$E" layer convert "$work/$image.tar.gz" "$work/out2.esgz" --threads 2 --quiet
        timed "$work/t1" "$E" layer convert "$work/$image.tar.gz" "$work/out1.esgz" --threads 1 --quiet
        cmp -s "$work/out1.esgz" "$work/out2.esgz" || die "1 and 2 threads gave different bytes"
        timed "$work/reg-ours" "$E" convert "$addr/$image:orig" "$addr/$image:ours-$i" --quiet
        bash "$SCRIPTS/reference-convert-registry.sh" "$addr/$image:orig" "$addr/$image:ref-$i" 2>/dev/null >> "$work/ref"
    done
    ours_size=$(stat -c %s "$work/out2.esgz")
    rows+=("| $image | estargz layer convert --threads 2 | convert one layer | $(col "$work/t2" 1) | $(col "$work/t2" 2) | $ours_size | $samples |")
    rows+=("| $image | estargz layer convert --threads 1 | convert one layer | $(col "$work/t1" 1) | $(col "$work/t1" 2) | $ours_size | $samples |")
    rows+=("| $image | estargz convert (registry to registry) | pull + convert + push | $(col "$work/reg-ours" 1) | $(col "$work/reg-ours" 2) | $(layer_size "$image" ours-1) | $samples |")
    rows+=("| $image | ctr-remote image convert --estargz --oci | convert only (content in containerd) | $(median < "$work/ref") | n/a | $(layer_size "$image" ref-1) | $samples |")
done

echo
for line in "${inputs[@]}"; do echo "Input $line."; done
echo "Date $(date -u +%F); $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)."
echo "Command: bash benches/convert.sh $samples"
echo
echo "| image | tool | what is timed | median wall s | median CPU s | output layer bytes | samples |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
