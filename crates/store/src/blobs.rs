//! Content-addressed blobs: each file is named by the blake3 hash of its bytes, written
//! to a temporary file, fsynced, renamed into place, and its directory fsynced, so a blob
//! that a row names is on disk before the row is committed.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// A blob's name: the lowercase hex blake3 hash of its bytes.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct BlobHash(String);

impl BlobHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> BlobHash {
        BlobHash(blake3::hash(bytes).to_hex().to_string())
    }

    /// Parses 64 lowercase hex digits (what the HTTP edge receives).
    pub fn parse(hex: &str) -> Option<BlobHash> {
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| BlobHash(hex.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BlobHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The blob directory.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    pub(crate) fn open(dir: PathBuf) -> Result<Blobs, StoreError> {
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Blobs { dir })
    }

    fn path(&self, hash: &BlobHash) -> PathBuf {
        self.dir.join(&hash.0[..2]).join(&hash.0)
    }

    /// Writes `bytes` durably (a no-op when the blob exists) and returns its hash.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobHash, StoreError> {
        let hash = BlobHash::of(bytes);
        let path = self.path(&hash);
        if path.exists() {
            return Ok(hash);
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let dir = path.parent().unwrap_or(&self.dir).to_owned();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let tmp = dir.join(format!("{}.tmp", hash.0));
        let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&dir)?;
        Ok(hash)
    }

    /// Reads a blob and checks its bytes against its name.
    pub fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, StoreError> {
        let path = self.path(hash);
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        if BlobHash::of(&bytes) != *hash {
            return Err(StoreError::CorruptBlob { path });
        }
        Ok(bytes)
    }

    /// Whether a blob is present.
    pub fn contains(&self, hash: &BlobHash) -> bool {
        self.path(hash).exists()
    }

    /// Number of blobs on disk (for tests and status).
    pub fn count(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            if entry.path().is_dir() {
                for file in std::fs::read_dir(entry.path()).map_err(io(&entry.path()))? {
                    let file = file.map_err(io(&entry.path()))?;
                    if !file.file_name().to_string_lossy().ends_with(".tmp") {
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }
}

/// Makes a rename inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })
}
