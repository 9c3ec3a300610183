//! Training on the CPU is bit-identical run to run and for any thread count.

use engine::{LrSchedule, OptimizerConfig, Preset};

use crate::{backend, batch};

fn train_bits(threads: usize) -> (Vec<u32>, Vec<u32>) {
    let config = Preset::Tiny.config(512);
    let params = engine::init_params(&config, 42).expect("init");
    let mut model = backend(config, params, threads);
    let schedule = LrSchedule::cosine(3e-3, 6);
    let losses = engine::train::train(
        model.as_mut(),
        &OptimizerConfig::default(),
        &schedule,
        0,
        6,
        &mut |step| batch(&config, 4, 64, step * 101),
        &mut |_, _| {},
    )
    .expect("train");
    let params = model.params();
    (
        losses.iter().map(|l| l.to_bits()).collect(),
        params.iter().map(|p| p.to_bits()).collect(),
    )
}

#[test]
fn same_bits_for_any_thread_count() {
    let one = train_bits(1);
    assert_eq!(one, train_bits(1), "two runs on one thread differ");
    assert_eq!(one, train_bits(2), "two threads differ from one");
    assert_eq!(one, train_bits(3), "three threads differ from one");
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

#[test]
fn training_lowers_the_loss_on_repeated_data() {
    let config = Preset::Tiny.config(512);
    let mut model = backend(config, engine::init_params(&config, 1).expect("init"), 2);
    let data = batch(&config, 4, 64, 9);
    let before = model.eval_loss(&data.as_batch()).expect("loss");
    for _ in 0..30 {
        model
            .train_step(&data.as_batch(), &OptimizerConfig::default(), 3e-3)
            .expect("step");
    }
    let after = model.eval_loss(&data.as_batch()).expect("loss");
    assert!(after < before - 1.0, "loss {before} -> {after}");
}
