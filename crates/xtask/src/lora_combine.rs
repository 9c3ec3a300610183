//! `cargo xtask lora-combine`: how LoRA adapters trained by M workers should be combined
//! (issue 16, point 4), measured with in-process DiLoCo on SmolLM2-135M-Instruct (the
//! cached GGUF) fine-tuned on the chat windows of `data/shakespeare-chat.jsonl`.
//!
//! Each round every worker starts from the current adapter with a fresh AdamW (as a
//! network unit does), takes H steps on its own batches, and hands back its adapter; the
//! round's adapters are combined by one rule, then the outer step is taken:
//!
//! - `factors`: the pipeline's flat deltas: `A` and `B` deltas averaged separately, then
//!   `aggregation`'s outer step on the adapter vector. The mean of the `B_i A_i` is not
//!   `mean(B_i) mean(A_i)`: the cross terms are lost.
//! - `ffa` (FFA-LoRA, Sun et al. 2024): `A` frozen at its init, only `B` trains and is
//!   averaged. Emulated exactly: after every inner step the worker's `A` is written back
//!   to its initial value (AdamW still computes `A`'s update, which is thrown away; the
//!   engine has no per-tensor freezing). With `A` shared and fixed, averaging `B` is
//!   averaging the products, so this rule is exact and needs no new wire format.
//! - `product`: per target, the outer step is taken on the products `W = B A` (the
//!   pseudo-gradient `B A - mean(B_i A_i)`, Nesterov momentum kept as a low-rank stack),
//!   and the new `W` re-factored to rank r by a truncated SVD (QR of the stacked factors,
//!   then the SVD of the small core, in f64 with nalgebra: exact, never forming `W`). The
//!   new `A` has orthonormal rows scaled to the old `A`'s RMS row norm (so the gradient
//!   reaching `B` keeps its size), the new `B` carries the singular values.
//!
//! The single-machine reference trains one adapter with one AdamW on the same batches in
//! sequence: M x H steps per round, the same tokens as the M workers. The holdout is every
//! `--holdout-every`-th window (one conversation each at seq 256), never trained on.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use aggregation::{OuterConfig, WeightedDelta};
use anyhow::{Context, bail};
use engine::train::OwnedBatch;
use engine::{Backend, LoraConfig, LoraTarget, ModelSpec, OptimizerConfig};
use nalgebra::DMatrix;
use rayon::prelude::*;

#[derive(Debug, clap::Args)]
pub(crate) struct LoraCombineArgs {
    /// The SmolLM2-135M-Instruct GGUF (default: the cached one).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// The chat JSONL to fine-tune on.
    #[arg(long, default_value = crate::chat_data::SHAKESPEARE_CHAT)]
    data: PathBuf,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Projections with an adapter.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down", value_parser = parse_target)]
    targets: Vec<LoraTarget>,
    /// Tokens per window (a conversation longer than this is skipped).
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Windows per worker per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Inner steps per worker per round (H).
    #[arg(long, default_value_t = 8)]
    local_steps: usize,
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Worker counts (M) to try.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Combination rules to try: factors, ffa, product.
    #[arg(long, value_delimiter = ',', default_value = "factors,ffa,product", value_parser = parse_rule)]
    rules: Vec<Rule>,
    /// Outer steps to try: `avg` (plain averaging: SGD lr 1, no momentum), `nesterov`
    /// (the DiLoCo paper's lr 0.7, momentum 0.9), `default` (the project's,
    /// `aggregation::OuterConfig::default()`: lr 0.7, momentum 0.5), or `lr:momentum`.
    #[arg(long, value_delimiter = ',', default_value = "avg,nesterov", value_parser = parse_outer)]
    outer: Vec<Outer>,
    /// Single-machine references to train: `lora` (A and B train), `ffa` (A frozen), or
    /// `none`. Gaps are to `lora`'s when it runs.
    #[arg(long, value_delimiter = ',', default_value = "lora")]
    references: Vec<String>,
    /// Inner AdamW learning rate (constant; the optimizer is `OptimizerConfig::default()`).
    #[arg(long, default_value_t = 1e-3)]
    inner_lr: f32,
    /// Holdout windows (every `--holdout-every`-th window, up to this many).
    #[arg(long, default_value_t = 32)]
    holdout: usize,
    #[arg(long, default_value_t = 16)]
    holdout_every: usize,
    /// Engine threads (on `cpu`; on `cuda` they only run the product rule's SVDs).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where the model trains: `cpu` (with --threads) or `cuda`/`cuda:N` (bf16, as a GPU
    /// worker trains).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Unequal units, as a run whose units are sized per worker has (e.g. `32,4,4,4`: a
    /// GPU's unit beside three laptops'): one entry per worker, its inner steps a round.
    /// Replaces --workers and --local-steps; each worker's delta is weighted by its steps
    /// (the network weights an update by the tokens it trained).
    #[arg(long, value_delimiter = ',')]
    worker_steps: Vec<usize>,
    /// The adapter's init and the order of the training windows.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the base model's holdout loss.
    #[arg(long)]
    no_base: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    Factors,
    Ffa,
    Product,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::Factors => "factors",
            Rule::Ffa => "ffa",
            Rule::Product => "product",
        }
    }
}

fn parse_rule(s: &str) -> Result<Rule, String> {
    match s {
        "factors" => Ok(Rule::Factors),
        "ffa" => Ok(Rule::Ffa),
        "product" => Ok(Rule::Product),
        _ => Err(format!("{s:?}: expected factors, ffa or product")),
    }
}

fn parse_target(s: &str) -> Result<LoraTarget, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?}: expected q, k, v, o, gate, up or down"))
}

/// An outer step: its name, lr and momentum.
#[derive(Clone, Debug)]
struct Outer {
    name: String,
    lr: f32,
    momentum: f32,
}

fn parse_outer(s: &str) -> Result<Outer, String> {
    let (lr, momentum) = match s {
        "avg" => (1.0, 0.0),
        "nesterov" => (0.7, 0.9),
        "default" => match OuterConfig::default() {
            OuterConfig::Diloco { lr, momentum } => (lr, momentum),
            _ => return Err("the default outer optimizer is not DiLoCo".into()),
        },
        _ => {
            let (lr, m) = s
                .split_once(':')
                .ok_or_else(|| format!("{s:?}: expected avg, nesterov, default or lr:momentum"))?;
            let number = |v: &str| v.parse::<f32>().map_err(|e| format!("{v:?}: {e}"));
            (number(lr)?, number(m)?)
        }
    };
    Ok(Outer {
        name: s.to_string(),
        lr,
        momentum,
    })
}

/// What every run shares: the backend (one; workers take turns, each with a fresh
/// AdamW), the windows, the adapter's layout and init.
struct Setup {
    backend: Box<dyn Backend>,
    windows: models::ChatWindows,
    /// Training windows in the order they are read.
    order: Vec<usize>,
    holdout: Vec<OwnedBatch>,
    init: Vec<f32>,
    /// Each adapter's (A offset, B offset, out, in).
    pairs: Vec<(usize, usize, usize, usize)>,
    rank: usize,
    pool: rayon::ThreadPool,
}

pub(crate) fn run(root: &Path, args: LoraCombineArgs) -> anyhow::Result<()> {
    if args.workers.contains(&0)
        || args.worker_steps.contains(&0)
        || args.batch == 0
        || args.local_steps == 0
        || args.rounds == 0
        || args.holdout_every < 2
    {
        bail!(
            "--workers, --worker-steps, --batch, --local-steps and --rounds must be at least 1, --holdout-every at least 2"
        );
    }
    if args.worker_steps.windows(2).any(|w| w[0] != w[1]) && args.rules.contains(&Rule::Product) {
        bail!("--rules product averages workers unweighted: use it with equal --worker-steps");
    }
    let started = Instant::now();
    let gguf = args.gguf.clone().unwrap_or_else(models::smollm2::gguf_path);
    let model = models::load_gguf(&gguf, Some(args.seq))
        .with_context(|| format!("loading {}", gguf.display()))?;
    let seq = NonZeroUsize::new(args.seq).context("--seq must be at least 1")?;
    let data = root.join(&args.data);
    let windows = models::load_chat_windows(&data, &model, seq)?;
    if windows.n_windows() == 0 {
        bail!(
            "no conversation of {} fits in {} tokens ({} too long)",
            data.display(),
            args.seq,
            windows.skipped_too_long
        );
    }
    let (held, train): (Vec<usize>, Vec<usize>) =
        (0..windows.n_windows()).partition(|w| w % args.holdout_every == args.holdout_every - 1);
    let held: Vec<usize> = held.into_iter().take(args.holdout).collect();
    let order = shuffled(train, args.seed);
    let holdout: Vec<OwnedBatch> = held
        .chunks(args.batch)
        .map(|ws| owned(&windows, ws))
        .collect();
    let lora = LoraConfig {
        rank: args.rank,
        alpha: args.alpha,
        targets: args.targets.clone(),
    };
    let spec = ModelSpec::llama_lora("smollm2-135m-lora", model.config, lora.clone());
    spec.validate()?;
    let init = engine::lora::init_adapter(&model.config, &lora, args.seed);
    let mut params = model.params;
    params.extend_from_slice(&init);
    let device = if args.device == "cpu" {
        format!("cpu:{}", args.threads)
    } else {
        engine::check_device(&args.device)?;
        args.device.clone()
    };
    let backend = engine::open_model(&device, &spec, params, engine::Purpose::Train)?;
    let layout = engine::LoraLayout::new(&model.config, &lora);
    let tensors = layout.table().tensors();
    let pairs = tensors
        .chunks_exact(2)
        .map(|ab| (ab[0].offset, ab[1].offset, ab[1].shape[0], ab[0].shape[1]))
        .collect();
    let mut setup = Setup {
        backend,
        windows,
        order,
        holdout,
        init,
        pairs,
        rank: args.rank,
        pool: rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads.max(1))
            .build()?,
    };
    let train_windows = setup.order.len();
    println!(
        "SmolLM2-135M-Instruct + LoRA r {} alpha {} on {:?} ({} adapter floats); {}: {} windows of {} tokens, {train_windows} train, {} holdout ({} counted targets)",
        args.rank,
        args.alpha,
        args.targets,
        setup.init.len(),
        args.data.display(),
        setup.windows.n_windows(),
        args.seq,
        held.len(),
        setup
            .holdout
            .iter()
            .flat_map(|b| &b.targets)
            .filter(|&&t| t != models::IGNORE_TARGET)
            .count(),
    );
    println!(
        "batch {} x {} per worker-step, H = {}, R = {}, inner AdamW lr {} (constant), device {device}, {} threads, seed {}",
        args.batch, args.seq, args.local_steps, args.rounds, args.inner_lr, args.threads, args.seed
    );
    if !args.no_base {
        let init = setup.init.clone();
        let loss = holdout_loss(&mut setup, &init)?;
        println!("base model (B = 0): holdout loss {loss:.4}");
    }
    let mut rows: Vec<Row> = Vec::new();
    let plans: Vec<Vec<usize>> = if args.worker_steps.is_empty() {
        args.workers
            .iter()
            .map(|&m| vec![args.local_steps; m])
            .collect()
    } else {
        vec![args.worker_steps.clone()]
    };
    for plan in &plans {
        let m = plan.len();
        let steps: usize = plan.iter().sum();
        println!("M = {m}, steps a round per worker {plan:?}");
        for reference in &args.references {
            let frozen_a = match reference.as_str() {
                "lora" => false,
                "ffa" => true,
                "none" => continue,
                other => bail!("--references {other}: expected lora, ffa or none"),
            };
            let t = Instant::now();
            let losses = single_machine(&mut setup, &args, plan, frozen_a)?;
            let row = Row {
                what: format!("single-{reference}"),
                outer: format!("{steps} steps/round"),
                workers: m,
                losses,
                seconds: t.elapsed().as_secs_f64(),
            };
            row.print(None);
            rows.push(row);
        }
        for &rule in &args.rules {
            for outer in &args.outer {
                let t = Instant::now();
                let losses = diloco(&mut setup, &args, plan, rule, outer)?;
                let row = Row {
                    what: rule.name().to_string(),
                    outer: outer.name.clone(),
                    workers: m,
                    losses,
                    seconds: t.elapsed().as_secs_f64(),
                };
                let reference = rows
                    .iter()
                    .find(|r| r.workers == m && r.what == "single-lora")
                    .and_then(|r| r.losses.last().copied());
                row.print(reference);
                rows.push(row);
            }
        }
    }
    println!(
        "\nrule           outer          M  loss per round -> final  (gap to single-lora of the same M and tokens)"
    );
    for row in &rows {
        let reference = rows
            .iter()
            .find(|r| r.workers == row.workers && r.what == "single-lora")
            .and_then(|r| r.losses.last().copied());
        row.print(reference);
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// One run's result.
struct Row {
    what: String,
    outer: String,
    workers: usize,
    /// Holdout loss after each round.
    losses: Vec<f32>,
    seconds: f64,
}

impl Row {
    fn print(&self, reference: Option<f32>) {
        let per_round: Vec<String> = self.losses.iter().map(|l| format!("{l:.4}")).collect();
        let last = self.losses.last().copied().unwrap_or(f32::NAN);
        let gap = match reference {
            Some(r) => format!("{:+.2}%", 100.0 * (last - r) / r),
            None => "-".to_string(),
        };
        println!(
            "{:<14} {:<14} {:>1}  {} -> {last:.4}  {gap}  ({:.0} s)",
            self.what,
            self.outer,
            self.workers,
            per_round.join(" "),
            self.seconds
        );
    }
}

/// `items` in a seeded Fisher-Yates order.
fn shuffled(mut items: Vec<usize>, seed: u64) -> Vec<usize> {
    let mut state = seed;
    for i in (1..items.len()).rev() {
        state = protocol::splitmix64(state);
        let j = (state % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
    items
}

/// The windows `ws` as one batch.
fn owned(windows: &models::ChatWindows, ws: &[usize]) -> OwnedBatch {
    let seq = windows.seq;
    let mut inputs = Vec::with_capacity(ws.len() * seq);
    let mut targets = Vec::with_capacity(ws.len() * seq);
    for &w in ws {
        inputs.extend_from_slice(&windows.inputs[w * seq..(w + 1) * seq]);
        targets.extend_from_slice(&windows.targets[w * seq..(w + 1) * seq]);
    }
    OwnedBatch {
        inputs,
        targets,
        batch: ws.len(),
        seq,
    }
}

/// Worker `m`'s batch at inner step `i` of round `round` under `plan` (each worker's
/// steps a round): the next `batch` windows of the shuffled training stream, the
/// workers' slices of a round laid end to end (wrapping around after an epoch).
fn batch_of(
    setup: &Setup,
    args: &LoraCombineArgs,
    plan: &[usize],
    m: usize,
    round: usize,
    i: usize,
) -> OwnedBatch {
    let per_round: usize = plan.iter().sum();
    let step = round * per_round + plan[..m].iter().sum::<usize>() + i;
    let ws: Vec<usize> = (0..args.batch)
        .map(|b| setup.order[(step * args.batch + b) % setup.order.len()])
        .collect();
    owned(&setup.windows, &ws)
}

fn holdout_loss(setup: &mut Setup, adapter: &[f32]) -> anyhow::Result<f32> {
    setup.backend.set_trainable(adapter)?;
    Ok(engine::train::evaluate(
        setup.backend.as_mut(),
        &setup.holdout,
    )?)
}

/// Writes every `A` of `adapter` back to its value in `frozen`.
fn restore_a(setup: &Setup, adapter: &mut [f32], frozen: &[f32]) {
    for &(a, _, _, inp) in &setup.pairs {
        let n = setup.rank * inp;
        adapter[a..a + n].copy_from_slice(&frozen[a..a + n]);
    }
}

/// One adapter, one AdamW, every worker's steps of a round on its batches in turn.
fn single_machine(
    setup: &mut Setup,
    args: &LoraCombineArgs,
    plan: &[usize],
    frozen_a: bool,
) -> anyhow::Result<Vec<f32>> {
    let optimizer = OptimizerConfig::default();
    let init = setup.init.clone();
    setup.backend.set_trainable(&init)?;
    setup.backend.reset_optimizer();
    let mut losses = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        for (m, &steps) in plan.iter().enumerate() {
            for i in 0..steps {
                let batch = batch_of(setup, args, plan, m, round, i);
                setup
                    .backend
                    .train_step(&batch.as_batch(), &optimizer, args.inner_lr)?;
                if frozen_a {
                    let mut adapter = setup.backend.trainable();
                    restore_a(setup, &mut adapter, &init);
                    setup.backend.set_trainable(&adapter)?;
                }
            }
        }
        let adapter = setup.backend.trainable();
        losses.push(engine::train::evaluate(
            setup.backend.as_mut(),
            &setup.holdout,
        )?);
        // Evaluation does not move the adapter; training goes on from it.
        debug_assert_eq!(adapter, setup.backend.trainable());
    }
    Ok(losses)
}

/// DiLoCo with one worker per entry of `plan` (its steps a round) combining by `rule`,
/// stepping by `outer`.
fn diloco(
    setup: &mut Setup,
    args: &LoraCombineArgs,
    plan: &[usize],
    rule: Rule,
    outer: &Outer,
) -> anyhow::Result<Vec<f32>> {
    let optimizer = OptimizerConfig::default();
    let n = setup.init.len();
    let mut base = setup.init.clone();
    let mut flat_outer = OuterConfig::Diloco {
        lr: outer.lr,
        momentum: outer.momentum,
    }
    .build(n);
    let mut momentum: Vec<Option<LowRank>> = vec![None; setup.pairs.len()];
    let mut losses = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        let mut locals = Vec::with_capacity(plan.len());
        for (m, &steps) in plan.iter().enumerate() {
            setup.backend.set_trainable(&base)?;
            setup.backend.reset_optimizer();
            for i in 0..steps {
                let batch = batch_of(setup, args, plan, m, round, i);
                setup
                    .backend
                    .train_step(&batch.as_batch(), &optimizer, args.inner_lr)?;
                if rule == Rule::Ffa {
                    let mut adapter = setup.backend.trainable();
                    restore_a(setup, &mut adapter, &base);
                    setup.backend.set_trainable(&adapter)?;
                }
            }
            locals.push(setup.backend.trainable());
        }
        match rule {
            Rule::Factors | Rule::Ffa => {
                let deltas: Vec<Vec<f32>> = locals
                    .iter()
                    .map(|l| base.iter().zip(l).map(|(b, l)| b - l).collect())
                    .collect();
                let weighted: Vec<WeightedDelta<'_>> = deltas
                    .iter()
                    .zip(plan)
                    .map(|(d, &steps)| WeightedDelta {
                        delta: d,
                        weight: steps as u64,
                    })
                    .collect();
                flat_outer.step(&mut base, &weighted)?;
            }
            Rule::Product => {
                base = product_step(setup, &base, &locals, &mut momentum, outer);
            }
        }
        losses.push(holdout_loss(setup, &base)?);
    }
    Ok(losses)
}

/// A matrix as `L R` (`L`: out x k, `R`: k x in), in f64.
#[derive(Clone, Debug)]
struct LowRank {
    l: DMatrix<f64>,
    r: DMatrix<f64>,
}

impl LowRank {
    /// `sum_j c_j L_j R_j` as one stacked pair.
    fn stack(terms: &[(f64, &LowRank)]) -> LowRank {
        let k: usize = terms.iter().map(|(_, t)| t.l.ncols()).sum();
        let (out, inp) = (terms[0].1.l.nrows(), terms[0].1.r.ncols());
        let mut l = DMatrix::zeros(out, k);
        let mut r = DMatrix::zeros(k, inp);
        let mut at = 0;
        for (c, t) in terms {
            let kj = t.l.ncols();
            l.columns_mut(at, kj).copy_from(&(&t.l * *c));
            r.rows_mut(at, kj).copy_from(&t.r);
            at += kj;
        }
        LowRank { l, r }
    }

    /// The SVD of `L R` without forming it: `L = Q1 R1`, `R^T = Q2 R2`, then the SVD of
    /// the small `R1 R2^T`. Returns (U, singular values, V^T) with U: out x s, V^T: s x in.
    fn svd(&self) -> (DMatrix<f64>, Vec<f64>, DMatrix<f64>) {
        let qr1 = self.l.clone().qr();
        let qr2 = self.r.transpose().qr();
        let core = qr1.r() * qr2.r().transpose();
        let svd = core.svd(true, true);
        // Both are requested above, so both are there.
        let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
            unreachable!("nalgebra's SVD returns the vectors it was asked for")
        };
        // nalgebra does not sort singular values: order them, largest first.
        let mut idx: Vec<usize> = (0..svd.singular_values.len()).collect();
        idx.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
        let u_full = qr1.q() * u;
        let v_t_full = v_t * qr2.q().transpose();
        let s: Vec<f64> = idx.iter().map(|&i| svd.singular_values[i]).collect();
        let u_sorted = DMatrix::from_fn(u_full.nrows(), idx.len(), |r, c| u_full[(r, idx[c])]);
        let v_sorted = DMatrix::from_fn(idx.len(), v_t_full.ncols(), |r, c| v_t_full[(idx[r], c)]);
        (u_sorted, s, v_sorted)
    }

    /// The same matrix with the directions whose singular value is below `1e-9` of the
    /// largest dropped (so a momentum stack does not grow each round).
    fn compress(&self) -> LowRank {
        let (u, s, v_t) = self.svd();
        let top = s.first().copied().unwrap_or(0.0);
        let k = s.iter().filter(|&&x| x > 1e-9 * top).count().max(1);
        let mut l = u.columns(0, k).into_owned();
        for (j, &sj) in s.iter().take(k).enumerate() {
            l.column_mut(j).scale_mut(sj);
        }
        LowRank {
            l,
            r: v_t.rows(0, k).into_owned(),
        }
    }
}

/// One adapter's `B` (out x r) and `A` (r x in) from the flat vector, as `L R`.
fn factors_of(adapter: &[f32], pair: (usize, usize, usize, usize), rank: usize) -> LowRank {
    let (a, b, out, inp) = pair;
    LowRank {
        l: DMatrix::from_row_slice(out, rank, &adapter[b..b + out * rank]).map(f64::from),
        r: DMatrix::from_row_slice(rank, inp, &adapter[a..a + rank * inp]).map(f64::from),
    }
}

/// The product-space rule: per target, the outer step on `W = B A` and `W` re-factored to
/// rank r. Returns the new adapter.
fn product_step(
    setup: &Setup,
    base: &[f32],
    locals: &[Vec<f32>],
    momentum: &mut [Option<LowRank>],
    outer: &Outer,
) -> Vec<f32> {
    let rank = setup.rank;
    let (lr, mu) = (outer.lr as f64, outer.momentum as f64);
    let pairs = &setup.pairs;
    let results: Vec<(Vec<f32>, Vec<f32>, Option<LowRank>)> = setup.pool.install(|| {
        pairs
            .par_iter()
            .zip(momentum.par_iter())
            .map(|(&pair, buffer)| {
                let w0 = factors_of(base, pair, rank);
                let workers: Vec<LowRank> =
                    locals.iter().map(|l| factors_of(l, pair, rank)).collect();
                // The pseudo-gradient W0 - mean(W_i), then b = mu b + g and
                // W = W0 - lr (g + mu b), all as stacks of factors.
                let m = workers.len() as f64;
                let mut g_terms: Vec<(f64, &LowRank)> = vec![(1.0, &w0)];
                g_terms.extend(workers.iter().map(|w| (-1.0 / m, w)));
                let g = LowRank::stack(&g_terms);
                let new_buffer = (mu != 0.0).then(|| match buffer {
                    Some(b) => LowRank::stack(&[(mu, b), (1.0, &g)]).compress(),
                    None => g.compress(),
                });
                let w = match &new_buffer {
                    Some(b) => LowRank::stack(&[(1.0, &w0), (-lr, &g), (-lr * mu, b)]),
                    None => LowRank::stack(&[(1.0, &w0), (-lr, &g)]),
                };
                let (u, s, v_t) = w.svd();
                // A keeps the old A's RMS row norm; B takes the singular values.
                let scale = (w0.r.norm_squared() / rank as f64).sqrt().max(1e-12);
                let (out, inp) = (pair.2, pair.3);
                let mut a = vec![0.0f32; rank * inp];
                let mut b = vec![0.0f32; out * rank];
                for j in 0..rank.min(s.len()) {
                    for c in 0..inp {
                        a[j * inp + c] = (v_t[(j, c)] * scale) as f32;
                    }
                    for row in 0..out {
                        b[row * rank + j] = (u[(row, j)] * s[j] / scale) as f32;
                    }
                }
                (a, b, new_buffer)
            })
            .collect()
    });
    let mut next = base.to_vec();
    for ((&(ao, bo, _, _), (a, b, buffer)), slot) in
        setup.pairs.iter().zip(results).zip(momentum.iter_mut())
    {
        next[ao..ao + a.len()].copy_from_slice(&a);
        next[bo..bo + b.len()].copy_from_slice(&b);
        *slot = buffer;
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
        let mut state = seed;
        DMatrix::from_fn(rows, cols, |_, _| {
            state = protocol::splitmix64(state);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
    }

    /// The SVD of a stack equals the dense matrix's: the reconstruction is exact, the
    /// singular values sorted, the rank-k truncation's error is the dropped energy
    /// (Eckart-Young), and a compressed stack is the same matrix.
    #[test]
    fn low_rank_svd_is_the_dense_one() {
        let x = LowRank {
            l: random(40, 3, 1),
            r: random(3, 30, 2),
        };
        let y = LowRank {
            l: random(40, 4, 3),
            r: random(4, 30, 4),
        };
        let s = LowRank::stack(&[(1.0, &x), (-0.5, &y)]);
        let dense = &x.l * &x.r - (&y.l * &y.r) * 0.5;
        let (u, sv, v_t) = s.svd();
        assert!(sv.windows(2).all(|w| w[0] >= w[1]), "{sv:?}");
        let sigma = DMatrix::from_diagonal(&nalgebra::DVector::from_vec(sv.clone()));
        assert!((&u * sigma * &v_t - &dense).norm() < 1e-10);
        let dense_sv = dense.clone().svd(false, false).singular_values;
        let mut dense_sv: Vec<f64> = dense_sv.iter().copied().collect();
        dense_sv.sort_by(|a, b| b.total_cmp(a));
        for (a, b) in sv.iter().zip(&dense_sv) {
            assert!((a - b).abs() < 1e-10, "{sv:?} {dense_sv:?}");
        }
        let k = 3;
        let truncated = u.columns(0, k)
            * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(sv[..k].to_vec()))
            * v_t.rows(0, k);
        let dropped: f64 = sv[k..].iter().map(|s| s * s).sum();
        assert!(((&dense - truncated).norm_squared() - dropped).abs() < 1e-10);
        let c = s.compress();
        assert_eq!(c.l.ncols(), 7);
        assert!((&c.l * &c.r - &dense).norm() < 1e-10);
    }

    #[test]
    fn outer_settings_and_rules_parse() {
        let got: Vec<String> = ["avg", "nesterov", "default", "0.5:0.25", "fast", "1:x"]
            .iter()
            .map(|s| match parse_outer(s) {
                Ok(o) => format!("{} lr {} momentum {}", o.name, o.lr, o.momentum),
                Err(e) => format!("error: {e}"),
            })
            .chain(
                ["gate", "gate_proj"]
                    .iter()
                    .map(|s| format!("{:?}", parse_target(s))),
            )
            .chain(
                ["ffa", "mean"]
                    .iter()
                    .map(|s| format!("{:?}", parse_rule(s))),
            )
            .collect();
        expect_test::expect![[r#"
            avg lr 1 momentum 0
            nesterov lr 0.7 momentum 0.9
            default lr 0.7 momentum 0.5
            0.5:0.25 lr 0.5 momentum 0.25
            error: "fast": expected avg, nesterov, default or lr:momentum
            error: "x": invalid float literal
            Ok(Gate)
            Err("\"gate_proj\": expected q, k, v, o, gate, up or down")
            Ok(Ffa)
            Err("\"mean\": expected factors, ffa or product")"#]]
        .assert_eq(&got.join("\n"));
    }
}
