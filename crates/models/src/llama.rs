//! Llama weights from a GGUF file or an HF directory, as the engine's flat parameter
//! vector in [`LlamaLayout`] order.
//!
//! GGUF's llama tensors map onto HF's names one to one:
//!
//! ```text
//! token_embd.weight        model.embed_tokens.weight
//! blk.{i}.attn_norm.weight model.layers.{i}.input_layernorm.weight
//! blk.{i}.attn_q.weight    model.layers.{i}.self_attn.q_proj.weight   (rows un-permuted)
//! blk.{i}.attn_k.weight    model.layers.{i}.self_attn.k_proj.weight   (rows un-permuted)
//! blk.{i}.attn_v.weight    model.layers.{i}.self_attn.v_proj.weight
//! blk.{i}.attn_output.weight model.layers.{i}.self_attn.o_proj.weight
//! blk.{i}.ffn_norm.weight  model.layers.{i}.post_attention_layernorm.weight
//! blk.{i}.ffn_gate.weight  model.layers.{i}.mlp.gate_proj.weight
//! blk.{i}.ffn_up.weight    model.layers.{i}.mlp.up_proj.weight
//! blk.{i}.ffn_down.weight  model.layers.{i}.mlp.down_proj.weight
//! output_norm.weight       model.norm.weight
//! output.weight            lm_head.weight                             (untied only)
//! ```
//!
//! llama.cpp's converter permutes the rows of q and k so that the two elements a rotary
//! embedding turns together are adjacent; the engine (like HF) turns element `i` with
//! element `i + head_dim / 2`, so [`unpermute_rows`] undoes that per head.

use std::collections::HashSet;
use std::path::Path;

use engine::{LlamaConfig, LlamaLayout};

use crate::ModelFileError;
use crate::gguf::Gguf;

/// The GGUF name of the tensor HF calls `hf`, or `None` if it has none.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let short = match tail {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// Undoes llama.cpp's rotary row permutation of a `[n_head * head_dim, cols]` matrix:
/// HF row `h * hd + j * hd / 2 + i` is GGUF row `h * hd + 2 * i + j` (`j` in 0..2).
pub fn unpermute_rows(w: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + 2 * i + j) * cols;
                let dst = (h * head_dim + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// llama.cpp's permutation, the inverse of [`unpermute_rows`] (what a GGUF writer does).
pub fn permute_rows(w: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let dst = (h * head_dim + 2 * i + j) * cols;
                let src = (h * head_dim + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// The Llama shape a GGUF's metadata describes, with a context of at most `max_seq`
/// tokens (the KV cache and rotary tables are sized for it; `None`: the model's own).
pub fn gguf_config(gguf: &Gguf, max_seq: Option<usize>) -> Result<LlamaConfig, ModelFileError> {
    let path = gguf.path();
    let arch = gguf.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(ModelFileError::unsupported(
            path,
            format!("general.architecture is {arch:?}; this loader reads \"llama\""),
        ));
    }
    if let Some(crate::gguf::Value::String(scaling)) = gguf.metadata.get("llama.rope.scaling.type")
        && scaling != "none"
    {
        return Err(ModelFileError::unsupported(
            path,
            format!("rope scaling {scaling:?}"),
        ));
    }
    let hidden = gguf.get_usize("llama.embedding_length")?;
    let heads = gguf.get_usize("llama.attention.head_count")?;
    let kv_heads = match gguf.metadata.get("llama.attention.head_count_kv") {
        Some(_) => gguf.get_usize("llama.attention.head_count_kv")?,
        None => heads,
    };
    let head_dim = match gguf.metadata.get("llama.attention.key_length") {
        Some(_) => gguf.get_usize("llama.attention.key_length")?,
        None if heads > 0 && hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(ModelFileError::malformed(
                path,
                format!(
                    "llama.attention.head_count {heads} does not divide llama.embedding_length {hidden}"
                ),
            ));
        }
    };
    let tokens = gguf.get("tokenizer.ggml.tokens")?;
    let vocab_size = match tokens {
        crate::gguf::Value::Array(a) => a.len(),
        other => {
            return Err(ModelFileError::MetadataType {
                path: path.to_owned(),
                key: "tokenizer.ggml.tokens".into(),
                found: other.type_name(),
                expected: "an array of strings",
            });
        }
    };
    let context = gguf.get_usize("llama.context_length")?;
    let rope_theta = match gguf.metadata.get("llama.rope.freq_base") {
        Some(_) => gguf.get_f64("llama.rope.freq_base")?,
        None => 10_000.0,
    };
    let config = LlamaConfig {
        hidden,
        intermediate: gguf.get_usize("llama.feed_forward_length")?,
        layers: gguf.get_usize("llama.block_count")?,
        heads,
        kv_heads,
        head_dim,
        vocab_size,
        rope_theta,
        rms_eps: gguf.get_f64("llama.attention.layer_norm_rms_epsilon")?,
        tie_embeddings: gguf.tensor("output.weight").is_none(),
        max_seq: max_seq.map_or(context, |m| m.min(context)),
    };
    config.validate().map_err(|source| ModelFileError::Config {
        path: path.to_owned(),
        source,
    })?;
    Ok(config)
}

/// Where a tensor's values come from: a GGUF or a safetensors file.
pub(crate) trait TensorSource {
    fn path(&self) -> &Path;
    /// The name this source gives HF's tensor `hf`.
    fn source_name(&self, hf: &str) -> Option<String>;
    /// The row-major shape of tensor `name`, `None` if absent.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Writes tensor `name`'s values (as stored) into `out`.
    fn read_into(&self, name: &str, out: &mut [f32]) -> Result<(), ModelFileError>;
    /// Every tensor name in the source.
    fn names(&self) -> Vec<String>;
    /// Whether q and k rows are in llama.cpp's permuted order.
    fn permuted_rotary(&self) -> bool;
    /// Tensors the source may hold that the config does not use (HF's tied `lm_head`).
    fn ignorable(&self, _name: &str, _config: &LlamaConfig) -> bool {
        false
    }
}

impl TensorSource for Gguf {
    fn path(&self) -> &Path {
        Gguf::path(self)
    }
    fn source_name(&self, hf: &str) -> Option<String> {
        gguf_name(hf)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensor(name).map(|t| t.shape())
    }
    fn read_into(&self, name: &str, out: &mut [f32]) -> Result<(), ModelFileError> {
        match self.tensor(name) {
            Some(t) => self.dequantize_into(t, out),
            None => Err(ModelFileError::MissingTensor {
                path: self.path().to_owned(),
                name: name.into(),
            }),
        }
    }
    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }
    fn permuted_rotary(&self) -> bool {
        true
    }
}

/// Reads every tensor of `config`'s layout from `source` into one flat vector, checking
/// shapes and that the source holds nothing else.
pub(crate) fn read_params(
    source: &dyn TensorSource,
    config: &LlamaConfig,
) -> Result<Vec<f32>, ModelFileError> {
    let layout = LlamaLayout::new(config);
    let mut params = vec![0.0f32; layout.table().len()];
    let mut used = HashSet::new();
    for spec in layout.table().tensors() {
        let name = source.source_name(&spec.name).ok_or_else(|| {
            ModelFileError::unsupported(source.path(), format!("no name for {}", spec.name))
        })?;
        let shape = source
            .shape(&name)
            .ok_or_else(|| ModelFileError::MissingTensor {
                path: source.path().to_owned(),
                name: name.clone(),
            })?;
        if shape != spec.shape {
            return Err(ModelFileError::ShapeMismatch {
                path: source.path().to_owned(),
                name,
                got: shape,
                want: spec.shape.clone(),
            });
        }
        let out = &mut params[spec.range()];
        source.read_into(&name, out)?;
        if source.permuted_rotary() {
            let heads = if spec.name.ends_with("self_attn.q_proj.weight") {
                Some(config.heads)
            } else if spec.name.ends_with("self_attn.k_proj.weight") {
                Some(config.kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                let fixed = unpermute_rows(out, heads, config.head_dim, config.hidden);
                out.copy_from_slice(&fixed);
            }
        }
        used.insert(name);
    }
    // The first unexpected tensor in name order, so the error is the same every time
    // (safetensors lists its tensors in hash order).
    let mut names = source.names();
    names.sort();
    if let Some(name) = names
        .into_iter()
        .find(|name| !used.contains(name) && !source.ignorable(name, config))
    {
        return Err(ModelFileError::UnexpectedTensor {
            path: source.path().to_owned(),
            name,
        });
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips_and_pairs_rotary_halves() {
        // Two heads of width 4, one column: HF rows [a0 a1 b0 b1] per head (a = first half).
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let gguf = permute_rows(&hf, 2, 4, 1);
        // llama.cpp interleaves the halves: a0 b0 a1 b1.
        assert_eq!(gguf, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(unpermute_rows(&gguf, 2, 4, 1), hf);
        let wide: Vec<f32> = (0..48).map(|x| x as f32).collect();
        assert_eq!(unpermute_rows(&permute_rows(&wide, 3, 4, 4), 3, 4, 4), wide);
    }

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(),
            Some("blk.12.ffn_down.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.0.mlp.fc.weight"), None);
    }
}
