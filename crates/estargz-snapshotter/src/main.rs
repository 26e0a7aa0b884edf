//! `estargz-snapshotter`: the daemon containerd talks to through `proxy_plugins`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use estargz_snapshotter::config::{LogFormat, DEFAULT_CONFIG};
use estargz_snapshotter::manager::Manager;
use estargz_snapshotter::metrics::Metrics;
use estargz_snapshotter::mounter::ManagerClient;
use estargz_snapshotter::protocol::PROTOCOL;
use estargz_snapshotter::service::SnapshotService;
use estargz_snapshotter::snapshotter::Snapshotter;
use estargz_snapshotter::{access, Config};

/// containerd snapshotter that starts containers from eStargz images lazily.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Configuration file.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the snapshotter (the default).
    Serve,
    /// Serve FUSE mounts for the daemon (started by the daemon itself).
    FuseManager,
    /// Unmount every lazily mounted layer and stop the FUSE manager. Containers using
    /// lazily mounted layers lose them: stop them first.
    StopFuseManager,
}

fn manager_socket(config: &Config) -> PathBuf {
    config.root.join("fuse-manager.sock")
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // fuser logs an error for every reply to a request the kernel already dropped
        // (the reader was interrupted, e.g. killed with its container): benign, and many.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser::reply=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> Result<()> {
    estargz_layerfs::memory::tune_allocator();
    let cli = Cli::parse();
    let explicit = cli.config.is_some();
    let path = cli.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    let config = Config::load(&path, explicit)?;
    init_logging(config.log_format);
    for key in config.deprecated_keys() {
        tracing::warn!(key, config = %path.display(), "configuration key is ignored now; remove it");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime.block_on(serve(config, explicit.then_some(path))),
        Command::FuseManager => runtime.block_on(async {
            estargz_cache::private_dir(&config.root)
                .with_context(|| format!("creating {}", config.root.display()))?;
            let socket = manager_socket(&config);
            let root = config.root.clone();
            let manager = Arc::new(Manager::new(config, tokio::runtime::Handle::current())?);
            tracing::info!(socket = %socket.display(), pid = std::process::id(), protocol = PROTOCOL, "FUSE manager serving");
            manager.serve(&root, &socket).await?;
            tracing::info!("FUSE manager stopped; every lazy layer unmounted");
            Ok(())
        }),
        Command::StopFuseManager => {
            let client = ManagerClient::new(manager_socket(&config));
            if !client.is_running() {
                eprintln!("no FUSE manager answers at {}", manager_socket(&config).display());
                return Ok(());
            }
            client.shutdown()?;
            eprintln!("FUSE manager stopped");
            Ok(())
        }
    }
}

async fn serve(config: Config, config_path: Option<PathBuf>) -> Result<()> {
    let socket = config.socket.clone();
    access::socket_dir(&socket)
        .with_context(|| format!("creating the directory of {}", socket.display()))?;
    estargz_cache::private_dir(&config.root)
        .with_context(|| format!("creating {}", config.root.display()))?;
    let manager = ManagerClient::new(manager_socket(&config));
    let exe = std::env::current_exe().context("finding this program's path")?;
    {
        let (m, exe, cp) = (manager.clone(), exe.clone(), config_path.clone());
        tokio::task::spawn_blocking(move || start_manager(&m, &exe, cp.as_deref())).await??;
    }
    let metrics = Arc::new(Metrics::default());
    let metrics_address = config.metrics_address.clone();
    let cri_proxy = (!config.cri.image_service_socket.as_os_str().is_empty()).then(|| {
        (
            config.cri.image_service_socket.clone(),
            estargz_snapshotter::cri_proxy::ImageServiceProxy::new(
                &config.cri.containerd_socket,
                config.pull_secrets(),
                std::time::Duration::from_secs(config.cri.pull_secret_ttl_secs),
            ),
        )
    });
    let snapshotter = Arc::new(Snapshotter::open(
        config,
        Arc::new(manager.clone()),
        metrics.clone(),
    )?);
    {
        let s = snapshotter.clone();
        tokio::task::spawn_blocking(move || s.restore())
            .await?
            .context("mounting lazy layers again")?;
    }
    tokio::spawn(supervise(
        manager.clone(),
        snapshotter.clone(),
        exe,
        config_path,
    ));
    if !metrics_address.is_empty() {
        let listener = tokio::net::TcpListener::bind(&metrics_address)
            .await
            .with_context(|| format!("metrics endpoint on {metrics_address}"))?;
        tracing::info!(address = %metrics_address, "metrics at /metrics");
        tokio::spawn(estargz_snapshotter::metrics::serve(
            listener,
            metrics,
            move || manager.status().ok(),
        ));
    }
    if let Some((path, proxy)) = cri_proxy {
        tokio::spawn(serve_cri_proxy(path, proxy));
    }
    let listener = access::listen_private(&socket)?;
    tracing::info!(socket = %socket.display(), "estargz-snapshotter serving");
    notify_systemd("READY=1");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
        tracing::info!("stopping; lazily mounted layers stay mounted by the FUSE manager");
        notify_systemd("STOPPING=1");
    };
    tonic::transport::Server::builder()
        .add_service(SnapshotService::new(snapshotter).into_server())
        .serve_with_incoming_shutdown(
            access::trusted_peers(tokio_stream::wrappers::UnixListenerStream::new(listener)),
            shutdown,
        )
        .await
        .context("gRPC server")?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Serves kubelet's image endpoint (the CRI image-service proxy) on `path`, for root and
/// the daemon's user only; logs and gives up if it cannot (containerd's own endpoint
/// still works, without pull secrets for lazy layers).
async fn serve_cri_proxy(path: PathBuf, proxy: estargz_snapshotter::cri_proxy::ImageServiceProxy) {
    let listener = match access::socket_dir(&path).and_then(|()| access::listen_private(&path)) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(socket = %path.display(), error = %e, "cannot serve the CRI image-service proxy");
            return;
        }
    };
    tracing::info!(socket = %path.display(), "CRI image-service proxy serving (kubelet --image-service-endpoint)");
    let served = tonic::transport::Server::builder()
        .add_service(proxy)
        .serve_with_incoming(access::trusted_peers(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
        ))
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the CRI image-service proxy stopped");
    }
}

/// Starts the FUSE manager unless one answers, and deals with one left by an older
/// version: it serves running containers' layers, so it is replaced only when it serves
/// none (then at no cost); otherwise it keeps serving, and the cost of switching is said.
fn start_manager(
    m: &ManagerClient,
    exe: &std::path::Path,
    config: Option<&std::path::Path>,
) -> Result<()> {
    let hello = m.ensure_running(exe, config)?;
    let ours = env!("CARGO_PKG_VERSION");
    if hello.protocol == PROTOCOL && hello.version == ours {
        tracing::info!(
            pid = hello.pid,
            protocol = hello.protocol,
            "FUSE manager answers"
        );
        return Ok(());
    }
    // Not knowing what it serves, keep it: replacing it could take layers from containers.
    let serving = m.status().ok().map(|s| s.mounts.len());
    if serving == Some(0) {
        tracing::info!(old_version = %hello.version, old_protocol = hello.protocol, "replacing an idle FUSE manager of another version");
        m.shutdown()
            .context("stopping the idle FUSE manager of another version")?;
        let hello = m.ensure_running(exe, config)?;
        tracing::info!(
            pid = hello.pid,
            protocol = hello.protocol,
            "FUSE manager answers"
        );
        return Ok(());
    }
    tracing::warn!(
        old_version = %hello.version,
        old_protocol = hello.protocol,
        protocol = PROTOCOL,
        layers = serving.map_or_else(|| "unknown".to_string(), |n| n.to_string()),
        "a FUSE manager of another version serves lazy layers of running containers; it keeps \
         serving them (and new ones) until it is stopped. To switch to this version's manager, \
         stop the containers using lazy layers, then run `estargz-snapshotter stop-fuse-manager` \
         and restart the daemon (or reboot the node)"
    );
    Ok(())
}

/// How often the daemon checks that its FUSE manager still answers.
const SUPERVISE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Watches the FUSE manager: if it dies (its socket no longer accepts), starts a new one
/// and mounts every lazy layer again, so that new containers start. Containers that were
/// running on the dead manager's mounts get ENOTCONN: their mounts cannot be revived.
async fn supervise(
    manager: ManagerClient,
    snapshotter: Arc<Snapshotter>,
    exe: PathBuf,
    config: Option<PathBuf>,
) {
    use estargz_snapshotter::Error;
    loop {
        tokio::time::sleep(SUPERVISE_EVERY).await;
        let m = manager.clone();
        let alive = tokio::task::spawn_blocking(move || m.hello()).await;
        // A manager that answers slowly or with an error is alive; only one that cannot be
        // reached at all is replaced.
        if !matches!(alive, Ok(Err(Error::ManagerUnreachable { .. }))) {
            continue;
        }
        tracing::error!(socket = %manager.socket().display(), "the FUSE manager is gone; starting a new one and mounting lazy layers again");
        let (m, s, exe, config) = (
            manager.clone(),
            snapshotter.clone(),
            exe.clone(),
            config.clone(),
        );
        let result = tokio::task::spawn_blocking(move || {
            m.ensure_running(&exe, config.as_deref())?;
            s.restore()
        })
        .await;
        match result {
            Ok(Ok((mounted, failed))) => {
                tracing::info!(mounted, failed, "FUSE manager replaced")
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "replacing the FUSE manager failed; retrying")
            }
            Err(e) => tracing::error!(error = %e, "replacing the FUSE manager failed; retrying"),
        }
    }
}

/// Tells systemd (Type=notify) about our state; nothing without `NOTIFY_SOCKET`.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "sd_notify"),
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify");
    }
}
