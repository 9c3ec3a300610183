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
    /// The device (default `cpu:THREADS`): `cuda` trains the unit on the GPU (bf16), to
    /// measure how far a GPU's honest unit lies from a CPU's re-run of it.
    #[arg(long)]
    device: Option<String>,
    /// Write the delta (f32, little-endian) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compare with a delta written by `--out` (on another machine).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Flip the lowest mantissa bit of every starting parameter: the same unit from a
    /// start one float step away, a stand-in for the last-bit differences another CPU's
    /// kernels make, to see how far such a difference grows over the unit.
    #[arg(long)]
    perturb: bool,
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
    let mut base = spec.init_params(1)?;
    if args.perturb {
        base.iter_mut()
            .for_each(|x| *x = f32::from_bits(x.to_bits() ^ 1));
    }
    let device = crate::bench::device_or_cpu(args.device.as_deref(), args.threads as usize);
    let mut backend = engine::open_model(&device, &spec, base.clone(), engine::Purpose::Train)?;
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
    println!("CPU class {}", engine::cpu_class());
    println!(
        "{} preset, {} steps of {batch} x {seq} on {}{}: delta of {} values, norm {:.6}, int8 payload blake3 {}",
        args.preset,
        args.steps,
        backend.device(),
        if args.perturb {
            ", start perturbed"
        } else {
            ""
        },
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
        let figures = Difference::of(&delta, &other);
        let (ours, theirs) = (codec.encode(&delta), codec.encode(&other));
        let n = u32::try_from(delta.len()).context("delta too long")?;
        let int8_distance = coordinator::core::checks::relative_distance(
            &codec.decode(&theirs, n)?,
            &codec.decode(&ours, n)?,
        );
        let int8_bytes_differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        println!(
            "against {}: {} of {} values bit-equal; largest absolute difference {:.3e}, \
             largest relative {:.3e}, relative L2 distance {:.3e}; int8 payloads {} \
             ({int8_bytes_differ} bytes differ, relative L2 distance of the decoded \
             payloads, what spot_check.tolerance bounds: {int8_distance:.3e})",
            path.display(),
            figures.equal,
            delta.len(),
            figures.max_abs,
            figures.max_rel,
            coordinator::core::checks::relative_distance(&delta, &other),
            if ours == theirs { "equal" } else { "different" }
        );
    }
    Ok(())
}

/// How two deltas of the same unit differ, element by element.
#[derive(Debug, PartialEq)]
struct Difference {
    /// Elements with the same bits.
    equal: usize,
    /// The largest `|a - b|`.
    max_abs: f64,
    /// The largest `|a - b| / max(|a|, |b|)` (0 where both are 0).
    max_rel: f64,
}

impl Difference {
    fn of(a: &[f32], b: &[f32]) -> Difference {
        let mut d = Difference {
            equal: 0,
            max_abs: 0.0,
            max_rel: 0.0,
        };
        for (&x, &y) in a.iter().zip(b) {
            if x.to_bits() == y.to_bits() {
                d.equal += 1;
                continue;
            }
            let (x, y) = (f64::from(x), f64::from(y));
            let abs = (x - y).abs();
            d.max_abs = d.max_abs.max(abs);
            d.max_rel = d.max_rel.max(abs / x.abs().max(y.abs()));
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::Difference;

    #[track_caller]
    fn check(a: &[f32], b: &[f32], want: Difference) {
        assert_eq!(Difference::of(a, b), want);
    }

    #[test]
    fn differences() {
        let none = Difference {
            equal: 3,
            max_abs: 0.0,
            max_rel: 0.0,
        };
        check(&[1.0, -2.0, 0.0], &[1.0, -2.0, 0.0], none);
        check(
            &[1.0, -2.0, 0.5],
            &[1.0, -2.5, 0.25],
            Difference {
                equal: 1,
                max_abs: 0.5,
                max_rel: 0.5,
            },
        );
        // -0.0 and 0.0 differ in bits but by nothing.
        check(
            &[0.0, 4.0],
            &[-0.0, 3.0],
            Difference {
                equal: 0,
                max_abs: 1.0,
                max_rel: 0.25,
            },
        );
    }
}
