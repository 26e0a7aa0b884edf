//! The snapshotter: containerd's snapshot semantics over overlayfs, with lazily mounted
//! layers as lower directories.
//!
//! On disk, under the root: `metadata.redb` (the store), `snapshots/ID/fs` (a snapshot's
//! upper directory, unpacked layer, or the FUSE mountpoint of a lazy layer),
//! `snapshots/ID/work` (overlayfs work directory of active snapshots),
//! `snapshots/ID/toc.json` (a lazy layer's verified TOC, so it can be mounted again without
//! the registry), and `cache/` (the chunk cache, owned by the FUSE manager).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::filter::{matches_any, Filter};
use crate::metrics::Metrics;
use crate::mounter::{detach, is_dead_mount, is_mountpoint, MountRequest, Mounter};
use crate::protocol::ErrorKind;
use crate::remote::{Fallback, LayerLabels, Resolver, REMOTE_LABEL};
use crate::store::{Kind, RemoteLayer, Snapshot, Store, Time, Usage};
use crate::{Config, Error};
use estargz_cache::private_dir;
use estargz_layerfs::{local_forms_of, local_mounts_under};

/// A mount for containerd to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `bind` or `overlay`.
    pub kind: String,
    /// Source.
    pub source: String,
    /// Options.
    pub options: Vec<String>,
}

/// A parent's directory, as a lower layer of a snapshot's mounts.
struct Lower {
    dir: PathBuf,
    /// Mounted lazily (through FUSE).
    lazy: bool,
}

/// Longest parent chain followed (a guard against corrupted metadata).
const MAX_DEPTH: usize = 1000;
/// Most lower layers sent with a mount (where executables find their libraries): images
/// rarely have more than 127 layers, and a mount request must stay within the manager's
/// line limit (64 KiB).
const MAX_LOWERS: usize = 128;

/// The snapshotter.
pub struct Snapshotter {
    root: PathBuf,
    store: Store,
    /// Serialises changes, so that checks and the writes that follow them agree. Never held
    /// across a call to the mounter: a slow mount must delay only its own layer.
    lock: Mutex<()>,
    /// Snapshot IDs whose directory exists before their record does (a lazy layer being
    /// mounted): `Cleanup` must not take them for orphans.
    staging: Mutex<HashSet<u64>>,
    mounter: Arc<dyn Mounter>,
    resolver: Arc<Resolver>,
    metrics: Arc<Metrics>,
    config: Config,
}

/// A snapshot's `fs` directory: 0755 whatever the umask, as containerd's overlayfs
/// snapshotter makes it, since it becomes the container's `/` (its parents stay private).
fn fs_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |e| Error::io(context, e)
}

impl Snapshotter {
    /// Opens the state under `config.root`, with lazy layers mounted by `mounter`.
    pub fn open(
        config: Config,
        mounter: Arc<dyn Mounter>,
        metrics: Arc<Metrics>,
    ) -> Result<Snapshotter, Error> {
        let root = config.root.clone();
        // Private at every start, whatever the umask or an older version left: under the
        // root lie containers' writable layers and lazily mounted images (CVE-2021-41103).
        for dir in [root.clone(), root.join("snapshots"), root.join("empty")] {
            private_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let db = root.join("metadata.redb");
        let store = Store::open(&db)?;
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("making {} private", db.display())))?;
        let resolver = Arc::new(Resolver::new(config.registry_client()?));
        Ok(Snapshotter {
            root,
            store,
            lock: Mutex::new(()),
            staging: Mutex::new(HashSet::new()),
            mounter,
            resolver,
            metrics,
            config,
        })
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts every lazily mounted layer the mounter is not serving (after a restart of the
    /// FUSE manager, or of the machine). Needs no registry: TOCs are on disk. Returns how
    /// many were mounted again and how many failed; a failed one is mounted again when a
    /// snapshot on it is mounted, or that fails (never a lower directory with files missing).
    pub fn restore(&self) -> Result<(usize, usize), Error> {
        let served = self.mounter.mounted()?;
        let (mut mounted, mut failed) = (0, 0);
        for (key, s) in self.store.all()? {
            let Some(layer) = &s.remote else { continue };
            if served.contains(&self.fs_dir(s.id)) {
                continue;
            }
            match self.mount_remote(s.id, layer, &s.parent) {
                Ok(()) => {
                    mounted += 1;
                    tracing::info!(snapshot = %key, layer = %layer.digest, "lazy layer mounted again")
                }
                Err(e) => {
                    failed += 1;
                    tracing::error!(snapshot = %key, layer = %layer.digest, error = %e,
                        "could not mount a lazy layer again; snapshots on it cannot be mounted")
                }
            }
        }
        Ok((mounted, failed))
    }

    /// Mounts snapshot `id`'s lazy layer, whose parent snapshot is `parent`.
    fn mount_remote(&self, id: u64, layer: &RemoteLayer, parent: &str) -> Result<(), Error> {
        self.mounter.mount(&MountRequest {
            mountpoint: self.fs_dir(id),
            toc_path: self.dir(id).join("toc.json"),
            layer: layer.clone(),
            lowers: self.lazy_lowers(parent),
        })
    }

    /// Mount directories of the lazy layers from snapshot `parent` down, nearest first,
    /// up to the first parent that is not a lazy layer, at most [`MAX_LOWERS`].
    fn lazy_lowers(&self, parent: &str) -> Vec<PathBuf> {
        self.ancestors(parent)
            .map_while(|a| a.ok().filter(|(_, s)| s.remote.is_some()))
            .take(MAX_LOWERS)
            .map(|(_, s)| self.fs_dir(s.id))
            .collect()
    }

    /// The snapshots from `parent` down the chain, nearest first, with their keys. A
    /// missing parent, or a chain longer than [`MAX_DEPTH`] (corrupted metadata), is an
    /// error, after which nothing more comes.
    fn ancestors<'a>(
        &'a self,
        parent: &str,
    ) -> impl Iterator<Item = Result<(String, Snapshot), Error>> + 'a {
        let (start, mut at, mut seen) = (parent.to_string(), parent.to_string(), 0);
        std::iter::from_fn(move || {
            if at.is_empty() {
                return None;
            }
            let key = std::mem::take(&mut at);
            if seen > MAX_DEPTH {
                return Some(Err(Error::FailedPrecondition(format!(
                    "parent chain of {start:?} is too long"
                ))));
            }
            seen += 1;
            Some(match self.store.get(&key) {
                Ok(Some(s)) => {
                    at = s.parent.clone();
                    Ok((key, s))
                }
                Ok(None) => Err(Error::NotFound(format!("parent snapshot {key:?}"))),
                Err(e) => Err(e),
            })
        })
    }

    /// Parent directories, nearest first. A lazy layer's directory is checked to be a live
    /// mount, and mounted again if it is not (its FUSE manager died, or it failed to mount
    /// at restore): handing containerd a dead or empty lower directory would start a
    /// container with its image's files missing.
    fn parent_dirs(&self, parent: &str) -> Result<Vec<Lower>, Error> {
        let mut out = Vec::new();
        for ancestor in self.ancestors(parent) {
            let (at, s) = ancestor?;
            let dir = self.fs_dir(s.id);
            if let Some(layer) = &s.remote {
                if !self.mounter.is_serving(&dir) {
                    tracing::warn!(snapshot = %at, layer = %layer.digest, "lazy layer is not mounted; mounting it again");
                    self.mount_remote(s.id, layer, &s.parent).map_err(|e| {
                        Error::FailedPrecondition(format!(
                            "lazy layer {} (snapshot {at:?}) is not mounted and could not be mounted again: {e}",
                            layer.digest
                        ))
                    })?;
                }
            }
            out.push(Lower {
                dir,
                lazy: s.remote.is_some(),
            });
        }
        Ok(out)
    }

    fn mounts_of(&self, s: &Snapshot) -> Result<Vec<Mount>, Error> {
        let parents = self.parent_dirs(&s.parent)?;
        let path = |p: &Path| p.display().to_string();
        let bind = |source: &Path, rw: bool| Mount {
            kind: "bind".into(),
            source: path(source),
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
        };
        // A lazy layer whose content is all local is served without FUSE too (an EROFS
        // image of its metadata whose files redirect to a data directory; the FUSE mount
        // stays for the containers using it): stacked instead of the FUSE mount, with its
        // data directory after every lower layer, as a data-only lower layer ("::DIR").
        let mut data = String::new();
        let locals: Vec<PathBuf> = parents
            .iter()
            .map(|p| match (p.lazy, p.dir.parent()) {
                (true, Some(snapshot)) => snapshot.join("local"),
                _ => PathBuf::new(), // never an EROFS mount's
            })
            .collect();
        let forms = local_forms_of(&locals.iter().map(|l| l.as_path()).collect::<Vec<_>>());
        let dirs: Vec<PathBuf> = parents
            .iter()
            .zip(forms)
            .map(|(p, form)| match form {
                Some(f) => {
                    data.push_str(&format!("::{}", path(&f.data)));
                    f.meta
                }
                None => p.dir.clone(),
            })
            .collect();
        let lower = || {
            format!(
                "lowerdir={}{data}",
                dirs.iter().map(|d| path(d)).collect::<Vec<_>>().join(":")
            )
        };
        // overlayfs follows a metacopy file of a lower layer other than the last to its
        // data only with metacopy=on (it answers EPERM otherwise). The FUSE layers never
        // show a TOC's own overlay attributes, and the data directories are this image's,
        // so what a redirect can reach is what the container may read anyway.
        let with_data = |mut options: Vec<String>| {
            if !data.is_empty() {
                options.push("metacopy=on".into());
            }
            options
        };
        Ok(vec![match (s.kind, parents.len()) {
            (Kind::Active, 0) => bind(&self.fs_dir(s.id), true),
            (_, 0) => bind(&self.fs_dir(s.id), false),
            // A lazy layer is mounted nosuid: show it through overlayfs (over an empty
            // directory, as overlayfs wants two lower layers without an upper one) so that
            // setuid binaries behave as in any other view.
            (Kind::View, 1) if parents[0].lazy => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: with_data(vec![format!(
                    "lowerdir={}:{}{data}",
                    path(&dirs[0]),
                    path(&self.root.join("empty"))
                )]),
            },
            (Kind::View, 1) => bind(&parents[0].dir, false),
            (Kind::View, _) => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: with_data(vec![lower()]),
            },
            _ => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: with_data(vec![
                    format!("workdir={}", path(&self.dir(s.id).join("work"))),
                    format!("upperdir={}", path(&self.fs_dir(s.id))),
                    lower(),
                ]),
            },
        }])
    }

    /// Creates an active or view snapshot `key` on `parent` (ordinary path).
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("empty snapshot key".into()));
        }
        let _g = self.guard();
        if self.store.get(key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
        }
        if !parent.is_empty() {
            match self.store.get(parent)? {
                None => return Err(Error::NotFound(format!("parent snapshot {parent:?}"))),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(Error::InvalidArgument(format!(
                        "parent {parent:?} is not a committed snapshot"
                    )))
                }
                Some(_) => {}
            }
        }
        let id = self.store.update(|t| t.next_id())?;
        let dir = self.dir(id);
        let made = (|| {
            private_dir(&dir)?;
            fs_dir(&dir.join("fs"))?;
            if kind == Kind::Active {
                private_dir(&dir.join("work"))?;
            }
            Ok(())
        })();
        made.map_err(io(format!("creating {}", dir.display())))?;
        let now = Time::now();
        let s = Snapshot {
            id,
            kind,
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            usage: None,
            remote: None,
        };
        if let Err(e) = self.store.update(|t| t.put(key, &s)) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        // The parents cannot go now (they have a child); their checks may mount a layer.
        drop(_g);
        self.mounts_of(&s)
    }

    /// Tries to mount the layer `labels` describe lazily and commit it as `target`. `Ok`
    /// means the snapshot exists now (containerd is told ALREADY_EXISTS); `Err` says why the
    /// layer must be pulled the ordinary way.
    pub async fn prepare_remote(
        self: &Arc<Self>,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), (Fallback, String)> {
        let info = LayerLabels::from_labels(labels).ok_or((
            Fallback::NoLayerLabels,
            "no image reference or layer digest labels".into(),
        ))??;
        if !info.other_layers.is_empty() {
            self.resolver
                .prefetch(&info.reference, &info.other_layers, &info.toc_sizes);
        }
        let started = std::time::Instant::now();
        let resolved = tokio::time::timeout(
            self.config.resolve_timeout(),
            self.resolver.resolve(
                &info.reference,
                &info.digest,
                info.toc_digest,
                info.toc_sizes.get(&info.digest).copied(),
            ),
        )
        .await
        .map_err(|_| {
            (
                Fallback::Timeout,
                format!(
                    "resolving took more than {:?}",
                    self.config.resolve_timeout()
                ),
            )
        })
        .and_then(|r| r);
        // Without a TOC digest from the image, a layer is refused, but the reason given is
        // the more useful one: not eStargz at all, or eStargz without the annotation.
        let fetched = match (resolved, &info.toc_digest) {
            (Ok(_), None) if !self.config.allow_unverified => {
                return Err((
                    Fallback::NoTocDigest,
                    format!(
                        "layer {} has no TOC digest label and allow_unverified is off",
                        info.digest
                    ),
                ))
            }
            (r, _) => r?,
        };
        let resolved_in = started.elapsed();
        self.metrics.observe_resolve(resolved_in);
        tracing::debug!(layer = %info.digest, ms = resolved_in.as_secs_f64() * 1e3, "TOC resolved");
        let (this, target, parent, labels) = (
            self.clone(),
            target.to_string(),
            parent.to_string(),
            labels.clone(),
        );
        tokio::task::spawn_blocking(move || {
            this.commit_remote(&target, &parent, labels, &fetched.json, &fetched.layer)
        })
        .await
        .map_err(|e| (Fallback::Mount, e.to_string()))?
        .inspect(|_| {
            tracing::debug!(layer = %info.digest,
                ms = started.elapsed().as_secs_f64() * 1e3, "layer committed")
        })
        .map_err(|e| match &e {
            Error::Manager(m) if m.kind == ErrorKind::InvalidToc => {
                (Fallback::NotEstargz, e.to_string())
            }
            _ => (Fallback::Mount, e.to_string()),
        })
    }

    /// Commits a lazily mounted layer as `target`: the snapshot's directory and saved TOC
    /// are staged under the lock, the layer is mounted without it (a slow mount delays only
    /// this layer), and the record is written under the lock again, after checking that
    /// nothing changed meanwhile.
    pub(crate) fn commit_remote(
        &self,
        target: &str,
        parent: &str,
        mut labels: BTreeMap<String, String>,
        json: &[u8],
        layer: &RemoteLayer,
    ) -> Result<(), Error> {
        let id = {
            let _g = self.guard();
            if self.store.get(target)?.is_some() {
                return Ok(());
            }
            self.check_committed_parent(parent)?;
            let id = self.store.update(|t| t.next_id())?;
            let dir = self.dir(id);
            let staged = (|| -> std::io::Result<()> {
                private_dir(&dir)?;
                fs_dir(&dir.join("fs"))?;
                let tmp = dir.join("toc.json.tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(json)?;
                f.sync_all()?;
                std::fs::rename(&tmp, dir.join("toc.json"))
            })();
            if let Err(e) = staged {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::io(format!("saving the TOC in {}", dir.display()), e));
            }
            self.lock_staging().insert(id);
            id
        };
        let mounted = self.mount_remote(id, layer, parent);
        let _g = self.guard();
        self.lock_staging().remove(&id);
        let was_mounted = mounted.is_ok();
        let undo = |e: Error| {
            if was_mounted {
                let _ = self.mounter.unmount(&self.fs_dir(id));
            }
            let _ = std::fs::remove_dir_all(self.dir(id));
            e
        };
        mounted.map_err(undo)?;
        // Another Prepare of the same layer may have finished first: its snapshot stands.
        if self.store.get(target)?.is_some() {
            let _ = undo(Error::AlreadyExists(target.into()));
            return Ok(());
        }
        self.check_committed_parent(parent).map_err(undo)?;
        labels.insert(REMOTE_LABEL.into(), "remote snapshot".into());
        let now = Time::now();
        let s = Snapshot {
            id,
            kind: Kind::Committed,
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            usage: Some(Usage::default()),
            remote: Some(layer.clone()),
        };
        self.store.update(|t| t.put(target, &s)).map_err(undo)?;
        tracing::info!(snapshot = %target, layer = %layer.digest, reference = %layer.reference, "layer mounted lazily");
        Ok(())
    }

    fn check_committed_parent(&self, parent: &str) -> Result<(), Error> {
        if parent.is_empty()
            || matches!(self.store.get(parent)?, Some(p) if p.kind == Kind::Committed)
        {
            Ok(())
        } else {
            Err(Error::NotFound(format!("committed parent {parent:?}")))
        }
    }

    fn lock_staging(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.staging.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mounts of active or view snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let s = self.get(key)?;
        if s.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed; only active and view snapshots have mounts"
            )));
        }
        self.mounts_of(&s)
    }

    fn get(&self, key: &str) -> Result<Snapshot, Error> {
        self.store
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))
    }

    /// Commits active snapshot `key` as `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let _g = self.guard();
        let s = self.get(key)?;
        if s.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is {}, only active snapshots can be committed",
                s.kind.as_str()
            )));
        }
        if self.store.get(name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        let usage = disk_usage(&self.fs_dir(s.id))
            .map_err(io(format!("measuring {}", self.fs_dir(s.id).display())))?;
        let now = Time::now();
        let committed = Snapshot {
            kind: Kind::Committed,
            labels,
            created: now,
            updated: now,
            usage: Some(usage),
            ..s
        };
        // The work directory is only for active snapshots; removing it first is harmless.
        let _ = std::fs::remove_dir_all(self.dir(committed.id).join("work"));
        self.store.update(|t| {
            t.delete(key)?;
            t.put(name, &committed)
        })
    }

    /// Removes snapshot `key` (which must have no children).
    pub fn remove(&self, key: &str) -> Result<(), Error> {
        let _g = self.guard();
        let s = self.store.update(|t| {
            let s = t
                .get(key)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
            if t.has_children(key)? {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} has children; remove them first"
                )));
            }
            t.delete(key)?;
            Ok(s)
        })?;
        drop(_g);
        // The record is gone; what remains on disk is cleaned now, or by Cleanup.
        if let Err(e) = self.remove_dir(s.id) {
            tracing::warn!(snapshot = %key, error = %e, "removing the snapshot's directory failed; Cleanup will retry");
        }
        Ok(())
    }

    fn remove_dir(&self, id: u64) -> Result<(), Error> {
        let dir = self.dir(id);
        let fs = dir.join("fs");
        if self.mounter.is_serving(&fs) || is_mountpoint(&fs) || is_dead_mount(&fs) {
            if let Err(e) = self.mounter.unmount(&fs) {
                tracing::warn!(mountpoint = %fs.display(), error = %e, "the FUSE manager could not unmount; detaching");
            }
            if is_mountpoint(&fs) || is_dead_mount(&fs) {
                detach(&fs).map_err(io(format!("detaching {}", fs.display())))?;
            }
        }
        // The layer served without FUSE by a manager that died is still mounted.
        for (at, _) in local_mounts_under(&dir.join("local")) {
            detach(&at).map_err(io(format!("detaching {}", at.display())))?;
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing {}", dir.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Information on snapshot `key`.
    pub fn stat(&self, key: &str) -> Result<Snapshot, Error> {
        self.get(key)
    }

    /// Updates labels of `key`: all of them (empty `paths` or `labels`), or the
    /// `labels.KEY` paths given. Returns the new record.
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot, Error> {
        let _g = self.guard();
        self.store.update(|t| {
            let mut s = t
                .get(key)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
            if paths.is_empty() || paths.iter().any(|p| p == "labels") {
                let remote = s.labels.get(REMOTE_LABEL).cloned();
                s.labels = labels.clone();
                if let Some(r) = remote {
                    s.labels.entry(REMOTE_LABEL.into()).or_insert(r);
                }
            }
            for p in paths.iter().filter(|p| *p != "labels") {
                let Some(k) = p.strip_prefix("labels.") else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {p:?} of a snapshot (only labels)"
                    )));
                };
                match labels.get(k) {
                    Some(v) => s.labels.insert(k.to_string(), v.clone()),
                    None => s.labels.remove(k),
                };
            }
            s.updated = Time::now();
            t.put(key, &s)?;
            Ok(s)
        })
    }

    /// Disk usage of `key`'s own directory (measured now for active snapshots).
    pub fn usage(&self, key: &str) -> Result<Usage, Error> {
        let s = self.get(key)?;
        match s.usage {
            Some(u) if s.kind == Kind::Committed => Ok(u),
            _ => disk_usage(&self.fs_dir(s.id)).map_err(io("measuring usage")),
        }
    }

    /// Every snapshot matching any of `filters`.
    pub fn list(&self, filters: &[String]) -> Result<Vec<(String, Snapshot)>, Error> {
        let filters = filters
            .iter()
            .filter(|f| !f.is_empty())
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .store
            .all()?
            .into_iter()
            .filter(|(k, s)| matches_any(&filters, k, s))
            .collect())
    }

    /// Removes directories (and mounts) that no snapshot owns. Returns how many.
    pub fn cleanup(&self) -> Result<usize, Error> {
        let orphans: Vec<u64> = {
            let _g = self.guard();
            let mut owned: HashSet<u64> =
                self.store.all()?.into_iter().map(|(_, s)| s.id).collect();
            owned.extend(self.lock_staging().iter());
            let base = self.root.join("snapshots");
            std::fs::read_dir(&base)
                .map_err(io(format!("listing {}", base.display())))?
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
                .filter(|id| !owned.contains(id))
                .collect()
        };
        // IDs are never reused, so what was an orphan under the lock still is one.
        let mut removed = 0;
        for id in orphans {
            match self.remove_dir(id) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(dir = %self.dir(id).display(), "removed an orphaned snapshot directory")
                }
                Err(e) => tracing::warn!(error = %e, "cleanup"),
            }
        }
        Ok(removed)
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// Allocated bytes and inodes under `dir`, each inode counted once, not crossing mounts.
fn disk_usage(dir: &Path) -> std::io::Result<Usage> {
    use std::os::unix::fs::MetadataExt;
    let top = std::fs::symlink_metadata(dir)?;
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let m = entry.metadata()?;
            if m.dev() != top.dev() {
                continue;
            }
            if seen.insert(m.ino()) {
                usage.inodes += 1;
                usage.size += (m.blocks() * 512) as i64;
            }
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
#[path = "snapshotter_tests.rs"]
mod tests;
