//! `estargz mount` of an image from a real registry: layers lazily through FUSE, stacked
//! with overlayfs, readable, and all unmounted on Ctrl-C. Needs root and /dev/fuse.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use estargz_oci::{OciLayout, Platform};
use estargz_testutil::{one_file_tar, real_rootfs_tar, write_oci_image, TestRegistry};

/// Kills the mount process and detaches its mounts if the test fails half way.
struct MountProcess {
    child: Option<Child>,
    dir: PathBuf,
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(dir.to_str().unwrap()))
}

#[test]
fn mount_an_image_from_a_registry_until_interrupted() {
    let reg = TestRegistry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let rootfs = real_rootfs_tar(dir.path());
    let extra = one_file_tar("etc/estargz-message", b"mounted lazily\n");
    let src = OciLayout::create(dir.path().join("src")).unwrap();
    let m = write_oci_image(&src, &[rootfs, extra], &Platform::host().architecture);
    src.set_tag(Some("orig"), m).unwrap();
    let image = format!("{}/app:esgz", reg.addr);
    let st = Command::new(env!("CARGO_BIN_EXE_estargz"))
        .args(["convert", "--quiet"])
        .arg(format!("oci:{}:orig", dir.path().join("src").display()))
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success());

    let target = dir.path().join("rootfs");
    let child = Command::new(env!("CARGO_BIN_EXE_estargz"))
        .arg("mount")
        .arg(&image)
        .arg(&target)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = MountProcess {
        child: Some(child),
        dir: target.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !target.join("etc/estargz-message").exists() {
        assert!(
            Instant::now() < deadline,
            "the image did not appear at {}",
            target.display()
        );
        if let Some(status) = proc.child.as_mut().unwrap().try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(
                proc.child.as_mut().unwrap().stderr.as_mut().unwrap(),
                &mut err,
            )
            .unwrap();
            panic!("estargz mount exited with {status}: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read(target.join("etc/estargz-message")).unwrap(),
        b"mounted lazily\n"
    );
    let python = std::fs::metadata(target.join("usr/bin/python3.11")).unwrap();
    assert!(python.len() > 1_000_000);
    // The overlay is writable; the layers are not touched.
    std::fs::write(target.join("etc/written-in-overlay"), b"ok").unwrap();
    assert!(mounted(&target));

    // Ctrl-C unmounts everything and exits cleanly.
    let mut child = proc.child.take().unwrap();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "estargz mount exited with {status}");
    assert!(!mounted(&target), "{} is still mounted", target.display());
    let leftovers: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains("estargz-mount-"))
        .map(String::from)
        .collect();
    assert!(
        leftovers.is_empty(),
        "layer mounts left behind: {leftovers:?}"
    );
}

#[test]
fn mount_a_local_layer_and_stop_with_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let tar = one_file_tar("hello.txt", b"hello from a local eStargz blob\n");
    let tar_path = dir.path().join("layer.tar");
    std::fs::write(&tar_path, &tar).unwrap();
    let blob = dir.path().join("layer.esgz");
    let st = Command::new(env!("CARGO_BIN_EXE_estargz"))
        .args(["layer", "convert", "--quiet"])
        .arg(&tar_path)
        .arg(&blob)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let target = dir.path().join("mnt");
    let child = Command::new(env!("CARGO_BIN_EXE_estargz"))
        .arg("mount")
        .arg(&blob)
        .arg(&target)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = MountProcess {
        child: Some(child),
        dir: target.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !target.join("hello.txt").exists() {
        assert!(Instant::now() < deadline, "the layer did not appear");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read(target.join("hello.txt")).unwrap(),
        b"hello from a local eStargz blob\n"
    );
    // Programs probe files with ioctls (isatty); the answer is ENOTTY, not a failure.
    let f = std::fs::File::open(target.join("hello.txt")).unwrap();
    let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: TCGETS on an open fd with a valid termios buffer.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::TCGETS,
            termios.as_mut_ptr(),
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
    drop(f);
    let mut child = proc.child.take().unwrap();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "estargz mount exited with {status} on SIGTERM"
    );
    assert!(!mounted(&target), "{} is still mounted", target.display());
}
