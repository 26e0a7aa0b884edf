#!/usr/bin/env python3
"""What a start touches, page by page: the floor of the bytes a lazy start must fetch.

    python3 benches/touched_pages.py [--workloads python3,python-imports,gcc] [--out DIR]

Each workload of time_to_ready.py runs once, natively (chroot), in its image unpacked on an
ext4 file system of its own (a loop device) whose read-ahead is off, right after the page
cache is dropped: the pages of the image's files in the page cache afterwards (mincore) are
the pages the start touched, without the kernel's read-ahead around them. For the files it
touched, prints the bytes it opened and touched, and the compressed bytes (zlib level 9,
each piece compressed alone as a gzip member is) that a start would fetch if it fetched
exactly the chunks holding a touched page, for chunks of 64 KiB to 4 MiB, against
fetching the files whole. Also the share of the unwind tables (`.eh_frame_hdr`,
`.eh_frame`, `.gcc_except_table`, which a start does not read) of the compressed bytes:
whole, and what is left of them with the 512 KiB of a lazy layer's 1 MiB kernel
read-around taken off each end (a fault next to them reads that far into them).

Then the same with each touched page widened to the window a fault reads at a read-ahead
of 128 KiB (the kernel's default) and of 1 MiB (our layers'), and for what `estargz
optimize` records: the workload run in a container on the image's layers mounted lazily,
its recorded read ranges (`--record-json`; recording layers turn the kernel's read-ahead
off) taken as the touched pages.
Writes OUT/touched_pages.json. Needs root.
"""
import ctypes
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from benchlib import (ESTARGZ, arguments, check_prerequisites, choices, drop_caches,
                      image_layout, image_tar, run)
from time_to_ready import DEFAULT_WORKLOADS, WORKLOADS

PAGE = 4096
GRAINS = (64 << 10, 256 << 10, 1 << 20, 4 << 20)
UNWIND = {".eh_frame_hdr", ".eh_frame", ".gcc_except_table"}
# Half of the 1 MiB read-ahead our layers set (KERNEL_READ_AHEAD_KB): the mmap read-around
# window is centred on the faulting page.
READ_AROUND = 512 << 10

libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(path):
    """Which pages of the file at PATH are in the page cache (mapping a file reads none)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return [b & 1 for b in vec.raw]
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def touched_files(root):
    """{path: page vector} of the regular files under ROOT with a page in the cache."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 0:
                vec = resident_pages(p)
                if any(vec):
                    out[p] = vec
    return out


@functools.cache
def unwind_range(path):
    """The file range from the first to the end of the last unwind-table section, or None
    (once per file: every row of a workload measures the same files)."""
    text = subprocess.run(["readelf", "-SW", path], capture_output=True, text=True).stdout
    spans = []
    for line in text.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+(\S+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)",
                     line)
        if m and m.group(1) in UNWIND and m.group(2) != "NOBITS":
            off, size = int(m.group(3), 16), int(m.group(4), 16)
            spans.append((off, off + size))
    return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None


def gz(data):
    return len(zlib.compress(data, 9))


def measure(pages):
    """The table row for one workload's touched files."""
    row = {"files": len(pages), "opened": 0, "touched": 0, "whole_gz": 0,
           "grain_gz": {g: 0 for g in GRAINS}, "unwind_gz": 0, "unwind_beyond_gz": 0,
           "unwind_touched_pages": 0}
    for path, vec in pages.items():
        data = Path(path).read_bytes()
        row["opened"] += len(data)
        row["touched"] += sum(vec) * PAGE
        row["whole_gz"] += gz(data)
        for g in GRAINS:
            per = g // PAGE
            row["grain_gz"][g] += sum(gz(data[i * PAGE:i * PAGE + g])
                                      for i in range(0, len(vec), per) if any(vec[i:i + per]))
        if data[:4] == b"\x7fELF" and (span := unwind_range(path)):
            lo, hi = span
            row["unwind_gz"] += gz(data[lo:hi])
            row["unwind_touched_pages"] += sum(vec[lo // PAGE:(hi + PAGE - 1) // PAGE])
            lo = -(-(lo + READ_AROUND) // PAGE) * PAGE
            hi = (hi - READ_AROUND) // PAGE * PAGE
            if hi > lo:
                row["unwind_beyond_gz"] += gz(data[lo:hi])
    return row


def widened(pages, read_ahead):
    """PAGES with each touched page widened to the window a fault's read-around reads at a
    read-ahead of READ_AHEAD bytes (centred on the page; sequential read-ahead, which runs
    further, is left out)."""
    half = read_ahead // 2 // PAGE
    out = {}
    for path, vec in pages.items():
        w = [0] * len(vec)
        for p in (i for i, t in enumerate(vec) if t):
            lo, hi = max(0, p - half), min(len(vec), p + half)
            w[lo:hi] = [1] * (hi - lo)
        out[path] = w
    return out


def fuse_pages(work, wl, root):
    """{path under ROOT: page vector} of what `estargz optimize` recorded when it ran
    workload WL on its image (its recorded read ranges)."""
    image, command = WORKLOADS[wl]
    layout = image_layout(work, image)
    record = work / f"record-{wl}.json"
    run([ESTARGZ, "optimize", f"oci:{layout}:orig", f"oci:{work / ('opt-' + wl)}:opt",
         "--quiet", "--record-json", record, "--work-dir", work / f"optimize-{wl}", "--",
         *command])
    pages = {}
    for a in json.loads(record.read_text())["accesses"]:
        path = root / a["path"].lstrip("/")
        if a["symlink"] or not a["ranges"] or not path.is_file():
            continue
        vec = pages.setdefault(str(path), [0] * ((path.stat().st_size + PAGE - 1) // PAGE))
        for start, end in a["ranges"]:
            for p in range(start // PAGE, min((end + PAGE - 1) // PAGE, len(vec))):
                vec[p] = 1
    return pages


def main():
    ap = arguments(__doc__, samples=1)
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    type=choices([w for w in WORKLOADS if w != "model"]))
    args = ap.parse_args()
    check_prerequisites()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="esgz-pages.", dir="/var/tmp"))
    rows, loop, mnt = {}, None, work / "mnt"
    try:
        img = work / "fs.img"
        with open(img, "wb") as f:
            f.truncate(2 << 30)
        run(["mkfs.ext4", "-q", img])
        loop = run(["losetup", "-f", "--show", img]).strip()
        mnt.mkdir()
        run(["mount", loop, mnt])
        Path(f"/sys/block/{os.path.basename(loop)}/queue/read_ahead_kb").write_text("0")
        for wl in args.workloads:
            image, command = WORKLOADS[wl]
            root = mnt / wl
            root.mkdir()
            run(["tar", "-xf", image_tar(work, image), "-C", root])
            drop_caches()
            run(["chroot", root] + command)
            pages = touched_files(root)
            rows[wl] = measure(pages)
            print(f"# {wl}: {rows[wl]['touched']:,} of {rows[wl]['opened']:,} bytes touched",
                  file=sys.stderr, flush=True)
            for ra in (128 << 10, 1 << 20):
                rows[f"{wl}, widened by a {ra >> 10} KiB read-around"] = measure(
                    widened(pages, ra))
            asked = f"{wl}, recorded by estargz optimize"
            rows[asked] = measure(fuse_pages(work, wl, root))
            print(f"# {asked}: {rows[asked]['touched']:,} of {rows[asked]['opened']:,} bytes",
                  file=sys.stderr, flush=True)
    finally:
        if mnt.is_mount():
            run(["umount", mnt], check=False)
        if loop:
            run(["losetup", "-d", loop], check=False)
        subprocess.run(["rm", "-rf", str(work)])
    (out / "touched_pages.json").write_text(json.dumps(rows, indent=1))
    print("| workload | files | opened | touched (4 KiB pages) | compressed, files whole | "
          + " | ".join(f"chunks of {g >> 10} KiB holding a touched page" for g in GRAINS)
          + " | unwind tables | unwind tables beyond the read-around |")
    print("|---|---|---|---|---|" + "---|" * len(GRAINS) + "---|---|")
    for wl, r in rows.items():
        w = r["whole_gz"]
        pct = lambda n: f"{n:,} ({100 * n / w:.0f} %)"  # noqa: E731
        print(f"| {wl} | {r['files']} | {r['opened']:,} | {r['touched']:,} "
              f"({100 * r['touched'] / r['opened']:.0f} %) | {w:,} | "
              + " | ".join(pct(r["grain_gz"][g]) for g in GRAINS)
              + f" | {pct(r['unwind_gz'])} | {pct(r['unwind_beyond_gz'])} |")


if __name__ == "__main__":
    main()
