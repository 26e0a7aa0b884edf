#!/usr/bin/env bash
# rootfs.sh OUT_TAR
#
# Builds a real Debian root filesystem as a tar: the .deb files of a few packages (fetched
# with apt-get download, cached under testdata/cache/debs) extracted with dpkg -x, then
# packed with GNU tar (PAX format, xattrs, numeric owners, original mtimes, sorted names).
# The same debs give the same tar. ROOTFS_PACKAGES (space-separated) replaces the default
# package set (python3.11 and a shell); the benchmarks build a gcc image with it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -eq 1 ] || { echo "usage: $0 OUT_TAR" >&2; exit 2; }
out=$1
PACKAGES=(base-files bash coreutils dash libc6 libpython3.11-minimal python3.11-minimal
          zlib1g libssl3 libexpat1 libselinux1 libpcre2-8-0 libacl1 libattr1 libgmp10 tzdata)
if [ -n "${ROOTFS_PACKAGES:-}" ]; then
    read -r -a PACKAGES <<< "$ROOTFS_PACKAGES"
fi

need dpkg-deb dpkg
need tar tar
debs="$CACHE_DIR/debs"
mkdir -p "$debs"
# The cached .deb of a package (the newest version when several were downloaded over time).
deb_of() { ls -v "$debs/$1"_*.deb 2>/dev/null | tail -n 1; }
missing=()
for p in "${PACKAGES[@]}"; do
    [ -n "$(deb_of "$p")" ] || missing+=("$p")
done
fetch() {
    (cd "$debs" && apt-get download -qq "${missing[@]}" >/dev/null 2>&1)
}
if [ ${#missing[@]} -gt 0 ]; then
    log "downloading ${#missing[@]} Debian packages into $debs"
    if ! fetch; then
        apt-get update -qq || die "apt-get update failed"
        fetch || die "apt-get download of ${missing[*]} failed"
    fi
fi

work=$(mktemp -d /tmp/esgz-rootfs.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"
for p in "${PACKAGES[@]}"; do
    deb=$(deb_of "$p")
    [ -n "$deb" ] || die "package $p was not downloaded into $debs"
    dpkg -x "$deb" "$root"
done
# A real rootfs has hardlinks (e.g. python3.11 in some releases); make sure one exists, and a
# file with an extended attribute, so that the tar exercises both.
if [ -z "$(find "$root" -type f -links +1 -print -quit)" ]; then
    f=$(find "$root" -type f -name dash -print -quit)
    [ -n "$f" ] || die "dash is not in the extracted packages"
    ln "$f" "$f.hardlink"
fi
if command -v setfattr >/dev/null; then
    setfattr -n user.estargz.test -v "real rootfs xattr" "$root/etc/debian_version" 2>/dev/null || true
fi
tar --create --file "$out" --directory "$root" --format=pax --xattrs --xattrs-include='*' \
    --numeric-owner --sort=name --pax-option=delete=atime,delete=ctime .
log "wrote $out: $(stat -c %s "$out") bytes, $(tar -tf "$out" | wc -l) entries"
