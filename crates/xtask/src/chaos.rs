//! `cargo xtask chaos`: the crash harness (`test_support::chaos`) on the release
//! `hivetrain` binary, with a progress bar and the figures BENCHMARKS.md records.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use test_support::chaos::{ChaosOptions, ChaosReport, Moment};

#[derive(Debug, clap::Args)]
pub(crate) struct ChaosArgs {
    /// SIGKILLs of the coordinator, each followed by a restart.
    #[arg(long, default_value_t = 200)]
    kills: u32,
    /// Seed of the kill schedule (and of the run's weights and data).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Loopback port of the coordinator.
    #[arg(long, default_value_t = 18480)]
    port: u16,
    /// Keep the run here (the stores, keys and every process's log); default: a
    /// temporary directory, removed at the end.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Skip the unkilled run of the same seed that each version is compared with.
    #[arg(long)]
    no_reference: bool,
    /// Use this hivetrain binary instead of building target/release/hivetrain.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Only check a kept, stopped run again (its `chaos` directory) and exit.
    #[arg(long)]
    check: Option<PathBuf>,
}

pub(crate) fn run(root: &Path, args: ChaosArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.check {
        let report = test_support::chaos::check_run(dir)
            .with_context(|| format!("checking {}", dir.display()))?;
        println!(
            "{}: versions 0..={}, {} accepted stored, {} told accepted, lost {}, duplicate mints {}",
            dir.display(),
            report.versions,
            report.accepted_stored,
            report.accepted_told,
            report.lost.len(),
            report.duplicate_mints.len()
        );
        return failed(&report);
    }
    let binary = match args.binary {
        Some(b) => b,
        None => {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--release", "-p", "cli"])
                .current_dir(root)
                .status()
                .context("running cargo build --release -p cli")?;
            if !status.success() {
                bail!("cargo build --release -p cli failed");
            }
            root.join("target/release/hivetrain")
        }
    };
    let temp = tempfile::tempdir().context("a temporary directory")?;
    let dir = match &args.keep {
        Some(dir) => {
            if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
                bail!("--keep {} is not empty", dir.display());
            }
            dir.clone()
        }
        None => temp.path().to_owned(),
    };
    let options = ChaosOptions {
        binary,
        dir,
        kills: args.kills,
        seed: args.seed,
        workers: args.workers,
        port: args.port,
        reference: !args.no_reference,
    };
    let bar = ProgressBar::new(args.kills as u64);
    bar.set_style(
        ProgressStyle::with_template("kills [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let report = test_support::chaos::run(&options, &mut |done, doing| {
        bar.set_position(done as u64);
        bar.set_message(doing.to_owned());
    });
    bar.finish_and_clear();
    let report = report.with_context(|| {
        format!(
            "the harness stopped (logs in {})",
            options.dir.join("chaos").display()
        )
    })?;
    print!("{}", summary(&args_line(&options), &report));
    if let Some(dir) = &args.keep {
        println!("run kept in {}", dir.display());
    }
    failed(&report)
}

/// Each failed check on stderr, and an error if there was one.
fn failed(report: &ChaosReport) -> anyhow::Result<()> {
    for f in &report.failures {
        eprintln!("FAILED: {f}");
    }
    if !report.failures.is_empty() {
        bail!("{} check(s) failed", report.failures.len());
    }
    Ok(())
}

fn args_line(o: &ChaosOptions) -> String {
    format!(
        "cargo xtask chaos --kills {} --seed {} --workers {}",
        o.kills, o.seed, o.workers
    )
}

/// The report as BENCHMARKS.md shows it.
fn summary(command: &str, r: &ChaosReport) -> String {
    let kills: u32 = r.kills.values().map(|(a, b)| a + b).sum();
    let mut out = format!(
        "{command}\n\nkills: {kills} in {:.0} s ({:.1} s a kill, restart included; {:.0} s in all)\n",
        r.kill_seconds,
        r.kill_seconds / kills.max(1) as f64,
        r.seconds
    );
    for (moment, (hit, missed)) in &r.kills {
        let note = if *missed > 0 {
            format!(" ({missed} of them without their event within 20 s)")
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  {:<14} {:>4}{note}\n",
            moment_name(*moment),
            hit + missed
        ));
    }
    out.push_str(&format!(
        "coordinator starts: {}; worker restarts: {}\nversions: 0..={} consecutive: {}\naccepted updates: {} stored, {} told accepted to workers\nlost: {}\nduplicate mints: {}\nledger verified: {}\n",
        r.coordinator_starts,
        r.worker_restarts,
        r.versions,
        if r.failures.iter().any(|f| f.starts_with("version ") && f.contains("belongs")) { "no" } else { "yes" },
        r.accepted_stored,
        r.accepted_told,
        r.lost.len(),
        r.duplicate_mints.len(),
        if r.ledger_verified { "yes" } else { "no" },
    ));
    if let Some((compared, same)) = r.reference {
        out.push_str(&format!(
            "unkilled run, same seed: {same} of {compared} versions identical (units and checkpoint bytes)\n"
        ));
    }
    out
}

fn moment_name(m: Moment) -> &'static str {
    m.name()
}
