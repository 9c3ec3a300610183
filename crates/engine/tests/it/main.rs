//! Integration tests of the engine through its public API.

mod checkpoint;
mod cuda;
mod cuda_llama;
mod determinism;
mod generate;
mod golden;
mod gradcheck;
mod lora;
mod purpose;

use engine::train::OwnedBatch;
use engine::{Backend, GptConfig, LlamaConfig, LoraConfig, LoraTarget, ModelSpec};

/// A model small enough for finite differences but with every part present.
pub(crate) fn micro_config() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        n_ctx: 8,
        vocab_size: 37,
    }
}

/// A Llama small enough for finite differences, with every part present: grouped
/// query heads (4 over 2), a head width whose product with the heads (24) is not the
/// hidden width (16), and a tied or untied head.
pub(crate) fn micro_llama(tie_embeddings: bool) -> LlamaConfig {
    LlamaConfig {
        hidden: 16,
        intermediate: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 6,
        vocab_size: 37,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        tie_embeddings,
        max_seq: 8,
    }
}

/// A LoRA adapter on every projection, rank 2, alpha 3 (a scale of 1.5, so a missing or
/// doubled scale shows).
pub(crate) fn micro_lora() -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 3.0,
        targets: LoraTarget::ALL.to_vec(),
    }
}

/// The micro models of every architecture and trainable layout, as specs.
pub(crate) fn micro_specs() -> Vec<ModelSpec> {
    vec![
        ModelSpec::gpt2("micro-gpt2", micro_config()),
        ModelSpec::llama("micro-llama-tied", micro_llama(true)),
        ModelSpec::llama("micro-llama-untied", micro_llama(false)),
        ModelSpec::llama_lora("micro-lora-tied", micro_llama(true), micro_lora()),
        ModelSpec::llama_lora("micro-lora-untied", micro_llama(false), micro_lora()),
    ]
}

/// A backend of `spec` on `threads` threads, through the spec's own constructor.
pub(crate) fn spec_backend(spec: &ModelSpec, params: Vec<f32>, threads: usize) -> Box<dyn Backend> {
    engine::open_model(
        &format!("cpu:{threads}"),
        spec,
        params,
        engine::Purpose::Train,
    )
    .expect("cpu backend")
}

/// `b x t` windows of pseudo-random tokens in `vocab`.
pub(crate) fn vocab_batch(vocab: usize, b: usize, t: usize, salt: usize) -> OwnedBatch {
    let all = tokens(b * t + 1, vocab, salt);
    OwnedBatch {
        inputs: all[..b * t].to_vec(),
        targets: all[1..].to_vec(),
        batch: b,
        seq: t,
    }
}

/// Deterministic pseudo-random tokens.
pub(crate) fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((((i + salt) * 2_654_435_761usize) >> 7) % vocab) as u32)
        .collect()
}

pub(crate) fn backend(config: GptConfig, params: Vec<f32>, threads: usize) -> Box<dyn Backend> {
    engine::open_backend(&format!("cpu:{threads}"), config, params).expect("cpu backend")
}
