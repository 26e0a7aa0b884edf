//! The Kubernetes deployment, as far as one machine allows: the node image `make image`
//! builds (`testdata/scripts/node-image.sh`) holds both binaries and they run on its own
//! root file system; the manifests under `deploy/kubernetes/` parse and give the daemon
//! what a node needs (privileged, /dev/fuse, the state directory shared back to the host).

use std::path::Path;
use std::process::Command;

use estargz_oci::OciLayout;
use estargz_testutil::run_script;

#[test]
fn the_node_image_builds_and_its_binaries_run() {
    let snapshotter = Path::new(env!("CARGO_BIN_EXE_estargz-snapshotter"));
    let estargz = estargz_testutil::cli_beside(snapshotter);
    let dir = tempfile::tempdir().unwrap();
    let layout_dir = dir.path().join("image");
    run_script(
        "node-image.sh",
        &[layout_dir.as_os_str(), std::ffi::OsStr::new("test")],
        &[
            ("SNAPSHOTTER", snapshotter.to_str().unwrap()),
            ("ESTARGZ", estargz.to_str().unwrap()),
        ],
    );
    let layout = OciLayout::open(&layout_dir).unwrap();
    let manifest = layout
        .read_manifest(&layout.resolve(Some("test")).unwrap())
        .unwrap();
    let config = layout.read_config(&manifest.config).unwrap();
    assert_eq!(
        config.raw["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/estargz-snapshotter"])
    );
    assert_eq!(manifest.layers.len(), 2);
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for l in &manifest.layers {
        let st = Command::new("tar")
            .arg("-xzf")
            .arg(layout.blob_path(&l.digest))
            .arg("-C")
            .arg(&root)
            .status()
            .unwrap();
        assert!(st.success(), "unpacking layer {}", l.digest);
    }
    // The binaries find every library they need in the image, and the probe's shell runs.
    let version = env!("CARGO_PKG_VERSION");
    for argv in [
        &["/usr/local/bin/estargz-snapshotter", "--version"][..],
        &["/usr/local/bin/estargz", "--version"][..],
        &[
            "/bin/sh",
            "-c",
            "test -r /etc/estargz-snapshotter/config.toml && echo ok",
        ][..],
    ] {
        let out = Command::new("chroot")
            .arg(&root)
            .args(argv)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && (stdout.contains(version) || stdout.trim() == "ok"),
            "{argv:?} in the image: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_kubernetes_manifests_parse_and_give_the_daemon_what_a_node_needs() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/kubernetes/estargz-snapshotter.yaml");
    // PyYAML and tomllib: a real YAML and TOML parser (Debian's python3-yaml).
    let check = r#"
import sys, tomllib, yaml
docs = {d["kind"]: d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
assert set(docs) == {"ConfigMap", "DaemonSet"}, docs.keys()
config = tomllib.loads(docs["ConfigMap"]["data"]["config.toml"])
assert config["socket"] == "/run/estargz-snapshotter/estargz-snapshotter.sock", config
assert config["root"] == "/var/lib/estargz-snapshotter", config
pod = docs["DaemonSet"]["spec"]["template"]["spec"]
c = pod["containers"][0]
assert c["securityContext"]["privileged"] is True
mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
assert mounts["/var/lib/estargz-snapshotter"]["mountPropagation"] == "Bidirectional"
volumes = {v["name"]: v for v in pod["volumes"]}
paths = {volumes[m["name"]].get("hostPath", {}).get("path"): p for p, m in mounts.items()}
for host in ["/var/lib/estargz-snapshotter", "/run/estargz-snapshotter", "/dev/fuse"]:
    assert paths.get(host) == host, (host, paths)
assert volumes["fuse"]["hostPath"]["type"] == "CharDevice"
assert c["args"] == ["--config", "/etc/estargz-snapshotter/config.toml"]
assert mounts["/etc/estargz-snapshotter"]["name"] == "config"
print("ok")
"#;
    let out = Command::new("python3")
        .args(["-c", check])
        .arg(&manifest)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
