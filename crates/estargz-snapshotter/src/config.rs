//! `/etc/estargz-snapshotter/config.toml`. Every key is optional; the defaults are below
//! and in the README.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/estargz-snapshotter/config.toml";

/// The daemon's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC socket containerd connects to.
    pub socket: PathBuf,
    /// State: metadata, snapshot directories, chunk cache.
    pub root: PathBuf,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// `host:port` of the Prometheus endpoint (`/metrics`); empty: off.
    pub metrics_address: String,
    /// Time allowed to resolve a layer (footer and TOC) before falling back to an ordinary
    /// pull, in seconds.
    pub resolve_timeout_secs: u64,
    /// Mount layers whose TOC digest is not given by the image (no
    /// `containerd.io/snapshot/stargz/toc.digest` label). Off: such layers are pulled the
    /// ordinary way, since nothing would tie their TOC to the image's manifest.
    pub allow_unverified: bool,
    /// Chunk cache.
    pub cache: CacheSection,
    /// Prefetch and background fetch.
    pub fetch: FetchSection,
    /// Registries.
    pub registry: RegistrySection,
    /// The CRI image-service proxy (Kubernetes pull secrets).
    pub cri: CriSection,
}

/// `[cri]`: an image-service endpoint for kubelet (`--image-service-endpoint`) that
/// forwards every call to containerd's CRI plugin and records the credentials of each
/// `PullImage` (a pod's image pull secret) for the registry of its image, so that the lazy
/// layers of private images can be fetched.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriSection {
    /// Socket to serve the proxy on; empty: no proxy.
    pub image_service_socket: PathBuf,
    /// containerd's socket, where the calls go.
    pub containerd_socket: PathBuf,
    /// A recorded credential is used for this long after the last pull that carried it
    /// (kept in `root/pull-secrets.json`, mode 0600, across restarts), in seconds.
    pub pull_secret_ttl_secs: u64,
}

impl Default for CriSection {
    fn default() -> Self {
        CriSection {
            image_service_socket: PathBuf::new(),
            containerd_socket: "/run/containerd/containerd.sock".into(),
            pull_secret_ttl_secs: 24 * 3600,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Size cap of the chunk cache in bytes.
    pub max_bytes: u64,
    /// Memory for recently read, decompressed chunks, in bytes, for all layers together.
    pub memory_bytes: usize,
}

/// `[fetch]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchSection {
    /// Fetch prioritized files (before `.prefetch.landmark`) right after mounting.
    pub prefetch: bool,
    /// Then fetch the rest of each layer in the background, one layer after another.
    pub background: bool,
    /// Background fetch starts only after no container on the node has read on demand (and
    /// no layer was mounted or prefetched) for this many milliseconds.
    pub background_quiet_ms: u64,
    /// A fetch from the registry (retries and mirrors included) that has not completed
    /// after this many seconds fails, and the read waiting for it gets EIO.
    pub read_timeout_secs: u64,
    /// Open files whose content is local with FUSE passthrough (Linux 6.9 and later): the
    /// kernel reads them from the chunk cache without a round trip through the manager.
    /// Also serves a layer whose files are all local without FUSE (EROFS metadata over
    /// the cached files) to containers created afterwards.
    pub passthrough: bool,
    /// Ignored (background requests are paced node-wide now); accepted so that older
    /// configuration files still load.
    pub background_concurrency: Option<usize>,
}

/// `[registry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySection {
    /// containerd-style `hosts.toml` directories (mirrors, CAs, client certificates).
    pub hosts_dirs: Vec<PathBuf>,
    /// Registries that may be reached over plain HTTP (loopback ones always may).
    pub insecure: Vec<String>,
    /// Docker config with credentials; empty: `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`.
    pub docker_config: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: "/run/estargz-snapshotter/estargz-snapshotter.sock".into(),
            root: "/var/lib/estargz-snapshotter".into(),
            log_format: LogFormat::Text,
            metrics_address: String::new(),
            resolve_timeout_secs: 10,
            allow_unverified: false,
            cache: CacheSection::default(),
            fetch: FetchSection::default(),
            registry: RegistrySection::default(),
            cri: CriSection::default(),
        }
    }
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            max_bytes: 10 << 30,
            memory_bytes: estargz_cache::CacheConfig::DEFAULT_MEMORY_BYTES,
        }
    }
}

impl Default for FetchSection {
    fn default() -> Self {
        FetchSection {
            prefetch: true,
            background: true,
            background_quiet_ms: 1000,
            read_timeout_secs: 30,
            passthrough: true,
            background_concurrency: None,
        }
    }
}

impl Default for RegistrySection {
    fn default() -> Self {
        RegistrySection {
            hosts_dirs: vec!["/etc/containerd/certs.d".into()],
            insecure: Vec::new(),
            docker_config: PathBuf::new(),
        }
    }
}

impl Config {
    /// Reads `path`. A missing file at the default location means the defaults; a missing
    /// file named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                Error::InvalidArgument(format!("configuration {}: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// The resolve time limit.
    pub fn resolve_timeout(&self) -> Duration {
        Duration::from_secs(self.resolve_timeout_secs.max(1))
    }

    /// Fetch options for the node's fetch scheduler.
    pub fn fetch_options(&self) -> estargz_layerfs::FetchOptions {
        estargz_layerfs::FetchOptions {
            prefetch: self.fetch.prefetch,
            background: self.fetch.background,
            background_quiet: Duration::from_millis(self.fetch.background_quiet_ms),
            passthrough: self.fetch.passthrough,
        }
    }

    /// Settings that are accepted but no longer do anything, for a warning at start-up.
    pub fn deprecated_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.fetch.background_concurrency.is_some() {
            keys.push("fetch.background_concurrency");
        }
        keys
    }

    /// Where pull secrets recorded by the CRI proxy are kept (read by every process that
    /// fetches).
    pub fn pull_secrets(&self) -> estargz_registry::PullSecrets {
        estargz_registry::PullSecrets::at(self.root.join("pull-secrets.json"))
    }

    /// A registry client with these settings, already loading the system's trusted roots
    /// in the background (so that the first layer's requests do not wait for them).
    pub fn registry_client(
        &self,
    ) -> Result<std::sync::Arc<estargz_registry::RegistryClient>, Error> {
        use estargz_registry::{ClientConfig, Credentials, HostsConfig, RegistryClient};
        let credentials = if self.registry.docker_config.as_os_str().is_empty() {
            Credentials::from_default_docker_config()
        } else {
            Credentials::from_docker_config(&self.registry.docker_config)
        }
        .map_err(|e| Error::InvalidArgument(format!("registry credentials: {e}")))?;
        let client = std::sync::Arc::new(RegistryClient::new(ClientConfig {
            credentials,
            pull_secrets: Some(std::sync::Arc::new(self.pull_secrets())),
            hosts: HostsConfig {
                dirs: self
                    .registry
                    .hosts_dirs
                    .iter()
                    .filter(|d| d.is_dir())
                    .cloned()
                    .collect(),
                insecure: self.registry.insecure.clone(),
            },
            ..Default::default()
        }));
        let warm = client.clone();
        std::thread::spawn(move || warm.warm_up());
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_and_unknown_keys() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(
            c.socket,
            Path::new("/run/estargz-snapshotter/estargz-snapshotter.sock")
        );
        assert_eq!(c.root, Path::new("/var/lib/estargz-snapshotter"));
        assert!(c.fetch.prefetch && !c.allow_unverified);
        let c: Config = toml::from_str(
            "socket = \"/tmp/s.sock\"\nroot = \"/tmp/r\"\nlog_format = \"json\"\n[cache]\nmax_bytes = 1024\n[fetch]\nbackground = false\n",
        )
        .unwrap();
        assert_eq!(c.socket, Path::new("/tmp/s.sock"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.cache.max_bytes, 1024);
        assert!(c.fetch.prefetch && !c.fetch.background);
        let err = toml::from_str::<Config>("sockett = \"x\"").unwrap_err();
        assert!(err.to_string().contains("sockett"), "{err}");
        // The shipped example parses, and says what the defaults are.
        let example = include_str!("../../../systemd/config.toml");
        let e: Config = toml::from_str(example).unwrap();
        assert!(e.deprecated_keys().is_empty());
        let d = Config::default();
        assert_eq!(
            (e.socket, e.root, e.resolve_timeout_secs, e.cache.max_bytes),
            (d.socket, d.root, d.resolve_timeout_secs, d.cache.max_bytes)
        );
        assert_eq!(e.registry.hosts_dirs, d.registry.hosts_dirs);
        assert_eq!(e.fetch.background_quiet_ms, d.fetch.background_quiet_ms);
        assert_eq!(
            (e.cri.image_service_socket, e.cri.pull_secret_ttl_secs),
            (d.cri.image_service_socket, d.cri.pull_secret_ttl_secs)
        );
        let old: Config = toml::from_str("[fetch]\nbackground_concurrency = 2\n").unwrap();
        assert_eq!(old.deprecated_keys(), ["fetch.background_concurrency"]);
        let missing = Path::new("/nonexistent/config.toml");
        assert!(Config::load(missing, false).is_ok());
        assert!(Config::load(missing, true).is_err());
    }

    /// The DaemonSet's ConfigMap holds a config the daemon accepts (unknown keys are
    /// refused), with the CRI proxy on.
    #[test]
    fn the_daemonsets_config_is_accepted() {
        let yaml = include_str!("../../../deploy/kubernetes/estargz-snapshotter.yaml");
        let block: Vec<&str> = yaml
            .lines()
            .skip_while(|l| l.trim() != "config.toml: |")
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
            .map(|l| l.strip_prefix("    ").unwrap_or(""))
            .collect();
        assert!(block.len() > 5, "no config.toml block in the manifest");
        let c: Config = toml::from_str(&block.join("\n")).unwrap();
        assert_eq!(
            c.cri.image_service_socket,
            Path::new("/run/estargz-snapshotter/cri.sock")
        );
        assert_eq!(c.root, Config::default().root);
    }
}
