//! End to end with a real containerd (own root, state and socket, `proxy_plugins` naming
//! the daemon), a real registry, runc and the reference `ctr-remote`:
//! `testdata/scripts/snapshotter-e2e.sh` lists the checks. Needs root, FUSE, overlayfs.

use std::path::Path;

#[test]
fn containerd_end_to_end() {
    let snapshotter = Path::new(env!("CARGO_BIN_EXE_estargz-snapshotter"));
    // `cargo test --workspace` builds every binary; the CLI sits next to this one.
    let estargz = estargz_testutil::cli_beside(snapshotter);
    let out = estargz_testutil::run_script(
        "snapshotter-e2e.sh",
        &[],
        &[
            ("SNAPSHOTTER", snapshotter.to_str().unwrap()),
            ("ESTARGZ", estargz.to_str().unwrap()),
        ],
    );
    print!("{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok - ")).count(),
        12,
        "{out}"
    );
}
