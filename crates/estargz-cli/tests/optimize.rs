//! `estargz optimize` with real runc, FUSE and overlayfs: what a container reads is
//! recorded in the layer whose version it saw, in order, and converted first; a workload
//! that never exits is stopped by the timeout, by --wait-for and by Ctrl-C, and nothing is
//! left mounted or running afterwards. Needs root, /dev/fuse and runc.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use estargz_format::{EntryKind, EstargzReader, OpenOptions};
use estargz_oci::{OciLayout, Platform};
use estargz_testutil::{files_tar, real_rootfs_tar, require_root_and_fuse, write_oci_image_with};

/// A two-layer image: a Debian root file system, and an application layer with three
/// files and its own version of one file of the base.
fn image(dir: &Path, run_config: &str) -> String {
    require_root_and_fuse("estargz optimize");
    let base = real_rootfs_tar(dir);
    let app = files_tar(&[
        ("app/a", b"first file\n"),
        ("app/b", b"second file\n"),
        ("app/c", b"never read\n"),
        ("app/big", &[7u8; 1 << 20]),
        ("etc/debian_version", b"the application's version\n"),
    ]);
    let layout = OciLayout::create(dir.join("src")).unwrap();
    let m = write_oci_image_with(
        &layout,
        &[base, app],
        &Platform::host().architecture,
        run_config,
    );
    layout.set_tag(Some("orig"), m).unwrap();
    format!("oci:{}:orig", dir.join("src").display())
}

fn optimize(src: &str, dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_estargz"))
        .arg("optimize")
        .arg(src)
        .arg(format!("oci:{}:opt", dir.join("dst").display()))
        .arg("--record-json")
        .arg(dir.join("record.json"))
        .arg("--record-out")
        .arg(dir.join("record.txt"))
        .args(["--quiet"])
        .args(extra)
        .output()
        .unwrap()
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("record.json")).unwrap()).unwrap()
}

/// Regular files recorded as opened in `layer`, in order.
fn recorded(record: &serde_json::Value, layer: u64) -> Vec<String> {
    record["accesses"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["layer"] == layer && a["symlink"] == false && a["opened"] == true)
        .map(|a| a["path"].as_str().unwrap().to_string())
        .collect()
}

/// Regular files before the landmark of each layer of the optimized image.
fn prioritized_files(dir: &Path) -> Vec<Vec<String>> {
    let layout = OciLayout::open(dir.join("dst")).unwrap();
    let desc = layout.resolve(Some("opt")).unwrap();
    let manifest = layout.read_manifest(&desc).unwrap();
    manifest
        .layers
        .iter()
        .map(|l| {
            let file = std::fs::File::open(layout.blob_path(&l.digest)).unwrap();
            let r = EstargzReader::open(file, &OpenOptions::default()).unwrap();
            let toc = r.toc();
            toc.prioritized()
                .into_iter()
                .map(|i| toc.entry(i))
                .filter(|e| e.kind == EntryKind::Reg)
                .map(|e| e.name.clone())
                .collect()
        })
        .collect()
}

/// Of file `path` in layer `layer` of the optimized image: its number of chunks and those
/// the TOC marks `readAtStart`.
fn read_at_start(dir: &Path, layer: usize, path: &str) -> (usize, Vec<u32>) {
    let layout = OciLayout::open(dir.join("dst")).unwrap();
    let desc = layout.resolve(Some("opt")).unwrap();
    let manifest = layout.read_manifest(&desc).unwrap();
    let file = std::fs::File::open(layout.blob_path(&manifest.layers[layer].digest)).unwrap();
    let r = EstargzReader::open(file, &OpenOptions::default()).unwrap();
    let toc = r.toc();
    let e = toc.entry(toc.lookup(path).unwrap());
    (e.chunks.len(), e.read_at_start.clone())
}

/// Mounts under `dir` (the run's FUSE layers and overlay live in its staging directory).
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(prefix)))
        .map(String::from)
        .collect()
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) && !cmd.contains("estargz") {
                found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

fn assert_clean(work: &Path, marker: &str) {
    assert_eq!(mounts_under(work), Vec::<String>::new(), "left mounted");
    // The container's processes die with it; give the kernel a moment to reap them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_with(marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "still running: {:?}",
            processes_with(marker)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn work_dir(dir: &Path) -> PathBuf {
    let w = dir.join("work");
    std::fs::create_dir_all(&w).unwrap();
    w
}

fn success(out: &Output) {
    assert!(
        out.status.success(),
        "estargz optimize failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_files_a_container_reads_come_first_in_the_layer_it_read_them_from() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = image(
        d,
        r#"{"Env":["PATH=/usr/bin:/bin","GREETING=hi"],"WorkingDir":"/app",
            "Cmd":["/bin/sh","-c","cat b a /etc/debian_version > /dev/null && test \"$GREETING\" = hi && test $(wc -l < /proc/net/dev) = 3 && dd if=big of=/dev/null bs=4096 count=2 2>/dev/null"]}"#,
    );
    let work = work_dir(d);
    let out = optimize(&src, d, &["--work-dir", work.to_str().unwrap()]);
    success(&out);
    let rec = record(d);
    assert_eq!(rec["stopped"], "exited", "{rec}");
    // The checks: environment, working directory, a network of its own (loopback only).
    assert_eq!(
        rec["exitCode"],
        0,
        "the command's checks failed: {rec}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The application layer: the files in the order cat read them, the base's
    // debian_version is the application's (overlayfs never asked the base for it).
    assert_eq!(
        recorded(&rec, 1),
        ["app/b", "app/a", "etc/debian_version", "app/big"],
        "{rec}"
    );
    // The pages read, not the kernel's read-ahead around them: dd read the first two of
    // 256 (with the layers' usual 1 MiB read-ahead the kernel asked for 80 KiB).
    let big = rec["accesses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["path"] == "app/big")
        .unwrap();
    assert_eq!(big["ranges"], serde_json::json!([[0, 8192]]), "{big}");
    let base = recorded(&rec, 0);
    assert!(
        base.iter().any(|p| p.ends_with("bin/cat")),
        "cat not recorded in the base: {base:?}"
    );
    assert!(!base.contains(&"etc/debian_version".to_string()));
    // Converted with exactly those first, in that order, per layer.
    let prio = prioritized_files(d);
    assert_eq!(prio[1], ["app/b", "app/a", "etc/debian_version", "app/big"]);
    assert_eq!(prio[0], base);
    // The list is what `convert --prioritize` reads.
    let list: Vec<String> = std::fs::read_to_string(d.join("record.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(String::from)
        .collect();
    let mut expected = base.clone();
    expected.extend(["app/b", "app/a", "etc/debian_version", "app/big"].map(String::from));
    let mut got = list.clone();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert!(list.iter().position(|p| p == "app/b") < list.iter().position(|p| p == "app/a"));
    // The pages become the page profile: the 1 MiB file is cut in 64 KiB chunks, and
    // the first, which holds the two pages dd read, is the one marked for prefetch. The
    // files cat read whole keep one chunk each.
    assert_eq!(read_at_start(d, 1, "app/big"), (16, vec![0]));
    assert_eq!(read_at_start(d, 1, "app/a").1, Vec::<u32>::new());
    assert_clean(&work, "debian_version");
}

#[test]
fn a_workload_that_never_exits_is_stopped_by_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = image(
        d,
        r#"{"Env":["PATH=/usr/bin:/bin"],"Cmd":["/bin/sh","-c","cat /app/a; exec sleep 987651"]}"#,
    );
    let work = work_dir(d);
    let out = optimize(
        &src,
        d,
        &["--timeout", "3s", "--work-dir", work.to_str().unwrap()],
    );
    success(&out);
    let rec = record(d);
    assert_eq!(rec["stopped"], "timeout", "{rec}");
    assert_eq!(recorded(&rec, 1), ["app/a"]);
    assert_eq!(prioritized_files(d)[1], ["app/a"]);
    assert_clean(&work, "sleep 987651");
}

#[test]
fn a_server_is_stopped_once_its_ready_line_appears() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The image's command is replaced by the one after --; a bind mount, the working
    // directory and the host's network are the user's.
    let src = image(d, r#"{"Cmd":["/bin/false"]}"#);
    let work = work_dir(d);
    let host = d.join("host");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("msg"), "hello from the host\n").unwrap();
    let net_dev_lines = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .count();
    let out = optimize(
        &src,
        d,
        &[
            "--timeout",
            "60s",
            "--wait-for",
            "is ready$",
            "--env",
            "PATH=/usr/bin:/bin",
            "--env",
            &format!("HOST_NET_DEV_LINES={net_dev_lines}"),
            "--mount",
            &format!("{}:/data:ro", host.display()),
            "--workdir",
            "/data",
            "--net",
            "host",
            "--work-dir",
            work.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "cat /app/b msg && test $(wc -l < /proc/net/dev) = $HOST_NET_DEV_LINES \
             && echo server is ready; cat /app/c; exec sleep 987652",
        ],
    );
    success(&out);
    let rec = record(d);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(rec["stopped"], "matched", "{rec}\n{stderr}");
    assert!(stderr.contains("  | hello from the host\n"), "{stderr}");
    assert_eq!(recorded(&rec, 1)[0], "app/b");
    assert_clean(&work, "sleep 987652");
}

#[test]
fn ctrl_c_deletes_the_container_and_unmounts_everything() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = image(d, r#"{"Env":["PATH=/usr/bin:/bin"]}"#);
    let work = work_dir(d);
    let mut child = Command::new(env!("CARGO_BIN_EXE_estargz"))
        .arg("optimize")
        .arg(&src)
        .arg(format!("oci:{}:opt", d.join("dst").display()))
        .args(["--timeout", "10m", "--work-dir", work.to_str().unwrap()])
        .args(["--", "/bin/sh", "-c", "echo started; exec sleep 987653"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "optimize ended before the workload started: {seen}"
        );
        seen.push_str(&line);
        if line.contains("| started") {
            break;
        }
    }
    assert!(
        !mounts_under(&work).is_empty(),
        "the image is not mounted while it runs"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert_clean(&work, "sleep 987653");
    let dst = OciLayout::open(d.join("dst"));
    assert!(
        dst.is_err() || dst.unwrap().resolve(Some("opt")).is_err(),
        "an interrupted optimize wrote an image"
    );
}
