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
