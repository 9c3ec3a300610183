//! `cargo xtask bench robust`: the time of each robust combination rule for n updates of
//! d floats, against PyTorch doing the same computation on the same tensors in the same
//! run (`scripts/torch_robust.py`), with the results compared.

use std::path::Path;
use std::time::Instant;

use aggregation::{Combine, WeightedDelta};
use anyhow::{Context, bail, ensure};

#[derive(Debug, clap::Args)]
pub(crate) struct RobustBench {
    /// Update counts.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64")]
    n: Vec<usize>,
    /// Floats per update.
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    d: Vec<usize>,
    /// Rules: median, trimmed-mean, multi-krum, centered-clip, norm-clip.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "median,trimmed-mean,multi-krum,centered-clip,norm-clip"
    )]
    rules: Vec<String>,
    /// Threads of each side.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed runs of each (the best is kept).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Python with torch.
    #[arg(long, default_value = "python3")]
    python: String,
}

const M: u64 = 1_000_003;

/// Update `i` of `d` floats, as the PyTorch script makes it.
fn delta(i: usize, d: usize) -> Vec<f32> {
    (0..d as u64)
        .map(|j| {
            let k = (i as u64 * 7_919 + j * 104_729) % M;
            (k as f32 / M as f32 - 0.5) * 1e-2
        })
        .collect()
}

/// The rule as both sides run it (Multi-Krum assumes a fifth of the updates lie).
fn rule(name: &str, n: usize) -> anyhow::Result<Combine> {
    Ok(match name {
        "median" => Combine::Median,
        "trimmed-mean" => Combine::TrimmedMean { trim: 0.2 },
        "multi-krum" => Combine::MultiKrum {
            f: (n / 5).max(1) as u32,
            m: 0,
        },
        "centered-clip" => Combine::CenteredClip {
            radius: 1.0,
            iters: 3,
        },
        "norm-clip" => Combine::NormClip { multiple: 2.0 },
        other => bail!("unknown rule {other:?}"),
    })
}

struct Ours {
    seconds: f64,
    sum: f64,
    l2: f64,
}

pub(crate) fn run(root: &Path, args: RobustBench) -> anyhow::Result<()> {
    ensure!(
        args.repeat > 0 && args.threads > 0,
        "--repeat and --threads must be at least 1"
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()?;
    let mut ours: Vec<((usize, usize, String), Ours)> = Vec::new();
    for &d in &args.d {
        for &n in &args.n {
            let deltas: Vec<Vec<f32>> = (0..n).map(|i| delta(i, d)).collect();
            let updates: Vec<WeightedDelta<'_>> = deltas
                .iter()
                .map(|x| WeightedDelta {
                    delta: x,
                    weight: 1,
                })
                .collect();
            for name in &args.rules {
                let combine = rule(name, n)?;
                let mut best = f64::INFINITY;
                let mut out = Vec::new();
                for _ in 0..args.repeat {
                    let mut center = vec![0.0f32; d];
                    let started = Instant::now();
                    out = pool.install(|| combine.apply(d, &updates, &mut center))?;
                    best = best.min(started.elapsed().as_secs_f64());
                }
                let sum: f64 = out.iter().map(|&x| x as f64).sum();
                let l2 = out.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                eprintln!("hivetrain {name:<14} n {n:>2} d {d:>9}: {best:.3} s");
                ours.push((
                    (n, d, name.clone()),
                    Ours {
                        seconds: best,
                        sum,
                        l2,
                    },
                ));
            }
        }
    }

    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("spec.json");
    let cases: Vec<(usize, usize)> = args
        .d
        .iter()
        .flat_map(|&d| args.n.iter().map(move |&n| (n, d)))
        .collect();
    std::fs::write(
        &spec,
        serde_json::to_string(&serde_json::json!({
            "cases": cases,
            "rules": args.rules,
            "threads": args.threads,
            "repeat": args.repeat,
        }))?,
    )?;
    let stdout = crate::bench::run_python(&args.python, root, "torch_robust.py", &spec)?;
    println!("| rule | n | d | hivetrain s | PyTorch s | speed-up | results agree (L2) |");
    println!("|---|---|---|---|---|---|---|");
    for line in String::from_utf8_lossy(&stdout).lines() {
        let t: serde_json::Value = serde_json::from_str(line).context("a line of the script")?;
        let key = (
            t["n"].as_u64().unwrap_or(0) as usize,
            t["d"].as_u64().unwrap_or(0) as usize,
            t["rule"].as_str().unwrap_or("").to_owned(),
        );
        let Some((_, o)) = ours.iter().find(|(k, _)| *k == key) else {
            continue;
        };
        let theirs = t["seconds"].as_f64().unwrap_or(f64::NAN);
        let l2 = t["l2"].as_f64().unwrap_or(f64::NAN);
        let agree = (o.l2 - l2).abs() / l2.abs().max(1e-30);
        let _ = o.sum;
        println!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.2}x | {:.1e} |",
            key.2,
            key.0,
            key.1,
            o.seconds,
            theirs,
            theirs / o.seconds,
            agree
        );
    }
    Ok(())
}
