//! What a workload touches, as the layers' file systems see it: the record `estargz
//! optimize` turns into prioritized files.
//!
//! Recording happens in the FUSE layers themselves rather than with fanotify on the
//! merged root: under overlayfs, a name is looked up layer by layer from the top until a
//! layer has it, so the layer that answers a lookup, open or read of a file is exactly the
//! layer whose version of the file the container sees. Only the first touch of a file is
//! an event; later reads only widen its byte ranges.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a file was touched by, the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessOp {
    /// Its name was looked up (stat, or the first step of an open or exec).
    Lookup,
    /// It was opened (read, write or exec).
    Open,
    /// Its content was read.
    Read,
    /// A symbolic link was followed or read.
    Readlink,
}

impl AccessOp {
    /// The lower-case name used in records.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessOp::Lookup => "lookup",
            AccessOp::Open => "open",
            AccessOp::Read => "read",
            AccessOp::Readlink => "readlink",
        }
    }
}

/// One file (regular file or symlink) of one layer that the workload touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Index of the layer (as given to [`crate::LayerFs::record_into`]).
    pub layer: usize,
    /// Path in the layer, relative to its root (`usr/bin/python3`).
    pub path: String,
    /// A symbolic link rather than a regular file.
    pub symlink: bool,
    /// Size of the file's content.
    pub size: u64,
    /// When it was first touched, from [`AccessRecorder::start`].
    pub first: Duration,
    /// What touched it first.
    pub first_op: AccessOp,
    /// It was opened or read at some point, not only looked up (a stat, or a search for a
    /// module that found another file first): its content is needed.
    pub opened: bool,
    /// Byte ranges read through FUSE, sorted and merged (at most [`MAX_RANGES`]; closer
    /// ranges are merged beyond that). A recording layer turns the kernel's read-ahead
    /// off, so these are the pages the workload read.
    pub ranges: Vec<Range<u64>>,
}

/// Most ranges kept per file: enough that the pages a start reads of a large program
/// stay apart (they become the chunks its converted image marks for prefetch), while a
/// random reader of a large file does not grow the record without bound.
pub const MAX_RANGES: usize = 4096;

/// Collects [`Access`]es from the layers of one image while recording is on. Shared by all
/// its layers, so the order is the order across layers.
#[derive(Debug, Default)]
pub struct AccessRecorder {
    on: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    started: Option<Instant>,
    /// (layer, inode) to its index in `accesses`.
    seen: HashMap<(usize, u64), usize>,
    accesses: Vec<Access>,
}

impl AccessRecorder {
    /// A recorder that records nothing until [`AccessRecorder::start`].
    pub fn new() -> AccessRecorder {
        AccessRecorder::default()
    }

    /// Starts recording; times are measured from now. Touches before this (the setup of
    /// the container, reading its `/etc/passwd` for a user name) are not recorded.
    pub fn start(&self) {
        self.lock().started = Some(Instant::now());
        self.on.store(true, Ordering::SeqCst);
    }

    /// Stops recording.
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
    }

    /// Everything recorded, in the order of first touch.
    pub fn accesses(&self) -> Vec<Access> {
        self.lock().accesses.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a touch of inode `ino` of layer `layer`; `describe` gives its path, whether
    /// it is a symlink, and its size (called once per file: finding a path costs a scan).
    pub(crate) fn touch(
        &self,
        layer: usize,
        ino: u64,
        op: AccessOp,
        read: Option<Range<u64>>,
        describe: impl FnOnce() -> (String, bool, u64),
    ) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let mut state = self.lock();
        let at = match state.seen.get(&(layer, ino)) {
            Some(&i) => i,
            None => {
                let (path, symlink, size) = describe();
                let first = state.started.map_or(Duration::ZERO, |s| s.elapsed());
                let i = state.accesses.len();
                state.accesses.push(Access {
                    layer,
                    path,
                    symlink,
                    size,
                    first,
                    first_op: op,
                    opened: false,
                    ranges: Vec::new(),
                });
                state.seen.insert((layer, ino), i);
                i
            }
        };
        if matches!(op, AccessOp::Open | AccessOp::Read) {
            state.accesses[at].opened = true;
        }
        if let Some(r) = read.filter(|r| r.start < r.end) {
            add_range(&mut state.accesses[at].ranges, r);
        }
    }
}

/// Adds `r` to the sorted, disjoint `ranges`, merging what it overlaps or touches; beyond
/// [`MAX_RANGES`], merges the two ranges with the smallest gap between them.
fn add_range(ranges: &mut Vec<Range<u64>>, r: Range<u64>) {
    let first = ranges.partition_point(|x| x.end < r.start);
    let last = ranges.partition_point(|x| x.start <= r.end);
    if first == last {
        ranges.insert(first, r);
    } else {
        let merged = ranges[first].start.min(r.start)..ranges[last - 1].end.max(r.end);
        ranges.splice(first..last, [merged]);
    }
    if ranges.len() > MAX_RANGES {
        let i = (1..ranges.len())
            .min_by_key(|&i| ranges[i].start - ranges[i - 1].end)
            .unwrap_or(1);
        ranges[i - 1].end = ranges[i].end;
        ranges.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_stay_bounded() {
        let mut r = Vec::new();
        add_range(&mut r, 10..20);
        add_range(&mut r, 30..40);
        add_range(&mut r, 0..5);
        assert_eq!(r, vec![0..5, 10..20, 30..40]);
        add_range(&mut r, 20..30);
        assert_eq!(r, vec![0..5, 10..40]);
        add_range(&mut r, 3..12);
        assert_eq!(r, vec![0..40]);
        let mut r = Vec::new();
        for i in 0..(MAX_RANGES as u64 + 10) {
            add_range(&mut r, i * 100..i * 100 + 10);
        }
        assert_eq!(r.len(), MAX_RANGES);
        assert_eq!(r[0].start, 0);
        assert_eq!(
            r.last().map(|x| x.end),
            Some((MAX_RANGES as u64 + 9) * 100 + 10)
        );
        assert!(r.windows(2).all(|w| w[0].end < w[1].start));
    }

    #[test]
    fn only_the_first_touch_is_an_event_and_nothing_before_start() {
        let rec = AccessRecorder::new();
        rec.touch(0, 5, AccessOp::Lookup, None, || ("early".into(), false, 1));
        rec.start();
        rec.touch(1, 7, AccessOp::Open, None, || ("b".into(), false, 9));
        rec.touch(0, 5, AccessOp::Lookup, None, || ("a".into(), false, 4));
        rec.touch(0, 6, AccessOp::Lookup, None, || {
            ("stat only".into(), false, 4)
        });
        rec.touch(0, 5, AccessOp::Read, Some(0..4), || unreachable!());
        rec.touch(1, 7, AccessOp::Read, Some(0..9), || unreachable!());
        rec.stop();
        rec.touch(0, 8, AccessOp::Lookup, None, || ("late".into(), false, 1));
        let got = rec.accesses();
        let summary: Vec<_> = got
            .iter()
            .map(|a| (a.layer, a.path.as_str(), a.first_op, a.opened))
            .collect();
        assert_eq!(
            summary,
            [
                (1, "b", AccessOp::Open, true),
                (0, "a", AccessOp::Lookup, true),
                (0, "stat only", AccessOp::Lookup, false)
            ]
        );
        let spans = |a: &Access| {
            a.ranges
                .iter()
                .map(|r| (r.start, r.end))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            (spans(&got[0]), spans(&got[1])),
            (vec![(0, 9)], vec![(0, 4)])
        );
    }
}
