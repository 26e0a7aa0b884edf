#!/usr/bin/env python3
"""Reads through a lazily mounted layer, against the same files unpacked on disk.

    python3 benches/reads.py [--samples N] [--links loopback,100mbit] [--random-reads N] [--image gcc]

For one of the benchmark images (default gcc: compilers and libraries, many large files; one
layer, converted to eStargz without prioritized files), mounted
with `estargz mount` (FUSE layer under overlayfs, no prefetch, no background fetch) and, for
comparison, unpacked into a directory on the same disk:

  cold    a fresh chunk cache: every chunk comes from the registry over the link
  warm    a chunk cache that holds the whole layer (from an earlier mount); no network;
          the layer, all cached, is served without FUSE (an EROFS image of its metadata
          over the cached files, built at mount: its time is recorded as local_build_ms)
  warm-fuse  the same, every read through FUSE (`estargz mount --no-passthrough`)
  native  the unpacked files
  native-overlay  the unpacked files as the lower layer of a writable overlay: a container
          on an ordinary overlayfs snapshot (`estargz mount` stacks its layers the same way)
  ref-cold, ref-warm  the reference stargz snapshotter (its own conversion, `ctr-remote
          image convert --estargz --oci`): a private containerd with the reference daemon
          (fresh root, no prefetch or background fetch, as ours), the image pulled with
          `ctr-remote images rpull`, a view snapshot of its layer mounted; ref-warm reads
          every file once first, so that its cache holds the layer, then drops the page
          cache (the reference has no standalone mount: its mount stays, ours is remounted)

and two access patterns, each on a fresh mount with the kernel's page cache dropped:

  seq     every file of 1 MiB or more, read start to end in 128 KiB reads (like cat)
  tree    every regular file of the image read start to end (like tar of the whole tree)
  random  N reads of 4 KiB at random offsets of the files of 64 KiB or more (seeded, the
          same offsets for every mode), one after another

Prints a Markdown table of medians (MB/s for seq and tree, latency per read for random,
registry bytes) and writes the samples to OUT/reads.json. Needs root (FUSE, drop_caches).
"""
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (ESTARGZ, IMAGES, LINKS, SCRIPTS, Link, arguments, choices, drop_caches,
                      p95, push_image, reference_binary, run, start, unpacked)

MODES = ("cold", "warm", "warm-fuse", "native", "native-overlay", "ref-cold", "ref-warm")
SEQ_MIN = 1 << 20
RAND_MIN = 64 << 10
BLOCK = 128 << 10


class Mount:
    """`estargz mount REF DIR` in LINK's network, until closed."""

    def __init__(self, link, ref, dir, cache, extra=()):
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            link.prefix + [str(ESTARGZ), "mount", ref, str(dir), "--cache-dir", str(cache),
                           "--no-prefetch", "--no-background-fetch", "--quiet", *extra],
            stderr=subprocess.PIPE, text=True)
        # Set when the layer, all cached, was served without FUSE: the time that took.
        self.local_build_ms = None
        for line in self.proc.stderr:
            m = re.search(r"served without FUSE \(built in (\d+) ms\)", line)
            if m:
                self.local_build_ms = int(m.group(1))
            if line.startswith("mounted "):
                return
        raise RuntimeError(f"estargz mount {ref} exited ({self.proc.wait()}) before mounting")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            run(["umount", "-l", self.dir], check=False)


class NativeOverlay:
    """The unpacked files NATIVE as the lower layer of a writable overlay at WORK/ovl, as
    containerd's overlayfs snapshotter mounts a container's root, until closed."""

    def __init__(self, native, work):
        self.work = work
        for d in ("upper", "wd", "ovl"):
            (work / d).mkdir(parents=True, exist_ok=True)
        self.dir = work / "ovl"
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={native},upperdir={work / 'upper'},workdir={work / 'wd'}", self.dir])

    def close(self):
        run(["umount", self.dir], check=False)
        shutil.rmtree(self.work, ignore_errors=True)


class RefMount:
    """The reference snapshotter's view of the one layer of REF, at ENV/mnt, in LINK's
    network, until closed (see ref-cold and ref-warm above)."""

    def __init__(self, link, ref, env, warm_files=None):
        self.link, self.env = link, env
        env.mkdir(parents=True)
        config = env / "ref-config.toml"
        config.write_text("noprefetch = true\nno_background_fetch = true\n")
        self.vars = {"STARGZ_REF": str(reference_binary()), "STARGZ_REF_CONFIG": str(config)}
        try:
            link.cmd(["bash", SCRIPTS / "snapshotter.sh", "start", env / "node"], env=self.vars)
            sock = env / "node" / "c" / "containerd.sock"
            ctr = ["ctr", "-a", sock, "-n", "reads"]
            link.cmd(["ctr-remote", "-a", sock, "-n", "reads", "images", "rpull",
                      "--plain-http", "--snapshotter", "stargz-ref", ref])
            snaps = ctr + ["snapshots", "--snapshotter", "stargz-ref"]
            layers = [line.split() for line in link.cmd(snaps + ["ls"]).splitlines()[1:]]
            layers = [cols[0] for cols in layers if cols and cols[-1] == "Committed"]
            if len(layers) != 1:
                raise RuntimeError(f"expected one committed layer of {ref}, got {layers}")
            mounts = json.loads(link.cmd(snaps + ["view", "--mounts", "reads-view", layers[0]]))
            self.dir = env / "node" / "mnt"
            self.dir.mkdir()
            for m in mounts:
                m = {k.lower(): v for k, v in m.items()}
                run(["mount", "-t", m["type"], "-o", ",".join(m.get("options") or []),
                     m["source"], self.dir])
            if warm_files is not None:
                read_seq(self.dir, warm_files)
        except BaseException:
            self.close()
            raise

    def close(self):
        run(["bash", SCRIPTS / "snapshotter.sh", "stop", self.env / "node"], env=self.vars,
            check=False)
        shutil.rmtree(self.env, ignore_errors=True)


def files_of(root):
    """(path relative to root, size) of every regular file, sorted."""
    out = []
    for d, _, fs in os.walk(root):
        for f in fs:
            p = Path(d, f)
            if p.is_file() and not p.is_symlink():
                out.append((str(p.relative_to(root)), p.stat().st_size))
    return sorted(out)


def read_seq(root, files):
    total, t0 = 0, time.perf_counter()
    for rel, _ in files:
        fd = os.open(root / rel, os.O_RDONLY)
        try:
            while True:
                b = os.read(fd, BLOCK)
                if not b:
                    break
                total += len(b)
        finally:
            os.close(fd)
    return total, time.perf_counter() - t0


def read_random(root, plan):
    lat = []
    for rel, off in plan:
        t0 = time.perf_counter()
        fd = os.open(root / rel, os.O_RDONLY)
        try:
            if len(os.pread(fd, 4096, off)) == 0:
                raise RuntimeError(f"empty read of {rel} at {off}")
        finally:
            os.close(fd)
        lat.append(time.perf_counter() - t0)
    return lat


def main():
    ap = arguments(__doc__, samples=3, links="loopback,100mbit")
    ap.add_argument("--random-reads", type=int, default=100)
    ap.add_argument("--image", default="gcc", choices=sorted(IMAGES))
    ap.add_argument("--modes", default=",".join(MODES), type=choices(MODES),
                    help=f"comma-separated, of: {', '.join(MODES)} (default all)")
    args = ap.parse_args()
    modes = args.modes
    out, work = start(args, "reads")
    samples = []
    try:
        native = unpacked(work, args.image)
        all_files = files_of(native)
        seq = [f for f in all_files if f[1] >= SEQ_MIN]
        big = [f for f in all_files if f[1] >= RAND_MIN]
        rng = random.Random(42)
        plan = []
        for rel, size in rng.choices(big, weights=[s for _, s in big], k=args.random_reads):
            plan.append((rel, rng.randrange(0, size - 4096) & ~4095))
        seq_bytes = sum(s for _, s in seq)
        print(f"# seq: {len(seq)} files, {seq_bytes:,} B; random: {len(plan)} reads over "
              f"{len(big)} files", file=sys.stderr)
        for name in args.links:
            link = Link(name, work)
            try:
                orig, _ = push_image(link, work, args.image, layered=False)
                ref = orig.replace(":orig", ":esgz")
                link.cmd([ESTARGZ, "convert", orig, ref, "--quiet"])
                ref_image = orig.replace(":orig", ":ref")
                if any(m.startswith("ref-") for m in modes):
                    link.cmd(["bash", SCRIPTS / "reference-convert-registry.sh", orig, ref_image])
                warm_cache = work / f"warm-cache-{name}"
                m = Mount(link, ref, work / "mnt", warm_cache)
                try:
                    read_seq(m.dir, all_files)  # fills the cache with the whole layer
                finally:
                    m.close()
                cells = [(mode, pattern) for mode in modes
                         for pattern in ("seq", "random", "tree")] * args.samples
                random.shuffle(cells)
                for mode, pattern in cells:
                    m = None
                    if mode == "native":
                        root = native
                    elif mode == "native-overlay":
                        m = NativeOverlay(native, work / "native-overlay")
                        root = m.dir
                    elif mode.startswith("ref-"):
                        m = RefMount(link, ref_image, work / "ref",
                                     all_files if mode == "ref-warm" else None)
                        root = m.dir
                    else:
                        cache = warm_cache if mode.startswith("warm") else work / "cold-cache"
                        shutil.rmtree(work / "cold-cache", ignore_errors=True)
                        extra = ["--no-passthrough"] if mode == "warm-fuse" else []
                        m = Mount(link, ref, work / "mnt", cache, extra)
                        root = m.dir
                    try:
                        drop_caches()
                        before = link.served()
                        s = {"link": name, "mode": mode, "pattern": pattern}
                        if pattern == "seq":
                            n, secs = read_seq(root, seq)
                            assert n == seq_bytes, (n, seq_bytes)
                            s.update(seconds=secs, mb_per_s=n / secs / 1e6)
                        elif pattern == "tree":
                            n, secs = read_seq(root, all_files)
                            s.update(seconds=secs, mb_per_s=n / secs / 1e6, bytes=n)
                        else:
                            lat = read_random(root, plan)
                            s.update(seconds=sum(lat), latencies=lat)
                        s["registry_bytes"] = link.served() - before
                        if m and getattr(m, "local_build_ms", None) is not None:
                            s["local_build_ms"] = m.local_build_ms
                    finally:
                        if m:
                            m.close()
                    samples.append(s)
                    print(f"# {name} {mode} {pattern}: {s['seconds']:.3f}s", file=sys.stderr,
                          flush=True)
            finally:
                link.close()
    finally:
        run(["umount", "-l", work / "mnt"], check=False)
        shutil.rmtree(work, ignore_errors=True)
    (out / "reads.json").write_text(json.dumps(
        {"samples": samples, "image": args.image, "seq_bytes": seq_bytes, "seq_files": len(seq),
         "random_reads": len(plan), "links": {n: LINKS[n] for n in args.links}, "modes": modes},
        indent=1))
    print(f"\nimage {args.image}; seq: {len(seq)} files of 1 MiB or more, {seq_bytes:,} bytes; random: "
          f"{len(plan)} reads of 4 KiB")
    tree_bytes = sum(s for _, s in all_files)
    print(f"tree: {len(all_files)} files, {tree_bytes:,} bytes\n")
    print("| link | source | seq MB/s | tree MB/s | random 4 KiB: median ms | p95 ms | reads/s | "
          "registry bytes (seq / random) | n |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.links:
        for mode in modes:
            sq = [s for s in samples if (s["link"], s["mode"], s["pattern"]) == (name, mode, "seq")]
            rd = [s for s in samples if (s["link"], s["mode"], s["pattern"]) == (name, mode, "random")]
            tr = [s for s in samples if (s["link"], s["mode"], s["pattern"]) == (name, mode, "tree")]
            lat = [x for s in rd for x in s["latencies"]]
            rate = statistics.median(len(s["latencies"]) / s["seconds"] for s in rd)
            print(f"| {name} | {mode} | {statistics.median(s['mb_per_s'] for s in sq):.0f} | "
                  f"{statistics.median(s['mb_per_s'] for s in tr):.0f} | "
                  f"{statistics.median(lat) * 1e3:.3f} | {p95(lat) * 1e3:.3f} | {rate:.0f} | "
                  f"{int(statistics.median(s['registry_bytes'] for s in sq)):,} / "
                  f"{int(statistics.median(s['registry_bytes'] for s in rd)):,} | {len(sq)} |")


if __name__ == "__main__":
    main()
