#!/usr/bin/env bash
# snapshotter-e2e.sh: estargz-snapshotter end to end, with a real containerd, registry and
# runc. Binaries: $SNAPSHOTTER and $ESTARGZ (default: target/release).
#
# Checks, each printed as "ok - ..." (any failure exits non-zero):
#  - an image converted by `estargz convert` and one converted by `ctr-remote` are pulled
#    with `ctr-remote images rpull`, and run; the registry serves far fewer bytes than
#    the image holds; python's interpreter and libraries are read ahead of the loader;
#    each TOC of our conversion comes in one request of the size its annotation gives;
#  - an image optimized by `estargz optimize` (python reading a file) lists the files read
#    before each layer's landmark, and is pulled with `ctr-remote images rpull` and run;
#  - a non-eStargz image, an image without TOC digest labels, and a plain `ctr pull`
#    fall back to ordinary pulls and run; the metrics give the reasons;
#  - a local user cannot reach the state directory or either socket (refused by peer
#    credentials even when the socket mode lets them connect); lazy layers are mounted
#    nosuid,nodev and a setuid binary still works through a container's overlayfs (its
#    libraries, in the layer below its own, are read ahead of the loader);
#  - ctr snapshots ls / info / usage work;
#  - SIGKILL of the daemon, restart: snapshots are all there, a container started before
#    the kill reads a file it never read, a new container starts;
#  - the metrics endpoint shows the fetches;
#  - removing the images lets containerd's GC remove every snapshot and unmount every
#    lazily mounted layer;
#  - pulled again with every file in the chunk cache (a container read them all before),
#    its layers are served without FUSE (EROFS metadata + overlayfs data-only lower
#    layers): a container reads, runs and writes its files; GC removes those mounts too.
set -euo pipefail
# With pipefail, never end a pipeline in `grep -q` or `head`: they exit at the first match and
# the writer (curl, ctr) fails with SIGPIPE or EPIPE, failing the check at random.
. "$(dirname "$0")/lib.sh"

need ctr-remote stargz-snapshotter
need runc runc
need skopeo skopeo
need curl curl
E=${ESTARGZ:-$REPO_DIR/target/release/estargz}
export SNAPSHOTTER=${SNAPSHOTTER:-$REPO_DIR/target/release/estargz-snapshotter}
[ -x "$E" ] || die "no estargz binary at $E"

work=$(mktemp -d /tmp/esgz-e2e.XXXXXX)
S="$work/s"
cleanup() {
    bash "$SCRIPTS_DIR/snapshotter.sh" stop "$S" >/dev/null 2>&1 || true
    bash "$SCRIPTS_DIR/registry.sh" stop "$work/reg" >/dev/null 2>&1 || true
    if grep -q " $work" /proc/self/mounts; then
        echo "error: mounts left under $work:" >&2
        grep " $work" /proc/self/mounts >&2
    fi
    if [ -n "${E2E_KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
ok() { echo "ok - $*"; }
# Namespaces of their own: runc keeps container state per namespace under /run/containerd.
for ns in lazy ref opt fallback notoc plain local; do eval "NS_$ns=e2e-$ns-$$"; done

log "building a Debian image with python3, plus a layer with a 3 MB file"
bash "$SCRIPTS_DIR/rootfs.sh" "$work/rootfs.tar" >&2
mkdir -p "$work/l2/srv"
echo "from the second layer" > "$work/l2/srv/hello.txt"
head -c 3000000 /dev/urandom > "$work/l2/srv/big.bin"
# A setuid-root copy of the image's own `id`: containers must keep setuid semantics.
mkdir -p "$work/idx"
tar -xf "$work/rootfs.tar" -C "$work/idx" --wildcards '*usr/bin/id'
cp "$(find "$work/idx" -path '*usr/bin/id' | head -n 1)" "$work/l2/srv/suid-id"
chmod 4755 "$work/l2/srv/suid-id"
big_sum=$(sha256sum "$work/l2/srv/big.bin" | cut -d' ' -f1)
tar -C "$work/l2" -cf "$work/l2.tar" srv
make_oci_image "$work/image" orig "" "$work/rootfs.tar" "$work/l2.tar" >/dev/null
addr=$(REGISTRY_LOG_LEVEL=info bash "$SCRIPTS_DIR/registry.sh" start "$work/reg")
skopeo copy -q --dest-tls-verify=false "oci:$work/image:orig" "docker://$addr/e2e:orig"

log "converting with estargz convert and with ctr-remote"
"$E" convert "$addr/e2e:orig" "$addr/e2e:ours" --quiet >&2
bash "$SCRIPTS_DIR/reference-convert-registry.sh" "$addr/e2e:orig" "$addr/e2e:ref" >/dev/null
# Another conversion (other chunk size: other layers) without its TOC digest annotations.
"$E" convert "$addr/e2e:orig" "$addr/e2e:other" --chunk-size 1048576 --quiet >&2
python3 - "$addr" <<'PY'
import json, sys, urllib.request
addr = sys.argv[1]
accept = "application/vnd.oci.image.manifest.v1+json"
req = urllib.request.Request(f"http://{addr}/v2/e2e/manifests/other", headers={"Accept": accept})
m = json.load(urllib.request.urlopen(req))
for layer in m["layers"]:
    layer.pop("annotations", None)
body = json.dumps(m).encode()
put = urllib.request.Request(f"http://{addr}/v2/e2e/manifests/notoc", data=body, method="PUT",
                             headers={"Content-Type": accept})
urllib.request.urlopen(put)
PY
ours_manifest=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$addr/v2/e2e/manifests/ours")
image_size=$(echo "$ours_manifest" | python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')

metrics=$(bash "$SCRIPTS_DIR/snapshotter.sh" start "$S" '[fetch]
background = false')
sock="$S/c/containerd.sock"
served() { grep 'msg="response completed"' "$work/reg/registry.log" | grep -o 'http.response.written=[0-9]*' | awk -F= '{s+=$2} END {print s+0}'; }
c() { ctr -a "$sock" "$@"; }
metric() { curl -sf "http://$metrics/metrics" | awk -v n="$1" '$1 == n {print $2}'; }
metric_sum() { curl -sf "http://$metrics/metrics" | awk -v n="$1" 'index($1, n"{") == 1 {s += $2} END {print s+0}'; }
run_in() { # run_in NS IMAGE CMD...: runs a container and prints its output
    local ns=$1 image=$2; shift 2
    c -n "$ns" run --rm --snapshotter estargz "$image" "t-$ns-$RANDOM" "$@"
}
fuse_mounts() { grep -c " $S/root/snapshots/[0-9]*/fs fuse" /proc/self/mounts || true; }
erofs_mounts() { grep -c " $S/root/snapshots/[0-9]*/local/[^ ]*/mnt erofs" /proc/self/mounts || true; }

log "lazy pull of our conversion"
before=$(served)
reg_lines=$(wc -l < "$work/reg/registry.log")
ctr-remote -a "$sock" -n "$NS_lazy" images rpull --plain-http --snapshotter estargz "$addr/e2e:ours" >&2
# containerd passed each layer's TOC sizes annotation to Prepare: every TOC came in one
# request of exactly its size, none in the 64 KiB first request made without a size.
toc_sizes=$(echo "$ours_manifest" | python3 -c 'import json,sys; a=json.load(sys.stdin)["layers"][0]["annotations"]; print(" ".join(e.rsplit("=",1)[1] for e in a["containerd.io/snapshot/estargz/toc.sizes"].split(",")))')
written=" $(tail -n +$((reg_lines + 1)) "$work/reg/registry.log" | grep 'msg="response completed"' | grep -o 'http.response.written=[0-9]*' | cut -d= -f2 | tr '\n' ' ')"
for n in $toc_sizes; do
    case "$written" in *" $n "*) ;; *) die "no response of the annotated TOC size $n during the pull (responses:$written)" ;; esac
done
case "$written" in *" 65536 "*) die "a TOC was fetched without its annotated size (responses:$written)" ;; esac
out=$(run_in "$NS_lazy" "$addr/e2e:ours" /usr/bin/python3.11 -c 'print("hello from python")')
[ "$out" = "hello from python" ] || die "python printed: $out"
out=$(run_in "$NS_lazy" "$addr/e2e:ours" /bin/cat /srv/hello.txt)
[ "$out" = "from the second layer" ] || die "cat printed: $out"
lazy_bytes=$(( $(served) - before ))
[ "$(metric estargz_remote_layers_total)" -ge 2 ] || die "no layer was mounted lazily: $(tail -n 20 "$S/snapshotter.log")"
[ "$lazy_bytes" -lt $(( image_size / 2 )) ] || die "lazy pull and run fetched $lazy_bytes of $image_size bytes"
deps=$(metric_sum estargz_layer_dependency_files_total)
[ "$deps" -ge 2 ] || die "python's interpreter and libraries were not read ahead of the loader ($deps)"
ok "estargz convert image: rpull (each TOC in one request of its annotated size) + run python, registry served $lazy_bytes of $image_size bytes, $deps libraries read ahead"

log "a local user against the daemon"
# The test's own directories are opened up so that only the daemon's protections count.
chmod 755 "$work" "$S"
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
connects() { # connects SOCKET: exit 0 if the server answers a connection with anything but EOF
    python3 - "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n{"op":"status"}\n')
try:
    data = s.recv(1)
except (ConnectionResetError, socket.timeout):
    data = b''
sys.exit(0 if data else 1)
PY
}
[ "$(stat -c %a "$S/root")" = 700 ] || die "state directory is $(stat -c %a "$S/root"), not 700"
if as_nobody ls "$S/root" >/dev/null 2>&1; then die "a local user can list the state directory"; fi
[ "$(stat -c %a "$S/snap.sock")" = 600 ] || die "socket is $(stat -c %a "$S/snap.sock"), not 600"
if as_nobody python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$S/snap.sock" 2>/dev/null; then
    die "a local user can connect to the snapshotter socket"
fi
# Even handed an open socket (here: a mode opened up by hand), other users are refused.
connects "$S/snap.sock" || die "root cannot talk to the snapshotter socket"
chmod 666 "$S/snap.sock"
if as_nobody bash -c "$(declare -f connects); connects $S/snap.sock"; then
    die "the snapshotter answered a local user"
fi
chmod 600 "$S/snap.sock"
chmod 711 "$S/root"; chmod 666 "$S/root/fuse-manager.sock"
connects "$S/root/fuse-manager.sock" || die "root cannot talk to the FUSE manager"
if as_nobody bash -c "$(declare -f connects); connects $S/root/fuse-manager.sock"; then
    die "the FUSE manager answered a local user"
fi
chmod 600 "$S/root/fuse-manager.sock"; chmod 700 "$S/root"
lazy_opts=$(grep " $S/root/snapshots/[0-9]*/fs fuse" /proc/self/mounts | awk '{print $4}' | sort -u)
for o in $lazy_opts; do
    case ",$o," in *,nosuid,*nodev,*|*,nodev,*nosuid,*) ;; *) die "lazy layer mounted with $o";; esac
done
# Containers from ctr run with no_new_privs, so the kernel side is checked directly: the
# overlay containerd would mount for a container on the lazy layers, used by another user.
top=$(c -n "$NS_lazy" snapshots --snapshotter estargz ls | awk '$3 == "Committed" && !n++ {print $1}')
c -n "$NS_lazy" snapshots --snapshotter estargz prepare e2e-suid "$top" >&2
mkdir -p "$work/suid"
eval "$(c -n "$NS_lazy" snapshots --snapshotter estargz mounts "$work/suid" e2e-suid)"
deps=$(metric_sum estargz_layer_dependency_files_total)
euid=$(as_nobody "$work/suid/srv/suid-id" -u)
umount "$work/suid"
# The walk ends after the loader's last read of it: the counter may lag by a moment.
for _ in $(seq 1 50); do [ "$(metric_sum estargz_layer_dependency_files_total)" -gt "$deps" ] && break; sleep 0.1; done
[ "$(metric_sum estargz_layer_dependency_files_total)" -gt "$deps" ] \
    || die "the libraries of an executable of the second layer were not read ahead from the first"
c -n "$NS_lazy" snapshots --snapshotter estargz rm e2e-suid >&2
[ "$euid" = 0 ] || die "a setuid-root binary of a lazy layer ran through overlayfs with euid $euid"
ok "local user: state 0700, sockets 0600 and refused by credentials, lazy layers nosuid,nodev; setuid works through overlayfs"

log "lazy pull of the reference conversion"
before=$(served)
ctr-remote -a "$sock" -n "$NS_ref" images rpull --plain-http --snapshotter estargz "$addr/e2e:ref" >&2
out=$(run_in "$NS_ref" "$addr/e2e:ref" /usr/bin/python3.11 -c 'print("hello from python")')
[ "$out" = "hello from python" ] || die "python printed: $out"
ref_bytes=$(( $(served) - before ))
[ "$(metric estargz_remote_layers_total)" -ge 4 ] || die "the ctr-remote image was not mounted lazily"
[ "$ref_bytes" -lt $(( image_size / 2 )) ] || die "lazy pull of the ctr-remote image fetched $ref_bytes bytes"
ok "ctr-remote image: rpull + run python, registry served $ref_bytes bytes"

log "estargz optimize: record a python start in a container, rpull the result with ctr-remote, run it"
"$E" optimize "$addr/e2e:orig" "$addr/e2e:opt" --quiet --record-out "$work/opt.txt" \
    -- /usr/bin/python3.11 -c 'print(open("/srv/hello.txt").read().strip())' >&2
for f in usr/bin/python3.11 srv/hello.txt; do
    grep -qx "$f" "$work/opt.txt" || die "optimize did not record $f: $(cat "$work/opt.txt")"
done
! grep -qx srv/big.bin "$work/opt.txt" || die "optimize recorded a file python never read"
# Each layer of the result lists what was read from it before its landmark.
curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$addr/v2/e2e/manifests/opt" \
    | python3 -c 'import json,sys; print("\n".join(l["digest"] for l in json.load(sys.stdin)["layers"]))' > "$work/opt-layers"
[ "$(wc -l < "$work/opt-layers")" = 2 ] || die "the optimized image has $(wc -l < "$work/opt-layers") layers"
curl -sf -o "$work/opt-app.esgz" "http://$addr/v2/e2e/blobs/$(sed -n 2p "$work/opt-layers")"
"$E" inspect "$work/opt-app.esgz" > "$work/opt-app.txt"
grep -qx '  srv/hello.txt' "$work/opt-app.txt" || die "srv/hello.txt is not prioritized: $(cat "$work/opt-app.txt")"
! grep -qx '  srv/big.bin' "$work/opt-app.txt" || die "srv/big.bin is prioritized"
ctr-remote -a "$sock" -n "$NS_opt" images rpull --plain-http --snapshotter estargz "$addr/e2e:opt" >&2
out=$(run_in "$NS_opt" "$addr/e2e:opt" /usr/bin/python3.11 -c 'print(open("/srv/hello.txt").read().strip())')
[ "$out" = "from the second layer" ] || die "python printed: $out"
ok "estargz optimize: python's files recorded and prioritized per layer; ctr-remote rpull + run"

log "fallbacks"
ctr-remote -a "$sock" -n "$NS_fallback" images rpull --plain-http --snapshotter estargz "$addr/e2e:orig" >&2
out=$(run_in "$NS_fallback" "$addr/e2e:orig" /bin/cat /srv/hello.txt)
[ "$out" = "from the second layer" ] || die "cat printed: $out"
[ "$(curl -sf "http://$metrics/metrics" | grep -c 'estargz_fallbacks_total{reason="not_estargz"}')" = 1 ] || die "no not_estargz fallback counted"
ok "non-eStargz image falls back and runs"
ctr-remote -a "$sock" -n "$NS_notoc" images rpull --plain-http --snapshotter estargz "$addr/e2e:notoc" >&2
out=$(run_in "$NS_notoc" "$addr/e2e:notoc" /bin/cat /srv/hello.txt)
[ "$out" = "from the second layer" ] || die "cat printed: $out"
curl -sf "http://$metrics/metrics" | grep 'estargz_fallbacks_total{reason="no_toc_digest"}' >/dev/null || die "no no_toc_digest fallback counted"
ok "image without TOC digest labels falls back and runs"
c -n "$NS_plain" images pull --plain-http --snapshotter estargz "$addr/e2e:ours" >&2
out=$(run_in "$NS_plain" "$addr/e2e:ours" /bin/cat /srv/hello.txt)
[ "$out" = "from the second layer" ] || die "cat printed: $out"
ok "plain ctr pull works as an ordinary overlayfs snapshotter"

log "a container reads every file of the image (for the pull again at the end)"
# A container reads every file of the image: all of it is in the chunk cache then.
run_in "$NS_lazy" "$addr/e2e:ours" /usr/bin/python3.11 -c '
import os, stat
for top, dirs, files in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev", "run", "tmp")]
    for f in files:
        p = os.path.join(top, f)
        if stat.S_ISREG(os.lstat(p).st_mode):
            open(p, "rb").read()' >&2
[ "$(erofs_mounts)" = 0 ] || die "layers served without FUSE before their files were local"

log "snapshots"
list=$(c -n "$NS_lazy" snapshots --snapshotter estargz ls)
echo "$list" >&2
[ "$(echo "$list" | grep -c Committed)" -eq 2 ] || die "expected 2 committed snapshots in namespace lazy"
top=$(echo "$list" | awk '$3 == "Committed" && !n++ {print $1}')
[ -n "$top" ] || die "no committed snapshot with a parent"
c -n "$NS_lazy" snapshots --snapshotter estargz info "$top" | grep 'containerd.io/snapshot/remote' >/dev/null \
    || die "snapshot info lacks the remote label"
c -n "$NS_lazy" snapshots --snapshotter estargz usage >&2
c -n "$NS_lazy" snapshots --snapshotter estargz prepare e2e-scratch "$top" >&2
c -n "$NS_lazy" snapshots --snapshotter estargz rm e2e-scratch >&2
if c -n "$NS_lazy" snapshots --snapshotter estargz info e2e-scratch >/dev/null 2>&1; then
    die "ctr snapshots rm left e2e-scratch"
fi
ok "ctr snapshots ls / info / usage / prepare / rm"

log "SIGKILL and restart of the daemon with a container running"
c -n "$NS_lazy" run -d --snapshotter estargz "$addr/e2e:ours" keeper /bin/sleep 600 >&2
n_before=$(c -n "$NS_lazy" snapshots --snapshotter estargz ls | tail -n +2 | wc -l)
bash "$SCRIPTS_DIR/snapshotter.sh" kill "$S"
bash "$SCRIPTS_DIR/snapshotter.sh" restart "$S"
# containerd's connection to the plugin backs off after the kill; it reconnects within seconds.
for _ in $(seq 1 100); do c -n "$NS_lazy" snapshots --snapshotter estargz ls >/dev/null 2>&1 && break; sleep 0.2; done
n_after=$(c -n "$NS_lazy" snapshots --snapshotter estargz ls | tail -n +2 | wc -l)
[ "$n_before" = "$n_after" ] || die "snapshots before the kill: $n_before, after: $n_after"
got=$(c -n "$NS_lazy" task exec --exec-id read1 keeper /bin/sh -c 'sha256sum /srv/big.bin' | cut -d' ' -f1)
[ "$got" = "$big_sum" ] || die "after the restart the running container read $got, want $big_sum"
out=$(run_in "$NS_lazy" "$addr/e2e:ours" /usr/bin/python3.11 -c 'print("after restart")')
[ "$out" = "after restart" ] || die "python printed: $out"
ok "after SIGKILL + restart: $n_after snapshots, the running container read a new file, a new container ran"

fetched=$(metric_sum estargz_layer_fetched_bytes_total)
[ "$fetched" -gt 0 ] || die "metrics show no fetched bytes"
ok "metrics: $fetched bytes fetched by lazily mounted layers"

log "removal and garbage collection"
c -n "$NS_lazy" task kill -s KILL keeper >&2 || true
for _ in $(seq 1 50); do c -n "$NS_lazy" task ls | grep keeper >/dev/null || break; c -n "$NS_lazy" task delete keeper >/dev/null 2>&1 || true; sleep 0.1; done
c -n "$NS_lazy" containers rm keeper >&2
for ns in "$NS_lazy" "$NS_ref" "$NS_opt" "$NS_fallback" "$NS_notoc" "$NS_plain"; do
    for img in $(c -n "$ns" images ls -q); do c -n "$ns" images rm --sync "$img" >&2; done
done
for _ in $(seq 1 100); do
    left=0
    for ns in "$NS_lazy" "$NS_ref" "$NS_opt" "$NS_fallback" "$NS_notoc" "$NS_plain"; do
        left=$(( left + $(c -n "$ns" snapshots --snapshotter estargz ls | tail -n +2 | wc -l) ))
    done
    [ "$left" = 0 ] && [ "$(fuse_mounts)" = 0 ] && break
    sleep 0.1
done
[ "$left" = 0 ] || die "$left snapshots left after removing every image"
[ "$(fuse_mounts)" = 0 ] || die "lazily mounted layers left after GC: $(fuse_mounts)"
ok "image removal: GC removed every snapshot and unmounted every lazy layer"

log "the image pulled again on a node whose chunk cache holds all of it (read whole above)"
ctr-remote -a "$sock" -n "$NS_local" images rpull --plain-http --snapshotter estargz "$addr/e2e:ours" >&2
for _ in $(seq 1 100); do [ "$(erofs_mounts)" -ge 2 ] && break; sleep 0.1; done
[ "$(erofs_mounts)" -ge 2 ] || die "the layers pulled again are not served without FUSE: $(tail -n 20 "$S/snapshotter.log")"
[ "$(metric_sum estargz_layer_served_without_fuse)" -ge 2 ] || die "the metrics do not show the layers served without FUSE"
c -n "$NS_local" run -d --snapshotter estargz "$addr/e2e:ours" local1 /bin/sleep 600 >&2
overlays=$(grep -c "^overlay .*lowerdir=[^ ]*/local/[^ ]*/mnt:[^ ]*::[^ ]*metacopy=on" /proc/self/mounts || true)
[ "$overlays" -ge 1 ] || die "the container's overlay does not stack the local layers: $(grep ^overlay /proc/self/mounts)"
got=$(c -n "$NS_local" task exec --exec-id l1 local1 /bin/sh -c 'sha256sum /srv/big.bin' | cut -d' ' -f1)
[ "$got" = "$big_sum" ] || die "the container read $got from /srv/big.bin, want $big_sum"
out=$(c -n "$NS_local" task exec --exec-id l2 local1 /usr/bin/python3.11 -c 'print("local python")')
[ "$out" = "local python" ] || die "python printed: $out"
out=$(c -n "$NS_local" task exec --exec-id l3 local1 /bin/sh -c 'echo appended >> /srv/hello.txt && chmod 600 /srv/hello.txt && cat /srv/hello.txt')
[ "$out" = "$(printf 'from the second layer\nappended')" ] || die "after writing, /srv/hello.txt holds: $out"
c -n "$NS_local" task kill -s KILL local1 >&2 || true
for _ in $(seq 1 50); do c -n "$NS_local" task ls | grep local1 >/dev/null || break; c -n "$NS_local" task delete local1 >/dev/null 2>&1 || true; sleep 0.1; done
c -n "$NS_local" containers rm local1 >&2
for img in $(c -n "$NS_local" images ls -q); do c -n "$NS_local" images rm --sync "$img" >&2; done
for _ in $(seq 1 100); do
    left=$(c -n "$NS_local" snapshots --snapshotter estargz ls | tail -n +2 | wc -l)
    [ "$left" = 0 ] && [ "$(fuse_mounts)" = 0 ] && [ "$(erofs_mounts)" = 0 ] && break
    sleep 0.1
done
[ "$left" = 0 ] || die "$left snapshots left after removing the image"
[ "$(fuse_mounts)$(erofs_mounts)" = 00 ] || die "mounts left after GC: $(fuse_mounts) FUSE, $(erofs_mounts) EROFS"
ok "all local at mount: served without FUSE; a container read, ran and wrote its files; GC removed both mounts"
