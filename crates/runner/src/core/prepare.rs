//! A run's model and data, made from the config's files when the core opens: a preset
//! trained from scratch (its tokenizer.json, its text corpus), or a fine-tune of a
//! pretrained base (the base's tokenizer, a chat or text corpus, the base frozen under
//! a LoRA adapter or trained in full). Workers make the same from what `GET /v1/run`
//! names, with the same functions (`worker::setup`).

use std::path::Path;
use std::sync::Arc;

use engine::train::OwnedBatch;
use engine::{ModelSpec, Preset};
use protocol::api::{BaseInfo, DataFormat};
use worker::setup::{FINETUNE_CONTEXT_MAX, SetupError};
use worker::unit::{RunModel, owned_batch};

use super::CoreError;
use crate::config::{ConfigError, CoordinatorConfig};

/// What a run trains and reads, made once at open.
pub struct Prepared {
    pub model: RunModel,
    pub seq: usize,
    /// The corpus file's bytes (served to workers).
    pub corpus: Vec<u8>,
    /// The tokenizer.json served to workers: the config's, or the base's.
    pub tokenizer_bytes: Vec<u8>,
    pub tokenizer: data::TextTokenizer,
    pub format: DataFormat,
    pub train: data::Examples,
    pub holdout: Vec<OwnedBatch>,
    /// The trainable floats of version 0.
    pub initial: Vec<f32>,
    /// A fine-tune's base: its file's bytes (served to workers) and what it is.
    pub base: Option<(Arc<Vec<u8>>, BaseInfo)>,
    /// A fine-tune's pretrained model (tokenizer and chat template; no weights).
    pub pretrained: Option<Arc<models::Pretrained>>,
}

fn setup(e: SetupError) -> CoreError {
    match e {
        SetupError::Data(e) => CoreError::Data(e),
        SetupError::Engine(e) => CoreError::Engine(e),
        other => CoreError::Config(ConfigError::Invalid(other.to_string())),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CoreError> {
    std::fs::read(path).map_err(|source| {
        CoreError::Data(data::DataError::Read {
            path: path.to_owned(),
            source,
        })
    })
}

/// Refuses what the run would serve workers past the bound they read it to
/// (`worker::CORPUS_BYTES_MAX` and the like), before reading it: a run its workers cannot
/// join does not start.
fn read_served(path: &Path, what: &str, max: u64, bound: &str) -> Result<Vec<u8>, CoreError> {
    let bytes = std::fs::metadata(path)
        .map_err(|source| {
            CoreError::Data(data::DataError::Read {
                path: path.to_owned(),
                source,
            })
        })?
        .len();
    if bytes > max {
        return Err(ConfigError::Invalid(format!(
            "{}: {what} is {bytes} bytes, and workers download at most {max} ({bound}); use a smaller one",
            path.display()
        ))
        .into());
    }
    read(path)
}

/// Makes the run's model and data from `config` (the token cache lives in `cache`).
pub fn prepare(config: &CoordinatorConfig, cache: &Path) -> Result<Prepared, CoreError> {
    let corpus = read_served(
        &config.corpus,
        "the corpus",
        worker::CORPUS_BYTES_MAX,
        "CORPUS_BYTES_MAX",
    )?;
    let seq_of = |model: &ModelSpec| -> Result<usize, CoreError> {
        let seq = if config.seq == 0 {
            model.n_ctx()
        } else {
            config.seq as usize
        };
        if seq > model.n_ctx() {
            return Err(ConfigError::Invalid(format!(
                "seq {seq} exceeds model {}'s context of {}",
                model.name,
                model.n_ctx()
            ))
            .into());
        }
        Ok(seq)
    };
    let (model, tokenizer_bytes, format, initial, base, pretrained) = match &config.finetune {
        None => {
            let tokenizer_bytes = read_served(
                &config.tokenizer,
                "the tokenizer",
                worker::TOKENIZER_BYTES_MAX,
                "TOKENIZER_BYTES_MAX",
            )?;
            let tokenizer = data::TextTokenizer::load(&config.tokenizer)?;
            let preset = Preset::from_name(&config.preset)
                .ok_or_else(|| ConfigError::Invalid("unknown preset".into()))?;
            let spec = ModelSpec::preset(preset, tokenizer.vocab_size());
            let initial = spec.init_params(config.seed)?;
            let model = RunModel::trained_in_full(spec)?;
            (
                model,
                tokenizer_bytes,
                DataFormat::Text,
                initial,
                None,
                None,
            )
        }
        Some(finetune) => {
            let bytes = read_served(
                &finetune.base,
                "the base",
                worker::BASE_BYTES_MAX,
                "BASE_BYTES_MAX",
            )?;
            let sha256 = data::sha256_hex(&bytes);
            let context = FINETUNE_CONTEXT_MAX.max(config.seq as usize);
            let mut loaded = worker::setup::load_base(&finetune.base, context).map_err(setup)?;
            let spec = worker::setup::finetune_spec(&loaded, finetune.lora.clone());
            spec.validate().map_err(engine::EngineError::from)?;
            let initial = match spec.lora() {
                Some((llama, lora)) => engine::lora::init_adapter(llama, lora, config.seed),
                None => loaded.params.clone(),
            };
            let model =
                worker::setup::run_model(&spec, &mut loaded, &finetune.base).map_err(setup)?;
            let tokenizer_bytes = loaded
                .pretrained
                .tokenizer
                .to_string(false)
                .map_err(|e| {
                    ConfigError::Invalid(format!(
                        "{}: its tokenizer cannot be written as tokenizer.json: {e}",
                        finetune.base.display()
                    ))
                })?
                .into_bytes();
            if tokenizer_bytes.len() as u64 > worker::TOKENIZER_BYTES_MAX {
                return Err(ConfigError::Invalid(format!(
                    "{}: its tokenizer is {} bytes as tokenizer.json, and workers download at most {} (TOKENIZER_BYTES_MAX)",
                    finetune.base.display(),
                    tokenizer_bytes.len(),
                    worker::TOKENIZER_BYTES_MAX
                ))
                .into());
            }
            let name = finetune
                .base
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "base.gguf".into());
            let info = BaseInfo {
                name,
                sha256,
                bytes: bytes.len() as u64,
            };
            (
                model,
                tokenizer_bytes,
                finetune.data,
                initial,
                Some((Arc::new(bytes), info)),
                Some(Arc::new(loaded.pretrained)),
            )
        }
    };
    let seq = seq_of(&model.spec)?;
    let tokenizer = data::TextTokenizer::from_json(
        &config.tokenizer,
        String::from_utf8_lossy(&tokenizer_bytes).into_owned(),
    )?;
    // The text path reads the tokenizer from a file, as a worker does with the bytes it
    // fetched: write the base's where the cache is.
    let tokenizer_path = match &config.finetune {
        None => config.tokenizer.clone(),
        Some(_) => {
            let path = cache.join(format!(
                "{}-tokenizer.json",
                &data::sha256_hex(&tokenizer_bytes)[..16]
            ));
            if !path.exists() {
                engine::checkpoint::write_atomic(&path, &tokenizer_bytes)?;
            }
            path
        }
    };
    let (train, holdout) = worker::setup::examples(
        format,
        &config.corpus,
        &tokenizer_path,
        pretrained.as_deref(),
        seq,
        cache,
    )
    .map_err(setup)?;
    let batch = config.batch as usize;
    let holdout = holdout
        .holdout_batches(seq, config.holdout_batches as usize * batch, batch)?
        .into_iter()
        .map(owned_batch)
        .collect();
    Ok(Prepared {
        model,
        seq,
        corpus,
        tokenizer_bytes,
        tokenizer,
        format,
        train,
        holdout,
        initial,
        base,
        pretrained,
    })
}
