#!/usr/bin/env python3
"""A measurement, not a product test: where the warm whole-tree read of a layer served
without FUSE loses to the unpacked files, and how much of it is the files' layout on disk.

    python3 benches/tree_layout.py [--samples N] [--image gcc] [--out DIR]

For one of the benchmark images, converted and pushed to a local registry, a chunk cache is
filled as `reads.py` fills it (a cold `estargz mount` read start to end, file by file in
path order); then, on one warm mount (served without FUSE: an EROFS image of the layer's
metadata whose files redirect to hard links of the cache's files), each sample reads every
regular file start to end, page cache dropped before each, from:

  native       the unpacked files
  warm         the warm mount (overlayfs over the EROFS image and the data directory)
  data         the same content files the warm mount redirects to, read directly, in the
               same order (path order of the tree); small files the image holds itself
               (3 KiB or less) read from the image's mount
  data-inode   those files in the order of their inode numbers
  small-big    those files, the files of less than a chunk (4 MiB) first, in path order,
               then the larger ones (assembled from their chunks when the layer was built)
  native-small-big  the unpacked files in that order
  native-tar, warm-tar  `tar -cf - .` of the unpacked files and of the warm mount, piped
               to `wc -c`: every file in the order tar walks them (each directory's
               entries as `readdir` gives them: hash order on ext4, name order on EROFS)

and sums, for `native` and `data` in path order, the distance on the disk between the end
of one file's extents and the start of the next (`filefrag`), in 4 KiB blocks. Prints the
medians and writes the samples to OUT/tree_layout.json. Needs root.
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (ESTARGZ, IMAGES, Link, arguments, drop_caches, push_image, run,  # noqa: E402
                      start, unpacked)
from reads import Mount, files_of, read_seq  # noqa: E402

MODES = ("native", "warm", "data", "data-inode", "small-big", "native-small-big",
         "native-tar", "warm-tar")
CHUNK = 4 << 20


def seek_blocks(paths):
    """Sum of the gaps between consecutive files' extents, in 4 KiB blocks, and extents."""
    total, prev, extents = 0, None, 0
    for p in paths:
        out = subprocess.run(["filefrag", "-v", "-b4096", p], capture_output=True, text=True,
                             check=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):", line)
            if m:
                first, last = int(m.group(1)), int(m.group(2))
                if prev is not None:
                    total += abs(first - prev)
                prev = last + 1
                extents += 1
    return total, extents


def tar_read(root):
    """Bytes of `tar -cf - .` in ROOT (piped: GNU tar skips reading when writing to
    /dev/null) and the seconds it took."""
    t0 = time.perf_counter()
    out = subprocess.run(["bash", "-c", f"tar -C '{root}' -cf - . | wc -c"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip()), time.perf_counter() - t0


def main():
    ap = arguments(__doc__, samples=5)
    ap.add_argument("--image", default="gcc", choices=sorted(IMAGES))
    args = ap.parse_args()
    out, work = start(args, "tree-layout")
    samples, layout = [], {}
    try:
        native = unpacked(work, args.image)
        files = [(rel, size) for rel, size in files_of(native) if size > 0]
        link = Link("loopback", work)
        try:
            orig, _ = push_image(link, work, args.image, layered=False)
            ref = orig.replace(":orig", ":esgz")
            link.cmd([ESTARGZ, "convert", orig, ref, "--quiet"])
            cache = work / "warm-cache"
            m = Mount(link, ref, work / "mnt", cache)
            try:
                read_seq(m.dir, files)
            finally:
                m.close()
            m = Mount(link, ref, work / "mnt", cache)
            try:
                erofs = [line.split()[1] for line in open("/proc/self/mounts")
                         if line.split()[2] == "erofs" and str(cache) in line]
                if len(erofs) != 1:
                    raise RuntimeError(f"the warm mount is not served without FUSE: {erofs}")
                meta = Path(erofs[0])
                data = meta.parent / "data"
                def content_of(rel):
                    try:
                        to = os.getxattr(meta / rel, "trusted.overlay.redirect")
                    except OSError:
                        return meta / rel  # a small file the image holds
                    return data / to.decode().lstrip("/")
                content = [content_of(rel) for rel, _ in files]
                by_inode = sorted(content, key=lambda p: p.stat().st_ino)

                def small_then_big(paths):
                    sized = list(zip(paths, (size for _, size in files)))
                    return ([p for p, size in sized if size < CHUNK]
                            + [p for p, size in sized if size >= CHUNK])
                orders = {
                    "data": content,
                    "data-inode": by_inode,
                    "small-big": small_then_big(content),
                    "native-small-big": small_then_big([native / rel for rel, _ in files]),
                }
                layout = {
                    "native": seek_blocks([native / rel for rel, _ in files]),
                    "data": seek_blocks(content),
                }
                for i in range(args.samples):
                    for mode in MODES:
                        drop_caches()
                        if mode == "native":
                            n, secs = read_seq(native, files)
                        elif mode == "warm":
                            n, secs = read_seq(m.dir, files)
                        elif mode.endswith("-tar"):
                            n, secs = tar_read(native if mode == "native-tar" else m.dir)
                        else:
                            n, secs = read_seq(Path("/"), [(p, 0) for p in orders[mode]])
                        samples.append({"mode": mode, "seconds": secs, "bytes": n})
                        print(f"# {mode}: {secs:.3f}s", file=sys.stderr, flush=True)
            finally:
                m.close()
        finally:
            link.close()
    finally:
        run(["umount", "-l", work / "mnt"], check=False)
        shutil.rmtree(work, ignore_errors=True)
    (out / "tree_layout.json").write_text(json.dumps(
        {"image": args.image, "samples": samples, "seek_blocks": layout}, indent=1))
    native_s = statistics.median(s["seconds"] for s in samples if s["mode"] == "native")
    print(f"image {args.image}: {len(files)} files\n")
    print("| read | median s | x native | seek distance (4 KiB blocks) | extents |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        secs = statistics.median(s["seconds"] for s in samples if s["mode"] == mode)
        seek, extents = layout.get(mode, ("", ""))
        seek = f"{seek:,}" if seek != "" else ""
        print(f"| {mode} | {secs:.3f} | {native_s / secs:.2f} | {seek} | {extents} |")


if __name__ == "__main__":
    main()
