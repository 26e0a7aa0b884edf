#!/usr/bin/env python3
"""Memory and scale of the daemon: RSS with 0, 1, 10 and 50 layers mounted, and the mount
latency and memory of one layer of 100,000 files.

    python3 benches/scale.py [--samples N]

In a private containerd + estargz-snapshotter (release build, default settings) on
loopback:

  layers   images of 1, 10 and 50 eStargz layers (each layer 2,000 files, about 4 MB,
           distinct content; the images share their first layers) pulled lazily one after
           another with `ctr-remote images rpull`; after each pull, and once the background
           fetch has finished, the resident memory (VmRSS) of the daemon and of its FUSE
           manager, which holds the mounts
  100k     an image of one layer of 100,000 small files: time of `rpull` (resolve, fetch
           the footer and the 100,000-entry TOC, verify it, build the index, mount: what
           containerd waits for in Prepare) against an ordinary `ctr images pull` of the
           same content, and the FUSE manager's RSS growth per TOC entry

  pull     the rpull times of the layers part (the pull phase of a multi-layer image:
           resolve, fetch each new layer's TOC, mount) and of the 100k part, against the
           reference snapshotter's rpull of the same 100k image (`ref`)

Options: --parts layers,big (default both); --big-modes lazy,ref,ordinary (default all);
--baseline BIN also runs our modes with that build of the daemon (`base`; a comparison of
two builds' pull phase and memory in one run, interleaved).

Prints Markdown tables and writes OUT/scale.json. Needs root.
"""
import io
import json
import random
import re
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

from benchlib import (ESTARGZ, SCRIPTS, SNAPSHOTTER, Link, arguments, choices, manifest,
                      p95, reference_binary, run, start, wait_background_fetch)

LAYER_COUNTS = [1, 10, 50]


def layer_tar(path, i, files=2000):
    """Layer `i`: `files` files of 1-3 KiB of distinct, text-like content in 20 directories."""
    rng = random.Random(i)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for f in range(files):
            data = rng.randbytes(rng.randrange(768, 2304)).hex().encode()
            info = tarfile.TarInfo(f"opt/layer{i:02}/dir{f % 20:02}/file{f:05}.txt")
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            t.addfile(info, io.BytesIO(data))


def many_files_tar(path, files=100_000):
    """One layer of `files` small files in directories of 1,000 (as the toc_memory bench)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for f in range(files):
            d = f // 1000
            if f % 1000 == 0:
                info = tarfile.TarInfo(f"usr/lib/python3/dist-packages/pkg{d:03}")
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            data = f"module {d}/{f % 1000}\n".encode()
            info = tarfile.TarInfo(f"usr/lib/python3/dist-packages/pkg{d:03}/module_{f % 1000:05}.py")
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            t.addfile(info, io.BytesIO(data))


def push(link, work, name, tars):
    """An ordinary gzip image of `tars`, pushed as bench/NAME:orig and converted to
    bench/NAME:esgz. Returns both refs."""
    layout = work / f"image-{name}"
    run(["bash", "-c", f'. "{SCRIPTS}/lib.sh"; make_oci_image "{layout}" orig "" '
                       + " ".join(f'"{t}"' for t in tars)])
    orig = f"{link.addr}/bench/{name}:orig"
    run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:orig",
         f"docker://{orig}"])
    esgz = orig.replace(":orig", ":esgz")
    run([ESTARGZ, "convert", orig, esgz, "--quiet"])
    return orig, esgz


class Env:
    """A private containerd and estargz-snapshotter."""

    def __init__(self, work, n, daemon=SNAPSHOTTER, reference=False):
        self.dir = work / f"env-{n}"
        self.env = {"SNAPSHOTTER": str(daemon)}
        if reference:
            self.env["STARGZ_REF"] = str(reference_binary())
        self.metrics = run(["bash", SCRIPTS / "snapshotter.sh", "start", self.dir],
                           env=self.env).strip()
        self.sock = self.dir / "c" / "containerd.sock"

    def rpull(self, ref, snapshotter="estargz"):
        t0 = time.monotonic()
        run(["ctr-remote", "-a", self.sock, "-n", "b", "images", "rpull", "--plain-http",
             "--snapshotter", snapshotter, ref])
        return time.monotonic() - t0

    def pull(self, ref):
        t0 = time.monotonic()
        run(["ctr", "-a", self.sock, "-n", "b", "images", "pull", "--plain-http", ref])
        return time.monotonic() - t0

    def rss(self):
        """VmRSS in bytes of the daemon and of its FUSE manager."""
        daemon = int((self.dir / "snapshotter.pid").read_text())
        config = str(self.dir / "config.toml")
        manager = None
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                args = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"fuse-manager" in args and config.encode() in args:
                manager = int(p.name)
        return kb(daemon) * 1024, (kb(manager) * 1024 if manager else 0)

    def mounted_layers(self):
        return sum(1 for line in Path("/proc/self/mounts").read_text().splitlines()
                   if line.split()[1].startswith(str(self.dir)) and "fuse" in line.split()[2])

    def close(self):
        run(["bash", SCRIPTS / "snapshotter.sh", "stop", self.dir], env=self.env, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def kb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def layers_sample(work, s, refs, result, build="ours", daemon=SNAPSHOTTER):
    """One sample of the layers part: each image's rpull time (only its new layers are
    resolved and mounted), RSS after it and once its background fetch is done."""
    env = Env(work, f"layers-{s}-{build}", daemon)
    try:
        time.sleep(1)
        d, m = env.rss()
        result["layers"].append({"sample": s, "build": build, "layers": 0, "daemon": d,
                                 "manager": m, "manager_after_fetch": m})
        for n in LAYER_COUNTS:
            secs = env.rpull(refs[n])
            mounted = env.mounted_layers()
            d, m = env.rss()
            wait_background_fetch(run, env.metrics)
            d2, m2 = env.rss()
            result["layers"].append({"sample": s, "build": build, "layers": mounted,
                                     "image_layers": n, "pull_seconds": secs, "daemon": d,
                                     "manager": m, "daemon_after_fetch": d2,
                                     "manager_after_fetch": m2})
            print(f"# {mounted} layers: daemon {d >> 20} MiB, manager {m >> 20} MiB "
                  f"({m2 >> 20} MiB after the background fetch)", file=sys.stderr, flush=True)
    finally:
        env.close()


def main():
    ap = arguments(__doc__, samples=3, links=False)
    ap.add_argument("--parts", default="layers,big", type=choices(["layers", "big"]))
    ap.add_argument("--big-modes", default="lazy,ref,ordinary",
                    type=choices(["lazy", "ref", "ordinary"]))
    ap.add_argument("--baseline", type=Path, metavar="BIN",
                    help="also rpull the 100k layer with this estargz-snapshotter build")
    args = ap.parse_args()
    big_modes = args.big_modes + (["lazy-base"] if args.baseline else [])
    out, work = start(args, "scale")
    result = {"layers": [], "big": []}
    link = Link("loopback", work)
    try:
        print("# building 50 layers and a 100,000-file layer", file=sys.stderr, flush=True)
        tars = []
        for i in range(max(LAYER_COUNTS) if "layers" in args.parts else 0):
            tars.append(work / f"layer{i:02}.tar")
            layer_tar(tars[-1], i)
        refs = ({n: push(link, work, f"layers{n}", tars[:n])[1] for n in LAYER_COUNTS}
                if "layers" in args.parts else {})
        many_files_tar(work / "big.tar")
        big_orig, big_esgz = push(link, work, "big", [work / "big.tar"])
        toc_entries = 100_000 + 100
        big_manifest = manifest(link, big_esgz)

        for s in range(args.samples):
            if "layers" in args.parts:
                builds = [("ours", SNAPSHOTTER)] + ([("base", args.baseline)]
                                                    if args.baseline else [])
                for build, daemon in random.sample(builds, len(builds)):
                    layers_sample(work, s, refs, result, build, daemon)
            for mode in random.sample(big_modes, len(big_modes)) if "big" in args.parts else []:
                daemon = args.baseline if mode == "lazy-base" else SNAPSHOTTER
                env = Env(work, f"big-{s}-{mode}", daemon, reference=mode == "ref")
                try:
                    _, m0 = env.rss()
                    if mode in ("lazy", "lazy-base"):
                        secs = env.rpull(big_esgz)
                        _, m1 = env.rss()
                    elif mode == "ref":
                        secs, m1 = env.rpull(big_esgz, "stargz-ref"), m0
                    else:
                        secs, m1 = env.pull(big_orig), m0
                    result["big"].append({"sample": s, "mode": mode, "seconds": secs,
                                          "manager_growth": m1 - m0})
                    print(f"# 100k files, {mode}: {secs:.2f}s, manager +{(m1 - m0) >> 10} KiB",
                          file=sys.stderr, flush=True)
                finally:
                    env.close()
    finally:
        link.close()
        shutil.rmtree(work, ignore_errors=True)
    result["big_layer_bytes"] = sum(layer["size"] for layer in big_manifest["layers"])
    result["toc_entries"] = toc_entries
    (out / "scale.json").write_text(json.dumps(result, indent=1))

    builds = sorted({r["build"] for r in result["layers"]}, key=lambda b: b != "ours")
    print("| build | layers mounted | daemon RSS MiB | FUSE manager RSS MiB | manager after background fetch MiB | n |")
    print("|---|---|---|---|---|---|")
    for build in builds:
        for n in [0] + LAYER_COUNTS:
            xs = [r for r in result["layers"] if r["layers"] == n and r["build"] == build]
            if not xs:
                continue
            med = lambda k: statistics.median(r[k] for r in xs) / 2**20  # noqa: E731
            print(f"| {build} | {n} | {med('daemon'):.1f} | {med('manager'):.1f} | "
                  f"{med('manager_after_fetch'):.1f} | {len(xs)} |")
    print()
    print("| pull phase: rpull of an image of | build | median s | p95 s | n |")
    print("|---|---|---|---|---|")
    for n in LAYER_COUNTS:
        for build in builds:
            xs = sorted(r["pull_seconds"] for r in result["layers"]
                        if r.get("image_layers") == n and r["build"] == build)
            if xs:
                print(f"| {n} layers ({n - ([0] + LAYER_COUNTS)[LAYER_COUNTS.index(n)]} new) "
                      f"| {build} | {statistics.median(xs):.2f} | {p95(xs):.2f} | {len(xs)} |")
    print()
    print("| 100,000-file layer | median s | p95 s | FUSE manager growth | n |")
    print("|---|---|---|---|---|")
    for mode, label in (("lazy", "rpull (resolve + TOC + index + mount)"),
                        ("lazy-base", f"rpull with {args.baseline}"),
                        ("ref", "reference: rpull of the same image"),
                        ("ordinary", "ordinary pull (download + unpack)")):
        xs = [r for r in result["big"] if r["mode"] == mode]
        if not xs:
            continue
        secs = sorted(r["seconds"] for r in xs)
        growth = statistics.median(r["manager_growth"] for r in xs)
        per = (f"{growth / 2**20:.1f} MiB, {growth / toc_entries:.0f} B/entry"
               if mode in ("lazy", "lazy-base") else "-")
        print(f"| {label} | {statistics.median(secs):.2f} | "
              f"{secs[min(len(secs) - 1, int(round(0.95 * (len(secs) - 1))))]:.2f} | {per} | "
              f"{len(xs)} |")


if __name__ == "__main__":
    main()
