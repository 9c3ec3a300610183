//! `cargo xtask bench finetune`: issue 16's learning figure. The network's LoRA fine-tune
//! of SmolLM2-135M-Instruct (a real coordinator and M volunteer workers over loopback
//! HTTP, running the fine-tune demo's run) against one machine that trains one adapter
//! with one AdamW on the same tokens: the batches of every unit the network's versions
//! were built from, version by version, in unit order. Both are scored after every
//! version with `engine::train::evaluate` on the coordinator's own holdout batches.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use coordinator::{Coordinator, CoordinatorConfig};
use engine::train::OwnedBatch;
use engine::{OptimizerConfig, Purpose};
use protocol::WorkUnit;
use worker::unit::{RunModel, owned_batch};
use worker::{HttpTransport, WorkerOptions};

/// The goal: the network's final holdout loss at most this far above one machine's.
const GOAL_GAP: f64 = 0.02;

#[derive(Debug, clap::Args)]
pub(crate) struct FinetuneBench {
    /// Worker counts M, each a network run of its own against its own single-machine
    /// reference.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    workers: Vec<u32>,
    /// Rounds (model versions) of each network run.
    #[arg(long, default_value_t = 4)]
    rounds: u64,
    /// Holdout batches (of the run's 2 windows each) both sides are scored on; the
    /// demo's own is 4.
    #[arg(long, default_value_t = 16)]
    holdout_batches: u32,
    /// Engine threads of each worker.
    #[arg(long, default_value_t = 1)]
    threads_per_worker: u32,
    /// Engine threads of the single machine (its results are the same bits at any count).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The base GGUF [default: the cached SmolLM2-135M-Instruct; `hivetrain model fetch`
    /// caches it].
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// The chat JSONL [default: the repository's data/shakespeare-chat.jsonl].
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Keep each network run's store in DIR/workers-M (default: temporary, removed).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Minutes one network run may take before the command gives up.
    #[arg(long, default_value_t = 90.0)]
    minutes: f64,
}

/// What one network run leaves for its reference.
struct NetworkRun {
    model: RunModel,
    initial: Vec<f32>,
    train: Arc<data::Examples>,
    holdout: Arc<Vec<OwnedBatch>>,
    shape: (u32, usize, usize),
    /// Holdout loss of versions 0..=rounds.
    losses: Vec<f32>,
    /// The units each version 1..=rounds was built from, in unit order.
    units: Vec<Vec<WorkUnit>>,
    seconds: f64,
}

pub(crate) fn run(root: &Path, args: FinetuneBench) -> anyhow::Result<()> {
    ensure!(
        !args.workers.is_empty() && args.workers.iter().all(|&m| m >= 1),
        "--workers takes worker counts of at least 1, e.g. 2,4"
    );
    ensure!(
        args.rounds >= 1 && args.holdout_batches >= 1,
        "--rounds and --holdout-batches must be at least 1"
    );
    ensure!(
        args.threads >= 1 && args.threads_per_worker >= 1,
        "--threads and --threads-per-worker must be at least 1"
    );
    let gguf = args.gguf.clone().unwrap_or_else(models::smollm2::gguf_path);
    ensure!(
        gguf.is_file(),
        "{} is not there: `cargo run --release -- model fetch` caches SmolLM2-135M-Instruct, or give --gguf",
        gguf.display()
    );
    let mut summary = Vec::new();
    for &m in &args.workers {
        let net = network(root, &args, &gguf, m)?;
        let single = single_machine(&net, args.threads)?;
        ensure!(
            single[0] == net.losses[0],
            "the single machine's version-0 loss {} is not the coordinator's {}: the two do not score the same weights on the same batches",
            single[0],
            net.losses[0]
        );
        let tokens: u64 = net
            .units
            .iter()
            .flatten()
            .map(|u| u64::from(u.address.steps) * (net.shape.1 * net.shape.2) as u64)
            .sum();
        println!("\nM = {m}: holdout loss per version (mean over the answer tokens)");
        println!("version  network  one machine    gap");
        for (v, (n, s)) in net.losses.iter().zip(&single).enumerate() {
            println!(
                "{v:>7}  {n:>7.4}  {s:>11.4}  {:>+5.2}%",
                (f64::from(*n) / f64::from(*s) - 1.0) * 100.0
            );
        }
        summary.push((m, tokens, net.losses, single, net.seconds));
    }
    println!(
        "\n  M  rounds     tokens  base loss  network  one machine    gap  goal (<= {:.0}%)  network s",
        GOAL_GAP * 100.0
    );
    for (m, tokens, net, single, seconds) in &summary {
        let (n, s) = (net[net.len() - 1], single[single.len() - 1]);
        let gap = f64::from(n) / f64::from(s) - 1.0;
        println!(
            "{m:>3}  {:>6}  {tokens:>9}  {:>9.4}  {n:>7.4}  {s:>11.4}  {:>+5.2}%  {:>14}  {seconds:>9.0}",
            net.len() - 1,
            net[0],
            gap * 100.0,
            if gap <= GOAL_GAP { "met" } else { "not met" },
        );
    }
    Ok(())
}

/// The fine-tune demo's run with `m` workers for `args.rounds` versions.
fn network(root: &Path, args: &FinetuneBench, gguf: &Path, m: u32) -> anyhow::Result<NetworkRun> {
    let mut config = CoordinatorConfig::default().finetune_demo(gguf.to_owned());
    config.corpus = args
        .corpus
        .clone()
        .unwrap_or_else(|| root.join("data/shakespeare-chat.jsonl"));
    config.holdout_batches = args.holdout_batches;
    config.schedule.units_per_round = m;
    config.schedule.min_updates = m;
    // M one-thread workers share the machine's cores with the coordinator's scoring.
    config.schedule.round_timeout_ms = 1_800_000;
    config.schedule.lease_ms = 900_000;
    let temp;
    let dir = match &args.keep {
        Some(keep) => {
            let dir = keep.join(format!("workers-{m}"));
            if dir.exists() {
                bail!(
                    "{} exists: give --keep a directory without a workers-{m} run in it",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            dir
        }
        None => {
            temp = tempfile::tempdir().context("making a temporary directory")?;
            temp.path().to_owned()
        }
    };
    println!(
        "\nM = {m}: a coordinator and {m} workers ({} engine thread(s) each) over loopback HTTP, {} rounds of {m} units (H = {}, {} x {} tokens), store {}",
        args.threads_per_worker,
        args.rounds,
        config.schedule.steps_per_unit,
        config.batch,
        config.seq,
        dir.display()
    );
    let server =
        Coordinator::start(&dir, config, "127.0.0.1:0").context("starting the coordinator")?;
    let url = server.url();
    let (model, initial, train, holdout, shape) = server.with_core(|c| {
        let cfg = c.config();
        (
            c.run_model().clone(),
            c.params().to_vec(),
            c.train_examples(),
            c.holdout_batches(),
            (cfg.schedule.n_shards, cfg.batch as usize, cfg.seq as usize),
        )
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..m {
        let (key, _) = worker::identity::load_or_create(&dir.join(format!("worker-{i}.key")))?;
        let options = WorkerOptions {
            name: format!("volunteer-{i}"),
            device: format!("cpu:{}", args.threads_per_worker),
            max_units: None,
            data_dir: dir.join(format!("worker-{i}")),
            unreachable_timeout: Duration::from_secs(60),
        };
        let transport = HttpTransport::new(&url)?;
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            worker::run(&transport, &key, &options, &stop, &mut ())
        }));
    }
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(args.minutes * 60.0);
    let mut shown = 0;
    let outcome = loop {
        std::thread::sleep(Duration::from_millis(500));
        let version = server.with_core(|c| c.version());
        for v in shown + 1..=version.min(args.rounds) {
            let loss = server
                .with_core(|c| c.store().version(v))?
                .map(|r| r.holdout_loss);
            println!(
                "  version {v}: holdout loss {:.4} at {:.0} s",
                loss.unwrap_or(f32::NAN),
                started.elapsed().as_secs_f64()
            );
        }
        shown = shown.max(version.min(args.rounds));
        if version >= args.rounds {
            break Ok(());
        }
        if started.elapsed() > deadline {
            break Err(anyhow::anyhow!(
                "the network run made {version} of {} versions in {} minutes: give --minutes more",
                args.rounds,
                args.minutes
            ));
        }
        if handles.iter().any(|h| h.is_finished()) {
            break Err(anyhow::anyhow!("a worker stopped before the last version"));
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        match h.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("a worker failed: {e:#}"),
            Err(_) => eprintln!("a worker panicked"),
        }
    }
    let read = outcome.and_then(|()| {
        server.with_core(|c| -> anyhow::Result<(Vec<f32>, Vec<Vec<WorkUnit>>)> {
            let store = c.store();
            let (mut losses, mut units) = (Vec::new(), Vec::new());
            for v in 0..=args.rounds {
                let row = store
                    .version(v)?
                    .with_context(|| format!("version {v} is not stored"))?;
                losses.push(row.holdout_loss);
                if v > 0 {
                    let mut ids = row.updates.clone();
                    ids.sort_unstable();
                    let mut of_version = Vec::new();
                    for id in ids {
                        of_version.push(
                            store
                                .unit(id)?
                                .with_context(|| format!("unit {id} is not stored"))?,
                        );
                    }
                    units.push(of_version);
                }
            }
            Ok((losses, units))
        })
    });
    server.stop();
    let (losses, units) = read?;
    Ok(NetworkRun {
        model,
        initial,
        train,
        holdout,
        shape,
        losses,
        units,
        seconds,
    })
}

/// One adapter and one AdamW, kept across the whole run, training every unit's batches
/// in turn at the unit's learning rate; the holdout loss before training and after each
/// version's units.
fn single_machine(net: &NetworkRun, threads: usize) -> anyhow::Result<Vec<f32>> {
    let started = Instant::now();
    let (n_shards, batch, seq) = net.shape;
    let mut backend = net
        .model
        .open(&format!("cpu:{threads}"), &net.initial, Purpose::Train)?;
    backend.reset_optimizer();
    let optimizer = OptimizerConfig::default();
    let mut losses = vec![engine::train::evaluate(backend.as_mut(), &net.holdout)?];
    for (v, units) in net.units.iter().enumerate() {
        for unit in units {
            for step in 0..unit.address.steps {
                let b = net
                    .train
                    .batch(&unit.address, n_shards, step, batch, seq)
                    .with_context(|| format!("unit {}'s batch {step}", unit.id))?;
                backend.train_step(&owned_batch(b).as_batch(), &optimizer, unit.lr)?;
            }
        }
        let loss = engine::train::evaluate(backend.as_mut(), &net.holdout)?;
        println!(
            "  one machine, after version {}'s {} units: holdout loss {loss:.4} at {:.0} s",
            v + 1,
            units.len(),
            started.elapsed().as_secs_f64()
        );
        losses.push(loss);
    }
    Ok(losses)
}
