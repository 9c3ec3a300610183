//! A worker's identity: an ed25519 key made on first run and kept in the user's config
//! directory, readable by the user alone. Its public key is the worker id and wallet.
//!
//! File format: the 32-byte secret seed as 64 lowercase hex characters and a newline.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use protocol::WorkerId;

/// Why the identity file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
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
        "{path} is not a hivetrain key (expected 64 hex characters); move it away to make a new identity"
    )]
    Corrupt { path: PathBuf },
    #[error("{path} can be read by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the operating system gave no randomness for a new key: {0}")]
    Randomness(String),
    #[error("no config directory is known for this user; pass a key file path")]
    NoConfigDir,
}

/// The default key file: `<config dir>/hivetrain/worker.key`.
pub fn default_path() -> Result<PathBuf, IdentityError> {
    Ok(dirs::config_dir()
        .ok_or(IdentityError::NoConfigDir)?
        .join("hivetrain")
        .join("worker.key"))
}

/// The key at `path`, made (and written with mode 0600) if the file does not exist.
/// Returns the key and whether it was made now.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((parse(path, &text)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((create(path)?, true)),
        Err(source) => Err(IdentityError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn parse(path: &Path, text: &str) -> Result<SigningKey, IdentityError> {
    check_mode(path)?;
    let hex = text.trim();
    let corrupt = || IdentityError::Corrupt {
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
fn check_mode(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_: &Path) -> Result<(), IdentityError> {
    Ok(())
}

fn create(path: &Path) -> Result<SigningKey, IdentityError> {
    let write_err = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| IdentityError::Randomness(e.to_string()))?;
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

/// The worker id of a key.
pub fn worker_id(key: &SigningKey) -> WorkerId {
    WorkerId::of(key)
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
        assert_eq!(worker_id(&first), worker_id(&again));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let other = tempfile::tempdir().expect("tempdir");
        let (third, _) = load_or_create(&other.path().join("worker.key")).expect("create");
        assert_ne!(
            worker_id(&first),
            worker_id(&third),
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
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
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
