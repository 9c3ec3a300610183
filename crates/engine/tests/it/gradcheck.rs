//! Every gradient of every architecture against central finite differences.

use engine::ModelSpec;

use crate::{micro_specs, spec_backend, vocab_batch};

/// Parameters with every part away from its special initial value (gains not 1,
/// biases not 0, larger matrices, LoRA's `B` not 0), so each term of each backward pass
/// matters.
fn rough_params(spec: &ModelSpec) -> Vec<f32> {
    let mut params = spec.init_params(7).expect("init");
    let noise = |i: usize| (((i * 2_654_435_761usize) >> 9) % 1000) as f32 / 1000.0 - 0.5;
    let base_len = spec.base_len();
    for (i, p) in params[..base_len].iter_mut().enumerate() {
        *p = *p * 3.0 + 0.1 * noise(i);
    }
    // An adapter's output is a product of A and B: both of order 0.1 keep the loss
    // smooth enough at the step below.
    for (i, p) in params.iter_mut().enumerate().skip(base_len) {
        *p += 0.2 * noise(i);
    }
    params
}

/// Compares the analytic gradient of one batch's loss with central differences at six
/// coordinates spread over each trainable tensor of `spec` (with LoRA, every adapter
/// tensor, `B` non-zero; the base frozen).
#[track_caller]
fn check(spec: &ModelSpec) {
    let params = rough_params(spec);
    // Trainable tensors' offsets are into the full vector; the gradient is of the
    // trainable vector, which starts after the frozen part.
    let frozen = spec.n_params() - spec.trainable_len();
    let data = vocab_batch(spec.architecture.vocab_size(), 3, spec.n_ctx(), 11);
    let mut model = spec_backend(spec, params.clone(), 2);
    let (_, grad) = model.loss_and_grad(&data.as_batch()).expect("grad");
    assert_eq!(grad.len(), spec.trainable_len(), "{}", spec.name);
    let h = 2e-3f32;
    let mut failures = Vec::new();
    for tensor in spec.trainable_tensors() {
        let len = tensor.len();
        let range = tensor.offset - frozen..tensor.offset - frozen + len;
        let norm: f32 = grad[range].iter().map(|g| g * g).sum::<f32>().sqrt();
        if norm <= 1e-6 {
            failures.push(format!("{} has a zero gradient", tensor.name));
        }
        for k in 0..6 {
            let i = tensor.offset + (k * 7919 + 13) % len;
            let mut shifted = params.clone();
            shifted[i] = params[i] + h;
            model.set_params(&shifted).expect("set");
            let up = model.eval_loss(&data.as_batch()).expect("loss") as f64;
            shifted[i] = params[i] - h;
            model.set_params(&shifted).expect("set");
            let down = model.eval_loss(&data.as_batch()).expect("loss") as f64;
            let numeric = (up - down) / (2.0 * h as f64);
            let analytic = grad[i - frozen] as f64;
            // f32 loss differences carry about 1e-4 of noise at this step size.
            let tolerance = 1.5e-4 + 1e-2 * numeric.abs().max(analytic.abs());
            if (numeric - analytic).abs() > tolerance {
                failures.push(format!(
                    "{}[{}]: analytic {analytic:.6e} numeric {numeric:.6e}",
                    tensor.name,
                    i - tensor.offset
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}: gradient mismatches:\n{}",
        spec.name,
        failures.join("\n")
    );
}

#[test]
fn every_trainable_tensor_of_every_architecture_matches_finite_differences() {
    for spec in micro_specs() {
        check(&spec);
    }
}
