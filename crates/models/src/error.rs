//! [`ModelFileError`]: every way a model file can be unusable, each naming the file.

use std::path::{Path, PathBuf};

use engine::LlamaConfigError;

/// Why a model file (a GGUF, an HF directory's `config.json`, `model.safetensors` or
/// `tokenizer.json`) cannot be loaded. Every variant names the file; none is a panic.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a GGUF file (it starts with {found:02x?}, a GGUF with \"GGUF\")", .path.display())]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{}: GGUF version {version}; this reader takes version 3 only", .path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{}: truncated: {what} needs {need} bytes at offset {offset}, the file has {len}", .path.display())]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        need: u64,
        len: u64,
    },
    #[error("{}: {what}", .path.display())]
    Malformed { path: PathBuf, what: String },
    #[error("{}: tensor {name} has type {type_id}, which this reader does not know", .path.display())]
    UnknownTensorType {
        path: PathBuf,
        name: String,
        type_id: u32,
    },
    #[error("{}: metadata {key} is missing", .path.display())]
    MissingMetadata { path: PathBuf, key: String },
    #[error("{}: metadata {key} is {found}, expected {expected}", .path.display())]
    MetadataType {
        path: PathBuf,
        key: String,
        found: String,
        expected: &'static str,
    },
    #[error("{}: unsupported model: {what}", .path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("{}: tensor {name} is missing", .path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor {name} is not part of a Llama of this config", .path.display())]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{}: tensor {name} has shape {got:?}, the config says {want:?}", .path.display())]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{}: the configuration is not a usable Llama: {source}", .path.display())]
    Config {
        path: PathBuf,
        source: LlamaConfigError,
    },
    #[error("{}: tokenizer: {what}", .path.display())]
    Tokenizer { path: PathBuf, what: String },
    #[error("{}: chat template: {what}", .path.display())]
    ChatTemplate { path: PathBuf, what: String },
}

impl ModelFileError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ModelFileError {
        ModelFileError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn malformed(path: &Path, what: impl Into<String>) -> ModelFileError {
        ModelFileError::Malformed {
            path: path.to_owned(),
            what: what.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, what: impl Into<String>) -> ModelFileError {
        ModelFileError::Unsupported {
            path: path.to_owned(),
            what: what.into(),
        }
    }
}
