#!/usr/bin/env python3
"""plot.py RESULTS_JSON OUT_PNG: time to ready per link, workload and mode (median bars,
p95 whiskers, stacked by phase; ours and the reference), from benches/time_to_ready.py's
samples."""
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Every mode time_to_ready.py knows, in its order (older results have fewer).
MODES = ["ordinary", "lazy", "ref", "lazy-prio", "ref-prio", "lazy-warm", "lazy-ctr", "ref-ours"]
PHASES = [("pull", "#4c72b0"), ("create", "#dd8452"), ("run", "#55a868")]


def main():
    data = json.load(open(sys.argv[1]))
    samples = [s for s in data["samples"] if "error" not in s]
    # In the order of --links.
    links = list(data.get("links", {})) or sorted({s["link"] for s in samples},
                                                  key=lambda l: (l != "loopback", l))
    # In the order the benchmark ran them (python3, python-imports, gcc).
    workloads = [w for w in data.get("images", {})] or sorted({s["workload"] for s in samples})
    modes = [m for m in MODES if any(s["mode"] == m for s in samples)]
    fig, axes = plt.subplots(len(links), len(workloads), squeeze=False,
                             figsize=((1 + 0.6 * len(modes)) * len(workloads), 3.8 * len(links)))
    cells = [(link, wl) for link in links for wl in workloads]
    for ax, (link, wl) in zip([a for row in axes for a in row], cells):
        xs = [m for m in modes if any(s["mode"] == m and s["link"] == link and s["workload"] == wl for s in samples)]
        bottom = [0.0] * len(xs)
        for phase, color in PHASES:
            vals = [statistics.median(s[phase] for s in samples
                                      if (s["link"], s["workload"], s["mode"]) == (link, wl, m)) for m in xs]
            ax.bar(xs, vals, bottom=bottom, color=color, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
        p95 = []
        for m in xs:
            t = sorted(s["total"] for s in samples if (s["link"], s["workload"], s["mode"]) == (link, wl, m))
            p95.append(t[min(len(t) - 1, int(round(0.95 * (len(t) - 1))))])
        ax.errorbar(xs, bottom, yerr=[[0] * len(xs), [max(0, p - b) for p, b in zip(p95, bottom)]],
                    fmt="none", ecolor="black", capsize=4)
        image = data.get("images", {}).get(wl)
        sizes = data.get("image_bytes", {})
        size = sizes.get(f"bench/{image}:orig", sizes.get(image))
        title = f"{wl} ({image} image, {size / 1e6:.0f} MB), {link}" if size else f"{wl}, {link}"
        shape = data.get("links", {}).get(link) or {}
        if shape.get("rate"):
            title += f", {shape['rtt_ms']:g} ms RTT"
        elif link == "wan":  # results of before the links had names of their own
            title += f"\n{data['rate']}, {data['rtt_ms']:g} ms RTT"
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=45)
        ax.set_ylabel("seconds to ready (median; p95 whisker)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
