#!/usr/bin/env bash
# node-image.sh OUT_LAYOUT TAG
#
# Builds the node image the Kubernetes DaemonSet (deploy/kubernetes/) runs: an OCI image
# layout at OUT_LAYOUT, tagged TAG, of a minimal Debian root filesystem (libc, libgcc, a
# shell for probes, base files: from `rootfs.sh`) and a layer with
# /usr/local/bin/estargz-snapshotter, /usr/local/bin/estargz, the default config and the
# CA certificates of this machine (for HTTPS registries). Binaries: $SNAPSHOTTER and
# $ESTARGZ (default target/release). Push it with e.g.
#   skopeo copy oci:OUT_LAYOUT:TAG docker://REGISTRY/estargz-snapshotter:TAG
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -eq 2 ] || { echo "usage: $0 OUT_LAYOUT TAG" >&2; exit 2; }
out=$1 tag=$2
snapshotter=${SNAPSHOTTER:-$REPO_DIR/target/release/estargz-snapshotter}
estargz=${ESTARGZ:-$REPO_DIR/target/release/estargz}
for b in "$snapshotter" "$estargz"; do
    [ -x "$b" ] || die "no binary at $b (cargo build --release)"
done
certs=/etc/ssl/certs/ca-certificates.crt
[ -f "$certs" ] || die "no CA bundle at $certs (apt-get install ca-certificates)"
work=$(mktemp -d /tmp/esgz-image.XXXXXX)
trap 'rm -rf "$work"' EXIT

log "building the base: a minimal Debian root filesystem"
ROOTFS_PACKAGES="base-files libc6 libgcc-s1 netbase dash" bash "$SCRIPTS_DIR/rootfs.sh" "$work/base.tar" >&2
app="$work/app"
# Without debug information (a tenth of the size) when binutils' strip is here.
strip_flag=
command -v strip >/dev/null && strip_flag=-s
install -D -m 0755 $strip_flag "$snapshotter" "$app/usr/local/bin/estargz-snapshotter"
install -D -m 0755 $strip_flag "$estargz" "$app/usr/local/bin/estargz"
install -D -m 0644 "$REPO_DIR/systemd/config.toml" "$app/etc/estargz-snapshotter/config.toml"
install -D -m 0644 "$certs" "$app/etc/ssl/certs/ca-certificates.crt"
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$app" -cf "$work/app.tar" .
rm -rf "$out"
IMAGE_RUN_CONFIG='{"Entrypoint":["/usr/local/bin/estargz-snapshotter"],"Cmd":["--config","/etc/estargz-snapshotter/config.toml"]}' \
    make_oci_image "$out" "$tag" "" "$work/base.tar" "$work/app.tar" >/dev/null
log "wrote $out:$tag"
