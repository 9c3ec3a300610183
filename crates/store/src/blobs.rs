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

    /// The name of a 32-byte digest (a content address made by another rule, such as
    /// an update's `protocol::update::stored_address`).
    pub fn from_digest(digest: &[u8; 32]) -> BlobHash {
        BlobHash(blake3::Hash::from_bytes(*digest).to_hex().to_string())
    }

    /// The digest this name spells (`None` only for a name not made by this type).
    pub fn digest(&self) -> Option<[u8; 32]> {
        blake3::Hash::from_hex(&self.0).ok().map(|h| *h.as_bytes())
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

/// A growable byte buffer whose bytes start on a 4 KiB boundary, so that
/// [`Blobs::put_aligned`] can hand it to an `O_DIRECT` write without first copying it
/// into an aligned staging buffer (10 MB: 3 ms). Reused across requests, it also spares
/// the page faults of a fresh allocation. It grows only as bytes are added.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    /// Where the bytes start in `raw` (aligned).
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// An empty buffer with room for exactly `bytes` bytes (and the padding of an aligned
    /// write) in one allocation: filled up to `bytes`, it never grows, so a caller that
    /// refuses input past `bytes` bounds the buffer by it. The memory is zeroed lazily
    /// by the system: pages count towards the process's resident size only once written.
    pub fn with_capacity(bytes: usize) -> AlignedBuf {
        AlignedBuf {
            raw: vec![0u8; bytes.next_multiple_of(DIRECT_ALIGN) + DIRECT_ALIGN],
            start: 0,
            len: 0,
        }
        .aligned()
    }

    /// Bytes the buffer holds without growing.
    pub fn capacity(&self) -> usize {
        // `extend_from_slice` grows when the bytes rounded up to the alignment pass the end.
        self.raw.len().saturating_sub(self.start) / DIRECT_ALIGN * DIRECT_ALIGN
    }

    /// The same buffer with `start` on the alignment boundary of `raw`.
    fn aligned(mut self) -> AlignedBuf {
        self.start = self
            .raw
            .as_ptr()
            .align_offset(DIRECT_ALIGN)
            .min(DIRECT_ALIGN);
        self
    }

    /// Empties the buffer, keeping its memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `data`, growing (at least doubling) when it does not fit.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        let len = self.len + data.len();
        // Room for the bytes and the zero padding an aligned write adds after them.
        if self.start + len.next_multiple_of(DIRECT_ALIGN) > self.raw.len() {
            let size = (len.next_multiple_of(DIRECT_ALIGN) + DIRECT_ALIGN).max(2 * self.raw.len());
            let mut raw = vec![0u8; size];
            let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
            raw[start..start + self.len]
                .copy_from_slice(&self.raw[self.start..self.start + self.len]);
            self.raw = raw;
            self.start = start;
        }
        self.raw[self.start + self.len..self.start + len].copy_from_slice(data);
        self.len = len;
    }

    /// The bytes followed by zeros up to a multiple of the alignment, if they start on
    /// the boundary (`None` where the allocator could not align them).
    fn padded(&mut self) -> Option<&[u8]> {
        let end = self.start + self.len.next_multiple_of(DIRECT_ALIGN);
        self.raw[self.start + self.len..end].fill(0);
        let padded = &self.raw[self.start..end];
        (padded.as_ptr().align_offset(DIRECT_ALIGN) == 0).then_some(padded)
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// What [`Blobs::sweep`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Temporary files of writes a crash cut short.
    pub temporary: u64,
    /// Blobs no row names.
    pub orphans: u64,
    /// Their bytes.
    pub bytes: u64,
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
        self.put_as(bytes, &hash)?;
        Ok(hash)
    }

    /// Writes `bytes` durably under `hash`, a content address the caller computed by a
    /// rule of its own that commits to every byte (a no-op when the blob exists). Read
    /// such a blob back with [`Blobs::get_checked`] and the same rule.
    pub fn put_as(&self, bytes: &[u8], hash: &BlobHash) -> Result<(), StoreError> {
        self.put_with(hash, |tmp| write_durably(tmp, bytes))
    }

    /// As [`Blobs::put_as`], for bytes received into an [`AlignedBuf`]: a large blob goes
    /// to the disk straight from the buffer.
    pub fn put_aligned(&self, buf: &mut AlignedBuf, hash: &BlobHash) -> Result<(), StoreError> {
        self.put_with(hash, |tmp| {
            let len = buf.len();
            if len >= DIRECT_MIN
                && let Some(padded) = buf.padded()
                && write_direct_padded(tmp, padded, len).is_ok()
            {
                return Ok(());
            }
            write_durably(tmp, buf)
        })
    }

    /// Writes a blob under `hash` with `write` (which must leave the temporary file it
    /// is given complete and fsynced), renames it into place and fsyncs the directory.
    fn put_with(
        &self,
        hash: &BlobHash,
        write: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let path = self.path(hash);
        if path.exists() {
            return Ok(());
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let dir = path.parent().unwrap_or(&self.dir).to_owned();
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            // The new prefix directory's own entry must be as durable as the blob in it.
            sync_dir(&self.dir)?;
        }
        // A name of its own per writer: two requests may write the same blob at once.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{}.{}.{n}.tmp", hash.0, std::process::id()));
        write(&tmp).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&dir)
    }

    /// Reads a blob and checks its bytes against its name.
    pub fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, StoreError> {
        self.get_checked(hash, |bytes| BlobHash::of(bytes) == *hash)
    }

    /// Reads a blob and checks its bytes with `intact` (the rule its name was made by;
    /// see [`Blobs::put_as`]).
    pub fn get_checked(
        &self,
        hash: &BlobHash,
        intact: impl FnOnce(&[u8]) -> bool,
    ) -> Result<Vec<u8>, StoreError> {
        let path = self.path(hash);
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        if !intact(&bytes) {
            return Err(StoreError::CorruptBlob { path });
        }
        Ok(bytes)
    }

    /// Removes a blob no row names (a no-op when it is absent).
    pub fn remove(&self, hash: &BlobHash) -> Result<(), StoreError> {
        let path = self.path(hash);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// The size of a blob in bytes (`None` when it is absent).
    pub fn size(&self, hash: &BlobHash) -> Option<u64> {
        std::fs::metadata(self.path(hash)).ok().map(|m| m.len())
    }

    /// Removes every temporary file (a write a crash cut short) and every blob not in
    /// `keep` (one whose row was never committed, or was let go of before a crash).
    /// Files that are neither, which hivetrain never writes, are left alone. Only for
    /// a caller that holds the run's lock while no blob is being written: a write in
    /// flight is a temporary file, then a blob no row names yet.
    pub fn sweep(&self, keep: &std::collections::HashSet<BlobHash>) -> Result<Swept, StoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let mut swept = Swept::default();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let prefix = entry.path();
            let prefix_name = entry.file_name().to_string_lossy().into_owned();
            if !prefix.is_dir() || prefix_name.len() != 2 {
                continue;
            }
            for file in std::fs::read_dir(&prefix).map_err(io(&prefix))? {
                let file = file.map_err(io(&prefix))?;
                let name = file.file_name().to_string_lossy().into_owned();
                let temporary = name.ends_with(".tmp");
                let orphan = BlobHash::parse(&name)
                    .is_some_and(|h| h.0.starts_with(&prefix_name) && !keep.contains(&h));
                if !(temporary || orphan) {
                    continue;
                }
                let path = file.path();
                let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(StoreError::Io { path, source: e });
                    }
                    _ => {}
                }
                if temporary {
                    swept.temporary += 1;
                } else {
                    swept.orphans += 1;
                }
                swept.bytes += bytes;
            }
        }
        Ok(swept)
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

/// Blobs at least this large skip the page cache.
const DIRECT_MIN: usize = 1 << 20;
/// Alignment (of memory, file offset and length) that `O_DIRECT` asks for.
const DIRECT_ALIGN: usize = 4096;

/// Writes `bytes` to a new file at `path` and fsyncs it. Large blobs are written with
/// `O_DIRECT` where the file system allows it: the disk reads them straight from memory,
/// where a buffered write first copies every byte into the page cache (measured on the
/// development machine: 0.2 ms of CPU for 10 MB against 6 to 20 ms).
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if bytes.len() >= DIRECT_MIN && write_direct(path, bytes).is_ok() {
        return Ok(());
    }
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(target_os = "linux")]
fn write_direct(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    thread_local! {
        /// One staging buffer per thread, reused: a fresh 10 MB buffer costs more in page
        /// faults than the copy into it.
        static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let padded = bytes.len().next_multiple_of(DIRECT_ALIGN);
    STAGING.with_borrow_mut(|staging| {
        if staging.len() < padded + DIRECT_ALIGN {
            *staging = vec![0u8; padded + DIRECT_ALIGN];
        }
        let start = staging.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut staging[start..start + padded];
        aligned[..bytes.len()].copy_from_slice(bytes);
        aligned[bytes.len()..].fill(0);
        write_direct_padded(path, aligned, bytes.len())
    })
}

/// Writes `padded` (aligned in memory, a multiple of the alignment long) with
/// `O_DIRECT`, cuts the file to `len` and fsyncs it.
#[cfg(target_os = "linux")]
fn write_direct_padded(path: &Path, padded: &[u8], len: usize) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    file.write_all(padded)?;
    // Cut the padding the aligned write needed.
    file.set_len(len as u64)?;
    file.sync_all()
}

#[cfg(not(target_os = "linux"))]
fn write_direct(_path: &Path, _bytes: &[u8]) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(not(target_os = "linux"))]
fn write_direct_padded(_path: &Path, _padded: &[u8], _len: usize) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Makes a rename or a new entry inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_made_with_capacity_never_grows_up_to_it() {
        for bytes in [0, 1, 4095, 4096, 10_000, 1 << 20] {
            let mut buf = AlignedBuf::with_capacity(bytes);
            let capacity = buf.capacity();
            assert!(capacity >= bytes, "{bytes}: room for {capacity}");
            assert!(capacity < bytes + 2 * DIRECT_ALIGN, "{bytes}: {capacity}");
            let raw = buf.raw.len();
            buf.extend_from_slice(&vec![7u8; bytes / 2]);
            buf.extend_from_slice(&vec![9u8; bytes - bytes / 2]);
            assert_eq!(
                (buf.len(), buf.raw.len(), buf.capacity()),
                (bytes, raw, capacity)
            );
        }
    }
}
