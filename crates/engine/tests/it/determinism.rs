//! Training on the CPU is bit-identical run to run and for any thread count.

use engine::{LlamaConfig, LrSchedule, ModelSpec, OptimizerConfig, Preset};

use crate::{spec_backend, vocab_batch};

/// The bits of six training steps' losses, the trained parameters and the logits of
/// a few decode steps after them, on `threads` threads.
fn train_bits(spec: &ModelSpec, threads: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let params = spec.init_params(42).expect("init");
    let mut model = spec_backend(spec, params, threads);
    let schedule = LrSchedule::cosine(3e-3, 6);
    let vocab = spec.architecture.vocab_size();
    let losses = engine::train::train(
        model.as_mut(),
        &OptimizerConfig::default(),
        &schedule,
        0,
        6,
        &mut |step| vocab_batch(vocab, 4, 64, step * 101),
        &mut |_, _| {},
    )
    .expect("train");
    let mut logits = Vec::new();
    for token in [3u32, 1, 4, 1, 5] {
        logits.extend(
            model
                .decode_step(token)
                .expect("decode")
                .iter()
                .map(|x| x.to_bits()),
        );
    }
    let params = model.params();
    (
        losses.iter().map(|l| l.to_bits()).collect(),
        params.iter().map(|p| p.to_bits()).collect(),
        logits,
    )
}

/// A run on one thread, again on one, and on two and three, all with the same bits.
#[track_caller]
fn check(spec: &ModelSpec) {
    let one = train_bits(spec, 1);
    assert_eq!(
        one,
        train_bits(spec, 1),
        "{}: two runs on one thread differ",
        spec.name
    );
    for threads in [2, 3] {
        assert_eq!(
            one,
            train_bits(spec, threads),
            "{}: {threads} threads differ from one",
            spec.name
        );
    }
}

#[test]
fn same_bits_for_any_thread_count() {
    check(&ModelSpec::preset(Preset::Tiny, 512));
    // Large enough that every parallel kernel splits into several tasks (64-token
    // rows in blocks of 16, 4 x 2 attention tasks, 512-row head).
    let llama = LlamaConfig {
        hidden: 32,
        intermediate: 80,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        vocab_size: 512,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        tie_embeddings: false,
        max_seq: 64,
    };
    check(&ModelSpec::llama("tiny-llama", llama));
    check(&ModelSpec::llama(
        "tiny-llama-tied",
        LlamaConfig {
            tie_embeddings: true,
            ..llama
        },
    ));
    // A LoRA adapter on every projection; B starts at zero and moves from step one.
    check(&ModelSpec::llama_lora(
        "tiny-llama-lora",
        llama,
        engine::LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: engine::LoraTarget::ALL.to_vec(),
        },
    ));
}

#[test]
fn init_depends_only_on_the_seed() {
    let config = Preset::Tiny.config(512);
    let a = engine::init_params(&config, 5).expect("init");
    let b = engine::init_params(&config, 5).expect("init");
    let c = engine::init_params(&config, 6).expect("init");
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Pin the bits so a change of the RNG or of the layout is noticed.
    let digest: u64 = a.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ x.to_bits() as u64).wrapping_mul(0x100000001b3)
    });
    expect_test::expect!["dc00814b73faad3d"].assert_eq(&format!("{digest:x}"));
}

/// Thirty steps on one batch lower its loss by more than a nat.
#[track_caller]
fn check_learns(spec: &ModelSpec) {
    let mut model = spec_backend(spec, spec.init_params(1).expect("init"), 2);
    let data = vocab_batch(spec.architecture.vocab_size(), 4, 64, 9);
    let before = model.eval_loss(&data.as_batch()).expect("loss");
    for _ in 0..30 {
        model
            .train_step(&data.as_batch(), &OptimizerConfig::default(), 3e-3)
            .expect("step");
    }
    let after = model.eval_loss(&data.as_batch()).expect("loss");
    assert!(
        after < before - 1.0,
        "{}: loss {before} -> {after}",
        spec.name
    );
}

#[test]
fn training_lowers_the_loss_on_repeated_data() {
    check_learns(&ModelSpec::preset(Preset::Tiny, 512));
    let llama = LlamaConfig {
        vocab_size: 512,
        max_seq: 64,
        ..crate::micro_llama(true)
    };
    check_learns(&ModelSpec::llama("micro-llama", llama));
}
