//! A worker's identity: an ed25519 key made on first run and kept in the user's config
//! directory, readable by the user alone (`keys`). Its public key is the worker id and
//! wallet.

use std::path::PathBuf;

pub use keys::{KeyError as IdentityError, load_or_create};

/// The default key file: `<config dir>/hivetrain/worker.key`.
pub fn default_path() -> Result<PathBuf, IdentityError> {
    let dir = dirs::config_dir().ok_or_else(|| IdentityError::Read {
        path: PathBuf::from("<config dir>"),
        source: std::io::Error::other(
            "no config directory is known for this user; pass a key file path",
        ),
    })?;
    Ok(dir.join("hivetrain").join("worker.key"))
}
