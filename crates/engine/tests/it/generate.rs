//! KV-cache decoding agrees with the full forward pass, and sampling is seeded.

use engine::Preset;
use engine::generate::{SamplingParams, generate};
use engine::train::OwnedBatch;

use crate::backend;

#[test]
fn decode_logits_match_full_forward_loss() {
    // The loss of the full forward at every position equals -log softmax of the
    // decoded logits at the target, so both paths compute the same function.
    let config = Preset::Tiny.config(97);
    let params = engine::init_params(&config, 9).expect("init");
    let mut model = backend(config, params, 2);
    let seq: Vec<u32> = crate::tokens(21, 97, 4);
    let batch = OwnedBatch {
        inputs: seq[..20].to_vec(),
        targets: seq[1..].to_vec(),
        batch: 1,
        seq: 20,
    };
    let full = model.eval_loss(&batch.as_batch()).expect("loss") as f64;
    model.decode_reset();
    let mut total = 0.0f64;
    for i in 0..20 {
        let logits = model.decode_step(seq[i]).expect("decode");
        let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = max
            + logits
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        total += lse - logits[seq[i + 1] as usize] as f64;
    }
    let decoded = total / 20.0;
    assert!(
        (full - decoded).abs() < 1e-4,
        "full {full} vs decoded {decoded}"
    );
}

#[test]
fn same_seed_same_text_and_greedy_is_stable() {
    let config = Preset::Tiny.config(97);
    let params = engine::init_params(&config, 9).expect("init");
    let mut model = backend(config, params, 1);
    let sampling = SamplingParams {
        seed: 5,
        ..SamplingParams::default()
    };
    let a = generate(model.as_mut(), &[1, 2, 3], 100, &sampling, &mut |_| true).expect("generate");
    let b = generate(model.as_mut(), &[1, 2, 3], 100, &sampling, &mut |_| true).expect("generate");
    assert_eq!(a, b);
    assert_eq!(
        a.len(),
        100,
        "generation goes past the context of 64 by sliding"
    );
    let greedy = SamplingParams {
        temperature: 0.0,
        ..sampling
    };
    let c = generate(model.as_mut(), &[1, 2, 3], 10, &greedy, &mut |_| true).expect("generate");
    let d = generate(
        model.as_mut(),
        &[1, 2, 3],
        10,
        &SamplingParams { seed: 99, ..greedy },
        &mut |_| true,
    )
    .expect("generate");
    assert_eq!(c, d, "greedy ignores the seed");
}

/// A Llama decoded token by token with its KV cache gives the logits of the full
/// forward pass at every position, tied head or not; greedy generation picks, at each
/// step, the argmax of a full forward over everything before it.
#[test]
fn llama_decode_matches_full_forward_logits_and_greedy_tokens() {
    for tie in [false, true] {
        let config = engine::LlamaConfig {
            max_seq: 24,
            ..crate::micro_llama(tie)
        };
        let spec = engine::ModelSpec::llama("micro", config);
        let mut params = spec.init_params(9).expect("init");
        // Larger weights than the initialization's (as gradcheck's), so logits differ
        // widely. Much larger ones make attention scores of hundreds, where one ulp of a
        // score moves a probability by 1e-5 and the comparison measures that instead.
        params.iter_mut().for_each(|p| *p *= 3.0);
        let mut full = engine::llama::cpu::LlamaCpuBackend::open(
            config,
            params.clone(),
            2,
            engine::Purpose::Eval,
        )
        .expect("backend");
        let seq: Vec<u32> = crate::tokens(20, config.vocab_size, 4);
        let want = full.logits(&seq).expect("logits").to_vec();
        let mut model = crate::spec_backend(&spec, params, 1);
        model.decode_reset();
        let v = config.vocab_size;
        let mut worst = 0.0f32;
        for (i, &token) in seq.iter().enumerate() {
            let got = model.decode_step(token).expect("decode");
            for (g, w) in got.iter().zip(&want[i * v..(i + 1) * v]) {
                worst = worst.max((g - w).abs() / (1.0 + w.abs()));
            }
        }
        // The two paths sum the same products in different orders (one row against
        // many in gemm, dot products against gemm tiles): f32 rounding, a few ulp of
        // each of a few hundred terms. Measured: 1.6e-6 untied, 2.1e-6 tied.
        assert!(
            worst < 1e-5,
            "tie {tie}: decode differs from forward by {worst:e}"
        );

        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let prompt = &seq[..5];
        let out = generate(model.as_mut(), prompt, 10, &greedy, &mut |_| true).expect("generate");
        let mut context = prompt.to_vec();
        for &next in &out {
            let logits = full.logits(&context).expect("logits");
            let last = &logits[(context.len() - 1) * v..];
            let argmax = (0..v).fold(0, |best, j| if last[j] > last[best] { j } else { best });
            assert_eq!(
                next as usize, argmax,
                "tie {tie}: greedy token after {context:?}"
            );
            context.push(next);
        }
    }
}

/// A prompt fed in one prefill pass gives the logits of feeding it token by token, for
/// every architecture (and a LoRA adapter), from an empty cache and from a later
/// position, in passes of up to 256 rows; greedy generation (which prefills) picks the
/// tokens a token-by-token greedy loop picks. The snapshot is the generated tokens.
#[test]
fn prefill_matches_token_by_token_decoding() {
    let llama = |tie, max_seq| engine::LlamaConfig {
        max_seq,
        ..crate::micro_llama(tie)
    };
    let gpt2 = Preset::Tiny.config(97);
    use engine::ModelSpec;
    check_prefill(
        ModelSpec::gpt2("tiny-gpt2", gpt2),
        20,
        expect_test::expect!["[56, 56, 56, 56, 78, 78, 56, 56]"],
    );
    check_prefill(
        ModelSpec::llama("micro-llama-tied", llama(true, 24)),
        9,
        expect_test::expect!["[15, 15, 15, 15, 15, 15, 15, 15]"],
    );
    check_prefill(
        ModelSpec::llama("micro-llama-untied", llama(false, 24)),
        9,
        expect_test::expect!["[20, 30, 20, 4, 25, 25, 25, 25]"],
    );
    check_prefill(
        ModelSpec::llama_lora("micro-lora", llama(false, 24), crate::micro_lora()),
        9,
        expect_test::expect!["[4, 25, 22, 20, 25, 25, 25, 25]"],
    );
    // Past one pass of 256 rows: the second pass attends to the first's cache.
    check_prefill(
        ModelSpec::llama("micro-llama-long", llama(true, 300)),
        270,
        expect_test::expect!["[34, 34, 34, 34, 34, 34, 34, 34]"],
    );
}

/// Largest difference between prefill and token-by-token logits, relative to `1 + |x|`.
/// Both sum the same products, gemm over many rows against one row at a time: f32
/// rounding of a few hundred terms.
const PREFILL_TOLERANCE: f32 = 1e-5;

#[track_caller]
fn check_prefill(spec: engine::ModelSpec, prompt_len: usize, expect: expect_test::Expect) {
    let mut params = spec.init_params(9).expect("init");
    // Larger weights than the initialization's, so the logits differ widely (as in
    // `llama_decode_matches_full_forward_logits_and_greedy_tokens`).
    params.iter_mut().for_each(|p| *p *= 3.0);
    if matches!(spec.trainable, engine::Trainable::Lora(_)) {
        // An adapter starts as zero (B is); give it weights so that it counts.
        let base = params.len() - spec.trainable_len();
        for (i, p) in params[base..].iter_mut().enumerate() {
            *p = ((i * 7919 % 17) as f32 - 8.0) / 20.0;
        }
    }
    let mut model = crate::spec_backend(&spec, params, 2);
    let vocab = spec.architecture.vocab_size();
    let seq: Vec<u32> = crate::tokens(prompt_len + 4, vocab, 3);
    let (prompt, later) = seq.split_at(prompt_len);
    let compare = |got: &[f32], want: &[f32], what: &str| {
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
            .fold(0.0f32, f32::max);
        assert!(
            worst < PREFILL_TOLERANCE,
            "{}: {what}: prefill differs by {worst:e}",
            spec.name
        );
    };

    // Token by token: the logits after the prompt, and after the later tokens.
    model.decode_reset();
    let mut stepped = Vec::new();
    for &token in prompt {
        stepped = model.decode_step(token).expect("step").to_vec();
    }
    let mut stepped_later = Vec::new();
    for &token in later {
        stepped_later = model.decode_step(token).expect("step").to_vec();
    }
    // In passes: the prompt, then the later tokens at positions past it.
    model.decode_reset();
    let got = model.decode_prefill(prompt).expect("prefill").to_vec();
    compare(&got, &stepped, "after the prompt");
    let got = model.decode_prefill(later).expect("prefill").to_vec();
    compare(&got, &stepped_later, "after a second prefill");

    // Greedy: `generate` prefills; the reference loop steps one token at a time.
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let n_ctx = spec.architecture.n_ctx();
    let max_tokens = (n_ctx - prompt_len).min(8);
    let generated =
        generate(model.as_mut(), prompt, max_tokens, &greedy, &mut |_| true).expect("generate");
    model.decode_reset();
    let mut logits = Vec::new();
    for &token in prompt {
        logits = model.decode_step(token).expect("step").to_vec();
    }
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let mut stepped_tokens = Vec::new();
    for _ in 0..max_tokens {
        let next = engine::generate::sample(&logits, &greedy, &mut rng);
        stepped_tokens.push(next);
        logits = model.decode_step(next).expect("step").to_vec();
    }
    assert_eq!(generated, stepped_tokens, "{}: greedy tokens", spec.name);
    expect.assert_eq(&format!("{generated:?}"));
}
