//! The adapter manifest (`data/adapters/manifest.json`): which exported adapters exist,
//! on which base, where. `hivetrain model export` adds or replaces an entry by name.
//!
//! ```json
//! {"adapters": [{"name": "shakespeare", "base_sha256": "b179...", "version": 12,
//!   "path": "data/adapters/shakespeare", "rank": 16, "alpha": 32.0,
//!   "targets": ["q_proj", "v_proj"], "created": "2026-11-30T21:04:05Z"}]}
//! ```
//!
//! Reading is bounded ([`MANIFEST_BYTES_MAX`], [`MANIFEST_ENTRIES_MAX`]); writing goes
//! through a temporary file and a rename, so a reader sees the old manifest or the new.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest manifest read.
pub const MANIFEST_BYTES_MAX: u64 = 4 << 20;
/// Most entries a manifest holds.
pub const MANIFEST_ENTRIES_MAX: usize = 10_000;
/// Longest adapter name.
pub const NAME_CHARS_MAX: usize = 128;

/// One exported adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterEntry {
    /// Unique in the manifest: letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// The sha256 (hex) of the base model file the adapter applies to.
    pub base_sha256: String,
    /// The run's version the adapter holds, if it came from a run.
    pub version: Option<u64>,
    /// The PEFT adapter directory.
    pub path: String,
    pub rank: usize,
    pub alpha: f64,
    /// PEFT's module names (`q_proj`, ...).
    pub targets: Vec<String>,
    /// When it was exported, RFC 3339 UTC (`2026-11-30T21:04:05Z`).
    pub created: String,
}

/// The manifest: its entries in name order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterManifest {
    pub adapters: Vec<AdapterEntry>,
}

/// Why a manifest could not be read, changed or written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {bytes} bytes, more than the {MANIFEST_BYTES_MAX} a manifest may have", .path.display())]
    TooLarge { path: PathBuf, bytes: u64 },
    #[error("{}: {what}", .path.display())]
    Malformed { path: PathBuf, what: String },
    #[error(
        "adapter name {0:?}: use 1 to {NAME_CHARS_MAX} letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadName(String),
    #[error("the manifest holds {MANIFEST_ENTRIES_MAX} adapters already; remove some first")]
    Full,
}

/// Whether `name` may name an adapter.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= NAME_CHARS_MAX
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl AdapterManifest {
    /// Reads the manifest at `path`; a missing file is an empty manifest.
    pub fn read(path: &Path) -> Result<AdapterManifest, ManifestError> {
        use std::io::Read;
        let io = |source| ManifestError::Io {
            path: path.to_owned(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(AdapterManifest::default());
            }
            Err(e) => return Err(io(e)),
        };
        let mut bytes = Vec::new();
        file.take(MANIFEST_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MANIFEST_BYTES_MAX {
            return Err(ManifestError::TooLarge {
                path: path.to_owned(),
                bytes: bytes.len() as u64,
            });
        }
        AdapterManifest::parse(path, &bytes)
    }

    /// Parses manifest bytes, checking the entry cap, the names and their uniqueness;
    /// `path` only names the source in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<AdapterManifest, ManifestError> {
        let malformed = |what: String| ManifestError::Malformed {
            path: path.to_owned(),
            what,
        };
        let manifest: AdapterManifest =
            serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if manifest.adapters.len() > MANIFEST_ENTRIES_MAX {
            return Err(malformed(format!(
                "{} adapters, more than the {MANIFEST_ENTRIES_MAX} a manifest may hold",
                manifest.adapters.len()
            )));
        }
        for (i, entry) in manifest.adapters.iter().enumerate() {
            if !valid_name(&entry.name) {
                return Err(malformed(format!(
                    "adapter name {:?} is not valid",
                    entry.name
                )));
            }
            if manifest.adapters[..i].iter().any(|e| e.name == entry.name) {
                return Err(malformed(format!(
                    "adapter {:?} is listed twice",
                    entry.name
                )));
            }
        }
        Ok(manifest)
    }

    /// Adds `entry`, or replaces the entry of its name; keeps the entries in name order.
    pub fn upsert(&mut self, entry: AdapterEntry) -> Result<(), ManifestError> {
        if !valid_name(&entry.name) {
            return Err(ManifestError::BadName(entry.name));
        }
        let full = self.adapters.len() >= MANIFEST_ENTRIES_MAX;
        match self.adapters.iter_mut().find(|e| e.name == entry.name) {
            Some(existing) => *existing = entry,
            None if full => return Err(ManifestError::Full),
            None => self.adapters.push(entry),
        }
        self.adapters.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(())
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&AdapterEntry> {
        self.adapters.iter().find(|e| e.name == name)
    }

    /// Writes the manifest to `path` atomically (temporary file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<(), ManifestError> {
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| ManifestError::Malformed {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
        text.push(b'\n');
        engine::checkpoint::write_atomic(path, &text).map_err(|e| ManifestError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })
    }
}

/// `unix_s` seconds after 1970 as RFC 3339 UTC (`2026-11-30T21:04:05Z`).
pub fn rfc3339_utc(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let rem = unix_s % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, version: u64) -> AdapterEntry {
        AdapterEntry {
            name: name.into(),
            base_sha256: "ab".repeat(32),
            version: Some(version),
            path: format!("data/adapters/{name}"),
            rank: 4,
            alpha: 8.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            created: rfc3339_utc(1_796_072_645),
        }
    }

    /// Parses `json` (after upserting `add`, if any) and prints the names and versions,
    /// or the error.
    #[track_caller]
    fn check(json: &str, add: Option<AdapterEntry>, expect: expect_test::Expect) {
        let got = AdapterManifest::parse(Path::new("manifest.json"), json.as_bytes())
            .and_then(|mut m| {
                if let Some(e) = add {
                    m.upsert(e)?;
                }
                Ok(m)
            })
            .map(|m| {
                m.adapters
                    .iter()
                    .map(|e| format!("{} v{:?} {}", e.name, e.version, e.created))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_else(|e| e.to_string());
        expect.assert_eq(&got);
    }

    #[test]
    fn parse_and_upsert() {
        let one = serde_json::to_string(&AdapterManifest {
            adapters: vec![entry("b", 1)],
        })
        .unwrap_or_default();
        check(r#"{"adapters":[]}"#, None, expect_test::expect![[""]]);
        check(
            &one,
            Some(entry("a", 2)),
            expect_test::expect![
                "a vSome(2) 2026-11-30T21:04:05Z; b vSome(1) 2026-11-30T21:04:05Z"
            ],
        );
        check(
            &one,
            Some(entry("b", 7)),
            expect_test::expect!["b vSome(7) 2026-11-30T21:04:05Z"],
        );
        check(
            &one,
            Some(entry("../etc", 7)),
            expect_test::expect![[
                r#"adapter name "../etc": use 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'"#
            ]],
        );
        check(
            &one.replace("\"rank\"", "\"size\""),
            None,
            expect_test::expect![
                "manifest.json: unknown field `size`, expected one of `name`, `base_sha256`, `version`, `path`, `rank`, `alpha`, `targets`, `created` at line 1 column 149"
            ],
        );
        check(
            &one.replace("]}", &format!(",{}]}}", &one[13..one.len() - 2])),
            None,
            expect_test::expect![[r#"manifest.json: adapter "b" is listed twice"#]],
        );
    }

    #[test]
    fn read_is_bounded_and_write_reads_back() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("adapters/manifest.json");
        let empty = AdapterManifest::read(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(empty, AdapterManifest::default());
        let mut m = empty;
        m.upsert(entry("x", 3)).unwrap_or_else(|e| panic!("{e}"));
        m.write(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(AdapterManifest::read(&path).ok(), Some(m));
        let big = vec![b' '; MANIFEST_BYTES_MAX as usize + 1];
        std::fs::write(&path, big).unwrap_or_else(|e| panic!("{e}"));
        match AdapterManifest::read(&path) {
            Ok(_) => panic!("a manifest over the cap was read"),
            Err(e) => assert!(e.to_string().contains("more than the 4194304"), "{e}"),
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_796_072_645), "2026-11-30T21:04:05Z");
    }
}
