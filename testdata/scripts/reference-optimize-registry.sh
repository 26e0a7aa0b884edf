#!/usr/bin/env bash
# reference-optimize-registry.sh SRC_REF DST_REF CMD [ARGS...]
#
# Optimizes an image between registries (plain HTTP) with the REFERENCE tool: pulls SRC_REF
# into a private containerd, runs `ctr-remote image optimize --oci` with CMD ARGS as the
# workload (entrypoint CMD, args ARGS), and pushes the result as DST_REF. Prints the time
# of pull + optimize + push in seconds on stdout (what `estargz optimize SRC_REF DST_REF`
# does in one command). EXTRA_OPTIMIZE_ARGS is appended to the optimize command.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -ge 3 ] || { echo "usage: $0 SRC_REF DST_REF CMD [ARGS...]" >&2; exit 2; }
need ctr-remote stargz-snapshotter
need containerd containerd
src=$1 dst=$2
shift 2
json() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@"; }
work=$(mktemp -d /tmp/esgz-refopt.XXXXXX)
start_private_containerd "$work"
ns=estargz-refopt
start=$(date +%s.%N)
ctr -a "$sock" -n "$ns" images pull --plain-http "$src" >&2
# shellcheck disable=SC2086
ctr-remote -a "$sock" -n "$ns" image optimize --oci ${EXTRA_OPTIMIZE_ARGS:-} \
    --entrypoint "$(json "$1")" --args "$(json "${@:2}")" "$src" "$dst" >&2
push_private "$ns" "$dst"
end=$(date +%s.%N)
python3 -c "print(f'{$end - $start:.3f}')"
