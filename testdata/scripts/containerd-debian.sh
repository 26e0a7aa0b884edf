#!/usr/bin/env bash
# containerd-debian.sh SUITE OUT_DIR
#
# Other containerd versions for the tests (Debian bookworm ships 1.6): the `containerd`
# package of another Debian suite (trixie: 1.7; forky: 2.x), which runs on bookworm (it
# needs libc6 >= 2.34), fetched from deb.debian.org and verified: InRelease's signature
# against Debian's archive keyring, the Packages index against InRelease, the .deb against
# the index. The .deb is cached in testdata/cache/debs-SUITE (a newer one in the suite
# replaces it); it is extracted (dpkg -x) under OUT_DIR. Prints the directory of its
# binaries (containerd, its shims, ctr): put it first in PATH (containerd.sh does so with
# CONTAINERD_BIN_DIR).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -eq 2 ] || { echo "usage: $0 SUITE OUT_DIR" >&2; exit 2; }
suite=$1
shift
need curl curl
need gpgv gpgv
need dpkg dpkg
out=$1
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
arch=$(dpkg --print-architecture)
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "no Debian archive keyring at $keyring (apt-get install debian-archive-keyring)"
cache="$CACHE_DIR/debs-$suite"
mkdir -p "$cache"
deb=$(ls -v "$cache"/containerd_*_"$arch".deb 2>/dev/null | tail -n 1 || true)
if [ -z "$deb" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    log "fetching containerd from Debian $suite ($mirror)"
    curl -sfL -o "$tmp/InRelease" "$mirror/dists/$suite/InRelease" || die "cannot fetch $suite's InRelease"
    gpgv --keyring "$keyring" "$tmp/InRelease" 2>/dev/null || die "$suite's InRelease has no good signature"
    index=main/binary-$arch/Packages.xz
    want=$(awk -v f="$index" '/^SHA256:/{s=1; next} /^[A-Za-z]/{s=0} s && $3 == f {print $1}' "$tmp/InRelease" | head -n 1)
    [ -n "$want" ] || die "InRelease lists no $index"
    curl -sfL -o "$tmp/Packages.xz" "$mirror/dists/$suite/$index" || die "cannot fetch $index"
    [ "$(sha256sum "$tmp/Packages.xz" | cut -d' ' -f1)" = "$want" ] || die "$index does not match InRelease"
    read -r file sum < <(xz -dc "$tmp/Packages.xz" | awk '
        /^Package: / {p = ($2 == "containerd")}
        p && /^Filename: / {f = $2}
        p && /^SHA256: / {s = $2}
        /^$/ && p && f != "" {print f, s; exit}')
    [ -n "${file:-}" ] && [ -n "${sum:-}" ] || die "$suite has no containerd package for $arch"
    name=$(basename "$file")
    curl -sfL -o "$tmp/$name" "$mirror/$file" || die "cannot fetch $file"
    [ "$(sha256sum "$tmp/$name" | cut -d' ' -f1)" = "$sum" ] || die "$name does not match the Packages index"
    mv "$tmp/$name" "$cache/$name"
    deb="$cache/$name"
fi
mkdir -p "$out"
dpkg -x "$deb" "$out"
"$out/usr/bin/containerd" --version >&2
echo "$out/usr/bin"
