//! OCI image data types and OCI image layouts on disk.
//!
//! Plain serde types for descriptors, manifests, indexes and image configs that keep every
//! field they do not know (so rewriting one field never drops another), and [`OciLayout`],
//! an OCI image layout directory (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) with
//! atomic, digest-checked blob writes.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256, Sha512};

/// Media types used in images.
pub mod media_types {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// Uncompressed OCI layer.
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    /// gzip-compressed OCI layer (eStargz layers use this).
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// zstd-compressed OCI layer.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// Non-distributable gzip OCI layer.
    pub const OCI_LAYER_NONDIST_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker gzip layer.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Docker foreign gzip layer.
    pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

    /// Whether `mt` is an image manifest.
    pub fn is_manifest(mt: &str) -> bool {
        mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
    }

    /// Whether `mt` is an image index or manifest list.
    pub fn is_index(mt: &str) -> bool {
        mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST
    }

    /// Whether `mt` is a filesystem layer (tar, compressed or not).
    pub fn is_layer(mt: &str) -> bool {
        is_gzip_layer(mt)
            || is_uncompressed_layer(mt)
            || mt == OCI_LAYER_ZSTD
            || mt.starts_with("application/vnd.oci.image.layer.")
    }

    /// Whether `mt` is a gzip-compressed layer.
    pub fn is_gzip_layer(mt: &str) -> bool {
        matches!(
            mt,
            OCI_LAYER_GZIP | OCI_LAYER_NONDIST_GZIP | DOCKER_LAYER_GZIP | DOCKER_LAYER_FOREIGN_GZIP
        )
    }

    /// Whether `mt` is an uncompressed layer.
    pub fn is_uncompressed_layer(mt: &str) -> bool {
        mt == OCI_LAYER_TAR || mt == "application/vnd.oci.image.layer.nondistributable.v1.tar"
    }
}

/// Largest manifest, index or config this crate reads.
pub const MAX_JSON_BLOB: u64 = 8 << 20;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A digest string is malformed.
    #[error("invalid digest {0:?}: expected sha256:<64 hex> or sha512:<128 hex>")]
    BadDigest(String),
    /// A blob's content does not match its digest.
    #[error("blob {digest} in {layout} is corrupt: its content hashes to {actual}")]
    DigestMismatch {
        /// Expected digest.
        digest: String,
        /// Computed digest.
        actual: String,
        /// Layout directory.
        layout: String,
    },
    /// A blob is missing.
    #[error("blob {digest} is not in {layout}")]
    MissingBlob {
        /// Digest looked for.
        digest: String,
        /// Layout directory.
        layout: String,
    },
    /// JSON does not parse as what it should be.
    #[error("{what} is not valid: {source}")]
    Json {
        /// What was parsed.
        what: String,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// A blob is larger than allowed.
    #[error("{what} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// What was read.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The directory is not an OCI layout.
    #[error("{0} is not an OCI image layout (no oci-layout file); create one with skopeo copy or estargz convert")]
    NotALayout(String),
    /// A tag cannot be resolved.
    #[error("{0}")]
    Resolve(String),
    /// The image config is not what was expected.
    #[error("image config: {0}")]
    BadConfig(String),
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// A content digest, `sha256:<64 hex>` (or `sha512:<128 hex>`), always validated.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses and validates a digest.
    pub fn parse(s: &str) -> Result<Digest> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| Error::BadDigest(s.into()))?;
        let len = match alg {
            "sha256" => 64,
            "sha512" => 128,
            _ => return Err(Error::BadDigest(s.into())),
        };
        if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::BadDigest(s.into()));
        }
        Ok(Digest(s.to_string()))
    }

    /// sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest::from_sha256_bytes(Sha256::digest(data).into())
    }

    /// A sha256 digest from its raw bytes.
    pub fn from_sha256_bytes(bytes: [u8; 32]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(bytes)))
    }

    /// The algorithm (`sha256` or `sha512`).
    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map_or("", |(a, _)| a)
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, h)| h)
    }

    /// The whole digest string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Digest> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Hashes content for a digest of either algorithm.
enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    fn for_digest(d: &Digest) -> Hasher {
        if d.algorithm() == "sha512" {
            Hasher::Sha512(Sha512::new())
        } else {
            Hasher::Sha256(Sha256::new())
        }
    }
    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }
    fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::from_sha256_bytes(h.finalize().into()),
            Hasher::Sha512(h) => Digest(format!("sha512:{}", hex::encode(h.finalize()))),
        }
    }
}

/// The platform an image runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v8`, `v7`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// OS version (Windows).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// OS features.
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
}

impl Platform {
    /// The platform of this machine, in OCI terms.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            "mips64" if cfg!(target_endian = "little") => "mips64le",
            "loongarch64" => "loong64",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
            variant: (architecture == "arm64").then(|| "v8".to_string()),
            os_version: None,
            os_features: None,
        }
    }

    /// Whether an image for `other` runs on `self`: same OS and architecture, and the same
    /// variant when both name one.
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

type Extra = serde_json::Map<String, serde_json::Value>;

/// A content descriptor: what a blob is, its digest and size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the blob.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Digest of the blob.
    pub digest: Digest,
    /// Size of the blob.
    pub size: u64,
    /// Alternative download locations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Platform (in indexes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Artifact type.
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    /// Fields this crate does not know, kept as they are.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Descriptor {
    /// A descriptor with only media type, digest and size.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: None,
            annotations: None,
            platform: None,
            artifact_type: None,
            extra: Extra::new(),
        }
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Media type, when stated.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Artifact type.
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    /// The image config.
    pub config: Descriptor,
    /// Layers, base first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Subject (referrers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// An image index or manifest list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Media type, when stated.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Artifact type.
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    /// The manifests (or nested indexes).
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// Subject (referrers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

macro_rules! json_blob {
    ($t:ty, $what:literal) => {
        impl $t {
            /// Parses JSON.
            pub fn from_slice(data: &[u8]) -> Result<Self> {
                serde_json::from_slice(data).map_err(|source| Error::Json {
                    what: $what.into(),
                    source,
                })
            }

            /// Serializes to compact JSON.
            pub fn to_vec(&self) -> Vec<u8> {
                // Serializing plain data with string keys cannot fail.
                serde_json::to_vec(self).unwrap_or_default()
            }
        }
    };
}

json_blob!(Manifest, "image manifest");
json_blob!(Index, "image index");

impl Index {
    /// An empty OCI index.
    pub fn empty() -> Index {
        Index {
            schema_version: 2,
            media_type: Some(media_types::OCI_INDEX.to_string()),
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: None,
            extra: Extra::new(),
        }
    }
}

/// An image config, kept as JSON so that every field survives a rewrite.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    /// The whole config.
    pub raw: serde_json::Value,
}

impl ImageConfig {
    /// Parses a config.
    pub fn from_slice(data: &[u8]) -> Result<ImageConfig> {
        let raw: serde_json::Value =
            serde_json::from_slice(data).map_err(|source| Error::Json {
                what: "image config".into(),
                source,
            })?;
        if !raw.is_object() {
            return Err(Error::BadConfig("not a JSON object".into()));
        }
        Ok(ImageConfig { raw })
    }

    /// Serializes to compact JSON.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(&self.raw).unwrap_or_default()
    }

    /// `rootfs.diff_ids`.
    pub fn diff_ids(&self) -> Result<Vec<Digest>> {
        let ids = self.raw["rootfs"]["diff_ids"]
            .as_array()
            .ok_or_else(|| Error::BadConfig("no rootfs.diff_ids".into()))?;
        ids.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Error::BadConfig("a diff_id is not a string".into()))
                    .and_then(Digest::parse)
            })
            .collect()
    }

    /// Replaces `rootfs.diff_ids`.
    pub fn set_diff_ids(&mut self, ids: &[Digest]) {
        let list = serde_json::Value::Array(
            ids.iter()
                .map(|d| serde_json::Value::String(d.to_string()))
                .collect(),
        );
        if !self.raw["rootfs"].is_object() {
            self.raw["rootfs"] = serde_json::json!({"type": "layers"});
        }
        self.raw["rootfs"]["diff_ids"] = list;
    }

    /// The platform the config declares.
    pub fn platform(&self) -> Platform {
        let s = |k: &str| self.raw[k].as_str().map(String::from);
        Platform {
            architecture: s("architecture").unwrap_or_default(),
            os: s("os").unwrap_or_default(),
            variant: s("variant"),
            os_version: s("os.version"),
            os_features: self.raw["os.features"].as_array().map(|features| {
                features
                    .iter()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect()
            }),
        }
    }
}

/// Parses `oci:DIR` or `oci:DIR:TAG`; `None` without the `oci:` prefix.
pub fn parse_layout_ref(s: &str) -> Option<(PathBuf, Option<String>)> {
    let rest = s.strip_prefix("oci:")?;
    if let Some((dir, tag)) = rest.rsplit_once(':') {
        if !tag.is_empty() && !tag.contains('/') && !dir.is_empty() {
            return Some((PathBuf::from(dir), Some(tag.to_string())));
        }
    }
    Some((PathBuf::from(rest), None))
}

/// Annotation naming an image in a layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

impl OciLayout {
    /// Opens an existing layout.
    pub fn open(dir: impl AsRef<Path>) -> Result<OciLayout> {
        let root = dir.as_ref().to_path_buf();
        if !root.join("oci-layout").is_file() {
            return Err(Error::NotALayout(root.display().to_string()));
        }
        Ok(OciLayout { root })
    }

    /// Creates a layout (or opens an existing one).
    pub fn create(dir: impl AsRef<Path>) -> Result<OciLayout> {
        let root = dir.as_ref().to_path_buf();
        let blobs = root.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err(format!("creating {}", blobs.display())))?;
        let marker = root.join("oci-layout");
        if !marker.exists() {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let layout = OciLayout { root };
        if !layout.root.join("index.json").exists() {
            layout.write_index(&Index::empty())?;
        }
        Ok(layout)
    }

    /// Opens a layout, creating it if the directory holds none.
    pub fn open_or_create(dir: impl AsRef<Path>) -> Result<OciLayout> {
        match OciLayout::open(&dir) {
            Ok(l) => Ok(l),
            Err(Error::NotALayout(_)) => OciLayout::create(dir),
            Err(e) => Err(e),
        }
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn name(&self) -> String {
        self.root.display().to_string()
    }

    /// Reads `index.json`.
    pub fn read_index(&self) -> Result<Index> {
        let path = self.root.join("index.json");
        let data = fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
        Index::from_slice(&data).map_err(|e| relabel(e, path.display().to_string()))
    }

    /// Replaces `index.json` atomically.
    pub fn write_index(&self, index: &Index) -> Result<()> {
        write_atomic(&self.root.join("index.json"), &index.to_vec())
    }

    /// Where the blob with `digest` lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::MissingBlob {
                    digest: digest.to_string(),
                    layout: self.name(),
                }
            } else {
                Error::Io {
                    context: format!("opening {}", path.display()),
                    source: e,
                }
            }
        })
    }

    /// Reads a whole blob and checks its digest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.read_blob_limited(digest, u64::MAX)
    }

    /// Reads a whole blob of at most `max` bytes and checks its digest.
    pub fn read_blob_limited(&self, digest: &Digest, max: u64) -> Result<Vec<u8>> {
        let mut f = self.open_blob(digest)?;
        let size = f
            .metadata()
            .map_err(io_err(format!("reading blob {digest}")))?
            .len();
        let too_large = |size| Error::TooLarge {
            what: format!("blob {digest} in {}", self.name()),
            size,
            limit: max,
        };
        if size > max {
            return Err(too_large(size));
        }
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        // The file may grow while it is read: never read more than one byte past `max`.
        (&mut f)
            .take(max.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(io_err(format!("reading blob {digest} in {}", self.name())))?;
        if data.len() as u64 > max {
            return Err(too_large(data.len() as u64));
        }
        let mut h = Hasher::for_digest(digest);
        h.update(&data);
        let actual = h.finish();
        if &actual != digest {
            return Err(Error::DigestMismatch {
                digest: digest.to_string(),
                actual: actual.to_string(),
                layout: self.name(),
            });
        }
        Ok(data)
    }

    /// Stores `data` as a blob (idempotent); returns its sha256 digest and size.
    pub fn write_blob(&self, data: &[u8]) -> Result<(Digest, u64)> {
        let digest = Digest::sha256_of(data);
        if !self.has_blob(&digest) {
            let mut w = self.blob_writer()?;
            w.write_all(data)
                .map_err(io_err(format!("writing blob {digest}")))?;
            w.commit()?;
        }
        Ok((digest, data.len() as u64))
    }

    /// A writer for a new blob; [`BlobWriter::commit`] puts it in place under its digest.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let dir = self.root.join("blobs").join("sha256");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let file = tempfile::Builder::new()
            .prefix(".tmp-blob-")
            .tempfile_in(&dir)
            .map_err(io_err(format!(
                "creating a temporary blob in {}",
                dir.display()
            )))?;
        Ok(BlobWriter {
            file,
            hasher: Sha256::new(),
            size: 0,
            dir,
        })
    }

    /// Moves (or copies) a file into the layout as a blob, checking `expected` if given.
    pub fn import_blob_file(
        &self,
        path: &Path,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64)> {
        let mut src = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
        let mut w = self.blob_writer()?;
        // A sha256 expectation is checked against the writer's own hash; any other
        // algorithm gets a hasher of its own.
        let mut other = expected
            .filter(|e| e.algorithm() != "sha256")
            .map(Hasher::for_digest);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::Io {
                        context: format!("reading {}", path.display()),
                        source: e,
                    })
                }
            };
            if let Some(h) = &mut other {
                h.update(&buf[..n]);
            }
            w.write_all(&buf[..n]).map_err(io_err(format!(
                "copying {} into {}",
                path.display(),
                self.name()
            )))?;
        }
        let size = w.size;
        let digest = Digest::from_sha256_bytes(w.hasher.clone().finalize().into());
        if let Some(e) = expected {
            let actual = other.map_or_else(|| digest.clone(), Hasher::finish);
            if e != &actual {
                return Err(Error::DigestMismatch {
                    digest: e.to_string(),
                    actual: actual.to_string(),
                    layout: path.display().to_string(),
                });
            }
        }
        if self.has_blob(&digest) {
            return Ok((digest, size));
        }
        w.commit()
    }

    /// The descriptor tagged `tag`, or with `None` the layout's only image.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor> {
        let index = self.read_index()?;
        let tags: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|m| m.annotations.as_ref()?.get(REF_NAME_ANNOTATION).cloned())
            .collect();
        match tag {
            Some(t) => index
                .manifests
                .into_iter()
                .find(|m| {
                    m.annotations
                        .as_ref()
                        .and_then(|a| a.get(REF_NAME_ANNOTATION))
                        .is_some_and(|n| n == t)
                })
                .ok_or_else(|| {
                    Error::Resolve(format!(
                        "no image tagged {t:?} in {} (tags: {})",
                        self.name(),
                        if tags.is_empty() {
                            "none".into()
                        } else {
                            tags.join(", ")
                        }
                    ))
                }),
            None => {
                let n = index.manifests.len();
                let mut entries = index.manifests.into_iter();
                match (entries.next(), n) {
                    (Some(only), 1) => Ok(only),
                    (None, _) => Err(Error::Resolve(format!("{} holds no image", self.name()))),
                    _ => Err(Error::Resolve(format!(
                        "{} holds {n} images; name one as oci:DIR:TAG (tags: {})",
                        self.name(),
                        if tags.is_empty() {
                            "none".into()
                        } else {
                            tags.join(", ")
                        }
                    ))),
                }
            }
        }
    }

    /// Adds `desc` to `index.json` under `tag` (setting its
    /// [`REF_NAME_ANNOTATION`]), replacing in place the entry that had that tag and keeping
    /// every other entry. With `None`, `desc` is added untagged, replacing an untagged entry
    /// with the same digest.
    pub fn set_tag(&self, tag: Option<&str>, mut desc: Descriptor) -> Result<()> {
        let mut index = self.read_index()?;
        if let Some(t) = tag {
            desc.annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(REF_NAME_ANNOTATION.into(), t.into());
        }
        let digest = desc.digest.clone();
        let replaces = |m: &Descriptor| {
            let name = m
                .annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME_ANNOTATION));
            match tag {
                Some(t) => name.is_some_and(|n| n == t),
                None => name.is_none() && m.digest == digest,
            }
        };
        let mut new = Some(desc);
        let mut manifests = Vec::with_capacity(index.manifests.len() + 1);
        for m in index.manifests.drain(..) {
            if !replaces(&m) {
                manifests.push(m);
            } else if let Some(d) = new.take() {
                // The first entry replaced keeps its place; later duplicates go.
                manifests.push(d);
            }
        }
        manifests.extend(new);
        index.manifests = manifests;
        self.write_index(&index)
    }

    /// Reads a manifest blob (at most [`MAX_JSON_BLOB`] bytes, digest checked).
    pub fn read_manifest(&self, desc: &Descriptor) -> Result<Manifest> {
        let data = self.read_blob_limited(&desc.digest, MAX_JSON_BLOB)?;
        Manifest::from_slice(&data).map_err(|e| relabel(e, self.blob_label("manifest", desc)))
    }

    /// Reads an index blob (at most [`MAX_JSON_BLOB`] bytes, digest checked).
    pub fn read_index_blob(&self, desc: &Descriptor) -> Result<Index> {
        let data = self.read_blob_limited(&desc.digest, MAX_JSON_BLOB)?;
        Index::from_slice(&data).map_err(|e| relabel(e, self.blob_label("index", desc)))
    }

    /// Reads a config blob (at most [`MAX_JSON_BLOB`] bytes, digest checked).
    pub fn read_config(&self, desc: &Descriptor) -> Result<ImageConfig> {
        let data = self.read_blob_limited(&desc.digest, MAX_JSON_BLOB)?;
        ImageConfig::from_slice(&data).map_err(|e| relabel(e, self.blob_label("config", desc)))
    }

    fn blob_label(&self, kind: &str, desc: &Descriptor) -> String {
        format!("image {kind} {} in {}", desc.digest, self.name())
    }
}

/// Puts `what` (where the JSON came from) into a parse error.
fn relabel(e: Error, what: String) -> Error {
    match e {
        Error::Json { source, .. } => Error::Json { what, source },
        Error::BadConfig(msg) => Error::BadConfig(format!("{what}: {msg}")),
        other => other,
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("syncing {}", dir.display())))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(format!(
        "creating a temporary file in {}",
        dir.display()
    )))?;
    tmp.write_all(data)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(io_err(format!("writing {}", path.display())))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .map_err(io_err(format!("replacing {}", path.display())))?;
    sync_dir(dir)
}

/// A blob being written into a layout; dropped without [`commit`](Self::commit) it vanishes.
pub struct BlobWriter {
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    size: u64,
    dir: PathBuf,
}

impl BlobWriter {
    /// Syncs the blob and moves it into place; returns its digest and size.
    pub fn commit(self) -> Result<(Digest, u64)> {
        let digest = Digest::from_sha256_bytes(self.hasher.finalize().into());
        self.file
            .as_file()
            .sync_all()
            .map_err(io_err(format!("syncing blob {digest}")))?;
        let path = self.dir.join(digest.hex());
        self.file
            .persist(&path)
            .map_err(|e| e.error)
            .map_err(io_err(format!("storing blob {}", path.display())))?;
        sync_dir(&self.dir)?;
        Ok((digest, self.size))
    }

    /// How many bytes have been written so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobWriter")
            .field("path", &self.file.path())
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests;
