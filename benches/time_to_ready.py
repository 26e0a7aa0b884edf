#!/usr/bin/env python3
"""Time to ready: how long until a container's command has run, per pull mode.

    python3 benches/time_to_ready.py [--samples N] [--links loopback,wan] [--workloads ...]

For each link (loopback; `wan`: the registry in a network namespace whose loopback is
limited to --rate with tc tbf, behind a proxy adding --rtt-ms of round trip), each workload
and each mode, runs SAMPLES fresh environments (a private containerd and
estargz-snapshotter, nothing cached) in random order and times pull, create and run:

  ordinary   ctr images pull (containerd's overlayfs snapshotter unpacks every layer)
  lazy       ctr-remote images rpull --snapshotter estargz, image converted without
             prioritized files
  lazy-prio  the same, image converted with the workload's files prioritized (recorded
             with strace from a run of the workload in the unpacked image)
  lazy-warm  lazy-prio on a node whose chunk cache already holds the image (another
             image of the same content ran and was removed): a second node of a fleet
             sharing a cache volume, or a re-pull after GC

Prints a Markdown table (median and p95 of total, medians of each phase, registry bytes
served, bytes read through the lazy layers, the image's size and the size of the files the
workload opens) and writes every sample to OUT/time_to_ready.json. Needs root.
"""
import json
import os
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchlib import (ESTARGZ, SCRIPTS, SNAPSHOTTER, Link, arguments, image_tar, metric_sum,
                      p95, push_image, run, start, wait_background_fetch)

IMPORTS = ("argparse, ast, bisect, calendar, collections, compileall, configparser, "
           "contextlib, copy, csv, datetime, dis, email, email.mime.text, email.parser, enum, "
           "filecmp, fnmatch, functools, getopt, glob, hashlib, heapq, importlib.resources, "
           "inspect, ipaddress, locale, logging, optparse, pathlib, pickle, pkgutil, platform, "
           "py_compile, quopri, random, selectors, signal, socket, ssl, string, stringprep, "
           "struct, subprocess, sysconfig, tempfile, textwrap, threading, tokenize, "
           "traceback, tracemalloc, typing, urllib.parse, uu, warnings, weakref")
HELLO_C = r'#include <stdio.h>\nint main(void) { puts(\"hello\"); return 0; }\n'
WORKLOADS = {
    # name: (image, command); prioritized files are recorded from a profiling run (strace)
    "python3": ("python", ["/usr/bin/python3.11", "-c", 'print("hello")']),
    # An application that reads many files at start: 179 modules of the standard library.
    "python-imports": ("python", ["/usr/bin/python3.11", "-c",
                                  f"import {IMPORTS}; print('ready')"]),
    # A compiler: gcc compiles, links and runs a hello world (cc1, as, collect2, ld, libc).
    "gcc": ("gcc", ["/bin/sh", "-c", f'printf "{HELLO_C}" > /tmp/h.c && gcc -O2 /tmp/h.c '
                    '-o /tmp/h && /tmp/h']),
}
MODES = ["ordinary", "lazy", "lazy-prio", "lazy-warm"]


def prepare_images(link, work, workloads):
    """Pushes each image the workloads need and converts it twice per workload (without and
    with its prioritized files). Returns the refs, each image's compressed size, and the
    bytes of the files each workload opens."""
    refs, sizes, opened = {}, {}, {}
    for image in sorted({WORKLOADS[wl][0] for wl in workloads}):
        refs[f"{image}-orig"], sizes[image] = push_image(link, work, image)
    for wl in workloads:
        image, command = WORKLOADS[wl]
        prio, opened[wl] = record_prioritized(work, image, wl, command)
        base = f"{link.addr}/bench/{image}"
        link.cmd([ESTARGZ, "convert", f"{base}:orig", f"{base}:{wl}-lazy", "--quiet"])
        link.cmd([ESTARGZ, "convert", f"{base}:orig", f"{base}:{wl}-prio", "--quiet",
                  "--prioritize", prio])
        refs[f"{wl}-lazy"] = f"{base}:{wl}-lazy"
        refs[f"{wl}-prio"] = f"{base}:{wl}-prio"
    return refs, sizes, opened


def record_prioritized(work, image, wl, command):
    """The files of the image that `command` opens, in order, from a profiling run of it
    (strace, chroot into the unpacked image): the prioritized-files list for the lazy-prio
    mode. Returns the list's path and the files' total size (what the workload can read at
    most: the floor of what a lazy start must fetch)."""
    out = work / f"prio-{wl}.txt"
    root = work / f"rootfs-{image}"
    if not root.exists():
        root.mkdir()
        run(["tar", "-xf", image_tar(work, image), "-C", root])
    # Only files of the image count: the workload may create files (gcc's output) as it runs.
    in_image = {os.path.normpath(n) for n in
                run(["tar", "-tf", image_tar(work, image)]).splitlines()}
    trace = work / f"strace-{wl}.log"
    run(["strace", "-f", "-qq", "-e", "trace=open,openat,execve", "-e", "status=successful",
         "-o", trace, "chroot", root] + command)
    seen, files, started = set(), [], False
    for line in trace.read_text(errors="replace").splitlines():
        m = re.search(r'(?:openat\(AT_FDCWD, |open\(|execve\()"([^"]+)"', line)
        if not m or not m.group(1).startswith("/"):
            continue
        # What chroot itself opens (on the host) comes before the command's execve.
        started = started or ("execve(" in line and m.group(1) == command[0])
        if not started:
            continue
        path = Path(str(root) + os.path.normpath(m.group(1)))
        real = Path(os.path.realpath(path))
        for p in (path, real):
            try:
                rel = str(p.relative_to(root))
            except ValueError:
                continue
            if rel in in_image and p.is_file() and not p.is_symlink() and rel not in seen:
                seen.add(rel)
                files.append(rel)
    out.write_text(f"# recorded from: {' '.join(command)}\n" + "\n".join(files) + "\n")
    return out, sum(os.path.getsize(root / f) for f in files)


def one_sample(link, work, wl, mode, refs, n):
    image, command = WORKLOADS[wl]
    env_dir = work / f"env-{n}"
    start = run(link.prefix + ["bash", str(SCRIPTS / "snapshotter.sh"), "start", str(env_dir)],
                env={"SNAPSHOTTER": str(SNAPSHOTTER)}).strip()
    sock = env_dir / "c" / "containerd.sock"
    ctr = ["ctr", "-a", sock]
    try:
        if mode == "ordinary":
            ref, pull, snap = refs[f"{image}-orig"], ctr + ["-n", "b", "images", "pull", "--plain-http"], []
        else:
            ref = refs[f"{wl}-lazy" if mode == "lazy" else f"{wl}-prio"]
            pull = ["ctr-remote", "-a", sock, "-n", "b", "images", "rpull", "--plain-http",
                    "--snapshotter", "estargz"]
            snap = ["--snapshotter", "estargz"]
        if mode == "lazy-warm":
            # Run once and let the background fetch finish, then remove it all but the cache.
            link.cmd(pull[:4] + ["warm"] + pull[5:] + [ref])
            link.cmd(ctr + ["-n", "warm", "run", "--rm"] + snap + [ref, "warm"] + command)
            wait_background_fetch(link.cmd, start)
            link.cmd(ctr + ["-n", "warm", "images", "rm", "--sync", ref])
        before = link.served()
        t0 = time.monotonic()
        link.cmd(pull + [ref])
        t1 = time.monotonic()
        link.cmd(ctr + ["-n", "b", "containers", "create"] + snap + [ref, "c1", "--"] + command)
        t2 = time.monotonic()
        out = link.cmd(ctr + ["-n", "b", "tasks", "start", "c1"])
        t3 = time.monotonic()
        if not out.strip():
            raise RuntimeError(f"{wl} printed nothing in mode {mode}")
        sample = {"link": link.name, "workload": wl, "mode": mode, "pull": t1 - t0,
                  "create": t2 - t1, "run": t3 - t2, "total": t3 - t0,
                  "bytes": link.served() - before}
        if mode in ("lazy", "lazy-prio"):
            # What the workload read from the image, as the kernel asked the lazy layers
            # for it (read-ahead included); lazy-warm's layers also served its warm-up.
            sample["read_bytes"] = int(metric_sum(link.cmd, start, "estargz_layer_read_bytes_total"))
        return sample
    finally:
        run(link.prefix + ["bash", str(SCRIPTS / "snapshotter.sh"), "stop", str(env_dir)],
            env={"SNAPSHOTTER": str(SNAPSHOTTER)}, check=False)
        shutil.rmtree(env_dir, ignore_errors=True)


def main():
    ap = arguments(__doc__, samples=5)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    args = ap.parse_args()
    out, work = start(args, "ttr")
    workloads = args.workloads.split(",")
    for wl in workloads:
        if wl not in WORKLOADS:
            sys.exit(f"unknown workload {wl!r}; known: {', '.join(WORKLOADS)}")
    samples, sizes, opened = [], {}, {}
    try:
        for name in args.links.split(","):
            link = Link(name, args.rate, args.rtt_ms, work)
            try:
                refs, sizes, opened = prepare_images(link, work, workloads)
                plan = [(wl, mode) for wl in workloads for mode in MODES
                        for _ in range(args.samples)]
                random.shuffle(plan)
                for n, (wl, mode) in enumerate(plan):
                    s = one_sample(link, work, wl, mode, refs, n)
                    print(f"# {name} {wl} {mode}: {s['total']:.2f}s, {s['bytes']:,} B",
                          file=sys.stderr, flush=True)
                    samples.append(s)
            finally:
                link.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "time_to_ready.json").write_text(json.dumps(
        {"samples": samples, "image_bytes": sizes, "opened_bytes": opened,
         "images": {wl: WORKLOADS[wl][0] for wl in workloads},
         "rate": args.rate, "rtt_ms": args.rtt_ms},
        indent=1))
    print("| link | workload | mode | total median s | total p95 s | pull | create | run | "
          "registry bytes (median) | read through the lazy layer | image bytes | "
          "opened files bytes | n |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.links.split(","):
        for wl in workloads:
            for mode in MODES:
                xs = [s for s in samples if (s["link"], s["workload"], s["mode"]) == (name, wl, mode)]
                if not xs:
                    continue
                med = lambda k: statistics.median(s[k] for s in xs)  # noqa: E731
                read = f"{int(med('read_bytes')):,}" if "read_bytes" in xs[0] else "-"
                print(f"| {name} | {wl} | {mode} | {med('total'):.2f} | "
                      f"{p95([s['total'] for s in xs]):.2f} | {med('pull'):.2f} | "
                      f"{med('create'):.2f} | {med('run'):.2f} | {int(med('bytes')):,} | "
                      f"{read} | {sizes[WORKLOADS[wl][0]]:,} | {opened[wl]:,} | {len(xs)} |")


if __name__ == "__main__":
    main()
