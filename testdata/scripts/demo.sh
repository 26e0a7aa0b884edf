#!/usr/bin/env bash
# demo.sh: lazy pulling, end to end, on this machine (root).
#
# Builds a real Debian image with python3 (dpkg -x), pushes it to a local registry, converts
# it with `estargz convert` (python's start-up files prioritized), starts a private
# containerd with estargz-snapshotter as its `estargz` proxy snapshotter, then runs
# `python3 -c ...` in a container twice and prints both times and the bytes each fetched:
#   lazily:      ctr-remote images rpull --snapshotter estargz, then ctr run
#   ordinarily:  ctr images pull (containerd's overlayfs snapshotter unpacks it all), ctr run
# Everything it starts is stopped and removed on exit.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

bash "$SCRIPTS_DIR/install-deps.sh" >&2
need skopeo skopeo
need ctr-remote stargz-snapshotter
log "building estargz and estargz-snapshotter (release)"
(cd "$REPO_DIR" && cargo build --release -q -p estargz-cli -p estargz-snapshotter)
E="$REPO_DIR/target/release/estargz"
export SNAPSHOTTER="$REPO_DIR/target/release/estargz-snapshotter"

work=$(mktemp -d /tmp/estargz-demo.XXXXXX)
S="$work/s"
cleanup() {
    bash "$SCRIPTS_DIR/snapshotter.sh" stop "$S" >/dev/null 2>&1 || true
    bash "$SCRIPTS_DIR/registry.sh" stop "$work/reg" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

log "building a Debian image with python3 from real packages"
bash "$SCRIPTS_DIR/rootfs.sh" "$work/rootfs.tar" >&2
lsz=$(make_oci_image "$work/image" orig "" "$work/rootfs.tar")
addr=$(REGISTRY_LOG_LEVEL=info bash "$SCRIPTS_DIR/registry.sh" start "$work/reg")
log "local registry on $addr"
skopeo copy -q --dest-tls-verify=false "oci:$work/image:orig" "docker://$addr/demo:orig"

log "converting with estargz convert (python start-up files prioritized)"
"$E" convert "$addr/demo:orig" "$addr/demo:esgz" --prioritize "$REPO_DIR/testdata/python-startup.txt" --quiet >&2

log "starting containerd with estargz-snapshotter (background fetch off: count what start-up needs)"
bash "$SCRIPTS_DIR/snapshotter.sh" start "$S" '[fetch]
background = false' >/dev/null
sock="$S/c/containerd.sock"
served() { grep 'msg="response completed"' "$work/reg/registry.log" | grep -o 'http.response.written=[0-9]*' | awk -F= '{s+=$2} END {print s+0}'; }
now() { date +%s.%N; }
cmd='print("hello from python in a container")'

log "lazy: rpull with the estargz snapshotter, run python"
b0=$(served); t0=$(now)
ctr-remote -a "$sock" -n demo-lazy images rpull --plain-http --snapshotter estargz "$addr/demo:esgz" >/dev/null
lazy_out=$(ctr -a "$sock" -n demo-lazy run --rm --snapshotter estargz "$addr/demo:esgz" lazy /usr/bin/python3.11 -c "$cmd")
t1=$(now); b1=$(served)

log "ordinary: pull and unpack with containerd's overlayfs snapshotter, run python"
t2=$(now)
ctr -a "$sock" -n demo-plain images pull --plain-http "$addr/demo:orig" >/dev/null
full_out=$(ctr -a "$sock" -n demo-plain run --rm "$addr/demo:orig" plain /usr/bin/python3.11 -c "$cmd")
t3=$(now); b2=$(served)

echo
echo "lazy:     $lazy_out"
echo "ordinary: $full_out"
python3 - "$t0" "$t1" "$t2" "$t3" "$((b1 - b0))" "$((b2 - b1))" "$lsz" "$(stat -c %s "$work/rootfs.tar")" <<'PY'
import sys
t0, t1, t2, t3 = map(float, sys.argv[1:5])
lazy_b, full_b, gz, raw = map(int, sys.argv[5:9])
print()
print(f"{'':34}{'pull + run':>12}{'registry bytes':>18}")
print(f"{'lazy (estargz-snapshotter)':34}{t1 - t0:>11.2f}s{lazy_b:>18,}")
print(f"{'ordinary (overlayfs, full unpack)':34}{t3 - t2:>11.2f}s{full_b:>18,}")
print(f"\nimage: {gz:,} B compressed, {raw:,} B unpacked; loopback registry. On a real network")
print("the difference grows with image size and latency; see BENCHMARKS.md.")
PY
