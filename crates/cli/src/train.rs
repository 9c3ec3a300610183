//! `hivetrain train`: train a GPT on a corpus, report the holdout curve, save, sample.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use engine::generate::SamplingParams;
use engine::train::OwnedBatch;
use engine::{LrSchedule, OptimizerConfig, Preset};
use serde::Serialize;

use worker::unit::owned_batch;

use crate::paths;

#[derive(Debug, clap::Args)]
pub(crate) struct TrainArgs {
    /// Model preset: tiny (tests), small (4 layers, d 256) or base (12 layers, d 768).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Corpus: a UTF-8 text file, or JSON lines (.jsonl) with a "text" field.
    #[arg(long, default_value = paths::DEFAULT_CORPUS)]
    corpus: PathBuf,
    /// Tokenizer: any HF tokenizer.json.
    #[arg(long, default_value = paths::DEFAULT_TOKENIZER)]
    tokenizer: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence (default: the preset's context).
    #[arg(long)]
    seq: Option<usize>,
    /// Peak learning rate (linear warmup over 5% of the steps, then cosine to a tenth).
    #[arg(long, default_value_t = 2e-3)]
    lr: f32,
    /// Evaluate the holdout loss every this many steps.
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Holdout batches per evaluation.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// Seed of the initial weights and of the batch order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Compute device: `cpu` (all cores), `cpu:N` (N threads), `cuda` / `cuda:N` (an
    /// NVIDIA GPU: the driver and cuBLASLt, no CUDA toolkit), or `auto` (a GPU when one
    /// works, else every core).
    #[arg(long, env = crate::env::DEVICE, default_value = "cpu")]
    device: String,
    /// Start from this checkpoint instead of fresh weights.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Directory for the trained model (default: runs/PRESET).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Directory for the tokenized-corpus cache.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Tokens to sample after training (0: none).
    #[arg(long, default_value_t = 200)]
    sample_tokens: usize,
    /// Prompt of the sample.
    #[arg(long, default_value = "Ham.\n")]
    prompt: String,
}

#[derive(Debug, Serialize)]
struct CurvePoint {
    step: usize,
    tokens: usize,
    train_loss: Option<f32>,
    holdout_loss: f32,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct TrainLog<'a> {
    preset: &'a str,
    config: engine::GptConfig,
    optimizer: OptimizerConfig,
    schedule: LrSchedule,
    batch: usize,
    seq: usize,
    seed: u64,
    device: String,
    corpus: String,
    tokens_per_second: f64,
    curve: Vec<CurvePoint>,
}

pub(crate) fn run(args: TrainArgs) -> anyhow::Result<()> {
    let Some(preset) = Preset::from_name(&args.preset) else {
        let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
        bail!(
            "unknown preset {:?}: choose one of {}",
            args.preset,
            names.join(", ")
        );
    };
    if args.steps == 0 || args.batch == 0 || args.eval_every == 0 || args.eval_batches == 0 {
        bail!("--steps, --batch, --eval-every and --eval-batches must be at least 1");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", args.lr);
    }
    let tokenizer_path = paths::bundled(&args.tokenizer);
    let corpus_path = paths::bundled(&args.corpus);
    let tokenizer = paths::load_tokenizer(&tokenizer_path)?;
    let cache_dir = paths::cache_dir(args.cache_dir.as_deref());
    let loaded = data::cache::load_or_build(&corpus_path, &tokenizer, &cache_dir)
        .with_context(|| format!("reading the corpus {}", corpus_path.display()))?;
    eprintln!(
        "corpus {}: {} tokens ({})",
        corpus_path.display(),
        loaded.tokens.len(),
        if loaded.from_cache {
            "from cache"
        } else {
            "tokenized now, cached"
        }
    );

    let (config, params) = match &args.init {
        Some(path) => {
            let ckpt = engine::checkpoint::load(path)
                .with_context(|| format!("loading the starting checkpoint {}", path.display()))?;
            if ckpt.config.vocab_size != tokenizer.vocab_size() {
                bail!(
                    "{} has a vocabulary of {} but the tokenizer {} has {}",
                    path.display(),
                    ckpt.config.vocab_size,
                    tokenizer_path.display(),
                    tokenizer.vocab_size()
                );
            }
            (ckpt.config, ckpt.params)
        }
        None => {
            let config = preset.config(tokenizer.vocab_size());
            (config, engine::init_params(&config, args.seed)?)
        }
    };
    let seq = args.seq.unwrap_or(config.n_ctx);
    if seq == 0 || seq > config.n_ctx {
        bail!(
            "--seq {seq} must be between 1 and the model's context of {}",
            config.n_ctx
        );
    }
    let device = engine::resolve_device(&args.device)?;
    if let engine::Device::Cpu { .. } = device {
        check_memory(&config, args.batch, seq)?;
    }
    let dataset = data::Dataset::split(&corpus_path, &loaded.tokens, seq)?;
    let mut backend = engine::open_backend(&args.device, config, params)?;
    eprintln!(
        "model {} ({:.2}M parameters) on {}; {} steps of {}x{} tokens; {:.2} GiB of buffers",
        preset.name(),
        config.n_params() as f64 / 1e6,
        backend.device(),
        args.steps,
        args.batch,
        seq,
        config.training_bytes(args.batch, seq) as f64 / (1u64 << 30) as f64
    );

    let holdout: Vec<OwnedBatch> = dataset
        .holdout_starts(seq, args.eval_batches * args.batch)
        .chunks(args.batch)
        .map(|starts| owned_batch(data::address::batch_at(&dataset.holdout, starts, seq)))
        .collect();
    let address = protocol::WorkAddress {
        shard: 0,
        offset: 0,
        steps: args.steps as u32,
        seed: args.seed,
    };
    let optimizer = OptimizerConfig::default();
    let schedule = LrSchedule::cosine(args.lr, args.steps);

    let progress = indicatif::ProgressBar::new(args.steps as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} steps | {msg} | {elapsed} elapsed, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let tokens_per_step = args.batch * seq;
    let mut curve = Vec::new();
    let first = engine::train::evaluate(backend.as_mut(), &holdout)?;
    say(&progress, format!("step {:>5} | holdout {first:.4}", 0));
    curve.push(CurvePoint {
        step: 0,
        tokens: 0,
        train_loss: None,
        holdout_loss: first,
        seconds: 0.0,
    });
    let mut train_secs = 0.0f64;
    let mut recent = Vec::new();
    for step in 0..args.steps {
        let batch = owned_batch(data::address::batch(
            &address,
            &dataset.train,
            1,
            step as u32,
            args.batch,
            seq,
        )?);
        let t0 = Instant::now();
        let stats = backend.train_step(&batch.as_batch(), &optimizer, schedule.lr(step))?;
        train_secs += t0.elapsed().as_secs_f64();
        if !stats.loss.is_finite() {
            bail!(
                "the training loss became {} at step {step}; try a lower --lr",
                stats.loss
            );
        }
        recent.push(stats.loss);
        let done = step + 1;
        let tps = (done * tokens_per_step) as f64 / train_secs;
        progress.set_message(format!("loss {:.4} | {:.0} tok/s", stats.loss, tps));
        progress.inc(1);
        if done % args.eval_every == 0 || done == args.steps {
            let holdout_loss = engine::train::evaluate(backend.as_mut(), &holdout)?;
            let train_loss = recent.iter().sum::<f32>() / recent.len() as f32;
            recent.clear();
            say(
                &progress,
                format!(
                    "step {done:>5} | train {train_loss:.4} | holdout {holdout_loss:.4} | {tps:.0} tok/s"
                ),
            );
            curve.push(CurvePoint {
                step: done,
                tokens: done * tokens_per_step,
                train_loss: Some(train_loss),
                holdout_loss,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    }
    progress.finish_and_clear();
    let tokens_per_second = (args.steps * tokens_per_step) as f64 / train_secs;

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(preset.name()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let last = curve.last().map(|p| p.holdout_loss).unwrap_or(f32::NAN);
    let metadata = HashMap::from([
        ("hivetrain.preset".to_string(), preset.name().to_string()),
        ("hivetrain.steps".to_string(), args.steps.to_string()),
        ("hivetrain.holdout_loss".to_string(), format!("{last:.6}")),
    ]);
    let params = backend.params();
    engine::checkpoint::save(&out.join(paths::MODEL_FILE), &config, &params, &metadata)?;
    tokenizer.save(&out.join(paths::TOKENIZER_FILE))?;
    let log = TrainLog {
        preset: preset.name(),
        config,
        optimizer,
        schedule,
        batch: args.batch,
        seq,
        seed: args.seed,
        device: backend.device(),
        corpus: corpus_path.display().to_string(),
        tokens_per_second,
        curve,
    };
    let log_path = out.join(paths::LOG_FILE);
    std::fs::write(&log_path, serde_json::to_string_pretty(&log)?)
        .with_context(|| format!("writing {}", log_path.display()))?;
    println!(
        "holdout loss {first:.4} -> {last:.4} in {:.0} s ({tokens_per_second:.0} tokens/s); model saved to {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );

    if args.sample_tokens > 0 {
        // On the device that trained (a GPU decodes in its training precision, bf16).
        print_sample(
            backend.as_mut(),
            &tokenizer,
            &args.prompt,
            args.sample_tokens,
            args.seed,
        )?;
    }
    Ok(())
}

/// Refuses a run whose buffers would not fit in the memory available now (Linux), with
/// the sizes and what to change, rather than letting the OS kill it mid-run.
fn check_memory(config: &engine::GptConfig, batch: usize, seq: usize) -> anyhow::Result<()> {
    const GIB: f64 = (1u64 << 30) as f64;
    let need = config.training_bytes(batch, seq);
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    if let Some(available) = available
        && need as f64 > 0.9 * available as f64
    {
        bail!(
            "training with batch {batch} x {seq} tokens needs about {:.1} GiB (weights, gradients, AdamW state and activations), but only {:.1} GiB are available: lower --batch or --seq",
            need as f64 / GIB,
            available as f64 / GIB
        );
    }
    Ok(())
}

/// Prints a line above the progress bar, or plainly when there is no terminal (where
/// indicatif hides the bar and would drop the line).
fn say(progress: &indicatif::ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}

fn print_sample(
    backend: &mut dyn engine::Backend,
    tokenizer: &data::TextTokenizer,
    prompt: &str,
    n: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let prompt_ids = tokenizer.encode(prompt)?;
    let sampling = SamplingParams {
        seed,
        ..SamplingParams::default()
    };
    let ids = engine::generate::generate(backend, &prompt_ids, n, &sampling, &mut |_| true)?;
    println!(
        "--- sample ---\n{}{}\n--------------",
        prompt,
        tokenizer.decode(&ids)
    );
    Ok(())
}
