//! Image references as users write them: `python:3.12`, `docker.io/library/python`,
//! `host:5000/a/b@sha256:...`, normalized the way Docker and containerd do.

use std::fmt;
use std::str::FromStr;

use estargz_oci::Digest;

use crate::error::Error;

/// Registry name Docker Hub images get when none is written.
pub const DOCKER_HUB: &str = "docker.io";
/// Host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry name as written (normalized: `docker.io` for Docker Hub), with port.
    pub registry: String,
    /// Repository path, e.g. `library/python`.
    pub repository: String,
    /// Tag, when given (or `latest` when neither tag nor digest was given).
    pub tag: Option<String>,
    /// Digest, when given.
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// What to ask the registry for: the digest when known, else the tag.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The host that serves this registry's API (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// The same repository with another tag or digest.
    pub fn with_reference(&self, reference: &str) -> ImageRef {
        let mut r = self.clone();
        match Digest::parse(reference) {
            Ok(d) => {
                r.digest = Some(d);
                r.tag = None;
            }
            Err(_) => {
                r.digest = None;
                r.tag = Some(reference.to_string());
            }
        }
        r
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn bad(input: &str, why: &str) -> Error {
    Error::InvalidReference {
        reference: input.chars().take(300).collect(),
        reason: why.to_string(),
    }
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+ separated by '.', '_', '__' or runs of '-'.
    if c.is_empty() || c.len() > 255 {
        return false;
    }
    let b = c.as_bytes();
    if !b[0].is_ascii_lowercase() && !b[0].is_ascii_digit() {
        return false;
    }
    let last = b[b.len() - 1];
    if !last.is_ascii_lowercase() && !last.is_ascii_digit() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'a'..=b'z' | b'0'..=b'9' => i += 1,
            b'.' | b'_' | b'-' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
                    i += 1;
                }
                let sep = &c[start..i];
                if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

fn valid_domain(d: &str) -> bool {
    let host = match d.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || d.starts_with('[') => {
            if !port.bytes().all(|b| b.is_ascii_digit()) || port.is_empty() {
                return false;
            }
            h
        }
        _ => d,
    };
    if host.starts_with('[') {
        return host.ends_with(']') && host.len() > 2;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl serde::Serialize for ImageRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ImageRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<ImageRef, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for ImageRef {
    type Err = Error;

    fn from_str(input: &str) -> Result<ImageRef, Error> {
        let s = input.trim();
        if s.is_empty() {
            return Err(bad(input, "empty reference"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(Digest::parse(d).map_err(|_| bad(input, "the digest after @ is invalid"))?),
            ),
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !ok {
                return Err(bad(input, "invalid tag"));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_domain(first) {
                    return Err(bad(input, "invalid registry host"));
                }
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" || registry == DOCKER_HUB_API_HOST {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad(input, "repository names must be lowercase"));
        }
        if !path.split('/').all(valid_component) {
            return Err(bad(input, "invalid repository name"));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if repository.len() > 255 {
            return Err(bad(input, "repository name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ImageRef {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn normalizes_like_docker() {
        assert_eq!(
            p("python:3.12").to_string(),
            "docker.io/library/python:3.12"
        );
        assert_eq!(p("python").to_string(), "docker.io/library/python:latest");
        assert_eq!(p("docker.io/library/python").repository, "library/python");
        assert_eq!(
            p("index.docker.io/foo/bar").to_string(),
            "docker.io/foo/bar:latest"
        );
        assert_eq!(p("foo/bar:1").to_string(), "docker.io/foo/bar:1");
        assert_eq!(p("python").api_host(), "registry-1.docker.io");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = p(&format!("127.0.0.1:5000/a/b@{d}"));
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), d);
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        let r = p(&format!("localhost/x:t@{d}"));
        assert_eq!(
            (r.registry.as_str(), r.tag.as_deref()),
            ("localhost", Some("t"))
        );
        assert_eq!(
            p("ghcr.io/o/r/deep/path:v1.2-rc_3").repository,
            "o/r/deep/path"
        );
        assert_eq!(p("[::1]:5000/x:1").registry, "[::1]:5000");
        assert_eq!(p("a/b").with_reference("v2").tag.as_deref(), Some("v2"));
    }

    #[test]
    fn serialized_as_the_normalized_string() {
        for r in ["python:3.12", "127.0.0.1:5000/a/b@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"] {
            let json = serde_json::to_string(&p(r)).unwrap();
            assert_eq!(json, format!("\"{}\"", p(r)));
            assert_eq!(serde_json::from_str::<ImageRef>(&json).unwrap(), p(r));
        }
        assert!(serde_json::from_str::<ImageRef>("\"UPPER/case\"").is_err());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "Python",
            "foo/Bar",
            "foo:",
            "foo:-x",
            "a//b",
            "-a/b",
            "a/b-",
            "foo@sha256:12",
            "host:port/x",
            "foo/../bar",
            "a/b:tag with space",
            "a..b/c",
        ] {
            assert!(
                bad.parse::<ImageRef>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
