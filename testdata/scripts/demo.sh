#!/usr/bin/env bash
# demo.sh: lazy pulling, end to end, on this machine (root).
#
# Builds a real Debian image with python3 (dpkg -x), pushes it to a local registry, converts
# it with `estargz convert` (python's start-up files prioritized), then starts
# `python3 -c ...` twice and prints both times and the bytes each needed:
#   lazily:      `estargz mount` (layers through FUSE, fetched on demand) + chroot
#   ordinarily:  pull the whole image, unpack it, chroot
# Until the snapshotter daemon lands, `estargz mount` stands in for containerd's lazy pull.
# Everything it starts is stopped and removed on exit.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

bash "$SCRIPTS_DIR/install-deps.sh" >&2
need skopeo skopeo
need chroot coreutils
log "building the estargz CLI (release)"
(cd "$REPO_DIR" && cargo build --release -q -p estargz-cli)
E="$REPO_DIR/target/release/estargz"

work=$(mktemp -d /tmp/estargz-demo.XXXXXX)
mount_pid=""
cleanup() {
    if [ -n "$mount_pid" ]; then
        kill -TERM "$mount_pid" 2>/dev/null || true
        wait "$mount_pid" 2>/dev/null || true
    fi
    umount -l "$work/lazy" 2>/dev/null || true
    bash "$SCRIPTS_DIR/registry.sh" stop "$work/reg" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

log "building a Debian image with python3 from real packages"
bash "$SCRIPTS_DIR/rootfs.sh" "$work/rootfs.tar" >&2
layout="$work/image"
lsz=$(make_oci_image "$layout" orig "" "$work/rootfs.tar")
addr=$(bash "$SCRIPTS_DIR/registry.sh" start "$work/reg")
log "local registry on $addr"
skopeo copy -q --dest-tls-verify=false "oci:$layout:orig" "docker://$addr/demo:orig"

log "converting with estargz convert (python start-up files prioritized)"
"$E" convert "$addr/demo:orig" "$addr/demo:esgz" --prioritize "$REPO_DIR/testdata/python-startup.txt" --quiet >&2
esgz_size=$("$E" convert "$addr/demo:esgz" "oci:$work/check:x" --json | python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')

cmd='print("hello from python in a lazily pulled image")'
now() { date +%s.%N; }

log "lazy start: mount, then run python"
t0=$(now)
"$E" mount "$addr/demo:esgz" "$work/lazy" --cache-dir "$work/cache" --no-background-fetch --quiet 2>"$work/mount.log" &
mount_pid=$!
for _ in $(seq 1 600); do
    [ -x "$work/lazy/usr/bin/python3.11" ] && break
    kill -0 "$mount_pid" 2>/dev/null || { cat "$work/mount.log" >&2; die "estargz mount failed"; }
    sleep 0.05
done
lazy_out=$(chroot "$work/lazy" /usr/bin/python3.11 -c "$cmd")
t1=$(now)
lazy_bytes=$(du -sb "$work/cache/chunks" | cut -f1)

log "ordinary start: pull everything, unpack, run python"
t2=$(now)
skopeo copy -q --src-tls-verify=false "docker://$addr/demo:orig" "oci:$work/pulled:orig"
mkdir -p "$work/full"
blob=$(python3 -c 'import json,sys; idx=json.load(open(sys.argv[1]+"/index.json")); m=json.load(open(sys.argv[1]+"/blobs/sha256/"+idx["manifests"][0]["digest"].split(":")[1])); print(m["layers"][0]["digest"].split(":")[1])' "$work/pulled")
tar -xzf "$work/pulled/blobs/sha256/$blob" -C "$work/full"
full_out=$(chroot "$work/full" /usr/bin/python3.11 -c "$cmd")
t3=$(now)

echo
echo "lazy:     $lazy_out"
echo "ordinary: $full_out"
python3 - "$t0" "$t1" "$t2" "$t3" "$lazy_bytes" "$lsz" "$esgz_size" "$(stat -c %s "$work/rootfs.tar")" <<'PY'
import sys
t0, t1, t2, t3 = map(float, sys.argv[1:5])
lazy_bytes, gz, esgz, raw = map(int, sys.argv[5:9])
print()
print(f"{'':28}{'time to hello':>15}{'image data':>30}")
print(f"{'lazy (estargz mount)':28}{t1 - t0:>14.2f}s{lazy_bytes:>18,} B of {raw:,} B fetched (uncompressed)")
print(f"{'ordinary pull + unpack':28}{t3 - t2:>14.2f}s{gz:>18,} B downloaded, all unpacked")
print(f"\neStargz image: {esgz:,} B; original: {gz:,} B. Loopback registry: on a real network the")
print("difference grows with image size and shrinks with bandwidth; see BENCHMARKS.md.")
PY
