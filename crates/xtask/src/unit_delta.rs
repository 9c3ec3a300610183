//! `cargo xtask unit-delta`: one work unit trained from a fixed start, its delta written
//! to a file, or compared with one another machine wrote. How far apart two CPUs' re-runs
//! of the same unit are is what `spot_check.tolerance` must allow for.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use protocol::{Codec, WorkAddress, WorkUnit};

#[derive(Debug, clap::Args)]
pub(crate) struct UnitDeltaArgs {
    /// Model preset.
    #[arg(long, default_value = "small")]
    preset: String,
    /// Local steps (H).
    #[arg(long, default_value_t = 50)]
    steps: u32,
    /// Engine threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Write the delta (f32, little-endian) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compare with a delta written by `--out` (on another machine).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// The repository (for data/): where this binary was built, unless given.
    #[arg(long)]
    root: Option<PathBuf>,
}

pub(crate) fn run(root: &Path, args: UnitDeltaArgs) -> anyhow::Result<()> {
    let root = args.root.as_deref().unwrap_or(root);
    let tokenizer = data::TextTokenizer::load(&root.join("data/tokenizer.json"))?;
    let corpus = root.join("data/shakespeare.txt");
    let cache = tempfile::tempdir()?;
    let tokens = data::cache::load_or_build(&corpus, &tokenizer, cache.path())?;
    let preset = engine::Preset::from_name(&args.preset).context("unknown preset")?;
    let spec = engine::ModelSpec::preset(preset, tokenizer.vocab_size());
    let (batch, seq) = (8, spec.n_ctx());
    let (train, _) = data::Examples::split_stream(&corpus, &tokens.tokens, seq)?;
    let base = spec.init_params(1)?;
    let mut backend = engine::open_model(
        &format!("cpu:{}", args.threads),
        &spec,
        base.clone(),
        engine::Purpose::Train,
    )?;
    let unit = WorkUnit {
        id: 1,
        round: 0,
        base_version: 0,
        address: WorkAddress {
            shard: 3,
            offset: 0,
            steps: args.steps,
            seed: 42,
        },
        lr: 1e-3,
    };
    let data = worker::unit::UnitData {
        train: &train,
        n_shards: 8,
        batch,
        seq,
    };
    let delta = worker::unit::train(backend.as_mut(), &base, data, &unit, &mut |_, _| true)?
        .context("stopped")?;
    let codec = Codec::Int8Chunk { chunk: 4096 };
    println!(
        "{} preset, {} steps of {batch} x {seq} on {} threads: delta of {} values, norm {:.6}, int8 payload blake3 {}",
        args.preset,
        args.steps,
        args.threads,
        delta.len(),
        delta
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt(),
        blake3::hash(&codec.encode(&delta)).to_hex()
    );
    if let Some(path) = &args.out {
        let bytes: Vec<u8> = delta.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.compare {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() != delta.len() * 4 {
            bail!(
                "{} holds {} values, not {}",
                path.display(),
                bytes.len() / 4,
                delta.len()
            );
        }
        let other: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let equal = delta
            .iter()
            .zip(&other)
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        let int8_same = codec.encode(&delta) == codec.encode(&other);
        println!(
            "against {}: relative L2 distance {:.3e}, {equal} of {} values bit-equal, int8 payloads {}",
            path.display(),
            coordinator::core::checks::relative_distance(&delta, &other),
            delta.len(),
            if int8_same { "equal" } else { "different" }
        );
    }
    Ok(())
}
