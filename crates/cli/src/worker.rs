//! `hivetrain worker`: lend this machine to a coordinator.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::WorkUnit;
use protocol::api::SubmitReply;
use worker::{HttpTransport, Refusal, Reporter, WorkerOptions};

use crate::paths;

#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "HIVETRAIN_COORDINATOR",
        default_value = "http://127.0.0.1:8480"
    )]
    coordinator: String,
    /// A name for the coordinator's tables (default: this machine's host name).
    #[arg(long, env = "HIVETRAIN_NAME")]
    name: Option<String>,
    /// Compute device: `cpu` (all cores), `cpu:N` (N threads), `cuda` / `cuda:N` (an
    /// NVIDIA GPU: bf16; its units are re-run by a volunteer of its GPU class, or by the
    /// coordinator's CPU within the cross-class tolerance), or `auto` (a GPU when one
    /// works).
    #[arg(long, env = crate::env::DEVICE, default_value = "cpu")]
    device: String,
    /// Stop after this many work units.
    #[arg(long)]
    max_units: Option<u64>,
    /// Where the run's corpus, tokenizer and token cache are kept (default: the cache
    /// dir's worker-data).
    #[arg(long, env = "HIVETRAIN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The worker's key file (made on first run; default: the config dir's
    /// hivetrain/worker.key).
    #[arg(long, env = "HIVETRAIN_KEY")]
    key: Option<PathBuf>,
    /// Give up after the coordinator has been unreachable this many seconds.
    #[arg(long, default_value_t = 600)]
    unreachable_timeout: u64,
}

/// Progress bars: one per unit (step, loss, tokens/s), then the upload and the verdict.
struct Bars {
    bar: Option<ProgressBar>,
    /// When the worker started, and whether its first training step was reported: the
    /// cold start (fetching, measuring, kernel loading, the first lease) in seconds.
    started: std::time::Instant,
    first_step: bool,
}

impl Bars {
    /// A line on standard error, above the bar if one is drawn (`ProgressBar::println`
    /// alone prints nothing when standard error is not a terminal, so a log would lose
    /// the line).
    fn println(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }
}

impl Reporter for Bars {
    fn message(&mut self, text: &str) {
        self.println(text);
    }

    fn unit_started(&mut self, unit: &WorkUnit) {
        let bar = ProgressBar::new(unit.address.steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!(
            "unit {} (round {}, v{})",
            unit.id, unit.round, unit.base_version
        ));
        if let Some(old) = self.bar.replace(bar) {
            old.finish_and_clear();
        }
    }

    fn step(&mut self, step: u32, loss: f32, tokens_per_second: f64) {
        if !self.first_step {
            self.first_step = true;
            let text = format!(
                "cold start: the first unit's first step {:.1} s after the worker started",
                self.started.elapsed().as_secs_f64()
            );
            self.println(&text);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.3}, {tokens_per_second:.0} tok/s"));
        }
    }

    fn uploading(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("uploading {:.2} MB", bytes as f64 / 1e6));
        }
    }

    fn verdict(&mut self, unit: &WorkUnit, verdict: &Result<SubmitReply, Refusal>) {
        let text = match verdict {
            Ok(r) => format!(
                "unit {}: accepted (norm {:.3}; {} accepted this round; +{} credits)",
                unit.id,
                r.norm,
                r.round_accepted,
                ledger::format_credits(r.credit)
            ),
            Err(r) => format!("unit {}: rejected, {} ({})", unit.id, r.message, r.code),
        };
        match self.bar.take() {
            Some(bar) => {
                bar.finish_and_clear();
                eprintln!("{text}");
            }
            None => eprintln!("{text}"),
        }
    }
}

pub(crate) fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Says what is missing (no driver, no cuBLASLt, an old GPU) before anything else.
    engine::resolve_device(&args.device)?;
    let key_path = match args.key {
        Some(p) => p,
        None => worker::identity::default_path()?,
    };
    let (key, made) = worker::identity::load_or_create(&key_path)?;
    if made {
        eprintln!(
            "made a new worker key at {} (it is your wallet: keep it)",
            key_path.display()
        );
    }
    let name = args.name.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "worker".into())
    });
    let options = WorkerOptions {
        name,
        device: args.device,
        max_units: args.max_units,
        data_dir: args
            .data_dir
            .unwrap_or_else(|| paths::cache_dir(None).join("worker-data")),
        unreachable_timeout: Duration::from_secs(args.unreachable_timeout),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopped");
            std::process::exit(130);
        }
        eprintln!(
            "\nstopping after this step (an upload in flight is finished); Ctrl-C again quits now"
        );
    })
    .context("installing the Ctrl-C handler")?;
    let transport = HttpTransport::new(&args.coordinator)?;
    let mut bars = Bars {
        bar: None,
        started,
        first_step: false,
    };
    let summary = worker::run(&transport, &key, &options, &stop, &mut bars)
        .with_context(|| format!("working for {}", args.coordinator))?;
    if let Some(bar) = bars.bar.take() {
        bar.finish_and_clear();
    }
    eprintln!(
        "done: {} units, {} accepted, {} rejected, {} withdrawn, {} abandoned, {} heartbeats, {:.2} MB sent",
        summary.units,
        summary.accepted,
        summary.rejected,
        summary.withdrawn,
        summary.abandoned,
        summary.heartbeats,
        summary.bytes_sent as f64 / 1e6
    );
    Ok(())
}
