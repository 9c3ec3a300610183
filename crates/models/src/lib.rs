//! Pretrained models from files: a GGUF v3 file ([`load_gguf`]) or an HF Llama
//! directory ([`load_hf_dir`]) becomes a [`Pretrained`]: the engine's [`LlamaConfig`],
//! the weights as one flat `f32` vector in [`engine::LlamaLayout`] order, the tokenizer
//! (rebuilt from a GGUF's metadata) and the chat template.
//!
//! What a worker holds: the whole base model dequantized to `f32`, 4 bytes a parameter
//! ([`Pretrained::param_bytes`]): 538 MB for SmolLM2-135M, whose GGUF keeps it in 98 MB
//! of Q4_1 and Q8_0. The quantized file is read, dequantized and dropped while loading, so
//! the peak is the file plus the vector. Keeping the base quantized and dequantizing on
//! the fly (as QLoRA does) is not done yet. `hivetrain model info` prints the resident
//! memory measured after loading.
//!
//! Chat JSONL datasets ([`chat_data`]) are rendered through the model's template into
//! training windows with the loss on the assistant turns only.
//!
//! **Architecture Invariant:** no network code unless the `fetch` feature is on; reading
//! and loading never touch HTTP, so the training crates can depend on this one.

mod chat;
pub mod chat_data;
mod error;
pub mod export;
pub mod gguf;
mod hf;
pub mod llama;
pub mod manifest;
pub mod quant;
pub mod shakespeare_chat;
pub mod smollm2;
mod tokenizer;

use std::path::{Path, PathBuf};

pub use chat::{ChatMessage, ChatTemplate};
pub use chat_data::{
    ChatDataError, ChatTokens, ChatWindows, Conversation, IGNORE_TARGET, load_chat_windows,
    pack_chats, read_chat_jsonl, tokenize_chat,
};
use engine::{Backend, EngineError, LlamaConfig, ModelSpec};
pub use error::ModelFileError;
pub use gguf::Gguf;
pub use hf::load_hf_dir;
pub use tokenizer::gguf_tokenizer;

/// A pretrained Llama, loaded.
pub struct Pretrained {
    /// A short name (`general.name`, or the directory's).
    pub name: String,
    /// The file or directory it came from.
    pub path: PathBuf,
    pub config: LlamaConfig,
    /// Every parameter, in [`engine::LlamaLayout`] order.
    pub params: Vec<f32>,
    pub tokenizer: tokenizers::Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Whether [`Pretrained::encode`] starts with the BOS token.
    pub add_bos: bool,
}

impl std::fmt::Debug for Pretrained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pretrained")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Pretrained {
    /// The engine's spec of this model (every tensor trainable).
    pub fn spec(&self) -> ModelSpec {
        ModelSpec::llama(&self.name, self.config)
    }

    /// Bytes of the `f32` parameters this holds.
    pub fn param_bytes(&self) -> u64 {
        4 * self.params.len() as u64
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are
    /// recognized.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelFileError> {
        let encoding =
            self.tokenizer
                .encode(text, false)
                .map_err(|e| ModelFileError::Tokenizer {
                    path: self.path.clone(),
                    what: e.to_string(),
                })?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos_token_id) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelFileError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| ModelFileError::Tokenizer {
                path: self.path.clone(),
                what: e.to_string(),
            })
    }

    /// The prompt text of a conversation, ending where the assistant's answer begins.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, ModelFileError> {
        match &self.chat_template {
            Some(t) => t.render(messages, true),
            None => Err(ModelFileError::ChatTemplate {
                path: self.path.clone(),
                what: "the model has no chat template".into(),
            }),
        }
    }
}

/// Loads the GGUF file at `path` with a context of at most `max_seq` tokens (`None`: the
/// model's own; the KV cache and rotary tables are sized for it).
pub fn load_gguf(path: &Path, max_seq: Option<usize>) -> Result<Pretrained, ModelFileError> {
    let gguf = Gguf::open(path)?;
    let config = llama::gguf_config(&gguf, max_seq)?;
    let params = llama::read_params(&gguf, &config)?;
    let tokenizer = gguf_tokenizer(&gguf)?;
    let vocab = config.vocab_size;
    let bos_token_id = tokenizer::special_token(&gguf, "tokenizer.ggml.bos_token_id", vocab)?;
    let eos_token_id = tokenizer::special_token(&gguf, "tokenizer.ggml.eos_token_id", vocab)?;
    let add_bos = match gguf.metadata.get("tokenizer.ggml.add_bos_token") {
        Some(_) => gguf.get_bool("tokenizer.ggml.add_bos_token")?,
        None => false,
    };
    let token = |id: Option<u32>| {
        id.and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default()
    };
    let chat_template = match gguf.metadata.get("tokenizer.chat_template") {
        Some(_) => Some(ChatTemplate::new(
            path,
            gguf.get_str("tokenizer.chat_template")?,
            &token(bos_token_id),
            &token(eos_token_id),
        )?),
        None => None,
    };
    let name = match gguf.metadata.get("general.name") {
        Some(_) => gguf.get_str("general.name")?.to_string(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    Ok(Pretrained {
        name,
        path: path.to_owned(),
        config,
        params,
        tokenizer,
        chat_template,
        bos_token_id,
        eos_token_id,
        add_bos,
    })
}

/// Greedy decoding through the backend's KV cache: up to `max_new` tokens after
/// `prompt`, stopping after any token of `stop` (which is kept).
pub fn greedy(
    backend: &mut dyn Backend,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    on_token: &mut dyn FnMut(u32),
) -> Result<Vec<u32>, EngineError> {
    let params = engine::generate::SamplingParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    engine::generate::generate(backend, prompt, max_new, &params, &mut |id| {
        on_token(id);
        !stop.contains(&id)
    })
}
