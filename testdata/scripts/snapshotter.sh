#!/usr/bin/env bash
# snapshotter.sh start DIR [CONFIG_EXTRA] | stop DIR | kill DIR
#
# Starts estargz-snapshotter ($SNAPSHOTTER, default target/release/estargz-snapshotter)
# with its own root DIR/root, socket DIR/snap.sock and metrics on a free 127.0.0.1 port,
# and a private containerd (DIR/c) whose proxy_plugins name it `estargz`. CONFIG_EXTRA is
# appended to the daemon's config.toml. Prints the metrics address on stdout.
# With STARGZ_REF set to the reference daemon (containerd/stargz-snapshotter, built by
# ../shared/reference/build.sh), `start` also starts it with root DIR/ref-root and socket
# DIR/ref.sock (config file $STARGZ_REF_CONFIG if set; log DIR/ref.log), and containerd
# knows it as the snapshotter `stargz-ref`. ESTARGZ_REMOTE_SNAPSHOT_ANNOTATIONS=1 adds the
# proxy plugin's exports containerd 2's transfer service needs to pass layer labels.
# `kill` SIGKILLs the daemon only (the FUSE manager and containerd keep running);
# `stop` stops containerd, both daemons and our FUSE manager, and unmounts what is left.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

usage() { echo "usage: $0 start DIR [CONFIG_EXTRA] | stop DIR | kill DIR | restart DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
bin=${SNAPSHOTTER:-$REPO_DIR/target/release/estargz-snapshotter}

start_daemon() {
    [ -x "$bin" ] || die "no snapshotter binary at $bin (cargo build --release -p estargz-snapshotter)"
    local started
    started=$(grep -c "estargz-snapshotter serving" "$dir/snapshotter.log" || true)
    "$bin" --config "$dir/config.toml" >>"$dir/snapshotter.log" 2>&1 &
    echo $! > "$dir/snapshotter.pid"
    for _ in $(seq 1 300); do
        [ "$(grep -c "estargz-snapshotter serving" "$dir/snapshotter.log" || true)" -gt "$started" ] && return 0
        kill -0 "$(cat "$dir/snapshotter.pid")" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 30 "$dir/snapshotter.log" >&2 || true
    die "estargz-snapshotter did not start (log: $dir/snapshotter.log)"
}

# The reference daemon, once its socket accepts connections.
start_reference() {
    [ -x "$STARGZ_REF" ] || die "no reference snapshotter binary at $STARGZ_REF (STARGZ_REF)"
    mkdir -p "$dir/ref-root"
    "$STARGZ_REF" -address "$dir/ref.sock" -root "$dir/ref-root" \
        ${STARGZ_REF_CONFIG:+-config "$STARGZ_REF_CONFIG"} >>"$dir/ref.log" 2>&1 &
    echo $! > "$dir/ref.pid"
    for _ in $(seq 1 300); do
        python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' \
            "$dir/ref.sock" 2>/dev/null && return 0
        kill -0 "$(cat "$dir/ref.pid")" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 30 "$dir/ref.log" >&2 || true
    die "the reference snapshotter did not start (log: $dir/ref.log)"
}

case "$cmd" in
start)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat > "$dir/config.toml" <<TOML
socket = "$dir/snap.sock"
root = "$dir/root"
metrics_address = "127.0.0.1:$port"
${3:-}
TOML
    : > "$dir/snapshotter.log"
    start_daemon
    plugins="[proxy_plugins.estargz]
  type = \"snapshot\"
  address = \"$dir/snap.sock\""
    # containerd 2's transfer service passes layer labels only to plugins that export this.
    if [ -n "${ESTARGZ_REMOTE_SNAPSHOT_ANNOTATIONS:-}" ]; then
        plugins="$plugins
  [proxy_plugins.estargz.exports]
    root = \"$dir/root\"
    enable_remote_snapshot_annotations = \"true\""
    fi
    if [ -n "${STARGZ_REF:-}" ]; then
        start_reference
        plugins="$plugins
[proxy_plugins.stargz-ref]
  type = \"snapshot\"
  address = \"$dir/ref.sock\""
    fi
    CONTAINERD_EXTRA_CONFIG=$plugins bash "$SCRIPTS_DIR/containerd.sh" start "$dir/c" >&2
    echo "127.0.0.1:$port"
    ;;
restart)
    start_daemon
    ;;
kill)
    kill -9 "$(cat "$dir/snapshotter.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$(cat "$dir/snapshotter.pid")" 2>/dev/null || break; sleep 0.1; done
    ;;
stop)
    # Tasks outlive containerd (their shims keep running): end them first.
    csock="$dir/c/containerd.sock"
    if [ -S "$csock" ]; then
        for ns in $(ctr -a "$csock" namespaces ls -q 2>/dev/null); do
            for t in $(ctr -a "$csock" -n "$ns" tasks ls -q 2>/dev/null); do
                ctr -a "$csock" -n "$ns" tasks kill -s KILL "$t" >/dev/null 2>&1 || true
                for _ in $(seq 1 50); do
                    ctr -a "$csock" -n "$ns" tasks delete "$t" >/dev/null 2>&1 && break
                    sleep 0.1
                done
            done
            rmdir "/run/containerd/runc/$ns" 2>/dev/null || true
        done
    fi
    bash "$SCRIPTS_DIR/containerd.sh" stop "$dir/c" || true
    if [ -f "$dir/snapshotter.pid" ]; then
        kill "$(cat "$dir/snapshotter.pid")" 2>/dev/null || true
    fi
    if [ -x "$bin" ] && [ -f "$dir/config.toml" ]; then
        timeout 60 "$bin" --config "$dir/config.toml" stop-fuse-manager >/dev/null 2>&1 || true
    fi
    if [ -f "$dir/ref.pid" ]; then
        pid=$(cat "$dir/ref.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/ref.pid"
    fi
    for m in $(awk -v d="$dir" '$2 ~ "^"d {print $2}' /proc/self/mounts | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    ;;
*) usage ;;
esac
