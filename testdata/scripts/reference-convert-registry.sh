#!/usr/bin/env bash
# reference-convert-registry.sh SRC_REF DST_REF
#
# Converts an image between registries (plain HTTP) with the REFERENCE converter: pulls
# SRC_REF into a private containerd, runs `ctr-remote image convert --estargz --oci`, and
# pushes the result as DST_REF. Prints the conversion time in seconds on stdout.
# EXTRA_CONVERT_ARGS is appended to the convert command.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -eq 2 ] || { echo "usage: $0 SRC_REF DST_REF" >&2; exit 2; }
need ctr-remote stargz-snapshotter
need containerd containerd
work=$(mktemp -d /tmp/esgz-refreg.XXXXXX)
start_private_containerd "$work"
ns=estargz-refreg
ctr -a "$sock" -n "$ns" images pull --plain-http "$1" >&2
start=$(date +%s.%N)
# shellcheck disable=SC2086
ctr-remote -a "$sock" -n "$ns" image convert --estargz --oci ${EXTRA_CONVERT_ARGS:-} "$1" "$2" >&2
end=$(date +%s.%N)
push_private "$ns" "$2"
python3 -c "print(f'{$end - $start:.3f}')"
