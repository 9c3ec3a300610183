//! `cargo xtask bench lora`: fine-tuning at SmolLM2-135M's shape, hivetrain's engine
//! against PyTorch (+ PEFT for the adapter), in one run, from the same initial weights,
//! on the same batches and the same threads.
//!
//! The weights are random (HF's Llama init from `--seed`; the GGUF loader lands
//! separately), the adapter PEFT's init with its `B` at zero. Both sides read one
//! `init.safetensors` (the base under HF names, the adapter under PEFT's) and one
//! `tokens.u32` of `steps x batch` windows of `seq + 1` tokens from the committed corpus,
//! and print their loss per step, so the curves can be compared line by line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use engine::{LlamaConfig, LoraConfig, LoraTarget, LrSchedule, ModelSpec, OptimizerConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, clap::Args)]
pub(crate) struct LoraBench {
    /// What trains: `lora` (the adapter on a frozen base, against PyTorch + PEFT),
    /// `full` (every weight, against plain PyTorch) or `both`, one after the other.
    #[arg(long, default_value = "lora")]
    trainable: String,
    /// Optimizer steps (the first `--untimed` are warm-up and not timed).
    #[arg(long, default_value_t = 6)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    untimed: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// LoRA rank and alpha; the adapter targets all seven projections.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Threads for both hivetrain and PyTorch.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// hivetrain's device (default `cpu:THREADS`). With `cuda`, PyTorch trains on the
    /// GPU too, at its best ordinary settings there: torch.compile, bf16 autocast, fused
    /// AdamW (`--torch-compile` is implied); the figures add each side's MFU.
    #[arg(long)]
    device: Option<String>,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Python with torch, transformers, safetensors, numpy and peft
    /// (scripts/requirements-lora.txt).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Also time PyTorch with `torch.compile` on the model (a second PyTorch run).
    #[arg(long)]
    torch_compile: bool,
    /// Skip PyTorch (hivetrain's figures only).
    #[arg(long)]
    no_torch: bool,
    /// Rounds of (hivetrain, PyTorch), interleaved so both see the same machine load;
    /// the reported ratio is the median of the rounds' ratios (the lower middle one of an
    /// even count).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Keep the replay files here: init.safetensors, tokens.u32, run.json.
    #[arg(long)]
    dump: Option<PathBuf>,
}

/// What `scripts/torch_lora_bench.py` reads besides the binary files.
#[derive(Clone, Debug, Serialize)]
struct RunSpec {
    config: LlamaConfig,
    /// `None`: every weight trains.
    lora: Option<LoraConfig>,
    optimizer: OptimizerConfig,
    schedule: LrSchedule,
    steps: usize,
    untimed: usize,
    batch: usize,
    seq: usize,
    threads: usize,
    compile: bool,
}

#[derive(Debug, Deserialize)]
struct TorchResult {
    tokens_per_s: f64,
    losses: Vec<f64>,
    torch: String,
    settings: String,
}

pub(crate) fn run(root: &Path, args: LoraBench) -> anyhow::Result<()> {
    if args.untimed >= args.steps {
        bail!("--steps must exceed --untimed");
    }
    let modes: &[bool] = match args.trainable.as_str() {
        "lora" => &[true],
        "full" => &[false],
        "both" => &[true, false],
        other => bail!("--trainable {other}: expected lora, full or both"),
    };
    let config = LlamaConfig::smollm2_135m(args.seq);
    let windows = windows(root, &args, config.vocab_size)?;
    for &lora in modes {
        bench_one(root, &args, config, lora, &windows)?;
    }
    Ok(())
}

/// `steps x batch` windows of `seq + 1` tokens of the committed corpus, at the offsets
/// the GPT-2 benchmark's work addresses pick.
fn windows(root: &Path, args: &LoraBench, vocab: usize) -> anyhow::Result<Vec<u32>> {
    let (_, _, dataset) = crate::bench::corpus_for(root, "small")?;
    let address = protocol::WorkAddress {
        shard: 0,
        offset: 0,
        steps: args.steps as u32,
        seed: args.seed,
    };
    let mut windows = Vec::with_capacity(args.steps * args.batch * (args.seq + 1));
    for step in 0..args.steps {
        let b = data::address::batch(
            &address,
            &dataset.train,
            1,
            step as u32,
            args.batch,
            args.seq,
        )?;
        for &s in &b.starts {
            windows.extend_from_slice(&dataset.train[s..s + args.seq + 1]);
        }
    }
    if let Some(&t) = windows.iter().find(|&&t| t as usize >= vocab) {
        bail!("token {t} is outside SmolLM2's vocabulary");
    }
    Ok(windows)
}

fn bench_one(
    root: &Path,
    args: &LoraBench,
    config: LlamaConfig,
    lora: bool,
    windows: &[u32],
) -> anyhow::Result<()> {
    let lora_config = LoraConfig {
        rank: args.rank,
        alpha: args.alpha,
        targets: LoraTarget::ALL.to_vec(),
    };
    let spec = if lora {
        ModelSpec::llama_lora("smollm2-135m-lora", config, lora_config.clone())
    } else {
        ModelSpec::llama("smollm2-135m", config)
    };
    spec.validate()?;
    let params = spec.init_params(args.seed)?;
    let run = RunSpec {
        config,
        lora: lora.then_some(lora_config),
        optimizer: OptimizerConfig::default(),
        schedule: LrSchedule::cosine(args.lr, args.steps),
        steps: args.steps,
        untimed: args.untimed,
        batch: args.batch,
        seq: args.seq,
        threads: args.threads,
        compile: args.on_gpu(),
    };
    let tmp = tempfile::tempdir()?;
    let dir = args.dump.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    save_safetensors(&dir.join("init.safetensors"), &spec, &params)?;
    let tokens: Vec<u8> = windows.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(dir.join("tokens.u32"), tokens)?;
    std::fs::write(dir.join("run.json"), serde_json::to_string_pretty(&run)?)?;

    let what = if lora {
        format!(
            "LoRA r {} alpha {} on all seven projections ({} adapter floats)",
            args.rank,
            args.alpha,
            spec.trainable_len()
        )
    } else {
        format!("full fine-tuning ({} floats)", spec.trainable_len())
    };
    println!(
        "== {what}: SmolLM2-135M shape, random weights, batch {}x{}, {} steps ({} untimed), {} threads",
        args.batch, args.seq, args.steps, args.untimed, args.threads
    );
    let mut ratios = Vec::new();
    let mut curves = None;
    for round in 0..args.repeat.max(1) {
        let (ours, our_tps) = train_ours(args, &spec, params.clone(), &run, windows)?;
        let mfu = |tps: f64| {
            if args.on_gpu() {
                format!(
                    ", MFU {:.1}%",
                    100.0 * tps * flops_per_token(&spec, args.seq) / crate::bench::GPU_PEAK_FLOPS
                )
            } else {
                String::new()
            }
        };
        println!(
            "round {round}: hivetrain {our_tps:>7.1} tokens/s ({}{})",
            args.device(),
            mfu(our_tps)
        );
        if args.no_torch {
            curves.get_or_insert((ours, Vec::new()));
            continue;
        }
        let torch = train_torch(args, root, &dir)?;
        let ratio = our_tps / torch.tokens_per_s;
        println!(
            "round {round}: pytorch   {:>7.1} tokens/s ({} {}{}); ratio hivetrain / pytorch {ratio:.2}x",
            torch.tokens_per_s,
            torch.torch,
            torch.settings,
            mfu(torch.tokens_per_s),
        );
        ratios.push(ratio);
        if args.torch_compile && !args.on_gpu() && round == 0 {
            let compiled = RunSpec {
                compile: true,
                ..run.clone()
            };
            std::fs::write(
                dir.join("run.json"),
                serde_json::to_string_pretty(&compiled)?,
            )?;
            match train_torch(args, root, &dir) {
                Ok(c) => println!(
                    "round {round}: pytorch   {:>7.1} tokens/s ({} {}); ratio hivetrain / pytorch {:.2}x",
                    c.tokens_per_s,
                    c.torch,
                    c.settings,
                    our_tps / c.tokens_per_s
                ),
                Err(e) => println!("pytorch with torch.compile failed: {e:#}"),
            }
            std::fs::write(dir.join("run.json"), serde_json::to_string_pretty(&run)?)?;
        }
        curves.get_or_insert((ours, torch.losses));
    }
    if !ratios.is_empty() {
        ratios.sort_by(f64::total_cmp);
        println!(
            "ratio hivetrain / pytorch: median {:.2}x over {} rounds (min {:.2}x, max {:.2}x)",
            ratios[(ratios.len() - 1) / 2],
            ratios.len(),
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    if let Some((ours, theirs)) = curves {
        print_curves(&ours, &theirs);
    }
    Ok(())
}

/// The full vector under its HF and PEFT names, float32.
pub(crate) fn save_safetensors(
    path: &Path,
    spec: &ModelSpec,
    params: &[f32],
) -> anyhow::Result<()> {
    let layout = spec.layout();
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = layout
        .tensors()
        .iter()
        .map(|t| {
            let data = params[t.range()]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (t.name.clone(), data, t.shape.clone())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, data, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// hivetrain's run: (losses, timed tokens per second).
fn train_ours(
    args: &LoraBench,
    spec: &ModelSpec,
    params: Vec<f32>,
    run: &RunSpec,
    windows: &[u32],
) -> anyhow::Result<(Vec<f64>, f64)> {
    let mut backend = engine::open_model(&args.device(), spec, params, engine::Purpose::Train)?;
    let (b, t) = (args.batch, args.seq);
    let mut losses = Vec::with_capacity(args.steps);
    let mut started = Instant::now();
    for (step, rows) in windows.chunks_exact(b * (t + 1)).enumerate() {
        if step == args.untimed {
            started = Instant::now();
        }
        let inputs: Vec<u32> = rows
            .chunks_exact(t + 1)
            .flat_map(|r| &r[..t])
            .copied()
            .collect();
        let targets: Vec<u32> = rows
            .chunks_exact(t + 1)
            .flat_map(|r| &r[1..])
            .copied()
            .collect();
        let batch = engine::Batch {
            inputs: &inputs,
            targets: &targets,
            batch: b,
            seq: t,
        };
        let stats = backend.train_step(&batch, &run.optimizer, run.schedule.lr(step))?;
        losses.push(stats.loss as f64);
        println!(
            "  hivetrain step {step}: loss {:.4} ({:.1} s since the timed start)",
            stats.loss,
            started.elapsed().as_secs_f64()
        );
    }
    let timed_tokens = ((args.steps - args.untimed) * b * t) as f64;
    Ok((losses, timed_tokens / started.elapsed().as_secs_f64()))
}

/// One run of scripts/torch_lora_bench.py over the files in `dir`.
fn train_torch(args: &LoraBench, root: &Path, dir: &Path) -> anyhow::Result<TorchResult> {
    let script = root.join("scripts/torch_lora_bench.py");
    let output = Command::new(&args.python)
        .arg(&script)
        .arg(dir)
        .env("BENCH_DEVICE", if args.on_gpu() { "cuda" } else { "cpu" })
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !output.status.success() {
        bail!(
            "the PyTorch run failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines().filter(|l| l.starts_with("  pytorch")) {
        println!("{line}");
    }
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("parsing PyTorch's output: {last}"))
}

impl LoraBench {
    fn device(&self) -> String {
        crate::bench::device_or_cpu(self.device.as_deref(), self.threads)
    }

    fn on_gpu(&self) -> bool {
        self.device().starts_with("cuda")
    }
}

/// Model FLOPs a trained token costs, as PyTorch's MFU figures count them: 6 per
/// parameter when every weight trains (forward, input gradients, weight gradients), 4
/// with a LoRA adapter (a frozen weight has no gradient; the adapter's own products are
/// under 3% of them at rank 16 and not counted), plus attention's 12 x layers x query
/// width x sequence.
fn flops_per_token(spec: &ModelSpec, seq: usize) -> f64 {
    let engine::Architecture::Llama(config) = spec.architecture else {
        return 0.0;
    };
    let per_param = if spec.lora().is_some() { 4.0 } else { 6.0 };
    let base = spec.base_len() as f64;
    per_param * base + 12.0 * (config.layers * config.heads * config.head_dim * seq) as f64
}

fn print_curves(ours: &[f64], theirs: &[f64]) {
    println!("step  hivetrain  pytorch   diff");
    let mut worst = 0.0f64;
    for (i, a) in ours.iter().enumerate() {
        match theirs.get(i) {
            Some(b) => {
                worst = worst.max((a - b).abs());
                println!("{i:>4}  {a:>9.4}  {b:>7.4}  {:+.4}", a - b);
            }
            None => println!("{i:>4}  {a:>9.4}"),
        }
    }
    if !theirs.is_empty() {
        println!(
            "largest loss difference over {} steps: {worst:.4}",
            ours.len()
        );
    }
}
