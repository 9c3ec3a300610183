//! An HF Llama-family directory: `config.json`, `model.safetensors`, `tokenizer.json`,
//! and the chat template from `chat_template.jinja` or `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use engine::LlamaConfig;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::llama::{TensorSource, read_params};
use crate::{ChatTemplate, ModelFileError, Pretrained};

/// The fields of HF's `LlamaConfig` this loader reads; others are ignored.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rope_theta: Option<f64>,
    /// transformers 5 keeps `rope_theta` here.
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: bool,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ModelFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelFileError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelFileError::malformed(path, e.to_string()))
}

fn llama_config(
    path: &Path,
    hf: &HfConfig,
    max_seq: Option<usize>,
) -> Result<LlamaConfig, ModelFileError> {
    let unsupported = |what: String| Err(ModelFileError::unsupported(path, what));
    if let Some(t) = &hf.model_type
        && t != "llama"
    {
        return unsupported(format!("model_type {t:?}; this loader reads \"llama\""));
    }
    if let Some(act) = &hf.hidden_act
        && act != "silu"
    {
        return unsupported(format!("hidden_act {act:?} (the engine's MLP is SwiGLU)"));
    }
    if hf.attention_bias || hf.mlp_bias {
        return unsupported("biases in attention or the MLP".into());
    }
    let rope_type = hf
        .rope_scaling
        .as_ref()
        .or(hf.rope_parameters.as_ref())
        .and_then(|v| v.get("rope_type").or_else(|| v.get("type")))
        .and_then(|v| v.as_str());
    if let Some(t) = rope_type
        && t != "default"
    {
        return unsupported(format!("rope scaling {t:?}"));
    }
    let rope_theta = hf
        .rope_theta
        .or_else(|| hf.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
        .unwrap_or(10_000.0);
    let heads = hf.num_attention_heads;
    let head_dim = match hf.head_dim {
        Some(d) => d,
        None if heads > 0 && hf.hidden_size.is_multiple_of(heads) => hf.hidden_size / heads,
        None => {
            return Err(ModelFileError::malformed(
                path,
                "num_attention_heads does not divide hidden_size",
            ));
        }
    };
    let context = hf.max_position_embeddings.unwrap_or(2048);
    let config = LlamaConfig {
        hidden: hf.hidden_size,
        intermediate: hf.intermediate_size,
        layers: hf.num_hidden_layers,
        heads,
        kv_heads: hf.num_key_value_heads.unwrap_or(heads),
        head_dim,
        vocab_size: hf.vocab_size,
        rope_theta,
        rms_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        tie_embeddings: hf.tie_word_embeddings,
        max_seq: max_seq.map_or(context, |m| m.min(context)),
    };
    config.validate().map_err(|source| ModelFileError::Config {
        path: path.to_owned(),
        source,
    })?;
    Ok(config)
}

struct SafetensorsSource<'a> {
    path: PathBuf,
    tensors: SafeTensors<'a>,
}

impl TensorSource for SafetensorsSource<'_> {
    fn path(&self) -> &Path {
        &self.path
    }
    fn source_name(&self, hf: &str) -> Option<String> {
        Some(hf.to_string())
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.tensor(name).ok().map(|t| t.shape().to_vec())
    }
    fn read_into(&self, name: &str, out: &mut [f32]) -> Result<(), ModelFileError> {
        let view = self
            .tensors
            .tensor(name)
            .map_err(|_| ModelFileError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })?;
        let ty = match view.dtype() {
            Dtype::F32 => crate::quant::GgmlType::F32,
            Dtype::F16 => crate::quant::GgmlType::F16,
            Dtype::BF16 => crate::quant::GgmlType::Bf16,
            other => {
                return Err(ModelFileError::unsupported(
                    &self.path,
                    format!("tensor {name} is {other:?}; this loader reads F32, F16 and BF16"),
                ));
            }
        };
        // safetensors checked that the data length matches the shape and dtype.
        crate::quant::dequantize(ty, view.data(), out);
        Ok(())
    }
    fn names(&self) -> Vec<String> {
        self.tensors.names().into_iter().map(String::from).collect()
    }
    fn permuted_rotary(&self) -> bool {
        false
    }
    fn ignorable(&self, name: &str, config: &LlamaConfig) -> bool {
        // HF may save the tied head beside the embedding; the engine reads the embedding.
        name == "lm_head.weight" && config.tie_embeddings
    }
}

/// A token's text from `tokenizer_config.json` (a string, or an object with `content`).
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(obj) => obj
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

/// Loads the HF Llama directory `dir`.
pub fn load_hf_dir(dir: &Path, max_seq: Option<usize>) -> Result<Pretrained, ModelFileError> {
    let config_path = dir.join("config.json");
    let hf: HfConfig = read_json(&config_path)?;
    let config = llama_config(&config_path, &hf, max_seq)?;

    let weights_path = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights_path).map_err(|e| ModelFileError::io(&weights_path, e))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelFileError::malformed(&weights_path, e.to_string()))?;
    let source = SafetensorsSource {
        path: weights_path.clone(),
        tensors,
    };
    if !config.tie_embeddings && source.shape("lm_head.weight").is_none() {
        return Err(ModelFileError::MissingTensor {
            path: weights_path,
            name: "lm_head.weight (config.json says tie_word_embeddings is false)".into(),
        });
    }
    let params = read_params(&source, &config)?;
    drop(source);
    drop(bytes);

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
        ModelFileError::Tokenizer {
            path: tokenizer_path.clone(),
            what: e.to_string(),
        }
    })?;
    crate::tokenizer::check_vocab(&tokenizer_path, &tokenizer, config.vocab_size)?;

    let tc_path = dir.join("tokenizer_config.json");
    let tc: serde_json::Value = if tc_path.exists() {
        read_json(&tc_path)?
    } else {
        serde_json::Value::Null
    };
    let (bos, eos) = (
        token_text(tc.get("bos_token")),
        token_text(tc.get("eos_token")),
    );
    let jinja_path = dir.join("chat_template.jinja");
    let chat_template = if jinja_path.exists() {
        let source =
            std::fs::read_to_string(&jinja_path).map_err(|e| ModelFileError::io(&jinja_path, e))?;
        Some(ChatTemplate::new(&jinja_path, &source, &bos, &eos)?)
    } else {
        match tc.get("chat_template") {
            Some(serde_json::Value::String(source)) => {
                Some(ChatTemplate::new(&tc_path, source, &bos, &eos)?)
            }
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(|source| ChatTemplate::new(&tc_path, source, &bos, &eos))
                .transpose()?,
            _ => None,
        }
    };
    let id = |text: &str| {
        if text.is_empty() {
            None
        } else {
            tokenizer.token_to_id(text)
        }
    };
    Ok(Pretrained {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "hf".into()),
        path: dir.to_owned(),
        bos_token_id: id(&bos),
        eos_token_id: id(&eos),
        add_bos: false,
        config,
        params,
        tokenizer,
        chat_template,
    })
}
