//! The CRI image-service proxy: kubelet's image endpoint (`--image-service-endpoint`) in
//! front of containerd's CRI plugin, so that the credentials kubelet sends with a pod's
//! `PullImage` (its image pull secret) reach the daemon; containerd alone never passes
//! them to a snapshotter.
//!
//! Every call of `runtime.v1.ImageService` is forwarded to containerd byte for byte (a
//! pass-through codec: nothing is decoded and re-encoded, so fields this project does not
//! know survive); `PullImage` requests are also decoded, read-only, for the image and its
//! credentials, which are recorded in the node's pull-secrets file for the image's
//! registry before the call goes on (containerd mounts the layers during the pull). The
//! credentials are never logged.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, BufMut, Bytes};
use estargz_api::cri::{AuthConfig, PullImageRequest};
use estargz_registry::{Credential, ImageRef, PullSecrets};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// gRPC service name the proxy answers for.
const SERVICE: &str = "runtime.v1.ImageService";

/// Messages as they are on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The proxy: a tonic service for every method of the image service.
#[derive(Clone)]
pub struct ImageServiceProxy {
    containerd: Channel,
    secrets: Arc<PullSecrets>,
    ttl: Duration,
}

impl tonic::server::NamedService for ImageServiceProxy {
    const NAME: &'static str = SERVICE;
}

impl ImageServiceProxy {
    /// A proxy to containerd at `containerd_socket` (connected on first use, and again
    /// after containerd restarts), recording credentials in `secrets` for `ttl`.
    pub fn new(containerd_socket: &Path, secrets: PullSecrets, ttl: Duration) -> ImageServiceProxy {
        let containerd = tonic::transport::Endpoint::from_static("http://[::]:0")
            .connect_with_connector_lazy(crate::access::unix_connector(
                containerd_socket.to_path_buf(),
            ));
        ImageServiceProxy {
            containerd,
            secrets: Arc::new(secrets),
            ttl,
        }
    }

    /// Records the credentials of a `PullImage` request, if it carries any.
    fn record(&self, body: &[u8]) {
        let Ok(pull) = PullImageRequest::decode(body) else {
            return;
        };
        let (Some(image), Some(auth)) = (pull.image, pull.auth) else {
            return;
        };
        let Ok(image) = image.image.parse::<ImageRef>() else {
            tracing::debug!(image = %image.image, "PullImage of an image reference we cannot parse");
            return;
        };
        let Some(cred) = credential(&auth) else {
            return;
        };
        match self.secrets.record(&image.registry, &cred, self.ttl) {
            Ok(()) => tracing::info!(registry = %image.registry, image = %image,
                ttl_secs = self.ttl.as_secs(), "pull secret recorded for lazy pulls"),
            Err(e) => tracing::warn!(registry = %image.registry, error = %e,
                file = %self.secrets.path().display(), "recording a pull secret failed"),
        }
    }
}

/// The credential a CRI `AuthConfig` gives, in the order kubelet fills it.
fn credential(auth: &AuthConfig) -> Option<Credential> {
    if !auth.identity_token.is_empty() {
        return Some(Credential::IdentityToken(auth.identity_token.clone()));
    }
    if !auth.username.is_empty() {
        return Some(Credential::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (u, p) = text.split_once(':')?;
        return Some(Credential::Basic {
            username: u.to_string(),
            password: p.to_string(),
        });
    }
    // A registry token (bearer) cannot be refreshed by us: containerd uses it for the pull;
    // lazy fetches of that registry then go without credentials.
    None
}

/// One forwarded call.
struct Forward {
    proxy: ImageServiceProxy,
    path: http::uri::PathAndQuery,
}

impl tonic::server::UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Bytes>, Status>> + Send>,
    >;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (proxy, path) = (self.proxy.clone(), self.path.clone());
        Box::pin(async move {
            if path.path() == format!("/{SERVICE}/PullImage") {
                proxy.record(request.get_ref());
            }
            let (metadata, _, body) = request.into_parts();
            let mut client = tonic::client::Grpc::new(proxy.containerd.clone());
            client
                .ready()
                .await
                .map_err(|e| Status::unavailable(format!("containerd: {e}")))?;
            client
                .unary(
                    Request::from_parts(metadata, Default::default(), body),
                    path,
                    RawCodec,
                )
                .await
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for ImageServiceProxy {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let proxy = self.clone();
        Box::pin(async move {
            let path = match request.uri().path_and_query() {
                Some(p) => p.clone(),
                None => {
                    return Ok(Status::invalid_argument("no method path").into_http());
                }
            };
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(Forward { proxy, path }, request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_every_auth_config_form() {
        // Credential's Debug hides secrets: compare what matters as plain tuples.
        let plain = |c: Option<Credential>| match c {
            Some(Credential::Basic { username, password }) => Some(("basic", username, password)),
            Some(Credential::IdentityToken(t)) => Some(("token", t, String::new())),
            None => None,
        };
        let basic = |u: &str, p: &str| Some(("basic", u.to_string(), p.to_string()));
        let user = AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        assert_eq!(plain(credential(&user)), basic("u", "p"));
        let encoded = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("u2:p:2"),
            ..Default::default()
        };
        assert_eq!(plain(credential(&encoded)), basic("u2", "p:2"));
        let token = AuthConfig {
            identity_token: "t".into(),
            username: "u".into(),
            ..Default::default()
        };
        assert_eq!(
            plain(credential(&token)),
            Some(("token", "t".into(), String::new()))
        );
        let bearer = AuthConfig {
            registry_token: "b".into(),
            ..Default::default()
        };
        assert_eq!(plain(credential(&bearer)), None);
        assert_eq!(plain(credential(&AuthConfig::default())), None);
    }
}
