//! Running an image's command as a real container with `runc`, on a root file system we
//! mounted (for `estargz optimize`): the OCI runtime bundle, the user and environment from
//! the image config, and stopping it on exit, timeout, a matching output line or a signal.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Default search path when the image sets none (containerd's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Capabilities a container gets from containerd by default.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// What to run, and how: the image config's values with the user's overrides applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// argv.
    pub args: Vec<String>,
    /// KEY=VALUE.
    pub env: Vec<String>,
    /// Working directory in the container.
    pub cwd: String,
    /// The image config's `User` (name or number, optionally `:group`).
    pub user: String,
    /// Bind mounts: (host path, container path, read-only).
    pub binds: Vec<(PathBuf, String, bool)>,
    /// Share the host's network instead of a network namespace of its own.
    pub host_network: bool,
}

impl Workload {
    /// The workload an image config describes; `command` (when not empty) replaces its
    /// entrypoint and command, `env` adds to (or overrides) its environment.
    pub fn from_config(
        config: &Value,
        command: &[String],
        env: &[String],
        workdir: Option<&str>,
    ) -> Result<Workload> {
        let c = &config["config"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let args = if command.is_empty() {
            let mut a = strings(&c["Entrypoint"]);
            a.extend(strings(&c["Cmd"]));
            a
        } else {
            command.to_vec()
        };
        if args.is_empty() {
            bail!("the image has no entrypoint or command: give one after --, e.g. `-- /app/server --port 80`");
        }
        let mut vars = strings(&c["Env"]);
        for e in env {
            let Some((key, _)) = e.split_once('=') else {
                bail!("--env {e:?}: expected KEY=VALUE");
            };
            vars.retain(|v| v.split_once('=').map(|(k, _)| k) != Some(key));
            vars.push(e.clone());
        }
        if !vars.iter().any(|v| v.starts_with("PATH=")) {
            vars.push(format!("PATH={DEFAULT_PATH}"));
        }
        let cwd = workdir
            .or_else(|| c["WorkingDir"].as_str().filter(|w| !w.is_empty()))
            .unwrap_or("/")
            .to_string();
        if !cwd.starts_with('/') {
            bail!("working directory {cwd:?} is not absolute");
        }
        Ok(Workload {
            args,
            env: vars,
            cwd,
            user: c["User"].as_str().unwrap_or("").to_string(),
            binds: Vec::new(),
            host_network: false,
        })
    }
}

/// Parses `--mount`: `type=bind,src=HOST,dst=PATH[,ro]` (also `source=`, `destination=`,
/// `target=`) or `HOST:PATH[:ro]`.
pub fn parse_bind(s: &str) -> Result<(PathBuf, String, bool)> {
    let (mut src, mut dst, mut ro) = (None, None, false);
    if s.contains('=') {
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("type", "bind")) => {}
                Some(("type", t)) => bail!("--mount {s:?}: only type=bind is supported, not {t}"),
                Some(("src" | "source", v)) => src = Some(v.to_string()),
                Some(("dst" | "destination" | "target", v)) => dst = Some(v.to_string()),
                Some(("readonly" | "ro", "true")) => ro = true,
                Some(("readonly" | "ro", "false")) => ro = false,
                None if part == "ro" || part == "readonly" => ro = true,
                _ => bail!("--mount {s:?}: unknown option {part:?}"),
            }
        }
    } else {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            [a, b] => (src, dst) = (Some(a.to_string()), Some(b.to_string())),
            [a, b, "ro"] => (src, dst, ro) = (Some(a.to_string()), Some(b.to_string()), true),
            [a, b, "rw"] => (src, dst) = (Some(a.to_string()), Some(b.to_string())),
            _ => {
                bail!("--mount {s:?}: expected type=bind,src=HOST,dst=PATH[,ro] or HOST:PATH[:ro]")
            }
        }
    }
    let (Some(src), Some(dst)) = (src, dst) else {
        bail!("--mount {s:?}: needs both a source and a destination");
    };
    if !dst.starts_with('/') {
        bail!("--mount {s:?}: the destination must be an absolute path");
    }
    let src =
        std::fs::canonicalize(&src).with_context(|| format!("--mount {s:?}: source {src}"))?;
    Ok((src, dst, ro))
}

/// Reads `path` (relative) inside `root` with every symlink resolved inside `root` (an
/// image's `/etc/passwd` may be a link to anything on the host); at most 1 MiB.
fn read_in_root(root: &Path, path: &str) -> std::io::Result<Option<String>> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &[u8]| {
        std::ffi::CString::new(p)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (root_c, path_c) = (c(root.as_os_str().as_bytes())?, c(path.as_bytes())?);
    // SAFETY: a NUL-terminated path; the descriptor is owned below.
    let dir = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dir` was just opened and nothing else owns it.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    // SAFETY: `open_how` is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    use std::os::fd::AsRawFd;
    // SAFETY: valid descriptor, NUL-terminated path, `how` of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path_c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text)?;
    Ok(Some(text))
}

/// The (uid, gid) a config `User` names, looked up in the image's `/etc/passwd` and
/// `/etc/group` when it uses names (as containerd does).
pub fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_in_root(rootfs, "etc/passwd")
        .context("reading the image's /etc/passwd")?
        .unwrap_or_default();
    // name:x:uid:gid:...
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let found = entries.iter().find(|f| match u.parse::<u32>() {
        Ok(n) => f[2].parse() == Ok(n),
        Err(_) => f[0] == u,
    });
    let uid = match (u.parse::<u32>(), found) {
        (Ok(n), _) => n,
        (Err(_), Some(f)) => f[2]
            .parse()
            .with_context(|| format!("the image's /etc/passwd has a bad uid for {u}"))?,
        (Err(_), None) => bail!("user {u:?} is not in the image's /etc/passwd"),
    };
    let gid = match g {
        None => found.and_then(|f| f[3].parse().ok()).unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                let group = read_in_root(rootfs, "etc/group")
                    .context("reading the image's /etc/group")?
                    .unwrap_or_default();
                group
                    .lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() >= 3 && f[0] == g)
                    .and_then(|f| f[2].parse().ok())
                    .with_context(|| format!("group {g:?} is not in the image's /etc/group"))?
            }
        },
    };
    Ok((uid, gid))
}

/// The OCI runtime spec (`config.json`) of a container running `w` as `uid:gid` on `rootfs`.
pub fn runtime_spec(w: &Workload, uid: u32, gid: u32, rootfs: &Path) -> Value {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
    ];
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
    ];
    if w.host_network {
        // sysfs can only be mounted in a network namespace of one's own: bind the host's.
        mounts.push(
            json!({"destination": "/sys", "type": "bind", "source": "/sys",
                           "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}),
        );
        for f in ["/etc/resolv.conf", "/etc/hosts"] {
            if Path::new(f).exists() {
                mounts.push(json!({"destination": f, "type": "bind", "source": f,
                                   "options": ["rbind", "ro"]}));
            }
        }
    } else {
        namespaces.push(json!({"type": "network"}));
        mounts.push(
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                           "options": ["nosuid", "noexec", "nodev", "ro"]}),
        );
    }
    mounts.push(
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                       "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    );
    for (src, dst, ro) in &w.binds {
        let mut options = vec!["rbind"];
        if *ro {
            options.push("ro");
        }
        mounts.push(json!({"destination": dst, "type": "bind", "source": src, "options": options}));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid, "additionalGids": [gid]},
            "args": w.args,
            "env": w.env,
            "cwd": w.cwd,
            "capabilities": {
                "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS,
            },
            "noNewPrivileges": true,
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "estargz-optimize",
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"],
        },
    })
}

/// Why a workload stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The command exited by itself, with this status (or signal, as 128 + N).
    Exited(i32),
    /// `--timeout` passed.
    Timeout,
    /// A line of its output matched `--wait-for`.
    Matched(String),
    /// We were interrupted (SIGINT or SIGTERM).
    Interrupted,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Exited(code) => write!(f, "exited with status {code}"),
            Stop::Timeout => write!(f, "stopped by the timeout"),
            Stop::Matched(line) => write!(f, "stopped at output line {line:?}"),
            Stop::Interrupted => write!(f, "interrupted"),
        }
    }
}

/// A container created with `runc run`; deleted (killed first) when dropped, on every
/// path out of [`Container::run`].
pub struct Container {
    runc: PathBuf,
    state: PathBuf,
    id: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let out = std::process::Command::new(&self.runc)
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .stdin(Stdio::null())
            .output();
        if let Ok(out) = &out {
            // Gone already (it exited and runc run removed it) is the usual case.
            if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("not exist")
            {
                tracing::warn!(id = %self.id, stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                    "runc delete failed");
            }
        }
    }
}

impl Container {
    /// Runs the bundle at `bundle` with `runc` (state under `state`) until it exits, for at
    /// most `timeout`, until a line of its output matches `wait_for`, or until
    /// `interrupted` turns true; echoes its output (and runc's errors) to stderr. The
    /// container is killed and deleted before this returns.
    pub async fn run(
        bundle: &Path,
        state: &Path,
        timeout: Duration,
        wait_for: Option<&regex::Regex>,
        mut interrupted: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Stop> {
        let runc = which("runc").context(
            "runc is not installed (Debian: apt-get install runc); estargz optimize runs the image with it",
        )?;
        let container = Container {
            runc: runc.clone(),
            state: state.to_path_buf(),
            id: format!("estargz-optimize-{}", std::process::id()),
        };
        let mut child = tokio::process::Command::new(&runc)
            .arg("--root")
            .arg(state)
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&container.id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting runc")?;
        let (matched_tx, mut matched) = tokio::sync::mpsc::channel::<String>(1);
        // runc's own failure to start the container, as opposed to the workload's.
        let runc_failed = Arc::new(Mutex::new(None::<String>));
        let mut readers = Vec::new();
        let outputs: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
            child.stdout.take().map(|o| Box::new(o) as _),
            child.stderr.take().map(|o| Box::new(o) as _),
        ];
        for out in outputs.into_iter().flatten() {
            let (re, tx, failed) = (wait_for.cloned(), matched_tx.clone(), runc_failed.clone());
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(out);
                let mut line = Vec::new();
                // Read to the end whatever happens: a full pipe would stall the workload.
                while lines.read_until(b'\n', &mut line).await.unwrap_or(0) > 0 {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    eprintln!("  | {text}");
                    if let Some((_, why)) = text.split_once("runc run failed: ") {
                        let why = why.trim_end_matches('"').replace("\\\"", "\"");
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    }
                    if re.as_ref().is_some_and(|re| re.is_match(text)) {
                        let _ = tx.try_send(text.to_string());
                    }
                    line.clear();
                }
            }));
        }
        drop(matched_tx);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let stop = tokio::select! {
            status = child.wait() => {
                let status = status.context("waiting for runc")?;
                use std::os::unix::process::ExitStatusExt;
                Stop::Exited(status.code().or(status.signal().map(|s| 128 + s)).unwrap_or(-1))
            }
            _ = &mut deadline => Stop::Timeout,
            Some(line) = matched.recv() => Stop::Matched(line),
            _ = interrupted.wait_for(|i| *i) => Stop::Interrupted,
        };
        // Kill and delete the container, then let runc run see its end.
        drop(container);
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        let failed = runc_failed.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let (Stop::Exited(_), Some(why)) = (&stop, failed) {
            bail!("runc could not start the container: {why}");
        }
        Ok(stop)
    }
}

/// `name` in PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_comes_from_the_config_with_overrides() {
        let config = json!({"config": {
            "Entrypoint": ["/bin/server"], "Cmd": ["--port", "80"],
            "Env": ["PATH=/bin", "MODE=prod"], "WorkingDir": "/srv", "User": "app"}});
        let w = Workload::from_config(&config, &[], &["MODE=test".into()], None).unwrap();
        assert_eq!(w.args, ["/bin/server", "--port", "80"]);
        assert_eq!(w.env, ["PATH=/bin", "MODE=test"]);
        assert_eq!((w.cwd.as_str(), w.user.as_str()), ("/srv", "app"));
        let w = Workload::from_config(&config, &["/bin/sh".into()], &[], Some("/tmp")).unwrap();
        assert_eq!(
            (w.args, w.cwd.as_str()),
            (vec!["/bin/sh".to_string()], "/tmp")
        );
        let none = json!({"config": {}});
        let e = Workload::from_config(&none, &[], &[], None).unwrap_err();
        assert!(e.to_string().contains("no entrypoint or command"), "{e}");
        let w = Workload::from_config(&none, &["true".into()], &[], None).unwrap();
        assert_eq!(
            (w.env, w.cwd.as_str()),
            (vec![format!("PATH={DEFAULT_PATH}")], "/")
        );
        assert!(Workload::from_config(&none, &["x".into()], &["NOVALUE".into()], None).is_err());
    }

    #[test]
    fn users_resolve_inside_the_image_only() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let r = root.path();
        assert_eq!(resolve_user("", r).unwrap(), (0, 0));
        assert_eq!(resolve_user("app", r).unwrap(), (1000, 1001));
        assert_eq!(resolve_user("1000", r).unwrap(), (1000, 1001));
        assert_eq!(resolve_user("4242", r).unwrap(), (4242, 0));
        assert_eq!(resolve_user("app:staff", r).unwrap(), (1000, 50));
        assert_eq!(resolve_user("app:7", r).unwrap(), (1000, 7));
        assert!(resolve_user("nobody", r).is_err());
        assert!(resolve_user("app:nogroup", r).is_err());
        // A passwd that is a link out of the image is read inside it, not on the host.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir(other.path().join("etc")).unwrap();
        std::fs::write(other.path().join("etc/real"), "app:x:7:7::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/etc/real", other.path().join("etc/passwd")).unwrap();
        assert_eq!(resolve_user("app", other.path()).unwrap(), (7, 7));
        std::fs::remove_file(other.path().join("etc/real")).unwrap();
        assert!(resolve_user("app", other.path()).is_err());
    }

    #[test]
    fn binds_parse_in_both_forms() {
        let d = tempfile::tempdir().unwrap();
        let src = std::fs::canonicalize(d.path()).unwrap();
        let s = src.display();
        assert_eq!(
            parse_bind(&format!("type=bind,src={s},dst=/data,ro")).unwrap(),
            (src.clone(), "/data".into(), true)
        );
        assert_eq!(
            parse_bind(&format!("{s}:/data")).unwrap(),
            (src.clone(), "/data".into(), false)
        );
        assert_eq!(
            parse_bind(&format!("{s}:/data:ro")).unwrap(),
            (src.clone(), "/data".into(), true)
        );
        assert!(parse_bind("type=tmpfs,dst=/x").is_err());
        assert!(parse_bind(&format!("{s}:relative")).is_err());
        assert!(parse_bind("/does/not/exist:/x").is_err());
    }
}
