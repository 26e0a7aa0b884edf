//! Fetching an executable's libraries ahead of the loader.
//!
//! A dynamically linked program starts with a chain of misses, one round trip each: the
//! kernel reads the executable's header, then its interpreter (`ld.so`), which reads each
//! library the executable names, one after another, and then each library's own. When a
//! read of the start of a file brings an ELF header, the layer reads the object's
//! interpreter and `DT_NEEDED` libraries itself, finds them as the loader would (run path,
//! then the multiarch and traditional library directories) in the image's file system as
//! the container sees it (this layer over the layers below it, with whiteouts and opaque
//! directories), and fetches them all at once, then their own, on a thread of its own: by
//! the time the loader opens a library it is local or on its way. What is fetched is what
//! the loader reads next; nothing is fetched for a file that is not an ELF object, and an
//! object's libraries are looked for once per mount.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

use super::Inner;
use crate::tree::NodeKind;
use estargz_format::elf::{self, Needs};

/// Most dependency walks running at once on the node (each with up to [`PARALLEL`]
/// threads); a walk asked for beyond is dropped (its libraries are then fetched as the
/// loader reads them).
const MAX_WALKS: usize = 4;
/// Most files one walk fetches.
const MAX_FILES: usize = 64;
/// Levels of libraries followed (the object's own, theirs, and so on).
const MAX_DEPTH: u32 = 4;
/// Libraries fetched at once by one walk.
const PARALLEL: usize = 8;
/// Symlinks followed while resolving one path (the kernel's limit).
const MAX_LINKS: usize = 40;
/// Bytes read at the start of a library: its headers, as the loader reads them.
const HEAD: u32 = 4096;

/// One file of the image as the container sees it: layer `layer` of the stack (0: the one
/// the walk started in), inode `ino`, reached by `path`.
#[derive(Clone)]
struct Found {
    layer: usize,
    ino: u64,
    path: String,
}

impl Inner {
    /// Called before a read of the start of regular file `ino` is served: if the TOC
    /// records what the object loads, the walk starts now, and its libraries (and theirs)
    /// are on their way beside the object's own fetch rather than after it.
    pub(super) fn elf_starting(&self, ino: u64) {
        if self.tree.elf_needs(ino).is_some() {
            self.start_walk(ino);
        }
    }

    /// Called with the first bytes of regular file `ino` that a reader got: if they start
    /// an ELF object whose libraries were not looked for yet on this mount, starts a walk
    /// that fetches them.
    pub(super) fn elf_read(&self, ino: u64, head: &[u8]) {
        if head.starts_with(b"\x7fELF") {
            self.start_walk(ino);
        }
    }

    /// Starts a walk from ELF object `ino` on a thread of its own, unless its libraries
    /// were looked for on this mount already, or there is nothing to fetch.
    fn start_walk(&self, ino: u64) {
        if self.looked_for(ino) || self.closed.load(Ordering::Relaxed) || self.stack_is_local() {
            return;
        }
        let walks = &self.scheduler.dependency_walks;
        if walks.fetch_add(1, Ordering::AcqRel) >= MAX_WALKS {
            // Not marked seen: the next read of the object may find a free slot.
            walks.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        // Marked as the walk's start, not as a library (unless a walk already has it).
        let fresh = {
            let mut seen = self.deps_seen.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = !seen.contains_key(&ino);
            seen.entry(ino).or_insert(false);
            fresh
        };
        let Some(me) = self.me.upgrade().filter(|_| fresh) else {
            walks.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let walk = move || {
            let started = std::time::Instant::now();
            let path = me.tree.path(ino);
            let fetched = me.fetch_dependencies(Found {
                layer: 0,
                ino,
                path: path.clone(),
            });
            me.stats
                .dependency_files
                .fetch_add(fetched as u64, Ordering::Relaxed);
            tracing::debug!(file = %path, fetched,
                ms = started.elapsed().as_secs_f64() * 1e3, "libraries fetched ahead of the loader");
            me.scheduler.dependency_walks.fetch_sub(1, Ordering::AcqRel);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("estargz-deps".into())
            .spawn(walk)
        {
            // The closure went with the failed spawn; its slot did not.
            walks.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!(error = %e, "no thread for a dependency walk");
        }
    }

    /// Called when executable regular file `ino` is opened in passthrough mode (its
    /// content is local, and its reads go to the kernel, not here): as [`Inner::elf_read`]
    /// with its first bytes. Its libraries may not be local yet: it may have come as a
    /// neighbour of another file, or been prefetched without them.
    pub(super) fn elf_opened(&self, ino: u64) {
        if self.looked_for(ino) {
            return;
        }
        if self.tree.elf_needs(ino).is_some() {
            return self.start_walk(ino);
        }
        if let Ok(head) = self.read_file(ino, 0, 64) {
            self.elf_read(ino, &head);
        }
    }

    /// Whether the libraries of object `ino` were looked for on this mount.
    fn looked_for(&self, ino: u64) -> bool {
        self.deps_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&ino)
    }

    /// Whether a dependency walk on this mount reached object `ino` as the library of
    /// another.
    pub(super) fn is_library(&self, ino: u64) -> bool {
        self.deps_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino)
            .is_some_and(|&library| library)
    }

    /// Whether every chunk of this layer and of the layers below it is local, as far as
    /// their counters tell (evictions are not seen): then a walk would fetch nothing, and
    /// a warm container or a tree walk does not pay for it.
    fn stack_is_local(&self) -> bool {
        let local = |l: &Inner| {
            let p = l.progress();
            p.cached_chunks >= p.total_chunks
        };
        local(self)
            && self.lowers.get().is_none_or(|lowers| {
                lowers
                    .iter()
                    .all(|l| l.upgrade().is_some_and(|l| local(&l)))
            })
    }

    /// This layer, then the layers below it that are still mounted, nearest first.
    fn stack(self: &Arc<Self>) -> Vec<Arc<Inner>> {
        let mut out = vec![self.clone()];
        if let Some(lowers) = self.lowers.get() {
            for l in lowers {
                match l.upgrade() {
                    Some(l) if !l.closed.load(Ordering::Relaxed) => out.push(l),
                    // A gap would let a lower layer's file stand for one the missing layer
                    // holds or hides.
                    _ => break,
                }
            }
        }
        out
    }

    /// Reads the libraries of `start` (already read) and theirs, a few at a time; returns
    /// how many files were read.
    fn fetch_dependencies(self: &Arc<Self>, start: Found) -> usize {
        struct Queue {
            todo: VecDeque<(Found, u32)>,
            seen: HashSet<(usize, u64)>,
            busy: usize,
            fetched: usize,
        }
        let stack = self.stack();
        let queue = Mutex::new(Queue {
            todo: VecDeque::from([(start.clone(), 0)]),
            seen: HashSet::from([(start.layer, start.ino)]),
            busy: 0,
            fetched: 0,
        });
        let changed = Condvar::new();
        // Queues what `needs` names, as soon as it is known.
        let add = |from: &Found, depth: u32, needs: &Needs| {
            if depth >= MAX_DEPTH {
                return;
            }
            let mut wanted: Vec<Found> = Vec::new();
            if let Some(interp) = &needs.interp {
                wanted.extend(resolve(&stack, interp));
            }
            let origin = from.path.rsplit_once('/').map_or("", |(dir, _)| dir);
            let dirs: Vec<String> = needs
                .runpath
                .iter()
                .filter_map(|d| {
                    let d = d
                        .replace("${ORIGIN}", &format!("/{origin}"))
                        .replace("$ORIGIN", &format!("/{origin}"));
                    // Other substitutions ($LIB, $PLATFORM) depend on the machine.
                    (!d.contains('$')).then_some(d)
                })
                .chain(needs.default_dirs())
                .collect();
            for name in &needs.needed {
                if let Some(f) = dirs
                    .iter()
                    .find_map(|d| resolve(&stack, &format!("{d}/{name}")))
                {
                    wanted.push(f);
                }
            }
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            for f in wanted {
                if q.seen.len() < MAX_FILES && q.seen.insert((f.layer, f.ino)) {
                    q.todo.push_back((f, depth + 1));
                }
            }
            changed.notify_all();
        };
        // Takes one object off the queue (waiting while others may still add some), reads
        // its start and what it needs; false once nothing is left.
        let step = || -> bool {
            let (item, depth) = {
                let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(next) = q.todo.pop_front() {
                        q.busy += 1;
                        break next;
                    }
                    if q.busy == 0 || stack[0].closed.load(Ordering::Relaxed) {
                        return false;
                    }
                    q = changed.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let layer = &stack[item.layer];
            // Looked for here: the loader's own read of it starts no walk of its own.
            *layer
                .deps_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(item.ino)
                .or_default() |= depth > 0;
            // What the TOC records is queued before the object is read: its libraries go
            // out beside it.
            let recorded = layer.tree.elf_needs(item.ino);
            if let Some(needs) = recorded {
                add(&item, depth, needs);
            }
            let ok = if depth == 0 {
                true
            } else {
                let _reading = layer.scheduler.reading();
                layer.read_file(item.ino, 0, HEAD).is_ok()
            };
            if ok && recorded.is_none() {
                let mut read = |offset: u64, len: usize| {
                    let _reading = layer.scheduler.reading();
                    layer.read_file(item.ino, offset, len.min(u32::MAX as usize) as u32)
                };
                // The interpreter is queued as soon as it is known (the dynamic section may
                // lie in a chunk still to arrive), the libraries once they are; `seen`
                // keeps the interpreter from being queued twice.
                let mut found = |needs: &Needs| add(&item, depth, needs);
                if let Err(e) = elf::needs(&mut read, &mut found) {
                    tracing::debug!(file = %item.path, error = %e, "reading an object's libraries");
                }
            }
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            q.busy -= 1;
            q.fetched += usize::from(ok && depth > 0);
            changed.notify_all();
            true
        };
        // This thread only starts workers (up to `PARALLEL`), one for each object waiting
        // beyond those being read: most objects name a few libraries, most of them
        // already looked for, and a worker blocked on a fetch must not hold back the
        // objects queued meanwhile (the next level of a tree the TOC records).
        std::thread::scope(|s| {
            let mut threads = 0;
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if q.todo.is_empty() && (q.busy == 0 || stack[0].closed.load(Ordering::Relaxed)) {
                    break;
                }
                if threads < PARALLEL && threads < q.busy + q.todo.len() {
                    s.spawn(|| while step() {});
                    threads += 1;
                    continue;
                }
                q = changed.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        });
        queue
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .fetched
    }
}

/// The regular file at absolute `path` in the file system `stack` makes (top layer first),
/// as overlayfs shows it: the topmost layer holding a name decides what it is, a whiteout
/// hides it below, an opaque directory hides the directories below it; symlinks are
/// followed within the image (an absolute target starts again at its root).
fn resolve(stack: &[Arc<Inner>], path: &str) -> Option<Found> {
    let mut todo: Vec<String> = components(path).rev().collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(name) = todo.pop() {
        match name.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        match lookup(stack, &done, &name)? {
            Entry::Dir => done.push(name),
            Entry::Symlink(target) => {
                links += 1;
                if links > MAX_LINKS {
                    return None;
                }
                if target.starts_with('/') {
                    done.clear();
                }
                todo.extend(components(&target).rev());
            }
            Entry::File(layer, ino) if todo.is_empty() => {
                done.push(name);
                return Some(Found {
                    layer,
                    ino,
                    path: done.join("/"),
                });
            }
            Entry::File(..) => return None,
        }
    }
    None
}

fn components(path: &str) -> impl DoubleEndedIterator<Item = String> + '_ {
    path.split('/').filter(|c| !c.is_empty()).map(String::from)
}

enum Entry {
    Dir,
    Symlink(String),
    File(usize, u64),
}

/// What `name` in directory `dir` (a path of directories, already resolved) is in `stack`.
fn lookup(stack: &[Arc<Inner>], dir: &[String], name: &str) -> Option<Entry> {
    'layers: for (i, layer) in stack.iter().enumerate() {
        let tree = &layer.tree;
        let mut at = 1;
        let mut opaque = false;
        for c in dir {
            let Some(next) = tree.child(at, c) else {
                continue 'layers;
            };
            let node = tree.node(next)?;
            if node.whiteout {
                return None;
            }
            if node.kind != NodeKind::Dir {
                continue 'layers;
            }
            opaque |= node.opaque;
            at = next;
        }
        let Some(ino) = tree.child(at, name) else {
            if opaque {
                return None;
            }
            continue;
        };
        let node = tree.node(ino)?;
        return match node.kind {
            _ if node.whiteout => None,
            NodeKind::Dir => Some(Entry::Dir),
            NodeKind::Symlink => tree
                .link_target(node)
                .map(|t| Entry::Symlink(t.to_string())),
            NodeKind::File => Some(Entry::File(i, ino)),
            _ => None,
        };
    }
    None
}

/// The dynamic loader of the machine this node runs, and its C library, where images of
/// the common distributions keep them (glibc multiarch, glibc lib64, musl), first choices
/// first: every dynamically linked program an image runs reads both before anything else.
fn loader_candidates() -> (&'static [&'static str], &'static [&'static str]) {
    match std::env::consts::ARCH {
        "x86_64" => (
            &["/lib64/ld-linux-x86-64.so.2", "/lib/ld-musl-x86_64.so.1"],
            &[
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/libc.so.6",
                "/usr/lib64/libc.so.6",
            ],
        ),
        "aarch64" => (
            &["/lib/ld-linux-aarch64.so.1", "/lib/ld-musl-aarch64.so.1"],
            &[
                "/lib/aarch64-linux-gnu/libc.so.6",
                "/usr/lib/aarch64-linux-gnu/libc.so.6",
                "/lib64/libc.so.6",
                "/usr/lib64/libc.so.6",
            ],
        ),
        _ => (&[], &[]),
    }
}

impl Inner {
    /// The regular files of this layer that are the image's dynamic loader and C library
    /// as the container will see them (this layer over the layers below it): for a layer
    /// without prioritized files, what its first container is sure to read first.
    pub(crate) fn loader_files(self: &Arc<Self>) -> Vec<u64> {
        let stack = self.stack();
        let (loaders, libcs) = loader_candidates();
        let mut out: Vec<u64> = Vec::new();
        for candidates in [loaders, libcs] {
            // The first one the image has; it decides even when a layer below holds it.
            if let Some(f) = candidates.iter().find_map(|p| resolve(&stack, p)) {
                if f.layer == 0 && !out.contains(&f.ino) {
                    out.push(f.ino);
                }
            }
        }
        out
    }
}
