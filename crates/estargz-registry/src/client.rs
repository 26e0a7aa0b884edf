//! The registry client: requests with hosts fallback, auth, retries and connection limits.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use estargz_oci::{media_types, Descriptor, Digest, Index, Manifest, Platform};
use futures_util::StreamExt;
use reqwest::header::{
    HeaderMap, ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::auth::{authorize, parse_challenge, Challenge, Credentials, TokenCache};
use crate::error::{Error, Result};
use crate::hosts::{HostsConfig, RegistryHost};
use crate::reference::ImageRef;

/// Largest manifest or index accepted.
pub const MAX_MANIFEST_SIZE: u64 = 8 << 20;

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// How often and how patiently to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per host, the first included.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time, with jitter.
    pub initial_backoff: Duration,
    /// Longest wait between attempts (also caps Retry-After).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Credentials by registry.
    pub credentials: Credentials,
    /// Pull secrets recorded while running (by the daemon's CRI proxy): used for a
    /// registry before `credentials`, never for its mirrors.
    pub pull_secrets: Option<std::sync::Arc<crate::PullSecrets>>,
    /// Mirrors, TLS and plain-HTTP policy.
    pub hosts: HostsConfig,
    /// Retries.
    pub retry: RetryPolicy,
    /// Time limit for one request without a body to stream (manifests, ranges, uploads'
    /// control requests); whole-blob downloads are limited by `stall_timeout` instead.
    pub request_timeout: Duration,
    /// Connection set-up limit.
    pub connect_timeout: Duration,
    /// A streamed body that delivers nothing for this long is abandoned (and retried).
    pub stall_timeout: Duration,
    /// Concurrent requests per host.
    pub max_connections_per_host: usize,
    /// User-Agent header.
    pub user_agent: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            credentials: Credentials::none(),
            pull_secrets: None,
            hosts: HostsConfig::default(),
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            max_connections_per_host: 16,
            user_agent: concat!("estargz/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// What a request needs from a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Resolve,
    Pull,
    Push,
}

/// A client for OCI distribution registries. Cheap to share (`Arc`) across tasks.
pub struct RegistryClient {
    config: ClientConfig,
    clients: Mutex<HashMap<String, reqwest::Client>>,
    tokens: TokenCache,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// The system's trusted roots, loaded once.
    system_roots: OnceLock<Arc<rustls::RootCertStore>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient").finish_non_exhaustive()
    }
}

/// One host chosen for a request.
struct Ctx {
    host: RegistryHost,
    http: reqwest::Client,
    registry: String,
}

impl Ctx {
    /// The API URL of `path` (`manifests/...`, `blobs/...`) in `repo` on this host.
    fn url(&self, repo: &str, path: &str) -> Result<Url> {
        endpoint(&self.host.base, repo, path, &self.registry)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn jitter(max: Duration) -> Duration {
    // Cheap randomness from the clock: enough to spread retries apart.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = nanos ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let ms = max.as_millis().max(1) as u64;
    Duration::from_millis(x % ms)
}

impl RegistryClient {
    /// A client with these settings.
    pub fn new(config: ClientConfig) -> RegistryClient {
        RegistryClient {
            config,
            clients: Mutex::new(HashMap::new()),
            tokens: TokenCache::default(),
            limits: Mutex::new(HashMap::new()),
            system_roots: OnceLock::new(),
        }
    }

    /// Loads what the first request would otherwise load on its way (the system's trusted
    /// roots, about 40 ms): a daemon calls this at start, off its request path.
    pub fn warm_up(&self) {
        self.system_roots.get_or_init(crate::tls::system_roots);
    }

    /// The settings in use.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The HTTP client for `host`: its TLS settings, used for that host only (redirects
    /// and token servers elsewhere get [`RegistryClient::plain_http`]). Redirects are
    /// followed by [`RegistryClient::send`], which decides what goes along.
    fn http_for(&self, host: &RegistryHost) -> Result<reqwest::Client> {
        let key = format!("{}|{}", host.authority(), host.tls_key());
        if let Some(c) = lock(&self.clients).get(&key) {
            return Ok(c.clone());
        }
        let tls = crate::tls::client_config(host, || {
            self.system_roots
                .get_or_init(crate::tls::system_roots)
                .clone()
        })?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(self.config.connect_timeout)
            .pool_max_idle_per_host(self.config.max_connections_per_host)
            .user_agent(self.config.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Tls {
                host: host.authority(),
                detail: e.to_string(),
            })?;
        lock(&self.clients).insert(key, client.clone());
        Ok(client)
    }

    /// A client with no host's settings (system roots, no client certificate, verified
    /// TLS): for redirect targets and token servers on other hosts.
    fn plain_http(&self, url: &reqwest::Url) -> Result<reqwest::Client> {
        let host = RegistryHost {
            base: url.clone(),
            capabilities: crate::Capabilities::all(),
            skip_verify: false,
            ca: Vec::new(),
            client: Vec::new(),
            headers: Vec::new(),
            upstream: false,
        };
        self.http_for(&host)
    }

    fn limit_for(&self, host: &RegistryHost) -> Arc<Semaphore> {
        lock(&self.limits)
            .entry(host.authority())
            .or_insert_with(|| {
                Arc::new(Semaphore::new(self.config.max_connections_per_host.max(1)))
            })
            .clone()
    }

    fn hosts(&self, registry: &str, need: Need) -> Result<Vec<RegistryHost>> {
        let all = self.config.hosts.hosts_for(registry)?;
        Ok(all
            .into_iter()
            .filter(|h| match need {
                Need::Resolve => h.capabilities.resolve,
                Need::Pull => h.capabilities.pull,
                Need::Push => h.capabilities.push,
            })
            .collect())
    }

    fn backoff(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let p = &self.config.retry;
        let exp = p
            .initial_backoff
            .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
            .min(p.max_backoff);
        match hint {
            Some(h) => h.min(p.max_backoff),
            None => exp / 2 + jitter(exp / 2 + Duration::from_millis(1)),
        }
    }

    /// Runs `op` against each host that can serve `need`, mirrors first, retrying transient
    /// failures with backoff. A mirror that fails hands over to the next host.
    async fn with_hosts<T, F, Fut>(
        &self,
        registry: &str,
        need: Need,
        target: &str,
        op: F,
    ) -> Result<T>
    where
        F: Fn(Arc<Ctx>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let hosts = self.hosts(registry, need)?;
        if hosts.is_empty() {
            return Err(Error::Config {
                path: format!("hosts for {registry}"),
                detail: format!("no host may be used to {need:?} {target}"),
            });
        }
        let mut last = None;
        for host in hosts {
            let upstream = host.upstream;
            let authority = host.authority();
            let ctx = Arc::new(Ctx {
                http: self.http_for(&host)?,
                host,
                registry: registry.to_string(),
            });
            let mut attempt = 0;
            loop {
                match op(ctx.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_transient() && attempt + 1 < self.config.retry.max_attempts => {
                        let wait = self.backoff(attempt, retry_after_of(&e));
                        tracing::warn!(host = %authority, attempt = attempt + 1, error = %e,
                            wait_ms = wait.as_millis() as u64, "retrying");
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                    Err(e) if !upstream => {
                        tracing::warn!(mirror = %authority, error = %e, "mirror failed; trying the next host");
                        last = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Transport {
            target: target.to_string(),
            detail: "no host answered".into(),
        }))
    }

    /// Sends one request on `ctx` (answering one auth challenge), mapping error statuses.
    async fn send(
        &self,
        ctx: &Ctx,
        scope: &str,
        target: &str,
        timeout: Option<Duration>,
        make: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
    ) -> Result<Response> {
        let authority = ctx.host.authority();
        let _permit = self
            .limit_for(&ctx.host)
            .acquire_owned()
            .await
            .map_err(|_| Error::Transport {
                target: target.to_string(),
                detail: "client is shutting down".into(),
            })?;
        let mut challenged = false;
        let transport = |e: reqwest::Error| Error::Transport {
            target: target.to_string(),
            detail: describe_reqwest(&e),
        };
        loop {
            let mut req = make(&ctx.http);
            for (k, v) in &ctx.host.headers {
                req = req.header(k, v);
            }
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            if let Some(auth) = self.tokens.get(&authority, scope).await {
                req = req.header(reqwest::header::AUTHORIZATION, auth.value());
            }
            let req = req.build().map_err(transport)?;
            let resend = req.try_clone();
            let mut resp = ctx.http.execute(req).await.map_err(transport)?;
            if is_redirect(resp.status()) {
                if let Some(first) = resend {
                    resp = self.follow(ctx, first, resp, target).await?;
                }
            }
            let status = resp.status();
            // A redirect target's challenge is its own: the registry's credentials answer
            // only the registry's (a CDN naming a token server would get them).
            let from_host = same_origin(resp.url(), &ctx.host.base);
            if status == StatusCode::UNAUTHORIZED && !challenged && from_host {
                challenged = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge)
                    .ok_or_else(|| Error::Unauthorized {
                        target: target.to_string(),
                        detail: "401 without a usable WWW-Authenticate challenge".into(),
                    })?;
                // A mirror's credentials are its own: the registry's are never sent to it.
                let recorded;
                let cred = if ctx.host.upstream {
                    recorded = (self.config.pull_secrets.as_ref())
                        .and_then(|secrets| secrets.get(&ctx.registry));
                    recorded
                        .as_ref()
                        .or_else(|| self.config.credentials.get(&ctx.registry))
                } else {
                    self.config.credentials.get(&authority)
                };
                let realm_http = match &challenge {
                    Challenge::Bearer { realm, .. } => match reqwest::Url::parse(realm) {
                        Ok(u) if same_origin(&u, &ctx.host.base) => ctx.http.clone(),
                        Ok(u) => self.plain_http(&u)?,
                        Err(_) => ctx.http.clone(),
                    },
                    Challenge::Basic => ctx.http.clone(),
                };
                let header =
                    authorize(&realm_http, &ctx.host.base, &challenge, cred, scope, target).await?;
                self.tokens.put(&authority, scope, header).await;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                if from_host {
                    self.tokens.forget(&authority, scope).await;
                }
                let from = match from_host {
                    true => String::new(),
                    false => format!(" from {}", resp.url()),
                };
                let message = error_text(resp).await;
                return Err(Error::Unauthorized {
                    target: target.to_string(),
                    detail: format!(
                        "{status}{from}{}",
                        if message.is_empty() {
                            String::new()
                        } else {
                            format!(": {message}")
                        }
                    ),
                });
            }
            if status == StatusCode::NOT_FOUND {
                return Err(Error::NotFound {
                    target: target.to_string(),
                });
            }
            if status.is_client_error() || status.is_server_error() {
                let retry_after = parse_retry_after(resp.headers());
                let message = error_text(resp).await;
                return Err(Error::Status {
                    target: target.to_string(),
                    status: status.as_u16(),
                    message,
                    retry_after,
                });
            }
            return Ok(resp);
        }
    }

    /// Follows the redirects `resp` starts (at most 10). A hop to the host itself keeps the
    /// request as it was; a hop elsewhere (blob storage, a CDN) goes with no host's TLS
    /// settings and without `Authorization` or `hosts.toml` headers: those were configured
    /// for the host, not for whoever it points at.
    async fn follow(
        &self,
        ctx: &Ctx,
        first: reqwest::Request,
        mut resp: Response,
        target: &str,
    ) -> Result<Response> {
        let mut url = first.url().clone();
        for _ in 0..10 {
            if !is_redirect(resp.status()) {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .ok_or_else(|| Error::BadResponse {
                    target: target.to_string(),
                    detail: format!("{} without a usable Location", resp.status()),
                })?;
            url = location;
            let own = same_origin(&url, &ctx.host.base);
            let mut req = reqwest::Request::new(first.method().clone(), url.clone());
            *req.timeout_mut() = first.timeout().copied();
            for (k, v) in first.headers() {
                let host_only = *k == reqwest::header::AUTHORIZATION
                    || ctx
                        .host
                        .headers
                        .iter()
                        .any(|(h, _)| k.as_str().eq_ignore_ascii_case(h));
                if own || !host_only {
                    req.headers_mut().insert(k.clone(), v.clone());
                }
            }
            let http = if own {
                ctx.http.clone()
            } else {
                self.plain_http(&url)?
            };
            resp = http.execute(req).await.map_err(|e| Error::Transport {
                target: target.to_string(),
                detail: format!("following a redirect to {url}: {}", describe_reqwest(&e)),
            })?;
        }
        Err(Error::BadResponse {
            target: target.to_string(),
            detail: "more than 10 redirects".into(),
        })
    }

    /// Resolves a reference to its manifest or index descriptor (HEAD, falling back to GET).
    pub async fn resolve(&self, image: &ImageRef) -> Result<Descriptor> {
        let (desc, _) = self.get_manifest(image).await?;
        Ok(desc)
    }

    /// Fetches the manifest or index `image` names; checks its digest when the reference
    /// is a digest. Returns its descriptor and bytes.
    pub async fn get_manifest(&self, image: &ImageRef) -> Result<(Descriptor, Bytes)> {
        let reference = image.reference();
        let target = format!(
            "{}/{} manifest {reference}",
            image.registry, image.repository
        );
        let need = if image.digest.is_some() {
            Need::Pull
        } else {
            Need::Resolve
        };
        let scope = format!("repository:{}:pull", image.repository);
        self.with_hosts(&image.registry, need, &target, |ctx| {
            let target = target.clone();
            let scope = scope.clone();
            let reference = reference.clone();
            async move {
                let url = ctx.url(&image.repository, &format!("manifests/{reference}"))?;
                let resp = self
                    .send(
                        &ctx,
                        &scope,
                        &target,
                        Some(self.config.request_timeout),
                        &|c| c.get(url.clone()).header(ACCEPT, MANIFEST_ACCEPT),
                    )
                    .await?;
                let media_type = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
                    .unwrap_or_default();
                let body = read_limited(resp, MAX_MANIFEST_SIZE, &target).await?;
                let digest = Digest::sha256_of(&body);
                if let Some(expected) = &image.digest {
                    if expected.algorithm() == "sha256" && expected != &digest {
                        return Err(Error::DigestMismatch {
                            target,
                            expected: expected.to_string(),
                            actual: digest.to_string(),
                        });
                    }
                }
                let media_type = if media_type.is_empty() || media_type == "application/json" {
                    sniff_media_type(&body)
                } else {
                    media_type
                };
                Ok((Descriptor::new(media_type, digest, body.len() as u64), body))
            }
        })
        .await
    }

    /// Resolves `image` to the manifest for `platform`, following an index if it is one.
    pub async fn resolve_manifest(
        &self,
        image: &ImageRef,
        platform: &Platform,
    ) -> Result<(Descriptor, Manifest)> {
        let (desc, body) = self.get_manifest(image).await?;
        if media_types::is_manifest(&desc.media_type) {
            return Ok((desc, Manifest::from_slice(&body)?));
        }
        let index = Index::from_slice(&body)?;
        let chosen = index
            .manifests
            .iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .ok_or_else(|| Error::NotFound {
                target: format!("{image} manifest for platform {platform}"),
            })?;
        let by_digest = image.with_reference(chosen.digest.as_str());
        let (d, b) = self.get_manifest(&by_digest).await?;
        Ok((d, Manifest::from_slice(&b)?))
    }

    /// Reads bytes `range` of a blob; the result has exactly `range.end - range.start` bytes.
    pub async fn fetch_range(
        &self,
        image: &ImageRef,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes> {
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        // Retried and failed over as a whole, the body included.
        let target = range_target(image, digest, &range);
        self.with_hosts(&image.registry, Need::Pull, &target, |ctx| {
            let range = range.clone();
            async move {
                let mut body = self.range_response(&ctx, image, digest, range).await?;
                // What the range asks for, up to a bound: the body may still fall short.
                let mut out = Vec::with_capacity(body.remaining.min(8 << 20) as usize);
                while let Some(piece) = body.next().await? {
                    out.extend_from_slice(&piece);
                }
                Ok(Bytes::from(out))
            }
        })
        .await
    }

    /// Bytes `range` of a blob as they arrive: returns once the registry has answered
    /// with the range (the request retried and failed over as every request is), and the
    /// body then comes piece by piece from [`RangeBody::next`]. Once the body has started
    /// nothing is retried: a failure mid-body is the caller's to retry (with
    /// [`RegistryClient::fetch_range`]).
    pub async fn fetch_range_stream(
        &self,
        image: &ImageRef,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<RangeBody> {
        let target = range_target(image, digest, &range);
        if range.start >= range.end {
            return Ok(RangeBody {
                body: Body::Whole(None),
                remaining: 0,
                target,
            });
        }
        self.with_hosts(&image.registry, Need::Pull, &target, |ctx| {
            let range = range.clone();
            async move { self.range_response(&ctx, image, digest, range).await }
        })
        .await
    }

    /// One range request to one host, its answer checked: a 206 with the range asked
    /// for, or a 200 (a server that ignores `Range`), whose slice is read here.
    async fn range_response(
        &self,
        ctx: &Ctx,
        image: &ImageRef,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<RangeBody> {
        let target = range_target(image, digest, &range);
        let scope = format!("repository:{}:pull", image.repository);
        let url = ctx.url(&image.repository, &format!("blobs/{digest}"))?;
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let resp = self
            .send(
                ctx,
                &scope,
                &target,
                Some(self.config.request_timeout),
                &|c| c.get(url.clone()).header(RANGE, header.clone()),
            )
            .await?;
        let want = range.end - range.start;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let got = parse_content_range(resp.headers());
                if got.map(|(s, e, _)| (s, e)) != Some((range.start, range.end - 1)) {
                    return Err(Error::BadResponse {
                        target,
                        detail: format!(
                            "Content-Range {:?} does not match the request",
                            resp.headers().get(CONTENT_RANGE)
                        ),
                    });
                }
                if resp.content_length().is_some_and(|len| len > want) {
                    return Err(Error::BadResponse {
                        target,
                        detail: format!(
                            "body of {:?} bytes for a range of {want}",
                            resp.content_length()
                        ),
                    });
                }
                Ok(RangeBody {
                    body: Body::Response(resp),
                    remaining: want,
                    target,
                })
            }
            StatusCode::OK => {
                // The server ignored Range: take our slice of the whole blob.
                tracing::debug!(%target, "registry ignored Range; reading the blob up to the range's end");
                let slice = read_slice(resp, range.clone(), &target).await?;
                Ok(RangeBody {
                    body: Body::Whole(Some(slice)),
                    remaining: want,
                    target,
                })
            }
            s => Err(Error::BadResponse {
                target,
                detail: format!("unexpected status {s} for a range request"),
            }),
        }
    }

    /// Reads the last `len` bytes of a blob (all of it when it is shorter) with one suffix
    /// range request, and returns them with the blob's size: one round trip where a HEAD
    /// and a range request would be two. A host that ignores `Range` is read whole up to
    /// 64 MiB (beyond that the answer is refused rather than buffered).
    pub async fn fetch_tail(
        &self,
        image: &ImageRef,
        digest: &Digest,
        len: u64,
    ) -> Result<(Bytes, u64)> {
        const WHOLE_LIMIT: u64 = 64 << 20;
        let target = format!(
            "{}/{} blob {digest} last {len} bytes",
            image.registry, image.repository
        );
        let scope = format!("repository:{}:pull", image.repository);
        self.with_hosts(&image.registry, Need::Pull, &target, |ctx| {
            let target = target.clone();
            let scope = scope.clone();
            async move {
                let url = ctx.url(&image.repository, &format!("blobs/{digest}"))?;
                let header = format!("bytes=-{}", len.max(1));
                let resp = self
                    .send(
                        &ctx,
                        &scope,
                        &target,
                        Some(self.config.request_timeout),
                        &|c| c.get(url.clone()).header(RANGE, header.clone()),
                    )
                    .await?;
                match resp.status() {
                    StatusCode::PARTIAL_CONTENT => {
                        let bad = |detail: String| Error::BadResponse {
                            target: target.clone(),
                            detail,
                        };
                        let (s, e, total) = parse_content_range(resp.headers())
                            .ok_or_else(|| bad("206 without a usable Content-Range".into()))?;
                        let total = total
                            .ok_or_else(|| bad("Content-Range without the blob size".into()))?;
                        if e.checked_add(1) != Some(total) || e - s + 1 != len.min(total) {
                            return Err(bad(format!(
                                "Content-Range bytes {s}-{e}/{total} is not the last {len} bytes"
                            )));
                        }
                        let body = read_exact_len(resp, e - s + 1, &target).await?;
                        Ok((body, total))
                    }
                    StatusCode::OK => {
                        tracing::debug!(%target, "registry ignored Range; reading the whole blob");
                        let body = read_limited(resp, WHOLE_LIMIT, &target).await?;
                        let total = body.len() as u64;
                        let from = total.saturating_sub(len) as usize;
                        Ok((body.slice(from..), total))
                    }
                    s => Err(Error::BadResponse {
                        target,
                        detail: format!("unexpected status {s} for a range request"),
                    }),
                }
            }
        })
        .await
    }

    /// Downloads a whole blob to `path` (via a temporary file), checking size and digest;
    /// `progress` gets the bytes received so far. Retries restart the download.
    pub async fn download_blob(
        &self,
        image: &ImageRef,
        desc: &Descriptor,
        path: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<()> {
        let digest = &desc.digest;
        let target = format!("{}/{} blob {digest}", image.registry, image.repository);
        let scope = format!("repository:{}:pull", image.repository);
        let tmp = path.with_extension("partial");
        self.with_hosts(&image.registry, Need::Pull, &target, |ctx| {
            let target = target.clone();
            let scope = scope.clone();
            let tmp = tmp.clone();
            async move {
                let url = ctx.url(&image.repository, &format!("blobs/{digest}"))?;
                let resp = self
                    .send(&ctx, &scope, &target, None, &|c| c.get(url.clone()))
                    .await?;
                let io_err = |source| Error::Io {
                    context: format!("writing {}", tmp.display()),
                    source,
                };
                let mut file = tokio::fs::File::create(&tmp).await.map_err(io_err)?;
                let mut hasher = Sha256::new();
                let mut received = 0u64;
                let mut stream = resp.bytes_stream();
                loop {
                    let next = tokio::time::timeout(self.config.stall_timeout, stream.next())
                        .await
                        .map_err(|_| Error::Transport {
                            target: target.clone(),
                            detail: format!(
                                "stalled: nothing received for {:?}",
                                self.config.stall_timeout
                            ),
                        })?;
                    let Some(chunk) = next else { break };
                    let chunk = chunk.map_err(|e| Error::Transport {
                        target: target.clone(),
                        detail: format!(
                            "connection failed after {received} bytes: {}",
                            describe_reqwest(&e)
                        ),
                    })?;
                    received += chunk.len() as u64;
                    if received > desc.size {
                        return Err(Error::BadResponse {
                            target,
                            detail: format!(
                                "more than the {} bytes the descriptor says",
                                desc.size
                            ),
                        });
                    }
                    hasher.update(&chunk);
                    file.write_all(&chunk).await.map_err(io_err)?;
                    progress(received);
                }
                if received != desc.size {
                    return Err(Error::BadResponse {
                        target,
                        detail: format!("body ended after {received} of {} bytes", desc.size),
                    });
                }
                let actual = Digest::from_sha256_bytes(hasher.finalize().into());
                if &actual != digest {
                    return Err(Error::DigestMismatch {
                        target,
                        expected: digest.to_string(),
                        actual: actual.to_string(),
                    });
                }
                file.sync_all().await.map_err(io_err)?;
                Ok(())
            }
        })
        .await?;
        tokio::fs::rename(&tmp, path)
            .await
            .map_err(|source| Error::Io {
                context: format!("moving the blob into {}", path.display()),
                source,
            })
    }

    /// Whether the repository holds the blob; its size if so.
    pub async fn blob_exists(&self, image: &ImageRef, digest: &Digest) -> Result<Option<u64>> {
        let target = format!("{}/{} blob {digest}", image.registry, image.repository);
        let scope = format!("repository:{}:pull,push", image.repository);
        let res = self
            .with_hosts(&image.registry, Need::Push, &target, |ctx| {
                let target = target.clone();
                let scope = scope.clone();
                async move {
                    let url = ctx.url(&image.repository, &format!("blobs/{digest}"))?;
                    let resp = self
                        .send(
                            &ctx,
                            &scope,
                            &target,
                            Some(self.config.request_timeout),
                            &|c| c.head(url.clone()),
                        )
                        .await?;
                    Ok(resp
                        .headers()
                        .get(CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.parse().ok()))
                }
            })
            .await;
        match res {
            Ok(size) => Ok(Some(size.unwrap_or(0))),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads the file at `path` as blob `digest` unless the repository has it already.
    /// With `mount_from` (a repository on the same registry that has the blob) it asks for a
    /// cross-repository mount first. Returns what happened.
    pub async fn push_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        path: &Path,
        mount_from: Option<&str>,
    ) -> Result<PushOutcome> {
        if self.blob_exists(image, digest).await?.is_some() {
            return Ok(PushOutcome::AlreadyPresent);
        }
        let target = format!(
            "{}/{} blob {digest} upload",
            image.registry, image.repository
        );
        let mut scope = format!("repository:{}:pull,push", image.repository);
        if let Some(from) = mount_from {
            scope.push_str(&format!(" repository:{from}:pull"));
        }
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|source| Error::Io {
                context: format!("reading {}", path.display()),
                source,
            })?
            .len();
        self.with_hosts(&image.registry, Need::Push, &target, |ctx| {
            let target = target.clone();
            let scope = scope.clone();
            async move {
                let mut start = endpoint(
                    &ctx.host.base,
                    &image.repository,
                    "blobs/uploads/",
                    &ctx.registry,
                )?;
                if let Some(from) = mount_from {
                    start
                        .query_pairs_mut()
                        .append_pair("mount", digest.as_str())
                        .append_pair("from", from);
                }
                let resp = self
                    .send(
                        &ctx,
                        &scope,
                        &target,
                        Some(self.config.request_timeout),
                        &|c| c.post(start.clone()).header(CONTENT_LENGTH, "0"),
                    )
                    .await?;
                if resp.status() == StatusCode::CREATED {
                    return Ok(PushOutcome::Mounted);
                }
                let location = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| Error::BadResponse {
                        target: target.clone(),
                        detail: "upload started without a Location".into(),
                    })?;
                let mut put = start.join(location).map_err(|e| Error::BadResponse {
                    target: target.clone(),
                    detail: format!("bad upload Location {location:?}: {e}"),
                })?;
                put.query_pairs_mut().append_pair("digest", digest.as_str());
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|source| Error::Io {
                        context: format!("opening {}", path.display()),
                        source,
                    })?;
                let body = reqwest::Body::wrap_stream(tokio_util_stream(file));
                let body = std::sync::Mutex::new(Some(body));
                let resp = self
                    .send(&ctx, &scope, &target, None, &|c| {
                        let b = lock(&body)
                            .take()
                            .unwrap_or_else(|| reqwest::Body::from(Vec::new()));
                        c.put(put.clone())
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_LENGTH, size.to_string())
                            .body(b)
                    })
                    .await?;
                if resp.status() != StatusCode::CREATED {
                    return Err(Error::BadResponse {
                        target,
                        detail: format!("upload finished with {} instead of 201", resp.status()),
                    });
                }
                Ok(PushOutcome::Uploaded)
            }
        })
        .await
    }

    /// Stores a manifest or index under `reference` (a tag or its digest); returns its digest.
    pub async fn push_manifest(
        &self,
        image: &ImageRef,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest> {
        let target = format!(
            "{}/{} manifest {reference} upload",
            image.registry, image.repository
        );
        let scope = format!("repository:{}:pull,push", image.repository);
        let digest = Digest::sha256_of(&body);
        self.with_hosts(&image.registry, Need::Push, &target, |ctx| {
            let target = target.clone();
            let scope = scope.clone();
            let body = body.clone();
            async move {
                let url = ctx.url(&image.repository, &format!("manifests/{reference}"))?;
                let resp = self
                    .send(
                        &ctx,
                        &scope,
                        &target,
                        Some(self.config.request_timeout),
                        &|c| {
                            c.request(Method::PUT, url.clone())
                                .header(CONTENT_TYPE, media_type)
                                .body(body.clone())
                        },
                    )
                    .await?;
                if !resp.status().is_success() {
                    return Err(Error::BadResponse {
                        target,
                        detail: format!("manifest upload answered {}", resp.status()),
                    });
                }
                Ok(())
            }
        })
        .await?;
        Ok(digest)
    }
}

/// What [`RegistryClient::push_blob`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The repository had the blob already.
    AlreadyPresent,
    /// Mounted from another repository without uploading.
    Mounted,
    /// Uploaded.
    Uploaded,
}

fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold(
        (file, vec![0u8; 1 << 20]),
        |(mut file, mut buf)| async move {
            use tokio::io::AsyncReadExt;
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => Some((Ok(Bytes::copy_from_slice(&buf[..n])), (file, buf))),
                Err(e) => Some((Err(e), (file, buf))),
            }
        },
    )
}

fn endpoint(base: &Url, repo: &str, rest: &str, registry: &str) -> Result<Url> {
    let s = format!("{}/{repo}/{rest}", base.as_str().trim_end_matches('/'));
    if base.scheme() == "http" {
        tracing::trace!(%registry, "plain HTTP");
    }
    Url::parse(&s).map_err(|e| Error::Config {
        path: registry.to_string(),
        detail: format!("cannot build a URL from {s:?}: {e}"),
    })
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    if e.is_timeout() {
        s.push_str(" (timed out)");
    }
    s
}

fn retry_after_of(e: &Error) -> Option<Duration> {
    match e {
        Error::Status { retry_after, .. } => *retry_after,
        _ => None,
    }
}

fn parse_retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    v.parse::<u64>().ok().map(Duration::from_secs)
}

/// Statuses that send the request elsewhere (not 300 or 304, which do not).
fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// Whether two URLs name the same scheme, host and port.
pub(crate) fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

async fn error_text(resp: Response) -> String {
    // An error body is only shown, so a little of it is enough: an endless one is not read.
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= 4096 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(500)])
        .trim()
        .to_string();
    // Registries answer {"errors":[{"code":..,"message":..}]}: show the messages.
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        if let Some(errs) = v["errors"].as_array() {
            let msgs: Vec<String> = errs
                .iter()
                .map(|e| {
                    format!(
                        "{} {}",
                        e["code"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    )
                    .trim()
                    .to_string()
                })
                .collect();
            return msgs.join("; ");
        }
    }
    text
}

/// The body of a range request, piece by piece as it arrives
/// ([`RegistryClient::fetch_range_stream`]): exactly the range's bytes, or an error.
pub struct RangeBody {
    body: Body,
    /// Bytes of the range not handed out yet.
    remaining: u64,
    target: String,
}

enum Body {
    Response(Response),
    /// Read already (a server that ignored `Range`); taken by the first `next`.
    Whole(Option<Bytes>),
}

impl RangeBody {
    /// The next piece of the range; `None` once all of it came. A body that ends short, runs
    /// past the range or breaks off is an error.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        let piece = match &mut self.body {
            Body::Whole(slice) => slice.take(),
            Body::Response(resp) => resp.chunk().await.map_err(|e| Error::Transport {
                target: self.target.clone(),
                detail: format!(
                    "connection failed with {} bytes of the range to come: {}",
                    self.remaining,
                    describe_reqwest(&e)
                ),
            })?,
        };
        match piece {
            Some(p) if p.len() as u64 > self.remaining => Err(Error::BadResponse {
                target: self.target.clone(),
                detail: "body longer than the range".into(),
            }),
            Some(p) => {
                self.remaining -= p.len() as u64;
                Ok(Some(p))
            }
            None if self.remaining > 0 => Err(Error::BadResponse {
                target: self.target.clone(),
                detail: format!("body ends {} bytes short of the range", self.remaining),
            }),
            None => Ok(None),
        }
    }
}

/// What a range request is for, in errors and logs.
fn range_target(image: &ImageRef, digest: &Digest, range: &Range<u64>) -> String {
    format!(
        "{}/{} blob {digest} bytes {}-{}",
        image.registry,
        image.repository,
        range.start,
        range.end.saturating_sub(1)
    )
}

/// The bytes `range` of a whole-blob (200) answer to a range request: those before it are
/// skipped as they arrive and the rest is not read, so a registry that ignores Range costs
/// time, not memory.
async fn read_slice(resp: Response, range: Range<u64>, target: &str) -> Result<Bytes> {
    let want = (range.end - range.start) as usize;
    let mut out = Vec::with_capacity(want);
    let mut at = 0u64;
    let mut stream = resp.bytes_stream();
    while out.len() < want {
        let Some(chunk) = stream.next().await else {
            return Err(Error::BadResponse {
                target: target.to_string(),
                detail: format!("blob is {at} bytes, shorter than the range {range:?}"),
            });
        };
        let chunk = chunk.map_err(|e| Error::Transport {
            target: target.to_string(),
            detail: format!(
                "connection failed after {at} bytes: {}",
                describe_reqwest(&e)
            ),
        })?;
        let (start, end) = (at, at + chunk.len() as u64);
        at = end;
        if end > range.start {
            let from = range.start.saturating_sub(start) as usize;
            let to = (chunk.len()).min(from + (want - out.len()));
            out.extend_from_slice(&chunk[from..to]);
        }
    }
    Ok(Bytes::from(out))
}

/// The whole body, refused beyond `limit` bytes.
pub(crate) async fn read_limited(resp: Response, limit: u64, target: &str) -> Result<Bytes> {
    if let Some(len) = resp.content_length() {
        if len > limit {
            return Err(Error::BadResponse {
                target: target.to_string(),
                detail: format!("body of {len} bytes exceeds the limit of {limit}"),
            });
        }
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::Transport {
            target: target.to_string(),
            detail: format!(
                "connection failed after {} bytes: {}",
                out.len(),
                describe_reqwest(&e)
            ),
        })?;
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(Error::BadResponse {
                target: target.to_string(),
                detail: format!("body exceeds the limit of {limit} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

async fn read_exact_len(resp: Response, want: u64, target: &str) -> Result<Bytes> {
    let body = read_limited(resp, want, target).await?;
    if body.len() as u64 != want {
        return Err(Error::BadResponse {
            target: target.to_string(),
            detail: format!("body has {} of the {want} bytes asked for", body.len()),
        });
    }
    Ok(body)
}

/// `Content-Range: bytes S-E/T` -> (S, E, T).
fn parse_content_range(h: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    parse_content_range_str(h.get(CONTENT_RANGE)?.to_str().ok()?)
}

fn parse_content_range_str(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (s, e) = span.split_once('-')?;
    let (s, e): (u64, u64) = (s.trim().parse().ok()?, e.trim().parse().ok()?);
    if e < s {
        return None;
    }
    Some((s, e, total.trim().parse().ok()))
}

fn sniff_media_type(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    if let Some(mt) = v["mediaType"].as_str() {
        return mt.to_string();
    }
    if v["manifests"].is_array() {
        media_types::OCI_INDEX.to_string()
    } else {
        media_types::OCI_MANIFEST.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range_str("bytes 5-9/10"),
            Some((5, 9, Some(10)))
        );
        assert_eq!(parse_content_range_str("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range_str("bytes 9-5/10"), None);
    }
}
