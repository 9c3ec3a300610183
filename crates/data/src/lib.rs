//! hivetrain's data: corpora, the BPE tokenizer, token caches, and exact addressing.
//!
//! What goes in: a UTF-8 text file or JSON lines with a `text` field, and a
//! `tokenizer.json`. What comes out: token ids, split deterministically into train and
//! holdout, and batches named by a `protocol::WorkAddress` (shard, offset, steps, seed) so that
//! one unit of work can be re-run anywhere and read exactly the same tokens.

pub mod address;
pub mod cache;
pub mod corpus;
pub mod examples;
pub mod split;
pub mod tokenizer;

use std::path::PathBuf;

pub use address::TokenBatch;
pub use examples::{Examples, Windows};
pub use split::Dataset;
pub use tokenizer::TextTokenizer;

/// Everything that can be wrong with a dataset, tokenizer or cache file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not UTF-8 text (first bad byte at offset {offset}); give a UTF-8 text file or JSON lines with a \"text\" field"
    )]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("{path} line {line}: {message}")]
    BadJsonLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path} holds no text")]
    Empty { path: PathBuf },
    #[error("{path} is not a usable tokenizer.json: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("cannot train a tokenizer: {0}")]
    TokenizerTraining(String),
    #[error(
        "{path} gives {tokens} tokens; {need} are needed (one context of {seq} plus one for the target, in both the train and the holdout split)"
    )]
    TooShort {
        path: PathBuf,
        tokens: usize,
        need: usize,
        seq: usize,
    },
    #[error("token id {token} from the tokenizer does not fit the cache")]
    TokenTooLarge { token: u32 },
    #[error("shard {shard} does not exist: the train split has {n_shards} shards")]
    NoSuchShard { shard: u32, n_shards: u32 },
    #[error(
        "the data is in windows of {have} tokens; a batch of {want} was asked for (the run's seq must be the windows')"
    )]
    WindowSeq { have: usize, want: usize },
    #[error(
        "{path} packs into {windows} windows of {seq} tokens; at least 2 are needed (one to train on, one for the holdout)"
    )]
    TooFewWindows {
        path: PathBuf,
        windows: usize,
        seq: usize,
    },
    #[error("shard {shard} holds {tokens} tokens, fewer than one window of {need}")]
    ShardTooShort {
        shard: u32,
        tokens: usize,
        need: usize,
    },
}

/// SHA-256 of bytes, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
