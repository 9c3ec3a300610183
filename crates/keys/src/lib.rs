//! ed25519 key files: a key made from OS randomness on first use and kept readable by
//! its owner alone. Workers keep their identity (worker id and wallet) this way, the
//! coordinator its ledger-signing key.
//!
//! File format: the 32-byte secret seed as 64 lowercase hex characters and a newline.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

/// Why the identity file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a hivetrain key (expected 64 hex characters); move it away to make a new key"
    )]
    Corrupt { path: PathBuf },
    #[error("{path} can be read by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the operating system gave no randomness for a new key: {0}")]
    Randomness(String),
}

/// The key at `path`, made (and written with mode 0600) if the file does not exist.
/// Returns the key and whether it was made now.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((parse(path, &text)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((create(path)?, true)),
        Err(source) => Err(KeyError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn parse(path: &Path, text: &str) -> Result<SigningKey, KeyError> {
    check_mode(path)?;
    let hex = text.trim();
    let corrupt = || KeyError::Corrupt {
        path: path.to_owned(),
    };
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(corrupt());
    }
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| corrupt())?;
    }
    Ok(SigningKey::from_bytes(&seed))
}

#[cfg(unix)]
fn check_mode(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_: &Path) -> Result<(), KeyError> {
    Ok(())
}

fn create(path: &Path) -> Result<SigningKey, KeyError> {
    let write_err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Randomness(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(write_err)?;
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    file.write_all(format!("{hex}\n").as_bytes())
        .map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/worker.key");
        let (first, made) = load_or_create(&path).expect("create");
        assert!(made);
        let (again, made) = load_or_create(&path).expect("load");
        assert!(!made);
        assert_eq!(first.to_bytes(), again.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let other = tempfile::tempdir().expect("tempdir");
        let (third, _) = load_or_create(&other.path().join("worker.key")).expect("create");
        assert_ne!(
            first.to_bytes(),
            third.to_bytes(),
            "keys come from OS randomness"
        );
    }

    #[test]
    fn corrupt_and_exposed_files_are_named_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("worker.key");
        std::fs::write(&path, "not a key\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let err = load_or_create(&path).expect_err("corrupt");
        assert!(matches!(err, KeyError::Corrupt { .. }), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&path, format!("{}\n", "ab".repeat(32))).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let err = load_or_create(&path).expect_err("exposed");
            assert!(
                err.to_string()
                    .contains("can be read by other users (mode 644)"),
                "{err}"
            );
        }
    }
}
