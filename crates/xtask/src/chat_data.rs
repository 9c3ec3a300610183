//! `cargo xtask chat-data`: writes `data/shakespeare-chat.jsonl`, the SmolLM2 LoRA demo's
//! chat fine-tuning set, from the committed corpus (`models::shakespeare_chat`), every
//! conversation at most `shakespeare_chat::TOKENS_MAX` (256) tokens through SmolLM2-135M-Instruct's chat
//! template; or, with `--check`, regenerates it and compares it with the committed file.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The committed chat set.
pub(crate) const SHAKESPEARE_CHAT: &str = "data/shakespeare-chat.jsonl";

#[derive(Debug, clap::Args)]
pub(crate) struct ChatDataArgs {
    /// The SmolLM2-135M-Instruct GGUF (default: the cached one).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Regenerate and compare with the committed file instead of writing it.
    #[arg(long)]
    check: bool,
}

pub(crate) fn run(root: &Path, args: ChatDataArgs) -> anyhow::Result<()> {
    let gguf = args.gguf.unwrap_or_else(models::smollm2::gguf_path);
    let model =
        models::load_gguf(&gguf, None).with_context(|| format!("loading {}", gguf.display()))?;
    let corpus_path = root.join("data/shakespeare.txt");
    let corpus = std::fs::read_to_string(&corpus_path)
        .with_context(|| format!("reading {}", corpus_path.display()))?;
    let conversations =
        models::shakespeare_chat::conversations(&corpus, Default::default(), |messages| {
            models::tokenize_chat(&model, messages).map(|t| t.ids.len())
        })?;
    let text = models::shakespeare_chat::to_jsonl(&conversations);
    let path = root.join(SHAKESPEARE_CHAT);
    if args.check {
        let committed =
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if committed != text.as_bytes() {
            bail!(
                "{} differs from what the generator writes (sha256 {} committed, {} generated)",
                path.display(),
                models::smollm2::sha256_hex(&committed),
                models::smollm2::sha256_hex(text.as_bytes())
            );
        }
        println!("{} is what the generator writes", path.display());
    } else {
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    let chats = conversations
        .iter()
        .map(|m| models::tokenize_chat(&model, m))
        .collect::<Result<Vec<_>, _>>()?;
    let tokens: usize = chats.iter().map(|c| c.ids.len()).sum();
    let loss: usize = chats.iter().map(|c| c.n_loss()).sum();
    let longest = chats.iter().map(|c| c.ids.len()).max().unwrap_or(0);
    let pad = model.eos_token_id.unwrap_or(0);
    let windows = models::pack_chats(&chats, NonZeroUsize::new(256).context("seq")?, pad);
    println!(
        "{}: {} conversations, {} bytes, sha256 {}\n{tokens} tokens ({loss} in answers), longest {longest}; \
         at seq 256: {} windows ({} conversations packed, {} too long)",
        path.display(),
        conversations.len(),
        text.len(),
        models::smollm2::sha256_hex(text.as_bytes()),
        windows.n_windows(),
        windows.n_packed,
        windows.skipped_too_long,
    );
    Ok(())
}
