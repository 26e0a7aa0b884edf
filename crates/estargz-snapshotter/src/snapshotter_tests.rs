//! The snapshotter in-process, with a fake [`Mounter`]: no root, FUSE, containerd or
//! registry needed (`cargo test -p estargz-snapshotter --lib`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::*;
use crate::protocol::{ErrorKind, ManagerError};

/// Serves "mounts" as a set of paths. Mounts of layers named in `hold` wait until
/// `release`; `fail_with` makes every mount fail.
#[derive(Default)]
struct FakeMounter {
    served: Mutex<BTreeSet<PathBuf>>,
    mounts: Mutex<Vec<PathBuf>>,
    /// The lower layers each mount was sent with.
    lowers: Mutex<BTreeMap<PathBuf, Vec<PathBuf>>>,
    unmounts: Mutex<Vec<PathBuf>>,
    fail_with: Mutex<Option<ErrorKind>>,
    hold: Mutex<BTreeSet<String>>,
    waiting: Mutex<usize>,
    released: Condvar,
}

impl FakeMounter {
    fn hold(&self, digest: &str) {
        self.hold.lock().unwrap().insert(digest.into());
    }

    fn release(&self) {
        self.hold.lock().unwrap().clear();
        self.released.notify_all();
    }

    /// Waits until `n` mounts are held.
    fn wait_held(&self, n: usize) {
        for _ in 0..500 {
            if *self.waiting.lock().unwrap() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{n} mounts never started");
    }

    /// The manager died: nothing is served any more.
    fn die(&self) {
        self.served.lock().unwrap().clear();
    }
}

impl Mounter for FakeMounter {
    fn mount(&self, req: &MountRequest) -> Result<(), Error> {
        assert!(req.toc_path.is_file(), "the TOC is saved before the mount");
        let mut hold = self.hold.lock().unwrap();
        let digest = req.layer.digest.to_string();
        if hold.contains(&digest) {
            *self.waiting.lock().unwrap() += 1;
            while hold.contains(&digest) {
                hold = self.released.wait(hold).unwrap();
            }
        }
        drop(hold);
        if let Some(kind) = *self.fail_with.lock().unwrap() {
            return Err(Error::Manager(ManagerError::new(kind, "fake failure")));
        }
        self.mounts.lock().unwrap().push(req.mountpoint.clone());
        self.lowers
            .lock()
            .unwrap()
            .insert(req.mountpoint.clone(), req.lowers.clone());
        self.served.lock().unwrap().insert(req.mountpoint.clone());
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), Error> {
        self.unmounts.lock().unwrap().push(mountpoint.to_path_buf());
        self.served.lock().unwrap().remove(mountpoint);
        Ok(())
    }

    fn mounted(&self) -> Result<BTreeSet<PathBuf>, Error> {
        Ok(self.served.lock().unwrap().clone())
    }

    fn is_serving(&self, mountpoint: &Path) -> bool {
        self.served.lock().unwrap().contains(mountpoint)
    }
}

/// A layer whose digest is `sha256:` and `name` repeated (hex digits only).
fn layer(name: &str) -> RemoteLayer {
    let hex = name.repeat(64 / name.len() + 1)[..64].to_string();
    RemoteLayer {
        reference: "registry.example/app:1".parse().unwrap(),
        digest: format!("sha256:{hex}").parse().unwrap(),
        size: 1000,
        toc_digest: format!("sha256:{}", "e".repeat(64)).parse().unwrap(),
        toc_offset: 900,
    }
}

struct Node {
    dir: tempfile::TempDir,
    mounter: Arc<FakeMounter>,
    snap: Arc<Snapshotter>,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(FakeMounter::default());
        let snap = Node::open(dir.path(), mounter.clone());
        Node { dir, mounter, snap }
    }

    fn open(root: &Path, mounter: Arc<FakeMounter>) -> Arc<Snapshotter> {
        let config = Config {
            root: root.join("root"),
            ..Config::default()
        };
        Arc::new(Snapshotter::open(config, mounter, Arc::new(Metrics::default())).unwrap())
    }

    /// The node after a restart of the daemon, with the manager `mounter`.
    fn restart(self, mounter: Arc<FakeMounter>) -> Node {
        let Node { dir, snap, .. } = self;
        drop(snap);
        let snap = Node::open(dir.path(), mounter.clone());
        Node { dir, mounter, snap }
    }

    fn lazy(&self, target: &str, parent: &str, digest: &str) -> Result<(), Error> {
        self.snap
            .commit_remote(target, parent, BTreeMap::new(), b"{}", &layer(digest))
    }

    fn dirs(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.dir.path().join("root/snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn fs(&self, key: &str) -> PathBuf {
        self.snap.fs_dir(self.snap.stat(key).unwrap().id)
    }
}

fn lowerdirs(m: &[Mount]) -> Vec<PathBuf> {
    let opt = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    opt.split(':').map(PathBuf::from).collect()
}

#[test]
fn lazy_layers_stack_under_active_snapshots_and_are_unmounted_on_remove() {
    let n = Node::new();
    n.lazy("base", "", "a").unwrap();
    n.lazy("app", "base", "b").unwrap();
    assert_eq!(
        n.snap.stat("app").unwrap().labels[REMOTE_LABEL],
        "remote snapshot"
    );
    let m = n
        .snap
        .create(Kind::Active, "ctr", "app", BTreeMap::new())
        .unwrap();
    assert_eq!(m[0].kind, "overlay");
    assert_eq!(lowerdirs(&m), [n.fs("app"), n.fs("base")]);
    // A view of one lazy layer is an overlay (the layer is nosuid), not a bind mount.
    let v = n
        .snap
        .create(Kind::View, "view", "base", BTreeMap::new())
        .unwrap();
    assert_eq!(
        (v[0].kind.as_str(), lowerdirs(&v)[0].clone()),
        ("overlay", n.fs("base"))
    );
    // Committing a lazy layer's target again is a no-op: containerd retries Prepare.
    n.lazy("app", "base", "b").unwrap();
    assert_eq!(n.mounter.mounts.lock().unwrap().len(), 2);
    let e = n.snap.remove("base").unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
    let (app_fs, base_fs) = (n.fs("app"), n.fs("base"));
    n.snap.remove("ctr").unwrap();
    n.snap.remove("view").unwrap();
    n.snap.remove("app").unwrap();
    n.snap.remove("base").unwrap();
    assert!(n.dirs().is_empty(), "{:?}", n.dirs());
    assert_eq!(*n.mounter.unmounts.lock().unwrap(), [app_fs, base_fs]);
    assert!(n.mounter.served.lock().unwrap().is_empty());
}

/// A lazy layer is mounted knowing the lazy layers below it, nearest first, up to the
/// first that is not lazy (where its executables' libraries are looked for), at Prepare
/// and when mounted again after a restart.
#[test]
fn a_lazy_layer_is_mounted_with_the_lazy_layers_below_it() {
    let n = Node::new();
    n.lazy("base", "", "a").unwrap();
    n.lazy("app", "base", "b").unwrap();
    n.snap
        .create(Kind::Active, "ext", "app", BTreeMap::new())
        .unwrap();
    n.snap.commit("plain", "ext", BTreeMap::new()).unwrap();
    n.lazy("top", "plain", "c").unwrap();
    n.lazy("top2", "top", "d").unwrap();
    let lowers = |key: &str| n.mounter.lowers.lock().unwrap()[&n.fs(key)].clone();
    assert_eq!(lowers("base"), Vec::<PathBuf>::new());
    assert_eq!(lowers("app"), [n.fs("base")]);
    assert_eq!(lowers("top"), Vec::<PathBuf>::new());
    assert_eq!(lowers("top2"), [n.fs("top")]);
    // Mounted again by a new daemon (its manager lost them): the same stacks.
    let (app, top2) = (n.fs("app"), n.fs("top2"));
    let n = n.restart(Arc::new(FakeMounter::default()));
    n.snap.restore().unwrap();
    let l = n.mounter.lowers.lock().unwrap();
    assert_eq!(l[&app], [n.fs("base")]);
    assert_eq!(l[&top2], [n.fs("top")]);
}

#[test]
fn a_failed_mount_leaves_nothing_and_says_why() {
    let n = Node::new();
    *n.mounter.fail_with.lock().unwrap() = Some(ErrorKind::InvalidToc);
    let e = n.lazy("base", "", "a").unwrap_err();
    assert!(
        matches!(&e, Error::Manager(m) if m.kind == ErrorKind::InvalidToc),
        "{e}"
    );
    assert!(matches!(n.snap.stat("base"), Err(Error::NotFound(_))));
    assert!(n.dirs().is_empty(), "{:?}", n.dirs());
    // A missing parent is refused before anything is mounted.
    *n.mounter.fail_with.lock().unwrap() = None;
    assert!(matches!(
        n.lazy("app", "nope", "b"),
        Err(Error::NotFound(_))
    ));
    assert!(n.mounter.mounts.lock().unwrap().is_empty());
}

#[test]
fn ordinary_snapshots_commit_and_chain() {
    let n = Node::new();
    let m = n
        .snap
        .create(Kind::Active, "l1", "", BTreeMap::new())
        .unwrap();
    assert_eq!(
        (m[0].kind.as_str(), m[0].options[0].as_str()),
        ("bind", "rw")
    );
    std::fs::write(Path::new(&m[0].source).join("f"), b"x").unwrap();
    n.snap.commit("c1", "l1", BTreeMap::new()).unwrap();
    assert!(matches!(n.snap.stat("l1"), Err(Error::NotFound(_))));
    assert!(n.snap.usage("c1").unwrap().inodes >= 1);
    n.lazy("c2", "c1", "b").unwrap();
    let m = n
        .snap
        .create(Kind::Active, "ctr", "c2", BTreeMap::new())
        .unwrap();
    assert_eq!(lowerdirs(&m), [n.fs("c2"), n.fs("c1")]);
    assert!(matches!(
        n.snap.create(Kind::Active, "ctr", "c2", BTreeMap::new()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        n.snap.commit("c3", "c2", BTreeMap::new()),
        Err(Error::FailedPrecondition(_))
    ));
}

#[test]
fn a_restarted_node_mounts_its_lazy_layers_again() {
    let n = Node::new();
    n.lazy("base", "", "a").unwrap();
    n.lazy("app", "base", "b").unwrap();
    n.snap
        .create(Kind::Active, "ctr", "app", BTreeMap::new())
        .unwrap();
    // A new daemon finds a new, empty manager (the machine rebooted).
    let n = n.restart(Arc::new(FakeMounter::default()));
    assert_eq!(n.snap.restore().unwrap(), (2, 0));
    assert_eq!(n.mounter.served.lock().unwrap().len(), 2);
    // With the manager still serving them (only the daemon restarted), nothing is mounted.
    let same = n.mounter.clone();
    let n = n.restart(same);
    let before = n.mounter.mounts.lock().unwrap().len();
    assert_eq!(n.snap.restore().unwrap(), (0, 0));
    assert_eq!(n.mounter.mounts.lock().unwrap().len(), before);
    assert_eq!(n.snap.mounts("ctr").unwrap().len(), 1);
}

#[test]
fn mounts_never_hand_out_a_lazy_layer_that_is_not_served() {
    let n = Node::new();
    n.lazy("base", "", "a").unwrap();
    n.snap
        .create(Kind::Active, "ctr", "base", BTreeMap::new())
        .unwrap();
    // The manager died and cannot mount the layer again: an error, not a lower directory
    // with the image's files missing.
    n.mounter.die();
    *n.mounter.fail_with.lock().unwrap() = Some(ErrorKind::Mount);
    let e = n.snap.mounts("ctr").unwrap_err();
    assert!(
        matches!(&e, Error::FailedPrecondition(m) if m.contains(&layer("a").digest.to_string())),
        "{e}"
    );
    assert!(n
        .snap
        .create(Kind::View, "v", "base", BTreeMap::new())
        .is_err());
    // Once it can, the layer is mounted again on demand.
    *n.mounter.fail_with.lock().unwrap() = None;
    let m = n.snap.mounts("ctr").unwrap();
    assert_eq!(lowerdirs(&m), [n.fs("base")]);
    assert!(n.mounter.is_serving(&n.fs("base")));
}

#[test]
fn a_slow_mount_delays_only_its_own_layer() {
    let n = Node::new();
    n.mounter.hold(&layer("5").digest.to_string());
    let slow = {
        let n = (n.snap.clone(), n.mounter.clone());
        std::thread::spawn(move || {
            let layer = layer("5");
            let _keep = n.1;
            n.0.commit_remote("slow", "", BTreeMap::new(), b"{}", &layer)
        })
    };
    n.mounter.wait_held(1);
    // While it hangs: other layers, ordinary snapshots, removes and cleanup all proceed.
    n.lazy("fast", "", "f").unwrap();
    n.snap
        .create(Kind::Active, "a", "fast", BTreeMap::new())
        .unwrap();
    n.snap.commit("c", "a", BTreeMap::new()).unwrap();
    n.snap.remove("c").unwrap();
    assert_eq!(
        n.snap.cleanup().unwrap(),
        0,
        "a staged layer is not an orphan"
    );
    assert_eq!(n.dirs().len(), 2, "{:?}", n.dirs());
    assert!(!slow.is_finished());
    n.mounter.release();
    slow.join().unwrap().unwrap();
    assert_eq!(n.snap.stat("slow").unwrap().kind, Kind::Committed);
}

#[test]
fn concurrent_prepares_of_one_layer_leave_one_snapshot() {
    let n = Node::new();
    n.mounter.hold(&layer("5a").digest.to_string());
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let snap = n.snap.clone();
            std::thread::spawn(move || {
                let layer = layer("5a");
                snap.commit_remote("same", "", BTreeMap::new(), b"{}", &layer)
            })
        })
        .collect();
    n.mounter.wait_held(2);
    n.mounter.release();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let id = n.snap.stat("same").unwrap().id;
    assert_eq!(n.dirs(), BTreeSet::from([id.to_string()]));
    // The loser's mount was undone; the winner's is served.
    let unmounts = n.mounter.unmounts.lock().unwrap().clone();
    assert_eq!(unmounts.len(), 1);
    assert_ne!(unmounts[0], n.fs("same"));
    assert_eq!(
        *n.mounter.served.lock().unwrap(),
        BTreeSet::from([n.fs("same")])
    );
}
