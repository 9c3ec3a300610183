//! `hivetrain generate`: sample text from a trained model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use engine::generate::SamplingParams;

use crate::paths;

#[derive(Debug, clap::Args)]
pub(crate) struct GenerateArgs {
    /// The prompt.
    #[arg(default_value = "Ham.\n")]
    prompt: String,
    /// A model directory from `hivetrain train`, or a .safetensors checkpoint.
    #[arg(long, default_value = "runs/small")]
    model: PathBuf,
    /// Tokenizer (default: the one saved beside the model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Use this version of a coordinator's run (see `hivetrain model list`) instead of
    /// --model.
    #[arg(long)]
    version: Option<u64>,
    /// The run directory `--version` refers to.
    #[arg(long, env = "HIVETRAIN_RUN_DIR", default_value = "runs/coordinator")]
    run: PathBuf,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute device: `auto`, `cpu`, `cpu:N`, `cuda` or `cuda:N` (a GPU decodes in
    /// bf16, so its tokens may part from the CPU's at a near tie).
    #[arg(long, env = crate::env::DEVICE, default_value = "cpu")]
    device: String,
}

pub(crate) fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number of at least 0");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let (ckpt, tokenizer) = match args.version {
        Some(version) => {
            let model = crate::model::load_version(&args.run, Some(version))?;
            (model.checkpoint, model.tokenizer)
        }
        None => {
            let (checkpoint, tokenizer_path) =
                paths::model_files(&args.model, args.tokenizer.as_deref())?;
            let ckpt = engine::checkpoint::load(&checkpoint)?;
            let tokenizer = paths::load_tokenizer(&tokenizer_path)?;
            if tokenizer.vocab_size() != ckpt.config.vocab_size {
                bail!(
                    "the tokenizer {} has {} tokens but the model {} expects {}",
                    tokenizer_path.display(),
                    tokenizer.vocab_size(),
                    checkpoint.display(),
                    ckpt.config.vocab_size
                );
            }
            (ckpt, tokenizer)
        }
    };
    let mut backend = engine::open_backend(&args.device, ckpt.config, ckpt.params)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    // Print as we go; decode the running text so multi-token characters come out whole.
    let mut ids = Vec::new();
    let mut printed = 0;
    let mut io_error = None;
    engine::generate::generate(
        backend.as_mut(),
        &prompt,
        args.max_tokens,
        &sampling,
        &mut |id| {
            ids.push(id);
            let text = tokenizer.decode(&ids);
            if text.len() > printed && text.is_char_boundary(printed) && !text.ends_with('\u{fffd}')
            {
                if let Err(e) = write!(stdout, "{}", &text[printed..]).and_then(|_| stdout.flush())
                {
                    io_error = Some(e);
                    return false;
                }
                printed = text.len();
            }
            true
        },
    )?;
    if let Some(e) = io_error {
        return Err(e).context("writing to stdout");
    }
    writeln!(stdout)?;
    Ok(())
}
