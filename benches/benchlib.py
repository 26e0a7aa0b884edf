"""Shared pieces of the benchmarks: running commands, the emulated link to the registry,
and building the Debian images."""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "testdata" / "scripts"
ESTARGZ = REPO / "target" / "release" / "estargz"
SNAPSHOTTER = REPO / "target" / "release" / "estargz-snapshotter"


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


# Images built from Debian packages (testdata/scripts/rootfs.sh, one layer each); None is
# rootfs.sh's default set (python3.11 and a shell).
IMAGES = {
    "python": None,
    "gcc": "base-files bash coreutils dash libc6 libselinux1 libpcre2-8-0 libacl1 libattr1 "
           "libgmp10 zlib1g gcc gcc-12 cpp-12 libgcc-12-dev libgcc-s1 libc6-dev libc-dev-bin "
           "linux-libc-dev libcrypt-dev libcrypt1 binutils binutils-x86-64-linux-gnu "
           "binutils-common libbinutils libctf0 libctf-nobfd0 libgprofng0 libjansson4 libisl23 "
           "libmpc3 libmpfr6 libzstd1 libstdc++6 libgomp1 libitm1 libatomic1 libasan8 liblsan0 "
           "libtsan2 libubsan1 libquadmath0 libcc1-0",
}


def arguments(doc, samples, links=True):
    """An argument parser with what every benchmark takes: --samples and --out, and with
    `links` the emulated link's --links, --rate and --rtt-ms."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--samples", type=int, default=samples)
    ap.add_argument("--out", default=str(REPO / "target" / "bench"))
    if links:
        ap.add_argument("--links", default="loopback,wan")
        ap.add_argument("--rate", default="100mbit")
        ap.add_argument("--rtt-ms", type=float, default=20)
    return ap


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


def image_tar(work, image):
    """The root filesystem tar of one of IMAGES (built once per work directory)."""
    tar = work / f"rootfs-{image}.tar"
    if not tar.exists():
        env = {"ROOTFS_PACKAGES": IMAGES[image]} if IMAGES[image] else {}
        run(["bash", str(SCRIPTS / "rootfs.sh"), tar], env=env)
    return tar


def push_image(link, work, image):
    """Pushes one of IMAGES, as an ordinary one-layer gzip image, to LINK's registry as
    bench/IMAGE:orig. Returns the reference and the compressed size of its layers."""
    layout = work / f"image-{image}"
    if not layout.exists():
        run(["bash", "-c", f'. "{SCRIPTS}/lib.sh"; '
                           f'make_oci_image "{layout}" orig "" "{image_tar(work, image)}"'])
    ref = f"{link.addr}/bench/{image}:orig"
    link.cmd(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:orig",
              f"docker://{ref}"])
    return ref, sum(layer["size"] for layer in manifest(link, ref)["layers"])


def manifest(link, ref):
    """The OCI manifest of REF (host/repository:tag) in LINK's registry."""
    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    return json.loads(link.cmd(["curl", "-sf", "-H",
                                "Accept: application/vnd.oci.image.manifest.v1+json",
                                f"http://{host}/v2/{repo}/manifests/{tag}"]))


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
