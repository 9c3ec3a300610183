//! `cargo xtask random-adapter`: a deterministic non-zero LoRA adapter for a base model,
//! written as a LoRA run's version is (`engine::checkpoint::trained_to_bytes`, the base's
//! sha256 in the metadata): the input of scripts/check_peft_export.py, which needs an
//! adapter that changes the base's greedy tokens.

use std::path::PathBuf;

use anyhow::Context;
use engine::lora::{LoraConfig, LoraTarget};

#[derive(Debug, clap::Args)]
pub(crate) struct RandomAdapterArgs {
    /// The base: a Llama `.gguf` file or an HF Llama directory.
    #[arg(long)]
    base: PathBuf,
    /// The adapter file to write (an adapter_model.safetensors).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Comma-separated targets: q, k, v, o, gate, up, down.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    targets: String,
    /// Each `B` is drawn from U(-b, b) (`A` as PEFT initializes it); 0 gives PEFT's own
    /// initialization, which leaves the base unchanged.
    #[arg(long, default_value_t = 0.02)]
    b: f32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The version recorded in the metadata.
    #[arg(long, default_value_t = 1)]
    version: u64,
}

pub(crate) fn run(args: RandomAdapterArgs) -> anyhow::Result<()> {
    let base = if args.base.is_dir() {
        models::load_hf_dir(&args.base, None)?
    } else {
        models::load_gguf(&args.base, None)?
    };
    let targets = args
        .targets
        .split(',')
        .map(|t| serde_json::from_value::<LoraTarget>(serde_json::json!(t.trim())))
        .collect::<Result<Vec<_>, _>>()
        .context("--targets")?;
    let lora = LoraConfig {
        rank: args.rank,
        alpha: args.alpha,
        targets,
    };
    lora.validate(&base.config)?;
    let tensors = models::export::random_adapter_tensors(&base.config, &lora, args.seed, args.b);
    let sha = models::export::sha256_file(&models::export::base_weights_file(&args.base))?;
    let adapter = models::export::Adapter {
        lora,
        tensors,
        base_sha256: Some(sha.clone()),
        version: Some(args.version),
    };
    let bytes = models::export::adapter_bytes(&base.name, &base.config, &adapter)?;
    engine::checkpoint::write_atomic(&args.out, &bytes)?;
    println!(
        "wrote {} ({} floats, base sha256 {sha})",
        args.out.display(),
        adapter.tensors.len()
    );
    Ok(())
}
