#!/usr/bin/env bash
# registry.sh start DIR [USER:PASSWORD] | start-token DIR USER:PASSWORD
#             | start-tls DIR [mtls] | stop DIR
#
# Starts a real registry (Debian's docker-registry, distribution 2.8) on 127.0.0.1 with a
# free port, storing under DIR/data, logging to DIR/registry.log. With USER:PASSWORD it
# requires htpasswd basic auth; `start-token` instead requires bearer tokens from a token
# server (token-server.py, started too) that grants them to USER:PASSWORD, or to the
# OAuth2 refresh token (docker identitytoken) PASSWORD-refresh. REGISTRY_LOG_LEVEL=info logs
# every response with its size (http.response.written). `start` prints
# the address (127.0.0.1:PORT) on stdout; `start-token` prints it and the token realm.
# `start-tls` serves HTTPS with a certificate for IP 127.0.0.1 from a test CA (DIR/ca.crt);
# with `mtls` it also requires a client certificate (DIR/client.crt, DIR/client.key).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

usage() { echo "usage: $0 start DIR [USER:PASSWORD] | start-token DIR USER:PASSWORD | start-tls DIR [mtls] | stop DIR" >&2; exit 2; }

# make_certs DIR: a test CA, a server certificate for 127.0.0.1 and a client certificate.
make_certs() {
    local d=$1
    need openssl openssl
    (
        cd "$d"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=estargz-test-ca" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout ca.key -out ca.crt
        for who in server client; do
            openssl req -newkey rsa:2048 -nodes -subj "/CN=estargz-test-$who" -keyout "$who.key" -out "$who.csr"
            if [ "$who" = server ]; then usage_ext=serverAuth; else usage_ext=clientAuth; fi
            printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$usage_ext" > "$who.ext"
            openssl x509 -req -in "$who.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
                -out "$who.crt" -extfile "$who.ext"
        done
    ) >/dev/null 2>&1 || die "openssl could not make the test certificates"
}
[ $# -ge 2 ] || usage
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)

case "$cmd" in
start|start-token|start-tls)
    need docker-registry docker-registry
    need python3 python3
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$dir/data"
    auth=""
    realm=""
    tls=""
    if [ "$cmd" = start-token ]; then
        [ $# -ge 3 ] || usage
        need openssl openssl
        user=${3%%:*}; pass=${3#*:}
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=estargz-test-token" \
            -keyout "$dir/token.key" -out "$dir/token.crt" >/dev/null 2>&1 \
            || die "openssl could not make the token signing certificate"
        rm -f "$dir/token.port"
        python3 "$SCRIPTS_DIR/token-server.py" --key "$dir/token.key" --cert "$dir/token.crt" \
            --issuer estargz-test-issuer --service estargz-test-registry \
            --user "$user" --password "$pass" --refresh-token "$pass-refresh" \
            --port-file "$dir/token.port" \
            > "$dir/token.log" 2>&1 &
        echo $! > "$dir/token.pid"
        for _ in $(seq 1 100); do [ -f "$dir/token.port" ] && break; sleep 0.1; done
        [ -f "$dir/token.port" ] || die "token server did not start (log: $dir/token.log)"
        realm="http://127.0.0.1:$(cat "$dir/token.port")/token"
        auth="auth:
  token:
    realm: $realm
    service: estargz-test-registry
    issuer: estargz-test-issuer
    rootcertbundle: $dir/token.crt"
    elif [ "$cmd" = start-tls ]; then
        make_certs "$dir"
        tls="  tls:
    certificate: $dir/server.crt
    key: $dir/server.key"
        if [ "${3:-}" = mtls ]; then
            tls="$tls
    clientcas:
      - $dir/ca.crt"
        fi
    elif [ $# -ge 3 ]; then
        user=${3%%:*}; pass=${3#*:}
        python3 -W ignore - "$user" "$pass" > "$dir/htpasswd" <<'PY'
import crypt, sys
print(f"{sys.argv[1]}:{crypt.crypt(sys.argv[2], crypt.mksalt(crypt.METHOD_BLOWFISH))}")
PY
        auth="auth:
  htpasswd:
    realm: estargz-test
    path: $dir/htpasswd"
    fi
    cat > "$dir/config.yml" <<YML
version: 0.1
log:
  level: ${REGISTRY_LOG_LEVEL:-warn}
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
${tls:-}
$auth
YML
    docker-registry serve "$dir/config.yml" > "$dir/registry.log" 2>&1 &
    echo $! > "$dir/registry.pid"
    for _ in $(seq 1 100); do
        code=$(python3 -c "import urllib.request,sys,ssl
scheme = 'https' if '$cmd' == 'start-tls' else 'http'
ctx = ssl._create_unverified_context()
if '${3:-}' == 'mtls':
    ctx.load_cert_chain('$dir/client.crt', '$dir/client.key')
try:
    print(urllib.request.urlopen(scheme + '://127.0.0.1:$port/v2/', timeout=1, context=ctx).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)")
        if [ "$code" = 200 ] || [ "$code" = 401 ]; then
            echo "127.0.0.1:$port"
            [ -z "$realm" ] || echo "$realm"
            exit 0
        fi
        kill -0 "$(cat "$dir/registry.pid")" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$dir/registry.log" >&2 || true
    die "docker-registry did not start (log: $dir/registry.log)"
    ;;
stop)
    if [ -f "$dir/token.pid" ]; then
        kill "$(cat "$dir/token.pid")" 2>/dev/null || true
        rm -f "$dir/token.pid"
    fi
    if [ -f "$dir/registry.pid" ]; then
        pid=$(cat "$dir/registry.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/registry.pid"
    fi
    ;;
*) usage ;;
esac
