//! Checkpoints as safetensors with HF GPT-2 tensor names, and export for HF transformers.
//!
//! A hivetrain checkpoint is a plain `model.safetensors` that HF's `GPT2LMHeadModel`
//! loads; hivetrain's own config travels in the file's metadata under
//! [`CONFIG_METADATA_KEY`], with any other string metadata the caller adds.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::{Architecture, GptConfig, ModelSpec, ParamLayout, TensorSpec, Trainable};

/// Metadata key holding the model's [`GptConfig`] as JSON.
pub const CONFIG_METADATA_KEY: &str = "hivetrain.config";

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "{path} has no hivetrain config in its metadata (key {CONFIG_METADATA_KEY}); was it written by hivetrain?"
    )]
    NoConfig { path: PathBuf },
    #[error("{path}: the config in its metadata is invalid: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("{path} lacks tensor {name}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {got:?}, the config needs {want:?}")]
    Shape {
        path: PathBuf,
        name: String,
        want: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: tensor {name} is {got:?}, expected F32")]
    Dtype {
        path: PathBuf,
        name: String,
        got: Dtype,
    },
    #[error("cannot serialize a checkpoint for {path}: {message}")]
    Serialize { path: PathBuf, message: String },
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub config: GptConfig,
    pub params: Vec<f32>,
    pub metadata: HashMap<String, String>,
}

/// Serializes parameters to safetensors bytes, with the config and `extra` as metadata.
///
/// The bytes depend only on the arguments: the metadata is written in key order. (The
/// `safetensors` crate, 0.8, writes its metadata from a `HashMap` in that map's random
/// iteration order, so the same checkpoint got another hash in every process; the
/// header is therefore written here, in the crate's layout otherwise: tensors in name
/// order, each `{"dtype", "shape", "data_offsets"}`, the header padded with spaces to a
/// multiple of 8 bytes.)
pub fn to_bytes(
    config: &GptConfig,
    params: &[f32],
    extra: &HashMap<String, String>,
) -> Result<Vec<u8>, String> {
    let layout = ParamLayout::new(config);
    if params.len() != layout.len() {
        return Err(format!(
            "parameter vector has {} floats, the config needs {}",
            params.len(),
            layout.len()
        ));
    }
    let config_json = serde_json::to_string(config).map_err(|e| e.to_string())?;
    tensors_to_bytes(
        layout.tensors(),
        0,
        params,
        extra,
        (CONFIG_METADATA_KEY, &config_json),
    )
}

/// Serializes `tensors` (their offsets, less `skip`, index `floats`) with `extra` and
/// `key` as metadata, deterministically (see [`to_bytes`]).
fn tensors_to_bytes(
    tensors: &[TensorSpec],
    skip: usize,
    floats: &[f32],
    extra: &HashMap<String, String>,
    key: (&str, &str),
) -> Result<Vec<u8>, String> {
    let mut metadata: BTreeMap<&str, &str> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    metadata.insert("format", "pt");
    metadata.insert(key.0, key.1);

    /// One tensor's header entry, its fields in the order the crate writes them.
    #[derive(serde::Serialize)]
    struct Entry<'a> {
        dtype: &'static str,
        shape: &'a [usize],
        data_offsets: [usize; 2],
    }
    let mut specs: Vec<_> = tensors.iter().collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let json = |e: serde_json::Error| e.to_string();
    let mut header = String::from("{\"__metadata__\":");
    header.push_str(&serde_json::to_string(&metadata).map_err(json)?);
    let mut offset = 0;
    for spec in &specs {
        let entry = Entry {
            dtype: "F32",
            shape: &spec.shape,
            data_offsets: [offset, offset + spec.len() * 4],
        };
        offset += spec.len() * 4;
        header.push(',');
        header.push_str(&serde_json::to_string(&spec.name).map_err(json)?);
        header.push(':');
        header.push_str(&serde_json::to_string(&entry).map_err(json)?);
    }
    header.push('}');
    let padded = header.len().next_multiple_of(8);
    let mut bytes = Vec::with_capacity(8 + padded + offset);
    bytes.extend_from_slice(&(padded as u64).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(8 + padded, b' ');
    let floats: &[u8] = bytemuck::cast_slice(floats);
    for spec in &specs {
        let start = (spec.offset - skip) * 4;
        bytes.extend_from_slice(&floats[start..start + spec.len() * 4]);
    }
    Ok(bytes)
}

/// Metadata key holding a trained-tensors file's [`ModelSpec`] as JSON.
pub const SPEC_METADATA_KEY: &str = "hivetrain.spec";

/// A version's trained tensors, read back.
#[derive(Debug, Clone)]
pub struct Trained {
    pub spec: ModelSpec,
    /// The trainable floats, in delta order ([`ModelSpec::trainable_len`]).
    pub trainable: Vec<f32>,
    pub metadata: HashMap<String, String>,
}

/// Serializes what a version of a run trains: its trainable floats (`trainable`, in delta
/// order), named as the spec's layout names them, with `extra` as metadata.
///
/// A GPT-2 with every tensor trained is written as [`to_bytes`] writes it (an HF
/// `GPT2LMHeadModel` checkpoint, its config under [`CONFIG_METADATA_KEY`]): the bytes of
/// every GPT-2 version are what they were. Any other spec is written with the spec under
/// [`SPEC_METADATA_KEY`] and only the trainable tensors: a LoRA adapter under PEFT's
/// names (so the file is a PEFT `adapter_model.safetensors`), a Llama trained in full
/// under HF's (a `LlamaForCausalLM` `model.safetensors`). The frozen base is not in it;
/// the run names the base by its content hash.
pub fn trained_to_bytes(
    spec: &ModelSpec,
    trainable: &[f32],
    extra: &HashMap<String, String>,
) -> Result<Vec<u8>, String> {
    if trainable.len() != spec.trainable_len() {
        return Err(format!(
            "the trainable vector has {} floats, model {} trains {}",
            trainable.len(),
            spec.name,
            spec.trainable_len()
        ));
    }
    if let (Architecture::Gpt2(config), Trainable::All) = (&spec.architecture, &spec.trainable) {
        return to_bytes(config, trainable, extra);
    }
    let spec_json = serde_json::to_string(spec).map_err(|e| e.to_string())?;
    let skip = spec.n_params() - spec.trainable_len();
    tensors_to_bytes(
        &spec.trainable_tensors(),
        skip,
        trainable,
        extra,
        (SPEC_METADATA_KEY, &spec_json),
    )
}

/// Parses what [`trained_to_bytes`] wrote for `spec`; a file written for another spec
/// (another shape, adapter or trainable layout) is refused as [`CheckpointError::BadConfig`].
/// `path` only names the source in errors.
pub fn trained_from_bytes(
    path: &Path,
    bytes: &[u8],
    spec: &ModelSpec,
) -> Result<Trained, CheckpointError> {
    if let (Architecture::Gpt2(config), Trainable::All) = (&spec.architecture, &spec.trainable) {
        let ckpt = from_bytes(path, bytes, None)?;
        if ckpt.config != *config {
            return Err(CheckpointError::BadConfig {
                path: path.to_owned(),
                message: format!(
                    "it holds a GPT-2 of {:?}, the run's model is {:?}",
                    ckpt.config, config
                ),
            });
        }
        return Ok(Trained {
            spec: spec.clone(),
            trainable: ckpt.params,
            metadata: ckpt.metadata,
        });
    }
    let (tensors, metadata) = open(path, bytes)?;
    let json = metadata
        .get(SPEC_METADATA_KEY)
        .ok_or_else(|| CheckpointError::NoConfig {
            path: path.to_owned(),
        })?;
    let stored: ModelSpec = serde_json::from_str(json).map_err(|e| CheckpointError::BadConfig {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if stored != *spec {
        return Err(CheckpointError::BadConfig {
            path: path.to_owned(),
            message: format!(
                "it was written for model {}, the run's model is {}",
                stored.id(),
                spec.id()
            ),
        });
    }
    let skip = spec.n_params() - spec.trainable_len();
    let mut trainable = vec![0.0f32; spec.trainable_len()];
    read_tensors(
        path,
        &tensors,
        &spec.trainable_tensors(),
        skip,
        &mut trainable,
    )?;
    Ok(Trained {
        spec: spec.clone(),
        trainable,
        metadata,
    })
}

/// The tensors and metadata of safetensors `bytes`.
fn open<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<(SafeTensors<'a>, HashMap<String, String>), CheckpointError> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Format {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let metadata: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Format {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok((tensors, metadata))
}

/// Copies each of `specs` (their offsets, less `skip`, index `out`) from `tensors`,
/// checking its presence, dtype and shape.
fn read_tensors(
    path: &Path,
    tensors: &SafeTensors<'_>,
    specs: &[TensorSpec],
    skip: usize,
    out: &mut [f32],
) -> Result<(), CheckpointError> {
    let p = || path.to_owned();
    for spec in specs {
        let view = tensors
            .tensor(&spec.name)
            .map_err(|_| CheckpointError::MissingTensor {
                path: p(),
                name: spec.name.clone(),
            })?;
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Dtype {
                path: p(),
                name: spec.name.clone(),
                got: view.dtype(),
            });
        }
        if view.shape() != spec.shape.as_slice() {
            return Err(CheckpointError::Shape {
                path: p(),
                name: spec.name.clone(),
                want: spec.shape.clone(),
                got: view.shape().to_vec(),
            });
        }
        let start = spec.offset - skip;
        for (dst, src) in out[start..start + spec.len()]
            .iter_mut()
            .zip(view.data().chunks_exact(4))
        {
            *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        }
    }
    Ok(())
}

/// Writes a checkpoint atomically (temp file, fsync, rename).
pub fn save(
    path: &Path,
    config: &GptConfig,
    params: &[f32],
    extra: &HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let bytes = to_bytes(config, params, extra).map_err(|message| CheckpointError::Serialize {
        path: path.to_owned(),
        message,
    })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let err = |source| CheckpointError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads a checkpoint written by [`save`] (or exported for HF by hivetrain).
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_bytes(path, &bytes, None)
}

/// Parses checkpoint bytes. `config` overrides the config in the metadata (for files
/// that lack one); `path` only names the source in errors.
pub fn from_bytes(
    path: &Path,
    bytes: &[u8],
    config: Option<GptConfig>,
) -> Result<Checkpoint, CheckpointError> {
    let p = || path.to_owned();
    let (tensors, metadata) = open(path, bytes)?;
    let config = match config {
        Some(config) => config,
        None => {
            let json = metadata
                .get(CONFIG_METADATA_KEY)
                .ok_or_else(|| CheckpointError::NoConfig { path: p() })?;
            serde_json::from_str::<GptConfig>(json).map_err(|e| CheckpointError::BadConfig {
                path: p(),
                message: e.to_string(),
            })?
        }
    };
    config.validate().map_err(|e| CheckpointError::BadConfig {
        path: p(),
        message: e.to_string(),
    })?;
    let layout = ParamLayout::new(&config);
    let mut params = vec![0.0f32; layout.len()];
    read_tensors(path, &tensors, layout.tensors(), 0, &mut params)?;
    Ok(Checkpoint {
        config,
        params,
        metadata,
    })
}

/// The `config.json` HF transformers needs to load the model as `GPT2LMHeadModel`.
pub fn hf_config_json(config: &GptConfig, eos_token_id: Option<u32>) -> serde_json::Value {
    let eos = eos_token_id.unwrap_or(0);
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "use_cache": true,
        "tie_word_embeddings": true,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LlamaConfig, LoraConfig, LoraTarget, Preset};

    fn micro() -> LlamaConfig {
        LlamaConfig {
            hidden: 8,
            intermediate: 12,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            vocab_size: 11,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            tie_embeddings: true,
            max_seq: 4,
        }
    }

    fn lora(rank: usize) -> LoraConfig {
        LoraConfig {
            rank,
            alpha: 4.0,
            targets: vec![LoraTarget::Q, LoraTarget::Down],
        }
    }

    /// Writes `spec`'s trainable floats (0, 1, 2, ...), reads them back as `read_as`, and
    /// prints the tensor names written and what reading gives.
    #[track_caller]
    fn check(spec: &ModelSpec, read_as: &ModelSpec, expect: expect_test::Expect) {
        let trainable: Vec<f32> = (0..spec.trainable_len()).map(|i| i as f32).collect();
        let extra = HashMap::from([("hivetrain.version".to_owned(), "3".to_owned())]);
        let bytes = trained_to_bytes(spec, &trainable, &extra).expect("write");
        assert_eq!(
            bytes,
            trained_to_bytes(spec, &trainable, &extra).expect("again")
        );
        let (tensors, _) = open(Path::new("v3"), &bytes).expect("safetensors");
        let mut names = tensors.names();
        names.sort();
        let read = match trained_from_bytes(Path::new("v3"), &bytes, read_as) {
            Ok(t) => {
                assert_eq!(
                    t.trainable, trainable,
                    "the floats come back in delta order"
                );
                format!("version {}", t.metadata["hivetrain.version"])
            }
            Err(e) => e.to_string(),
        };
        expect.assert_eq(&format!(
            "{} tensors, first {}: {read}",
            names.len(),
            names[0]
        ));
    }

    #[test]
    fn a_version_holds_its_trained_tensors_under_their_names() {
        let gpt = ModelSpec::preset(Preset::Tiny, 50);
        check(
            &gpt,
            &gpt,
            expect_test::expect!["28 tensors, first transformer.h.0.attn.c_attn.bias: version 3"],
        );
        let adapter = ModelSpec::llama_lora("micro", micro(), lora(2));
        check(
            &adapter,
            &adapter,
            expect_test::expect![
                "8 tensors, first base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: version 3"
            ],
        );
        check(
            &adapter,
            &ModelSpec::llama_lora("micro", micro(), lora(3)),
            expect_test::expect![
                "8 tensors, first base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: v3: the config in its metadata is invalid: it was written for model micro-32bd0c86b24fc1b6, the run's model is micro-994b79e48b48c655"
            ],
        );
        let full = ModelSpec::llama("micro", micro());
        check(
            &full,
            &full,
            expect_test::expect!["20 tensors, first model.embed_tokens.weight: version 3"],
        );
        check(
            &full,
            &ModelSpec::preset(Preset::Tiny, 50),
            expect_test::expect![
                "20 tensors, first model.embed_tokens.weight: v3 has no hivetrain config in its metadata (key hivetrain.config); was it written by hivetrain?"
            ],
        );
    }
}
