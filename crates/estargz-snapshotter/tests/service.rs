//! The daemon over its gRPC socket, called the way containerd calls it: snapshot semantics,
//! the CRI-label path to a real registry, and restarts (of the daemon, and of the whole
//! node with the registry gone). Needs root and /dev/fuse.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use estargz_api::snapshots::snapshots_client::SnapshotsClient;
use estargz_api::snapshots::{self as pb, Kind};
use estargz_format::{convert, ConvertOptions, EntryKind, EstargzReader, OpenOptions};
use estargz_oci::Digest;
use estargz_registry::{ImageRef, RegistryClient};
use estargz_testutil::{expected_from_tar, names_toc, synthetic_tar, TestRegistry};
use tonic::transport::Channel;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_estargz-snapshotter");

/// A daemon with its own root and socket; everything it started is stopped and unmounted
/// when dropped.
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The daemon binary `spawn` runs (this build unless a test says otherwise).
    bin: PathBuf,
}

impl Daemon {
    fn start(extra: &str) -> Daemon {
        Daemon::start_with(BIN.as_ref(), extra)
    }

    /// A daemon of the build at `bin`.
    fn start_with(bin: &Path, extra: &str) -> Daemon {
        estargz_testutil::require_root_and_fuse("the daemon tests");
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "socket = \"{0}/snap.sock\"\nroot = \"{0}/root\"\n{extra}\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let mut d = Daemon {
            dir,
            child: None,
            bin: bin.into(),
        };
        d.spawn();
        d
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("snap.sock")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(self.config())
            .stderr(log)
            .spawn()
            .expect("starting estargz-snapshotter");
        self.child = Some(child);
        for _ in 0..300 {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("daemon did not listen: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop_manager(&self) {
        let _ = Command::new(BIN)
            .arg("--config")
            .arg(self.config())
            .arg("stop-fuse-manager")
            .status();
    }

    async fn client(&self) -> SnapshotsClient<Channel> {
        let path = self.socket();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:0")
            .unwrap()
            .connect_with_connector(estargz_snapshotter::access::unix_connector(path))
            .await
            .expect("connecting to the daemon");
        SnapshotsClient::new(channel)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        self.stop_manager();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let prefix = self.dir.path().display().to_string();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        ours.sort_by(|a, b| b.cmp(a));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The labels the CRI plugin sends for layer `digest` of `reference` (an image whose
/// layers are `layers`), to be committed as `chain`.
fn cri_labels(
    chain: &str,
    reference: &str,
    digest: &str,
    layers: &str,
    toc_digest: &str,
) -> HashMap<String, String> {
    labels(&[
        ("containerd.io/snapshot.ref", chain),
        ("containerd.io/snapshot/cri.image-ref", reference),
        ("containerd.io/snapshot/cri.layer-digest", digest),
        ("containerd.io/snapshot/cri.image-layers", layers),
        ("containerd.io/snapshot/stargz/toc.digest", toc_digest),
    ])
}

/// The directory a view shows: a bind mount's source, or an overlay's top lower layer.
fn mount_source(m: &[estargz_api::types::Mount]) -> String {
    assert_eq!(m.len(), 1, "{m:?}");
    if m[0].r#type == "overlay" {
        let lower = m[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="));
        return lower.unwrap().split(':').next().unwrap().to_string();
    }
    m[0].source.clone()
}

async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
    l: HashMap<String, String>,
) -> Result<Vec<estargz_api::types::Mount>, tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "estargz".into(),
        key: key.into(),
        parent: parent.into(),
        labels: l,
    })
    .await
    .map(|r| r.into_inner().mounts)
}

/// Prepares `key` with labels that describe a lazy layer: the daemon mounts and commits it
/// itself and tells containerd ALREADY_EXISTS; any other answer fails with its log.
async fn prepare_lazily(
    c: &mut SnapshotsClient<Channel>,
    d: &Daemon,
    key: &str,
    parent: &str,
    l: HashMap<String, String>,
) {
    let err = prepare(c, key, parent, l).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}\n{}", d.log());
}

/// Reads every regular file of `tar` under `root` (whiteouts aside: a device under its
/// plain name in a layer, hidden in an overlay): how many read like the tar, or the first
/// that is missing or differs.
fn read_like_tar(root: &Path, tar: &[u8]) -> Result<usize, String> {
    let mut files = 0;
    for (path, e) in expected_from_tar(tar) {
        if path.rsplit('/').next().unwrap_or("").starts_with(".wh.") {
            continue;
        }
        // Hardlinks may name symlinks: read what is a regular file in the tar.
        let at = root.join(&path);
        let regular = std::fs::symlink_metadata(&at)
            .map_err(|err| format!("{path}: {err}"))?
            .is_file();
        if matches!(e.kind, EntryKind::Reg | EntryKind::Hardlink) && regular {
            let got = std::fs::read(&at).map_err(|err| format!("{path}: {err}"))?;
            if got != e.content {
                return Err(format!("{path} differs"));
            }
            files += 1;
        }
    }
    Ok(files)
}

/// Mounts `mounts` (an overlay, as containerd would) on a temporary directory, runs `f` on
/// it, and unmounts it before returning what `f` gave: checks made on the result afterwards
/// leave no mount behind when they fail.
fn with_mounted<T>(mounts: &[estargz_api::types::Mount], f: impl FnOnce(&Path) -> T) -> T {
    let root = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args([
            "-t",
            "overlay",
            "overlay",
            "-o",
            &mounts[0].options.join(","),
        ])
        .arg(root.path())
        .status()
        .unwrap();
    assert!(status.success(), "mounting {mounts:?}");
    let got = f(root.path());
    let _ = std::process::Command::new("umount")
        .arg(root.path())
        .status();
    got
}

/// Removes snapshots `keys`, then checks that nothing is mounted under the daemon's root.
async fn remove_leaving_no_mount(c: &mut SnapshotsClient<Channel>, d: &Daemon, keys: &[&str]) {
    for key in keys {
        c.remove(pb::RemoveSnapshotRequest {
            snapshotter: "estargz".into(),
            key: key.to_string(),
        })
        .await
        .unwrap();
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&d.root().display().to_string()),
        "still mounted: {mounts}"
    );
}

/// The largest regular file of the synthetic layer (name and expected content).
fn largest_synthetic_file() -> (String, estargz_testutil::Expected) {
    expected_from_tar(&synthetic_tar())
        .into_iter()
        .filter(|(_, e)| e.kind == EntryKind::Reg)
        .max_by_key(|(_, e)| e.content.len())
        .unwrap()
}

async fn stat(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<pb::Info, tonic::Status> {
    c.stat(pb::StatSnapshotRequest {
        snapshotter: "estargz".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.unwrap())
}

async fn list(c: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Vec<pb::Info> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "estargz".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        out.extend(batch.info);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_semantics_survive_a_sigkill() {
    let mut d = Daemon::start("");
    let mut c = d.client().await;

    // Active snapshot without parent: a writable bind mount.
    let m = prepare(&mut c, "ns/1/base", "", labels(&[("a", "1")]))
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "bind");
    let base_dir = mount_source(&m);
    std::fs::write(Path::new(&base_dir).join("file"), b"layer one").unwrap();
    let err = prepare(&mut c, "ns/1/base", "", HashMap::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = prepare(&mut c, "ns/1/x", "missing", HashMap::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = prepare(&mut c, "ns/1/x", "ns/1/base", HashMap::new())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "parent must be committed"
    );

    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "estargz".into(),
        name: "ns/1/sha256:one".into(),
        key: "ns/1/base".into(),
        labels: labels(&[("containerd.io/gc.root", "x")]),
    })
    .await
    .unwrap();
    assert_eq!(
        stat(&mut c, "ns/1/base").await.unwrap_err().code(),
        Code::NotFound
    );
    let one = stat(&mut c, "ns/1/sha256:one").await.unwrap();
    assert_eq!(one.kind, Kind::Committed as i32);
    assert_eq!(
        one.labels.get("containerd.io/gc.root").map(String::as_str),
        Some("x")
    );
    let usage = c
        .usage(pb::UsageRequest {
            snapshotter: "estargz".into(),
            key: "ns/1/sha256:one".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(usage.size >= 9 && usage.inodes == 1, "{usage:?}");

    // Active snapshot on a parent: overlay; a view of one parent: read-only bind.
    let m = prepare(&mut c, "ns/1/ctr", "ns/1/sha256:one", HashMap::new())
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "overlay");
    assert!(
        m[0].options
            .iter()
            .any(|o| o == &format!("lowerdir={base_dir}")),
        "{m:?}"
    );
    assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=")));
    let v = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "estargz".into(),
            key: "ns/1/view".into(),
            parent: "ns/1/sha256:one".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(
        (v[0].r#type.as_str(), v[0].source.as_str()),
        ("bind", base_dir.as_str())
    );
    assert!(v[0].options.iter().any(|o| o == "ro"));
    let again = c
        .mounts(pb::MountsRequest {
            snapshotter: "estargz".into(),
            key: "ns/1/ctr".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, m);

    // A parent with children cannot go.
    let err = c
        .remove(pb::RemoveSnapshotRequest {
            snapshotter: "estargz".into(),
            key: "ns/1/sha256:one".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Labels: one key by mask, then all.
    let updated = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "estargz".into(),
            info: Some(pb::Info {
                name: "ns/1/sha256:one".into(),
                labels: labels(&[("new", "v")]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.new".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(updated.labels.len(), 2, "{:?}", updated.labels);
    let err = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "estargz".into(),
            info: Some(pb::Info {
                name: "ns/1/sha256:one".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    assert_eq!(list(&mut c, &[]).await.len(), 3);
    assert_eq!(list(&mut c, &["kind==committed"]).await.len(), 1);
    assert_eq!(list(&mut c, &["kind==view", "kind==active"]).await.len(), 2);
    assert_eq!(list(&mut c, &["labels.new==v,parent==\"\""]).await.len(), 1);

    // SIGKILL: everything is still there afterwards, and an orphaned directory is cleaned.
    d.kill();
    std::fs::create_dir_all(d.root().join("snapshots/999/fs")).unwrap();
    d.spawn();
    let mut c = d.client().await;
    assert_eq!(list(&mut c, &[]).await.len(), 3);
    assert_eq!(
        std::fs::read(Path::new(&base_dir).join("file")).unwrap(),
        b"layer one"
    );
    c.cleanup(pb::CleanupRequest {
        snapshotter: "estargz".into(),
    })
    .await
    .unwrap();
    assert!(!d.root().join("snapshots/999").exists());
    for key in ["ns/1/view", "ns/1/ctr", "ns/1/sha256:one"] {
        c.remove(pb::RemoveSnapshotRequest {
            snapshotter: "estargz".into(),
            key: key.into(),
        })
        .await
        .unwrap();
    }
    assert!(list(&mut c, &[]).await.is_empty());
    assert!(!Path::new(&base_dir).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_changes_leaves_a_consistent_state() {
    let mut d = Daemon::start("");
    let mut last = String::new();
    for round in 0..3u64 {
        let mut c = d.client().await;
        let parent = last.clone();
        // A chain of prepare + write + commit, as fast as it goes, until the daemon dies.
        let writer = tokio::spawn(async move {
            let mut parent = parent;
            for i in 0.. {
                let key = format!("ns/{round}/active-{i}");
                let Ok(m) = prepare(&mut c, &key, &parent, HashMap::new()).await else {
                    break;
                };
                let dir = if m[0].r#type == "bind" {
                    m[0].source.clone()
                } else {
                    let upper = m[0]
                        .options
                        .iter()
                        .find_map(|o| o.strip_prefix("upperdir="));
                    upper.unwrap().to_string()
                };
                let _ = std::fs::write(Path::new(&dir).join(format!("f{i}")), b"x");
                let name = format!("ns/{round}/layer-{i}");
                let commit = c.commit(pb::CommitSnapshotRequest {
                    snapshotter: "estargz".into(),
                    name: name.clone(),
                    key,
                    labels: HashMap::new(),
                });
                if commit.await.is_err() {
                    break;
                }
                parent = name;
            }
        });
        tokio::time::sleep(Duration::from_millis(150 + 70 * round)).await;
        d.kill();
        let _ = writer.await;
        d.spawn();
        let mut c = d.client().await;
        let all = list(&mut c, &[]).await;
        assert!(!all.is_empty(), "round {round}: nothing was written");
        eprintln!("round {round}: {} snapshots after the kill", all.len());
        for info in &all {
            if !info.parent.is_empty() {
                assert!(
                    all.iter()
                        .any(|p| p.name == info.parent && p.kind == Kind::Committed as i32),
                    "{} has a missing parent {}",
                    info.name,
                    info.parent
                );
            }
            if info.kind == Kind::Active as i32 {
                let m = c
                    .mounts(pb::MountsRequest {
                        snapshotter: "estargz".into(),
                        key: info.name.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .mounts;
                for dir in m[0]
                    .options
                    .iter()
                    .filter_map(|o| o.strip_prefix("upperdir="))
                {
                    assert!(Path::new(dir).is_dir(), "{dir} is missing");
                }
            } else {
                c.usage(pb::UsageRequest {
                    snapshotter: "estargz".into(),
                    key: info.name.clone(),
                })
                .await
                .unwrap();
            }
        }
        c.cleanup(pb::CleanupRequest {
            snapshotter: "estargz".into(),
        })
        .await
        .unwrap();
        let dirs = std::fs::read_dir(d.root().join("snapshots"))
            .unwrap()
            .count();
        assert_eq!(
            dirs,
            all.len(),
            "round {round}: directories vs. snapshots after Cleanup"
        );
        last = all
            .iter()
            .filter(|i| i.kind == Kind::Committed as i32)
            .max_by_key(|i| i.created_at.map(|t| (t.seconds, t.nanos)))
            .map(|i| i.name.clone())
            .unwrap_or_default();
    }
}

/// Pushes `tar` as an eStargz layer; returns (digest, TOC digest).
async fn push_layer(image: &ImageRef, tar: &[u8]) -> (Digest, String) {
    let (digest, toc_digest, _) = push_layer_sized(image, tar).await;
    (digest, toc_digest)
}

/// Pushes `tar` as an eStargz layer; returns (digest, TOC digest, bytes from the TOC's gzip
/// member to the blob's end).
async fn push_layer_sized(image: &ImageRef, tar: &[u8]) -> (Digest, String, u64) {
    let mut blob = Vec::new();
    convert(
        tar,
        &mut blob,
        &ConvertOptions {
            chunk_size: 64 << 10,
            ..Default::default()
        },
        &(),
    )
    .unwrap();
    let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    let toc_digest = reader.toc_digest().to_string();
    let toc_size = reader.blob_size() - reader.footer().toc_offset;
    (push_blob(image, &blob).await, toc_digest, toc_size)
}

async fn push_blob(image: &ImageRef, blob: &[u8]) -> Digest {
    let digest = Digest::sha256_of(blob);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, blob).unwrap();
    RegistryClient::new(Default::default())
        .push_blob(image, &digest, &path, None)
        .await
        .unwrap();
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_labels_mount_lazily_and_survive_a_node_restart_without_the_registry() {
    let reg = TestRegistry::start(None);
    let reference = format!("{}/cri/app:v1", reg.addr);
    let image: ImageRef = reference.parse().unwrap();
    let tar = synthetic_tar();
    let (digest, toc_digest) = push_layer(&image, &tar).await;
    let second = estargz_testutil::one_file_tar("srv/second.txt", b"second layer\n");
    let (digest2, toc_digest2) = push_layer(&image, &second).await;
    let layers = format!("{digest},{digest2}");
    let mut d = Daemon::start("[fetch]\nbackground = false\n");
    let mut c = d.client().await;

    // The labels the CRI plugin sends. A wrong TOC digest falls back.
    let cri = |toc: &str| {
        cri_labels(
            "sha256:chain1",
            reference.as_str(),
            &digest.to_string(),
            layers.as_str(),
            toc,
        )
    };
    let wrong = format!("sha256:{}", "0".repeat(64));
    let m = prepare(&mut c, "k8s.io/1/extract-1", "", cri(&wrong))
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "bind", "the ordinary path");
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "estargz".into(),
        key: "k8s.io/1/extract-1".into(),
    })
    .await
    .unwrap();

    prepare_lazily(&mut c, &d, "k8s.io/1/extract-2", "", cri(&toc_digest)).await;
    assert_eq!(
        stat(&mut c, "k8s.io/1/extract-2").await.unwrap_err().code(),
        Code::NotFound
    );
    let info = stat(&mut c, "sha256:chain1").await.unwrap();
    assert_eq!(info.kind, Kind::Committed as i32);
    assert!(info.labels.contains_key("containerd.io/snapshot/remote"));

    // A view shows the lazily mounted layer: every file reads like the tar.
    let view = |key: &'static str| pb::ViewSnapshotRequest {
        snapshotter: "estargz".into(),
        key: key.into(),
        parent: "sha256:chain1".into(),
        labels: HashMap::new(),
    };
    let v = c
        .view(view("k8s.io/2/view"))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let lower = PathBuf::from(mount_source(&v));
    // The view is an overlay (the lazy layer is mounted nosuid): mounted as containerd
    // would, it shows the layer.
    assert_eq!(v[0].r#type, "overlay", "{v:?}");
    let listed = |p: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let (through_view, direct) = (with_mounted(&v, listed), listed(&lower));
    assert_eq!(through_view, direct);
    let check = |lower: &Path| {
        let files = read_like_tar(lower, &tar).unwrap();
        assert!(files > 10, "only {files} files checked");
    };
    check(&lower);

    // The first layer's Prepare also started resolving the second layer: with the registry
    // gone, the second layer is still mounted lazily.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(reg);
    let l2 = cri_labels(
        "sha256:chain2",
        reference.as_str(),
        &digest2.to_string(),
        layers.as_str(),
        toc_digest2.as_str(),
    );
    prepare_lazily(&mut c, &d, "k8s.io/1/extract-3", "sha256:chain1", l2).await;
    let info = stat(&mut c, "sha256:chain2").await.unwrap();
    assert_eq!(info.parent, "sha256:chain1");
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "estargz".into(),
        key: "sha256:chain2".into(),
    })
    .await
    .unwrap();

    // The node restarts: daemon and FUSE manager gone, registry gone too. The daemon starts,
    // mounts the layer again from its saved TOC, and serves what the cache holds.
    d.kill();
    d.stop_manager();
    assert!(std::fs::read_dir(&lower)
        .map(|mut r| r.next().is_none())
        .unwrap_or(true));
    d.spawn();
    let mut c = d.client().await;
    assert!(stat(&mut c, "sha256:chain1").await.is_ok());
    check(&lower);

    // Removal unmounts.
    remove_leaving_no_mount(&mut c, &d, &["k8s.io/2/view", "sha256:chain1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_without_a_toc_digest_are_mounted_only_when_allowed() {
    let reg = TestRegistry::start(None);
    let reference = format!("{}/unverified/app:v1", reg.addr);
    let image: ImageRef = reference.parse().unwrap();
    let (digest, _) = push_layer(&image, &synthetic_tar()).await;
    let l = labels(&[
        ("containerd.io/snapshot.ref", "sha256:chain-u"),
        (
            "containerd.io/snapshot/remote/stargz.reference",
            reference.as_str(),
        ),
        (
            "containerd.io/snapshot/remote/stargz.digest",
            &digest.to_string(),
        ),
    ]);
    // Default policy: refused, pulled the ordinary way.
    let strict = Daemon::start("");
    let mut c = strict.client().await;
    let m = prepare(&mut c, "default/1/extract", "", l.clone())
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(
        stat(&mut c, "sha256:chain-u").await.unwrap_err().code(),
        Code::NotFound
    );
    // allow_unverified = true: mounted lazily.
    let lax = Daemon::start("allow_unverified = true\n[fetch]\nbackground = false\n");
    let mut c = lax.client().await;
    prepare_lazily(&mut c, &lax, "default/1/extract", "", l).await;
    let info = stat(&mut c, "sha256:chain-u").await.unwrap();
    assert!(info.labels.contains_key("containerd.io/snapshot/remote"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_resolve_and_read_through_a_pull_only_mirror_when_the_registry_is_down() {
    // A pull-through cache like Spegel: capabilities pull and resolve only; the registry
    // the image names does not answer at all.
    let reg = TestRegistry::start(None);
    let direct: ImageRef = format!("{}/mirrored/app:v1", reg.addr).parse().unwrap();
    let tar = synthetic_tar();
    let (digest, toc_digest) = push_layer(&direct, &tar).await;
    let mirror = estargz_testutil::FaultProxy::start(&reg.addr);
    let upstream = "127.0.0.1:9";
    let hosts = estargz_testutil::hosts_dir(
        upstream,
        &format!(
            "server = \"http://{upstream}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.addr
        ),
    );
    let d = Daemon::start(&format!(
        "[registry]\nhosts_dirs = [\"{}\"]\n[fetch]\nbackground = false\n",
        hosts.path().display()
    ));
    let mut c = d.client().await;
    let reference = format!("{upstream}/mirrored/app:v1");
    let l = cri_labels(
        "sha256:chain-m",
        reference.as_str(),
        &digest.to_string(),
        &digest.to_string(),
        &toc_digest,
    );
    prepare_lazily(&mut c, &d, "k8s.io/1/extract", "", l).await;
    let info = stat(&mut c, "sha256:chain-m").await.unwrap();
    assert!(info.labels.contains_key("containerd.io/snapshot/remote"));
    // Files read through the mirror, byte for byte.
    let v = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "estargz".into(),
            key: "k8s.io/2/view".into(),
            parent: "sha256:chain-m".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let lower = PathBuf::from(mount_source(&v));
    let before = mirror.blob_requests();
    let mut read = 0;
    for (path, e) in expected_from_tar(&tar) {
        if e.kind == EntryKind::Reg && !e.content.is_empty() && !path.contains(".wh.") {
            assert!(
                std::fs::read(lower.join(&path)).unwrap() == e.content,
                "{path}"
            );
            read += 1;
        }
    }
    assert!(read > 10 && mirror.blob_requests() > before, "{read} files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_fall_back_and_the_node_keeps_serving() {
    let reg = TestRegistry::start(None);
    let reference = format!("{}/hostile/app:v1", reg.addr);
    let image: ImageRef = reference.parse().unwrap();
    // TOCs an attacker controls, with TOC digest labels that match them.
    let deep = "a/".repeat(2000);
    let hostile = [
        names_toc(10_000, |i| format!("{i}/{deep}f")),
        names_toc(1, |_| "d/".repeat(3000)),
        names_toc(1_100_000, |i| format!("f{i}")),
    ];
    let d = Daemon::start("[fetch]\nbackground = false\n");
    let mut c = d.client().await;
    for (n, json) in hostile.iter().enumerate() {
        let blob = estargz_testutil::toc_tail(0, json, None);
        let digest = push_blob(&image, &blob).await;
        let toc_digest = estargz_format::Sha256Digest::of(json).to_string();
        let chain = format!("sha256:hostile{n}");
        let l = cri_labels(
            chain.as_str(),
            reference.as_str(),
            &digest.to_string(),
            &digest.to_string(),
            &toc_digest,
        );
        // Refused, so containerd pulls the layer the ordinary way (and finds it broken).
        let key = format!("k8s.io/{n}/extract");
        let m = prepare(&mut c, &key, "", l).await.unwrap();
        assert_eq!(m[0].r#type, "bind", "case {n}: {}", d.log());
        assert_eq!(
            stat(&mut c, &chain).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    // The daemon is still there, and mounts a good layer lazily.
    let (digest, toc_digest) = push_layer(&image, &synthetic_tar()).await;
    let l = cri_labels(
        "sha256:good",
        reference.as_str(),
        &digest.to_string(),
        &digest.to_string(),
        &toc_digest,
    );
    prepare_lazily(&mut c, &d, "k8s.io/9/extract", "", l).await;
    let log = d.log();
    for says in [
        "imply more parent directories",
        "longer than 4095",
        "more than 1000000 entries",
    ] {
        assert!(log.contains(says), "the log does not say {says:?}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_layers_are_resolved_a_few_at_a_time() {
    let reg = TestRegistry::start(None);
    let proxy = estargz_testutil::FaultProxy::start(&reg.addr);
    let direct: ImageRef = format!("{}/many/app:v1", reg.addr).parse().unwrap();
    let mut layers = Vec::new();
    for i in 0..12 {
        let tar =
            estargz_testutil::one_file_tar(&format!("f{i}"), &estargz_testutil::noise(300_000, i));
        layers.push(push_layer(&direct, &tar).await);
    }
    let all: Vec<String> = layers.iter().map(|(d, _)| d.to_string()).collect();
    let all = all.join(",");
    // A slow link, so that resolutions overlap if they can.
    proxy.set_rate(Some(200_000.0));
    let d = Daemon::start("[fetch]\nbackground = false\nprefetch = false\n");
    let mut c = d.client().await;
    let reference = format!("{}/many/app:v1", proxy.addr);
    let (digest, toc) = &layers[0];
    let l = cri_labels(
        "sha256:many0",
        reference.as_str(),
        &digest.to_string(),
        all.as_str(),
        toc,
    );
    prepare_lazily(&mut c, &d, "k8s.io/1/extract", "", l).await;
    // Wait for the background resolutions of the other eleven layers.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while proxy
        .blob_log()
        .iter()
        .filter(|r| r.ended.is_some())
        .count()
        < 12
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = proxy.blob_log();
    assert!(log.len() >= 12, "{} requests", log.len());
    let most = log
        .iter()
        .map(|r| {
            log.iter()
                .filter(|o| o.arrived <= r.arrived && o.ended.is_none_or(|e| e > r.arrived))
                .count()
        })
        .max()
        .unwrap();
    // Four background resolutions and the Prepare's own.
    assert!(most <= 5, "{most} TOC requests at once");
    proxy.set_rate(None);
}

/// Makes a TOC sizes label from an image's layers (digest, TOC size) for layer `i`.
type SizesLabel = dyn Fn(&[(Digest, u64)], usize) -> String;

/// The TOC sizes our converter annotates make each layer's TOC one request of exactly its
/// size, the layer resolved ahead included; a wrong or hostile size costs at most a bounded
/// request and the layer still mounts lazily.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toc_sizes_from_the_image_fetch_each_toc_in_one_request() {
    const SIZES: &str = "containerd.io/snapshot/estargz/toc.sizes";
    let reg = TestRegistry::start(None);
    let proxy = estargz_testutil::FaultProxy::start(&reg.addr);
    let direct: ImageRef = format!("{}/sized/app:v1", reg.addr).parse().unwrap();
    let reference = format!("{}/sized/app:v1", proxy.addr);
    let d = Daemon::start("[fetch]\nbackground = false\nprefetch = false\n");
    let mut c = d.client().await;
    // Prepares a base layer and an application layer whose TOC is larger than the first
    // request made without a size (64 KiB), each with the sizes label `sizes` gives it;
    // returns the blob requests the two resolutions made, in order of arrival.
    let mut pull = async |n: usize, sizes: &SizesLabel| {
        let base = estargz_testutil::one_file_tar(&format!("base{n}"), b"base\n");
        let (base, base_toc, base_size) = push_layer_sized(&direct, &base).await;
        let app = estargz_testutil::many_files_tar(4000 + n);
        let (app, app_toc, app_size) = push_layer_sized(&direct, &app).await;
        assert!(app_size > 64 << 10, "{app_size}");
        let both = [(base.clone(), base_size), (app.clone(), app_size)];
        let before = proxy.blob_log().len();
        for (i, (digest, toc)) in [(&base, &base_toc), (&app, &app_toc)]
            .into_iter()
            .enumerate()
        {
            let mut l = cri_labels(
                &format!("sha256:sized{n}-{i}"),
                &reference,
                &digest.to_string(),
                // As containerd lists them: this layer and those above it.
                &[&base, &app][i..]
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                toc,
            );
            l.insert(SIZES.into(), sizes(&both, i));
            let parent = match i {
                0 => String::new(),
                _ => format!("sha256:sized{n}-0"),
            };
            prepare_lazily(&mut c, &d, &format!("k8s.io/{n}/extract-{i}"), &parent, l).await;
        }
        (both, proxy.blob_log().split_off(before))
    };
    let listed = |layers: &[(Digest, u64)], from: usize| {
        let l: Vec<String> = layers[from..]
            .iter()
            .map(|(d, n)| format!("{d}={n}"))
            .collect();
        l.join(",")
    };

    // The sizes our converter writes: two requests in all, each exactly a TOC and footer.
    let (layers, log) = pull(1, &listed).await;
    let mut asked: Vec<Option<u64>> = log.iter().map(|r| r.suffix).collect();
    asked.sort();
    let mut want: Vec<Option<u64>> = layers.iter().map(|(_, n)| Some(*n)).collect();
    want.sort();
    assert_eq!(asked, want, "{log:?}");

    // Sizes too small, absurdly large, malformed or of other layers: each first request is
    // bounded (a footer at least, 8 MiB at most), the rest of a TOC comes by a second one.
    let hostile = |layers: &[(Digest, u64)], _: usize| {
        format!(
            "{}=10,nonsense,sha256:zz=5,=7,{}=99999999999999,{}=12x",
            layers[0].0, layers[1].0, layers[1].0
        )
    };
    let (_, log) = pull(2, &hostile).await;
    let mut first: Vec<Option<u64>> = log
        .iter()
        .filter(|r| r.range.is_none())
        .map(|r| r.suffix)
        .collect();
    first.sort();
    assert_eq!(
        first,
        [Some(estargz_format::FOOTER_SIZE as u64), Some(8 << 20)],
        "{log:?}"
    );
    assert_eq!(
        log.len(),
        3,
        "the base layer's TOC took a second request: {log:?}"
    );
}

/// The FUSE manager's pid, from its single-instance lock file.
fn manager_pid(d: &Daemon) -> i32 {
    let text = std::fs::read_to_string(d.root().join("fuse-manager.lock")).unwrap();
    text.trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fuse_manager_is_one_per_root_and_replaced_when_it_dies() {
    let reg = TestRegistry::start(None);
    let reference = format!("{}/supervised/app:v1", reg.addr);
    let image: ImageRef = reference.parse().unwrap();
    let (digest, toc_digest) = push_layer(&image, &synthetic_tar()).await;
    let second = estargz_testutil::one_file_tar("srv/second.txt", b"second layer\n");
    let (digest2, toc_digest2) = push_layer(&image, &second).await;
    let mut d = Daemon::start("[fetch]\nbackground = false\n");
    let mut c = d.client().await;
    let l = cri_labels(
        "sha256:base",
        &reference,
        &digest.to_string(),
        &digest.to_string(),
        &toc_digest,
    );
    prepare_lazily(&mut c, &d, "k8s.io/1/extract", "", l).await;
    let m = prepare(&mut c, "ctr-1", "sha256:base", HashMap::new())
        .await
        .unwrap();
    let lower = PathBuf::from(mount_source(&m));
    let (name, file) = largest_synthetic_file();
    let path = lower.join(&name);
    assert_eq!(std::fs::read(&path).unwrap(), file.content);

    // A second manager on the same root refuses to start, and the first keeps serving.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(d.config())
        .arg("fuse-manager")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("another FUSE manager"), "{said}");
    assert_eq!(std::fs::read(&path).unwrap(), file.content);

    // A reader holding a file open across a daemon restart (an upgrade of the daemon)
    // keeps reading: the manager, and its mounts, stay.
    use std::io::Read;
    let mut open = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 100];
    open.read_exact(&mut head).unwrap();
    d.kill();
    d.spawn();
    let mut c = d.client().await;
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).unwrap();
    head.extend(rest);
    assert_eq!(head, file.content);

    // The manager dies: the daemon notices, starts a new one, and mounts the layer again.
    let old = manager_pid(&d);
    // SAFETY: kill(2) on a pid we read from our own test root's lock file.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    let mut replaced = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = std::fs::read_to_string(d.root().join("fuse-manager.lock")).unwrap_or_default();
        if now.trim() != old.to_string() && std::fs::read(&path).is_ok_and(|b| b == file.content) {
            replaced = true;
            break;
        }
    }
    assert!(replaced, "the layer was not mounted again: {}", d.log());
    // (The open file belonged to the dead mount: what the page cache holds of it still
    // reads, anything else fails with ENOTCONN. Nothing can revive that mount.)
    drop(open);
    // Mounts hand out the live mount, and a new layer is mounted lazily.
    let m = c
        .mounts(pb::MountsRequest {
            snapshotter: "estargz".into(),
            key: "ctr-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(
        std::fs::read(PathBuf::from(mount_source(&m)).join(&name)).unwrap(),
        file.content
    );
    let l = cri_labels(
        "sha256:app",
        &reference,
        &digest2.to_string(),
        &format!("{digest},{digest2}"),
        &toc_digest2,
    );
    prepare_lazily(&mut c, &d, "k8s.io/2/extract", "sha256:base", l).await;
    assert!(d.log().contains("the FUSE manager is gone"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs OLD_SNAPSHOTTER_BIN, a build of an older version: run `make upgrade-test`"]
async fn an_upgraded_daemon_keeps_an_older_manager_serving_running_containers() {
    let old: PathBuf = std::env::var_os("OLD_SNAPSHOTTER_BIN")
        .expect("OLD_SNAPSHOTTER_BIN must name an older estargz-snapshotter build")
        .into();
    let reg = TestRegistry::start(None);
    let reference = format!("{}/upgrade/app:v1", reg.addr);
    let image: ImageRef = reference.parse().unwrap();
    let (digest, toc_digest) = push_layer(&image, &synthetic_tar()).await;
    let second = estargz_testutil::one_file_tar("srv/second.txt", b"second layer\n");
    let (digest2, toc_digest2) = push_layer(&image, &second).await;
    let layers = format!("{digest},{digest2}");
    // The old version mounts a layer, and a "container" starts reading a file of it.
    let mut d = Daemon::start_with(&old, "[fetch]\nbackground = false\n");
    let mut c = d.client().await;
    let l = cri_labels(
        "sha256:base",
        &reference,
        &digest.to_string(),
        &layers,
        &toc_digest,
    );
    prepare_lazily(&mut c, &d, "k8s.io/1/extract", "", l).await;
    let m = prepare(&mut c, "ctr-1", "sha256:base", HashMap::new())
        .await
        .unwrap();
    let lower = PathBuf::from(mount_source(&m));
    let (name, file) = largest_synthetic_file();
    use std::io::Read;
    let mut open = std::fs::File::open(lower.join(&name)).unwrap();
    let mut head = vec![0u8; 100];
    open.read_exact(&mut head).unwrap();
    let old_manager = std::fs::read_to_string(d.root().join("fuse-manager.lock")).ok();
    assert_eq!(
        old_manager, None,
        "the old version takes no lock (protocol 0)"
    );

    // The upgrade: this version's daemon replaces the old one.
    d.kill();
    d.bin = BIN.into();
    d.spawn();
    let mut c = d.client().await;
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).unwrap();
    head.extend(rest);
    assert_eq!(head, file.content, "the running container keeps reading");
    assert!(
        d.log()
            .contains("a FUSE manager of another version serves lazy layers"),
        "{}",
        d.log()
    );
    // The old manager keeps serving, new layers included (requests it knows).
    let l = cri_labels(
        "sha256:app",
        &reference,
        &digest2.to_string(),
        &layers,
        &toc_digest2,
    );
    prepare_lazily(&mut c, &d, "k8s.io/2/extract", "sha256:base", l).await;
    let m = prepare(&mut c, "ctr-2", "sha256:app", HashMap::new())
        .await
        .unwrap();
    let lowers: Vec<PathBuf> = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap()
        .split(':')
        .map(PathBuf::from)
        .collect();
    assert_eq!(
        std::fs::read(lowers[0].join("srv/second.txt")).unwrap(),
        b"second layer\n"
    );
    // Switching, as the log says: drained node, stop-fuse-manager, restart. This version's
    // manager mounts both layers again.
    drop(open);
    d.kill();
    d.stop_manager();
    d.spawn();
    let _c = d.client().await;
    assert!(d.root().join("fuse-manager.lock").exists());
    assert_eq!(std::fs::read(lower.join(&name)).unwrap(), file.content);
    assert_eq!(
        std::fs::read(lowers[0].join("srv/second.txt")).unwrap(),
        b"second layer\n"
    );
}

/// EROFS mounts (layers served without FUSE) under the daemon's root.
fn local_mounts(d: &Daemon) -> usize {
    let root = d.root().display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some("erofs"))
        .filter(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&root)))
        .count()
}

/// Once the background fetch has made a layer's files local, the daemon serves it without
/// FUSE as well: a container's mounts prepared afterwards stack its EROFS image and data
/// directory, read every file like the tar (two layers' data directories side by side:
/// each redirect finds its own content), and write to them (copy-up); removing the
/// snapshots removes those mounts too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_fetched_whole_reach_new_containers_without_fuse() {
    reach_new_containers_without_fuse("", false).await;
}

/// The same without a background fetch: a container that read every file through FUSE
/// has made the layers local, and the next container gets them without FUSE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_read_whole_reach_new_containers_without_fuse() {
    reach_new_containers_without_fuse("[fetch]\nbackground = false\n", true).await;
}

/// Prepares the two layers of an image lazily on a daemon with `config`; with `read_first`,
/// mounts a first container (the FUSE layers) and reads every file through it; then checks
/// that both layers come to be served without FUSE and what a new container reads.
async fn reach_new_containers_without_fuse(config: &str, read_first: bool) {
    let reg = TestRegistry::start(None);
    let reference = format!("{}/local/app:v1", reg.addr);
    let image: ImageRef = reference.parse().unwrap();
    let tar = synthetic_tar();
    let (digest, toc_digest) = push_layer(&image, &tar).await;
    let second = estargz_testutil::one_file_tar("srv/second.txt", b"second layer\n");
    let (digest2, toc_digest2) = push_layer(&image, &second).await;
    let layers = format!("{digest},{digest2}");
    let d = Daemon::start(config);
    let mut c = d.client().await;
    let l1 = cri_labels(
        "sha256:chain1",
        reference.as_str(),
        &digest.to_string(),
        layers.as_str(),
        toc_digest.as_str(),
    );
    prepare_lazily(&mut c, &d, "k8s.io/1/extract-1", "", l1).await;
    let l2 = cri_labels(
        "sha256:chain2",
        reference.as_str(),
        &digest2.to_string(),
        layers.as_str(),
        toc_digest2.as_str(),
    );
    prepare_lazily(&mut c, &d, "k8s.io/1/extract-2", "sha256:chain1", l2).await;
    let mut keys = vec!["k8s.io/2/container", "sha256:chain2", "sha256:chain1"];
    if read_first {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(local_mounts(&d), 0, "local before any read");
        let m = prepare(&mut c, "k8s.io/2/reader", "sha256:chain2", HashMap::new())
            .await
            .unwrap();
        keys.insert(0, "k8s.io/2/reader");
        let (files, second) = with_mounted(&m, |root| {
            (
                read_like_tar(root, &tar),
                std::fs::read(root.join("srv/second.txt")),
            )
        });
        assert!(files.unwrap() > 10);
        assert_eq!(second.unwrap(), b"second layer\n");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while local_mounts(&d) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "layers not served without FUSE: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = prepare(
        &mut c,
        "k8s.io/2/container",
        "sha256:chain2",
        HashMap::new(),
    )
    .await
    .unwrap();
    let lower = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(
        lower.matches("::").count(),
        2,
        "two data directories: {lower}"
    );
    let (files, second_read, appended) = with_mounted(&m, |root| {
        let second = root.join("srv/second.txt");
        (
            read_like_tar(root, &tar),
            std::fs::read(&second),
            std::fs::OpenOptions::new()
                .append(true)
                .open(&second)
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"more\n"))
                .and_then(|()| std::fs::read(&second)),
        )
    });
    let files = files.unwrap();
    assert!(files > 10, "only {files} files checked");
    assert_eq!(second_read.unwrap(), b"second layer\n");
    assert_eq!(appended.unwrap(), b"second layer\nmore\n");
    remove_leaving_no_mount(&mut c, &d, &keys).await;
}
