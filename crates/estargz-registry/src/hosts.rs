//! Registry hosts: containerd's `hosts.toml` (certs.d) format for mirrors, TLS and headers.
//!
//! For a registry `R`, `<dir>/R/hosts.toml` (or `<dir>/_default/hosts.toml`) lists hosts to
//! try in order, each with capabilities (`pull`, `resolve`, `push`), `skip_verify`, `ca`,
//! client certificates and extra headers, followed by the upstream `server`. This is how
//! pull-through caches and P2P mirrors (e.g. Spegel) plug in; it works without containerd.

use std::path::{Path, PathBuf};

use reqwest::Url;

use crate::error::{Error, Result};
use crate::reference::{DOCKER_HUB, DOCKER_HUB_API_HOST};

/// What a host may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Resolve tags to digests.
    pub resolve: bool,
    /// Push.
    pub push: bool,
}

impl Capabilities {
    /// All capabilities (the upstream's default).
    pub fn all() -> Self {
        Capabilities {
            pull: true,
            resolve: true,
            push: true,
        }
    }
}

/// One host to send registry requests to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHost {
    /// API base, ending in `/v2` unless `override_path` was set.
    pub base: Url,
    /// What the host may be used for.
    pub capabilities: Capabilities,
    /// Accept any TLS certificate.
    pub skip_verify: bool,
    /// Extra CA certificates (PEM files).
    pub ca: Vec<PathBuf>,
    /// Client certificate and key PEM files (the key may be inside the certificate file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Whether this is the registry itself (not a mirror).
    pub upstream: bool,
}

impl RegistryHost {
    /// A key naming the TLS settings, to share one HTTP client between equal hosts.
    pub fn tls_key(&self) -> String {
        format!("{}|{:?}|{:?}", self.skip_verify, self.ca, self.client)
    }

    /// `host[:port]` of the base URL.
    pub fn authority(&self) -> String {
        let host = self.base.host_str().unwrap_or("");
        match self.base.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
    }
}

/// Where to find `hosts.toml` files, and which registries may use plain HTTP.
#[derive(Debug, Clone, Default)]
pub struct HostsConfig {
    /// certs.d directories, searched in order (e.g. `/etc/containerd/certs.d`).
    pub dirs: Vec<PathBuf>,
    /// Registries (`host[:port]`) that may be reached over plain HTTP by default. Loopback
    /// registries (`localhost` and loopback addresses: 127.0.0.0/8, `[::1]`) always may.
    pub insecure: Vec<String>,
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(registry, |(h, _)| h);
    // An address that parses as loopback, not merely a name that starts like one: a
    // registry named `127.example.com` is reached over HTTPS like any other.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl HostsConfig {
    /// The hosts to try for `registry`, mirrors first, upstream last.
    pub fn hosts_for(&self, registry: &str) -> Result<Vec<RegistryHost>> {
        for dir in &self.dirs {
            for name in [registry_dir_name(registry), "_default".to_string()] {
                let path = dir.join(&name).join("hosts.toml");
                if path.is_file() {
                    return self.parse_file(&path, registry);
                }
            }
        }
        Ok(vec![self.default_upstream(registry)?])
    }

    fn default_scheme(&self, registry: &str) -> &'static str {
        if is_loopback(registry) || self.insecure.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        }
    }

    fn default_upstream(&self, registry: &str) -> Result<RegistryHost> {
        let host = if registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            registry
        };
        let url = format!("{}://{host}/v2", self.default_scheme(registry));
        Ok(RegistryHost {
            base: parse_url(&url, registry)?,
            capabilities: Capabilities::all(),
            skip_verify: false,
            ca: Vec::new(),
            client: Vec::new(),
            headers: Vec::new(),
            upstream: true,
        })
    }

    /// Parses one `hosts.toml` for `registry`.
    pub fn parse_file(&self, path: &Path, registry: &str) -> Result<Vec<RegistryHost>> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        self.parse_str(&text, path, registry)
    }

    fn parse_str(&self, text: &str, path: &Path, registry: &str) -> Result<Vec<RegistryHost>> {
        let cfg_err = |detail: String| Error::Config {
            path: path.display().to_string(),
            detail,
        };
        let table: toml::Table = text.parse().map_err(|e| cfg_err(format!("{e}")))?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let mut hosts = Vec::new();
        if let Some(h) = table.get("host") {
            let h = h
                .as_table()
                .ok_or_else(|| cfg_err("`host` must be a table".into()))?;
            for (url, spec) in h {
                let spec = spec
                    .as_table()
                    .ok_or_else(|| cfg_err(format!("host {url:?} must be a table")))?;
                let mut host = host_from(url, spec, base_dir, false, &cfg_err)?;
                host.upstream = false;
                hosts.push(host);
            }
        }
        let upstream = match table.get("server") {
            Some(s) => {
                let s = s
                    .as_str()
                    .ok_or_else(|| cfg_err("`server` must be a string".into()))?;
                host_from(s, &table, base_dir, true, &cfg_err)?
            }
            None => {
                let mut up = self.default_upstream(registry)?;
                let spec = host_from(up.base.as_str(), &table, base_dir, true, &cfg_err)?;
                up.skip_verify = spec.skip_verify;
                up.ca = spec.ca;
                up.client = spec.client;
                up.headers = spec.headers;
                up.capabilities = spec.capabilities;
                up
            }
        };
        hosts.push(upstream);
        Ok(hosts)
    }
}

fn registry_dir_name(registry: &str) -> String {
    // containerd names directories after the registry host, with ':' kept.
    registry.to_string()
}

fn parse_url(url: &str, what: &str) -> Result<Url> {
    Url::parse(url).map_err(|e| Error::Config {
        path: what.to_string(),
        detail: format!("{url:?} is not a URL: {e}"),
    })
}

fn strings(v: &toml::Value) -> Option<Vec<String>> {
    match v {
        toml::Value::String(s) => Some(vec![s.clone()]),
        toml::Value::Array(a) => a.iter().map(|x| x.as_str().map(String::from)).collect(),
        _ => None,
    }
}

fn resolve_path(base: &Path, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

fn host_from(
    url: &str,
    spec: &toml::Table,
    base_dir: &Path,
    upstream: bool,
    cfg_err: &dyn Fn(String) -> Error,
) -> Result<RegistryHost> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    let mut base = Url::parse(&with_scheme).map_err(|e| cfg_err(format!("{url:?}: {e}")))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(cfg_err(format!(
            "{url:?}: only http and https hosts are supported"
        )));
    }
    let override_path = spec
        .get("override_path")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let path = base.path().trim_end_matches('/').to_string();
    if !override_path && !path.ends_with("/v2") {
        base.set_path(&format!("{path}/v2"));
    } else {
        base.set_path(&path);
    }
    let capabilities = match spec.get("capabilities") {
        None => {
            if upstream {
                Capabilities::all()
            } else {
                Capabilities {
                    pull: true,
                    resolve: true,
                    push: false,
                }
            }
        }
        Some(v) => {
            let list = strings(v).ok_or_else(|| cfg_err("capabilities must be strings".into()))?;
            let mut c = Capabilities::default();
            for cap in list {
                match cap.as_str() {
                    "pull" => c.pull = true,
                    "resolve" => c.resolve = true,
                    "push" => c.push = true,
                    other => return Err(cfg_err(format!("unknown capability {other:?}"))),
                }
            }
            c
        }
    };
    let skip_verify = match spec.get("skip_verify") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| cfg_err("skip_verify must be true or false".into()))?,
    };
    let ca = match spec.get("ca") {
        None => Vec::new(),
        Some(v) => strings(v)
            .ok_or_else(|| cfg_err("ca must be a path or a list of paths".into()))?
            .iter()
            .map(|p| resolve_path(base_dir, p))
            .collect(),
    };
    let client = match spec.get("client") {
        None => Vec::new(),
        Some(toml::Value::String(s)) => vec![(resolve_path(base_dir, s), None)],
        Some(toml::Value::Array(items)) => {
            let mut out = Vec::new();
            for item in items {
                match item {
                    toml::Value::String(s) => out.push((resolve_path(base_dir, s), None)),
                    toml::Value::Array(pair) if pair.len() == 2 => {
                        let c = pair[0].as_str();
                        let k = pair[1].as_str();
                        match (c, k) {
                            (Some(c), Some(k)) => out
                                .push((resolve_path(base_dir, c), Some(resolve_path(base_dir, k)))),
                            _ => return Err(cfg_err("client pairs must be [cert, key]".into())),
                        }
                    }
                    _ => return Err(cfg_err("client must be paths or [cert, key] pairs".into())),
                }
            }
            out
        }
        Some(_) => return Err(cfg_err("client must be a path or a list".into())),
    };
    let mut headers = Vec::new();
    if let Some(h) = spec.get("header") {
        let h = h
            .as_table()
            .ok_or_else(|| cfg_err("header must be a table".into()))?;
        for (k, v) in h {
            for value in
                strings(v).ok_or_else(|| cfg_err(format!("header {k:?} must be strings")))?
            {
                headers.push((k.clone(), value));
            }
        }
    }
    Ok(RegistryHost {
        base,
        capabilities,
        skip_verify,
        ca,
        client,
        headers,
        upstream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_files() {
        let cfg = HostsConfig::default();
        let h = cfg.hosts_for("docker.io").unwrap();
        assert_eq!(h[0].base.as_str(), "https://registry-1.docker.io/v2");
        let h = cfg.hosts_for("127.0.0.1:5000").unwrap();
        assert_eq!(h[0].base.as_str(), "http://127.0.0.1:5000/v2");
        assert_eq!(h[0].authority(), "127.0.0.1:5000");
        let h = cfg.hosts_for("ghcr.io").unwrap();
        assert_eq!(h[0].base.scheme(), "https");
        for (registry, scheme) in [
            ("localhost:5000", "http"),
            ("127.1.2.3", "http"),
            ("[::1]:5000", "http"),
            ("127.example.com", "https"),
            ("127.0.0.1.nip.io:5000", "https"),
        ] {
            let h = cfg.hosts_for(registry).unwrap();
            assert_eq!(h[0].base.scheme(), scheme, "{registry}");
        }
        let insecure = HostsConfig {
            insecure: vec!["reg.lan:5000".into()],
            ..Default::default()
        };
        assert_eq!(
            insecure.hosts_for("reg.lan:5000").unwrap()[0].base.scheme(),
            "http"
        );
    }

    #[test]
    fn hosts_toml_mirrors_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("docker.io");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(
            reg.join("hosts.toml"),
            r#"
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:30020"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  [host."http://127.0.0.1:30020".header]
    x-spegel = "yes"
    x-multi = ["a", "b"]

[host."https://mirror.example/custom/path"]
  capabilities = ["pull"]
  override_path = true
  ca = "ca.pem"
  client = [["cert.pem", "/abs/key.pem"]]
"#,
        )
        .unwrap();
        let cfg = HostsConfig {
            dirs: vec![dir.path().to_path_buf()],
            insecure: vec![],
        };
        let h = cfg.hosts_for("docker.io").unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].base.as_str(), "http://127.0.0.1:30020/v2");
        assert!(h[0].skip_verify && !h[0].capabilities.push && h[0].capabilities.resolve);
        assert_eq!(
            h[0].headers,
            vec![
                ("x-spegel".to_string(), "yes".to_string()),
                ("x-multi".to_string(), "a".to_string()),
                ("x-multi".to_string(), "b".to_string())
            ]
        );
        assert!(!h[0].upstream);
        assert_eq!(h[1].base.as_str(), "https://mirror.example/custom/path");
        assert!(h[1].capabilities.pull && !h[1].capabilities.resolve);
        assert_eq!(h[1].ca, vec![reg.join("ca.pem")]);
        assert_eq!(
            h[1].client,
            vec![(reg.join("cert.pem"), Some("/abs/key.pem".into()))]
        );
        assert_eq!(h[2].base.as_str(), "https://registry-1.docker.io/v2");
        assert!(h[2].upstream && h[2].capabilities.push);
        // Another registry falls back to the default.
        assert_eq!(cfg.hosts_for("quay.io").unwrap().len(), 1);
    }

    #[test]
    fn default_dir_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("_default");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), "[host.\"http://10.0.0.1:5000\"]\n").unwrap();
        let cfg = HostsConfig {
            dirs: vec![dir.path().to_path_buf()],
            insecure: vec![],
        };
        let h = cfg.hosts_for("quay.io").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].base.as_str(), "https://quay.io/v2");
        for bad in [
            "server = 1",
            "[host.\"ftp://x\"]",
            "[host.\"http://x\"]\ncapabilities = [\"fly\"]",
            "[host.\"http://x\"]\nskip_verify = \"yes\"",
            "not toml [",
        ] {
            std::fs::write(d.join("hosts.toml"), bad).unwrap();
            assert!(cfg.hosts_for("quay.io").is_err(), "{bad}");
        }
    }
}
