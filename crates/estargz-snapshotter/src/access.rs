//! Who may talk to the daemon and its FUSE manager: their unix sockets are 0600 and answer
//! only root or the user the daemon runs as, checked by the peer's credentials (a mode alone
//! leaves a window between `bind` and `chmod`, and says nothing of descriptors passed on).

use std::path::Path;

use tokio::net::UnixStream;
use tokio_stream::{Stream, StreamExt};

/// Listens on the unix socket `path` (a socket file left by an earlier run is replaced),
/// readable and writable by its owner only. Errors say which step failed.
pub fn listen_private(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let step = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(step("removing the stale socket")(e))
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(step("listening on"))?;
    restrict_socket(path).map_err(step("making private"))?;
    Ok(listener)
}

/// A tonic connector to the unix socket `path` (tonic's channels speak to TCP only).
pub fn unix_connector(
    path: std::path::PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<UnixStream>,
    Error = std::io::Error,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            Ok(hyper_util::rt::TokioIo::new(
                UnixStream::connect(path).await?,
            ))
        }
    })
}

/// Makes the socket at `path` readable and writable by its owner only.
pub fn restrict_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Creates the directory of a socket if it is missing, private to its owner (an existing
/// directory is left as it is: it may be shared, like `/run`).
pub fn socket_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        _ => Ok(()),
    }
}

/// Whether the peer of `stream` may send requests: root, or our own user.
pub fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "uid {} (pid {}) is neither root nor this daemon's user",
            cred.uid(),
            cred.pid().map_or("unknown".to_string(), |p| p.to_string())
        ))
    }
}

/// The connections of `incoming` whose peers pass [`check_peer`]; the others are closed
/// and logged.
pub fn trusted_peers(
    incoming: impl Stream<Item = std::io::Result<UnixStream>>,
) -> impl Stream<Item = std::io::Result<UnixStream>> {
    incoming.filter(|conn| match conn {
        Ok(stream) => match check_peer(stream) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(%why, "refused a connection to the snapshotter socket");
                false
            }
        },
        Err(_) => true,
    })
}
