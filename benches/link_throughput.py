#!/usr/bin/env python3
"""What the benchmarks' emulated links carry on an idle machine.

For each link (benchlib.Link: the registry behind the shaper and the delay proxy, as every
benchmark reaches it), pushes a 20 MB blob and times 1, 4 and 8 downloads of it at once;
prints the CPU time the delay proxy took for all of them. During a start the same link is
shared with containerd, runc, the workload and the daemons' decoding: a start that fetches
slower than this is held by the machine, not by the link.

    python3 benches/link_throughput.py [--links 1gbit,...]
"""
import argparse
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import LINKS, Link, choices, run

BLOB_BYTES = 20_000_000
AT_ONCE = (1, 4, 8)


def push_blob(link, path, digest):
    """Uploads the file at PATH to LINK's registry (one monolithic upload); its URL."""
    base = f"http://{link.addr}/v2/bench/blob/blobs"
    headers = link.cmd(["curl", "-sf", "-X", "POST", "-D", "-", "-o", "/dev/null",
                        f"{base}/uploads/"])
    location = next(line.split(":", 1)[1].strip() for line in headers.splitlines()
                    if line.lower().startswith("location:"))
    sep = "&" if "?" in location else "?"
    link.cmd(["curl", "-sf", "-X", "PUT", "-H", "Content-Type: application/octet-stream",
              "--data-binary", f"@{path}", f"{location}{sep}digest={digest}"])
    return f"{base}/{digest}"


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    # utime and stime: fields 14 and 15 of stat, 12 and 13 after the command's name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--links", default="1gbit", type=choices(LINKS),
                    help=f"comma-separated, of: {', '.join(LINKS)} (default 1gbit)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="esgz-link.", dir="/var/tmp"))
    blob = work / "blob"
    data = os.urandom(BLOB_BYTES)
    blob.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        for name in args.links:
            link = Link(name, work)
            try:
                url = push_blob(link, blob, digest)
                print(f"\n{name}:\n")
                print(f"| downloads of {BLOB_BYTES // 1_000_000} MB at once | seconds | MB/s in all |")
                print("|---|---|---|")
                for n in AT_ONCE:
                    began = time.monotonic()
                    curls = [subprocess.Popen(link.prefix + ["curl", "-sf", "-o", "/dev/null", url])
                             for _ in range(n)]
                    if any(c.wait() != 0 for c in curls):
                        raise RuntimeError(f"a download of {url} failed")
                    took = time.monotonic() - began
                    print(f"| {n} | {took:.3f} | {n * BLOB_BYTES / 1e6 / took:.0f} |")
                if link.proxy:
                    print(f"\ndelay proxy CPU time for all of them: "
                          f"{cpu_seconds(link.proxy.pid):.2f} s")
            finally:
                link.close()
    finally:
        run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
