//! Loss and gradients of the tiny model against PyTorch (see tests/golden/README.md).

use std::path::{Path, PathBuf};

use engine::train::OwnedBatch;
use engine::{LrSchedule, OptimizerConfig, ParamLayout};
use serde::Deserialize;

#[derive(Deserialize)]
struct Run {
    config: engine::GptConfig,
    optimizer: OptimizerConfig,
    schedule: LrSchedule,
    steps: usize,
    batch: usize,
    seq: usize,
}

#[derive(Deserialize)]
struct TensorGrad {
    l2: f64,
    sum: f64,
    at: Vec<usize>,
    values: Vec<f64>,
}

#[derive(Deserialize)]
struct Golden {
    loss: f64,
    grads: std::collections::HashMap<String, TensorGrad>,
    train_losses: Vec<f64>,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("reading tests/golden/{name}: {e}"))
}

fn batches(run: &Run) -> Vec<OwnedBatch> {
    let tokens: Vec<u32> = read("tokens.u16")
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect();
    let offsets: Vec<usize> = read("offsets.u32")
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    offsets
        .chunks(run.batch)
        .map(|starts| {
            let mut inputs = Vec::new();
            let mut targets = Vec::new();
            for &s in starts {
                inputs.extend_from_slice(&tokens[s..s + run.seq]);
                targets.extend_from_slice(&tokens[s + 1..s + run.seq + 1]);
            }
            OwnedBatch {
                inputs,
                targets,
                batch: run.batch,
                seq: run.seq,
            }
        })
        .collect()
}

#[test]
fn loss_gradients_and_steps_match_pytorch() {
    let run: Run = serde_json::from_slice(&read("run.json")).expect("run.json");
    let golden: Golden = serde_json::from_slice(&read("golden.json")).expect("golden.json");
    let init = engine::checkpoint::load(&dir().join("init.safetensors")).expect("init");
    assert_eq!(init.config, run.config);
    let batches = batches(&run);
    assert_eq!(batches.len(), run.steps);

    let mut model = crate::backend(run.config, init.params.clone(), 2);
    let (loss, grad) = model.loss_and_grad(&batches[0].as_batch()).expect("grad");
    assert!(
        (loss as f64 - golden.loss).abs() < 1e-5 * golden.loss,
        "loss {loss} vs {}",
        golden.loss
    );

    let layout = ParamLayout::new(&run.config);
    let mut failures = Vec::new();
    for spec in layout.tensors() {
        let want = &golden.grads[&spec.name];
        let g = &grad[spec.range()];
        let l2 = g
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        let sum: f64 = g.iter().map(|&x| x as f64).sum();
        // Float32 against float64: relative 1e-4 of the tensor's scale.
        let tolerance = 1e-4 * want.l2 + 1e-9;
        if (l2 - want.l2).abs() > tolerance {
            failures.push(format!("{} l2 {l2:e} vs {:e}", spec.name, want.l2));
        }
        if (sum - want.sum).abs() > tolerance * (spec.len() as f64).sqrt() {
            failures.push(format!("{} sum {sum:e} vs {:e}", spec.name, want.sum));
        }
        for (&i, &v) in want.at.iter().zip(&want.values) {
            if (g[i] as f64 - v).abs() > tolerance {
                failures.push(format!("{}[{i}] {:e} vs {v:e}", spec.name, g[i]));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "gradients differ from PyTorch:\n{}",
        failures.join("\n")
    );

    let mut model = crate::backend(run.config, init.params, 2);
    let losses = engine::train::train(
        model.as_mut(),
        &run.optimizer,
        &run.schedule,
        0,
        run.steps,
        &mut |step| batches[step].clone(),
        &mut |_, _| {},
    )
    .expect("train");
    for (step, (got, want)) in losses.iter().zip(&golden.train_losses).enumerate() {
        assert!(
            (*got as f64 - want).abs() < 2e-5 * want,
            "step {step}: loss {got} vs PyTorch {want}"
        );
    }
}

/// The tiny Llama's run, as `scripts/torch_llama.py` writes it.
#[derive(Deserialize)]
struct LlamaRun {
    config: engine::LlamaConfig,
    optimizer: OptimizerConfig,
    schedule: LrSchedule,
    steps: usize,
    batch: usize,
    seq: usize,
}

/// What PyTorch computed for one variant (tied or untied head).
#[derive(Deserialize)]
struct LlamaGolden {
    loss: f64,
    grads: std::collections::HashMap<String, TensorGrad>,
    train_losses: Vec<f64>,
    loss_after: f64,
}

fn read_llama(name: &str) -> Vec<u8> {
    read(&format!("llama/{name}"))
}

/// The flat parameter vector of `spec` from a safetensors file of float32 tensors under
/// HF names (tensors the layout does not name, such as a tied model's `lm_head`, are
/// ignored).
fn llama_params(spec: &engine::ModelSpec, bytes: &[u8]) -> Vec<f32> {
    let file = safetensors::SafeTensors::deserialize(bytes).expect("init.safetensors");
    let mut params = vec![0.0f32; spec.n_params()];
    for tensor in spec.layout().tensors() {
        let view = file
            .tensor(&tensor.name)
            .expect("tensor in init.safetensors");
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{}", tensor.name);
        assert_eq!(view.shape(), tensor.shape.as_slice(), "{}", tensor.name);
        for (p, b) in params[tensor.range()]
            .iter_mut()
            .zip(view.data().chunks_exact(4))
        {
            *p = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    params
}

/// Loss, every tensor's gradient, three AdamW steps and the loss after them, of a tiny
/// random Llama with an untied and a tied head, against HF `LlamaForCausalLM` in float64.
/// Tolerances: the engine computes in float32, so each value may differ by float32
/// rounding accumulated over a few hundred terms: 1e-5 of the loss, 1e-4 of a tensor's
/// gradient norm (its sum by that times the square root of its length, as random
/// rounding errors add), and 3e-5 of the losses after steps, where AdamW's division by
/// small second moments can amplify the gradients' rounding.
#[test]
fn llama_loss_gradients_and_steps_match_hf_transformers() {
    let run: LlamaRun = serde_json::from_slice(&read_llama("run.json")).expect("run.json");
    let golden: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_slice(&read_llama("golden.json")).expect("golden.json");
    let batches = llama_batches(&run);
    let init = read_llama("init.safetensors");
    let mut failures = Vec::new();
    for (variant, tie) in [("untied", false), ("tied", true)] {
        let want: LlamaGolden =
            serde_json::from_value(golden[variant].clone()).expect("variant in golden.json");
        let config = engine::LlamaConfig {
            tie_embeddings: tie,
            ..run.config
        };
        let spec = engine::ModelSpec::llama(variant, config);
        let params = llama_params(&spec, &init);
        let tensors = spec.layout().tensors().to_vec();
        check_llama_golden(
            variant,
            &spec,
            params,
            &tensors,
            &want,
            &run,
            &batches,
            &mut failures,
        );
    }
    assert!(
        failures.is_empty(),
        "the Llama differs from HF transformers:\n{}",
        failures.join("\n")
    );
}

/// The batches of the Llama golden run: `steps` of `batch` windows of `seq + 1` tokens.
fn llama_batches(run: &LlamaRun) -> Vec<OwnedBatch> {
    let windows: Vec<u32> = read_llama("tokens.u16")
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect();
    let (b, t) = (run.batch, run.seq);
    assert_eq!(windows.len(), run.steps * b * (t + 1));
    windows
        .chunks_exact(b * (t + 1))
        .map(|step| {
            let rows = step.chunks_exact(t + 1);
            OwnedBatch {
                inputs: rows.clone().flat_map(|r| r[..t].to_vec()).collect(),
                targets: rows.flat_map(|r| r[1..].to_vec()).collect(),
                batch: b,
                seq: t,
            }
        })
        .collect()
}

/// Checks one variant of `spec` opened on `params` against PyTorch's `want`: the first
/// batch's loss, the gradient of each of `tensors` (ranges into the trainable gradient;
/// each must be non-zero in PyTorch, so that a check of it can fail), and the losses of
/// `run.steps` AdamW steps and the loss after them. What differs is pushed to `failures`.
#[allow(clippy::too_many_arguments)]
fn check_llama_golden(
    variant: &str,
    spec: &engine::ModelSpec,
    params: Vec<f32>,
    tensors: &[engine::TensorSpec],
    want: &LlamaGolden,
    run: &LlamaRun,
    batches: &[OwnedBatch],
    failures: &mut Vec<String>,
) {
    let mut model = crate::spec_backend(spec, params.clone(), 2);
    let (loss, grad) = model.loss_and_grad(&batches[0].as_batch()).expect("grad");
    if (loss as f64 - want.loss).abs() > 1e-5 * want.loss {
        failures.push(format!("{variant}: loss {loss} vs {}", want.loss));
    }
    assert_eq!(
        want.grads.len(),
        tensors.len(),
        "{variant}: tensors in golden.json"
    );
    for tensor in tensors {
        let w = &want.grads[&tensor.name];
        let g = &grad[tensor.range()];
        let l2 = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let sum: f64 = g.iter().map(|&x| x as f64).sum();
        let tolerance = 1e-4 * w.l2 + 1e-9;
        if w.l2 < 1e-6 {
            failures.push(format!(
                "{variant} {}: PyTorch's gradient is zero",
                tensor.name
            ));
        }
        if (l2 - w.l2).abs() > tolerance {
            failures.push(format!("{variant} {} l2 {l2:e} vs {:e}", tensor.name, w.l2));
        }
        if (sum - w.sum).abs() > tolerance * (tensor.len() as f64).sqrt() {
            failures.push(format!(
                "{variant} {} sum {sum:e} vs {:e}",
                tensor.name, w.sum
            ));
        }
        for (&i, &v) in w.at.iter().zip(&w.values) {
            if (g[i] as f64 - v).abs() > tolerance {
                failures.push(format!(
                    "{variant} {}[{i}] {:e} vs {v:e}",
                    tensor.name, g[i]
                ));
            }
        }
    }
    let mut model = crate::spec_backend(spec, params, 2);
    let losses = engine::train::train(
        model.as_mut(),
        &run.optimizer,
        &run.schedule,
        0,
        run.steps,
        &mut |step| batches[step].clone(),
        &mut |_, _| {},
    )
    .expect("train");
    let after = model.eval_loss(&batches[0].as_batch()).expect("loss");
    let got = losses.iter().chain([&after]);
    for (step, (got, want)) in got
        .zip(want.train_losses.iter().chain([&want.loss_after]))
        .enumerate()
    {
        if (*got as f64 - want).abs() > 3e-5 * want {
            failures.push(format!("{variant} step {step}: loss {got} vs {want}"));
        }
    }
}

/// The LoRA golden run's adapter config, as `scripts/torch_lora.py` writes it.
#[derive(Deserialize)]
struct LoraRun {
    lora: engine::LoraConfig,
}

/// A LoRA adapter (r 4, alpha 8, all seven projections, B non-zero) on the tiny Llama,
/// tied and untied: the loss, every adapter tensor's gradient, three AdamW steps of the
/// adapter alone and the loss after them, against HF transformers + PEFT in float64,
/// with the tolerances of the Llama test above.
#[test]
fn lora_loss_gradients_and_steps_match_peft() {
    let run: LlamaRun = serde_json::from_slice(&read_llama("run.json")).expect("run.json");
    let lora: LoraRun = serde_json::from_slice(&read("lora/run.json")).expect("lora/run.json");
    let golden: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_slice(&read("lora/golden.json")).expect("golden.json");
    let batches = llama_batches(&run);
    let init = read_llama("init.safetensors");
    let adapter_file = read("lora/adapter_init.safetensors");
    let mut failures = Vec::new();
    for (variant, tie) in [("untied", false), ("tied", true)] {
        let want: LlamaGolden =
            serde_json::from_value(golden[variant].clone()).expect("variant in golden.json");
        let config = engine::LlamaConfig {
            tie_embeddings: tie,
            ..run.config
        };
        let spec = engine::ModelSpec::llama_lora(variant, config, lora.lora.clone());
        let base = llama_params(&engine::ModelSpec::llama(variant, config), &init);
        let adapter_layout = engine::LoraLayout::new(&config, &lora.lora);
        let adapter = tensors_by_name(adapter_layout.table(), &adapter_file);
        let params = [base, adapter].concat();
        let tensors = adapter_layout.table().tensors().to_vec();
        check_llama_golden(
            variant,
            &spec,
            params,
            &tensors,
            &want,
            &run,
            &batches,
            &mut failures,
        );
    }
    assert!(
        failures.is_empty(),
        "the LoRA adapter differs from PEFT:\n{}",
        failures.join("\n")
    );
}

/// The float32 tensors of `layout` from a safetensors file, in the layout's order.
fn tensors_by_name(layout: &ParamLayout, bytes: &[u8]) -> Vec<f32> {
    let file = safetensors::SafeTensors::deserialize(bytes).expect("safetensors");
    let mut out = vec![0.0f32; layout.len()];
    for tensor in layout.tensors() {
        let view = file.tensor(&tensor.name).expect("tensor in the file");
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{}", tensor.name);
        assert_eq!(view.shape(), tensor.shape.as_slice(), "{}", tensor.name);
        for (p, b) in out[tensor.range()]
            .iter_mut()
            .zip(view.data().chunks_exact(4))
        {
            *p = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    out
}
