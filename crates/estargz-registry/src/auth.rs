//! Registry authentication: credentials from the docker config, `WWW-Authenticate`
//! challenges, and bearer tokens cached per registry and scope.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::error::{Error, Result};

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Username and password (or a personal access token as password).
    Basic {
        /// User name.
        username: String,
        /// Password or token.
        password: String,
    },
    /// An OAuth2 refresh token (docker config `identitytoken`).
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(***)"),
        }
    }
}

#[derive(Deserialize, Default)]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Credentials by registry host, as found in a docker config file.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_host: HashMap<String, Credential>,
}

impl Credentials {
    /// No credentials: anonymous access only.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// The docker config of this user: `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`. A missing file means no credentials.
    pub fn from_default_docker_config() -> Result<Credentials> {
        let path = match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) => PathBuf::from(dir).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".docker/config.json"),
                None => return Ok(Credentials::none()),
            },
        };
        if !path.exists() {
            return Ok(Credentials::none());
        }
        Credentials::from_docker_config(&path)
    }

    /// Reads `auths` from a docker config file.
    pub fn from_docker_config(path: &Path) -> Result<Credentials> {
        let data = std::fs::read(path).map_err(|source| Error::Io {
            context: format!("reading docker config {}", path.display()),
            source,
        })?;
        let cfg: DockerConfigFile = serde_json::from_slice(&data).map_err(|e| Error::Config {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        if let Some(store) = cfg.creds_store {
            tracing::warn!(
                store,
                "docker credential helpers are not supported; using only `auths`"
            );
        }
        let mut by_host = HashMap::new();
        for (key, a) in cfg.auths {
            let bad = |d: &str| Error::Config {
                path: path.display().to_string(),
                detail: format!("auths[{key:?}]: {d}"),
            };
            let cred = if let Some(t) = a.identitytoken.filter(|t| !t.is_empty()) {
                Credential::IdentityToken(t)
            } else if let Some(enc) = a.auth.filter(|s| !s.is_empty()) {
                let raw = STANDARD
                    .decode(enc.trim())
                    .map_err(|_| bad("`auth` is not base64"))?;
                let text = String::from_utf8(raw).map_err(|_| bad("`auth` is not UTF-8"))?;
                let (u, p) = text
                    .split_once(':')
                    .ok_or_else(|| bad("`auth` is not user:password"))?;
                Credential::Basic {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            } else if let (Some(u), Some(p)) = (a.username, a.password) {
                Credential::Basic {
                    username: u,
                    password: p,
                }
            } else {
                continue;
            };
            by_host.insert(normalize_key(&key), cred);
        }
        Ok(Credentials { by_host })
    }

    /// Adds (or replaces) the credential for `host`.
    pub fn insert(&mut self, host: &str, cred: Credential) {
        self.by_host.insert(normalize_key(host), cred);
    }

    /// The credential for a registry host (`docker.io` also matches Docker Hub's keys).
    pub fn get(&self, host: &str) -> Option<&Credential> {
        let key = normalize_key(host);
        self.by_host.get(&key)
    }
}

/// Reduces docker config keys (`https://index.docker.io/v1/`, `http://h:5000`) to a host.
fn normalize_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm="..."`.
    Basic,
    /// `Bearer realm="...",service="...",scope="..."`.
    Bearer {
        /// Token endpoint.
        realm: String,
        /// Service name to ask for.
        service: Option<String>,
        /// Scope the registry asked for, if any.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header value.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, remaining) = if let Some(q) = after.strip_prefix('"') {
            // Quoted string with backslash escapes.
            let mut val = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => val.push(c),
                }
            }
            (val, &q[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(k, v);
        s = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.remove("realm")?,
            service: params.remove("service"),
            scope: params.remove("scope"),
        }),
        _ => None,
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// What to send in `Authorization` for a registry and scope.
#[derive(Debug, Clone)]
pub(crate) enum AuthHeader {
    Basic(String),
    Bearer(String, Instant),
}

impl AuthHeader {
    pub(crate) fn value(&self) -> String {
        match self {
            AuthHeader::Basic(b) => format!("Basic {b}"),
            AuthHeader::Bearer(t, _) => format!("Bearer {t}"),
        }
    }
    fn fresh(&self) -> bool {
        match self {
            AuthHeader::Basic(_) => true,
            AuthHeader::Bearer(_, until) => Instant::now() < *until,
        }
    }
}

/// Authorization headers cached per (host, scope); tokens expire a little before the
/// registry says they do.
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    entries: Mutex<HashMap<(String, String), AuthHeader>>,
}

impl TokenCache {
    pub(crate) async fn get(&self, host: &str, scope: &str) -> Option<AuthHeader> {
        let map = self.entries.lock().await;
        map.get(&(host.to_string(), scope.to_string()))
            .filter(|h| h.fresh())
            .cloned()
    }

    pub(crate) async fn put(&self, host: &str, scope: &str, header: AuthHeader) {
        self.entries
            .lock()
            .await
            .insert((host.to_string(), scope.to_string()), header);
    }

    pub(crate) async fn forget(&self, host: &str, scope: &str) {
        self.entries
            .lock()
            .await
            .remove(&(host.to_string(), scope.to_string()));
    }
}

/// Answers a challenge: returns the header to send, fetching a bearer token when needed.
///
/// `http` is the client for the token server (the registry host's own only when the realm
/// is on that host); `host` is the registry host's base URL. Credentials never travel over
/// plain HTTP except to loopback, and a token server on plain HTTP is accepted only on
/// loopback or on the registry host itself when that is reached over HTTP anyway.
pub(crate) async fn authorize(
    http: &reqwest::Client,
    host: &reqwest::Url,
    challenge: &Challenge,
    cred: Option<&Credential>,
    scope: &str,
    target: &str,
) -> Result<AuthHeader> {
    let cleartext = |u: &reqwest::Url| u.scheme() == "http" && !is_loopback(u);
    let refuse = |what: String| Error::Unauthorized {
        target: target.to_string(),
        detail: what,
    };
    match challenge {
        Challenge::Basic if cred.is_some() && cleartext(host) => Err(refuse(format!(
            "refusing to send credentials to {} over plain HTTP",
            host.host_str().unwrap_or("")
        ))),
        Challenge::Basic => match cred {
            Some(Credential::Basic { username, password }) => Ok(AuthHeader::Basic(
                STANDARD.encode(format!("{username}:{password}")),
            )),
            _ => Err(Error::Unauthorized {
                target: target.to_string(),
                detail: "the registry wants a user name and password and none is configured".into(),
            }),
        },
        Challenge::Bearer {
            realm,
            service,
            scope: asked,
        } => {
            let scope = if scope.is_empty() {
                asked.clone().unwrap_or_default()
            } else {
                scope.to_string()
            };
            let url = reqwest::Url::parse(realm).map_err(|e| Error::Unauthorized {
                target: target.to_string(),
                detail: format!("token realm {realm:?} is not a URL: {e}"),
            })?;
            if cleartext(&url) && !crate::client::same_origin(&url, host) {
                return Err(refuse(format!(
                    "token server {realm} is on plain HTTP: refused (a token or credentials could be read on the way)"
                )));
            }
            if cleartext(&url) && cred.is_some() {
                return Err(refuse(format!(
                    "refusing to send credentials to token server {realm} over plain HTTP"
                )));
            }
            let req = match cred {
                Some(Credential::IdentityToken(refresh)) => {
                    let mut form = vec![
                        ("grant_type", "refresh_token".to_string()),
                        ("refresh_token", refresh.clone()),
                        ("client_id", "estargz".to_string()),
                        ("scope", scope.clone()),
                    ];
                    if let Some(s) = service {
                        form.push(("service", s.clone()));
                    }
                    let body = form
                        .iter()
                        .map(|(k, v)| format!("{k}={}", url_encode(v)))
                        .collect::<Vec<_>>()
                        .join("&");
                    http.post(url)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(body)
                }
                _ => {
                    let mut u = url;
                    {
                        let mut q = u.query_pairs_mut();
                        if let Some(s) = service {
                            q.append_pair("service", s);
                        }
                        if !scope.is_empty() {
                            q.append_pair("scope", &scope);
                        }
                    }
                    let r = http.get(u);
                    match cred {
                        Some(Credential::Basic { username, password }) => {
                            r.basic_auth(username, Some(password))
                        }
                        _ => r,
                    }
                }
            };
            let resp = req
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .map_err(|e| Error::Unauthorized {
                    target: target.to_string(),
                    detail: format!("token request to {realm} failed: {e}"),
                })?;
            let status = resp.status();
            if !status.is_success() {
                return Err(Error::Unauthorized {
                    target: target.to_string(),
                    detail: format!("token server {realm} answered {status}"),
                });
            }
            // Tokens are a few KiB; a token server that sends more is broken or hostile.
            let body = crate::client::read_limited(resp, 1 << 20, realm.as_str())
                .await
                .map_err(|e| Error::Unauthorized {
                    target: target.to_string(),
                    detail: format!("reading the token from {realm}: {e}"),
                })?;
            let tok: TokenResponse =
                serde_json::from_slice(&body).map_err(|e| Error::Unauthorized {
                    target: target.to_string(),
                    detail: format!("token response from {realm} is not JSON: {e}"),
                })?;
            let token = tok
                .token
                .or(tok.access_token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| Error::Unauthorized {
                    target: target.to_string(),
                    detail: format!("token response from {realm} holds no token"),
                })?;
            // Tokens last at least 60 s per the spec; renew 10 s early.
            // A day at most: a hostile `expires_in` must not overflow the clock.
            let life = tok.expires_in.unwrap_or(60).clamp(20, 24 * 3600);
            Ok(AuthHeader::Bearer(
                token,
                Instant::now() + Duration::from_secs(life - 10),
            ))
        }
    }
}

/// Whether `u` names this machine (127.0.0.0/8, ::1 or `localhost`): an address that
/// parses as loopback, not merely a name that starts like one.
fn is_loopback(u: &reqwest::Url) -> bool {
    let host = u.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/python:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm=http://127.0.0.1:1/t, service = "a \"q\"""#),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: Some("a \"q\"".into()),
                scope: None
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
    }

    #[test]
    fn docker_config_auths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
                "127.0.0.1:5000":{"username":"u","password":"p"},
                "ghcr.io":{"identitytoken":"refresh"},
                "empty.example":{}
            }}"#,
        )
        .unwrap();
        let c = Credentials::from_docker_config(&path).unwrap();
        assert_eq!(
            c.get("docker.io"),
            Some(&Credential::Basic {
                username: "user".into(),
                password: "pa:ss".into()
            })
        );
        assert!(matches!(
            c.get("127.0.0.1:5000"),
            Some(Credential::Basic { .. })
        ));
        assert_eq!(
            c.get("ghcr.io"),
            Some(&Credential::IdentityToken("refresh".into()))
        );
        assert_eq!(c.get("empty.example"), None);
        assert!(
            !format!("{:?}", c).contains("pa:ss"),
            "secrets must not be printed"
        );
        std::fs::write(&path, r#"{"auths":{"x":{"auth":"!!"}}}"#).unwrap();
        assert!(Credentials::from_docker_config(&path).is_err());
    }
}
