//! `cargo xtask bench train`: hivetrain's engine and PyTorch eager train the same model
//! from the same initial weights on the same batches, in one run, on the same threads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use engine::{LrSchedule, OptimizerConfig, Preset};
use serde::{Deserialize, Serialize};
use worker::unit::owned_batch;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BenchCommand {
    /// Training throughput and loss curve against PyTorch eager (scaled_dot_product_attention).
    Train(TrainBench),
    /// DiLoCo with M simulated workers against synchronous data-parallel training.
    Diloco(crate::diloco::DilocoBench),
    /// Accepted int8 updates per second through the real coordinator over loopback HTTP,
    /// against raw loopback TCP goodput measured in the same run.
    Ingest(crate::ingest::IngestBench),
    /// Fine-tuning at SmolLM2-135M's shape: a LoRA adapter (r 16, all seven projections)
    /// against PyTorch + PEFT, and full fine-tuning against PyTorch, same initial
    /// weights, batches and threads (`scripts/torch_lora_bench.py`).
    Lora(crate::lora_bench::LoraBench),
    /// The network's LoRA fine-tune of SmolLM2 (a real coordinator and M workers over
    /// loopback HTTP, the fine-tune demo's run) against one machine training one adapter
    /// on the same tokens: holdout loss per version and the gap (goal <= 2%).
    Finetune(crate::finetune_parity::FinetuneBench),
    /// Greedy decoding tokens/s of the inference endpoint and in-process, against
    /// PyTorch from the same weights (the tokens must match).
    Decode(crate::decode::DecodeBench),
    /// Robust aggregation rules (median, trimmed mean, Multi-Krum, centered and norm
    /// clipping) against PyTorch on the same tensors.
    Robust(crate::robust::RobustBench),
    /// Ledger replay, signed tree heads and inclusion proofs on a long ledger, against
    /// one-by-one signatures and Merkle hashes recomputed from every entry.
    Ledger(crate::ledger_bench::LedgerBench),
    /// Control-plane latency (lease, heartbeat, status, metrics) and durable lease
    /// operations per second of a `hivetrain coordinator` child process under many
    /// simulated workers, idle and while it aggregates, against a bare axum ceiling.
    ///
    /// The coordinator is the real binary (`--coordinator-bin`, default this checkout's
    /// release build) on a fresh run of the `small` preset on loopback, driven only
    /// through its public HTTP API. N simulated workers (`--workers`), each with its own
    /// ed25519 key, register, then loop for `--seconds`: POST /v1/lease, POST
    /// /v1/heartbeat on the unit `--heartbeats` times, GET /v1/status?rounds=50; beside
    /// them `--metrics-readers` loops GET /metrics. Every request's latency is kept per
    /// route (median, p99, max).
    ///
    /// Phase "idle": no update has been sent, so nothing aggregates. Phase "busy": the
    /// same load while `--train-workers` real `hivetrain worker` processes train units of
    /// `--local-steps` steps and send them; the coordinator scores every update, re-runs
    /// sampled units and aggregates each round after `--round-timeout` s. It runs past
    /// `--seconds` until `--busy-aggregations` aggregations fell in it; the table says how
    /// many aggregations, verdicts and re-runs it held.
    ///
    /// Durable lease operations are the new leases granted and the heartbeats answered
    /// (each a committed, fsynced transaction on 4ce3163); a worker that asks again while
    /// it holds a unit gets the same unit back and nothing is written, so those are
    /// counted apart as re-leases. Goals: >= 1,000 durable operations/s, p99 <= 50 ms for
    /// lease and heartbeat, <= 20 ms for status and metrics, in both phases.
    ///
    /// The ceiling is a bare axum server in this process (2 threads, fixed replies, no
    /// signature check, no store) under the same load. With `--baseline-bin` a second
    /// binary is measured the same way in the same run and the ratios are printed.
    Control(crate::control::ControlBench),
    /// A run with no coordinator (peers in one process, on a simulated network and over
    /// iroh on loopback) against coordinator mode on the same run: bytes each peer sends
    /// per version, time to certify a version after its last update, for 4, 8, 16 peers.
    P2p(crate::p2p_bench::P2pBench),
}

#[derive(Debug, clap::Args)]
pub(crate) struct TrainBench {
    #[arg(long, default_value = "small")]
    preset: String,
    /// Optimizer steps (the first `--untimed` are warm-up and not timed).
    #[arg(long, default_value_t = 40)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    untimed: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Threads for both hivetrain and PyTorch.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// hivetrain's device (default `cpu:THREADS`). With `cuda`, PyTorch trains on the
    /// GPU too, at its best ordinary settings there: torch.compile, bf16 autocast, fused
    /// AdamW; the table adds each side's MFU.
    #[arg(long)]
    device: Option<String>,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the replay files here: init.safetensors, tokens.u16, offsets.u32, run.json.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Python with torch, numpy and safetensors.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Skip PyTorch (hivetrain's figures only).
    #[arg(long)]
    no_torch: bool,
    /// Have PyTorch sum the clipping norm in float64, as hivetrain does (curves then agree
    /// to about 1e-3 through loss spikes; see BENCHMARKS.md). Off: stock clip_grad_norm_.
    #[arg(long)]
    torch_exact_clip: bool,
    /// Rounds of (hivetrain, PyTorch), interleaved so both see the same machine load;
    /// the reported ratio is the median of the rounds' ratios.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

/// Everything a replay needs besides the binary files (read by scripts/torch_gpt.py).
#[derive(Debug, Serialize)]
pub(crate) struct RunSpec {
    pub(crate) config: engine::GptConfig,
    pub(crate) optimizer: OptimizerConfig,
    pub(crate) schedule: LrSchedule,
    pub(crate) steps: usize,
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) warmup_untimed: usize,
}

#[derive(Debug, Deserialize)]
struct TorchResult {
    tokens_per_s: f64,
    losses: Vec<f64>,
    torch: String,
}

pub(crate) fn run(root: &Path, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Train(args) => train(root, args),
        BenchCommand::Diloco(args) => crate::diloco::run(root, args),
        BenchCommand::Ingest(args) => crate::ingest::run(root, args),
        BenchCommand::Decode(args) => crate::decode::run(root, args),
        BenchCommand::Finetune(args) => crate::finetune_parity::run(root, args),
        BenchCommand::Lora(args) => crate::lora_bench::run(root, args),
        BenchCommand::Robust(args) => crate::robust::run(root, args),
        BenchCommand::Ledger(args) => crate::ledger_bench::run(args),
        BenchCommand::Control(args) => crate::control::run(root, args),
        BenchCommand::P2p(args) => crate::p2p_bench::run(root, args),
    }
}

/// The committed corpus, tokenized (cached in the temp dir) and split for `preset`'s
/// context: what every benchmark trains on.
pub(crate) fn corpus_for(
    root: &Path,
    preset: &str,
) -> anyhow::Result<(Preset, engine::GptConfig, data::Dataset)> {
    let Some(preset) = Preset::from_name(preset) else {
        bail!("unknown preset {preset}")
    };
    let tokenizer = data::TextTokenizer::load(&root.join("data/tokenizer.json"))?;
    let corpus = root.join("data/shakespeare.txt");
    let cache = std::env::temp_dir().join("hivetrain-bench-cache");
    let tokens = data::cache::load_or_build(&corpus, &tokenizer, &cache)?.tokens;
    let config = preset.config(tokenizer.vocab_size());
    let dataset = data::Dataset::split(&corpus, &tokens, config.n_ctx)?;
    Ok((preset, config, dataset))
}

/// Writes the replay files of a run to `dir`.
pub(crate) fn dump(
    dir: &Path,
    spec: &RunSpec,
    params: &[f32],
    tokens: &[u32],
    offsets: &[u32],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    engine::checkpoint::save(
        &dir.join("init.safetensors"),
        &spec.config,
        params,
        &HashMap::new(),
    )?;
    let mut tok = Vec::with_capacity(tokens.len() * 2);
    for &t in tokens {
        let t = u16::try_from(t).context("token ids must fit u16 for tokens.u16")?;
        tok.extend_from_slice(&t.to_le_bytes());
    }
    std::fs::write(dir.join("tokens.u16"), tok)?;
    let off: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    std::fs::write(dir.join("offsets.u32"), off)?;
    std::fs::write(dir.join("run.json"), serde_json::to_string_pretty(spec)?)?;
    Ok(())
}

/// One hivetrain run over the dumped batches: (losses, timed tokens per second).
fn train_ours(
    args: &TrainBench,
    spec: &RunSpec,
    params: &[f32],
    train: &[u32],
    offsets: &[u32],
) -> anyhow::Result<(Vec<f64>, f64)> {
    let seq = spec.seq;
    let mut backend = engine::open_backend(&args.device(), spec.config, params.to_vec())?;
    let mut losses = Vec::with_capacity(args.steps);
    let mut started = Instant::now();
    for step in 0..args.steps {
        if step == args.untimed {
            started = Instant::now();
        }
        let starts: Vec<usize> = offsets[step * args.batch..(step + 1) * args.batch]
            .iter()
            .map(|&o| o as usize)
            .collect();
        let batch = owned_batch(data::address::batch_at(train, &starts, seq));
        let stats =
            backend.train_step(&batch.as_batch(), &spec.optimizer, spec.schedule.lr(step))?;
        losses.push(stats.loss as f64);
    }
    let timed_tokens = ((args.steps - args.untimed) * args.batch * seq) as f64;
    Ok((losses, timed_tokens / started.elapsed().as_secs_f64()))
}

/// One PyTorch run of scripts/torch_gpt.py over the files in `dir`.
fn train_torch(args: &TrainBench, root: &Path, dir: &Path) -> anyhow::Result<TorchResult> {
    let script = root.join("scripts/torch_gpt.py");
    let output = Command::new(&args.python)
        .arg(&script)
        .arg("bench")
        .arg(dir)
        .env("BENCH_THREADS", args.threads.to_string())
        .env("BENCH_DEVICE", if args.on_gpu() { "cuda" } else { "cpu" })
        .env(
            "BENCH_EXACT_CLIP",
            if args.torch_exact_clip { "1" } else { "0" },
        )
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !output.status.success() {
        bail!(
            "the PyTorch run failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("parsing PyTorch's output: {last}"))
}

impl TrainBench {
    fn device(&self) -> String {
        device_or_cpu(self.device.as_deref(), self.threads)
    }

    fn on_gpu(&self) -> bool {
        self.device().starts_with("cuda")
    }
}

/// A benchmark's `--device`, or `cpu:THREADS` without one.
pub(crate) fn device_or_cpu(device: Option<&str>, threads: usize) -> String {
    device.map_or_else(|| format!("cpu:{threads}"), str::to_owned)
}

/// Model FLOPs a trained token costs (nanoGPT's estimate, as PyTorch's MFU figures use):
/// 6 per parameter plus attention's 12 x layers x width x sequence.
fn flops_per_token(config: &engine::GptConfig, seq: usize) -> f64 {
    6.0 * config.n_params() as f64 + 12.0 * (config.n_layer * config.n_embd * seq) as f64
}

/// Dense bf16 peak of an H100/H200 SXM (NVIDIA's datasheet), the denominator of MFU.
pub(crate) const GPU_PEAK_FLOPS: f64 = 989e12;

fn train(root: &Path, args: TrainBench) -> anyhow::Result<()> {
    if args.untimed >= args.steps {
        bail!("--steps must exceed --untimed");
    }
    let (preset, config, dataset) = corpus_for(root, &args.preset)?;
    let seq = config.n_ctx;
    let address = protocol::WorkAddress {
        shard: 0,
        offset: 0,
        steps: args.steps as u32,
        seed: args.seed,
    };
    let mut offsets = Vec::with_capacity(args.steps * args.batch);
    for step in 0..args.steps {
        let b = data::address::batch(&address, &dataset.train, 1, step as u32, args.batch, seq)?;
        offsets.extend(b.starts.iter().map(|&s| s as u32));
    }
    let params = engine::init_params(&config, args.seed)?;
    let spec = RunSpec {
        config,
        optimizer: OptimizerConfig::default(),
        schedule: LrSchedule::cosine(args.lr, args.steps),
        steps: args.steps,
        batch: args.batch,
        seq,
        warmup_untimed: args.untimed,
    };
    let tmp = tempfile::tempdir()?;
    let dir = args.dump.clone().unwrap_or_else(|| tmp.path().to_owned());
    dump(&dir, &spec, &params, &dataset.train, &offsets)?;

    let mut rounds = Vec::new();
    let mut curves = None;
    for round in 0..args.repeat.max(1) {
        let (ours, our_tps) = train_ours(&args, &spec, &params, &dataset.train, &offsets)?;
        let mfu = |tps: f64| {
            if args.on_gpu() {
                format!(
                    ", MFU {:.1}%",
                    100.0 * tps * flops_per_token(&config, seq) / GPU_PEAK_FLOPS
                )
            } else {
                String::new()
            }
        };
        println!(
            "round {round}: hivetrain {our_tps:>6.0} tokens/s ({}, {} preset, batch {}x{seq}{})",
            args.device(),
            preset.name(),
            args.batch,
            mfu(our_tps)
        );
        if args.no_torch {
            continue;
        }
        let torch = train_torch(&args, root, &dir)?;
        let ratio = our_tps / torch.tokens_per_s;
        let settings = if args.on_gpu() {
            "cuda, torch.compile, bf16 autocast, sdpa, fused AdamW"
        } else {
            "eager, sdpa, fused AdamW"
        };
        println!(
            "round {round}: pytorch   {:>6.0} tokens/s ({} {settings}{}); ratio {ratio:.2}x",
            torch.tokens_per_s,
            torch.torch,
            mfu(torch.tokens_per_s)
        );
        rounds.push(ratio);
        curves.get_or_insert((ours, torch.losses));
    }
    let Some((ours, theirs)) = curves else {
        return Ok(());
    };
    rounds.sort_by(f64::total_cmp);
    println!(
        "ratio hivetrain / pytorch: median {:.2}x over {} rounds (min {:.2}x, max {:.2}x)",
        rounds[rounds.len() / 2],
        rounds.len(),
        rounds[0],
        rounds[rounds.len() - 1]
    );
    println!("\nstep  hivetrain  pytorch   diff");
    let mut worst = 0.0f64;
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        worst = worst.max((a - b).abs());
        if i % 5 == 0 || i + 1 == ours.len() || (a - b).abs() > 1e-3 {
            println!("{i:>4}  {a:>9.4}  {b:>7.4}  {:+.4}", a - b);
        }
    }
    println!(
        "largest loss difference over {} steps: {worst:.4}",
        ours.len()
    );
    Ok(())
}

/// Runs `python scripts/SCRIPT ARG` and returns its standard output; a failure carries the
/// script's standard error.
pub(crate) fn run_python(
    python: &str,
    root: &Path,
    script: &str,
    arg: &Path,
) -> anyhow::Result<Vec<u8>> {
    let script = root.join("scripts").join(script);
    let output = std::process::Command::new(python)
        .arg(&script)
        .arg(arg)
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    if !output.status.success() {
        anyhow::bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}
