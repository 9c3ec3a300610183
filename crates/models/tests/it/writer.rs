//! A small GGUF v3 writer and a tiny random Llama with a byte-level BPE tokenizer: the
//! material of the tests.

use engine::{LlamaConfig, LlamaLayout};
use half::f16;
use models::llama::{gguf_name, permute_rows};
use rand::{Rng, SeedableRng};

/// A metadata value as written.
#[derive(Clone, Debug)]
pub(crate) enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    /// A raw type id and payload, for malformed files.
    Raw(u32, Vec<u8>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Meta {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Bool(b) => {
                out.extend(7u32.to_le_bytes());
                out.push(*b as u8);
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(out, s);
            }
            Meta::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    put_str(out, s);
                }
            }
            Meta::I32s(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for x in items {
                    out.extend(x.to_le_bytes());
                }
            }
            Meta::Raw(type_id, payload) => {
                out.extend(type_id.to_le_bytes());
                out.extend(payload);
            }
        }
    }
}

/// One tensor as written: GGUF dims (`ne0` first), ggml type id, data.
#[derive(Clone, Debug)]
pub(crate) struct Tensor {
    pub(crate) name: String,
    pub(crate) dims: Vec<u64>,
    pub(crate) type_id: u32,
    pub(crate) data: Vec<u8>,
}

/// A GGUF file's parts, to be edited by a test and then written.
#[derive(Clone, Debug)]
pub(crate) struct GgufFile {
    pub(crate) version: u32,
    pub(crate) metadata: Vec<(String, Meta)>,
    pub(crate) tensors: Vec<Tensor>,
}

impl GgufFile {
    pub(crate) fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            value.write(&mut out);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset += (t.data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        let start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend(&t.data);
        }
        out
    }

    pub(crate) fn set(&mut self, key: &str, value: Meta) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value,
            None => self.metadata.push((key.into(), value)),
        }
    }

    pub(crate) fn tensor_mut(&mut self, name: &str) -> &mut Tensor {
        match self.tensors.iter_mut().find(|t| t.name == name) {
            Some(t) => t,
            None => panic!("no tensor {name}"),
        }
    }
}

/// How the test model's tensors are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Storage {
    /// Everything F32, q and k permuted as llama.cpp does.
    F32,
    /// Everything F32, q and k left in HF's order (a wrong file).
    F32Unpermuted,
    /// Matrices Q4_1, the embedding Q8_0, norms F32: SmolLM2's mix.
    Quantized,
}

/// GPT-2's map from bytes to the printable characters byte-level BPE uses.
pub(crate) fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('?')
            }
        })
        .collect()
}

pub(crate) const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub(crate) const MERGES: [&str; 8] = [
    "H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d",
];

/// Vocabulary: 3 control tokens, the 256 byte characters, then one token per merge.
pub(crate) fn vocab() -> Vec<String> {
    let mut v: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    v.extend(byte_chars().into_iter().map(String::from));
    v.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    v
}

pub(crate) fn tiny_config(tie_embeddings: bool) -> LlamaConfig {
    LlamaConfig {
        hidden: 64,
        intermediate: 96,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        vocab_size: vocab().len(),
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        tie_embeddings,
        max_seq: 64,
    }
}

/// Random parameters with norms away from one, so that a swapped norm shows.
pub(crate) fn random_params(config: &LlamaConfig, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let layout = LlamaLayout::new(config);
    let mut params = vec![0.0; layout.table().len()];
    for spec in layout.table().tensors() {
        let scale = if spec.shape.len() == 1 { 0.5 } else { 0.3 };
        let base = if spec.shape.len() == 1 { 1.0 } else { 0.0 };
        for x in &mut params[spec.range()] {
            *x = base + scale * (rng.random::<f32>() * 2.0 - 1.0);
        }
    }
    params
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Q8_0 blocks of `x` (a whole number of 32s) and the values they hold.
pub(crate) fn quantize_q8_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut out, mut back) = (Vec::new(), Vec::new());
    for block in x.chunks(32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0);
        let df = d.to_f32();
        out.extend(d.to_le_bytes());
        for &v in block {
            let q = if df == 0.0 {
                0
            } else {
                (v / df).round().clamp(-127.0, 127.0) as i8
            };
            out.push(q as u8);
            back.push(q as f32 * df);
        }
    }
    (out, back)
}

/// Q4_1 blocks of `x` and the values they hold.
pub(crate) fn quantize_q4_1(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut out, mut back) = (Vec::new(), Vec::new());
    for block in x.chunks(32) {
        let min = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let (d, m) = (f16::from_f32((max - min) / 15.0), f16::from_f32(min));
        let (df, mf) = (d.to_f32(), m.to_f32());
        out.extend(d.to_le_bytes());
        out.extend(m.to_le_bytes());
        let q: Vec<u8> = block
            .iter()
            .map(|&v| {
                if df == 0.0 {
                    0
                } else {
                    ((v - mf) / df).round().clamp(0.0, 15.0) as u8
                }
            })
            .collect();
        for j in 0..16 {
            out.push(q[j] | (q[j + 16] << 4));
        }
        back.extend(q.iter().map(|&q| q as f32 * df + mf));
    }
    (out, back)
}

/// `params` of `config` as a GGUF file with SmolLM2's metadata keys, and the values a
/// correct loader must produce (the params after quantization).
pub(crate) fn llama_gguf(
    config: &LlamaConfig,
    params: &[f32],
    storage: Storage,
) -> (GgufFile, Vec<f32>) {
    let layout = LlamaLayout::new(config);
    let mut expected = params.to_vec();
    let mut tensors = Vec::new();
    for spec in layout.table().tensors() {
        let name =
            gguf_name(&spec.name).unwrap_or_else(|| panic!("no GGUF name for {}", spec.name));
        let mut values = params[spec.range()].to_vec();
        let heads = if spec.name.ends_with("q_proj.weight") {
            Some(config.heads)
        } else if spec.name.ends_with("k_proj.weight") {
            Some(config.kv_heads)
        } else {
            None
        };
        if let (Some(h), true) = (heads, storage != Storage::F32Unpermuted) {
            values = permute_rows(&values, h, config.head_dim, config.hidden);
        }
        let (type_id, data, stored) = match (storage, spec.shape.len()) {
            (Storage::Quantized, 2) if spec.name == "model.embed_tokens.weight" => {
                let (d, b) = quantize_q8_0(&values);
                (8, d, b)
            }
            (Storage::Quantized, 2) => {
                let (d, b) = quantize_q4_1(&values);
                (3, d, b)
            }
            _ => (0, f32_bytes(&values), values.clone()),
        };
        let stored = match heads {
            Some(h) if storage != Storage::F32Unpermuted => {
                models::llama::unpermute_rows(&stored, h, config.head_dim, config.hidden)
            }
            _ => stored,
        };
        expected[spec.range()].copy_from_slice(&stored);
        tensors.push(Tensor {
            name,
            dims: spec.shape.iter().rev().map(|&d| d as u64).collect(),
            type_id,
            data,
        });
    }
    let vocab = vocab();
    let types: Vec<i32> = (0..vocab.len())
        .map(|i| if i < SPECIALS.len() { 3 } else { 1 })
        .collect();
    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let metadata = vec![
        ("general.architecture".into(), Meta::Str("llama".into())),
        ("general.name".into(), Meta::Str("tiny".into())),
        ("llama.block_count".into(), Meta::U32(config.layers as u32)),
        (
            "llama.context_length".into(),
            Meta::U32(config.max_seq as u32),
        ),
        (
            "llama.embedding_length".into(),
            Meta::U32(config.hidden as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Meta::U32(config.intermediate as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Meta::U32(config.heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Meta::U32(config.kv_heads as u32),
        ),
        (
            "llama.rope.freq_base".into(),
            Meta::F32(config.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Meta::F32(config.rms_eps as f32),
        ),
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Meta::Strs(vocab)),
        ("tokenizer.ggml.token_type".into(), Meta::I32s(types)),
        (
            "tokenizer.ggml.merges".into(),
            Meta::Strs(MERGES.iter().map(|m| m.to_string()).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Meta::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(false)),
        ("tokenizer.chat_template".into(), Meta::Str(template.into())),
    ];
    (
        GgufFile {
            version: 3,
            metadata,
            tensors,
        },
        expected,
    )
}

/// The logits of every position of `tokens` from the engine's full forward pass.
pub(crate) fn logits(config: &LlamaConfig, params: Vec<f32>, tokens: &[u32]) -> Vec<f32> {
    let mut backend =
        engine::llama::cpu::LlamaCpuBackend::open(*config, params, 1, engine::Purpose::Eval)
            .unwrap_or_else(|e| panic!("opening the engine: {e}"));
    match backend.logits(tokens) {
        Ok(l) => l.to_vec(),
        Err(e) => panic!("logits: {e}"),
    }
}
