//! Credentials that arrive while a node runs: the image pull secrets kubelet sends with a
//! pod's `PullImage`, recorded by the daemon's CRI proxy.
//!
//! They live in one file (mode 0600, in the daemon's private state directory) rather than
//! in memory: every process that fetches for a node reads them (the daemon resolving
//! layers, the FUSE manager fetching chunks), and a daemon restarted while the pod runs
//! still has them (the reference snapshotter loses them). Each entry expires a set time
//! after the last pull that carried it; expired entries are neither used nor kept.
//! Readers re-read the file when it changes, so a new secret takes effect at once.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::auth::Credential;

/// The pull-secrets file of a node; cheap to share.
#[derive(Debug)]
pub struct PullSecrets {
    path: PathBuf,
    /// The file's contents as last read, with its modification time.
    read: Mutex<Option<(SystemTime, Entries)>>,
}

type Entries = BTreeMap<String, Entry>;

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity_token: Option<String>,
    /// Seconds since the epoch after which the entry is not used.
    expires: u64,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entry {{ expires: {}, .. }}", self.expires)
    }
}

impl Entry {
    fn credential(&self) -> Option<Credential> {
        match (&self.username, &self.password, &self.identity_token) {
            (_, _, Some(t)) => Some(Credential::IdentityToken(t.clone())),
            (Some(u), Some(p), None) => Some(Credential::Basic {
                username: u.clone(),
                password: p.clone(),
            }),
            _ => None,
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PullSecrets {
    /// The store at `path` (the file need not exist yet).
    pub fn at(path: impl Into<PathBuf>) -> PullSecrets {
        PullSecrets {
            path: path.into(),
            read: Mutex::new(None),
        }
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The unexpired credential recorded for registry `host`.
    pub fn get(&self, host: &str) -> Option<Credential> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()?;
        let mut read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        if read.as_ref().map(|(t, _)| *t) != Some(mtime) {
            *read = Some((mtime, self.load()));
        }
        let (_, entries) = read.as_ref()?;
        let e = entries.get(host)?;
        (e.expires > now()).then(|| e.credential()).flatten()
    }

    fn load(&self) -> Entries {
        match std::fs::read(&self.path) {
            Ok(data) => serde_json::from_slice(&data).unwrap_or_else(|e| {
                tracing::warn!(file = %self.path.display(), error = %e, "pull secrets unreadable; ignored");
                Entries::new()
            }),
            Err(_) => Entries::new(),
        }
    }

    /// Records `cred` for registry `host`, valid for `ttl` from now (replacing what was
    /// there); drops expired entries. Written to a temporary file (0600) and renamed, so
    /// readers see the old or the new file whole. Only one process (the daemon) records.
    pub fn record(&self, host: &str, cred: &Credential, ttl: Duration) -> std::io::Result<()> {
        let mut entries = self.load();
        let t = now();
        entries.retain(|_, e| e.expires > t);
        let expires = t.saturating_add(ttl.as_secs());
        let entry = match cred {
            Credential::Basic { username, password } => Entry {
                username: Some(username.clone()),
                password: Some(password.clone()),
                identity_token: None,
                expires,
            },
            Credential::IdentityToken(token) => Entry {
                username: None,
                password: None,
                identity_token: Some(token.clone()),
                expires,
            },
        };
        entries.insert(host.to_string(), entry);
        use std::os::unix::fs::OpenOptionsExt;
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(name);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&entries).unwrap_or_default())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str) -> Credential {
        Credential::Basic {
            username: u.into(),
            password: format!("{u}-secret"),
        }
    }

    #[test]
    fn recorded_secrets_are_read_by_another_handle_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pull-secrets.json");
        let (writer, reader) = (PullSecrets::at(&path), PullSecrets::at(&path));
        assert!(reader.get("r.example").is_none());
        writer
            .record("r.example", &basic("alice"), Duration::from_secs(60))
            .unwrap();
        assert!(
            matches!(reader.get("r.example"), Some(Credential::Basic { username, .. }) if username == "alice")
        );
        assert!(reader.get("other.example").is_none());
        // A new secret replaces the old one, and the reader sees it (the file changed).
        std::thread::sleep(Duration::from_millis(20));
        writer
            .record(
                "r.example",
                &Credential::IdentityToken("tok".into()),
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(
            matches!(reader.get("r.example"), Some(Credential::IdentityToken(t)) if t == "tok")
        );
        // Expired entries are neither used nor kept.
        writer
            .record("old.example", &basic("bob"), Duration::ZERO)
            .unwrap();
        assert!(reader.get("old.example").is_none());
        writer
            .record("r.example", &basic("carol"), Duration::from_secs(60))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("bob"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Never in a Debug print.
        let _ = reader.get("r.example");
        assert!(!format!("{reader:?}").contains("carol-secret"));
    }
}
