#!/usr/bin/env python3
"""criterion_table.py [CRITERION_DIR]: the criterion results under CRITERION_DIR (default
target/criterion) as a Markdown table: median time per iteration (95 % interval) and
throughput where the benchmark declares one."""
import json
import sys
from pathlib import Path


def fmt_time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    print("| benchmark | median time | 95 % interval | throughput |")
    print("|---|---|---|---|")
    for bench in sorted(root.glob("**/new/benchmark.json")):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())["median"]
        ns = est["point_estimate"]
        lo, hi = est["confidence_interval"]["lower_bound"], est["confidence_interval"]["upper_bound"]
        thr = meta.get("throughput") or {}
        if "Bytes" in thr:
            rate = f"{thr['Bytes'] / (ns / 1e9) / 2**20:.0f} MiB/s"
        elif "Elements" in thr:
            rate = f"{thr['Elements'] / (ns / 1e9):,.0f} /s"
        else:
            rate = f"{1e9 / ns:,.0f} /s"
        print(f"| {meta['full_id']} | {fmt_time(ns)} | {fmt_time(lo)} - {fmt_time(hi)} | {rate} |")


if __name__ == "__main__":
    main()
