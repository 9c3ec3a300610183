//! `cargo xtask bench diloco`: loss parity of DiLoCo with M simulated workers against
//! synchronous data-parallel training on the same data, from the same start, in one run.
//!
//! Both sides read the same tokens: worker m of M reads shard m of the train stream
//! (M shards), H steps per round, continuing where its last round stopped. Data-parallel
//! training averages, at every step, the gradients of the M workers' batches of that
//! step, which is one step on their concatenation (every shard batch has the same size).
//! So both see M x H x rounds x batch x seq tokens. Each worker keeps its own AdamW state
//! across rounds (DiLoCo's inner optimizer); the outer step is `aggregation`'s rule.

use std::time::Instant;

use aggregation::{OuterConfig, WeightedDelta};
use anyhow::{Context, bail};
use engine::train::OwnedBatch;
use engine::{LrSchedule, OptimizerConfig};
use worker::unit::owned_batch;

#[derive(Debug, clap::Args)]
pub(crate) struct DilocoBench {
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Worker counts to try.
    #[arg(long, value_delimiter = ',', default_value = "4,8")]
    workers: Vec<usize>,
    /// Local steps per round to try.
    #[arg(long, value_delimiter = ',', default_value = "50,100")]
    local_steps: Vec<usize>,
    /// Sequential inner steps of every run (rounds = this / H); the same for all runs.
    #[arg(long, default_value_t = 1000)]
    inner_steps: usize,
    /// Sequences per worker per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 3e-3)]
    inner_lr: f32,
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    #[arg(long, default_value_t = 0.9)]
    outer_momentum: f32,
    /// Outer settings to try, each its own DiLoCo run against the one baseline, as
    /// `lr:momentum` pairs (e.g. `0.7:0.5,1.0:0.5`); overrides --outer-lr and --outer-momentum.
    #[arg(long, value_delimiter = ',', value_parser = parse_outer)]
    outer: Vec<(f32, f32)>,
    /// Cores to use. Data-parallel training gets them all; DiLoCo's M workers split
    /// them (threads / M each, at least one) and as many as fit train at the same time.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// `cpu` (with --threads) or `cuda`/`cuda:N`: on a GPU the M workers are M backends
    /// on it, trained one after another (bf16, the fused attention where heads are 64).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Holdout batches per evaluation.
    #[arg(long, default_value_t = 16)]
    eval_batches: usize,
    /// Train DiLoCo as the network does: every unit starts a fresh AdamW at a constant
    /// learning rate (with `--unit-warmup` steps of linear warmup), instead of each worker
    /// keeping its AdamW state and following one cosine schedule.
    #[arg(long)]
    network: bool,
    /// With --network: each round's units run at a learning rate falling along a cosine over the rounds
    /// from the peak to a tenth of it (what `schedule.lr_decay_rounds` makes the
    /// coordinator assign), instead of the peak rate throughout.
    #[arg(long)]
    round_lr_decay: bool,
    /// Linear warmup steps at the start of each unit (with --network).
    #[arg(long, default_value_t = 0)]
    unit_warmup: usize,
    /// Data-parallel holdout loss to compare against instead of training the baseline
    /// (it is deterministic: take it from an earlier run of the same settings, which
    /// prints it before its DiLoCo runs). Only with a single --workers count.
    #[arg(long)]
    baseline_loss: Option<f32>,
    /// Codecs the deltas go through (encode, then decode) before the outer step: fp32,
    /// fp16, int8, int8-codebook. Each gets its own DiLoCo run, bytes and loss.
    #[arg(long, value_delimiter = ',', default_value = "fp32")]
    codecs: Vec<String>,
}

impl DilocoBench {
    fn on_gpu(&self) -> bool {
        self.device.starts_with("cuda")
    }

    /// The device of a run on the whole machine (the baseline, evaluation).
    fn whole(&self) -> String {
        if self.on_gpu() {
            self.device.clone()
        } else {
            format!("cpu:{}", self.threads)
        }
    }
}

fn parse_outer(s: &str) -> Result<(f32, f32), String> {
    let (lr, momentum) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not lr:momentum, e.g. 0.7:0.5"))?;
    let number = |v: &str| v.parse::<f32>().map_err(|e| format!("{v:?} in {s:?}: {e}"));
    Ok((number(lr)?, number(momentum)?))
}

fn codec(name: &str) -> anyhow::Result<protocol::Codec> {
    protocol::Codec::from_name(name)
        .with_context(|| format!("unknown codec {name:?}: {}", protocol::Codec::NAMES))
}

struct Setup {
    config: engine::GptConfig,
    train: Vec<u32>,
    holdout: Vec<OwnedBatch>,
    seq: usize,
    init: Vec<f32>,
}

pub(crate) fn run(root: &std::path::Path, args: DilocoBench) -> anyhow::Result<()> {
    if args.workers.contains(&0) || args.batch == 0 || args.inner_steps == 0 {
        bail!("--workers, --batch and --inner-steps must be at least 1");
    }
    if args.device != "cpu" {
        engine::check_device(&args.device)?;
    }
    let (preset, config, dataset) = crate::bench::corpus_for(root, &args.preset)?;
    let seq = config.n_ctx;
    let holdout = dataset
        .holdout_starts(seq, args.eval_batches * args.batch)
        .chunks(args.batch)
        .map(|s| owned_batch(data::address::batch_at(&dataset.holdout, s, seq)))
        .collect();
    let setup = Setup {
        config,
        train: dataset.train,
        holdout,
        seq,
        init: engine::init_params(&config, args.seed)?,
    };
    let outers = if args.outer.is_empty() {
        vec![(args.outer_lr, args.outer_momentum)]
    } else {
        args.outer.clone()
    };
    println!(
        "{} preset, {} inner steps per run, {} x {seq} tokens per worker-step, inner AdamW peak lr {}",
        preset.name(),
        args.inner_steps,
        args.batch,
        args.inner_lr,
    );
    let codecs = args
        .codecs
        .iter()
        .map(|c| Ok((c.as_str(), codec(c)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let n = setup.init.len();
    if args.baseline_loss.is_some() && args.workers.len() != 1 {
        bail!("--baseline-loss is the loss of one worker count: give a single --workers");
    }
    // Checked before any training, so a bad H costs nothing.
    if let Some(&h) = args
        .local_steps
        .iter()
        .find(|&&h| h == 0 || !args.inner_steps.is_multiple_of(h))
    {
        bail!(
            "--inner-steps {} is not a positive multiple of H = {h}: give inner steps that every --local-steps divides",
            args.inner_steps
        );
    }
    println!(
        "\n   M     H  rounds      tokens  codec         outer lr:mom  DiLoCo  data-par.   ratio  update bytes  DP bytes/update  less   time"
    );
    for &m in &args.workers {
        let started = Instant::now();
        let baseline = match args.baseline_loss {
            Some(loss) => loss,
            None => {
                let loss = data_parallel(&setup, &args, m)?;
                println!(
                    "data-parallel, M = {m}: holdout loss {loss:.4} ({:.0} s)",
                    started.elapsed().as_secs_f64()
                );
                loss
            }
        };
        let dp_secs = started.elapsed().as_secs_f64();
        for &h in &args.local_steps {
            for (&(name, codec), &outer) in codecs
                .iter()
                .flat_map(|c| outers.iter().map(move |o| (c, o)))
            {
                let started = Instant::now();
                let loss = diloco(&setup, &args, m, h, codec, outer)?;
                let tokens = m * args.inner_steps * args.batch * setup.seq;
                // What one worker sends per outer step, against what it sends in
                // data-parallel training for the same tokens: an fp32 gradient a step.
                let update = protocol::update::HEADER_BYTES as u64 + codec.payload_bytes(n as u32);
                let dp = (h * 4 * n) as u64;
                println!(
                    "{m:>4} {h:>5} {:>7} {tokens:>11}  {name:<13} {:>5}:{:<6} {loss:>7.4} {baseline:>10.4} {:>7.4}  {update:>12}  {dp:>15}  {:>4.0}x {:>5.0}s (+{dp_secs:.0}s data-parallel)",
                    args.inner_steps / h,
                    outer.0,
                    outer.1,
                    loss / baseline,
                    dp as f64 / update as f64,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(())
}

fn batch_of(
    setup: &Setup,
    args: &DilocoBench,
    m: usize,
    workers: usize,
    step: usize,
) -> anyhow::Result<data::TokenBatch> {
    let address = protocol::WorkAddress {
        shard: m as u32,
        offset: step as u64,
        steps: 1,
        seed: args.seed,
    };
    data::address::batch(
        &address,
        &setup.train,
        workers as u32,
        0,
        args.batch,
        setup.seq,
    )
    .with_context(|| format!("batch of worker {m} at step {step}"))
}

/// Synchronous data-parallel: every step, one AdamW step on the M workers' batches together.
fn data_parallel(setup: &Setup, args: &DilocoBench, workers: usize) -> anyhow::Result<f32> {
    let mut backend = engine::open_backend(&args.whole(), setup.config, setup.init.clone())?;
    let schedule = LrSchedule::cosine(args.inner_lr, args.inner_steps);
    let optimizer = OptimizerConfig::default();
    for step in 0..args.inner_steps {
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for m in 0..workers {
            let b = batch_of(setup, args, m, workers, step)?;
            inputs.extend(b.inputs);
            targets.extend(b.targets);
        }
        let batch = OwnedBatch {
            inputs,
            targets,
            batch: workers * args.batch,
            seq: setup.seq,
        };
        backend.train_step(&batch.as_batch(), &optimizer, schedule.lr(step))?;
    }
    Ok(engine::train::evaluate(backend.as_mut(), &setup.holdout)?)
}

/// DiLoCo: M workers, H local AdamW steps each per round (the M at the same time), then
/// one outer step with `outer` = (lr, momentum).
fn diloco(
    setup: &Setup,
    args: &DilocoBench,
    workers: usize,
    h: usize,
    codec: protocol::Codec,
    outer: (f32, f32),
) -> anyhow::Result<f32> {
    let n = setup.init.len();
    let mut base = setup.init.clone();
    let mut outer = OuterConfig::Diloco {
        lr: outer.0,
        momentum: outer.1,
    }
    .build(n);
    let per_worker = (args.threads / workers).max(1);
    let (device, at_once) = if args.on_gpu() {
        (args.device.clone(), 1)
    } else {
        (
            format!("cpu:{per_worker}"),
            (args.threads / per_worker).max(1),
        )
    };
    let mut backends = (0..workers)
        .map(|_| engine::open_backend(&device, setup.config, setup.init.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let weight = (h * args.batch * setup.seq) as u64;
    for round in 0..args.inner_steps / h {
        let base_ref = &base;
        let mut deltas = Vec::with_capacity(workers);
        for (wave, group) in backends.chunks_mut(at_once).enumerate() {
            let trained = std::thread::scope(|scope| {
                let running: Vec<_> = group
                    .iter_mut()
                    .enumerate()
                    .map(|(i, backend)| {
                        let m = wave * at_once + i;
                        scope.spawn(move || {
                            local_round(
                                setup,
                                args,
                                backend.as_mut(),
                                base_ref,
                                m,
                                workers,
                                h,
                                round,
                                codec,
                            )
                        })
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|t| {
                        t.join()
                            .map_err(|_| anyhow::anyhow!("a DiLoCo worker thread panicked"))?
                    })
                    .collect::<anyhow::Result<Vec<Vec<f32>>>>()
            })?;
            deltas.extend(trained);
        }
        let weighted: Vec<WeightedDelta<'_>> = deltas
            .iter()
            .map(|d| WeightedDelta { delta: d, weight })
            .collect();
        outer.step(&mut base, &weighted)?;
    }
    let mut eval = engine::open_backend(&args.whole(), setup.config, base)?;
    Ok(engine::train::evaluate(eval.as_mut(), &setup.holdout)?)
}

/// Worker `m`'s round `round`: H local steps from `base`, then the delta as the
/// coordinator receives it (after the codec's round trip).
#[allow(clippy::too_many_arguments)]
fn local_round(
    setup: &Setup,
    args: &DilocoBench,
    backend: &mut dyn engine::Backend,
    base: &[f32],
    m: usize,
    workers: usize,
    h: usize,
    round: usize,
    codec: protocol::Codec,
) -> anyhow::Result<Vec<f32>> {
    let schedule = LrSchedule::cosine(args.inner_lr, args.inner_steps);
    let optimizer = OptimizerConfig::default();
    backend.set_params(base)?;
    if args.network {
        backend.reset_optimizer();
    }
    for i in 0..h {
        let step = round * h + i;
        let batch = owned_batch(batch_of(setup, args, m, workers, step)?);
        let lr = if args.network {
            let unit_lr = scheduler::ScheduleConfig {
                inner_lr: args.inner_lr,
                lr_decay_rounds: if args.round_lr_decay {
                    (args.inner_steps / h) as u64
                } else {
                    0
                },
                ..Default::default()
            }
            .round_lr(round as u64);
            unit_lr * ((i + 1) as f32 / args.unit_warmup.max(1) as f32).min(1.0)
        } else {
            schedule.lr(step)
        };
        backend.train_step(&batch.as_batch(), &optimizer, lr)?;
    }
    let local = backend.params();
    let delta: Vec<f32> = base.iter().zip(&local).map(|(b, l)| b - l).collect();
    let payload = codec.encode(&delta);
    Ok(codec.decode(&payload, delta.len() as u32)?)
}
