//! Registry access flags shared by the commands that talk to registries.

use anyhow::{Context, Result};
use clap::Args;
use estargz_registry::{ClientConfig, Credentials, HostsConfig, RegistryClient};

/// How to reach registries.
#[derive(Args, Debug, Clone)]
pub struct RegistryFlags {
    /// Directory of containerd-style hosts.toml files (mirrors, CAs, client certificates);
    /// repeatable. Default: /etc/containerd/certs.d when it exists.
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Vec<std::path::PathBuf>,
    /// Registry (host[:port]) that may be reached over plain HTTP; repeatable. Loopback
    /// registries always may.
    #[arg(long, value_name = "HOST")]
    pub insecure_registry: Vec<String>,
}

impl RegistryFlags {
    /// A client with these settings and the docker config's credentials.
    pub fn client(&self) -> Result<RegistryClient> {
        let mut dirs = self.hosts_dir.clone();
        let default_dir = std::path::Path::new("/etc/containerd/certs.d");
        if dirs.is_empty() && default_dir.is_dir() {
            dirs.push(default_dir.to_path_buf());
        }
        Ok(RegistryClient::new(ClientConfig {
            credentials: Credentials::from_default_docker_config()
                .context("reading registry credentials")?,
            hosts: HostsConfig {
                dirs,
                insecure: self.insecure_registry.clone(),
            },
            ..Default::default()
        }))
    }
}
