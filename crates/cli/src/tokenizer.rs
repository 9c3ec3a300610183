//! `hivetrain tokenizer`: train a byte-level BPE, encode, decode, inspect.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::paths;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenizerCommand {
    /// Train a byte-level BPE on a corpus and write tokenizer.json.
    Train {
        /// Corpus: a UTF-8 text file, or JSON lines (.jsonl) with a "text" field.
        #[arg(long, default_value = paths::DEFAULT_CORPUS)]
        corpus: PathBuf,
        /// Vocabulary size, the end-of-text token included.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Where to write tokenizer.json.
        #[arg(long, default_value = paths::DEFAULT_TOKENIZER)]
        out: PathBuf,
    },
    /// Print the token ids of a text.
    Encode {
        text: String,
        #[arg(long, default_value = paths::DEFAULT_TOKENIZER)]
        tokenizer: PathBuf,
    },
    /// Print the text of token ids.
    Decode {
        ids: Vec<u32>,
        #[arg(long, default_value = paths::DEFAULT_TOKENIZER)]
        tokenizer: PathBuf,
    },
    /// Vocabulary size, and tokens per byte on a corpus.
    Info {
        #[arg(long, default_value = paths::DEFAULT_TOKENIZER)]
        tokenizer: PathBuf,
        #[arg(long)]
        corpus: Option<PathBuf>,
    },
}

pub(crate) fn run(command: TokenizerCommand) -> anyhow::Result<()> {
    match command {
        TokenizerCommand::Train {
            corpus,
            vocab_size,
            out,
        } => {
            if vocab_size < 257 {
                bail!("--vocab-size must be at least 257 (256 bytes plus the end-of-text token)");
            }
            let corpus = paths::bundled(&corpus);
            let docs = data::corpus::load_documents(&corpus)?;
            let started = std::time::Instant::now();
            let tokenizer = data::TextTokenizer::train(&docs, vocab_size)?;
            tokenizer.save(&out)?;
            println!(
                "trained a {}-token BPE on {} in {:.1} s; wrote {}",
                tokenizer.vocab_size(),
                corpus.display(),
                started.elapsed().as_secs_f64(),
                out.display()
            );
        }
        TokenizerCommand::Encode { text, tokenizer } => {
            let tokenizer = paths::load_tokenizer(&paths::bundled(&tokenizer))?;
            let ids = tokenizer.encode(&text)?;
            println!(
                "{}",
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
            );
        }
        TokenizerCommand::Decode { ids, tokenizer } => {
            let tokenizer = paths::load_tokenizer(&paths::bundled(&tokenizer))?;
            if let Some(bad) = ids
                .iter()
                .find(|&&id| id as usize >= tokenizer.vocab_size())
            {
                bail!(
                    "token id {bad} is outside the vocabulary of {}",
                    tokenizer.vocab_size()
                );
            }
            println!("{}", tokenizer.decode(&ids));
        }
        TokenizerCommand::Info { tokenizer, corpus } => {
            let path = paths::bundled(&tokenizer);
            let tokenizer = paths::load_tokenizer(&path)?;
            println!("{}: {} tokens", path.display(), tokenizer.vocab_size());
            if let Some(corpus) = corpus {
                let corpus = paths::bundled(&corpus);
                let docs = data::corpus::load_documents(&corpus)?;
                let bytes: usize = docs.iter().map(String::len).sum();
                let mut tokens = 0;
                for doc in &docs {
                    tokens += tokenizer
                        .encode(doc)
                        .with_context(|| format!("encoding {}", corpus.display()))?
                        .len();
                }
                println!(
                    "{}: {bytes} bytes -> {tokens} tokens ({:.3} bytes per token)",
                    corpus.display(),
                    bytes as f64 / tokens as f64
                );
            }
        }
    }
    Ok(())
}
