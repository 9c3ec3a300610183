//! Default locations: the bundled corpus and tokenizer, caches, model directories.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The committed Shakespeare corpus, relative to the repository root.
pub(crate) const DEFAULT_CORPUS: &str = "data/shakespeare.txt";
/// The committed tokenizer, relative to the repository root.
pub(crate) const DEFAULT_TOKENIZER: &str = "data/tokenizer.json";
/// File names inside a model directory.
pub(crate) const MODEL_FILE: &str = "model.safetensors";
pub(crate) const TOKENIZER_FILE: &str = "tokenizer.json";
pub(crate) const LOG_FILE: &str = "train-log.json";

/// A bundled file: as given if it exists, else under the repository this binary was
/// built from (so `hivetrain train` works from any directory of a checkout).
pub(crate) fn bundled(path: &Path) -> PathBuf {
    if path.exists() || path.is_absolute() {
        return path.to_owned();
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    if repo.exists() { repo } else { path.to_owned() }
}

/// The cache directory: `--cache-dir`, else `$HIVETRAIN_CACHE_DIR`, else the platform's.
pub(crate) fn cache_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_owned();
    }
    if let Some(dir) = std::env::var_os(crate::env::CACHE_DIR) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("hivetrain")
}

/// A model given as a directory (holding `model.safetensors` and `tokenizer.json`) or as
/// a `.safetensors` file: returns the checkpoint path and the tokenizer path.
pub(crate) fn model_files(
    model: &Path,
    tokenizer: Option<&Path>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (checkpoint, dir) = if model.is_dir() {
        (model.join(MODEL_FILE), model.to_owned())
    } else {
        (
            model.to_owned(),
            model.parent().map(Path::to_owned).unwrap_or_default(),
        )
    };
    if !checkpoint.exists() {
        anyhow::bail!(
            "no checkpoint at {}: give --model a directory written by `hivetrain train` or a .safetensors file",
            checkpoint.display()
        );
    }
    let tokenizer = match tokenizer {
        Some(t) => t.to_owned(),
        None => {
            let beside = dir.join(TOKENIZER_FILE);
            if beside.exists() {
                beside
            } else {
                bundled(Path::new(DEFAULT_TOKENIZER))
            }
        }
    };
    Ok((checkpoint, tokenizer))
}

/// Loads a tokenizer, with the path in the error.
pub(crate) fn load_tokenizer(path: &Path) -> anyhow::Result<data::TextTokenizer> {
    data::TextTokenizer::load(path)
        .with_context(|| format!("loading the tokenizer {}", path.display()))
}
