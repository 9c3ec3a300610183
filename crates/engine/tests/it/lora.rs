//! LoRA on a frozen Llama: the merged model computes what the adapter does, only the
//! adapter trains, and a LoRA training backend is much smaller than a full one.

use engine::llama::cpu::LlamaCpuBackend;
use engine::{Backend, LlamaConfig, ModelSpec, OptimizerConfig, Purpose};

use crate::{micro_llama, micro_lora, spec_backend, vocab_batch};

/// The full vector of a LoRA spec with every `B` set to small non-zero values, so the
/// adapter changes the model.
fn adapted_params(spec: &ModelSpec) -> Vec<f32> {
    let mut params = spec.init_params(5).expect("init");
    for tensor in spec.layout().tensors() {
        if tensor.name.ends_with("lora_B.weight") {
            for (k, i) in tensor.range().enumerate() {
                params[i] = ((k * 37 % 19) as f32 - 9.0) * 0.02;
            }
        }
    }
    params
}

/// The logits of every position from the adapter path and from the merged weights
/// `W + (alpha / r) B A` agree to float32 rounding, and differ from the base's.
#[track_caller]
fn check_merge(config: LlamaConfig) {
    let lora = micro_lora();
    let spec = ModelSpec::llama_lora("micro-lora", config, lora.clone());
    let params = adapted_params(&spec);
    let base_len = spec.base_len();
    let tokens = crate::tokens(config.max_seq, config.vocab_size, 3);
    let mut adapted =
        LlamaCpuBackend::open_lora(config, lora.clone(), params.clone(), 2, Purpose::Eval)
            .expect("open");
    let want = adapted.logits(&tokens).expect("logits").to_vec();
    let merged = engine::lora::merge(&config, &lora, &params[..base_len], &params[base_len..]);
    let mut plain = LlamaCpuBackend::open(config, merged, 2, Purpose::Eval).expect("open");
    let got = plain.logits(&tokens).expect("logits").to_vec();
    let mut base =
        LlamaCpuBackend::open(config, params[..base_len].to_vec(), 2, Purpose::Eval).expect("open");
    let unadapted = base.logits(&tokens).expect("logits").to_vec();
    let max_diff = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(
        max_diff(&got, &want) < 2e-5,
        "merged {}",
        max_diff(&got, &want)
    );
    assert!(
        max_diff(&unadapted, &want) > 1e-3,
        "the adapter changes nothing"
    );
    // KV-cache decoding with the adapter reproduces the full forward's last row.
    let v = config.vocab_size;
    let mut last = Vec::new();
    for &token in &tokens {
        last = adapted.decode_step(token).expect("decode").to_vec();
    }
    let full_last = &want[(tokens.len() - 1) * v..];
    assert!(max_diff(&last, full_last) < 2e-5, "decode");
}

#[test]
fn merged_weights_give_the_adapter_s_logits() {
    check_merge(micro_llama(true));
    check_merge(micro_llama(false));
}

/// Steps move the adapter and leave every bit of the base; at PEFT's init (B = 0) the
/// adapted model's loss is the base's; the trainable vector is the full one's tail.
#[test]
fn only_the_adapter_trains() {
    let config = micro_llama(false);
    let spec = ModelSpec::llama_lora("micro-lora", config, micro_lora());
    let params = spec.init_params(9).expect("init");
    let base_len = spec.base_len();
    let data = vocab_batch(config.vocab_size, 2, config.max_seq, 4);
    let mut model = spec_backend(&spec, params.clone(), 2);
    let mut base = spec_backend(
        &ModelSpec::llama("base", config),
        params[..base_len].to_vec(),
        2,
    );
    let loss = model.eval_loss(&data.as_batch()).expect("loss");
    let base_loss = base.eval_loss(&data.as_batch()).expect("loss");
    assert_eq!(loss.to_bits(), base_loss.to_bits());
    assert_eq!(model.trainable(), params[base_len..].to_vec());
    for _ in 0..3 {
        model
            .train_step(&data.as_batch(), &OptimizerConfig::default(), 1e-2)
            .expect("step");
    }
    let after = model.params();
    assert_eq!(after.len(), params.len());
    assert!(after[..base_len] == params[..base_len], "the base moved");
    assert!(
        after[base_len..] != params[base_len..],
        "the adapter did not move"
    );
    assert_eq!(model.trainable(), after[base_len..].to_vec());
    let (_, grad) = model.loss_and_grad(&data.as_batch()).expect("grad");
    assert_eq!(grad.len(), spec.trainable_len());
    // set_trainable replaces the adapter alone, and a wrong length is an error.
    model.set_trainable(&params[base_len..]).expect("set");
    assert_eq!(model.params(), params);
    let err = model
        .set_trainable(&params)
        .map_or_else(|e| e.to_string(), |()| "ok".into());
    expect_test::expect!["parameter vector has 6896 floats, the model has 1024"].assert_eq(&err);
    let loss_again = model.eval_loss(&data.as_batch()).expect("loss");
    assert_eq!(loss_again.to_bits(), base_loss.to_bits());
}

/// Backends opened on a shared frozen base hold no copy of it (one reference each, the
/// same floats), train and score exactly as a backend that owns its copy, and a wrong
/// adapter length is refused.
#[test]
fn backends_share_the_frozen_base() {
    let config = micro_llama(false);
    let spec = ModelSpec::llama_lora("micro-lora", config, micro_lora());
    let params = adapted_params(&spec);
    let base_len = spec.base_len();
    let data = vocab_batch(config.vocab_size, 2, config.max_seq, 4);
    let frozen = std::sync::Arc::new(params[..base_len].to_vec());
    let mut shared: Vec<_> = [Purpose::Train, Purpose::Eval]
        .into_iter()
        .map(|purpose| {
            engine::open_model_frozen(
                "cpu:2",
                &spec,
                frozen.clone(),
                params[base_len..].to_vec(),
                purpose,
            )
            .expect("shared backend")
        })
        .collect();
    assert_eq!(std::sync::Arc::strong_count(&frozen), 3);
    let mut owned = spec_backend(&spec, params.clone(), 2);
    for _ in 0..2 {
        let a = shared[0]
            .train_step(&data.as_batch(), &OptimizerConfig::default(), 1e-2)
            .expect("step");
        let b = owned
            .train_step(&data.as_batch(), &OptimizerConfig::default(), 1e-2)
            .expect("step");
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    }
    assert_eq!(shared[0].params(), owned.params());
    assert_eq!(
        frozen[..],
        params[..base_len],
        "training moved the shared base"
    );
    let trained = shared[0].trainable();
    shared[1].set_trainable(&trained).expect("set");
    let (x, y) = (
        shared[1].eval_loss(&data.as_batch()).expect("loss"),
        owned.eval_loss(&data.as_batch()).expect("loss"),
    );
    assert_eq!(x.to_bits(), y.to_bits());
    let err =
        engine::open_model_frozen("cpu:1", &spec, frozen.clone(), vec![0.0; 3], Purpose::Eval)
            .map_or_else(|e| e.to_string(), |_| "ok".into());
    expect_test::expect!["parameter vector has 3 floats, the model has 1024"].assert_eq(&err);
    drop(shared);
    assert_eq!(std::sync::Arc::strong_count(&frozen), 1);
}

/// At SmolLM2's shape and a 4 x 256 batch, a LoRA training backend holds the base once
/// (no gradient, no moments): what training adds to an evaluation backend (the adapter's
/// state and the gradient scratch) is less than a tenth of what full training adds. The
/// activations, alike for both, are most of what is left.
#[test]
fn a_lora_training_backend_is_much_smaller_than_a_full_one() {
    let config = LlamaConfig::smollm2_135m(256);
    let lora = engine::LoraConfig {
        rank: 16,
        alpha: 32.0,
        targets: engine::LoraTarget::ALL.to_vec(),
    };
    let full = engine::backend_bytes(&ModelSpec::llama("full", config), Purpose::Train, 4, 256);
    let adapted = engine::backend_bytes(
        &ModelSpec::llama_lora("lora", config, lora),
        Purpose::Train,
        4,
        256,
    );
    let eval = engine::backend_bytes(&ModelSpec::llama("eval", config), Purpose::Eval, 4, 256);
    expect_test::expect!["full 3715 MB, lora 2194 MB, eval 2067 MB"].assert_eq(&format!(
        "full {} MB, lora {} MB, eval {} MB",
        full / 1_000_000,
        adapted / 1_000_000,
        eval / 1_000_000
    ));
    assert!(adapted - eval < (full - eval) / 10);
}
