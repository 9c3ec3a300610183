//! The deterministic train/holdout split.
//!
//! The token stream is cut into blocks of [`BLOCK_TOKENS`] (smaller for small corpora so
//! there are at least [`HOLDOUT_EVERY`] blocks); every `HOLDOUT_EVERY`-th block (the
//! last of each group) is holdout, the rest is train. So the holdout is spread over the
//! whole corpus (every play, not just the last one) and is the same on every machine.

use std::path::Path;

use crate::DataError;

/// Tokens per split block.
pub const BLOCK_TOKENS: usize = 1024;
/// One block in this many is holdout (5%).
pub const HOLDOUT_EVERY: usize = 20;

/// A corpus split into train and holdout token streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub train: Vec<u32>,
    pub holdout: Vec<u32>,
}

impl Dataset {
    /// Splits `tokens`; fails if either side is shorter than one window of `seq + 1`.
    pub fn split(path: &Path, tokens: &[u32], seq: usize) -> Result<Dataset, DataError> {
        let block = BLOCK_TOKENS.min(tokens.len() / HOLDOUT_EVERY).max(1);
        let mut train = Vec::with_capacity(tokens.len());
        let mut holdout = Vec::with_capacity(tokens.len() / HOLDOUT_EVERY + block);
        for (i, chunk) in tokens.chunks(block).enumerate() {
            if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 {
                holdout.extend_from_slice(chunk);
            } else {
                train.extend_from_slice(chunk);
            }
        }
        let need = seq + 1;
        if train.len() < need || holdout.len() < need {
            return Err(DataError::TooShort {
                path: path.to_owned(),
                tokens: tokens.len(),
                need: need * HOLDOUT_EVERY,
                seq,
            });
        }
        Ok(Dataset { train, holdout })
    }

    /// The fixed holdout windows: `n` windows of `seq + 1` tokens at stride `seq` from
    /// the start of the holdout stream (fewer if the holdout is short), as `(start)`.
    pub fn holdout_starts(&self, seq: usize, n: usize) -> Vec<usize> {
        let usable = self.holdout.len().saturating_sub(seq + 1);
        (0..n).map(|i| i * seq).filter(|&s| s <= usable).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_five_percent_and_disjoint() {
        let tokens: Vec<u32> = (0..100_000).collect();
        let d = Dataset::split(Path::new("x"), &tokens, 128).expect("split");
        assert_eq!(d.train.len() + d.holdout.len(), tokens.len());
        // 98 blocks (the last partial): blocks 19, 39, 59 and 79 are holdout.
        assert_eq!(d.holdout.len(), 4 * BLOCK_TOKENS);
        assert_eq!(&d.holdout[..3], &[19 * 1024, 19 * 1024 + 1, 19 * 1024 + 2]);
        assert!(d.train.iter().all(|t| (t / 1024) % 20 != 19));
    }

    #[test]
    fn too_short_is_an_error() {
        let tokens: Vec<u32> = (0..500).collect();
        let err = Dataset::split(Path::new("tiny.txt"), &tokens, 128).expect_err("too short");
        expect_test::expect!["tiny.txt gives 500 tokens; 2580 are needed (one context of 128 plus one for the target, in both the train and the holdout split)"]
            .assert_eq(&err.to_string());
    }
}
