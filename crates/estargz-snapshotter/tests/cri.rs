//! Kubernetes' path, end to end: containerd's CRI plugin (a private containerd, its CRI
//! configured with `snapshotter = "estargz"` and `disable_snapshot_annotations = false`)
//! driven over the CRI gRPC API the way kubelet drives it: PullImage, RunPodSandbox,
//! CreateContainer, StartContainer, ContainerStatus, stop and remove. The sandbox (pause)
//! image is built here and served by the test registry. An eStargz image's layers are
//! mounted lazily and the container prints what it should; a plain image falls back to an
//! ordinary pull and runs too. Needs root, FUSE, overlayfs, containerd, runc and skopeo.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use estargz_api::cri::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    AuthConfig, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use estargz_oci::{OciLayout, Platform};
use estargz_testutil::{
    files_tar, real_rootfs_tar, run_script, write_oci_image_with, TestRegistry,
};
use tonic::transport::Channel;

/// Our daemon and a private containerd with the CRI plugin, stopped (everything unmounted)
/// when dropped.
struct Node {
    dir: PathBuf,
    metrics: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["c/containerd.log", "snapshotter.log"] {
                let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- {log} (last lines) ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = Command::new("bash")
            .arg(estargz_testutil::scripts_dir().join("snapshotter.sh"))
            .arg("stop")
            .arg(&self.dir)
            .env("SNAPSHOTTER", env!("CARGO_BIN_EXE_estargz-snapshotter"))
            .output();
    }
}

impl Node {
    /// `registries`: plain-HTTP registries containerd may pull from; `pause`: the sandbox
    /// image; `daemon_config`: appended to the daemon's config.toml; `containerd_bin`: the
    /// directory of another containerd's binaries (default: the system's);
    /// `transfer_service`: containerd 2 pulls for CRI through its transfer service.
    fn start(
        dir: &Path,
        registries: &[&str],
        pause: &str,
        daemon_config: &str,
        containerd_bin: Option<&Path>,
        transfer_service: bool,
    ) -> Node {
        for registry in registries {
            let certs = dir.join("certs.d").join(registry);
            std::fs::create_dir_all(&certs).unwrap();
            std::fs::write(
                certs.join("hosts.toml"),
                format!(
                    "server = \"http://{registry}\"\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
            )
            .unwrap();
        }
        for d in ["cni/bin", "cni/net.d"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        // containerd 2 names the CRI plugins' settings differently (config version 3).
        let two = containerd_bin.is_some_and(|b| {
            Command::new(b.join("containerd"))
                .arg("--version")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" 2."))
        });
        // Sandboxes get oom_score_adj -998, which needs CAP_SYS_RESOURCE: test machines that
        // run in a container may not have it (runc then fails with "can't get final child's
        // PID"): restrict_oom_score_adj.
        // With the transfer service (containerd 2.1 and later), CRI pulls through it, which
        // passes the labels to plugins that export enable_remote_snapshot_annotations;
        // otherwise disable_snapshot_annotations = false selects the older pull path.
        let (pull_path, unpack) = match transfer_service {
            true => (
                "",
                "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux\"\n  snapshotter = \"estargz\"\n",
            ),
            false => ("  disable_snapshot_annotations = false\n", ""),
        };
        let cri = if two {
            format!(
                r#"{unpack}[plugins."io.containerd.cri.v1.images"]
  snapshotter = "estargz"
{pull_path}  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{d}/certs.d"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{d}/cni/bin"]
    conf_dir = "{d}/cni/net.d"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
                d = dir.display()
            )
        } else {
            format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "estargz"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#,
                d = dir.display()
            )
        };
        let node = dir.join("n");
        let metrics = run_script(
            "snapshotter.sh",
            &[
                std::ffi::OsStr::new("start"),
                node.as_os_str(),
                std::ffi::OsStr::new(daemon_config),
            ],
            &[
                ("SNAPSHOTTER", env!("CARGO_BIN_EXE_estargz-snapshotter")),
                ("CONTAINERD_CRI_CONFIG", &cri),
                (
                    "CONTAINERD_BIN_DIR",
                    containerd_bin.and_then(Path::to_str).unwrap_or(""),
                ),
                ("CONTAINERD_CONFIG_VERSION", if two { "3" } else { "2" }),
                (
                    "ESTARGZ_REMOTE_SNAPSHOT_ANNOTATIONS",
                    if transfer_service { "1" } else { "" },
                ),
            ],
        );
        let node = Node {
            dir: node,
            metrics: metrics.trim().to_string(),
        };
        node.wait_for_cri();
        node
    }

    /// Waits until containerd's CRI service answers: it initializes after containerd's own
    /// API is up (which is what the start script waits for), and containerd 2 answers
    /// "server is not initialized yet" (Unavailable) until then.
    fn wait_for_cri(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        current_thread().block_on(async {
            loop {
                let answer = RuntimeServiceClient::new(channel(&self.socket()).await)
                    .version(VersionRequest {
                        version: "v1".into(),
                    })
                    .await;
                match answer {
                    Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    // Answered, or a failure the test's own requests report.
                    _ => return,
                }
            }
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("c/containerd.sock")
    }

    /// SIGKILLs the daemon (its FUSE manager and containerd keep running) and starts it
    /// again.
    fn restart_daemon(&self) {
        for cmd in ["kill", "restart"] {
            run_script(
                "snapshotter.sh",
                &[std::ffi::OsStr::new(cmd), self.dir.as_os_str()],
                &[("SNAPSHOTTER", env!("CARGO_BIN_EXE_estargz-snapshotter"))],
            );
        }
    }

    /// The sum of a metric over its labels.
    fn metric(&self, name: &str) -> f64 {
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn lazy_mounts(&self) -> usize {
        let prefix = format!("{}/root/snapshots/", self.dir.display());
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .filter(|l| {
                let mut f = l.split(' ');
                let (at, fstype) = (f.nth(1).unwrap_or(""), f.next().unwrap_or(""));
                at.starts_with(&prefix) && fstype.starts_with("fuse")
            })
            .count()
    }
}

async fn channel(socket: &Path) -> Channel {
    tonic::transport::Endpoint::try_from("http://[::]:0")
        .unwrap()
        .connect_with_connector(estargz_snapshotter::access::unix_connector(
            socket.to_path_buf(),
        ))
        .await
        .expect("connecting to containerd's CRI service")
}

/// Pushes the image in `layout` under `tag` to `dst` as it is (skopeo), with `creds` if
/// given.
fn push_plain(layout: &Path, tag: &str, dst: &str, creds: Option<(&str, &str)>) {
    let mut skopeo = Command::new("skopeo");
    skopeo.args(["copy", "-q", "--dest-tls-verify=false"]);
    if let Some((user, password)) = creds {
        skopeo.arg(format!("--dest-creds={user}:{password}"));
    }
    let out = skopeo
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dst}"))
        .output()
        .expect("skopeo must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sandbox_config(name: &str, logs: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: logs.display().to_string(),
        // The node's network: no CNI plugin is needed.
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What kubelet is asked to run.
struct Pod<'a> {
    name: &'a str,
    image: &'a str,
    command: &'a [&'a str],
    /// The pod's image pull secret.
    auth: Option<AuthConfig>,
    /// Kubelet's image endpoint (containerd's socket, or our proxy).
    image_service: PathBuf,
}

/// Pulls the pod's image and runs its command in a pod of its own as kubelet would, calls
/// `while_running` once the container started; returns what the container wrote (from
/// its CRI log) after it exited 0, and removes pod and container.
async fn run_pod(node: &Node, pod: Pod<'_>, logs: &Path, while_running: impl FnOnce()) -> String {
    let Pod {
        name,
        image,
        command,
        auth,
        image_service,
    } = pod;
    let mut images = ImageServiceClient::new(channel(&image_service).await);
    let mut runtime = RuntimeServiceClient::new(channel(&node.socket()).await);
    let sandbox = sandbox_config(name, &logs.join(name));
    std::fs::create_dir_all(logs.join(name)).unwrap();
    let pulled = images
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth,
            sandbox_config: Some(sandbox.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("PullImage {image}: {e}"))
        .into_inner();
    assert!(!pulled.image_ref.is_empty());
    let pod = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"))
        .into_inner()
        .pod_sandbox_id;
    let container = runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: pulled.image_ref.clone(),
                    ..Default::default()
                }),
                command: command.iter().map(|s| s.to_string()).collect(),
                log_path: "app.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}"))
        .into_inner()
        .container_id;
    runtime
        .start_container(StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}"));
    while_running();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = runtime
            .container_status(ContainerStatusRequest {
                container_id: container.clone(),
                verbose: false,
            })
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus: {e}"))
            .into_inner()
            .status
            .expect("a status");
        if status.state == ContainerState::ContainerExited as i32 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the container did not exit: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // CRI log lines: "TIME STREAM TAG content".
    let log = std::fs::read_to_string(logs.join(name).join("app.log")).unwrap_or_default();
    let output: String = log
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(status.exit_code, 0, "{status:?}\n{log}");
    runtime
        .stop_container(StopContainerRequest {
            container_id: container.clone(),
            timeout: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("StopContainer: {e}"));
    runtime
        .remove_container(RemoveContainerRequest {
            container_id: container,
        })
        .await
        .unwrap_or_else(|e| panic!("RemoveContainer: {e}"));
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}"));
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
    output
}

/// Images of a test: the sandbox image on `open`; the application (the Debian base and a
/// layer of its own) on `app`, plain and converted to eStargz, pushed with `creds` when
/// the registry needs them. Returns (pause, plain, eStargz) references.
fn images(
    d: &Path,
    open: &TestRegistry,
    app: &TestRegistry,
    creds: Option<(&str, &str)>,
) -> (String, String, String) {
    let estargz =
        estargz_testutil::cli_beside(Path::new(env!("CARGO_BIN_EXE_estargz-snapshotter")));
    let rootfs = real_rootfs_tar(d);
    let arch = Platform::host().architecture;
    // The sandbox image: the Debian base, sleeping.
    let pause = OciLayout::create(d.join("pause")).unwrap();
    let m = write_oci_image_with(
        &pause,
        std::slice::from_ref(&rootfs),
        &arch,
        r#"{"Entrypoint":["/bin/sleep","infinity"]}"#,
    );
    pause.set_tag(Some("1"), m).unwrap();
    let pause_ref = format!("{}/pause:1", open.addr);
    push_plain(&d.join("pause"), "1", &pause_ref, None);
    // Two files in directories of their own: reading one does not fetch the other.
    let layer = files_tar(&[
        ("srv/hello.txt", b"from a lazy layer\n"),
        ("opt/late.txt", b"read later\n"),
    ]);
    let layout = OciLayout::create(d.join("app")).unwrap();
    let m = write_oci_image_with(
        &layout,
        &[rootfs, layer],
        &arch,
        r#"{"Env":["PATH=/usr/bin:/bin"]}"#,
    );
    layout.set_tag(Some("orig"), m).unwrap();
    let plain = format!("{}/app:plain", app.addr);
    push_plain(&d.join("app"), "orig", &plain, creds);
    let lazy = format!("{}/app:esgz", app.addr);
    let mut convert = Command::new(&estargz);
    convert.args(["convert", "--quiet", &plain, &lazy]);
    if let Some((user, password)) = creds {
        let docker = d.join("docker");
        std::fs::create_dir_all(&docker).unwrap();
        let auth = base64_encode(&format!("{user}:{password}"));
        std::fs::write(
            docker.join("config.json"),
            format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, app.addr),
        )
        .unwrap();
        convert.env("DOCKER_CONFIG", &docker);
    }
    assert!(convert.status().unwrap().success());
    (pause_ref, plain, lazy)
}

fn base64_encode(s: &str) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn cri_dir() -> tempfile::TempDir {
    // Short: unix socket paths are limited.
    tempfile::Builder::new()
        .prefix("cri")
        .tempdir_in("/tmp")
        .unwrap()
}

#[test]
fn kubelets_path_through_containerds_cri_mounts_estargz_layers_lazily() {
    lazy_and_plain_pods(None, "1.6.", false);
}

/// The same with containerd 1.7 (Debian trixie's package, fetched and verified by
/// `containerd-debian.sh`: bookworm ships 1.6).
#[test]
fn kubelets_path_on_containerd_1_7() {
    let dir = cri_dir();
    lazy_and_plain_pods(
        Some(&debian_containerd("trixie", dir.path())),
        "1.7.",
        false,
    );
}

/// The same with containerd 2 (Debian forky's package: testing, which moves more slowly
/// than sid), configured with its own names (config version 3) and
/// `disable_snapshot_annotations = false`: CRI pulls the older way, with the layer labels.
#[test]
fn kubelets_path_on_containerd_2() {
    let dir = cri_dir();
    lazy_and_plain_pods(Some(&debian_containerd("forky", dir.path())), "2.", false);
}

/// containerd 2 with CRI pulling through the transfer service (its default from 2.1 on),
/// configured as the README says: the proxy plugin exports
/// `enable_remote_snapshot_annotations`, `unpack_config` names estargz.
#[test]
fn kubelets_path_on_containerd_2_through_the_transfer_service() {
    let dir = cri_dir();
    lazy_and_plain_pods(Some(&debian_containerd("forky", dir.path())), "2.", true);
}

/// The binaries of the containerd package of Debian `suite`, extracted under `dir`.
fn debian_containerd(suite: &str, dir: &Path) -> PathBuf {
    let bin = run_script(
        "containerd-debian.sh",
        &[
            std::ffi::OsStr::new(suite),
            dir.join("containerd").as_os_str(),
        ],
        &[],
    );
    PathBuf::from(bin.trim())
}

/// An eStargz image's pod through the CRI: its layers mounted lazily; a plain image's pod:
/// an ordinary pull. `version`: what containerd's CRI must report (the runtime under test).
fn lazy_and_plain_pods(containerd_bin: Option<&Path>, version: &str, transfer_service: bool) {
    let reg = TestRegistry::start(None);
    let dir = cri_dir();
    let d = dir.path();
    let (pause_image, plain, lazy) = images(d, &reg, &reg, None);
    let node = Node::start(
        d,
        &[&reg.addr],
        &pause_image,
        "",
        containerd_bin,
        transfer_service,
    );
    let rt = current_thread();
    let reported = rt.block_on(async {
        RuntimeServiceClient::new(channel(&node.socket()).await)
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("Version: {e}"))
            .into_inner()
    });
    assert!(
        reported.runtime_version.starts_with(version),
        "containerd {} answers, not {version}",
        reported.runtime_version
    );
    let logs = d.join("logs");
    let command = [
        "/bin/sh",
        "-c",
        "cat /srv/hello.txt; python3.11 -c 'print(6*7)'",
    ];

    let pod = |name, image| Pod {
        name,
        image,
        command: &command,
        auth: None,
        image_service: node.socket(),
    };
    let out = rt.block_on(run_pod(&node, pod("lazy", &lazy), &logs, || ()));
    assert_eq!(out, "from a lazy layer\n42\n");
    // Both layers of the eStargz image were mounted lazily, through the CRI labels.
    assert!(
        node.metric("estargz_remote_layers_total") >= 2.0,
        "the CRI pull mounted no layer lazily"
    );
    assert!(
        node.lazy_mounts() >= 2,
        "no lazy FUSE mount of the image's layers"
    );

    let fallbacks = node.metric("estargz_fallbacks_total");
    let out = rt.block_on(run_pod(&node, pod("plain", &plain), &logs, || ()));
    assert_eq!(out, "from a lazy layer\n42\n");
    assert!(
        node.metric("estargz_fallbacks_total") > fallbacks,
        "the plain image did not fall back to an ordinary pull"
    );
}

/// A pod's image pull secret reaches the daemon through its CRI image-service proxy (as
/// kubelet's image endpoint): the layers of an image in a registry that requires
/// credentials are mounted lazily, and a file the container reads only after the daemon
/// was SIGKILLed and restarted is still fetched (the secret outlives the daemon).
#[test]
fn pull_secrets_reach_the_daemon_through_its_cri_proxy_and_outlive_a_restart() {
    let (user, password) = ("kube", "s3cret-pull");
    let open = TestRegistry::start(None);
    let private = TestRegistry::start_with_tokens(user, password);
    let dir = cri_dir();
    let d = dir.path();
    let (pause_image, _, lazy) = images(d, &open, &private, Some((user, password)));
    let proxy = d.join("n/cri.sock");
    // Nothing fetched ahead: the late file is fetched when the container reads it.
    let daemon_config = format!(
        "[fetch]\nprefetch = false\nbackground = false\n[cri]\nimage_service_socket = \"{}\"\ncontainerd_socket = \"{}\"\n",
        proxy.display(),
        d.join("n/c/containerd.sock").display()
    );
    let node = Node::start(
        d,
        &[&open.addr, &private.addr],
        &pause_image,
        &daemon_config,
        None,
        false,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.exists() {
        assert!(
            Instant::now() < deadline,
            "the CRI proxy socket did not appear"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = current_thread();
    let command = [
        "/bin/sh",
        "-c",
        "cat /srv/hello.txt && sleep 4 && cat /opt/late.txt",
    ];
    let pod = Pod {
        name: "private",
        image: &lazy,
        command: &command,
        auth: Some(AuthConfig {
            username: user.into(),
            password: password.into(),
            ..Default::default()
        }),
        image_service: proxy.clone(),
    };
    let out = rt.block_on(run_pod(&node, pod, &d.join("logs"), || {
        node.restart_daemon()
    }));
    assert_eq!(out, "from a lazy layer\nread later\n");
    assert!(
        node.lazy_mounts() >= 2,
        "the private image's layers were not mounted lazily"
    );
    let secrets = node.dir.join("root/pull-secrets.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(!log.contains(password), "the pull secret was logged");
    assert!(log.contains("pull secret recorded"), "{log}");
}
