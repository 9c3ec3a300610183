//! Every gradient of the model against central finite differences.

use engine::ParamLayout;

use crate::{backend, batch, micro_config};

/// Parameters with every part away from its special initial value (gains not 1,
/// biases not 0, larger matrices), so each term of each backward pass matters.
fn rough_params(config: &engine::GptConfig) -> Vec<f32> {
    let mut params = engine::init_params(config, 7).expect("init");
    for (i, p) in params.iter_mut().enumerate() {
        let noise = (((i * 2_654_435_761usize) >> 9) % 1000) as f32 / 1000.0 - 0.5;
        *p = *p * 3.0 + 0.1 * noise;
    }
    params
}

#[test]
fn every_tensor_matches_finite_differences() {
    let config = micro_config();
    let layout = ParamLayout::new(&config);
    let params = rough_params(&config);
    let data = batch(&config, 3, 8, 11);
    let mut model = backend(config, params.clone(), 2);
    let (_, grad) = model.loss_and_grad(&data.as_batch()).expect("grad");
    let h = 2e-3f32;
    let mut failures = Vec::new();
    for spec in layout.tensors() {
        // A spread of coordinates across the tensor.
        let len = spec.len();
        for k in 0..6 {
            let i = spec.offset + (k * 7919 + 13) % len;
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
                    spec.name,
                    i - spec.offset
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "gradient mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn gradient_is_not_trivially_zero() {
    let config = micro_config();
    let mut model = backend(config, rough_params(&config), 1);
    let (_, grad) = model
        .loss_and_grad(&batch(&config, 2, 8, 3).as_batch())
        .expect("grad");
    let layout = ParamLayout::new(&config);
    for spec in layout.tensors() {
        let norm: f32 = grad[spec.range()].iter().map(|g| g * g).sum::<f32>().sqrt();
        assert!(norm > 1e-6, "{} has a zero gradient", spec.name);
    }
}
