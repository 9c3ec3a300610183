//! The CUDA backend: on a machine without a usable GPU (CI's), asking for one is an
//! error that says what is missing and `auto` falls back to the CPU; on a GPU (the
//! ignored tests, run with `--ignored` on the lent H200), GPT-2 matches the CPU engine.
//!
//! f32 precision is the same arithmetic as the CPU up to summation order, so it is held
//! to f32 tolerances; bf16 rounds every activation to 8 bits of mantissa, so it is held
//! to bf16's (relative L2 error of each gradient tensor within 5%).

use engine::cuda::{Attention, Gpt2Cuda, Precision};
use engine::{Backend, Device, GptConfig, OptimizerConfig, Purpose};

use crate::{backend, vocab_batch};

#[test]
fn asking_for_a_gpu_says_what_is_missing_or_finds_one() {
    match engine::cuda::probe(0) {
        Ok(info) => {
            eprintln!("{info:?}\nclass {}", info.class());
            assert!(info.capability >= engine::cuda::MIN_COMPUTE_CAPABILITY);
            assert_eq!(
                engine::resolve_device("auto").expect("auto"),
                Device::Cuda { ordinal: 0 }
            );
        }
        Err(e) => {
            let text = engine::check_device("cuda")
                .expect_err("no GPU")
                .to_string();
            assert_eq!(text, e.to_string());
            assert!(text.contains("--device cpu"), "{text}");
            assert!(matches!(
                engine::resolve_device("auto").expect("auto"),
                Device::Cpu { .. }
            ));
            let spec = engine::ModelSpec::gpt2("micro", crate::micro_config());
            let params = spec.init_params(1).expect("init");
            let err = engine::open_model("cuda:0", &spec, params, Purpose::Train)
                .err()
                .expect("no GPU");
            assert_eq!(err.to_string(), text);
        }
    }
    for bad in ["cuda:x", "cuda:", "gpu", "cpu:0", "auto:1"] {
        let err = engine::check_device(bad).expect_err(bad).to_string();
        assert!(
            err.contains("auto, cpu, cpu:N, cuda or cuda:N"),
            "{bad}: {err}"
        );
    }
}

/// A model with every part and shapes the kernels' blocking does not divide evenly.
fn small() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 4,
        n_embd: 96,
        n_ctx: 80,
        vocab_size: 301,
    }
}

/// Heads of 64 (the fused attention's), a context of three whole key tiles and a part
/// of one (200 = 3 x 64 + 8), and a vocabulary the loss kernel reads eight at a time.
fn wide() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 128,
        n_ctx: 200,
        vocab_size: 304,
    }
}

fn gpu(config: GptConfig, params: &[f32], precision: Precision) -> Gpt2Cuda {
    Gpt2Cuda::open(config, params, 0, precision, Purpose::Train).expect("open the GPU backend")
}

/// Relative L2 error of `got` against `want`.
pub(crate) fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// `params` with the keys' third of each `c_attn.bias` set to 0. Its gradient is 0 in
/// exact arithmetic (a constant added to every key shifts a query's scores equally, and
/// softmax ignores that), so both engines see rounding noise there, and AdamW, which
/// divides by the gradient's own scale, turns that noise into full-size steps that
/// differ between any two summation orders.
fn without_key_bias(config: &GptConfig, params: &[f32]) -> Vec<f32> {
    let c = config.n_embd;
    let mut out = params.to_vec();
    for t in engine::ParamLayout::new(config).tensors() {
        if t.name.ends_with("attn.c_attn.bias") {
            out[t.offset + c..t.offset + 2 * c].fill(0.0);
        }
    }
    out
}

/// The largest relative L2 error of any tensor of `got` against `want`.
fn worst_tensor_error(config: &GptConfig, got: &[f32], want: &[f32]) -> (f64, String) {
    let mut worst = (0.0f64, String::new());
    for t in engine::ParamLayout::new(config).tensors() {
        let err = rel_error(&got[t.range()], &want[t.range()]);
        assert!(err.is_finite(), "{}: not finite", t.name);
        if err > worst.0 {
            worst = (err, t.name.clone());
        }
    }
    worst
}

/// Tolerances of one precision against the CPU engine.
struct Tolerance {
    loss: f64,
    grad: f64,
    /// The whole parameter vector after three AdamW steps.
    params: f64,
    /// Each tensor after three steps (f32 only: bf16's rounding of the gradient moves
    /// AdamW's normalized steps of small components by up to their whole size).
    tensor: Option<f64>,
}

#[track_caller]
fn check_against_cpu(config: GptConfig, precision: Precision, tol: Tolerance) {
    let params = engine::init_params(&config, 7).expect("init");
    let mut cpu = backend(config, params.clone(), 2);
    let mut cuda = gpu(config, &params, precision);
    let batch = vocab_batch(config.vocab_size, 3, config.n_ctx, 5);
    let (cpu_loss, cpu_grad) = cpu.loss_and_grad(&batch.as_batch()).expect("cpu");
    let (gpu_loss, gpu_grad) = cuda.loss_and_grad(&batch.as_batch()).expect("gpu");
    let loss_err = ((gpu_loss - cpu_loss) as f64 / cpu_loss as f64).abs();
    let (grad_err, grad_name) = worst_tensor_error(&config, &gpu_grad, &cpu_grad);
    // Three AdamW steps from the same state, then the loss of a batch neither saw.
    let opt = OptimizerConfig::default();
    let mut norm_err = 0.0f64;
    for step in 0..3 {
        let b = vocab_batch(config.vocab_size, 3, config.n_ctx, 11 + step);
        let c = cpu.train_step(&b.as_batch(), &opt, 1e-3).expect("cpu step");
        let g = cuda
            .train_step(&b.as_batch(), &opt, 1e-3)
            .expect("gpu step");
        norm_err = norm_err.max(((g.grad_norm - c.grad_norm) as f64 / c.grad_norm as f64).abs());
    }
    let held = vocab_batch(config.vocab_size, 2, config.n_ctx, 99);
    let (cpu_after, gpu_after) = (
        cpu.eval_loss(&held.as_batch()).expect("cpu eval"),
        cuda.eval_loss(&held.as_batch()).expect("gpu eval"),
    );
    let after_err = ((gpu_after - cpu_after) as f64 / cpu_after as f64).abs();
    let gpu_params = without_key_bias(&config, &cuda.params());
    let cpu_params = without_key_bias(&config, &cpu.params());
    let params_err = rel_error(&gpu_params, &cpu_params);
    let (tensor_err, tensor_name) = worst_tensor_error(&config, &gpu_params, &cpu_params);
    eprintln!(
        "{precision:?} {config:?}: loss {loss_err:.1e}, worst gradient {grad_err:.1e} ({grad_name}), \
         grad norms {norm_err:.1e}; after 3 steps: held-out loss {after_err:.1e}, parameters {params_err:.1e}, \
         worst tensor {tensor_err:.1e} ({tensor_name})"
    );
    assert!(
        loss_err < tol.loss,
        "{precision:?}: loss {gpu_loss} vs cpu {cpu_loss}"
    );
    assert!(
        grad_err < tol.grad,
        "{precision:?}: gradient of {grad_name} off by {grad_err:.2e}"
    );
    assert!(
        norm_err < tol.grad,
        "{precision:?}: gradient norms off by {norm_err:.2e}"
    );
    assert!(
        after_err < tol.loss,
        "{precision:?}: loss after 3 steps {gpu_after} vs {cpu_after}"
    );
    assert!(
        params_err < tol.params,
        "{precision:?}: parameters after 3 steps off by {params_err:.2e}"
    );
    if let Some(t) = tol.tensor {
        assert!(
            tensor_err < t,
            "{precision:?}: {tensor_name} after 3 steps off by {tensor_err:.2e}"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p engine --test it cuda -- --ignored"]
fn f32_kernels_match_the_cpu_engine() {
    for config in [crate::micro_config(), small()] {
        let tol = Tolerance {
            loss: 1e-5,
            grad: 1e-4,
            params: 2e-5,
            tensor: Some(2e-4),
        };
        check_against_cpu(config, Precision::F32, tol);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p engine --test it cuda -- --ignored"]
fn bf16_kernels_match_the_cpu_engine_within_bf16() {
    let tol = Tolerance {
        loss: 1e-2,
        grad: 5e-2,
        params: 1e-2,
        tensor: None,
    };
    check_against_cpu(small(), Precision::Bf16, tol);
    // The fused attention (heads of 64), against the same CPU arithmetic.
    let params = engine::init_params(&wide(), 7).expect("init");
    assert_eq!(
        gpu(wide(), &params, Precision::Bf16).attention(),
        Attention::Flash
    );
    let tol = Tolerance {
        loss: 1e-2,
        grad: 5e-2,
        params: 1e-2,
        tensor: None,
    };
    check_against_cpu(wide(), Precision::Bf16, tol);
}

/// The fused attention kernels against the materialized path on the same GPU, both in
/// bf16: the same loss and gradients up to bf16 rounding (the fused path rounds the
/// unnormalized probabilities, the materialized one the normalized ones), and the
/// refusal of what the fused kernels are not built for.
#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p engine --test it cuda -- --ignored"]
fn fused_attention_matches_the_materialized_path() {
    let config = wide();
    let params = engine::init_params(&config, 5).expect("init");
    let mut cuda = gpu(config, &params, Precision::Bf16);
    let batch = vocab_batch(config.vocab_size, 3, config.n_ctx, 17);
    let (flash_loss, flash_grad) = cuda.loss_and_grad(&batch.as_batch()).expect("flash");
    cuda.set_attention(Attention::Materialized)
        .expect("materialized");
    let (mat_loss, mat_grad) = cuda.loss_and_grad(&batch.as_batch()).expect("materialized");
    let loss_err = ((flash_loss - mat_loss) as f64 / mat_loss as f64).abs();
    let (grad_err, grad_name) = worst_tensor_error(&config, &flash_grad, &mat_grad);
    eprintln!(
        "fused vs materialized: loss {loss_err:.1e}, worst gradient {grad_err:.1e} ({grad_name})"
    );
    assert!(loss_err < 1e-3, "loss {flash_loss} vs {mat_loss}");
    assert!(grad_err < 3e-2, "{grad_name} off by {grad_err:.2e}");
    let mut narrow = gpu(
        small(),
        &engine::init_params(&small(), 5).expect("init"),
        Precision::Bf16,
    );
    assert_eq!(narrow.attention(), Attention::Materialized);
    assert!(narrow.set_attention(Attention::Flash).is_err());
    let mut f32 = gpu(config, &params, Precision::F32);
    assert_eq!(f32.attention(), Attention::Materialized);
    assert!(f32.set_attention(Attention::Flash).is_err());
}

/// Five steps, then the bits of the losses and parameters: equal for two backends in
/// one process; printed (and written to `$HT_CUDA_BITS` when set) so that two processes
/// can be compared by the command that runs this.
#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p engine --test it cuda -- --ignored"]
fn training_on_one_gpu_repeats_its_bits() {
    let mut bits = blake3::Hasher::new();
    for config in [small(), wide()] {
        let a = bits_of_five_steps(config);
        bits.update(a.as_bytes());
    }
    let a = bits.finalize().to_hex().to_string();
    eprintln!("bits {a}");
    if let Ok(path) = std::env::var("HT_CUDA_BITS") {
        std::fs::write(path, &a).expect("write bits");
    }
}

/// The hash of five steps' losses and the parameters after them, checked equal for two
/// backends in this process.
fn bits_of_five_steps(config: GptConfig) -> String {
    let params = engine::init_params(&config, 3).expect("init");
    let run = || {
        let mut cuda = gpu(config, &params, Precision::Bf16);
        let mut h = blake3::Hasher::new();
        for step in 0..5 {
            let b = vocab_batch(config.vocab_size, 4, config.n_ctx, step * 13);
            let s = cuda
                .train_step(&b.as_batch(), &OptimizerConfig::default(), 2e-3)
                .expect("step");
            h.update(&s.loss.to_le_bytes());
        }
        for p in cuda.params() {
            h.update(&p.to_le_bytes());
        }
        h.finalize().to_hex().to_string()
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b, "{config:?}: two backends in one process differ");
    a
}

/// KV-cache decoding on the GPU against the CPU's, in both precisions: heads of 24 and
/// of 64; a prompt longer than one pass (256 rows) where the context allows, then a
/// token at a time to the end of the context, the logits within the precision's
/// tolerance at every position; a full context is refused and a reset starts over.
#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p engine --test it cuda -- --ignored"]
fn decoding_matches_the_cpu() {
    let long = GptConfig {
        n_ctx: 300,
        ..wide()
    };
    for config in [small(), long] {
        let params = engine::init_params(&config, 11).expect("init");
        for (precision, tolerance) in [(Precision::F32, 1e-4), (Precision::Bf16, 2e-2)] {
            let mut cpu = backend(config, params.clone(), 2);
            let mut cuda = Gpt2Cuda::open(config, &params, 0, precision, Purpose::Eval)
                .expect("open the GPU backend");
            let tokens = crate::tokens(config.n_ctx, config.vocab_size, 3);
            let (prompt, rest) = tokens.split_at(config.n_ctx - 20);
            let mut worst = 0.0f64;
            for round in 0..2 {
                let want = cpu.decode_prefill(prompt).expect("cpu").to_vec();
                let got = cuda.decode_prefill(prompt).expect("gpu").to_vec();
                worst = worst.max(rel_error(&got, &want));
                for &token in rest {
                    let want = cpu.decode_step(token).expect("cpu").to_vec();
                    let got = cuda.decode_step(token).expect("gpu").to_vec();
                    worst = worst.max(rel_error(&got, &want));
                }
                assert!(
                    matches!(
                        cuda.decode_step(1),
                        Err(engine::EngineError::ContextFull { n_ctx }) if n_ctx == config.n_ctx
                    ),
                    "round {round}"
                );
                cpu.decode_reset();
                cuda.decode_reset();
            }
            eprintln!("{config:?} {precision:?}: decoding logits within {worst:.1e} of the CPU's");
            assert!(
                worst < tolerance,
                "{precision:?}: logits off by {worst:.2e}"
            );
        }
    }
}
