#!/usr/bin/env bash
# link_throughput.sh [RATE_MBIT] [RTT_MS]: what the benchmarks' emulated link carries on an
# idle machine. Builds the link as benches/benchlib.py does (a network namespace whose
# loopback is shaped with tc tbf at twice the rate, behind benches/delay_proxy.py), serves
# a 20 MB file over HTTP inside it, and times 1, 4 and 8 downloads of it at once; prints
# the CPU time the delay proxy took for all of them. Default: the `1gbit` link (1000, 50).
# Run as root; removes its namespace and files on exit.
set -euo pipefail
rate=${1:-1000} rtt=${2:-50}
here=$(cd "$(dirname "$0")" && pwd)
ns=esgz-linkcheck-$$
work=$(mktemp -d /var/tmp/esgz-linkcheck.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
in_ns=(nsenter "--net=/run/netns/$ns")
"${in_ns[@]}" ip link set lo up
"${in_ns[@]}" tc qdisc replace dev lo root tbf rate "$((2 * rate))mbit" burst 256kb latency 50ms
head -c 20000000 /dev/urandom > "$work/blob"
(cd "$work" && exec "${in_ns[@]}" python3 -m http.server 18080 --bind 127.0.0.1 >/dev/null 2>&1) &
pids+=($!)
"${in_ns[@]}" python3 "$here/delay_proxy.py" 18081 127.0.0.1:18080 "$(awk -v r="$rtt" 'BEGIN { print r / 2 }')" \
    > "$work/proxy.out" &
proxy=$!
pids+=("$proxy")
for _ in $(seq 50); do grep -q ready "$work/proxy.out" 2>/dev/null && break; sleep 0.1; done
sleep 0.5
echo "| downloads of 20 MB at once | seconds | MB/s in all |"
echo "|---|---|---|"
for n in 1 4 8; do
    start=$(date +%s.%N)
    curls=()
    for _ in $(seq "$n"); do
        "${in_ns[@]}" curl -sf -o /dev/null http://127.0.0.1:18081/blob &
        curls+=($!)
    done
    wait "${curls[@]}"
    end=$(date +%s.%N)
    echo "$n $start $end" | awk '{t = $3 - $2; printf "| %d | %.3f | %.0f |\n", $1, t, $1 * 20 / t}'
done
awk '{printf "delay proxy CPU time for all of them: %.2f s\n", ($14 + $15) / 100}' "/proc/$proxy/stat"
