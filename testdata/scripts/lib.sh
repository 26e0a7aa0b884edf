# Shared helpers for the test scripts. Source it; do not run it.
# shellcheck shell=bash

die() { echo "error: $*" >&2; exit 1; }
log() { echo "==> $*" >&2; }

_apt_updated=0
# apt_install PKG...: installs Debian packages (as root) that are not installed yet.
apt_install() {
    local missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "packages missing (${missing[*]}) and not root: install them with apt-get install ${missing[*]}"
    if [ "$_apt_updated" -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        _apt_updated=1
    fi
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

# need CMD PKG: makes sure CMD exists, installing PKG if needed.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    apt_install "$2"
    command -v "$1" >/dev/null 2>&1 || die "$1 is still missing after installing $2"
}

# host_arch: the OCI architecture name of this machine.
host_arch() {
    case "$(uname -m)" in
        x86_64) echo amd64 ;;
        aarch64) echo arm64 ;;
        *) uname -m ;;
    esac
}

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPTS_DIR/../.." && pwd)"
CACHE_DIR="${ESTARGZ_TEST_CACHE:-$REPO_DIR/testdata/cache}"

# make_oci_image LAYOUT TAG IMAGE_NAME LAYER_TAR...: writes a single-platform (host) OCI
# image layout at LAYOUT whose layers are the given tars (gzip -6, no name or time), with
# rootfs.diff_ids, a /bin/sh command (IMAGE_RUN_CONFIG: the config's "config" object as
# JSON instead), and an index entry tagged TAG (and, when IMAGE_NAME
# is not empty, annotated io.containerd.image.name=IMAGE_NAME for `ctr images import`).
# Prints the gzip size of the last layer.
make_oci_image() {
    local layout=$1 tag=$2 name=$3
    shift 3
    local blobs="$layout/blobs/sha256" layers="" diffs="" d s last=0
    local run_config=${IMAGE_RUN_CONFIG:-'{"Cmd":["/bin/sh"]}'}
    mkdir -p "$blobs"
    _put() { # _put FILE: moves FILE into the layout; sets d (hex) and s (size)
        d=$(sha256sum "$1" | cut -d' ' -f1)
        s=$(stat -c %s "$1")
        mv "$1" "$blobs/$d"
    }
    for t in "$@"; do
        [ -f "$t" ] || die "layer $t does not exist"
        diffs="$diffs${diffs:+,}\"sha256:$(sha256sum "$t" | cut -d' ' -f1)\""
        gzip -n -6 -c "$t" > "$layout/.layer.tmp"
        _put "$layout/.layer.tmp"
        last=$s
        layers="$layers${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$d\",\"size\":$s}"
    done
    printf '{"architecture":"%s","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":[%s]}}' \
        "$(host_arch)" "$run_config" "$diffs" > "$layout/.config.tmp"
    _put "$layout/.config.tmp"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
        "$d" "$s" "$layers" > "$layout/.manifest.tmp"
    _put "$layout/.manifest.tmp"
    local ann="\"org.opencontainers.image.ref.name\":\"$tag\""
    [ -z "$name" ] || ann="\"io.containerd.image.name\":\"$name\",$ann"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{%s}}]}' \
        "$d" "$s" "$ann" > "$layout/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
    echo "$last"
}

# start_private_containerd WORK: starts a private containerd under WORK/c (stopped and
# removed, with WORK, by the EXIT trap this sets) and sets $sock to its socket.
start_private_containerd() {
    _work_to_clean=$1
    trap 'bash "$SCRIPTS_DIR/containerd.sh" stop "$_work_to_clean/c" --rm || true; rm -rf "$_work_to_clean"' EXIT
    bash "$SCRIPTS_DIR/containerd.sh" start "$_work_to_clean/c" >&2
    sock="$_work_to_clean/c/containerd.sock"
}

# push_private NS REF: pushes REF from the private containerd (plain HTTP). ctr's push
# sometimes fails on its own content stream ("failed to copy: rpc error: code = Internal
# desc = unexpected EOF", containerd/nerdctl#984), so a failed push is logged with
# containerd's last log lines and tried again; a push is idempotent. Three failures fail.
push_private() {
    local ns=$1 ref=$2 attempt
    for attempt in 1 2 3; do
        ctr -a "$sock" -n "$ns" images push --plain-http "$ref" >&2 && return 0
        log "push of $ref failed (attempt $attempt of 3); containerd's last log lines:"
        tail -n 20 "$_work_to_clean/c/containerd.log" >&2 || true
        sleep 1
    done
    die "could not push $ref from the private containerd"
}
