//! `hivetrain export --hf DIR`: a directory HF transformers loads as `GPT2LMHeadModel`.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::paths;

#[derive(Debug, clap::Args)]
pub(crate) struct ExportArgs {
    /// A model directory from `hivetrain train`, or a .safetensors checkpoint.
    #[arg(long, default_value = "runs/small")]
    model: PathBuf,
    /// Tokenizer (default: the one saved beside the model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Output directory: config.json, model.safetensors, tokenizer.json.
    #[arg(long)]
    hf: PathBuf,
}

pub(crate) fn run(args: ExportArgs) -> anyhow::Result<()> {
    let (checkpoint, tokenizer_path) = paths::model_files(&args.model, args.tokenizer.as_deref())?;
    let ckpt = engine::checkpoint::load(&checkpoint)?;
    let tokenizer = paths::load_tokenizer(&tokenizer_path)?;
    write_hf(&args.hf, &ckpt, &tokenizer)?;
    println!(
        "exported {} to {} (load with GPT2LMHeadModel.from_pretrained)",
        checkpoint.display(),
        args.hf.display()
    );
    Ok(())
}

/// Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json.
pub(crate) fn write_hf(
    dir: &Path,
    ckpt: &engine::checkpoint::Checkpoint,
    tokenizer: &data::TextTokenizer,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = engine::checkpoint::hf_config_json(&ckpt.config, tokenizer.end_of_text());
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("config.json", serde_json::to_string_pretty(&config)?)?;
    engine::checkpoint::save(
        &dir.join("model.safetensors"),
        &ckpt.config,
        &ckpt.params,
        &ckpt.metadata,
    )?;
    tokenizer.save(&dir.join("tokenizer.json"))?;
    let eos = data::tokenizer::END_OF_TEXT;
    let tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": ckpt.config.n_ctx,
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tokenizer_config)?,
    )
}
