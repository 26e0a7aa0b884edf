"""Shared pieces of the benchmarks: running commands, the emulated links to the registry,
building the Debian images, and the reference snapshotter."""
import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "testdata" / "scripts"
# The binaries under test; the environment can name others (to compare two builds).
ESTARGZ = Path(os.environ.get("ESTARGZ_BIN", REPO / "target" / "release" / "estargz"))
SNAPSHOTTER = Path(os.environ.get("SNAPSHOTTER_BIN",
                                  REPO / "target" / "release" / "estargz-snapshotter"))
# The reference daemon (containerd/stargz-snapshotter v0.12 built from Debian's Go sources).
REFERENCE = REPO / "target" / "ref" / "stargz-ref"

# The links to the registry: name -> (rate in Mbit/s, round-trip time in ms). A shaped link
# is a network namespace whose loopback is limited with tc tbf, behind delay_proxy.py (netem
# is not available here); registry, containerd, daemons and clients all run inside it.
# Blob bytes cross that loopback twice (registry to proxy, proxy to client), so tbf gets
# twice the link's rate: with the rate itself, a 100 Mbit/s link moved 6.2 MB/s.
# 1gbit is a fast link with a long round trip (a node pulling from another region): starts
# there are bound by round trips rather than bytes.
LINKS = {"loopback": (None, 0), "100mbit": (100, 20), "20mbit": (20, 50), "1gbit": (1000, 50)}


class Link:
    """Where the registry is, and how every command reaches it. With `data`, the registry
    starts with a copy (hard links) of that registry storage: images prepared once
    elsewhere."""

    def __init__(self, name, work, data=None):
        if name not in LINKS:
            raise ValueError(f"unknown link {name!r}; known: {', '.join(LINKS)}")
        self.name = name
        self.rate, self.rtt_ms = LINKS[name]
        self.netns = None
        self.proxy = None
        self.prefix = []
        if self.rate:
            self.netns = f"esgz-{name}-{os.getpid()}"
            run(["ip", "netns", "add", self.netns])
            self.prefix = ["nsenter", f"--net=/run/netns/{self.netns}"]
            run(self.prefix + ["ip", "link", "set", "lo", "up"])
            run(self.prefix + ["tc", "qdisc", "replace", "dev", "lo", "root", "tbf",
                               "rate", f"{2 * self.rate}mbit", "burst", "256kb",
                               "latency", "50ms"])
        reg_dir = work / f"reg-{name}"
        self.registry_dir = reg_dir
        if data:
            reg_dir.mkdir(parents=True)
            run(["cp", "-al", data, reg_dir / "data"])
        addr = run(self.prefix + ["bash", str(SCRIPTS / "registry.sh"), "start", str(reg_dir)],
                   env={"REGISTRY_LOG_LEVEL": "info"}).strip()
        self.addr = addr
        if self.rate:
            port = free_port(self.prefix)
            self.proxy = subprocess.Popen(
                self.prefix + [sys.executable, str(REPO / "benches" / "delay_proxy.py"),
                               str(port), addr, str(self.rtt_ms / 2)],
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
            self.proxy.wait()
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


# Images built from Debian packages (testdata/scripts/rootfs.sh): each image's full package
# set (None is rootfs.sh's default: python3.11 and a shell). Pushed as two layers: the
# Debian base the images share (BASE_PACKAGES) and the rest of the image.
BASE_PACKAGES = ("base-files bash coreutils dash libc6 libselinux1 libpcre2-8-0 libacl1 "
                 "libattr1 libgmp10 zlib1g")
IMAGES = {
    "python": None,
    "gcc": "base-files bash coreutils dash libc6 libselinux1 libpcre2-8-0 libacl1 libattr1 "
           "libgmp10 zlib1g gcc gcc-12 cpp-12 libgcc-12-dev libgcc-s1 libc6-dev libc-dev-bin "
           "linux-libc-dev libcrypt-dev libcrypt1 binutils binutils-x86-64-linux-gnu "
           "binutils-common libbinutils libctf0 libctf-nobfd0 libgprofng0 libjansson4 libisl23 "
           "libmpc3 libmpfr6 libzstd1 libstdc++6 libgomp1 libitm1 libatomic1 libasan8 liblsan0 "
           "libtsan2 libubsan1 libquadmath0 libcc1-0",
}

# An image of a large file read start to end (an AI model's weights): the Debian base and a
# layer with MODEL_FILE, MODEL_BYTES (environment, default 2 GiB) of generated weights.
MODEL = "model"
IMAGES[MODEL] = None
MODEL_FILE = "models/model.bin"
MODEL_BYTES = int(os.environ.get("MODEL_BYTES", 2 << 30))


class _Weights:
    """A file object reading `size` bytes of bfloat16-like weights (about N(0, 0.02)):
    a low byte of sign-free noise, and a high byte (sign and exponent) from a handful of
    values, as trained weights have. Deflate gets them to about 70 %: partly compressible,
    like real model files. Seeded: every run writes the same bytes."""

    BLOCK = 16 << 20

    def __init__(self, size):
        self.left = size
        self.rng = random.Random(2172)
        # High bytes: exponents 0x3a-0x3c mostly (|w| ~ 2^-10 .. 2^-5), either sign.
        weights = {0x3c: 40, 0x3b: 30, 0x3a: 15, 0x39: 8, 0x3d: 4, 0x38: 3}
        table = [h | sign for h, w in weights.items() for _ in range(w) for sign in (0, 0x80)]
        self.table = bytes(table[i * len(table) // 256] for i in range(256))
        self.block, self.at = b"", 0

    def _refill(self):
        half = min(self.BLOCK, self.left) // 2
        if half == 0:
            self.block = self.rng.randbytes(self.left)
        else:
            block = bytearray(2 * half)
            block[0::2] = self.rng.randbytes(half)
            block[1::2] = self.rng.randbytes(half).translate(self.table)
            self.block = bytes(block)
        self.left -= len(self.block)
        self.at = 0

    def read(self, n=-1):
        out = []
        while n != 0:
            if self.at == len(self.block):
                if self.left == 0:
                    break
                self._refill()
            take = len(self.block) - self.at if n < 0 else min(n, len(self.block) - self.at)
            out.append(self.block[self.at:self.at + take])
            self.at += take
            n = n - take if n > 0 else n
        return b"".join(out)


def model_layer(work):
    """The layer tar of MODEL: models/ and models/model.bin (MODEL_BYTES), built once per
    work directory."""
    tar = work / f"layer-model-{MODEL_BYTES}.tar"
    if not tar.exists():
        part = tar.with_suffix(".part")
        with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as t:
            d = tarfile.TarInfo(os.path.dirname(MODEL_FILE))
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            t.addfile(d)
            f = tarfile.TarInfo(MODEL_FILE)
            f.size, f.mode, f.mtime = MODEL_BYTES, 0o644, 1700000000
            t.addfile(f, _Weights(MODEL_BYTES))
        part.rename(tar)
    return tar


def arguments(doc, samples, links=None):
    """An argument parser with what every benchmark takes: --samples and --out, and when
    `links` is given (its default, e.g. "loopback,100mbit"), --links: names of LINKS."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--samples", type=int, default=samples)
    ap.add_argument("--out", default=str(REPO / "target" / "bench"))
    if links:
        ap.add_argument("--links", default=links, type=choices(LINKS),
                        help=f"comma-separated, of: {', '.join(LINKS)} (default {links})")
    return ap


def choices(known):
    """An argparse type: a comma-separated list of names from KNOWN."""
    def parse(text):
        names = [n for n in text.split(",") if n]
        for n in names:
            if n not in known:
                raise argparse.ArgumentTypeError(f"unknown {n!r}; known: {', '.join(known)}")
        return names
    return parse


def start(args, name):
    """Checks the prerequisites; returns the output directory (created) and a new work
    directory on the disk the snapshotter's state would be on (not tmpfs)."""
    check_prerequisites()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, Path(tempfile.mkdtemp(prefix=f"esgz-{name}.", dir="/var/tmp"))


def check_prerequisites():
    """The release binaries, and the tools the benchmarks drive (installed with apt when
    missing)."""
    for b in (ESTARGZ, SNAPSHOTTER):
        if not b.exists():
            sys.exit(f"{b} is missing: run `cargo build --release` first")
    run(["bash", "-c", f'. "{SCRIPTS}/lib.sh"; need strace strace; need curl curl; '
                       'need skopeo skopeo; need ctr-remote stargz-snapshotter'])


def rootfs_tar(work, name, packages):
    """A root filesystem tar of PACKAGES (None: rootfs.sh's default), built once per work
    directory as work/rootfs-NAME.tar."""
    tar = work / f"rootfs-{name}.tar"
    if not tar.exists():
        run(["bash", str(SCRIPTS / "rootfs.sh"), tar],
            env={"ROOTFS_PACKAGES": packages} if packages else {})
    return tar


def image_tar(work, image):
    """The whole root filesystem of one of IMAGES, as one tar (for MODEL, its model layer
    alone: a file to read, no programs)."""
    if image == MODEL:
        return model_layer(work)
    return rootfs_tar(work, image, IMAGES[image])


def unpacked(work, image):
    """One of IMAGES unpacked (image_tar), as an ordinary pull leaves it, once per work
    directory as work/rootfs-IMAGE; returns that directory."""
    root = work / f"rootfs-{image}"
    if not root.exists():
        root.mkdir()
        run(["tar", "-xf", image_tar(work, image), "-C", root])
    return root


def image_layers(work, image):
    """The layer tars of one of IMAGES, bottom first: the shared Debian base, and the
    entries of the image that the base does not have identically (for MODEL, the model
    layer)."""
    base = rootfs_tar(work, "base", BASE_PACKAGES)
    if image == MODEL:
        return [base, model_layer(work)]
    app = work / f"layer-{image}.tar"
    if not app.exists():
        upper_layer(base, image_tar(work, image), app)
    return [base, app]


def upper_layer(lower_tar, full_tar, out):
    """Writes OUT, the layer that turns LOWER_TAR into FULL_TAR: every entry of FULL_TAR
    that LOWER_TAR does not have identically (see identity), with its parent directories
    and the rest of its hard link group, in FULL_TAR's order."""
    def entries(path):
        with tarfile.open(path) as t:
            return {m.name: (m, identity(t, m)) for m in t.getmembers()}

    lower, full = entries(lower_tar), entries(full_tar)
    gone = sorted(set(lower) - set(full))
    if gone:
        raise RuntimeError(f"{full_tar} lacks {len(gone)} entries of {lower_tar} "
                           f"(e.g. {gone[0]}): the base is not a lower layer of the image")
    keep = {n for n, (_, ident) in full.items() if lower.get(n, (None, None))[1] != ident}
    groups = {}  # hard link groups, by the entry they link to
    for n, (m, _) in full.items():
        if m.islnk():
            groups.setdefault(m.linkname, {m.linkname}).add(n)
    for group in groups.values():
        if keep & group:
            keep |= group
    for n in list(keep):
        while n not in (".", ""):
            n = os.path.dirname(n) or "."
            keep.add(n)
    with tarfile.open(full_tar) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            if m.name in keep:
                dst.addfile(m, src.extractfile(m) if m.isreg() else None)


def identity(tar, m):
    """What makes tar entry M of TAR the same file: type, metadata, xattrs, content."""
    digest = hashlib.sha256(tar.extractfile(m).read()).hexdigest() if m.isreg() else None
    return (m.type, m.mode, m.uid, m.gid, m.uname, m.gname, m.size, m.mtime, m.linkname,
            m.devmajor, m.devminor, sorted(m.pax_headers.items()), digest)


def image_layout(work, image, layered=True):
    """One of IMAGES as an ordinary gzip image (two layers, see image_layers; one with
    layered=False) in an OCI layout under WORK, tagged orig, built once; returns its
    directory."""
    layers = image_layers(work, image) if layered else [image_tar(work, image)]
    layout = work / f"image-{image}-{len(layers)}"
    if not layout.exists():
        run(["bash", "-c", f'. "{SCRIPTS}/lib.sh"; make_oci_image "$@"', "-",
             layout, "orig", ""] + layers)
    return layout


def push_image(link, work, image, layered=True):
    """Pushes one of IMAGES, as an ordinary gzip image (image_layout), to LINK's registry
    as bench/IMAGE:orig. Returns the reference and the compressed size of its layers."""
    layout = image_layout(work, image, layered)
    ref = f"{link.addr}/bench/{image}:orig"
    link.cmd(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:orig",
              f"docker://{ref}"])
    return ref, image_bytes(link, ref)


def manifest(link, ref, raw=False):
    """The OCI manifest of REF (host/repository:tag) in LINK's registry (its bytes, as
    text, with raw)."""
    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    text = link.cmd(["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
                     f"http://{host}/v2/{repo}/manifests/{tag}"])
    return text if raw else json.loads(text)


def manifest_digest(link, ref):
    """The digest of REF's manifest (sha256:...)."""
    return "sha256:" + hashlib.sha256(manifest(link, ref, raw=True).encode()).hexdigest()


def image_bytes(link, ref):
    """The compressed size of REF's layers."""
    return sum(layer["size"] for layer in manifest(link, ref)["layers"])


def reference_binary():
    """The reference daemon, built (about 2 minutes) when missing with
    $STARGZ_REF_BUILD (default: ../shared/reference/build.sh beside the repository)."""
    if not REFERENCE.exists():
        script = os.environ.get("STARGZ_REF_BUILD",
                                str(REPO.parent / "shared" / "reference" / "build.sh"))
        print(f"# building the reference snapshotter with {script}", file=sys.stderr, flush=True)
        run(["bash", script, REFERENCE], timeout=1800)
    return REFERENCE


def drop_caches():
    """Empties the kernel's page cache (and dentries and inodes), after writing back."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fuse_mounts(under):
    """How many FUSE filesystems are mounted below the directory UNDER."""
    prefix = str(under).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        return sum(1 for line in f
                   if line.split()[2].startswith("fuse") and line.split()[1].startswith(prefix))


def metric_sum(cmd, addr, name):
    """The sum over all series of metric NAME of the daemon serving metrics at ADDR, fetched
    with CMD (`run`, or a link's `cmd` inside its network)."""
    text = cmd(["curl", "-sf", f"http://{addr}/metrics"])
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)", text, re.M))


def wait_background_fetch(cmd, addr, seconds=120):
    """Until every mounted layer's chunks are cached (the background fetch is done)."""
    for _ in range(seconds * 10):
        want = metric_sum(cmd, addr, "estargz_layer_chunks")
        if want and metric_sum(cmd, addr, "estargz_layer_cached_chunks") >= want:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the background fetch did not finish in {seconds} s")


def p95(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
