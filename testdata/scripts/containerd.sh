#!/usr/bin/env bash
# containerd.sh start DIR | stop DIR [--rm]
#
# Starts a private containerd (never the system one) with root DIR/root, state DIR/state,
# socket DIR/containerd.sock and config DIR/config.toml; logs to DIR/containerd.log. `stop`
# ends that containerd only and unmounts whatever is still mounted under DIR.
# CONTAINERD_EXTRA_CONFIG is appended to the config. The CRI plugin is disabled unless
# CONTAINERD_CRI_CONFIG (its configuration, appended too) is set. CONTAINERD_BIN_DIR: the
# directory of another containerd's binaries (containerd and its shims), searched first;
# CONTAINERD_CONFIG_VERSION: the config's version (2, or 3 for containerd 2's plugin names);
# CONTAINERD_LOG_LEVEL: its log level (default info; debug logs each snapshotter call).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

usage() { echo "usage: $0 start DIR | stop DIR [--rm]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
sock="$dir/containerd.sock"

unmount_under() {
    local m
    # Deepest first.
    for m in $(awk -v d="$1" '$2 ~ "^"d {print $2}' /proc/self/mounts | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
}

case "$cmd" in
start)
    need containerd containerd
    need ctr containerd
    [ ${#sock} -lt 100 ] || die "socket path $sock is too long for a unix socket; use a shorter DIR"
    if [ -f "$dir/containerd.pid" ] && kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null; then
        die "a containerd started by this script is already running for $dir"
    fi
    mkdir -p "$dir/root" "$dir/state"
    cri_disabled='"io.containerd.grpc.v1.cri", '
    [ -z "${CONTAINERD_CRI_CONFIG:-}" ] || cri_disabled=
    cat > "$dir/config.toml" <<TOML
version = ${CONTAINERD_CONFIG_VERSION:-2}
root = "$dir/root"
state = "$dir/state"
disabled_plugins = [${cri_disabled}"io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = "$dir/debug.sock"
  level = "${CONTAINERD_LOG_LEVEL:-info}"
[metrics]
  address = ""
${CONTAINERD_EXTRA_CONFIG:-}
${CONTAINERD_CRI_CONFIG:-}
TOML
    PATH="${CONTAINERD_BIN_DIR:+$CONTAINERD_BIN_DIR:}$PATH" \
        containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
    echo $! > "$dir/containerd.pid"
    for _ in $(seq 1 300); do
        if ctr -a "$sock" version >/dev/null 2>&1; then
            log "containerd ready on $sock (pid $(cat "$dir/containerd.pid"))"
            exit 0
        fi
        kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 30 "$dir/containerd.log" >&2 || true
    die "containerd did not become ready on $sock (log: $dir/containerd.log)"
    ;;
stop)
    if [ -f "$dir/containerd.pid" ]; then
        pid=$(cat "$dir/containerd.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/containerd.pid"
    fi
    unmount_under "$dir"
    if [ "${3:-}" = "--rm" ]; then
        rm -rf "$dir"
    fi
    ;;
*) usage ;;
esac
