//! Every gradient of every architecture against central finite differences.

use engine::ModelSpec;

use crate::{micro_specs, spec_backend, vocab_batch};

/// Parameters with every part away from its special initial value (gains not 1,
/// biases not 0, larger matrices), so each term of each backward pass matters.
fn rough_params(spec: &ModelSpec) -> Vec<f32> {
    let mut params = spec.init_params(7).expect("init");
    for (i, p) in params.iter_mut().enumerate() {
        let noise = (((i * 2_654_435_761usize) >> 9) % 1000) as f32 / 1000.0 - 0.5;
        *p = *p * 3.0 + 0.1 * noise;
    }
    params
}

/// Compares the analytic gradient of one batch's loss with central differences at six
/// coordinates spread over each tensor of `spec`.
#[track_caller]
fn check(spec: &ModelSpec) {
    let layout = spec.layout();
    let params = rough_params(spec);
    let data = vocab_batch(spec.architecture.vocab_size(), 3, spec.n_ctx(), 11);
    let mut model = spec_backend(spec, params.clone(), 2);
    let (_, grad) = model.loss_and_grad(&data.as_batch()).expect("grad");
    let h = 2e-3f32;
    let mut failures = Vec::new();
    for tensor in layout.tensors() {
        let len = tensor.len();
        let norm: f32 = grad[tensor.range()]
            .iter()
            .map(|g| g * g)
            .sum::<f32>()
            .sqrt();
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
            let analytic = grad[i] as f64;
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
fn every_tensor_of_every_architecture_matches_finite_differences() {
    for spec in micro_specs() {
        check(&spec);
    }
}
