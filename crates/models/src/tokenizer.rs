//! The tokenizer of a GGUF file, rebuilt from its metadata as an HF `tokenizers`
//! tokenizer.
//!
//! `tokenizer.ggml.model = gpt2` is byte-level BPE: the vocabulary is
//! `tokenizer.ggml.tokens`, the merges `tokenizer.ggml.merges` ("a b", split on the first
//! space), and the tokens of `tokenizer.ggml.token_type` 3 (control) are special added
//! tokens. `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer; `smollm` is digits one
//! by one, then GPT-2's byte-level split, and `gpt2` (or `default`) the byte-level split
//! alone.

use std::collections::HashSet;
use std::path::Path;

use serde_json::json;
use tokenizers::Tokenizer;

use crate::ModelFileError;
use crate::gguf::Gguf;

/// llama.cpp's token type of a control token.
const CONTROL: i64 = 3;

/// The tokenizer a GGUF's metadata describes.
pub fn gguf_tokenizer(gguf: &Gguf) -> Result<Tokenizer, ModelFileError> {
    let path = gguf.path();
    let err = |what: String| ModelFileError::Tokenizer {
        path: path.to_owned(),
        what,
    };
    let model = gguf.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer.ggml.model is {model:?}; this loader rebuilds \"gpt2\" (byte-level BPE)"
        )));
    }
    let pre = match gguf.metadata.get("tokenizer.ggml.pre") {
        Some(_) => gguf.get_str("tokenizer.ggml.pre")?,
        None => "default",
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level,
        ]}),
        "gpt2" | "default" => byte_level,
        other => {
            return Err(err(format!(
                "pre-tokenizer {other:?} is not one this loader knows (smollm, gpt2)"
            )));
        }
    };
    let tokens = gguf.get_strings("tokenizer.ggml.tokens")?;
    let types = gguf.get_ints("tokenizer.ggml.token_type")?;
    if types.len() != tokens.len() {
        return Err(err(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let mut seen = HashSet::with_capacity(tokens.len());
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (&token, &ty)) in tokens.iter().zip(&types).enumerate() {
        if !seen.insert(token) {
            return Err(err(format!(
                "token {token:?} appears twice (again as id {id})"
            )));
        }
        vocab.insert(token.to_string(), json!(id));
        if ty == CONTROL {
            added.push(
                json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}),
            );
        }
    }
    let merges = gguf
        .get_strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| {
                    err(format!(
                        "merge {m:?} is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    let text = tokenizer_json.to_string();
    text.parse::<Tokenizer>().map_err(|e| err(e.to_string()))
}

/// A token id from metadata `key`, if present, checked against the vocabulary.
pub(crate) fn special_token(
    gguf: &Gguf,
    key: &str,
    vocab_size: usize,
) -> Result<Option<u32>, ModelFileError> {
    if !gguf.metadata.contains_key(key) {
        return Ok(None);
    }
    let id = gguf.get_usize(key)?;
    if id >= vocab_size {
        return Err(ModelFileError::Tokenizer {
            path: gguf.path().to_owned(),
            what: format!("{key} is {id}, outside the vocabulary of {vocab_size}"),
        });
    }
    Ok(Some(id as u32))
}

/// Checks a tokenizer loaded from `path` against the model's vocabulary size.
pub(crate) fn check_vocab(
    path: &Path,
    tokenizer: &Tokenizer,
    vocab_size: usize,
) -> Result<(), ModelFileError> {
    let n = tokenizer.get_vocab_size(true);
    if n > vocab_size {
        return Err(ModelFileError::Tokenizer {
            path: path.to_owned(),
            what: format!("{n} tokens, more than the model's vocabulary of {vocab_size}"),
        });
    }
    Ok(())
}
