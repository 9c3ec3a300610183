//! Sampling from the model with a KV cache: temperature, top-k, top-p, seed.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{Backend, EngineError};

/// How to pick each next token.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher flattens the distribution.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 keeps all).
    pub top_p: f32,
    /// Seed of the sampler; the same seed, weights and prompt give the same text.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
        }
    }
}

/// Picks a token from `logits`.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if params.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let max = logits[order[0] as usize];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i as usize] - max) / params.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (p, &i) in probs.iter().zip(&order) {
        if u < *p {
            return i;
        }
        u -= p;
    }
    order[order.len() - 1]
}

/// Generates up to `max_tokens` tokens after `prompt`, calling `on_token` with each;
/// stops early when `on_token` returns false. The prompt is fed in one prefill pass
/// ([`Backend::decode_prefill`]). When the context fills up, the cache is rebuilt from
/// the most recent half of the context and generation goes on.
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    max_tokens: usize,
    params: &SamplingParams,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Vec<u32>, EngineError> {
    let n_ctx = backend.architecture().n_ctx();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(params.seed);
    let mut context: Vec<u32> = if prompt.is_empty() {
        vec![0]
    } else {
        prompt.to_vec()
    };
    if context.len() > n_ctx {
        context.drain(..context.len() - n_ctx);
    }
    let mut out = Vec::new();
    backend.decode_reset();
    let mut fed = 0;
    for _ in 0..max_tokens {
        if context.len() >= n_ctx {
            context.drain(..context.len() - n_ctx / 2);
            backend.decode_reset();
            fed = 0;
        }
        // The prompt (or the context kept after a slide) goes in as one prefill; after
        // that, one token per step.
        let logits = backend.decode_prefill(&context[fed..])?;
        fed = context.len();
        let next = sample(logits, params, &mut rng);
        out.push(next);
        context.push(next);
        if !on_token(next) {
            break;
        }
    }
    Ok(out)
}
