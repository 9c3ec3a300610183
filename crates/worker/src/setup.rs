//! A run's model and data made from files, the same way on the coordinator and on every
//! worker: the pretrained base of a fine-tune (a GGUF file, checked against the shape the
//! run announces), and the corpus as train and holdout [`data::Examples`] (a text
//! stream, or chat conversations packed into windows through the base's template).

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use engine::{Architecture, LlamaConfig, ModelSpec, Trainable};
use protocol::api::DataFormat;

/// Longest context a fine-tune's model is opened with (the KV cache and rotary tables are
/// sized for it; training windows are the run's `seq`, at most this).
pub const FINETUNE_CONTEXT_MAX: usize = 2048;

/// Why a run's model or data cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    ModelFile(Box<models::ModelFileError>),
    #[error(transparent)]
    ChatData(Box<models::ChatDataError>),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(
        "{path} holds a Llama of {got:?}; the run's model {name} is {want:?}: is this the run's base?"
    )]
    BaseShape {
        path: String,
        name: String,
        got: Box<LlamaConfig>,
        want: Box<LlamaConfig>,
    },
    #[error("model {name} is a {family}; only a Llama is fine-tuned from a base file")]
    NotLlama { name: String, family: &'static str },
    #[error(
        "chat data needs a pretrained base with a chat template; a run from scratch reads text"
    )]
    ChatWithoutBase,
}

impl From<models::ModelFileError> for SetupError {
    fn from(e: models::ModelFileError) -> SetupError {
        SetupError::ModelFile(Box::new(e))
    }
}

impl From<models::ChatDataError> for SetupError {
    fn from(e: models::ChatDataError) -> SetupError {
        SetupError::ChatData(Box::new(e))
    }
}

/// A pretrained base, loaded: the frozen or initial floats and what reads text for it.
pub struct Base {
    /// Everything but the weights (tokenizer, chat template, special tokens).
    pub pretrained: models::Pretrained,
    /// The base's floats, in the engine's Llama layout.
    pub params: Vec<f32>,
}

/// Loads the base at `path` (a GGUF file) for a context of `context` tokens.
pub fn load_base(path: &Path, context: usize) -> Result<Base, SetupError> {
    let mut pretrained = models::load_gguf(path, Some(context))?;
    let params = std::mem::take(&mut pretrained.params);
    Ok(Base { pretrained, params })
}

/// The spec of a fine-tune of `base` (a LoRA adapter when `lora` is given, every weight
/// otherwise), named after the base.
pub fn finetune_spec(base: &Base, lora: Option<engine::LoraConfig>) -> ModelSpec {
    let name: String = base
        .pretrained
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    match lora {
        Some(lora) => ModelSpec::llama_lora(&name, base.pretrained.config, lora),
        None => ModelSpec::llama(&name, base.pretrained.config),
    }
}

/// The run's model from a loaded base: the frozen part of `spec` taken from it (with
/// LoRA, all of it; nothing when every weight trains). Checks that the base has the
/// shape the spec names.
pub fn run_model(
    spec: &ModelSpec,
    base: &mut Base,
    path: &Path,
) -> Result<crate::unit::RunModel, SetupError> {
    let Architecture::Llama(want) = spec.architecture else {
        return Err(SetupError::NotLlama {
            name: spec.name.clone(),
            family: spec.architecture.family(),
        });
    };
    if base.pretrained.config != want {
        return Err(SetupError::BaseShape {
            path: path.display().to_string(),
            name: spec.name.clone(),
            got: Box::new(base.pretrained.config),
            want: Box::new(want),
        });
    }
    let frozen = match spec.trainable {
        Trainable::Lora(_) => std::mem::take(&mut base.params),
        Trainable::All => Vec::new(),
    };
    Ok(crate::unit::RunModel::new(spec.clone(), Arc::new(frozen))?)
}

/// The train and holdout sides of the corpus at `corpus`: text tokenized by `tokenizer`
/// into one stream (cached under `cache`), or chat conversations rendered through
/// `base`'s template and packed into windows of `seq`.
pub fn examples(
    format: DataFormat,
    corpus: &Path,
    tokenizer: &Path,
    base: Option<&models::Pretrained>,
    seq: usize,
    cache: &Path,
) -> Result<(data::Examples, data::Examples), SetupError> {
    match format {
        DataFormat::Text => {
            let tokenizer = data::TextTokenizer::load(tokenizer)?;
            let tokens = data::cache::load_or_build(corpus, &tokenizer, cache)?;
            Ok(data::Examples::split_stream(corpus, &tokens.tokens, seq)?)
        }
        DataFormat::Chat => {
            let base = base.ok_or(SetupError::ChatWithoutBase)?;
            let seq_nz =
                NonZeroUsize::new(seq).ok_or(data::DataError::WindowSeq { have: seq, want: 1 })?;
            let packed = models::load_chat_windows(corpus, base, seq_nz)?;
            let windows = data::Windows {
                seq,
                inputs: packed.inputs,
                targets: packed.targets,
            };
            Ok(data::Examples::split_windows(corpus, windows)?)
        }
    }
}

/// `name` with every character other than ASCII letters, digits, `.`, `-` and `_`
/// written `_`: safe in a file name (a worker's kept corpus and base) and in a model name
/// (a fine-tune's served name).
pub fn plain_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
