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
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
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
