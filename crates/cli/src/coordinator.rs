//! `hivetrain coordinator`: serve a training run over HTTP.
//!
//! Settings come from the defaults, then `--config FILE` (TOML, see `--print-config`),
//! then environment variables, then flags.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aggregation::OuterConfig;
use anyhow::{Context, bail};
use coordinator::{Coordinator, CoordinatorConfig};
use protocol::Codec;

use crate::paths;

/// The run's knobs as flags (each also read from an environment variable).
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct RunFlags {
    /// TOML file with any CoordinatorConfig keys (print them with --print-config).
    #[arg(long, env = "HIVETRAIN_CONFIG")]
    config: Option<PathBuf>,
    /// Model preset: tiny, small, medium or base.
    #[arg(long, env = "HIVETRAIN_PRESET")]
    preset: Option<String>,
    /// Work units per round (K).
    #[arg(long, env = "HIVETRAIN_UNITS_PER_ROUND")]
    units_per_round: Option<u32>,
    /// Fewest updates that let a timed-out round aggregate (MIN).
    #[arg(long, env = "HIVETRAIN_MIN_UPDATES")]
    min_updates: Option<u32>,
    /// Seconds a round waits for its K updates.
    #[arg(long, env = "HIVETRAIN_ROUND_TIMEOUT")]
    round_timeout: Option<u64>,
    /// Seconds a lease lasts without a heartbeat.
    #[arg(long, env = "HIVETRAIN_LEASE")]
    lease: Option<u64>,
    /// Seconds a lease may last however often it is renewed (then its unit goes to
    /// another worker, and its holder gets no other unit of the round).
    #[arg(long, env = "HIVETRAIN_LEASE_MAX")]
    lease_max: Option<u64>,
    /// Local steps per unit (H).
    #[arg(long, env = "HIVETRAIN_LOCAL_STEPS")]
    local_steps: Option<u32>,
    /// Size each unit for the worker it is first leased to: the steps it trains in this
    /// many seconds (by its measured pace, else its reported speed), from a quarter to four
    /// times --local-steps (`schedule.steps_min_per_unit`, `steps_max_per_unit`). For runs
    /// that mix GPUs and laptops; 0 (the default): every unit trains --local-steps.
    #[arg(long, env = "HIVETRAIN_UNIT_SECONDS")]
    unit_seconds: Option<f64>,
    /// Inner (worker) AdamW learning rate.
    #[arg(long, env = "HIVETRAIN_INNER_LR")]
    inner_lr: Option<f32>,
    /// Rounds over which the units' learning rate anneals (cosine) to a tenth (0: constant).
    #[arg(long, env = "HIVETRAIN_LR_DECAY_ROUNDS")]
    lr_decay_rounds: Option<u64>,
    /// Largest accepted staleness, in versions (MAX_STALENESS).
    #[arg(long, env = "HIVETRAIN_MAX_STALENESS")]
    max_staleness: Option<u64>,
    /// Largest accepted L2 norm of an update (DELTA_NORM_MAX).
    #[arg(long, env = "HIVETRAIN_DELTA_NORM_MAX")]
    delta_norm_max: Option<f32>,
    /// Update codec: fp32, fp16, int8 (per-chunk scale) or int8-codebook.
    #[arg(long, env = "HIVETRAIN_CODEC")]
    codec: Option<String>,
    /// Outer optimizer: diloco, fedavg or fedadam.
    #[arg(long, env = "HIVETRAIN_OUTER")]
    outer: Option<String>,
    /// How updates are combined before the outer step: mean, median, trimmed-mean:TRIM,
    /// multi-krum:F[:M], centered-clip:RADIUS[:ITERS] or norm-clip:MULTIPLE.
    #[arg(long, env = "HIVETRAIN_COMBINE")]
    combine: Option<String>,
    /// Outer learning rate (diloco, fedadam).
    #[arg(long, env = "HIVETRAIN_OUTER_LR")]
    outer_lr: Option<f32>,
    /// Outer momentum (diloco).
    #[arg(long, env = "HIVETRAIN_OUTER_MOMENTUM")]
    outer_momentum: Option<f32>,
    /// Sequences per local step.
    #[arg(long, env = "HIVETRAIN_BATCH")]
    batch: Option<u32>,
    /// Seed of the initial weights and the units' data.
    #[arg(long, env = "HIVETRAIN_SEED")]
    seed: Option<u64>,
    /// Corpus served to workers (text, or .jsonl with a "text" field).
    #[arg(long, env = "HIVETRAIN_CORPUS")]
    corpus: Option<PathBuf>,
    /// tokenizer.json served to workers.
    #[arg(long, env = "HIVETRAIN_TOKENIZER")]
    tokenizer: Option<PathBuf>,
    /// Accept updates without scoring them (the loss before and after applying each) or
    /// refusing byte-equal copies; only re-runs then catch lazy and copied units.
    #[arg(long, env = "HIVETRAIN_NO_SCORING")]
    no_scoring: bool,
    /// Never re-run accepted units to check them.
    #[arg(long, env = "HIVETRAIN_NO_SPOT_CHECKS")]
    no_spot_checks: bool,
    /// Largest relative distance between an update and its re-run that counts as a match
    /// (0: bit-exact; raise it when workers run other CPU models or GPUs).
    #[arg(long, env = "HIVETRAIN_SPOT_CHECK_TOLERANCE")]
    spot_check_tolerance: Option<f32>,
}

impl RunFlags {
    /// The config: defaults, the file, then env and flags.
    pub(crate) fn config(&self, base: CoordinatorConfig) -> anyhow::Result<CoordinatorConfig> {
        let mut c = match &self.config {
            Some(path) => CoordinatorConfig::from_file(path)?,
            None => base,
        };
        if self.no_scoring {
            c.scoring.enabled = false;
        }
        if self.no_spot_checks {
            c.spot_check.enabled = false;
        }
        if let Some(v) = self.spot_check_tolerance {
            c.spot_check.tolerance = v;
        }
        let s = &mut c.schedule;
        if let Some(v) = &self.preset {
            c.preset = v.clone();
        }
        if let Some(v) = self.units_per_round {
            s.units_per_round = v;
            s.min_updates = s.min_updates.min(v);
        }
        if let Some(v) = self.min_updates {
            s.min_updates = v;
        }
        if let Some(v) = self.round_timeout {
            s.round_timeout_ms = v.saturating_mul(1000);
        }
        if let Some(v) = self.lease {
            s.lease_ms = v.saturating_mul(1000);
            s.lease_max_ms = s.lease_max_ms.max(s.lease_ms);
        }
        if let Some(v) = self.lease_max {
            s.lease_max_ms = v.saturating_mul(1000);
        }
        if let Some(v) = self.local_steps {
            s.steps_per_unit = v;
        }
        if let Some(v) = self.unit_seconds {
            anyhow::ensure!(
                v.is_finite() && v >= 0.0,
                "--unit-seconds {v} is no time: give seconds (0 turns sizing off)"
            );
            // `as` saturates: a huge figure is the longest unit there is.
            s.unit_ms = (v * 1000.0).round() as u64;
        }
        if let Some(v) = self.lr_decay_rounds {
            s.lr_decay_rounds = v;
        }
        if let Some(v) = self.inner_lr {
            s.inner_lr = v;
        }
        if let Some(v) = self.max_staleness {
            s.max_staleness = v;
        }
        if let Some(v) = self.delta_norm_max {
            c.delta_norm_max = v;
        }
        if let Some(v) = &self.codec {
            c.codec = parse_codec(v)?;
        }
        if let Some(v) = &self.combine {
            c.combine = aggregation::Combine::from_spec(v).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown --combine {v:?}: use {}",
                    aggregation::Combine::SPECS
                )
            })?;
        }
        if let Some(v) = &self.outer {
            c.outer = match v.as_str() {
                "diloco" => OuterConfig::default(),
                "fedavg" => OuterConfig::FedAvg,
                "fedadam" => OuterConfig::FedAdam {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.99,
                    tau: 1e-3,
                },
                other => bail!("unknown --outer {other:?}: choose diloco, fedavg or fedadam"),
            };
        }
        if let Some(lr) = self.outer_lr {
            match &mut c.outer {
                OuterConfig::Diloco { lr: l, .. } | OuterConfig::FedAdam { lr: l, .. } => *l = lr,
                OuterConfig::FedAvg => bail!("--outer-lr does not apply to fedavg"),
            }
        }
        if let Some(m) = self.outer_momentum {
            match &mut c.outer {
                OuterConfig::Diloco { momentum, .. } => *momentum = m,
                _ => bail!("--outer-momentum applies to diloco only"),
            }
        }
        if let Some(v) = self.batch {
            c.batch = v;
        }
        if let Some(v) = self.seed {
            c.seed = v;
        }
        if let Some(v) = &self.corpus {
            c.corpus = v.clone();
        }
        if let Some(v) = &self.tokenizer {
            c.tokenizer = v.clone();
        }
        c.corpus = paths::bundled(&c.corpus);
        c.tokenizer = paths::bundled(&c.tokenizer);
        c.check()?;
        Ok(c)
    }
}

pub(crate) fn parse_codec(name: &str) -> anyhow::Result<Codec> {
    Codec::from_name(name)
        .with_context(|| format!("unknown codec {name:?}: choose {}", Codec::NAMES))
}

#[derive(Debug, clap::Args)]
pub(crate) struct CoordinatorArgs {
    /// Directory of the run's store (SQLite and blobs); an existing run resumes.
    #[arg(long, env = "HIVETRAIN_RUN_DIR", default_value = "runs/coordinator")]
    dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "HIVETRAIN_BIND", default_value = "127.0.0.1:8480")]
    bind: String,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    run: RunFlags,
}

pub(crate) fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let config = args.run.config(CoordinatorConfig::default())?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    eprintln!(
        "opening the run in {} ({} preset; the first start scores version 0)",
        args.dir.display(),
        config.preset
    );
    let server = Coordinator::start(&args.dir, config, &args.bind)
        .with_context(|| format!("starting the coordinator in {}", args.dir.display()))?;
    let (round, version) = server.with_core(|c| (c.round(), c.version()));
    eprintln!(
        "coordinator listening on {url} (round {round}, version {version}); workers join with\n  hivetrain worker --coordinator {url}\ndashboard: {url}/  Prometheus metrics: {url}/metrics\nCtrl-C stops it; started again, it resumes.",
        url = server.url(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let mut last_version = version;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        // The newest two rounds hold the one the newest version came from.
        let status = server.with_core(|c| c.status(coordinator::system_ms(), Some(2)));
        if let Ok(status) = status
            && status.version != last_version
        {
            last_version = status.version;
            if let Some(r) = status
                .rounds
                .iter()
                .rev()
                .find(|r| r.version == Some(last_version))
            {
                eprintln!(
                    "version {last_version}: holdout loss {:.4}, {} accepted, {} rejected, {:.1} s",
                    r.holdout_loss.unwrap_or(f32::NAN),
                    r.accepted,
                    r.rejected,
                    r.seconds
                );
            }
        }
    }
    eprintln!("stopping");
    server.stop();
    Ok(())
}
