#!/usr/bin/env python3
"""A design experiment, not the product: how fast would a whole-tree read run if a layer
whose content is all local were served without FUSE, as an EROFS image of its metadata
over the content-addressed files (the composefs layout)?

    python3 benches/tree_erofs.py [--samples N] [--image gcc] [--out DIR]

The warm whole-tree read through our FUSE layer (BENCHMARKS.md) pays per file a FUSE
LOOKUP, GETXATTR, OPEN and RELEASE; this measures what a layout without them reaches. For
one of the benchmark images, unpacked on the disk the snapshotter's state would be on:

  native          the unpacked files
  overlay         the unpacked files as the lower of a read-only overlay
  erofs           an EROFS image (`mkfs.erofs`, erofs-utils) holding the tree's metadata;
                  each regular file in it is empty but for its size and the overlay
                  xattrs `trusted.overlay.metacopy` and `trusted.overlay.redirect`, which
                  point at its content in a directory of files named by their sha256
                  (as the chunk cache names chunks), the overlay's data-only lower layer
                  (`lowerdir=META::DATA`, Linux 6.5 and later)
  erofs-nested    a writable overlay (a container's) over the `erofs` overlay

The tree read is the one of `reads.py` (every regular file start to end, 128 KiB reads),
with the page cache dropped before each. Prints a Markdown table of medians and writes
the samples to OUT/tree_erofs.json. Needs root and erofs-utils (installed when missing).
"""
import hashlib
import json
import os
import shutil
import stat
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import IMAGES, SCRIPTS, arguments, drop_caches, run, start, unpacked  # noqa: E402
from reads import files_of, read_seq  # noqa: E402


def metadata_tree(native, meta, data):
    """Copies NATIVE's tree to META with empty regular files redirected into DATA, which
    gets each distinct content once, named by its sha256 as `/xx/hex`."""
    for dirpath, _, names in os.walk(native):
        rel = os.path.relpath(dirpath, native)
        out = meta / rel if rel != "." else meta
        out.mkdir(parents=True, exist_ok=True)
        st = os.lstat(dirpath)
        os.chown(out, st.st_uid, st.st_gid)
        os.chmod(out, stat.S_IMODE(st.st_mode))
        for name in names:
            src, dst = os.path.join(dirpath, name), out / name
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
                os.lchown(dst, st.st_uid, st.st_gid)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # the benchmark images hold no devices or fifos
            content = Path(src).read_bytes()
            hexd = hashlib.sha256(content).hexdigest()
            target = data / hexd[:2] / hexd
            if not target.exists():
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(content)
            with open(dst, "wb") as f:
                f.truncate(st.st_size)
            if st.st_size:
                os.setxattr(dst, "trusted.overlay.metacopy", b"")
                os.setxattr(dst, "trusted.overlay.redirect", f"/{hexd[:2]}/{hexd}".encode())
            os.chown(dst, st.st_uid, st.st_gid)
            os.chmod(dst, stat.S_IMODE(st.st_mode))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def main():
    ap = arguments(__doc__, samples=5)
    ap.add_argument("--image", default="gcc", choices=sorted(IMAGES))
    args = ap.parse_args()
    out, work = start(args, "tree-erofs")
    run(["bash", "-c", f'. "{SCRIPTS}/lib.sh"; need mkfs.erofs erofs-utils'])
    mounted = []

    def mount(*a):
        target = Path(a[-1])
        target.mkdir(parents=True, exist_ok=True)
        run(["mount", *a])
        mounted.append(target)
        return target

    samples = []
    try:
        native = unpacked(work, args.image)
        files = files_of(native)
        meta, data = work / "meta", work / "data"
        data.mkdir()
        metadata_tree(native, meta, data)
        run(["mkfs.erofs", "--quiet", "--chunksize=4096", work / "meta.img", meta])
        image_bytes = (work / "meta.img").stat().st_size
        (work / "empty").mkdir()
        roots = {"native": native}
        roots["overlay"] = mount("-t", "overlay", "overlay", "-o",
                                 f"ro,lowerdir={native}:{work / 'empty'}", work / "ov")
        erofs = mount("-t", "erofs", "-o", "ro", work / "meta.img", work / "erofs")
        roots["erofs"] = mount("-t", "overlay", "overlay", "-o",
                               f"ro,metacopy=on,redirect_dir=follow,lowerdir={erofs}::{data}",
                               work / "composed")
        for d in ("up", "wk"):
            (work / d).mkdir()
        roots["erofs-nested"] = mount(
            "-t", "overlay", "overlay", "-o",
            f"lowerdir={roots['erofs']},upperdir={work / 'up'},workdir={work / 'wk'}",
            work / "container")
        for _ in range(args.samples):
            for mode, root in roots.items():
                drop_caches()
                n, secs = read_seq(root, files)
                samples.append({"mode": mode, "seconds": secs, "bytes": n})
                print(f"# {mode}: {secs:.3f}s", file=sys.stderr, flush=True)
    finally:
        for m in reversed(mounted):
            run(["umount", m], check=False)
        shutil.rmtree(work, ignore_errors=True)
    (out / "tree_erofs.json").write_text(json.dumps(
        {"image": args.image, "files": len(files), "metadata_image_bytes": image_bytes,
         "samples": samples}, indent=1))
    native_s = statistics.median(s["seconds"] for s in samples if s["mode"] == "native")
    print(f"{args.image}: {len(files)} files; metadata image {image_bytes:,} bytes\n")
    print("| tree read from | median s | MB/s | x native |")
    print("|---|---|---|---|")
    for mode in roots:
        secs = statistics.median(s["seconds"] for s in samples if s["mode"] == mode)
        mb = statistics.median(s["bytes"] for s in samples if s["mode"] == mode) / secs / 1e6
        print(f"| {mode} | {secs:.3f} | {mb:.0f} | {native_s / secs:.2f} |")


if __name__ == "__main__":
    main()
