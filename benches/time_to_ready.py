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
served) and writes every sample to target/bench/time_to_ready.json. Needs root.
"""
import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "testdata" / "scripts"
ESTARGZ = REPO / "target" / "release" / "estargz"
SNAPSHOTTER = REPO / "target" / "release" / "estargz-snapshotter"

IMPORTS = ("argparse, ast, bisect, calendar, collections, compileall, configparser, "
           "contextlib, copy, csv, datetime, dis, email, email.mime.text, email.parser, enum, "
           "filecmp, fnmatch, functools, getopt, glob, hashlib, heapq, importlib.resources, "
           "inspect, ipaddress, locale, logging, optparse, pathlib, pickle, pkgutil, platform, "
           "py_compile, quopri, random, selectors, signal, socket, ssl, string, stringprep, "
           "struct, subprocess, sysconfig, tempfile, textwrap, threading, tokenize, "
           "traceback, tracemalloc, typing, urllib.parse, uu, warnings, weakref")
WORKLOADS = {
    # name: command; its prioritized files are recorded from a profiling run (strace)
    "python3": ["/usr/bin/python3.11", "-c", 'print("hello")'],
    # An application that reads many files at start: 179 modules of the standard library.
    "python-imports": ["/usr/bin/python3.11", "-c", f"import {IMPORTS}; print('ready')"],
}
MODES = ["ordinary", "lazy", "lazy-prio", "lazy-warm"]


class Link:
    """Where the registry is, and how every command reaches it."""

    def __init__(self, name, rate, rtt_ms, work):
        self.name = name
        self.work = work
        self.netns = None
        self.proxy = None
        if name == "wan":
            self.netns = f"esgz-bench-{os.getpid()}"
            run(["ip", "netns", "add", self.netns])
            self.prefix = ["nsenter", f"--net=/run/netns/{self.netns}"]
            run(self.prefix + ["ip", "link", "set", "lo", "up"])
            run(self.prefix + ["tc", "qdisc", "replace", "dev", "lo", "root", "tbf",
                               "rate", rate, "burst", "256kb", "latency", "50ms"])
        else:
            self.prefix = []
        reg_dir = work / f"reg-{name}"
        self.registry_dir = reg_dir
        addr = run(self.prefix + ["bash", str(SCRIPTS / "registry.sh"), "start", str(reg_dir)],
                   env={"REGISTRY_LOG_LEVEL": "info"}).strip()
        self.addr = addr
        if name == "wan":
            port = free_port(self.prefix)
            self.proxy = subprocess.Popen(
                self.prefix + [sys.executable, str(REPO / "benches" / "delay_proxy.py"),
                               str(port), addr, str(rtt_ms / 2)],
                stdout=subprocess.PIPE, text=True)
            assert self.proxy.stdout.readline().strip() == "ready"
            self.addr = f"127.0.0.1:{port}"

    def cmd(self, args, **kw):
        return run(self.prefix + args, **kw)

    def served(self):
        text = (self.registry_dir / "registry.log").read_text(errors="replace")
        return sum(int(m) for m in re.findall(
            r'msg="response completed".*?http\.response\.written=(\d+)', text))

    def close(self):
        if self.proxy:
            self.proxy.kill()
        run(self.prefix + ["bash", str(SCRIPTS / "registry.sh"), "stop", str(self.registry_dir)],
            check=False)
        if self.netns:
            run(["ip", "netns", "delete", self.netns], check=False)


def run(args, env=None, check=True, timeout=900):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([str(a) for a in args], env=e, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout


def free_port(prefix):
    return int(run(prefix + [sys.executable, "-c",
                             "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); "
                             "print(s.getsockname()[1])"]).strip())


def prepare_images(link, work):
    """Pushes the original image and converts it twice; returns refs and the image size."""
    tar = work / "rootfs.tar"
    if not tar.exists():
        run(["bash", str(SCRIPTS / "rootfs.sh"), tar])
    layout = work / "image"
    if not layout.exists():
        run(["bash", "-c", f'. "{SCRIPTS}/lib.sh"; make_oci_image "{layout}" orig "" "{tar}"'])
    base = f"{link.addr}/bench/app"
    link.cmd(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:orig",
              f"docker://{base}:orig"])
    refs = {"orig": f"{base}:orig"}
    for wl, command in WORKLOADS.items():
        prio = record_prioritized(work, tar, wl, command)
        link.cmd([ESTARGZ, "convert", f"{base}:orig", f"{base}:{wl}-lazy", "--quiet"])
        link.cmd([ESTARGZ, "convert", f"{base}:orig", f"{base}:{wl}-prio", "--quiet",
                  "--prioritize", prio])
        refs[f"{wl}-lazy"] = f"{base}:{wl}-lazy"
        refs[f"{wl}-prio"] = f"{base}:{wl}-prio"
    size = os.path.getsize(next((layout / "blobs" / "sha256").iterdir()))
    manifest = json.loads(link.cmd(["curl", "-sf", "-H",
                                    "Accept: application/vnd.oci.image.manifest.v1+json",
                                    f"http://{base.split('/')[0]}/v2/bench/app/manifests/orig"]))
    size = sum(layer["size"] for layer in manifest["layers"])
    return refs, size


def record_prioritized(work, tar, wl, command):
    """The files `command` opens, in order, from a profiling run of it (strace, chroot into
    the unpacked image): the prioritized-files list for the lazy-prio mode."""
    out = work / f"prio-{wl}.txt"
    if out.exists():
        return out
    root = work / "rootfs"
    if not root.exists():
        root.mkdir()
        run(["tar", "-xf", tar, "-C", root])
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
        path = Path(str(root) + m.group(1))
        real = Path(os.path.realpath(path))
        for p in (path, real):
            try:
                rel = str(p.relative_to(root))
            except ValueError:
                continue
            if p.is_file() and not p.is_symlink() and rel not in seen:
                seen.add(rel)
                files.append(rel)
    out.write_text(f"# recorded from: {' '.join(command)}\n" + "\n".join(files) + "\n")
    return out


def one_sample(link, work, wl, mode, refs, n):
    command = WORKLOADS[wl]
    env_dir = work / f"env-{n}"
    start = run(link.prefix + ["bash", str(SCRIPTS / "snapshotter.sh"), "start", str(env_dir)],
                env={"SNAPSHOTTER": str(SNAPSHOTTER)}).strip()
    sock = env_dir / "c" / "containerd.sock"
    ctr = ["ctr", "-a", sock]
    try:
        if mode == "ordinary":
            ref, pull, snap = refs["orig"], ctr + ["-n", "b", "images", "pull", "--plain-http"], []
        else:
            ref = refs[f"{wl}-lazy" if mode == "lazy" else f"{wl}-prio"]
            pull = ["ctr-remote", "-a", sock, "-n", "b", "images", "rpull", "--plain-http",
                    "--snapshotter", "estargz"]
            snap = ["--snapshotter", "estargz"]
        if mode == "lazy-warm":
            # Run once and let the background fetch finish, then remove it all but the cache.
            link.cmd(pull[:4] + ["warm"] + pull[5:] + [ref])
            link.cmd(ctr + ["-n", "warm", "run", "--rm"] + snap + [ref, "warm"] + command)
            for _ in range(600):
                metrics = link.cmd(["curl", "-sf", f"http://{start}/metrics"])
                have = sum(float(v) for v in re.findall(r"^estargz_layer_cached_chunks\{[^}]*\} (\S+)", metrics, re.M))
                want = sum(float(v) for v in re.findall(r"^estargz_layer_chunks\{[^}]*\} (\S+)", metrics, re.M))
                if want and have >= want:
                    break
                time.sleep(0.1)
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
        return {"link": link.name, "workload": wl, "mode": mode, "pull": t1 - t0,
                "create": t2 - t1, "run": t3 - t2, "total": t3 - t0,
                "bytes": link.served() - before}
    finally:
        run(link.prefix + ["bash", str(SCRIPTS / "snapshotter.sh"), "stop", str(env_dir)],
            env={"SNAPSHOTTER": str(SNAPSHOTTER)}, check=False)
        shutil.rmtree(env_dir, ignore_errors=True)


def p95(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--links", default="loopback,wan")
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--rtt-ms", type=float, default=20)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out", default=str(REPO / "target" / "bench"))
    args = ap.parse_args()
    for b in (ESTARGZ, SNAPSHOTTER):
        if not b.exists():
            sys.exit(f"{b} is missing: run `cargo build --release` first")
    # strace records the prioritized files; installed with apt when missing.
    run(["bash", "-c", f'. "{SCRIPTS}/lib.sh"; need strace strace; need curl curl; '
                       'need skopeo skopeo; need ctr-remote stargz-snapshotter'])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="esgz-ttr."))
    samples, sizes = [], {}
    try:
        for name in args.links.split(","):
            link = Link(name, args.rate, args.rtt_ms, work)
            try:
                refs, sizes[name] = prepare_images(link, work)
                plan = [(wl, mode) for wl in args.workloads.split(",") for mode in MODES
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
        {"samples": samples, "image_bytes": sizes, "rate": args.rate, "rtt_ms": args.rtt_ms},
        indent=1))
    print("| link | workload | mode | total median s | total p95 s | pull | create | run | "
          "registry bytes (median) | image bytes | n |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.links.split(","):
        for wl in args.workloads.split(","):
            for mode in MODES:
                xs = [s for s in samples if (s["link"], s["workload"], s["mode"]) == (name, wl, mode)]
                if not xs:
                    continue
                med = lambda k: statistics.median(s[k] for s in xs)  # noqa: E731
                print(f"| {name} | {wl} | {mode} | {med('total'):.2f} | "
                      f"{p95([s['total'] for s in xs]):.2f} | {med('pull'):.2f} | "
                      f"{med('create'):.2f} | {med('run'):.2f} | {int(med('bytes')):,} | "
                      f"{sizes[name]:,} | {len(xs)} |")


if __name__ == "__main__":
    main()
