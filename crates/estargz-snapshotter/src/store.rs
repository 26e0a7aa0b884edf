//! Durable snapshot metadata in an embedded transactional store (redb).
//!
//! Every change is one write transaction, committed with an fsync before the call returns,
//! so a SIGKILL at any moment leaves either the old or the new state. Directories on disk
//! are created before the record that names them and deleted after it, so the store never
//! names a missing directory; directories without a record are removed by `Cleanup`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::Error;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a parent.
    View,
    /// Writable, not yet committed.
    Active,
    /// Immutable; may be a parent.
    Committed,
}

impl Kind {
    /// containerd's name for the kind (as in filters).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// A point in time, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    /// Seconds since the epoch.
    pub secs: i64,
    /// Nanoseconds.
    pub nanos: i32,
}

impl Time {
    /// Now.
    pub fn now() -> Time {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    }
}

/// Disk usage of a snapshot's own directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes (allocated blocks).
    pub size: i64,
    /// Inodes.
    pub inodes: i64,
}

/// The layer behind a lazily mounted (remote) snapshot: enough to mount it again after a
/// restart without the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// Image reference the layer was pulled for (stored as its normalized string).
    pub reference: estargz_registry::ImageRef,
    /// Layer blob digest.
    pub digest: estargz_oci::Digest,
    /// Blob size in bytes.
    pub size: u64,
    /// sha256 of the TOC JSON (verified, or computed when unverified layers are allowed).
    pub toc_digest: estargz_format::Sha256Digest,
    /// Offset of the TOC member in the blob.
    pub toc_offset: u64,
}

/// One snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Directory id under `snapshots/`.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Parent key (a committed snapshot), or empty.
    pub parent: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created: Time,
    /// Last update.
    pub updated: Time,
    /// Usage, measured at commit (committed snapshots only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Set for lazily mounted layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLayer>,
}

/// The metadata store.
pub struct Store {
    db: Database,
}

fn db_err(e: impl Into<redb::Error>) -> Error {
    Error::store("database", e.into())
}

fn decode(key: &str, bytes: &[u8]) -> Result<Snapshot, Error> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::store(format!("record of {key:?} is unreadable"), e))
}

/// A write transaction's view of the snapshots table.
pub struct Txn<'a> {
    table: redb::Table<'a, &'static str, &'static [u8]>,
    counters: redb::Table<'a, &'static str, u64>,
}

impl Txn<'_> {
    /// One snapshot.
    pub fn get(&self, key: &str) -> Result<Option<Snapshot>, Error> {
        match self.table.get(key).map_err(db_err)? {
            Some(v) => decode(key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Creates or replaces a record.
    pub fn put(&mut self, key: &str, s: &Snapshot) -> Result<(), Error> {
        let bytes =
            serde_json::to_vec(s).map_err(|e| Error::store(format!("encoding {key:?}"), e))?;
        self.table.insert(key, bytes.as_slice()).map_err(db_err)?;
        Ok(())
    }

    /// Deletes a record.
    pub fn delete(&mut self, key: &str) -> Result<(), Error> {
        self.table.remove(key).map_err(db_err)?;
        Ok(())
    }

    /// A fresh directory id.
    pub fn next_id(&mut self) -> Result<u64, Error> {
        let id = self
            .counters
            .get(NEXT_ID)
            .map_err(db_err)?
            .map_or(1, |v| v.value());
        self.counters.insert(NEXT_ID, id + 1).map_err(db_err)?;
        Ok(id)
    }

    /// Whether any snapshot has `key` as its parent.
    pub fn has_children(&self, key: &str) -> Result<bool, Error> {
        for item in self.table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            if decode(k.value(), v.value())?.parent == key {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, Error> {
        let db = Database::create(path).map_err(|e| {
            Error::store(
                format!(
                    "opening {} (is another estargz-snapshotter using this root?)",
                    path.display()
                ),
                e,
            )
        })?;
        let store = Store { db };
        store.update(|_| Ok(()))?;
        Ok(store)
    }

    /// Runs `f` in one write transaction, committed (durably) if it returns `Ok`.
    pub fn update<T>(&self, f: impl FnOnce(&mut Txn) -> Result<T, Error>) -> Result<T, Error> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let out = {
            let mut txn = Txn {
                table: tx.open_table(SNAPSHOTS).map_err(db_err)?,
                counters: tx.open_table(COUNTERS).map_err(db_err)?,
            };
            f(&mut txn)?
        };
        tx.commit().map_err(db_err)?;
        Ok(out)
    }

    /// One snapshot.
    pub fn get(&self, key: &str) -> Result<Option<Snapshot>, Error> {
        let rx = self.db.begin_read().map_err(db_err)?;
        let table = rx.open_table(SNAPSHOTS).map_err(db_err)?;
        let value = table.get(key).map_err(db_err)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    /// Every snapshot, by key.
    pub fn all(&self) -> Result<Vec<(String, Snapshot)>, Error> {
        let rx = self.db.begin_read().map_err(db_err)?;
        let table = rx.open_table(SNAPSHOTS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64, parent: &str) -> Snapshot {
        Snapshot {
            id,
            kind: Kind::Committed,
            parent: parent.into(),
            labels: BTreeMap::from([("a".into(), "b".into())]),
            created: Time::now(),
            updated: Time::now(),
            usage: None,
            remote: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_failed_transactions_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        {
            let store = Store::open(&path).unwrap();
            store
                .update(|t| {
                    let id = t.next_id()?;
                    t.put("base", &snap(id, ""))?;
                    let id = t.next_id()?;
                    t.put("child", &snap(id, "base"))
                })
                .unwrap();
            let failed: Result<(), Error> = store.update(|t| {
                t.put("ghost", &snap(99, ""))?;
                Err(Error::InvalidArgument("abandon".into()))
            });
            assert!(failed.is_err());
        }
        let store = Store::open(&path).unwrap();
        let all = store.all().unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(store.get("child").unwrap().unwrap().parent, "base");
        assert!(store.get("ghost").unwrap().is_none());
        let (has, id) = store
            .update(|t| Ok((t.has_children("base")?, t.next_id()?)))
            .unwrap();
        assert!(has);
        assert_eq!(id, 3, "ids are never reused");
    }
}
