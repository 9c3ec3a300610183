//! Naming training data exactly: a [`WorkAddress`] (shard, offset, steps, seed) gives the
//! same batches on every machine.
//!
//! The train stream is cut into `n_shards` contiguous, equal shards. Step `i` of an
//! address reads `batch` windows of `seq + 1` tokens whose starts are drawn from the
//! shard by SplitMix64 keyed by (seed, shard, offset + i). Consecutive units of one
//! shard (offset, offset + steps, ...) continue one stream; nothing depends on a
//! library's RNG version.

use serde::{Deserialize, Serialize};

use crate::DataError;

/// Where one unit of work reads its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkAddress {
    pub shard: u32,
    /// Index of the first step within the shard's stream.
    pub offset: u64,
    pub steps: u32,
    pub seed: u64,
}

/// A batch of `batch` windows of `seq` tokens, row-major; targets are shifted by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// Start of each window in the train stream.
    pub starts: Vec<usize>,
    pub batch: usize,
    pub seq: usize,
}

/// SplitMix64's output function: the one seeded mixing hivetrain's pure cores use, so
/// that their choices do not depend on an RNG crate's version.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The token range of `shard` of `n_shards` equal parts of a stream of `len` tokens.
pub fn shard_range(
    len: usize,
    n_shards: u32,
    shard: u32,
) -> Result<std::ops::Range<usize>, DataError> {
    if shard >= n_shards {
        return Err(DataError::NoSuchShard { shard, n_shards });
    }
    let per = len / n_shards as usize;
    let start = per * shard as usize;
    Ok(start..start + per)
}

impl WorkAddress {
    /// Window starts of step `step` (0-based within this unit).
    pub fn starts(
        &self,
        step: u32,
        shard: std::ops::Range<usize>,
        batch: usize,
        seq: usize,
    ) -> Result<Vec<usize>, DataError> {
        let need = seq + 1;
        if shard.len() < need {
            return Err(DataError::ShardTooShort {
                shard: self.shard,
                tokens: shard.len(),
                need,
            });
        }
        let span = (shard.len() - need + 1) as u64;
        let key = splitmix64(
            self.seed ^ splitmix64(self.shard as u64 ^ splitmix64(self.offset + step as u64)),
        );
        Ok((0..batch as u64)
            .map(|row| shard.start + (splitmix64(key.wrapping_add(row)) % span) as usize)
            .collect())
    }

    /// The batch of step `step` read from the `train` stream.
    pub fn batch(
        &self,
        train: &[u32],
        n_shards: u32,
        step: u32,
        batch: usize,
        seq: usize,
    ) -> Result<TokenBatch, DataError> {
        let range = shard_range(train.len(), n_shards, self.shard)?;
        let starts = self.starts(step, range, batch, seq)?;
        Ok(batch_at(train, &starts, seq))
    }
}

/// The batch whose windows start at `starts`.
pub fn batch_at(tokens: &[u32], starts: &[usize], seq: usize) -> TokenBatch {
    let mut inputs = Vec::with_capacity(starts.len() * seq);
    let mut targets = Vec::with_capacity(starts.len() * seq);
    for &s in starts {
        inputs.extend_from_slice(&tokens[s..s + seq]);
        targets.extend_from_slice(&tokens[s + 1..s + seq + 1]);
    }
    TokenBatch {
        inputs,
        targets,
        starts: starts.to_vec(),
        batch: starts.len(),
        seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(address: WorkAddress, expect: expect_test::Expect) {
        let train: Vec<u32> = (0..10_000).collect();
        let steps: Vec<Vec<usize>> = (0..address.steps)
            .map(|i| address.batch(&train, 4, i, 3, 16).expect("batch").starts)
            .collect();
        expect.assert_eq(&format!("{steps:?}"));
    }

    #[test]
    fn addresses_name_exact_windows() {
        let a = WorkAddress {
            shard: 1,
            offset: 0,
            steps: 2,
            seed: 7,
        };
        check(
            a,
            expect_test::expect!["[[4820, 3847, 3433], [3106, 4500, 4907]]"],
        );
        // The second step of one unit is the first step of a unit one step later.
        check(
            WorkAddress {
                offset: 1,
                steps: 1,
                ..a
            },
            expect_test::expect!["[[3106, 4500, 4907]]"],
        );
        check(
            WorkAddress { seed: 8, ..a },
            expect_test::expect!["[[3023, 3911, 3905], [3677, 3366, 4528]]"],
        );
    }

    #[test]
    fn windows_stay_inside_the_shard() {
        let train: Vec<u32> = (0..1000).collect();
        for step in 0..200 {
            let b = WorkAddress {
                shard: 3,
                offset: 0,
                steps: 200,
                seed: 1,
            }
            .batch(&train, 4, step, 8, 16)
            .expect("batch");
            for (&s, row) in b.starts.iter().zip(b.targets.chunks(16)) {
                assert!((750..1000 - 16).contains(&s));
                assert_eq!(row[15] as usize, s + 16);
            }
        }
        let err = WorkAddress {
            shard: 4,
            offset: 0,
            steps: 1,
            seed: 1,
        }
        .batch(&train, 4, 0, 1, 16)
        .expect_err("no shard");
        assert_eq!(
            err.to_string(),
            "shard 4 does not exist: the train split has 4 shards"
        );
    }
}
